// train.cu: `./train`, training a blocktf model on one GPU (see kUsage below, or ./train --help).
// Per step: micro-batches from the shard (gradient accumulation), forward + backward, global-norm check, AdamW,
// a progress line (loss, lr, norm, ms, tokens/s, MFU, ETA) and a row of DIR/log.csv; validation and checkpoints
// at intervals; Ctrl-C checkpoints and exits; a non-finite loss or norm stops before the update.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <random>
#include <string>
#include "blocktf.cu"   // defines: GpuModel, BatchPlan, plan_batch, Gpu, cuda checks
#include "loader.h"     // defines: TokenShard, SampleLoader (the sample stream), check_data
#include "model.h"      // defines: configs, tensor table, learning_rate, training_flops_per_sequence

constexpr double kH200PeakBf16Flops = 989e12;   // dense bf16 tensor-core peak, for MFU (issue 5)

// ----------------------------------------------------------------------------------------------------------------
// Command line: long options only, each `--name value` or a bare `--flag`.

struct Options {
    std::map<std::string, std::string> values;
    bool has(const std::string& name) const { return values.count(name) > 0; }
    std::string get(const std::string& name, const std::string& fallback) const {
        auto it = values.find(name);
        return it == values.end() ? fallback : it->second;
    }
    long get_int(const std::string& name, long fallback) const {
        if (!has(name)) return fallback;
        char* end = nullptr;
        long v = std::strtol(values.at(name).c_str(), &end, 10);
        if (*end != '\0' || values.at(name).empty()) throw std::runtime_error("--" + name + " expects an integer, got '" + values.at(name) + "'");
        return v;
    }
    double get_double(const std::string& name, double fallback) const {
        if (!has(name)) return fallback;
        char* end = nullptr;
        double v = std::strtod(values.at(name).c_str(), &end);
        if (*end != '\0' || values.at(name).empty()) throw std::runtime_error("--" + name + " expects a number, got '" + values.at(name) + "'");
        return v;
    }
};

static const char* kUsage =
    "usage: ./train --config NAME --data PREFIX --out DIR [options]     train on a Megatron .bin/.idx shard\n"
    "       ./train --resume DIR [--data PREFIX] [options]                continue the newest checkpoint in DIR\n"
    "       ./train --check-data PREFIX                                  validate a shard and print its statistics\n"
    "       ./train --bench --config NAME [--micro-batch B] [--steps N]  time training steps on random tokens\n"
    "       ./train --list-configs\n"
    "options (defaults: the config's, SPEC section 2):\n"
    "  --config NAME              named config (--list-configs)\n"
    "  --data PREFIX              training shard PREFIX.bin/.idx (Pythia's Megatron format)\n"
    "  --val-data PREFIX          validation shard; default: the last --val-fraction of --data's documents\n"
    "  --val-fraction F           documents held out of --data for validation when there is no --val-data (0.01)\n"
    "  --out DIR                  where checkpoints (DIR/checkpoint-<step>/) and log.csv go\n"
    "  --micro-batch B            sequences per forward/backward\n"
    "  --batch-size N             sequences per optimizer update (a multiple of --micro-batch: gradient accumulation)\n"
    "  --steps N                  optimizer updates (also the length of the cosine schedule)\n"
    "  --lr X  --warmup N  --weight-decay X  --clip X     AdamW and schedule (SPEC 3.3, 3.4)\n"
    "  --seed N                   data order, padding and initialisation seed (42)\n"
    "  --val-interval N  --val-batches N                  validate every N updates on N micro-batches (100, 10)\n"
    "  --checkpoint-interval N    write a checkpoint every N updates (500) and at the end\n"
    "  --resume DIR               continue from DIR's newest checkpoint: weights, optimizer, data position\n"
    "  --init-from CHECKPOINT     start from these weights (a checkpoint directory), fresh optimizer\n"
    "Ctrl-C writes a checkpoint and exits; a non-finite loss or gradient stops the run before the update.\n";

static Options parse_options(int argc, char** argv) {
    static const char* flags[] = {"list-configs", "bench", "help"};
    static const char* valued[] = {"config", "data", "val-data", "val-fraction", "out", "micro-batch", "batch-size", "steps",
                                   "lr", "warmup", "weight-decay", "clip", "seed", "val-interval", "val-batches",
                                   "checkpoint-interval", "resume", "init-from", "check-data"};
    Options options;
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i];
        if (arg.rfind("--", 0) != 0) throw std::runtime_error("unexpected argument '" + arg + "' (see --help)");
        std::string name = arg.substr(2);
        bool is_flag = std::find(std::begin(flags), std::end(flags), name) != std::end(flags);
        bool is_valued = std::find(std::begin(valued), std::end(valued), name) != std::end(valued);
        if (!is_flag && !is_valued) throw std::runtime_error("unknown option '" + arg + "' (see --help)");
        if (is_valued && i + 1 >= argc) throw std::runtime_error("option '" + arg + "' needs a value");
        options.values[name] = is_flag ? "1" : argv[++i];
    }
    return options;
}

// ----------------------------------------------------------------------------------------------------------------

static void list_configs() {
    std::printf("%-20s %-8s %14s %14s %14s\n", "config", "kind", "non-embedding", "used", "stored");
    for (const ModelConfig& config : named_configs()) {
        ParamCounts n = count_params(build_tensor_table(config));
        std::printf("%-20s %-8s %13.2fM %13.2fM %13.2fM\n", config.name.c_str(), config.is_block ? "block" : "vanilla",
                    n.non_embedding / 1e6, n.used / 1e6, n.stored / 1e6);
    }
}

// Random weights on the init scale of SPEC 1.1.8 (N(0, 0.02), LayerNorm 1/0, expansion N(0, 1/DB)): speed does
// not depend on the values, but NaN-free, realistic magnitudes keep the run honest.
static std::vector<float> random_init(const TensorTable& table, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> host(table.num_params, 0.0f);
    for (const ParamTensor& t : table.tensors) {
        float* p = host.data() + t.offset;
        bool layernorm_weight = t.name.find("layernorm.weight") != std::string::npos || t.name.find("layer_norm.weight") != std::string::npos;
        bool bias = t.shape.size() == 1 && !layernorm_weight;
        float std = t.name.find("expansion_layer.weight") != std::string::npos ? 1.0f / std::sqrt((float)t.shape[1]) : 0.02f;
        for (size_t i = 0; i < t.numel; i++) p[i] = layernorm_weight ? 1.0f : bias ? 0.0f : std * normal(rng);
    }
    return host;
}

// Full training steps (forward, backward, AdamW) on random tokens, timed with CUDA events after a warm-up.
static void bench(const ModelConfig& config, int micro_batch, int steps) {
    print_device_info();
    GpuModel model(config, micro_batch, config.T);
    model.load_parameters(random_init(model.table, 1));
    std::mt19937 rng(2);
    std::vector<int> ids((size_t)micro_batch * config.T), mask(ids.size(), 1);
    for (int& id : ids) id = 2 + rng() % 50000 % (config.V - 2);
    BatchPlan plan = plan_batch(config, micro_batch, config.T, ids, mask);

    auto step = [&]() {
        model.zero_grad();
        model.forward(plan, 1.0f);
        model.backward();
        model.update(AdamWSettings{1e-4f});
        return model.finish();
    };
    for (int i = 0; i < 3; i++) step();
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    std::vector<float> times;
    for (int i = 0; i < steps; i++) {
        cudaCheck(cudaEventRecord(start, model.gpu.stream));
        step();
        cudaCheck(cudaEventRecord(stop, model.gpu.stream));
        cudaCheck(cudaEventSynchronize(stop));
        float ms = 0.0f;
        cudaCheck(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms);
    }
    std::sort(times.begin(), times.end());
    const double median_ms = times[times.size() / 2];
    const double tokens = (double)micro_batch * config.T;
    const double flops = training_flops_per_sequence(config) * micro_batch;
    size_t free_bytes = 0, total_bytes = 0;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    std::printf("| config | micro-batch x T | step ms (median of %d) | tokens/s | TFLOP/s | MFU | GPU memory used |\n", steps);
    std::printf("| %s | %d x %d | %.2f | %.0f | %.1f | %.1f%% | %.1f GiB |\n", config.name.c_str(), micro_batch, config.T,
                median_ms, tokens / (median_ms / 1e3), flops / (median_ms / 1e3) / 1e12,
                100.0 * flops / (median_ms / 1e3) / kH200PeakBf16Flops, (total_bytes - free_bytes) / 1073741824.0);
}

// ----------------------------------------------------------------------------------------------------------------
// Training.

// Micro-batches for the GPU from a shard: SampleLoader (loader.h) cuts the sample stream of SPEC 3.5 into (ids, mask),
// plan_batch (blocktf.cu) prepares what the kernels need. The next micro-batch is prepared on a host thread while
// the GPU runs the current one, so the step does no per-token host work.
class TrainingData {
public:
    enum class Documents { kAll, kTrainSplit, kValidationSplit };   // the split: the last val_fraction of documents

    // shuffle: a new sample order every epoch (training); false: stream order (validation sees the same samples).
    TrainingData(const std::string& prefix, const ModelConfig& config, uint64_t seed, Documents documents, double val_fraction,
                 bool shuffle)
        : config_(config) {
        SampleOptions options;
        options.T = config.T;
        options.pad_blocks = config.is_block && config.train.pad_blocks;
        options.LB = config.is_block ? config.LB : 1;
        options.seed = seed;
        options.shuffle = shuffle;
        options.vocab_size = config.V;
        std::shared_ptr<const TokenShard> shard = std::make_shared<const TokenShard>(TokenShard::open(prefix));
        const size_t split = validation_start(shard->num_docs(), documents == Documents::kAll ? 0.0 : val_fraction);
        if (documents == Documents::kTrainSplit) options.doc_end = split;
        if (documents == Documents::kValidationSplit) options.doc_begin = split;
        if (documents == Documents::kValidationSplit && val_fraction == 0.0)
            throw std::runtime_error("no validation documents: give --val-data or a --val-fraction above 0");
        loader_ = std::make_unique<SampleLoader>(shard, options);
        if (loader_->num_samples() == 0)
            throw std::runtime_error(prefix + ": documents " + std::to_string(options.doc_begin) + ".. hold fewer than " +
                                     std::to_string(config.T) + " tokens: not one sample");
    }
    ~TrainingData() { if (pending_.valid()) pending_.wait(); }

    // The next micro-batch of B samples.
    const BatchPlan& next(int B) {
        if (!pending_.valid()) prefetch(B);
        current_ = pending_.get();
        prefetch(B);
        return current_;
    }
    // Where the next micro-batch handed out will come from (a prefetched one is not counted as handed out).
    std::string position() const { return pending_.valid() ? pending_position_.to_string() : loader_->position().to_string(); }
    void restore(const std::string& position) {
        if (pending_.valid()) pending_.wait();
        pending_ = {};
        loader_->restore(LoaderPosition::parse(position));
    }
    void rewind() { restore(LoaderPosition{loader_->position().seed, 0, 0, loader_->num_samples()}.to_string()); }
    std::string describe() const {
        return loader_->shard().prefix() + " documents " + std::to_string(loader_->options().doc_begin) + ".." +
               std::to_string(loader_->options().doc_end) + ", " + std::to_string(loader_->num_samples()) + " samples of " +
               std::to_string(config_.T) + " tokens" + (loader_->options().pad_blocks ? ", block padding" : "");
    }

private:
    ModelConfig config_;
    std::unique_ptr<SampleLoader> loader_;
    std::future<BatchPlan> pending_;
    LoaderPosition pending_position_;
    BatchPlan current_;

    void prefetch(int B) {
        pending_position_ = loader_->position();
        pending_ = std::async(std::launch::async, [this, B] {
            std::vector<int> ids, mask;
            loader_->next_batch((size_t)B, ids, mask);
            return plan_batch(config_, B, config_.T, ids, mask);
        });
    }
};

static volatile std::sig_atomic_t g_interrupted = 0;   // set by Ctrl-C; the loop checkpoints and exits
static void on_interrupt(int) { g_interrupted = 1; }

struct RunSettings {
    ModelConfig config;
    std::string data, val_data, out, resume, init_from;
    double val_fraction = 0.01;
    int micro_batch = 0, batch_size = 0, accumulation = 0;
    long steps = 0, warmup = 0, val_interval = 100, val_batches = 10, checkpoint_interval = 500;
    uint64_t seed = 42;
    AdamWSettings adamw;
};

static RunSettings resolve_settings(const Options& options) {
    RunSettings run;
    run.resume = options.get("resume", "");
    std::string resume_checkpoint = run.resume.empty() ? "" : latest_checkpoint(run.resume);
    if (!run.resume.empty() && resume_checkpoint.empty())
        throw std::runtime_error("--resume " + run.resume + ": no complete checkpoint-<step> directory there");
    if (!resume_checkpoint.empty()) {
        run.config = read_checkpoint_config(resume_checkpoint);
        if (options.has("config") && options.get("config", "") != run.config.name)
            throw std::runtime_error("--config " + options.get("config", "") + " differs from the checkpoint's " + run.config.name);
    } else {
        if (!options.has("config")) throw std::runtime_error("--config NAME is required (see --list-configs)");
        run.config = config_by_name(options.get("config", ""));
    }
    const TrainDefaults& d = run.config.train;
    run.data = options.get("data", "");
    run.val_data = options.get("val-data", "");
    run.out = options.get("out", run.resume);
    run.init_from = options.get("init-from", "");
    run.val_fraction = options.get_double("val-fraction", 0.01);
    run.micro_batch = (int)options.get_int("micro-batch", d.micro_batch);
    run.batch_size = (int)options.get_int("batch-size", d.batch);
    run.steps = options.get_int("steps", d.steps);
    run.warmup = options.get_int("warmup", std::min<long>(d.warmup, run.steps));
    run.val_interval = options.get_int("val-interval", 100);
    run.val_batches = options.get_int("val-batches", 10);
    run.checkpoint_interval = options.get_int("checkpoint-interval", 500);
    run.seed = (uint64_t)options.get_int("seed", 42);
    run.adamw.lr = (float)options.get_double("lr", d.lr);
    run.adamw.weight_decay = (float)options.get_double("weight-decay", kWeightDecay);
    run.adamw.clip = (float)options.get_double("clip", kGradClip);
    if (run.data.empty()) throw std::runtime_error("--data PREFIX is required (a Megatron .bin/.idx shard; ./prepare --out makes one)");
    if (run.out.empty()) throw std::runtime_error("--out DIR is required");
    if (run.micro_batch <= 0 || run.batch_size <= 0 || run.batch_size % run.micro_batch != 0)
        throw std::runtime_error("--batch-size (" + std::to_string(run.batch_size) + ") must be a positive multiple of --micro-batch (" +
                                 std::to_string(run.micro_batch) + ")");
    if (run.steps <= 0 || run.warmup < 0 || run.warmup > run.steps) throw std::runtime_error("need --steps > 0 and 0 <= --warmup <= --steps");
    if (run.val_interval <= 0 || run.val_batches < 0 || run.checkpoint_interval <= 0)
        throw std::runtime_error("--val-interval and --checkpoint-interval must be > 0, --val-batches >= 0");
    if (!(run.adamw.lr > 0) || !(run.adamw.weight_decay >= 0) || !(run.adamw.clip > 0))
        throw std::runtime_error("need --lr > 0, --weight-decay >= 0 and --clip > 0");
    if (!(run.val_fraction >= 0 && run.val_fraction < 1)) throw std::runtime_error("--val-fraction must be in [0, 1)");
    if (!run.resume.empty() && !run.init_from.empty()) throw std::runtime_error("--resume and --init-from exclude each other");
    if (run.resume.empty() && !latest_checkpoint(run.out).empty())   // never overwrite another run's checkpoints
        throw std::runtime_error("--out " + run.out + " already holds checkpoints (" + latest_checkpoint(run.out) +
                                 "): continue that run with --resume " + run.out + ", or choose another --out");
    run.accumulation = run.batch_size / run.micro_batch;
    return run;
}

static std::string format_duration(double seconds) {
    long s = (long)seconds;
    char text[32];
    if (s >= 3600) std::snprintf(text, sizeof(text), "%ldh%02ldm", s / 3600, s / 60 % 60);
    else std::snprintf(text, sizeof(text), "%ldm%02lds", s / 60, s % 60);
    return text;
}

static void print_plan(const RunSettings& run, const GpuModel& model) {
    const ModelConfig& c = run.config;
    ParamCounts n = count_params(model.table);
    std::printf("config %s (%s): ", c.name.c_str(), c.is_block ? "Block Transformer" : "vanilla GPT-NeoX");
    if (c.is_block)
        std::printf("LB %d, P %d, DE %d, block decoder %d x %d (%d heads), token decoder %d x %d (%d heads), V %d, T %d\n", c.LB,
                    c.P, c.DE, c.block_decoder.L, c.block_decoder.C, c.block_decoder.NH, c.token_decoder.L, c.token_decoder.C,
                    c.token_decoder.NH, c.V, c.T);
    else
        std::printf("%d x %d (%d heads, MLP %d), V %d, T %d\n", c.token_decoder.L, c.token_decoder.C, c.token_decoder.NH,
                    c.token_decoder.I, c.V, c.T);
    std::printf("parameters: %.2fM non-embedding, %.2fM used, %.2fM stored\n", n.non_embedding / 1e6, n.used / 1e6, n.stored / 1e6);
    const double GiB = 1073741824.0;
    const double params = model.table.num_params, trainable = model.table.num_trainable;
    std::printf("memory: params %.2f GiB (%s) + master %.2f + grads %.2f + AdamW m, v %.2f GiB", params * sizeof(floatX) / GiB,
                kPrecisionName, params * 4 / GiB, trainable * sizeof(floatX) / GiB, trainable * 8 / GiB);
    size_t free_bytes = 0, total_bytes = 0;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    std::printf("; all buffers incl. activations for %d x %d: %.2f of %.1f GiB\n", run.micro_batch, c.T,
                (total_bytes - free_bytes) / GiB, total_bytes / GiB);
    std::printf("optimization: %ld updates of %d sequences (%d x %d accumulated), lr %.2e, warmup %ld, cosine to 10%%, "
                "weight decay %.2f, clip %.2f, seed %llu\n", run.steps, run.batch_size, run.micro_batch, run.accumulation,
                run.adamw.lr, run.warmup, run.adamw.weight_decay, run.adamw.clip, (unsigned long long)run.seed);
}

// Mean loss over the first val_batches micro-batches of the validation data, no gradients.
static double validate(GpuModel& model, TrainingData& data, const RunSettings& run) {
    data.rewind();
    for (long i = 0; i < run.val_batches; i++) model.forward(data.next(run.micro_batch), 0.0f);
    return run.val_batches > 0 ? model.finish().loss : NAN;
}

static int train(const RunSettings& run) {
    namespace fs = std::filesystem;
    print_device_info();
    GpuModel model(run.config, run.micro_batch, run.config.T);
    using Documents = TrainingData::Documents;
    const bool split = run.val_data.empty();   // no validation shard: hold out the last documents of --data
    TrainingData train_data(run.data, run.config, run.seed, split ? Documents::kTrainSplit : Documents::kAll, run.val_fraction, true);
    TrainingData val_data(split ? run.data : run.val_data, run.config, run.seed, split ? Documents::kValidationSplit : Documents::kAll,
                          run.val_fraction, false);
    long step = 0;
    if (!run.resume.empty()) {
        const std::string checkpoint = latest_checkpoint(run.resume);
        CheckpointState state = load_checkpoint(model, checkpoint, true);
        step = state.step;
        train_data.restore(state.resume.at("train_position"));
        std::printf("resumed from %s at step %ld of %ld%s\n", checkpoint.c_str(), step, run.steps,
                    step >= run.steps ? ": the run is complete (raise --steps to train further)" : "");
    } else if (!run.init_from.empty()) {
        ModelConfig stored = read_checkpoint_config(run.init_from);
        if (build_tensor_table(stored).num_params != model.table.num_params || stored.is_block != run.config.is_block)
            throw std::runtime_error("--init-from " + run.init_from + " holds a " + stored.name + "-shaped model, not " + run.config.name);
        load_checkpoint(model, run.init_from, false);
        std::printf("initialised from the weights of %s\n", run.init_from.c_str());
    } else {
        model.load_parameters(random_init(model.table, run.seed));
    }
    print_plan(run, model);
    std::printf("training data: %s; validation: %s\n", train_data.describe().c_str(), val_data.describe().c_str());
    fs::create_directories(run.out);

    const std::string log_path = run.out + "/log.csv";
    const bool new_log = !fs::exists(log_path);
    std::FILE* log = std::fopen(log_path.c_str(), "a");
    if (!log) throw std::runtime_error("cannot open " + log_path + " for writing");
    if (new_log) std::fprintf(log, "step,loss,val_loss,lr,grad_norm,ms,tokens_per_s,mfu\n");

    auto checkpoint = [&](long at_step) {
        const std::string dir = run.out + "/checkpoint-" + std::to_string(at_step);
        save_checkpoint(model, dir, CheckpointState{at_step, {{"train_position", train_data.position()}, {"config", run.config.name}}});
        std::printf("checkpoint written: %s\n", dir.c_str());
    };
    std::signal(SIGINT, on_interrupt);
    const double tokens_per_step = (double)run.batch_size * run.config.T;
    const double flops_per_step = training_flops_per_sequence(run.config) * run.batch_size;
    const float grad_scale = 1.0f / run.accumulation;   // SPEC 3.2: the loss is the mean of the micro-batch means
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    double total_ms = 0.0;
    const long first_step = step;
    for (; step < run.steps; step++) {
        if (g_interrupted) {
            std::printf("\ninterrupted: writing a checkpoint at step %ld\n", step);
            checkpoint(step);
            std::fclose(log);
            return 130;
        }
        const float lr = learning_rate((int)step, run.adamw.lr, (int)run.warmup, (int)run.steps);
        cudaCheck(cudaEventRecord(start, model.gpu.stream));
        model.zero_grad();
        for (int micro = 0; micro < run.accumulation; micro++) {
            model.forward(train_data.next(run.micro_batch), grad_scale);
            model.backward();
        }
        model.update(AdamWSettings{lr, run.adamw.weight_decay, run.adamw.clip});   // skipped on the GPU if not finite
        cudaCheck(cudaEventRecord(stop, model.gpu.stream));
        const GpuModel::Finished result = model.finish();
        const double loss = result.loss;
        const float norm = result.norm;
        if (!result.updated) {
            std::string last = latest_checkpoint(run.out);
            std::fprintf(stderr, "\ntrain: stopping at step %ld: the %s is not finite (loss %g, gradient norm %g); the weights "
                                 "were not updated. Last good checkpoint: %s\n", step, std::isfinite(loss) ? "gradient norm" : "loss",
                         loss, norm, last.empty() ? "none yet" : last.c_str());
            std::fclose(log);
            return 1;
        }
        float ms = 0.0f;
        cudaCheck(cudaEventElapsedTime(&ms, start, stop));
        total_ms += ms;

        const bool last = step + 1 == run.steps;
        double val_loss = NAN;
        if ((step + 1) % run.val_interval == 0 || last) val_loss = validate(model, val_data, run);
        const double tokens_per_s = tokens_per_step / (ms / 1e3), mfu = flops_per_step / (ms / 1e3) / kH200PeakBf16Flops;
        const double eta = total_ms / 1e3 / (step + 1 - first_step) * (run.steps - step - 1);
        const int filled = (int)(20.0 * (step + 1) / run.steps);
        std::printf("step %6ld/%ld [%s%s] loss %.4f", step + 1, run.steps, std::string(filled, '=').c_str(),
                    std::string(20 - filled, ' ').c_str(), loss);
        if (std::isfinite(val_loss)) std::printf(" val %.4f", val_loss);
        std::printf(" | lr %.2e norm %.3f | %.1f ms %.0f tok/s MFU %.1f%% | ETA %s\n", lr, norm, ms, tokens_per_s, 100 * mfu,
                    format_duration(eta).c_str());
        std::fflush(stdout);
        std::fprintf(log, "%ld,%.9g,%s,%.6e,%.6f,%.3f,%.0f,%.4f\n", step + 1, loss,
                     std::isfinite(val_loss) ? std::to_string(val_loss).c_str() : "", lr, norm, ms, tokens_per_s, mfu);
        std::fflush(log);
        if ((step + 1) % run.checkpoint_interval == 0 || last) checkpoint(step + 1);
    }
    std::fclose(log);
    return 0;
}

int main(int argc, char** argv) {
    try {
        Options options = parse_options(argc, argv);
        if (options.has("help") || argc == 1) {
            std::printf("%s", kUsage);
            return options.has("help") ? 0 : 2;
        }
        if (options.has("list-configs")) {
            list_configs();
            return 0;
        }
        if (options.has("check-data")) {
            check_data(options.get("check-data", ""));
            return 0;
        }
        if (options.has("bench")) {
            if (!options.has("config")) throw std::runtime_error("--bench needs --config NAME");
            ModelConfig config = config_by_name(options.get("config", ""));
            int micro_batch = (int)options.get_int("micro-batch", config.train.micro_batch);
            int steps = (int)options.get_int("steps", 10);
            if (micro_batch <= 0 || steps <= 0) throw std::runtime_error("--micro-batch and --steps must be positive");
            bench(config, micro_batch, steps);
            return 0;
        }
        return train(resolve_settings(options));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "train: error: %s\n", e.what());
        return 1;
    }
}
