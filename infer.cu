// infer.cu: `./infer`, text generation from a blocktf checkpoint with cached decoding, and the generation throughput
// benchmark (issue 6). See kUsage below, or ./infer --help. The GPU side (KV caches, the decode step as a CUDA graph,
// token choice on the GPU) is the last section of blocktf.cu; this file is the command line around it.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>
#include "blocktf.cu"    // defines: InferenceModel, load_inference_model, Generation, GenerationOptions, SamplingSettings
#include "loader.h"      // defines: TokenShard, write_safetensors
#include "tokenizer.h"   // defines: Tokenizer (encode, decode)

static const char* kUsage =
    "usage: ./infer --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [options]   generate text\n"
    "       ./infer --checkpoint DIR --prompt-file PATH [options]                  one prompt per line, as a batch\n"
    "       ./infer --checkpoint DIR --score PATH [--score PATH ...] [options]     loss and perplexity of documents\n"
    "       ./infer --bench --config NAME [--prefill P] [--decode D] [--batch B|auto]   time generation, random weights\n"
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
    "  --ids                 print each prompt's generated token ids (one line per prompt, separated by spaces)\n"
    "                        instead of text\n"
    "  --score PATH          score documents with the training forward: a text file (one document) or a shard\n"
    "                        prefix PATH.bin/.idx (each of its documents); repeat for more. Each document is its\n"
    "                        tokens and <|endoftext|>, cut into windows of --score-length tokens; every token is\n"
    "                        scored except a window's first (vanilla) or first block (block models), which have\n"
    "                        nothing to be predicted from. Prints loss (nats/token) and perplexity per document.\n"
    "  --score-length N      tokens per scoring window (default: the model's context; block models: whole blocks)\n"
    "  --micro-batch B       windows per forward when scoring (default 8)\n"
    "  --dump-logits PATH    (score) also write every scored token's logits, loss and position to PATH\n"
    "                        (safetensors; dev/parity.py compares them with PyTorch)\n"
    "  --bench               benchmark: random weights, random prompt ids, greedy, no stop at <|endoftext|>;\n"
    "                        1 warm-up and 3 timed runs of the whole generation (prefill + decode), the median;\n"
    "                        also the decode phase against its roofline and the whole run against its ceiling\n"
    "  --config NAME         (bench) a named config (./train --list-configs)\n"
    "  --prefill P  --decode D  --batch B    (bench) prompt tokens, new tokens and prompts (defaults 128, 128, 1);\n"
    "                        --batch auto tries batches 1, 2, 4, ... while they fit in GPU memory and the\n"
    "                        throughput grows, and reports the best\n"
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
    bool help = false, bench = false, print_ids = false;
    std::string checkpoint, tokenizer, prompt_file, config;
    std::vector<std::string> prompts;
    std::vector<std::string> score_paths;   // --score
    int score_length = 0;                   // 0: the model's context
    int micro_batch = 8;
    std::string dump_logits;
    int max_new_tokens = kDefaultMaxNewTokens;
    bool max_new_tokens_given = false;
    SamplingSettings sampling{0.0f, 50, 1.0f, 42};   // greedy; when sampling HF's implicit top-k 50 (SPEC 5.2)
    bool stop_at_eos = true;
    int prefill = 128, decode = 128, batch = 1;   // --bench; batch 0 = auto
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
        if (arg == "--ids") { o.print_ids = true; continue; }
        static const char* valued[] = {"--checkpoint", "--prompt", "--prompt-file", "--tokenizer", "--max-new-tokens", "--temperature",
                                       "--top-k", "--top-p", "--seed", "--config", "--prefill", "--decode", "--batch",
                                       "--score", "--score-length", "--micro-batch", "--dump-logits"};
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
        else if (arg == "--batch") o.batch = value == "auto" ? 0 : parse_count(arg, value, 1);
        else if (arg == "--score") o.score_paths.push_back(value);
        else if (arg == "--score-length") o.score_length = parse_count(arg, value, 2);
        else if (arg == "--micro-batch") o.micro_batch = parse_count(arg, value, 1);
        else if (arg == "--dump-logits") o.dump_logits = value;
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
    if (!o.score_paths.empty()) {
        if (!o.prompts.empty() || !o.prompt_file.empty()) throw UsageError("--score and --prompt/--prompt-file are separate tasks: give one");
        return o;
    }
    if (!o.dump_logits.empty() || o.score_length != 0) throw UsageError("--dump-logits and --score-length go with --score");
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
    // Text: the first prompt streams as it is generated, the others are printed at the end. --ids: ids at the end.
    auto header = [&](int b) { if (B > 1) std::printf("=== %d/%d ===\n", b + 1, B); };
    TextStream stream(tokenizer, stdout);
    if (!o.print_ids) {
        header(0);
        std::fwrite(prompts[0].data(), 1, prompts[0].size(), stdout);
        std::fflush(stdout);
    }
    const auto start = std::chrono::steady_clock::now();
    generation.run([&](int) { if (!o.print_ids) stream.update(generation.completion(0), false); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    size_t generated = 0;
    for (int b = 0; b < B; b++) {
        const std::vector<int> completion = generation.completion(b);
        generated += completion.size();
        if (o.print_ids) {
            for (size_t i = 0; i < completion.size(); i++) std::printf("%s%d", i ? " " : "", completion[i]);
        } else if (b == 0) {
            stream.update(completion, true);
        } else {
            header(b);
            std::printf("%s%s", prompts[b].c_str(), decode_generated(tokenizer, completion.data(), completion.size()).c_str());
        }
        std::printf("\n");
    }
    std::fflush(stdout);
    std::fprintf(stderr, "infer: %s, %d prompt%s, %zu tokens generated in %.2f s (%.1f tokens/s, prefill included)\n",
                 cfg.name.c_str(), B, B > 1 ? "s" : "", generated, seconds, generated / std::max(seconds, 1e-9));
}

// ----------------------------------------------------------------------------------------------------------------
// Scoring (--score): the loss of whole documents under the training forward (plan_batch + GpuModel::forward, the
// code that computes the validation loss), so a checkpoint can be evaluated on held-out text.

struct ScoreDocument {
    std::string name;          // the text file, or PREFIX#i for document i of a shard
    std::vector<int> tokens;   // the document's ids, then <|endoftext|> (as in the training stream)
};

// The documents --score names: PATH.bin + PATH.idx give every document of the shard; otherwise PATH is a text file,
// one document, tokenized (the tokenizer is loaded only when a text file needs it).
static std::vector<ScoreDocument> read_score_documents(const std::vector<std::string>& paths, const std::string& tokenizer_path) {
    namespace fs = std::filesystem;
    std::unique_ptr<Tokenizer> tokenizer;
    std::vector<ScoreDocument> documents;
    for (const std::string& path : paths) {
        if (fs::exists(path + ".bin") && fs::exists(path + ".idx")) {
            const TokenShard shard = TokenShard::open(path);
            for (size_t d = 0; d < shard.num_docs(); d++) {
                documents.push_back({path + "#" + std::to_string(d), shard.document(d)});
                documents.back().tokens.push_back(kEosId);
            }
            continue;
        }
        if (!fs::is_regular_file(path))
            throw std::runtime_error("--score " + path + ": neither a text file nor a shard prefix (" + path + ".bin + " + path + ".idx)");
        if (!tokenizer) tokenizer = std::make_unique<Tokenizer>(Tokenizer::from_file(tokenizer_path));
        const std::vector<uint32_t> ids = tokenizer->encode(read_text_file(path));
        documents.push_back({path, std::vector<int>(ids.begin(), ids.end())});
        documents.back().tokens.push_back(kEosId);
    }
    return documents;
}

// Every document cut into consecutive windows of N tokens; the last window of a document is right-padded with
// id 0 and mask 0. A window never mixes documents.
struct ScoreWindows {
    int N = 0;
    std::vector<int> ids, mask;   // (W, N)
    std::vector<int> document;    // (W) the document of each window
    int count() const { return (int)document.size(); }
};

static ScoreWindows make_score_windows(const std::vector<ScoreDocument>& documents, int N, int V) {
    ScoreWindows w;
    w.N = N;
    for (size_t d = 0; d < documents.size(); d++) {
        const std::vector<int>& tokens = documents[d].tokens;
        for (int id : tokens)
            if (id < 0 || id >= V)
                throw std::runtime_error(documents[d].name + " has token id " + std::to_string(id) + ", outside the model's vocabulary of " +
                                         std::to_string(V));
        for (size_t first = 0; first < tokens.size(); first += N) {
            const size_t real = std::min(tokens.size() - first, (size_t)N);
            w.ids.insert(w.ids.end(), tokens.begin() + first, tokens.begin() + first + real);
            w.ids.insert(w.ids.end(), N - real, kEosId);
            w.mask.insert(w.mask.end(), real, 1);
            w.mask.insert(w.mask.end(), N - real, 0);
            w.document.push_back((int)d);
        }
    }
    return w;
}

// Every scored token of the windows, in window order, position order.
struct TokenScores {
    std::vector<int> window, position, target;   // (S)
    std::vector<float> loss;                      // (S) cross-entropy, nats
    std::vector<float> logits;                    // (S, V) when kept
};

// The windows through the model, B at a time (model: micro-batch B, sequence N); the last micro-batch is filled up
// with copies of its first window, whose tokens are dropped. Scored: what plan_batch scores (mask 1, and not in the
// first block / at the first position, which nothing predicts).
static TokenScores score_windows(GpuModel& model, int B, const ScoreWindows& windows, bool keep_logits) {
    const int N = windows.N, V = model.cfg.V;
    TokenScores scores;
    model.keep_logits = keep_logits;
    for (int first = 0; first < windows.count(); first += B) {
        const int real = std::min(B, windows.count() - first);
        std::vector<int> ids, mask;
        for (int b = 0; b < B; b++) {
            const size_t w = (size_t)first + (b < real ? b : 0);
            ids.insert(ids.end(), windows.ids.begin() + w * N, windows.ids.begin() + (w + 1) * N);
            mask.insert(mask.end(), windows.mask.begin() + w * N, windows.mask.begin() + (w + 1) * N);
        }
        const BatchPlan plan = plan_batch(model.cfg, B, N, ids, mask);
        model.forward(plan, 0.0f);
        const std::vector<float> losses = model.token_losses();
        for (size_t i = 0; i < losses.size(); i++) {
            const int b = plan.head_positions[i] / N;
            if (b >= real) continue;
            scores.window.push_back(first + b);
            scores.position.push_back(plan.head_positions[i] % N);
            scores.target.push_back(plan.head_targets[i]);
            scores.loss.push_back(losses[i]);
            if (keep_logits)
                scores.logits.insert(scores.logits.end(), model.host_logits.begin() + i * V, model.host_logits.begin() + (i + 1) * V);
        }
    }
    return scores;
}

// --dump-logits: the windows and every scored token's logits and loss, for dev/parity.py (format in its docstring).
static void write_score_dump(const std::string& path, const ModelConfig& cfg, const ScoreWindows& windows, const TokenScores& scores,
                             double mean_loss) {
    const int64_t W = windows.count(), N = windows.N, S = (int64_t)scores.loss.size();
    char loss[32];
    std::snprintf(loss, sizeof loss, "%.9g", mean_loss);
    write_safetensors(path,
                      {{"input_ids", DType::I32, {W, N}, windows.ids.data()},
                       {"attention_mask", DType::I32, {W, N}, windows.mask.data()},
                       {"scored_window", DType::I32, {S}, scores.window.data()},
                       {"scored_position", DType::I32, {S}, scores.position.data()},
                       {"targets", DType::I32, {S}, scores.target.data()},
                       {"logits", DType::F32, {S, (int64_t)cfg.V}, scores.logits.data()},
                       {"losses", DType::F32, {S}, scores.loss.data()}},
                      {{"config", cfg.name}, {"precision", kPrecisionName}, {"loss", loss}});
}

static void score(const InferOptions& o) {
    const std::string checkpoint = resolve_checkpoint(o.checkpoint);
    const ModelConfig cfg = read_checkpoint_config(checkpoint);
    const int N = o.score_length ? o.score_length : cfg.T;
    if (N > cfg.T) throw std::runtime_error("--score-length " + std::to_string(N) + " is longer than the model's context of " + std::to_string(cfg.T));
    if (cfg.is_block && (N % cfg.LB != 0 || N / cfg.LB < 2))
        throw std::runtime_error("--score-length must be a multiple of the block length " + std::to_string(cfg.LB) + ", at least 2 blocks");
    const std::vector<ScoreDocument> documents = read_score_documents(o.score_paths, o.tokenizer.empty() ? default_tokenizer_path() : o.tokenizer);
    const ScoreWindows windows = make_score_windows(documents, N, cfg.V);
    const int B = std::min(o.micro_batch, windows.count());
    GpuModel model(cfg, B, N, GpuModel::Use::Scoring);
    model.load_parameters(read_checkpoint_weights(SafetensorsFile::open(locate_checkpoint(checkpoint).weights), model.table));
    const TokenScores scores = score_windows(model, B, windows, !o.dump_logits.empty());

    std::vector<double> loss_sum(documents.size(), 0.0);
    std::vector<size_t> scored(documents.size(), 0);
    for (size_t i = 0; i < scores.loss.size(); i++) {
        const int d = windows.document[scores.window[i]];
        loss_sum[d] += scores.loss[i];
        scored[d]++;
    }
    std::printf("%s: %s, windows of %d tokens\n", checkpoint.c_str(), cfg.name.c_str(), N);
    std::printf("| document | tokens (+ EOS) | scored | loss (nats/token) | perplexity |\n| --- | --- | --- | --- | --- |\n");
    double total_loss = 0.0;
    size_t total_tokens = 0, total_scored = 0;
    for (size_t d = 0; d < documents.size(); d++) {
        total_loss += loss_sum[d];
        total_tokens += documents[d].tokens.size();
        total_scored += scored[d];
        if (scored[d] == 0) {
            std::printf("| %s | %zu | 0 | - | - |\n", documents[d].name.c_str(), documents[d].tokens.size());
            continue;
        }
        const double loss = loss_sum[d] / scored[d];
        std::printf("| %s | %zu | %zu | %.4f | %.2f |\n", documents[d].name.c_str(), documents[d].tokens.size(), scored[d], loss, std::exp(loss));
    }
    if (total_scored == 0) throw std::runtime_error("no token could be scored: every document fits in a window's first " +
                                                    std::string(cfg.is_block ? "block" : "token"));
    const double mean = total_loss / total_scored;
    std::printf("| all %zu documents | %zu | %zu | %.4f | %.2f |\n", documents.size(), total_tokens, total_scored, mean, std::exp(mean));
    if (!o.dump_logits.empty()) {
        write_score_dump(o.dump_logits, cfg, windows, scores, mean);
        std::fprintf(stderr, "infer: wrote the logits of %zu scored tokens to %s\n", total_scored, o.dump_logits.c_str());
    }
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

// H200 ceilings (issue 8): the specification's memory bandwidth, and the device copy and bf16 matmul rates measured
// on the machine, which the roofline uses.
constexpr double kH200SpecBytesPerSecond = 4.8e12;
constexpr double kH200CopyBytesPerSecond = 4.25e12;
constexpr double kH200MatmulFlopsPerSecond = 709e12;

struct BenchResult {
    int batch = 0;
    double ms = 0, ms_min = 0, ms_max = 0;   // whole generation: median, fastest and slowest of the timed runs
    double decode_ms = 0;                    // its decode phase (after the prefill), median
    double used_gib = 0;                     // GPU memory in use during the runs
};

static double median(std::vector<double> values) {
    std::sort(values.begin(), values.end());
    const size_t n = values.size();
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// One batch size: warm-up, then `runs` timed generations with CUDA events. Throws CudaOutOfMemory when it does not fit.
static BenchResult time_generation(const InferenceModel& model, int batch, int prefill, int decode, int runs) {
    std::mt19937 rng(2);
    std::vector<std::vector<int>> prompts(batch, std::vector<int>(prefill));
    for (auto& prompt : prompts)
        for (int& id : prompt) id = (int)(rng() % (uint32_t)model.cfg.V);
    GenerationOptions options;
    options.max_new_tokens = decode;
    options.stop_at_eos = false;
    Generation generation(model, prompts, options);
    generation.run();   // warm-up: creates the cuBLASLt plans and captures the decode graph

    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    std::vector<double> ms, decode_ms;
    for (int run = 0; run < runs; run++) {
        cudaCheck(cudaEventRecord(start, generation.stream()));
        generation.run();
        cudaCheck(cudaEventRecord(stop, generation.stream()));
        cudaCheck(cudaEventSynchronize(stop));
        float whole = 0.0f, decoding = 0.0f;
        cudaCheck(cudaEventElapsedTime(&whole, start, stop));
        cudaCheck(cudaEventElapsedTime(&decoding, generation.prefill_done(), stop));
        ms.push_back(whole);
        decode_ms.push_back(decoding);
    }
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    BenchResult r;
    r.batch = batch;
    r.ms = median(ms);
    r.ms_min = *std::min_element(ms.begin(), ms.end());
    r.ms_max = *std::max_element(ms.begin(), ms.end());
    r.decode_ms = median(decode_ms);
    size_t free_bytes = 0, total_bytes = 0;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    // Nothing is allocated or freed during a run, so what is in use now (caches still held) is the peak.
    r.used_gib = (double)(total_bytes - free_bytes) / (1024.0 * 1024.0 * 1024.0);
    return r;
}

// --batch auto: batches 1, 2, 4, ... (1 timed run each) while they fit and the throughput still grows by 2%.
static int find_best_batch(const InferenceModel& model, int prefill, int decode) {
    int best = 0;
    double best_rate = 0.0;
    for (int batch = 1; batch <= (1 << 16); batch *= 2) {
        try {
            const BenchResult r = time_generation(model, batch, prefill, decode, 1);
            const double rate = (double)batch * decode / (r.ms / 1000.0);
            std::fprintf(stderr, "infer: --batch auto: batch %d: %.0f tokens/s, %.2f GiB\n", batch, rate, r.used_gib);
            if (rate > best_rate * 1.02) {
                best = batch, best_rate = rate;
                continue;
            }
        } catch (const CudaOutOfMemory&) {
            std::fprintf(stderr, "infer: --batch auto: batch %d does not fit in GPU memory\n", batch);
        }
        break;
    }
    if (best == 0) throw std::runtime_error("--batch auto: not even a batch of 1 fits in GPU memory");
    return best;
}

static void bench(const InferOptions& o) {
    print_device_info();
    ModelConfig cfg = config_by_name(o.config);
    // Like the original benchmark (SPEC 5.5), positions may go past the training length: RoPE tables are sized by
    // the caches, so only the context check needs the longer length.
    cfg.T = std::max(cfg.T, generation_context_tokens(cfg, o.prefill, o.decode));
    InferenceModel model(cfg);
    model.load(random_weights(model.table, 1));
    const int batch = o.batch > 0 ? o.batch : find_best_batch(model, o.prefill, o.decode);
    constexpr int kRuns = 3;
    const BenchResult r = time_generation(model, batch, o.prefill, o.decode, kRuns);

    // the decode phase against its roofline, the whole run against the best tokens/s any schedule could reach (model.h)
    const int LB = cfg.is_block ? cfg.LB : 1;
    const int padded = (o.prefill + LB - 1) / LB * LB;
    const int steps = cfg.is_block ? (o.decode + LB - 1) / LB : o.decode - 1;
    const PhaseCost cost = decode_cost(cfg, model.table, batch, padded, steps, (int)sizeof(floatX));
    const PhaseCost whole = prefill_cost(cfg, model.table, batch, padded, (int)sizeof(floatX)) + cost;
    auto bound_s = [](const PhaseCost& c) { return std::max(c.bytes / kH200CopyBytesPerSecond, c.flops / kH200MatmulFlopsPerSecond); };
    const double decode_s = r.decode_ms / 1000.0, tokens = (double)batch * o.decode;
    const double tokens_per_s = tokens / (r.ms / 1000.0), ceiling_tokens_per_s = tokens / bound_s(whole);
    std::printf("| config | prefill | decode | batch | ms per generation (median of %d, [min, max]) | tokens/s (batch x decode / time) | "
                "GPU memory in use | decode ms | decode GB/s (%% of 4.8 TB/s) | decode %% of roofline | "
                "whole-run ceiling tokens/s (%% reached) |\n", kRuns);
    std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    std::printf("| %s | %d | %d | %d%s | %.2f [%.2f, %.2f] | %.0f | %.2f GiB | %.2f | %.0f (%.0f%%) | %.0f%% (%s-bound) | %.0f (%.0f%%) |\n",
                cfg.name.c_str(), o.prefill, o.decode, batch, o.batch > 0 ? "" : " (auto)", r.ms, r.ms_min, r.ms_max, tokens_per_s,
                r.used_gib, r.decode_ms, cost.bytes / decode_s / 1e9, 100.0 * cost.bytes / decode_s / kH200SpecBytesPerSecond,
                100.0 * bound_s(cost) / decode_s, cost.bytes / kH200CopyBytesPerSecond >= cost.flops / kH200MatmulFlopsPerSecond ? "memory" : "compute",
                ceiling_tokens_per_s, 100.0 * tokens_per_s / ceiling_tokens_per_s);
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
        else if (!options.score_paths.empty()) score(options);
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
