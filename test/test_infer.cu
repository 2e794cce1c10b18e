// test_infer.cu: cached generation (issue 6). The logits of cached generation against the training-path forward of
// the CPU reference on the same tokens, greedy tokens against a greedy loop over the reference, the sampler's
// choices against the logits they were drawn from, graph vs no-graph replay; on the CPU: ./infer's options, prompt
// files, context limits, text streaming and error messages. GPU cases are reported as skipped without a GPU.
// Tolerances as test_gpu.cu: norm-wise relative error 1e-5 in the FP32 build, 1e-2 in the BF16 build.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>
#include <unistd.h>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include "loader.h"
#include "model.h"
#include "tokenizer.h"
#include "test/test_models.h"

// infer.cu without its main(): its option parsing and text streaming are tested here; blocktf.cu, which it
// includes, has internal linkage, so test_gpu.cu's copy does not clash with this one.
#define BLOCKTF_INFER_NO_MAIN
#include "infer.cu"   // defines: parse_infer_options, read_prompt_file, TextStream, ...; includes blocktf.cu

namespace {

constexpr bool kFp32Build = std::is_same<floatX, float>::value;
constexpr double kTolerance = kFp32Build ? 1e-5 : 1e-2;

// The value the GPU holds for an fp32 weight: itself, or rounded to bf16 (nearest even, as the conversion kernel).
float rounded_to_floatX(float f) { return kFp32Build ? f : bf16_to_float(float_to_bf16(f)); }

// argv from a list of words (argv[0] included).
InferOptions parse(std::vector<std::string> words) {
    words.insert(words.begin(), "./infer");
    std::vector<const char*> argv;
    for (const std::string& w : words) argv.push_back(w.c_str());
    return parse_infer_options((int)argv.size(), argv.data());
}

// Everything written to a stdio file so far.
std::string file_contents(std::FILE* f) {
    std::fflush(f);
    std::rewind(f);
    std::string text;
    char buffer[4096];
    for (size_t n; (n = std::fread(buffer, 1, sizeof(buffer), f)) > 0;) text.append(buffer, n);
    std::fseek(f, 0, SEEK_END);
    return text;
}

std::string temp_path(const std::string& name) {
    return (std::filesystem::temp_directory_path() / ("blocktf_infer_" + std::to_string(getpid()) + "_" + name)).string();
}

// ----------------------------------------------------------------------------------------------------------------
// CPU: the command line.

TEST_CASE("infer: options, defaults and usage errors") {
    InferOptions o = parse({"--checkpoint", "ckpt", "--prompt", "Hello", "--prompt", "world"});
    CHECK(o.checkpoint == "ckpt");
    CHECK(o.prompts == std::vector<std::string>{"Hello", "world"});
    CHECK(o.sampling.temperature == 0.0f);   // greedy by default
    CHECK(o.sampling.top_k == 50);           // HF's implicit top-k, used only when sampling
    CHECK(o.sampling.top_p == 1.0f);
    CHECK(o.sampling.seed == 42);
    CHECK(o.stop_at_eos);
    CHECK(!o.max_new_tokens_given);

    o = parse({"--checkpoint", "c", "--prompt-file", "p.txt", "--max-new-tokens", "7", "--temperature", "0.8", "--top-k", "0",
               "--top-p", "0.9", "--seed", "123", "--no-stop", "--tokenizer", "t.json"});
    CHECK(o.prompt_file == "p.txt");
    CHECK(o.max_new_tokens == 7);
    CHECK(o.max_new_tokens_given);
    CHECK(o.sampling.temperature == doctest::Approx(0.8));
    CHECK(o.sampling.top_k == 0);
    CHECK(o.sampling.top_p == doctest::Approx(0.9));
    CHECK(o.sampling.seed == 123);
    CHECK(!o.stop_at_eos);
    CHECK(o.tokenizer == "t.json");

    o = parse({"--bench", "--config", "block_main_b4_5", "--prefill", "64", "--decode", "32", "--batch", "4"});
    CHECK(o.bench);
    CHECK(o.prefill == 64);
    CHECK(o.decode == 32);
    CHECK(o.batch == 4);
    CHECK(parse({"--bench", "--config", "tiny_block", "--batch", "auto"}).batch == 0);   // 0 = auto
    CHECK(parse({"--help"}).help);

    o = parse({"--checkpoint", "c", "--score", "a.txt", "--score", "shard", "--score-length", "512", "--micro-batch", "4",
               "--dump-logits", "d.safetensors"});
    CHECK(o.score_paths == std::vector<std::string>{"a.txt", "shard"});
    CHECK(o.score_length == 512);
    CHECK(o.micro_batch == 4);
    CHECK(o.dump_logits == "d.safetensors");
    CHECK(parse({"--checkpoint", "c", "--prompt", "x", "--ids"}).print_ids);

    auto usage_error = [](std::vector<std::string> words, const char* message) {
        CAPTURE(message);
        CHECK_THROWS_WITH_AS(parse(words), doctest::Contains(message), UsageError);
    };
    usage_error({}, "nothing to do");
    usage_error({"--prompt", "x"}, "give --checkpoint DIR");
    usage_error({"--checkpoint", "c"}, "give --prompt TEXT (repeatable) or --prompt-file PATH");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--prompt-file", "f"}, "not both");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--frobnicate"}, "unknown option '--frobnicate'");
    usage_error({"--checkpoint", "c", "hello"}, "unexpected argument 'hello'");
    usage_error({"--checkpoint", "c", "--prompt"}, "option '--prompt' needs a value");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--max-new-tokens", "ten"}, "--max-new-tokens expects an integer, got 'ten'");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--max-new-tokens", "0"}, "--max-new-tokens must be an integer >= 1");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--temperature", "-1"}, "--temperature must be >= 0");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--temperature", "nan"}, "--temperature expects a number");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--top-p", "0"}, "--top-p must be in (0, 1]");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--top-p", "1.5"}, "--top-p must be in (0, 1]");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--top-k", "-3"}, "--top-k must be an integer >= 0");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--seed", "-1"}, "--seed must be >= 0");
    usage_error({"--checkpoint", "c", "--score", "a.txt", "--prompt", "x"}, "--score and --prompt/--prompt-file are separate tasks");
    usage_error({"--checkpoint", "c", "--prompt", "x", "--dump-logits", "d"}, "--dump-logits and --score-length go with --score");
    usage_error({"--checkpoint", "c", "--score", "a.txt", "--score-length", "1"}, "--score-length must be an integer >= 2");
    usage_error({"--bench", "--config", "tiny_block", "--batch", "most"}, "--batch expects an integer, got 'most'");
    usage_error({"--bench"}, "--bench needs --config NAME");
    usage_error({"--bench", "--config", "tiny_block", "--checkpoint", "c"}, "--bench uses random weights");
}

TEST_CASE("infer: prompt files, one prompt per line") {
    const std::string path = temp_path("prompts.txt");
    {
        std::ofstream f(path, std::ios::binary);
        f << "first prompt\r\nsecond, with UTF-8: \xC3\xA9t\xC3\xA9\nthird\n";
    }
    CHECK(read_prompt_file(path) == std::vector<std::string>{"first prompt", "second, with UTF-8: \xC3\xA9t\xC3\xA9", "third"});
    {
        std::ofstream f(path, std::ios::binary);
        f << "last line without a newline";
    }
    CHECK(read_prompt_file(path) == std::vector<std::string>{"last line without a newline"});
    {
        std::ofstream f(path, std::ios::binary);
        f << "one\n\nthree\n";
    }
    CHECK_THROWS_WITH_AS(read_prompt_file(path), doctest::Contains("line 2 is empty"), std::runtime_error);
    {
        std::ofstream f(path, std::ios::binary);
    }
    CHECK_THROWS_WITH_AS(read_prompt_file(path), doctest::Contains("holds no prompt"), std::runtime_error);
    std::filesystem::remove(path);
    CHECK_THROWS_WITH_AS(read_prompt_file(path), doctest::Contains("cannot open prompt file"), std::runtime_error);
}

TEST_CASE("infer: context limits count padded whole blocks for block models") {
    const ModelConfig block = config_by_name("tiny_block");       // T = 32, LB = 4: 8 block positions
    const ModelConfig vanilla = config_by_name("tiny_vanilla");   // T = 16
    CHECK(generation_context_tokens(block, 5, 1) == 12);          // prompt padded to 8, one new block
    CHECK(generation_context_tokens(block, 8, 24) == 32);
    CHECK(generation_context_tokens(block, 8, 22) == 32);         // 22 new tokens take 6 blocks
    CHECK(max_new_tokens_that_fit(block, 5) == 24);
    CHECK(max_new_tokens_that_fit(block, 29) == 0);
    CHECK(max_new_tokens_that_fit(vanilla, 5) == 11);
    CHECK(generation_context_tokens(vanilla, 5, 11) == 16);

    GenerationOptions options;
    options.max_new_tokens = 24;
    CHECK(validate_generation(block, {{1, 2, 3, 4, 5}, {1, 2, 3, 4, 5, 6, 7, 8}}, options) == 8);
    options.max_new_tokens = 25;
    CHECK_THROWS_WITH_AS(validate_generation(block, {{1, 2, 3, 4, 5}}, options),
                         doctest::Contains("needs 36 positions (whole blocks of 4), but the model's context is 32 tokens"),
                         std::runtime_error);
    options.max_new_tokens = 4;
    CHECK_THROWS_WITH_AS(validate_generation(block, {{1, 2}, {}}, options), doctest::Contains("prompt 2 is empty"), std::runtime_error);
    CHECK_THROWS_WITH_AS(validate_generation(block, {{1, 96}}, options),
                         doctest::Contains("prompt 1 has token id 96, outside the model's vocabulary of 96"), std::runtime_error);
    CHECK_THROWS_WITH_AS(validate_generation(block, {}, options), doctest::Contains("at least one prompt"), std::runtime_error);
    options.sampling.top_p = 0.0f;
    CHECK_THROWS_WITH_AS(validate_generation(vanilla, {{1}}, options), doctest::Contains("top-p must be in (0, 1]"), std::runtime_error);
}

TEST_CASE("infer: checkpoint paths give clear errors") {
    const std::string missing = temp_path("no_such_checkpoint");
    CHECK_THROWS_WITH_AS(resolve_checkpoint(missing), doctest::Contains("does not exist"), std::runtime_error);
    CHECK_THROWS_WITH_AS(load_inference_model(missing), doctest::Contains("does not exist"), std::runtime_error);
    const std::string empty_dir = temp_path("empty_out");
    std::filesystem::create_directories(empty_dir);
    CHECK_THROWS_WITH_AS(resolve_checkpoint(empty_dir), doctest::Contains("no checkpoint in"), std::runtime_error);
    std::filesystem::remove_all(empty_dir);
}

// The text stream prints whole characters only: feeding a completion one id at a time gives exactly the text of the
// whole completion, and nothing printed in between ends inside a character.
TEST_CASE("infer: streamed text never splits a multi-byte character") {
    const std::string tokenizer_path = data_path("tokenizer/pythia-tokenizer.json");
    if (!std::filesystem::exists(tokenizer_path)) {
        MESSAGE("no tokenizer at " << tokenizer_path << "; set BLOCKTF_DATA_DIR");
        return;
    }
    Tokenizer tokenizer = Tokenizer::from_file(tokenizer_path);
    const std::string text = "Caf\xC3\xA9 \xF0\x9D\x84\x9E clef, \xE2\x9C\x93 ok \xF0\x9F\xA6\x80\xF0\x9F\xA6\x80 end";
    std::vector<uint32_t> encoded = tokenizer.encode(text);
    std::vector<int> ids(encoded.begin(), encoded.end());
    int split_characters = 0;   // prefixes whose plain decode ends inside a character: the case under test
    std::FILE* out = std::tmpfile();
    REQUIRE(out != nullptr);
    TextStream stream(tokenizer, out);
    for (size_t n = 1; n <= ids.size(); n++) {
        std::vector<int> prefix(ids.begin(), ids.begin() + n);
        const std::string plain = decode_generated(tokenizer, prefix.data(), prefix.size());
        if (plain.size() >= 3 && plain.compare(plain.size() - 3, 3, "\xEF\xBF\xBD") == 0) split_characters++;
        stream.update(prefix, false);
        const std::string printed = file_contents(out);
        CAPTURE(n);
        CHECK(printed.find("\xEF\xBF\xBD") == std::string::npos);
        CHECK(text.compare(0, printed.size(), printed) == 0);   // a prefix of the final text
    }
    stream.update(ids, true);
    const std::string printed = file_contents(out);
    std::fclose(out);
    CHECK(printed == text);
    CHECK(split_characters > 0);   // the text does exercise the hold-back
    // ids the tokenizer does not have (the model's padded vocabulary rows) are dropped, special tokens skipped
    std::vector<int> with_unknown = {ids[0], 50300, 0, ids[1]};
    CHECK(decode_generated(tokenizer, with_unknown.data(), with_unknown.size()) ==
          tokenizer.decode({(uint32_t)ids[0], (uint32_t)ids[1]}));
}

// ----------------------------------------------------------------------------------------------------------------
// GPU: cached generation against the CPU reference.

// A tiny fixture model (weights of dev/make_fixtures.py) on both sides: the reference holds the weights rounded to
// floatX, so both start from identical parameters.
struct TinyModels {
    Reference<float> reference;
    InferenceModel gpu;
    std::vector<float> host;   // the weights both hold, laid out by the table
    explicit TinyModels(const char* name) : reference(config_by_name(name)), gpu(config_by_name(name)) {
        SafetensorsFile weights = SafetensorsFile::open(fixture_path(std::string(name) + ".model.safetensors"));
        host = read_params_by_table(weights, reference.table);
        for (float& x : host) x = rounded_to_floatX(x);
        std::copy(host.begin(), host.end(), reference.params.begin());
        gpu.load(host);
    }
};

std::vector<int> prompt_of_length(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int> ids(n);
    for (int& id : ids) id = 1 + (int)(rng() % 95);   // real tokens, never <|endoftext|>
    return ids;
}

struct Generated {
    std::vector<std::vector<int>> tokens;   // (B, max_new)
    std::vector<float> logits;              // (B, max_new, V)
    int padded = 0;                         // padded prompt length
    std::vector<int> pads;                  // (B)
};

Generated generate_on_gpu(const InferenceModel& model, const std::vector<std::vector<int>>& prompts, GenerationOptions options) {
    options.keep_logits = true;
    Generation generation(model, prompts, options);
    int last_ready = 0, callbacks = 0;
    generation.run([&](int ready) {
        CHECK(ready > last_ready);   // in order, growing
        last_ready = ready;
        callbacks++;
    });
    if (!options.stop_at_eos) CHECK(last_ready == options.max_new_tokens);
    CHECK(callbacks >= 1);
    Generated g;
    for (int b = 0; b < generation.rows(); b++) {
        g.tokens.emplace_back(generation.tokens(b), generation.tokens(b) + generation.ready());
        g.pads.push_back(generation.pad(b));
    }
    g.logits = generation.kept_logits();
    g.padded = generation.padded_prompt_length();
    return g;
}

// The logits of a full forward pass over the generated sequences for every generated position, in Generated::logits'
// layout. forward(batch) runs the model and returns the logits of a list of rows; row_of gives, for (batch row b,
// target block k, slot j) of a block model or (b, position t) of a vanilla one, the index of the logits row.
// Block model: one batch as generation saw it: the left-padded prompts (pads id 0, mask 0), the generated ids, then
// filler up to the block boundary (it follows the last compared slot inside the last block, so no compared position
// sees it); slot j of target block k predicts position k*LB + j. Vanilla model: each row alone, unpadded (prompt +
// generated): position t predicts t+1.
template <typename Forward, typename RowOf>
std::vector<float> full_forward_logits(const ModelConfig& c, const std::vector<std::vector<int>>& prompts, const Generated& g,
                                       Forward&& forward, RowOf&& row_of) {
    const int B = (int)prompts.size(), G = (int)g.tokens[0].size(), V = c.V;
    std::vector<float> out((size_t)B * G * V);
    auto take = [&](const std::vector<float>& logits, size_t row, int b, int col) {
        std::copy(logits.begin() + row * V, logits.begin() + (row + 1) * V, out.begin() + ((size_t)b * G + col) * V);
    };
    if (c.is_block) {
        const int LB = c.LB, n0 = g.padded / LB, T = (n0 + (G + LB - 1) / LB) * LB;
        Batch batch;
        batch.B = B;
        batch.T = T;
        batch.ids.assign((size_t)B * T, kEosId);
        batch.mask.assign((size_t)B * T, 1);
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < g.pads[b]; t++) batch.mask[(size_t)b * T + t] = 0;
            std::copy(prompts[b].begin(), prompts[b].end(), batch.ids.begin() + (size_t)b * T + g.pads[b]);
            std::copy(g.tokens[b].begin(), g.tokens[b].end(), batch.ids.begin() + (size_t)b * T + g.padded);
        }
        const std::vector<float> logits = forward(batch);
        for (int b = 0; b < B; b++)
            for (int col = 0; col < G; col++) take(logits, row_of(batch, b, n0 + col / LB, col % LB), b, col);
        return out;
    }
    for (int b = 0; b < B; b++) {
        const int len = (int)prompts[b].size();
        Batch batch;
        batch.B = 1;
        batch.T = len + G;
        batch.ids = prompts[b];
        batch.ids.insert(batch.ids.end(), g.tokens[b].begin(), g.tokens[b].end());
        batch.mask.assign(batch.ids.size(), 1);
        const std::vector<float> logits = forward(batch);
        for (int col = 0; col < G; col++) take(logits, row_of(batch, 0, len + col - 1, 0), b, col);
    }
    return out;
}

// The CPU reference: block logits (B, NB-1, LB, V) of target blocks 1..NB-1; vanilla (B, T, V).
std::vector<float> reference_logits(Reference<float>& reference, const std::vector<std::vector<int>>& prompts, const Generated& g) {
    const ModelConfig& c = reference.cfg;
    return full_forward_logits(
        c, prompts, g,
        [&](const Batch& batch) {
            reference.forward(batch);
            return reference.logits;
        },
        [&](const Batch& batch, int b, int k, int j) {
            return c.is_block ? ((size_t)b * (batch.T / c.LB - 1) + k - 1) * c.LB + j : (size_t)b * batch.T + k;
        });
}

// The GPU training path (GpuModel::forward) on the same weights: a yardstick for how much of the cached path's error
// is floatX storage itself. Its logits are those of the scored rows (mask 1) in (b, k, j) / (b, t) order.
std::vector<float> training_path_logits(const TinyModels& models, const std::vector<std::vector<int>>& prompts, const Generated& g) {
    const ModelConfig& c = models.gpu.cfg;
    return full_forward_logits(
        c, prompts, g,
        [&](const Batch& batch) {
            GpuModel model(c, batch.B, batch.T);
            model.load_parameters(models.host);
            model.keep_logits = true;
            model.forward(plan_batch(c, batch.B, batch.T, batch.ids, batch.mask), 0.0f);
            return model.host_logits;
        },
        [&](const Batch& batch, int b, int k, int j) {
            if (!c.is_block) return (size_t)b * (batch.T - 1) + k;   // every target is scored
            size_t scored = 0;                                       // scored rows before slot j of block k of row b
            for (int bb = 0; bb < batch.B; bb++)
                for (int kk = 1; kk < batch.T / c.LB; kk++)
                    for (int jj = 0; jj < c.LB; jj++) {
                        if (bb == b && kk == k && jj == j) return scored;
                        scored += batch.mask[(size_t)bb * batch.T + kk * c.LB + jj];
                    }
            return scored;
        });
}

// Each chosen id against the logits it was drawn from: greedy = the argmax (lowest id on ties); sampling = inside the
// top-k set and the top-p nucleus (computed here in double; ties at a cut are allowed, as the sampler keeps them).
void check_choices(const Generated& g, const SamplingSettings& s, int V) {
    for (size_t b = 0; b < g.tokens.size(); b++)
        for (size_t col = 0; col < g.tokens[b].size(); col++) {
            CAPTURE(b); CAPTURE(col);
            const float* z = g.logits.data() + (b * g.tokens[b].size() + col) * V;
            const int chosen = g.tokens[b][col];
            REQUIRE((chosen >= 0 && chosen < V));
            if (s.temperature <= 0.0f) {
                CHECK(chosen == (int)(std::max_element(z, z + V) - z));
                continue;
            }
            // top-k: ids with fewer than top_k ids strictly more likely
            auto in_top_k = [&](int v) {
                int rank = 0;
                for (int u = 0; u < V; u++) rank += z[u] > z[v];
                return s.top_k == 0 || rank < s.top_k;
            };
            CHECK(in_top_k(chosen));
            // top-p over the top-k set, renormalised: the mass of the more likely ids had not reached top_p yet
            const double max_z = *std::max_element(z, z + V);
            double kept = 0.0, above = 0.0;
            for (int v = 0; v < V; v++) {
                if (!in_top_k(v)) continue;
                const double p = std::exp((z[v] - max_z) / s.temperature);
                kept += p;
                if (z[v] > z[chosen]) above += p;
            }
            CHECK(above / kept < s.top_p + 1e-6);
        }
}

// Returns the relative error of the cached path and of the training path, both against the reference.
std::pair<double, double> check_logits(TinyModels& models, const std::vector<std::vector<int>>& prompts, const GenerationOptions& options) {
    Generated g = generate_on_gpu(models.gpu, prompts, options);
    REQUIRE(g.tokens[0].size() == (size_t)options.max_new_tokens);
    std::vector<float> expected = reference_logits(models.reference, prompts, g);
    REQUIRE(g.logits.size() == expected.size());
    const double error = relative_error(g.logits.data(), expected.data(), expected.size());
    CHECK(error < kTolerance);
    const std::vector<float> training = training_path_logits(models, prompts, g);
    const double training_error = relative_error(training.data(), expected.data(), expected.size());
    check_choices(g, options.sampling, models.gpu.cfg.V);
    // the same run without the CUDA graph: the same kernels in the same order, so bit-identical
    GenerationOptions eager = options;
    eager.cuda_graph = false;
    Generated e = generate_on_gpu(models.gpu, prompts, eager);
    CHECK(e.tokens == g.tokens);
    CHECK(std::memcmp(e.logits.data(), g.logits.data(), g.logits.size() * sizeof(float)) == 0);
    return {error, training_error};
}

void check_cached_logits(const char* name, const std::vector<int>& lengths_block) {
    TinyModels models(name);
    const std::vector<int> p2 = prompt_of_length(2, 3), p5 = prompt_of_length(5, 1), p8 = prompt_of_length(8, 2);
    // 5 tokens: not on a block boundary (3 pads); 8: on it; a batch of 5, 8 and 2 tokens (block: 2 gets a whole pad
    // block, masked in the block decoder; vanilla: rows padded by 3 and 6, masked and with shifted positions)
    const std::vector<std::vector<std::vector<int>>> cases = {{p5}, {p8}, {p5, p8, p2}};
    // greedy; temperature with top-k and top-p; top-p alone
    const SamplingSettings modes[] = {SamplingSettings{}, SamplingSettings{1.0f, 12, 0.9f, 7}, SamplingSettings{0.7f, 0, 0.8f, 3}};
    for (const SamplingSettings& mode : modes) {
        double worst = 0.0, worst_training = 0.0;
        GenerationOptions options;
        options.stop_at_eos = false;   // keep going through <|endoftext|>: every position is compared
        options.sampling = mode;
        CAPTURE(mode.temperature);
        CAPTURE(mode.top_k);
        for (const auto& prompts : cases) {
            CAPTURE(prompts.size());
            CAPTURE(prompts[0].size());
            int longest = 0;
            for (const auto& p : prompts) longest = std::max(longest, (int)p.size());
            // as many new tokens as fit; for block models also a count that is not a multiple of LB
            for (int max_new : lengths_block) {
                options.max_new_tokens = max_new > 0 ? max_new : max_new_tokens_that_fit(models.gpu.cfg, longest) + max_new;
                CAPTURE(options.max_new_tokens);
                const std::pair<double, double> errors = check_logits(models, prompts, options);
                worst = std::max(worst, errors.first);
                worst_training = std::max(worst_training, errors.second);
            }
        }
        MESSAGE(std::string(name) << " (" << std::string(kPrecisionName) << ", temperature " << mode.temperature << ", top-k "
                                  << mode.top_k << ", top-p " << mode.top_p << "): generated logits vs the reference forward, "
                                  << "worst relative error " << worst << " (the training path on the same sequences: "
                                  << worst_training << ")");
    }
}

GPU_TEST_CASE("infer: tiny_block cached generation logits equal the full forward (prompts on and off a block boundary)") {
    check_cached_logits("tiny_block", {0, -2, 1});   // all that fits (24), 22 (not whole blocks), 1
}

GPU_TEST_CASE("infer: tiny_vanilla cached generation logits equal the full forward (prompts of 5 and 8, left padding)") {
    check_cached_logits("tiny_vanilla", {0, 1, 2});   // all that fits, 1 (prefill only), 2 (one decode step)
}

// Greedy over the CPU reference, one token at a time: the whole sequence so far through the training-path forward,
// the argmax of the logits that predict the next position. Block models see the padded prompt and filler after
// the newest token up to the block boundary (never visible to the predicted slot).
std::vector<int> reference_greedy(Reference<float>& reference, const std::vector<int>& prompt, int count, std::vector<double>* margins) {
    const ModelConfig& c = reference.cfg;
    const int V = c.V;
    std::vector<int> generated;
    for (int col = 0; col < count; col++) {
        Batch batch;
        batch.B = 1;
        const float* z = nullptr;
        if (c.is_block) {
            const int LB = c.LB, padded = ((int)prompt.size() + LB - 1) / LB * LB, pads = padded - (int)prompt.size();
            const int position = padded + col, T = (position / LB + 1) * LB, NB = T / LB;
            batch.T = T;
            batch.ids.assign(T, kEosId);
            batch.mask.assign(T, 1);
            for (int t = 0; t < pads; t++) batch.mask[t] = 0;
            std::copy(prompt.begin(), prompt.end(), batch.ids.begin() + pads);
            std::copy(generated.begin(), generated.end(), batch.ids.begin() + padded);
            reference.forward(batch);
            z = reference.logits.data() + ((size_t)(NB - 2) * LB + position % LB) * V;
        } else {
            batch.T = (int)prompt.size() + col;
            batch.ids = prompt;
            batch.ids.insert(batch.ids.end(), generated.begin(), generated.end());
            batch.mask.assign(batch.ids.size(), 1);
            reference.forward(batch);
            z = reference.logits.data() + (size_t)(batch.T - 1) * V;
        }
        const int best = (int)(std::max_element(z, z + V) - z);
        float second = -INFINITY;
        for (int v = 0; v < V; v++) if (v != best) second = std::max(second, z[v]);
        margins->push_back(z[best] - second);
        generated.push_back(best);
    }
    return generated;
}

void check_greedy_tokens(const char* name) {
    TinyModels models(name);
    for (int length : {5, 8}) {
        CAPTURE(length);
        const std::vector<int> prompt = prompt_of_length(length, 10 + length);
        GenerationOptions options;
        options.stop_at_eos = false;
        options.max_new_tokens = max_new_tokens_that_fit(models.gpu.cfg, length);
        Generation generation(models.gpu, {prompt}, options);
        generation.run();
        std::vector<int> gpu(generation.tokens(0), generation.tokens(0) + options.max_new_tokens);
        std::vector<double> margins;
        std::vector<int> cpu = reference_greedy(models.reference, prompt, options.max_new_tokens, &margins);
        // Rounding may flip a near-tie between the two best ids; after that the sequences legitimately differ.
        const double near_tie = kFp32Build ? 1e-4 : 5e-2;
        int same = 0;
        while (same < (int)cpu.size() && gpu[same] == cpu[same]) same++;
        if (same < (int)cpu.size()) {
            CAPTURE(same);
            CHECK(margins[same] < near_tie);
        }
        MESSAGE(std::string(name) << " prompt " << length << ": " << same << " of " << cpu.size() << " greedy tokens equal the reference's"
                     << std::string(same < (int)cpu.size() ? " (then a near-tie)" : ""));
    }
}

GPU_TEST_CASE("infer: tiny_block greedy tokens equal a greedy loop over the CPU reference") { check_greedy_tokens("tiny_block"); }
GPU_TEST_CASE("infer: tiny_vanilla greedy tokens equal a greedy loop over the CPU reference") { check_greedy_tokens("tiny_vanilla"); }

// The token-choice kernel on floatX rows made to be hard, at widths read as packs (96, 50304) and one value at a time (97):
// greedy takes the first of equal largest logits and ignores NaN (and picks 0 when nothing is larger than -inf);
// top-k 1 sampling of finite logits keeps only the largest (ties at the cut kept) whatever the draw.
GPU_TEST_CASE("infer: token choice: greedy's first largest logit, NaN and ties, and top-k 1, at widths read in packs or not") {
    for (int V : {96, 97, 50304}) {
        CAPTURE(V);
        constexpr int B = 4;
        std::mt19937 rng(V);
        std::normal_distribution<float> normal(0.0f, 3.0f);
        std::vector<float> logits((size_t)B * V);
        for (float& z : logits) z = rounded_to_floatX(normal(rng));   // the values the kernel reads
        auto row = [&](int b) { return logits.data() + (size_t)b * V; };
        row(1)[3] = row(1)[V - 2] = 100.0f;            // a tie for the largest: id 3 comes first
        row(2)[0] = NAN, row(2)[V - 1] = 100.0f;       // NaN never wins
        std::fill(row(3), row(3) + V, -INFINITY);      // nothing above -inf: greedy answers 0
        DeviceBuffer<floatX> logits_device(logits.size());
        upload_as_floatX(logits_device.data(), logits);
        for (const SamplingSettings& settings : {SamplingSettings{}, SamplingSettings{1.0f, 1, 1.0f, 11}}) {
            const bool greedy = settings.temperature <= 0.0f;
            CAPTURE(greedy);
            const int rows = greedy ? B : 2;   // sampling is for finite logits
            DeviceBuffer<int> current(B), history(B);
            cudaCheck(cudaMemset(current.data(), 0xFF, B * sizeof(int)));
            cudaCheck(cudaMemset(history.data(), 0xFF, B * sizeof(int)));
            sample_kernel<<<rows, kSampleThreads>>>(current.data(), history.data(), 1, nullptr, 0, nullptr, 0, 0,
                                                    logits_device.data(), V, settings);
            cudaCheckLaunch();
            std::vector<int> chosen(B), recorded(B);
            current.download(chosen.data(), B);
            history.download(recorded.data(), B);
            for (int b = 0; b < rows; b++) {
                CAPTURE(b);
                CHECK(recorded[b] == chosen[b]);
                float best = -INFINITY;
                int first_best = 0;
                for (int v = 0; v < V; v++)
                    if (row(b)[v] > best) best = row(b)[v], first_best = v;   // NaN compares false
                if (greedy) CHECK(chosen[b] == first_best);
                else CHECK((chosen[b] >= 0 && chosen[b] < V && row(b)[chosen[b]] == best));
            }
        }
    }
}

// With embed_out zeroed every logit is 0: greedy picks id 0 = <|endoftext|> (so rows stop at once), and sampling
// at temperature 1 draws uniformly from the V ids (a loose chi-square bound), reproducibly for a seed.
GPU_TEST_CASE("infer: equal logits: greedy stops at <|endoftext|>, sampling is uniform and seeded") {
    for (const char* name : {"tiny_block", "tiny_vanilla"}) {
        CAPTURE(name);
        const ModelConfig cfg = config_by_name(name);
        InferenceModel model(cfg);
        Reference<float> init(cfg);
        randomize_params(init, 5);
        const ParamTensor& head = init.table.get(cfg.is_block ? "token_decoder.embed_out.weight" : "embed_out.weight");
        std::fill(init.params.begin() + head.offset, init.params.begin() + head.offset + head.numel, 0.0f);
        model.load(std::vector<float>(init.params.begin(), init.params.end()));
        std::vector<std::vector<int>> prompts;
        for (int b = 0; b < 64; b++) prompts.push_back(prompt_of_length(1 + b % 7, 100 + b));

        GenerationOptions greedy;
        greedy.max_new_tokens = 8;
        Generation stopped(model, prompts, greedy);
        stopped.run();
        for (int b = 0; b < 64; b++) CHECK(stopped.completion(b).empty());
        CHECK(stopped.tokens(0)[0] == kEosId);

        GenerationOptions sampled;
        sampled.max_new_tokens = 8;
        sampled.stop_at_eos = false;
        sampled.sampling = SamplingSettings{1.0f, 0, 1.0f, 99};
        Generation first(model, prompts, sampled), second(model, prompts, sampled);
        first.run();
        second.run();
        std::vector<int> counts(cfg.V, 0);
        int draws = 0;
        bool same = true;
        for (int b = 0; b < 64; b++)
            for (int c = 0; c < 8; c++) {
                counts[first.tokens(b)[c]]++;
                draws++;
                same = same && first.tokens(b)[c] == second.tokens(b)[c];
            }
        CHECK(same);
        const double expected = (double)draws / cfg.V;
        double chi2 = 0.0;
        for (int n : counts) chi2 += (n - expected) * (n - expected) / expected;
        CAPTURE(chi2);
        CHECK(chi2 < 2.0 * cfg.V);   // mean V-1, sd ~ sqrt(2V): far out only if draws are not uniform
        sampled.sampling.seed = 100;
        Generation other(model, prompts, sampled);
        other.run();
        int differ = 0;
        for (int b = 0; b < 64; b++) differ += other.tokens(b)[0] != first.tokens(b)[0];
        CHECK(differ > 32);
    }
}

// infer --score: the scoring path (documents cut into windows, micro-batches filled up, plan_batch, GpuModel in
// scoring mode) against the CPU reference's logits and cross-entropy on the same windows. Which tokens are scored
// is checked against the rule written out here: every real token but a window's first block / first token.
void check_scoring(const char* name) {
    TinyModels models(name);
    Reference<float>& reference = models.reference;
    const ModelConfig& c = reference.cfg;
    std::vector<ScoreDocument> documents = {{"long", prompt_of_length(29, 11)}, {"short", prompt_of_length(2, 12)},
                                            {"one window", prompt_of_length(15, 13)}};
    for (ScoreDocument& d : documents) d.tokens.push_back(kEosId);
    const int N = 16;
    const ScoreWindows windows = make_score_windows(documents, N, c.V);
    REQUIRE(windows.count() == 4);   // 30 tokens: 2 windows; 3: 1; 16: 1
    CHECK(windows.document == std::vector<int>{0, 0, 1, 2});
    CHECK(std::count(windows.mask.begin(), windows.mask.end(), 1) == 30 + 3 + 16);

    constexpr int kMicroBatch = 3;   // the second micro-batch holds one window and two fillers
    GpuModel model(c, kMicroBatch, N, GpuModel::Use::Scoring);
    model.load_parameters(models.host);
    const TokenScores scores = score_windows(model, kMicroBatch, windows, true);

    const int unscored = c.is_block ? c.LB : 1;
    std::vector<int> expected_window, expected_position;
    for (int w = 0; w < windows.count(); w++)
        for (int t = unscored; t < N; t++)
            if (windows.mask[(size_t)w * N + t]) expected_window.push_back(w), expected_position.push_back(t);
    CHECK(scores.window == expected_window);
    CHECK(scores.position == expected_position);
    REQUIRE(scores.loss.size() == expected_window.size());

    Batch batch;
    batch.B = windows.count();
    batch.T = N;
    batch.ids = windows.ids;
    batch.mask = windows.mask;
    reference.forward(batch);
    std::vector<float> reference_logits, reference_losses, gpu_logits = scores.logits;
    for (size_t i = 0; i < scores.loss.size(); i++) {
        const int w = scores.window[i], t = scores.position[i];
        CHECK(scores.target[i] == windows.ids[(size_t)w * N + t]);
        const size_t row = c.is_block ? ((size_t)w * (N / c.LB - 1) + t / c.LB - 1) * c.LB + t % c.LB : (size_t)w * N + t - 1;
        const float* logits = reference.logits.data() + row * c.V;
        reference_logits.insert(reference_logits.end(), logits, logits + c.V);
        const char valid = 1;   // the reference's cross-entropy of this one row
        reference_losses.push_back((float)ref::cross_entropy_forward(logits, &scores.target[i], &valid, 1, c.V));
    }
    REQUIRE(gpu_logits.size() == reference_logits.size());
    const double logits_error = relative_error(gpu_logits.data(), reference_logits.data(), gpu_logits.size());
    const double loss_error = relative_error(scores.loss.data(), reference_losses.data(), reference_losses.size());
    MESSAGE(std::string(name) << " scoring: logits relative error " << logits_error << ", per-token loss relative error " << loss_error);
    CHECK(logits_error < kTolerance);
    CHECK(loss_error < kTolerance);
}

GPU_TEST_CASE("infer: tiny_block scoring windows and losses equal the CPU reference") { check_scoring("tiny_block"); }
GPU_TEST_CASE("infer: tiny_vanilla scoring windows and losses equal the CPU reference") { check_scoring("tiny_vanilla"); }

// A document with an id outside the vocabulary is named; so is a path that is neither a file nor a shard.
TEST_CASE("infer: scoring input errors name the document") {
    CHECK_THROWS_WITH(make_score_windows({{"doc.txt", {5, 200, 0}}}, 16, 96), doctest::Contains("doc.txt has token id 200"));
    CHECK_THROWS_WITH(read_score_documents({"/nonexistent/file"}, "unused"), doctest::Contains("neither a text file nor a shard prefix"));
}

// A checkpoint written by training loads for inference from the training output directory (its newest
// checkpoint-<step>/), with the weights rounded as the checkpoint stores them (bf16).
GPU_TEST_CASE("infer: a training checkpoint loads from its output directory") {
    namespace fs = std::filesystem;
    const ModelConfig cfg = config_by_name("tiny_block");
    Reference<float> init(cfg);
    randomize_params(init, 41);
    const std::string dir = temp_path("train_out");
    fs::remove_all(dir);
    {
        GpuModel trained(cfg, 1, cfg.T);
        trained.load_parameters(std::vector<float>(init.params.begin(), init.params.end()));
        save_checkpoint(trained, dir + "/checkpoint-5", CheckpointState{5, {}});
        save_checkpoint(trained, dir + "/checkpoint-12", CheckpointState{12, {}});
    }
    CHECK(resolve_checkpoint(dir) == dir + "/checkpoint-12");
    std::unique_ptr<InferenceModel> model = load_inference_model(dir);
    CHECK(model->cfg.name == "tiny_block");
    std::vector<floatX> raw(model->table.num_params);
    model->params.download(raw.data(), raw.size());
    double worst = 0.0;
    for (const ParamTensor& t : model->table.tensors)
        for (size_t i = t.offset; i < t.offset + t.numel; i++) {
            float stored = bf16_to_float(float_to_bf16(init.params[i]));
            float held;
            if (kFp32Build) std::memcpy(&held, &raw[i], sizeof(float));
            else { uint16_t bits; std::memcpy(&bits, &raw[i], sizeof(bits)); held = bf16_to_float(bits); }
            worst = std::max(worst, (double)std::fabs(held - stored));
        }
    CHECK(worst == 0.0);
    GenerationOptions options;
    options.max_new_tokens = 4;
    Generation generation(*model, {prompt_of_length(6, 3)}, options);
    generation.run();
    CHECK(generation.ready() >= 1);
    fs::remove_all(dir);
}

}  // namespace
