// prepare.cpp: data preparation from the command line. For now: text <-> Pythia token ids, and a tokenizer benchmark.
//   ./prepare --encode  < text.txt  > ids.txt        UTF-8 text in, ids out (space-separated, one line)
//   ./prepare --decode  < ids.txt   > text.txt       ids in (any whitespace between them), text out
//   ./prepare --bench FILE...                        encode each file as one string, report MB/s
// Exit status: 0 success, 1 error (message on stderr), 2 wrong usage.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "tokenizer.h"  // defines: Tokenizer

static const char* kUsage =
    "usage: ./prepare MODE [OPTIONS]\n"
    "modes:\n"
    "  --encode              read UTF-8 text on stdin, write its token ids on one line, space-separated\n"
    "  --decode              read token ids (whitespace-separated) on stdin, write the text\n"
    "  --bench FILE...       encode each FILE as one string, single-threaded; print load time and MB/s\n"
    "  --help                print this help\n"
    "options:\n"
    "  --tokenizer PATH      tokenizer.json (default: $BLOCKTF_DATA_DIR/tokenizer/pythia-tokenizer.json,\n"
    "                        BLOCKTF_DATA_DIR defaults to ../shared/data)\n"
    "  --keep-special        --decode: keep special tokens (<|endoftext|>, <|padding|>); by default they are\n"
    "                        dropped, as Hugging Face's decode does\n"
    "  --repeats N           --bench: timed repeats (default 5); the best and the median are reported\n"
    "Invalid UTF-8 input to --encode is an error that names its byte offset.\n";

// A mistake in the command line: reported with a hint to --help, exit status 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::string mode;  // "encode", "decode", "bench", "help"
    std::string tokenizer_path;
    bool keep_special = false;
    size_t repeats = 5;
    std::vector<std::string> files;
};

static std::string default_tokenizer_path() {
    const char* dir = std::getenv("BLOCKTF_DATA_DIR");
    return std::string(dir && *dir ? dir : "../shared/data") + "/tokenizer/pythia-tokenizer.json";
}

static Options parse_args(int argc, char** argv) {
    Options opt;
    opt.tokenizer_path = default_tokenizer_path();
    auto set_mode = [&](const std::string& mode) {
        if (!opt.mode.empty() && opt.mode != mode)
            throw UsageError("--" + opt.mode + " and --" + mode + " cannot be used together");
        opt.mode = mode;
    };
    for (int i = 1; i < argc; i++) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw UsageError(arg + " needs a value");
            return argv[++i];
        };
        if (arg == "--encode") set_mode("encode");
        else if (arg == "--decode") set_mode("decode");
        else if (arg == "--bench") set_mode("bench");
        else if (arg == "--help" || arg == "-h") set_mode("help");
        else if (arg == "--tokenizer") opt.tokenizer_path = value();
        else if (arg == "--keep-special") opt.keep_special = true;
        else if (arg == "--repeats") {
            const std::string text = value();
            size_t n = 0;
            const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
            if (ec != std::errc() || end != text.data() + text.size() || n == 0)
                throw UsageError("--repeats needs a positive integer, got '" + text + "'");
            opt.repeats = n;
        }
        else if (arg.size() > 1 && arg[0] == '-') throw UsageError("unknown option '" + arg + "'");
        else opt.files.push_back(arg);
    }
    if (opt.mode.empty()) throw UsageError("no mode given (--encode, --decode or --bench)");
    if (opt.mode == "bench" && opt.files.empty()) throw UsageError("--bench needs at least one FILE");
    if (opt.mode != "bench" && !opt.files.empty())
        throw UsageError("unexpected argument '" + opt.files[0] + "' (--" + opt.mode + " reads stdin)");
    if (opt.keep_special && opt.mode != "decode") throw UsageError("--keep-special only applies to --decode");
    return opt;
}

static std::string read_stream(FILE* f, const std::string& name) {
    std::string data;
    char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) data.append(buf, n);
    if (std::ferror(f)) throw std::runtime_error("cannot read " + name);
    return data;
}

static std::string read_file(const std::string& path) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw std::runtime_error("cannot open '" + path + "'");
    std::string data;
    try {
        data = read_stream(f, "'" + path + "'");
    } catch (...) {
        std::fclose(f);
        throw;
    }
    std::fclose(f);
    return data;
}

static void write_stdout(const std::string& data) {
    if (std::fwrite(data.data(), 1, data.size(), stdout) != data.size() || std::fflush(stdout) != 0)
        throw std::runtime_error("cannot write to stdout");
}

static void run_encode(Tokenizer& tokenizer) {
    const std::vector<uint32_t> ids = tokenizer.encode(read_stream(stdin, "stdin"));
    std::string out;
    out.reserve(ids.size() * 6 + 1);
    char buf[16];
    for (size_t i = 0; i < ids.size(); i++) {
        if (i > 0) out += ' ';
        const auto result = std::to_chars(buf, buf + sizeof(buf), ids[i]);
        out.append(buf, result.ptr);
    }
    out += '\n';
    write_stdout(out);
}

// Whitespace-separated decimal ids; anything else is an error naming its byte offset.
static std::vector<uint32_t> parse_ids(const std::string& text) {
    std::vector<uint32_t> ids;
    size_t i = 0;
    while (i < text.size()) {
        if (std::isspace(static_cast<unsigned char>(text[i]))) { i++; continue; }
        size_t end = i;
        while (end < text.size() && !std::isspace(static_cast<unsigned char>(text[end]))) end++;
        uint32_t id = 0;
        const auto [ptr, ec] = std::from_chars(text.data() + i, text.data() + end, id);
        if (ec != std::errc() || ptr != text.data() + end)
            throw std::runtime_error("input byte " + std::to_string(i) + ": '" + text.substr(i, std::min<size_t>(end - i, 20)) +
                                     "' is not a token id (a non-negative decimal integer)");
        ids.push_back(id);
        i = end;
    }
    return ids;
}

static void run_decode(const Tokenizer& tokenizer, bool keep_special) {
    write_stdout(tokenizer.decode(parse_ids(read_stream(stdin, "stdin")), !keep_special));
}

// Encodes every file (each as one string) `repeats` times, with the word cache cleared before each repeat so that
// every repeat measures a first encoding of the corpus. Prints per-file and total throughput (1 MB = 10^6 bytes).
static void run_bench(const Options& opt) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    Tokenizer tokenizer = Tokenizer::from_file(opt.tokenizer_path);
    const double load_s = std::chrono::duration<double>(clock::now() - t0).count();
    std::printf("tokenizer: %s loaded in %.3f s (%zu ids, %zu merges)\n", opt.tokenizer_path.c_str(), load_s,
                tokenizer.vocab_size(), tokenizer.merge_count());

    std::vector<std::string> texts;
    size_t total_bytes = 0;
    for (const std::string& path : opt.files) {
        texts.push_back(read_file(path));
        total_bytes += texts.back().size();
    }
    std::vector<double> repeat_seconds;
    size_t total_tokens = 0;
    for (size_t r = 0; r < opt.repeats; r++) {
        tokenizer.clear_cache();
        total_tokens = 0;
        const auto start = clock::now();
        for (const std::string& text : texts) total_tokens += tokenizer.encode(text).size();
        repeat_seconds.push_back(std::chrono::duration<double>(clock::now() - start).count());
    }
    std::vector<double> sorted = repeat_seconds;
    std::sort(sorted.begin(), sorted.end());
    const double best = sorted.front(), median = sorted[sorted.size() / 2];
    std::printf("encoded %zu files, %zu bytes -> %zu tokens; %zu repeats, single thread\n", texts.size(), total_bytes,
                total_tokens, opt.repeats);
    std::printf("best %.4f s = %.2f MB/s, median %.4f s = %.2f MB/s\n", best, total_bytes / best / 1e6, median,
                total_bytes / median / 1e6);
    // One line for scripts (dev/bench_tokenizer.sh).
    std::printf("RESULT impl=blocktf load_s=%.4f bytes=%zu tokens=%zu best_s=%.4f median_s=%.4f\n", load_s, total_bytes,
                total_tokens, best, median);
}

int main(int argc, char** argv) {
    try {
        const Options opt = parse_args(argc, argv);
        if (opt.mode == "help") {
            std::fputs(kUsage, stdout);
            return 0;
        }
        if (opt.mode == "bench") {
            run_bench(opt);
            return 0;
        }
        Tokenizer tokenizer = Tokenizer::from_file(opt.tokenizer_path);
        if (opt.mode == "encode") run_encode(tokenizer);
        else run_decode(tokenizer, opt.keep_special);
        return 0;
    } catch (const UsageError& e) {
        std::fprintf(stderr, "prepare: %s (see ./prepare --help)\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "prepare: %s\n", e.what());
        return 1;
    }
}
