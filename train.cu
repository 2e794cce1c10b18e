// train.cu: `./train`, training a blocktf model on one GPU.
//   ./train --list-configs                       the named configs with their parameter counts
//   ./train --bench --config NAME [--micro-batch B] [--steps N]
//                                                time full training steps (forward, backward, AdamW) on random tokens
// Training from shards (--data) comes with the data loader (issue 4/5); until then it says so and exits 2.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include "blocktf.cu"   // defines: GpuModel, BatchPlan, plan_batch, Gpu, cuda checks
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
};

static const char* kUsage =
    "usage: ./train --list-configs\n"
    "       ./train --bench --config NAME [--micro-batch B] [--steps N]\n"
    "       ./train --help\n"
    "  --config NAME      a named config (see --list-configs)\n"
    "  --micro-batch B    sequences per forward/backward (default: the config's micro-batch)\n"
    "  --steps N          timed steps for --bench (default 10, after 3 warm-up steps)\n";

static Options parse_options(int argc, char** argv) {
    static const char* flags[] = {"list-configs", "bench", "help"};
    static const char* valued[] = {"config", "micro-batch", "steps"};
    Options options;
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i];
        if (arg.rfind("--", 0) != 0) throw std::runtime_error("unexpected argument '" + arg + "'");
        std::string name = arg.substr(2);
        bool is_flag = std::find(std::begin(flags), std::end(flags), name) != std::end(flags);
        bool is_valued = std::find(std::begin(valued), std::end(valued), name) != std::end(valued);
        if (!is_flag && !is_valued) throw std::runtime_error("unknown option '" + arg + "'");
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
        return model.update(1e-4f);
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
        if (options.has("bench")) {
            if (!options.has("config")) throw std::runtime_error("--bench needs --config NAME");
            ModelConfig config = config_by_name(options.get("config", ""));
            int micro_batch = (int)options.get_int("micro-batch", config.train.micro_batch);
            int steps = (int)options.get_int("steps", 10);
            if (micro_batch <= 0 || steps <= 0) throw std::runtime_error("--micro-batch and --steps must be positive");
            bench(config, micro_batch, steps);
            return 0;
        }
        std::fprintf(stderr, "train: training from shards is not implemented yet (blocktf issues 4 and 5); nothing was done.\n"
                             "       available now: --list-configs, --bench (see --help)\n");
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "train: error: %s\n", e.what());
        return 1;
    }
}
