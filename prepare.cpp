// prepare.cpp: data preparation from the command line: token shards for ./train, text <-> Pythia token ids, and a
// tokenizer benchmark.
//   ./prepare --out PREFIX [--append-eod] FILE...    tokenize FILEs into PREFIX.bin/.idx (Megatron format, loader.h)
//   ./prepare --encode  < text.txt  > ids.txt        UTF-8 text in, ids out (space-separated, one line)
//   ./prepare --decode  < ids.txt   > text.txt       ids in (any whitespace between them), text out
//   ./prepare --bench FILE...                        encode each file as one string, report MB/s
// Exit status: 0 success, 1 error (message on stderr), 2 wrong usage.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>
#include <sys/stat.h>
#include <unistd.h>

#include "loader.h"     // defines: ShardWriter, parse_json
#include "tokenizer.h"  // defines: Tokenizer

static const char* kUsage =
    "usage: ./prepare MODE [OPTIONS]\n"
    "modes:\n"
    "  --out PREFIX FILE...  tokenize the FILEs into PREFIX.bin + PREFIX.idx, the Megatron token shard ./train reads\n"
    "                        (uint16 tokens, one item per document, as Pythia's Pile files). A .jsonl FILE holds one\n"
    "                        document per line, in the string field \"text\"; any other FILE is one document.\n"
    "                        Empty documents are skipped, as Megatron's preprocess_data does. The files are written\n"
    "                        under temporary names and renamed at the end.\n"
    "  --encode              read UTF-8 text on stdin, write its token ids on one line, space-separated\n"
    "  --decode              read token ids (whitespace-separated) on stdin, write the text\n"
    "  --bench FILE...       encode each FILE as one string, single-threaded; print load time and MB/s\n"
    "  --help                print this help\n"
    "options:\n"
    "  --tokenizer PATH      tokenizer.json (default: $BLOCKTF_DATA_DIR/tokenizer/pythia-tokenizer.json,\n"
    "                        BLOCKTF_DATA_DIR defaults to ../shared/data)\n"
    "  --append-eod          --out: add <|endoftext|> (id 0) at the end of each document; off by default, as in\n"
    "                        Pythia's files (./train's loader adds one EOS per document itself)\n"
    "  --keep-special        --decode: keep special tokens (<|endoftext|>, <|padding|>); by default they are\n"
    "                        dropped, as Hugging Face's decode does\n"
    "  --repeats N           --bench: timed repeats (default 5); the best and the median are reported\n"
    "Invalid UTF-8 input to --encode is an error that names its byte offset.\n";

// A mistake in the command line: reported with a hint to --help, exit status 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::string mode;  // "out", "encode", "decode", "bench", "help"
    std::string tokenizer_path;
    std::string out_prefix;
    bool append_eod = false;
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
        if (arg == "--out") {
            set_mode("out");
            opt.out_prefix = value();
        }
        else if (arg == "--encode") set_mode("encode");
        else if (arg == "--decode") set_mode("decode");
        else if (arg == "--bench") set_mode("bench");
        else if (arg == "--help" || arg == "-h") set_mode("help");
        else if (arg == "--tokenizer") opt.tokenizer_path = value();
        else if (arg == "--keep-special") opt.keep_special = true;
        else if (arg == "--append-eod") opt.append_eod = true;
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
    if (opt.mode.empty()) throw UsageError("no mode given (--out, --encode, --decode or --bench)");
    if (opt.mode == "bench" && opt.files.empty()) throw UsageError("--bench needs at least one FILE");
    if (opt.mode == "out" && opt.files.empty()) throw UsageError("--out needs at least one input FILE");
    if (opt.mode == "out" && opt.out_prefix.empty()) throw UsageError("--out needs a PREFIX");
    if (opt.append_eod && opt.mode != "out") throw UsageError("--append-eod only applies to --out");
    if (opt.mode != "bench" && opt.mode != "out" && !opt.files.empty())
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

// ----------------------------------------------------------------------------------------------------------------
// --out: text files -> token shard.

static volatile std::sig_atomic_t g_interrupted = 0;  // Ctrl-C: stop between documents; the writer removes its files
static void on_interrupt(int) { g_interrupted = 1; }

static bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

static uint64_t file_size(const std::string& path) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) throw std::runtime_error("cannot open '" + path + "': " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw std::runtime_error("'" + path + "' is not a regular file");
    return (uint64_t)st.st_size;
}

// Counts what went into the shard and prints a progress line on stderr (at most twice a second, and only once
// the run has lasted a second, so small inputs stay quiet). 1 MB = 10^6 bytes.
class Progress {
public:
    explicit Progress(uint64_t total_bytes) : total_bytes_(total_bytes), start_(clock::now()), last_(start_) {}
    uint64_t bytes = 0, documents = 0, tokens = 0, skipped_empty = 0;

    void update() {
        const auto now = clock::now();
        if (now - last_ < std::chrono::milliseconds(500) || now - start_ < std::chrono::seconds(1)) return;
        last_ = now;
        print(false);
    }
    void done() {
        if (printed_) print(true);
    }
    double seconds() const { return std::chrono::duration<double>(clock::now() - start_).count(); }

private:
    using clock = std::chrono::steady_clock;
    uint64_t total_bytes_;
    clock::time_point start_, last_;
    bool printed_ = false;

    static std::string format_seconds(double seconds) {
        const long t = (long)(seconds + 0.5);
        char text[32];
        if (t >= 3600) std::snprintf(text, sizeof(text), "%ldh%02ldm", t / 3600, t / 60 % 60);
        else if (t >= 60) std::snprintf(text, sizeof(text), "%ldm%02lds", t / 60, t % 60);
        else std::snprintf(text, sizeof(text), "%lds", t);
        return text;
    }

    void print(bool final_line) {
        const double s = seconds(), rate = bytes / std::max(s, 1e-9) / 1e6;
        const double eta = rate > 0 ? (double)(total_bytes_ - std::min(bytes, total_bytes_)) / 1e6 / rate : 0.0;
        // On a terminal the line rewrites itself; into a log file each update is its own line.
        const bool tty = isatty(STDERR_FILENO);
        std::fprintf(stderr, "%sprepare: %.1f of %.1f MB (%.1f%%), %.1f MB/s, %s documents, %s tokens, %s %s%s",
                     tty ? "\r" : "", bytes / 1e6, total_bytes_ / 1e6, 100.0 * bytes / std::max<uint64_t>(total_bytes_, 1),
                     rate, loader_detail::with_commas(documents).c_str(), loader_detail::with_commas(tokens).c_str(),
                     final_line ? "took" : "ETA", format_seconds(final_line ? s : eta).c_str(), tty && !final_line ? "   " : "\n");
        std::fflush(stderr);
        printed_ = true;
    }
};

// One document: tokenized, optionally ended with <|endoftext|>, appended to the shard; empty ones are skipped.
static void add_document(Tokenizer& tokenizer, ShardWriter& writer, std::string_view text, bool append_eod, uint32_t eod_id,
                         Progress& progress, std::vector<uint32_t>& ids) {
    if (g_interrupted) throw std::runtime_error("interrupted; no files were written");
    progress.bytes += text.size();
    if (text.empty()) {
        progress.skipped_empty++;
        return;
    }
    ids.clear();
    tokenizer.encode_append(text, ids);
    if (append_eod) ids.push_back(eod_id);
    writer.add_document(ids);
    progress.documents++;
    progress.tokens += ids.size();
    progress.update();
}

// Each line of a .jsonl file is a JSON object with a string "text"; blank lines are skipped.
static void add_jsonl_file(const std::string& path, Tokenizer& tokenizer, ShardWriter& writer, bool append_eod, uint32_t eod_id,
                           Progress& progress, std::vector<uint32_t>& ids) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open '" + path + "'");
    std::string line;
    for (size_t line_number = 1; std::getline(in, line); line_number++) {
        const std::string where = path + ":" + std::to_string(line_number) + ": ";
        const bool had_newline = !in.eof();
        if (line.find_first_not_of(" \t\r") == std::string::npos) {
            progress.bytes += line.size() + had_newline;
            continue;
        }
        std::string text;
        try {
            const JsonValue row = parse_json(line);
            const JsonValue* field = row.type == JsonValue::Type::Object ? row.find("text") : nullptr;
            if (!field) throw std::runtime_error("expected a JSON object with a \"text\" field");
            text = field->as_string();
        } catch (const std::runtime_error& e) {
            throw std::runtime_error(where + e.what());
        }
        try {
            add_document(tokenizer, writer, text, append_eod, eod_id, progress, ids);
        } catch (const std::runtime_error& e) {
            throw std::runtime_error(where + e.what());
        }
        progress.bytes += line.size() + had_newline - text.size();  // count the file's bytes, not the decoded text's
    }
    if (in.bad()) throw std::runtime_error("cannot read '" + path + "'");
}

static void run_out(const Options& opt) {
    Tokenizer tokenizer = Tokenizer::from_file(opt.tokenizer_path);
    const int64_t eod = tokenizer.token_to_id("<|endoftext|>");
    if (opt.append_eod && eod < 0) throw std::runtime_error("--append-eod: the tokenizer has no <|endoftext|> token");
    // Megatron's builder rule (make_builder): uint16 for vocabularies under 65500 tokens, int32 otherwise.
    const uint8_t dtype = tokenizer.vocab_size() < 65500 ? kShardUInt16 : kShardInt32;
    uint64_t total_bytes = 0;
    for (const std::string& path : opt.files) total_bytes += file_size(path);

    std::signal(SIGINT, on_interrupt);
    std::signal(SIGTERM, on_interrupt);
    Progress progress(total_bytes);
    std::vector<uint32_t> ids;
    ShardWriter writer(opt.out_prefix, dtype);
    for (const std::string& path : opt.files) {
        if (ends_with(path, ".jsonl")) {
            add_jsonl_file(path, tokenizer, writer, opt.append_eod, (uint32_t)eod, progress, ids);
        } else {
            const std::string text = read_file(path);
            try {
                add_document(tokenizer, writer, text, opt.append_eod, (uint32_t)eod, progress, ids);
            } catch (const std::runtime_error& e) {
                throw std::runtime_error(path + ": " + e.what());
            }
        }
    }
    if (writer.num_docs() == 0)
        throw std::runtime_error("the input holds no non-empty document; no shard was written");
    writer.finish();
    progress.done();
    std::printf("wrote %s.bin and %s.idx: %s documents, %s tokens (%s, %s), from %s bytes of text in %.2f s (%.1f MB/s)\n",
                opt.out_prefix.c_str(), opt.out_prefix.c_str(), loader_detail::with_commas(writer.num_docs()).c_str(),
                loader_detail::with_commas(writer.num_tokens()).c_str(), dtype == kShardUInt16 ? "uint16" : "int32",
                opt.append_eod ? "<|endoftext|> appended" : "no <|endoftext|> appended",
                loader_detail::with_commas(progress.bytes).c_str(), progress.seconds(), progress.bytes / progress.seconds() / 1e6);
    if (progress.skipped_empty > 0)
        std::printf("skipped %s empty documents\n", loader_detail::with_commas(progress.skipped_empty).c_str());
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
        if (opt.mode == "out") {
            run_out(opt);
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
