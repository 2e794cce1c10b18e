// bench_shard.cpp: how long loader.h takes on a Pile-sized shard index, without a 600 GB .bin.
// Writes DIR/synthetic.idx with N documents of Pile-like length (default 134M documents averaging ~2,240 tokens, the
// deduplicated Pile's ~300B tokens) whose pointers all land inside a small DIR/synthetic.bin (the format allows
// items to share bytes), then times: TokenShard::open (full validation), SampleLoader construction (the per-document
// index of the block stream), the first batch (which shuffles the epoch's ~146M samples), and steady-state batches.
//   g++ -std=c++17 -O2 -I. dev/bench_shard.cpp -o build/bench_shard
//   ./build/bench_shard /tmp/shard_bench [--docs N] [--keep]
// The .idx is 20 bytes per document (2.7 GB for 134M); it is deleted at the end unless --keep.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <sys/resource.h>

#include "loader.h"  // defines: TokenShard, SampleLoader, kShardMagic

using clock_type = std::chrono::steady_clock;
static double seconds_since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }
static double peak_rss_gb() {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_maxrss / 1048576.0;  // KiB -> GiB
}

// Document i: 1..4479 tokens (mean ~2240), starting at one of 4096 token offsets of a .bin of 16384 tokens.
static int32_t synthetic_size(uint64_t i) { return (int32_t)(1 + (i * 2654435761ull) % 4479); }
static int64_t synthetic_pointer(uint64_t i) { return (int64_t)(2 * ((i * 40503ull) % 4096)); }

static void write_synthetic(const std::string& prefix, uint64_t n) {
    std::vector<uint8_t> bin(2 * 16384);
    for (size_t t = 0; t < 16384; t++) { bin[2 * t] = (uint8_t)(2 + t % 200); bin[2 * t + 1] = (uint8_t)(t / 200 % 190); }
    FILE* f = std::fopen((prefix + ".bin").c_str(), "wb");
    if (!f || std::fwrite(bin.data(), 1, bin.size(), f) != bin.size() || std::fclose(f) != 0)
        throw std::runtime_error("cannot write " + prefix + ".bin");
    f = std::fopen((prefix + ".idx").c_str(), "wb");
    if (!f) throw std::runtime_error("cannot write " + prefix + ".idx");
    std::vector<char> buffer(1 << 22);
    std::setvbuf(f, buffer.data(), _IOFBF, buffer.size());
    const uint64_t version = 1, m = n + 1;
    const uint8_t dtype = kShardUInt16;
    std::fwrite(kShardMagic, 1, 9, f);
    std::fwrite(&version, 8, 1, f);
    std::fwrite(&dtype, 1, 1, f);
    std::fwrite(&n, 8, 1, f);
    std::fwrite(&m, 8, 1, f);
    for (uint64_t i = 0; i < n; i++) { int32_t s = synthetic_size(i); std::fwrite(&s, 4, 1, f); }
    for (uint64_t i = 0; i < n; i++) { int64_t p = synthetic_pointer(i); std::fwrite(&p, 8, 1, f); }
    for (uint64_t i = 0; i <= n; i++) { int64_t d = (int64_t)i; std::fwrite(&d, 8, 1, f); }
    if (std::ferror(f) || std::fclose(f) != 0) throw std::runtime_error("cannot write " + prefix + ".idx");
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s DIR [--docs N] [--keep]\n", argv[0]);
        return 2;
    }
    const std::string prefix = std::string(argv[1]) + "/synthetic";
    uint64_t n = 134000000;
    bool keep = false;
    for (int i = 2; i < argc; i++) {
        const std::string arg = argv[i];
        if (arg == "--docs" && i + 1 < argc) n = std::strtoull(argv[++i], nullptr, 10);
        else if (arg == "--keep") keep = true;
        else { std::fprintf(stderr, "unknown argument '%s'\n", arg.c_str()); return 2; }
    }
    try {
        auto t = clock_type::now();
        write_synthetic(prefix, n);
        std::printf("wrote %s.idx: %s documents, %.2f GB, in %.1f s\n", prefix.c_str(), loader_detail::with_commas(n).c_str(),
                    (34.0 + 20.0 * n) / 1e9, seconds_since(t));

        t = clock_type::now();
        auto shard = std::make_shared<const TokenShard>(TokenShard::open(prefix));
        std::printf("TokenShard::open (validates every size, pointer and doc_idx entry): %.2f s; %s tokens\n", seconds_since(t),
                    loader_detail::with_commas(shard->num_tokens()).c_str());

        SampleOptions opt;  // block_main_b4_85's stream: T 2048, LB 4, padded
        opt.pad_blocks = true;
        opt.LB = 4;
        opt.vocab_size = 50304;
        opt.doc_end = validation_start(shard->num_docs(), 0.001);
        t = clock_type::now();
        SampleLoader loader(shard, opt);
        std::printf("SampleLoader (index of %s documents, 8 bytes each): %.2f s; %s samples per epoch\n",
                    loader_detail::with_commas(loader.num_docs()).c_str(), seconds_since(t),
                    loader_detail::with_commas(loader.num_samples()).c_str());

        std::vector<int> ids, mask;
        t = clock_type::now();
        loader.next_batch(8, ids, mask);
        std::printf("first batch (shuffles the epoch, 4 bytes per sample): %.2f s\n", seconds_since(t));
        const int batches = 2000;
        t = clock_type::now();
        for (int i = 0; i < batches; i++) loader.next_batch(8, ids, mask);
        const double per_batch = seconds_since(t) / batches;
        std::printf("next_batch(8 x 2048): %.1f us per batch (%.0f M tokens/s), page cache warm\n", per_batch * 1e6,
                    8 * 2048 / per_batch / 1e6);
        t = clock_type::now();
        loader.restore(LoaderPosition::parse(loader.position().to_string()));
        SampleLoader resumed(shard, opt);
        resumed.restore(loader.position());
        resumed.next_batch(8, ids, mask);
        std::printf("resume in a fresh loader (index + shuffle again): %.2f s\n", seconds_since(t));
        std::printf("peak resident memory: %.2f GiB\n", peak_rss_gb());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_shard: %s\n", e.what());
        return 1;
    }
    if (!keep) {
        std::remove((prefix + ".idx").c_str());
        std::remove((prefix + ".bin").c_str());
    }
    return 0;
}
