// infer.cu: `./infer`, text generation from a blocktf checkpoint with cached decoding, and the generation throughput
// benchmark (issue 6). See kUsage below, or ./infer --help. The GPU side (KV caches, the decode step as a CUDA graph,
// token choice on the GPU) is the last section of blocktf.cu; this file is the command line around it.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>
#include "blocktf.cu"    // defines: InferenceModel, load_inference_model, Generation, GenerationOptions, SamplingSettings
#include "tokenizer.h"   // defines: Tokenizer (encode, decode)

static const char* kUsage =
    "usage: ./infer --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [options]   generate text\n"
    "       ./infer --checkpoint DIR --prompt-file PATH [options]                  one prompt per line, as a batch\n"
    "       ./infer --bench --config NAME [--prefill P] [--decode D] [--batch B]   time generation, random weights\n"
    "options:\n"
    "  --checkpoint DIR      a checkpoint directory (model.safetensors + config.json), its .safetensors file, or a\n"
    "                        training output directory (its newest checkpoint-<step>/ is used)\n"
    "  --prompt TEXT         a prompt; repeat it for a batch (all prompts run together, left-padded)\n"
    "  --prompt-file PATH    prompts, one per line (a batch); empty lines are an error\n"
    "  --tokenizer PATH      tokenizer.json (default $BLOCKTF_DATA_DIR/tokenizer/pythia-tokenizer.json,\n"
    "                        BLOCKTF_DATA_DIR defaulting to ../shared/data)\n"
    "  --max-new-tokens N    tokens to generate per prompt (default: 128, or what fits in the model's context)\n"
    "  --temperature T       0 = greedy (the default, as Pythia's generation config); > 0 samples softmax(logits/T)\n"
    "  --top-k K             when sampling, only the K most likely tokens (default 50, HF's default; 0 = all)\n"
    "  --top-p P             when sampling, only the smallest most-likely set of probability >= P (default 1 = all)\n"
    "  --seed N              sampling seed (default 42); the same seed gives the same text\n"
    "  --no-stop             do not stop at <|endoftext|>\n"
    "  --bench               benchmark: random weights, random prompt ids, greedy, no stop at <|endoftext|>;\n"
    "                        1 warm-up and 5 timed runs of the whole generation (prefill + decode)\n"
    "  --config NAME         (bench) a named config (./train --list-configs)\n"
    "  --prefill P  --decode D  --batch B    (bench) prompt tokens, new tokens and prompts (defaults 128, 128, 1)\n"
    "  --help\n"
    "Output: the first prompt and its completion stream to stdout as they are generated; with several prompts each\n"
    "is headed by a line \"=== i/n ===\", the first streamed, the others printed when the batch is done. A summary\n"
    "(tokens, seconds, tokens/s) goes to stderr. Errors exit with 1, usage errors with 2.\n";

constexpr int kDefaultMaxNewTokens = 128;

// A command line that cannot be run: reported with a pointer to --help, exit status 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct InferOptions {
    bool help = false, bench = false;
    std::string checkpoint, tokenizer, prompt_file, config;
    std::vector<std::string> prompts;
    int max_new_tokens = kDefaultMaxNewTokens;
    bool max_new_tokens_given = false;
    SamplingSettings sampling{0.0f, 50, 1.0f, 42};   // greedy; when sampling HF's implicit top-k 50 (SPEC 5.2)
    bool stop_at_eos = true;
    int prefill = 128, decode = 128, batch = 1;   // --bench
};

static long parse_integer(const std::string& option, const std::string& text) {
    char* end = nullptr;
    errno = 0;
    const long value = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0) throw UsageError(option + " expects an integer, got '" + text + "'");
    return value;
}
static double parse_number(const std::string& option, const std::string& text) {
    char* end = nullptr;
    errno = 0;
    const double value = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || errno != 0 || !std::isfinite(value))
        throw UsageError(option + " expects a number, got '" + text + "'");
    return value;
}
static int parse_count(const std::string& option, const std::string& text, int minimum) {
    const long value = parse_integer(option, text);
    if (value < minimum || value > 1000000000L) throw UsageError(option + " must be an integer >= " + std::to_string(minimum) + ", got '" + text + "'");
    return (int)value;
}

// Long options only, each `--name value` or a bare `--flag`; --prompt may repeat.
static InferOptions parse_infer_options(int argc, const char* const* argv) {
    InferOptions o;
    for (int i = 1; i < argc; i++) {
        const std::string arg = argv[i];
        if (arg == "--help") { o.help = true; continue; }
        if (arg == "--bench") { o.bench = true; continue; }
        if (arg == "--no-stop") { o.stop_at_eos = false; continue; }
        static const char* valued[] = {"--checkpoint", "--prompt", "--prompt-file", "--tokenizer", "--max-new-tokens", "--temperature",
                                       "--top-k", "--top-p", "--seed", "--config", "--prefill", "--decode", "--batch"};
        if (std::find(std::begin(valued), std::end(valued), arg) == std::end(valued))
            throw UsageError(arg.rfind("--", 0) == 0 ? "unknown option '" + arg + "'" : "unexpected argument '" + arg + "' (prompts go after --prompt)");
        if (i + 1 >= argc) throw UsageError("option '" + arg + "' needs a value");
        const std::string value = argv[++i];
        if (arg == "--checkpoint") o.checkpoint = value;
        else if (arg == "--prompt") o.prompts.push_back(value);
        else if (arg == "--prompt-file") o.prompt_file = value;
        else if (arg == "--tokenizer") o.tokenizer = value;
        else if (arg == "--config") o.config = value;
        else if (arg == "--max-new-tokens") { o.max_new_tokens = parse_count(arg, value, 1); o.max_new_tokens_given = true; }
        else if (arg == "--temperature") o.sampling.temperature = (float)parse_number(arg, value);
        else if (arg == "--top-k") o.sampling.top_k = parse_count(arg, value, 0);
        else if (arg == "--top-p") o.sampling.top_p = (float)parse_number(arg, value);
        else if (arg == "--seed") {
            const long seed = parse_integer(arg, value);
            if (seed < 0) throw UsageError("--seed must be >= 0");
            o.sampling.seed = (uint64_t)seed;
        }
        else if (arg == "--prefill") o.prefill = parse_count(arg, value, 1);
        else if (arg == "--decode") o.decode = parse_count(arg, value, 1);
        else if (arg == "--batch") o.batch = parse_count(arg, value, 1);
    }
    if (o.help) return o;
    if (o.sampling.temperature < 0.0f) throw UsageError("--temperature must be >= 0 (0 = greedy)");
    if (!(o.sampling.top_p > 0.0f && o.sampling.top_p <= 1.0f)) throw UsageError("--top-p must be in (0, 1]");
    if (o.bench) {
        if (o.config.empty()) throw UsageError("--bench needs --config NAME");
        if (!o.checkpoint.empty() || !o.prompts.empty() || !o.prompt_file.empty())
            throw UsageError("--bench uses random weights and prompts: drop --checkpoint, --prompt and --prompt-file");
        return o;
    }
    if (o.checkpoint.empty()) throw UsageError(argc <= 1 ? "nothing to do" : "give --checkpoint DIR");
    if (o.prompts.empty() == o.prompt_file.empty()) throw UsageError("give --prompt TEXT (repeatable) or --prompt-file PATH, not both");
    return o;
}

// One prompt per line; a final newline ends the last line, it does not start an empty one. Windows line ends are
// accepted. An empty line is an error rather than an empty prompt.
static std::vector<std::string> read_prompt_file(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) throw std::runtime_error("cannot open prompt file '" + path + "'");
    std::stringstream text;
    text << file.rdbuf();
    std::vector<std::string> prompts;
    std::string line;
    int number = 0;
    std::istringstream lines(text.str());
    while (std::getline(lines, line)) {
        number++;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty()) throw std::runtime_error("prompt file '" + path + "': line " + std::to_string(number) + " is empty");
        prompts.push_back(line);
    }
    if (prompts.empty()) throw std::runtime_error("prompt file '" + path + "' holds no prompt");
    return prompts;
}

static std::string default_tokenizer_path() {
    const char* dir = std::getenv("BLOCKTF_DATA_DIR");
    return std::string(dir && *dir ? dir : "../shared/data") + "/tokenizer/pythia-tokenizer.json";
}

// Token ids of each prompt; an empty one (no tokens) is an error naming it.
static std::vector<std::vector<int>> encode_prompts(Tokenizer& tokenizer, const std::vector<std::string>& prompts) {
    std::vector<std::vector<int>> ids;
    for (size_t i = 0; i < prompts.size(); i++) {
        std::vector<uint32_t> encoded = tokenizer.encode(prompts[i]);
        if (encoded.empty()) throw std::runtime_error("prompt " + std::to_string(i + 1) + " is empty: it encodes to no tokens");
        ids.emplace_back(encoded.begin(), encoded.end());
    }
    return ids;
}

// Text of generated ids. Ids the tokenizer does not have (the model's vocabulary is padded to 50304 rows, the
// tokenizer has 50277 ids) are dropped; special tokens are skipped, as HF's decode does by default.
static std::string decode_generated(const Tokenizer& tokenizer, const int* ids, size_t count) {
    std::vector<uint32_t> known;
    for (size_t i = 0; i < count; i++)
        if (ids[i] >= 0 && (size_t)ids[i] < tokenizer.vocab_size()) known.push_back((uint32_t)ids[i]);
    return tokenizer.decode(known);
}

// Incremental text of one row: prints the ids that arrived since the last call. A multi-byte character split
// across tokens decodes to U+FFFD until its last byte arrives, so text ending in U+FFFD is held back (for at most
// kHoldTokens tokens: a real U+FFFD, or bytes that never form a character, are printed after that).
class TextStream {
public:
    TextStream(const Tokenizer& tokenizer, std::FILE* out) : tokenizer_(tokenizer), out_(out) {}
    // ids: the row's completion so far (grows between calls). final: print whatever is held.
    void update(const std::vector<int>& ids, bool final) {
        if (ids.size() <= printed_) return;
        const std::string text = decode_generated(tokenizer_, ids.data() + printed_, ids.size() - printed_);
        static const std::string kReplacement = "\xEF\xBF\xBD";
        const bool incomplete = text.size() >= 3 && text.compare(text.size() - 3, 3, kReplacement) == 0;
        if (incomplete && !final && ids.size() - printed_ < kHoldTokens) return;
        std::fwrite(text.data(), 1, text.size(), out_);
        std::fflush(out_);
        printed_ = ids.size();
    }

private:
    static constexpr size_t kHoldTokens = 4;   // a UTF-8 character has at most 4 bytes
    const Tokenizer& tokenizer_;
    std::FILE* out_;
    size_t printed_ = 0;
};

static void generate(const InferOptions& o) {
    const std::string checkpoint = resolve_checkpoint(o.checkpoint);   // fail fast, before the tokenizer loads
    const std::vector<std::string> prompts = o.prompt_file.empty() ? o.prompts : read_prompt_file(o.prompt_file);
    Tokenizer tokenizer = Tokenizer::from_file(o.tokenizer.empty() ? default_tokenizer_path() : o.tokenizer);
    std::unique_ptr<InferenceModel> model = load_inference_model(checkpoint);
    const ModelConfig& cfg = model->cfg;
    if (tokenizer.vocab_size() > (size_t)cfg.V)
        throw std::runtime_error("the tokenizer has " + std::to_string(tokenizer.vocab_size()) + " ids but the model's vocabulary has " +
                                 std::to_string(cfg.V) + " rows: it was not trained with this tokenizer");
    const std::vector<std::vector<int>> ids = encode_prompts(tokenizer, prompts);

    GenerationOptions options;
    options.sampling = o.sampling;
    options.stop_at_eos = o.stop_at_eos;
    size_t longest = 0, longest_row = 0;
    for (size_t b = 0; b < ids.size(); b++)
        if (ids[b].size() > longest) longest = ids[b].size(), longest_row = b;
    const int fit = max_new_tokens_that_fit(cfg, (int)longest);
    const std::string context = "the model's context is " + std::to_string(cfg.T) + " tokens" +
                                (cfg.is_block ? " (counted in whole blocks of " + std::to_string(cfg.LB) + ")" : "");
    if (fit < 1)
        throw std::runtime_error("prompt " + std::to_string(longest_row + 1) + " is " + std::to_string(longest) + " tokens, too long: " +
                                 context + " and at least one new token must fit");
    if (o.max_new_tokens_given && o.max_new_tokens > fit)
        throw std::runtime_error("prompt " + std::to_string(longest_row + 1) + " is " + std::to_string(longest) + " tokens; with " +
                                 "--max-new-tokens " + std::to_string(o.max_new_tokens) + " it does not fit: " + context +
                                 ", so at most " + std::to_string(fit) + " new tokens fit");
    options.max_new_tokens = o.max_new_tokens_given ? o.max_new_tokens : std::min(kDefaultMaxNewTokens, fit);

    Generation generation(*model, ids, options);
    const int B = generation.rows();
    auto header = [&](int b) { if (B > 1) std::printf("=== %d/%d ===\n", b + 1, B); };
    header(0);
    std::fwrite(prompts[0].data(), 1, prompts[0].size(), stdout);
    std::fflush(stdout);
    TextStream stream(tokenizer, stdout);
    const auto start = std::chrono::steady_clock::now();
    generation.run([&](int) { stream.update(generation.completion(0), false); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    stream.update(generation.completion(0), true);
    std::printf("\n");
    size_t generated = generation.completion(0).size();
    for (int b = 1; b < B; b++) {
        const std::vector<int> completion = generation.completion(b);
        generated += completion.size();
        header(b);
        std::printf("%s%s\n", prompts[b].c_str(), decode_generated(tokenizer, completion.data(), completion.size()).c_str());
    }
    std::fflush(stdout);
    std::fprintf(stderr, "infer: %s, %d prompt%s, %zu tokens generated in %.2f s (%.1f tokens/s, prefill included)\n",
                 cfg.name.c_str(), B, B > 1 ? "s" : "", generated, seconds, generated / std::max(seconds, 1e-9));
}

// ----------------------------------------------------------------------------------------------------------------
// Benchmark (SPEC 5.5): random weights on the init scale (speed does not depend on the values, but realistic,
// NaN-free magnitudes keep it honest), random prompt ids, greedy, every row generates exactly D tokens.

// Linear weights and embeddings uniform with std 0.02, the expansion layer std 1/sqrt(DB) (SPEC 1.1.8, 1.5),
// LayerNorm weight 1, biases 0. A hash per element instead of a normal generator: quick for a billion parameters.
static std::vector<float> random_weights(const TensorTable& table, uint64_t seed) {
    std::vector<float> host(table.num_params, 0.0f);
    for (const ParamTensor& t : table.tensors) {
        const bool layernorm_weight = t.name.find("layernorm.weight") != std::string::npos || t.name.find("layer_norm.weight") != std::string::npos;
        const bool bias = t.shape.size() == 1 && !layernorm_weight;
        const float std = t.name.find("expansion_layer.weight") != std::string::npos ? 1.0f / std::sqrt((float)t.shape[1]) : 0.02f;
        const float half_width = std * std::sqrt(3.0f);   // uniform on [-a, a] has std a / sqrt(3)
        float* p = host.data() + t.offset;
        for (size_t i = 0; i < t.numel; i++) {
            const double u = (splitmix64(seed ^ (t.offset + i)) >> 11) * 0x1.0p-53;   // [0, 1)
            p[i] = layernorm_weight ? 1.0f : bias ? 0.0f : (float)((2.0 * u - 1.0) * half_width);
        }
    }
    return host;
}

static void bench(const InferOptions& o) {
    print_device_info();
    ModelConfig cfg = config_by_name(o.config);
    // Like the original benchmark (SPEC 5.5), positions may go past the training length: RoPE tables are sized by
    // the caches, so only the context check needs the longer length.
    cfg.T = std::max(cfg.T, generation_context_tokens(cfg, o.prefill, o.decode));
    InferenceModel model(cfg);
    model.load(random_weights(model.table, 1));
    std::mt19937 rng(2);
    std::vector<std::vector<int>> prompts(o.batch, std::vector<int>(o.prefill));
    for (auto& prompt : prompts)
        for (int& id : prompt) id = (int)(rng() % (uint32_t)cfg.V);
    GenerationOptions options;
    options.max_new_tokens = o.decode;
    options.stop_at_eos = false;
    Generation generation(model, prompts, options);

    constexpr int kRuns = 5;
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    generation.run();   // warm-up: creates the cuBLASLt plans and captures the decode graph
    std::vector<double> ms;
    for (int run = 0; run < kRuns; run++) {
        cudaCheck(cudaEventRecord(start, generation.stream()));
        generation.run();
        cudaCheck(cudaEventRecord(stop, generation.stream()));
        cudaCheck(cudaEventSynchronize(stop));
        float elapsed = 0.0f;
        cudaCheck(cudaEventElapsedTime(&elapsed, start, stop));
        ms.push_back(elapsed);
    }
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    double mean = 0.0, var = 0.0;
    for (double m : ms) mean += m / kRuns;
    for (double m : ms) var += (m - mean) * (m - mean) / kRuns;
    size_t free_bytes = 0, total_bytes = 0;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    // Nothing is allocated or freed during a run, so what is in use now is the peak.
    const double used_gib = (double)(total_bytes - free_bytes) / (1024.0 * 1024.0 * 1024.0);
    std::printf("| config | prefill | decode | batch | ms per generation (mean +- std of %d) | tokens/s (batch x decode / time) | GPU memory in use |\n", kRuns);
    std::printf("| --- | --- | --- | --- | --- | --- | --- |\n");
    std::printf("| %s | %d | %d | %d | %.2f +- %.2f | %.0f | %.2f GiB |\n", cfg.name.c_str(), o.prefill, o.decode, o.batch, mean,
                std::sqrt(var), (double)o.batch * o.decode / (mean / 1000.0), used_gib);
}

#ifndef BLOCKTF_INFER_NO_MAIN   // test/test_infer.cu includes this file for its option parsing and text streaming
int main(int argc, char** argv) {
    if (argc == 1) {
        std::fprintf(stderr, "%s", kUsage);
        return 2;
    }
    try {
        const InferOptions options = parse_infer_options(argc, argv);
        if (options.help) {
            std::printf("%s", kUsage);
            return 0;
        }
        if (options.bench) bench(options);
        else generate(options);
        return 0;
    } catch (const UsageError& e) {
        std::fprintf(stderr, "infer: %s (see ./infer --help)\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "infer: error: %s\n", e.what());
        return 1;
    }
}
#endif
