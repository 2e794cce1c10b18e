// test_data.cpp: tests of the token-shard half of loader.h: the Megatron .bin/.idx reader and its validation, the
// sample stream of SPEC 3.5 (with the EOS-mask fix of SPEC 10.4), shuffle, split and resume, the shard writer, and
// the shipped shard (shared/data/README.md section 4) reproduced byte for byte from the shipped texts.
// Expected streams are built here by the plain method (materialise the whole padded stream, then slice it), never by
// the loader's own index arithmetic; expected bytes are written by hand.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>
#include <unistd.h>

#include "loader.h"          // defines: TokenShard, SampleLoader, ShardWriter, check_data, ...
#include "test/sha256.h"     // defines: Sha256, sha256_hex
#include "test/test_util.h"  // defines: data_path, read_file_bytes
#include "tokenizer.h"       // defines: Tokenizer

namespace {

std::string read_bytes(const std::string& path) {
    std::vector<uint8_t> v = read_file_bytes(path);
    return std::string(v.begin(), v.end());
}

// Little-endian integers, byte by byte.
std::string le(uint64_t value, int bytes) {
    std::string out;
    for (int i = 0; i < bytes; i++) out += (char)((value >> (8 * i)) & 0xFF);
    return out;
}

// A Megatron index by hand: header, sizes, pointers, doc_idx (all fields given, so corrupt ones can be made).
std::string idx_bytes(uint8_t dtype, const std::vector<int64_t>& sizes, const std::vector<int64_t>& pointers,
                      const std::vector<int64_t>& doc_idx, uint64_t version = 1, std::string magic = std::string("MMIDIDX\0\0", 9)) {
    std::string out = magic + le(version, 8) + le(dtype, 1) + le(sizes.size(), 8) + le(doc_idx.size(), 8);
    for (int64_t s : sizes) out += le((uint64_t)s, 4);
    for (int64_t p : pointers) out += le((uint64_t)p, 8);
    for (int64_t d : doc_idx) out += le((uint64_t)d, 8);
    return out;
}

// Writes PREFIX.bin/.idx of these documents as Megatron does (contiguous, doc_idx 0..N), by hand.
void write_shard_by_hand(const std::string& prefix, const std::vector<std::vector<uint32_t>>& docs, uint8_t dtype) {
    const int itemsize = dtype == 8 ? 2 : 4;
    std::string bin;
    std::vector<int64_t> sizes, pointers, doc_idx{0};
    for (const auto& doc : docs) {
        pointers.push_back((int64_t)bin.size());
        sizes.push_back((int64_t)doc.size());
        for (uint32_t id : doc) bin += le(id, itemsize);
        doc_idx.push_back((int64_t)sizes.size());
    }
    write_bytes(prefix + ".bin", bin);
    write_bytes(prefix + ".idx", idx_bytes(dtype, sizes, pointers, doc_idx));
}

// The message of the exception that opening PREFIX throws ("" when it opens).
std::string open_error(const std::string& prefix) {
    try {
        TokenShard::open(prefix);
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Documents of the given sizes whose tokens count up from first_id: token == its position in the unpadded
// concatenation + first_id, so every token says where it came from.
std::vector<std::vector<uint32_t>> counting_docs(const std::vector<size_t>& sizes, uint32_t first_id = 1) {
    std::vector<std::vector<uint32_t>> docs;
    uint32_t next = first_id;
    for (size_t n : sizes) {
        docs.emplace_back();
        for (size_t i = 0; i < n; i++) docs.back().push_back(next++);
    }
    return docs;
}

// The reference stream of SPEC 3.5, materialised: each document of [begin, end) as [PAD x lp] doc EOS [PAD x rp].
// doc_of[i] is the document slot i belongs to.
struct Stream {
    std::vector<int> ids, mask;
    std::vector<size_t> doc_of;
};
Stream reference_stream(const std::vector<std::vector<uint32_t>>& docs, size_t begin, size_t end, bool pad_blocks, size_t LB,
                        uint64_t seed) {
    Stream s;
    auto push = [&](int id, int m, size_t doc) { s.ids.push_back(id); s.mask.push_back(m); s.doc_of.push_back(doc); };
    for (size_t d = begin; d < end; d++) {
        const size_t lp = pad_blocks ? block_left_pad(seed, d, LB) : 0;
        for (size_t i = 0; i < lp; i++) push(0, 0, d);
        for (uint32_t id : docs[d]) push((int)id, 1, d);
        push(0, 1, d);  // EOS: mask 1 always (SPEC 10.4)
        while (pad_blocks && s.ids.size() % LB != 0) push(0, 0, d);
    }
    return s;
}

// Sample s of a materialised stream: [s*T, (s+1)*T).
void expect_sample(const SampleLoader& loader, const Stream& ref, size_t s, size_t T) {
    std::vector<int> ids(T), mask(T);
    loader.sample(s, ids.data(), mask.data());
    const std::vector<int> ref_ids(ref.ids.begin() + s * T, ref.ids.begin() + (s + 1) * T);
    const std::vector<int> ref_mask(ref.mask.begin() + s * T, ref.mask.begin() + (s + 1) * T);
    CHECK(ids == ref_ids);
    CHECK(mask == ref_mask);
}

std::shared_ptr<const TokenShard> open_shared(const std::string& prefix) {
    return std::make_shared<const TokenShard>(TokenShard::open(prefix));
}

// Everything a function prints on stdout, through a temporary file (fd 1 redirected).
template <typename F>
std::string capture_stdout(const TempDir& dir, F f) {
    std::fflush(stdout);
    const std::string path = dir.file("stdout.txt");
    const int saved = dup(1);
    FILE* file = std::fopen(path.c_str(), "w");
    REQUIRE(file != nullptr);
    dup2(fileno(file), 1);
    try {
        f();
    } catch (...) {
        std::fflush(stdout);
        dup2(saved, 1);
        close(saved);
        std::fclose(file);
        throw;
    }
    std::fflush(stdout);
    dup2(saved, 1);
    close(saved);
    std::fclose(file);
    return read_bytes(path);
}

// The shipped texts in the order of shared/data/README.md section 4: tinyshakespeare, enwik8, then the gutenberg
// files sorted by name.
std::vector<std::string> shipped_text_files() {
    std::vector<std::string> files = {data_path("text/tinyshakespeare.txt"), data_path("text/enwik8-first100.txt")};
    std::vector<std::string> gutenberg;
    for (const auto& entry : std::filesystem::directory_iterator(data_path("text/gutenberg")))
        gutenberg.push_back(entry.path().string());
    std::sort(gutenberg.begin(), gutenberg.end());
    files.insert(files.end(), gutenberg.begin(), gutenberg.end());
    return files;
}

const std::string kShipped = "idxmap/shipped_corpus_text_document";

}  // namespace

// ----------------------------------------------------------------------------------------------------------------
// The reader on the shipped shard.

TEST_CASE("data: the shipped shard opens with the numbers of shared/data/README.md section 4") {
    const TokenShard shard = TokenShard::open(data_path(kShipped));
    CHECK(shard.dtype_code() == 8);
    CHECK(std::string(shard.dtype_name()) == "uint16");
    CHECK(shard.num_docs() == 13);
    CHECK(shard.num_doc_idx() == 14);
    CHECK(shard.num_tokens() == 1991261);
    CHECK(shard.idx_bytes() == 302);
    CHECK(shard.bin_bytes() == 3982522);
    CHECK(shard.contiguous());
    CHECK(shard.bin_unused_bytes() == 0);
    for (size_t j = 0; j < 14; j++) CHECK(shard.doc_idx(j) == (int64_t)j);

    // Every document against corpus_token_stats.jsonl: token count, sha256 of its uint16 bytes, first and last ids.
    std::ifstream stats(data_path("tokenizer/reference/corpus_token_stats.jsonl"));
    REQUIRE(stats.good());
    std::string line;
    size_t lines = 0;
    while (std::getline(stats, line)) {
        const JsonValue row = parse_json(line);
        const size_t doc = (size_t)row.at("idxmap_index").as_int64();
        CAPTURE(doc);
        REQUIRE(doc < shard.num_docs());
        const size_t n = (size_t)row.at("tokens").as_int64();
        CHECK(shard.doc_size(doc) == n);
        CHECK(sha256_hex(std::string_view((const char*)shard.doc_bytes(doc), n * 2)) == row.at("ids_u16le_sha256").as_string());
        const std::vector<int> tokens = shard.document(doc);
        const auto& first = row.at("first_ids").as_array();
        const auto& last = row.at("last_ids").as_array();
        for (size_t i = 0; i < first.size(); i++) CHECK(tokens[i] == first[i].as_int64());
        for (size_t i = 0; i < last.size(); i++) CHECK(tokens[n - last.size() + i] == last[i].as_int64());
        lines++;
    }
    CHECK(lines == 13);

    const ShardStats s = shard_stats(shard);
    CHECK(s.documents == 13);
    CHECK(s.tokens == 1991261);
    CHECK(s.min_id == 2);
    CHECK(s.max_id == 50276);
    CHECK(s.eod_tokens == 0);
    CHECK(s.empty_documents == 0);
    CHECK(s.out_of_vocab == 0);
    CHECK(s.min_doc_tokens == 1157);  // enwik8-first100
}

TEST_CASE("data: read_tokens copies exactly the asked span and refuses spans past the document") {
    const TokenShard shard = TokenShard::open(data_path(kShipped));
    std::vector<int> span(5, -7);
    shard.read_tokens(0, 0, 5, span.data());
    CHECK(span == std::vector<int>{6407, 47422, 27, 187, 8639});  // first ids of tinyshakespeare (README section 2)
    const size_t n = shard.doc_size(0);
    shard.read_tokens(0, n - 3, 2, span.data());
    CHECK(span[0] == 31582);  // the last ids of tinyshakespeare: ..., 31582, 15, 187
    CHECK(span[1] == 15);
    CHECK(span[2] == 27);     // untouched
    CHECK_THROWS(shard.read_tokens(0, n - 1, 2, span.data()));
    CHECK_THROWS(shard.read_tokens(13, 0, 0, span.data()));
    CHECK_THROWS(shard.doc_size(13));
    CHECK_THROWS(shard.doc_idx(14));
}

TEST_CASE("data: check_data prints the statistics table of the shipped shard") {
    TempDir dir;
    const std::string out = capture_stdout(dir, [] { check_data(data_path(kShipped)); });
    CHECK(contains(out, "valid"));
    CHECK(contains(out, "uint16 (code 8"));
    CHECK(contains(out, "13 (doc_idx: 14 entries"));
    CHECK(contains(out, "1,991,261"));
    CHECK(contains(out, "min 2, max 50276"));
    CHECK(contains(out, "contiguous"));
}

// ----------------------------------------------------------------------------------------------------------------
// The writer.

TEST_CASE("data: ShardWriter writes Megatron's bytes (checked against a hand-built uint16 and int32 shard)") {
    TempDir dir;
    const std::vector<std::vector<uint32_t>> docs = {{5, 65535, 0}, {}, {7}, {1, 2, 3, 4}};
    for (uint8_t dtype : {kShardUInt16, kShardInt32}) {
        CAPTURE((int)dtype);
        write_shard_by_hand(dir.file("hand"), docs, dtype);
        {
            ShardWriter writer(dir.file("written"), dtype);
            for (const auto& doc : docs) writer.add_document(doc);
            CHECK(writer.num_docs() == 4);
            CHECK(writer.num_tokens() == 8);
            writer.finish();
        }
        CHECK(read_bytes(dir.file("written.bin")) == read_bytes(dir.file("hand.bin")));
        CHECK(read_bytes(dir.file("written.idx")) == read_bytes(dir.file("hand.idx")));
        // And one byte layout spelled out: 34-byte header, then sizes, pointers, doc_idx.
        const std::string idx = read_bytes(dir.file("written.idx"));
        CHECK(idx.size() == 34 + 12 * 4 + 8 * 5);
        CHECK(idx.substr(0, 9) == std::string("MMIDIDX\0\0", 9));
        CHECK(idx.substr(17, 1) == std::string(1, (char)dtype));
        CHECK(idx.substr(34, 16) == le(3, 4) + le(0, 4) + le(1, 4) + le(4, 4));
        const uint64_t w = dtype == 8 ? 2 : 4;
        CHECK(idx.substr(50, 32) == le(0, 8) + le(3 * w, 8) + le(3 * w, 8) + le(4 * w, 8));

        const TokenShard shard = TokenShard::open(dir.file("written"));
        for (size_t d = 0; d < docs.size(); d++) {
            const std::vector<int> got = shard.document(d);
            CHECK(std::vector<uint32_t>(got.begin(), got.end()) == docs[d]);
        }
    }
    // Nothing left behind but the four shards.
    CHECK(dir.entries() == std::vector<std::string>{"hand.bin", "hand.idx", "written.bin", "written.idx"});
}

TEST_CASE("data: ShardWriter refuses bad input and leaves no files when it does not finish") {
    TempDir dir;
    {
        ShardWriter writer(dir.file("a"));
        const uint32_t too_big[] = {1, 65536};
        CHECK_THROWS_WITH_AS(writer.add_document(too_big, 2), doctest::Contains("id 65536 does not fit in uint16"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(writer.finish(), doctest::Contains("no documents"), std::runtime_error);
        writer.add_document(std::vector<uint32_t>{1, 2});
        CHECK(dir.entries().size() == 2);  // the two temporary files, under their temporary names
        for (const std::string& name : dir.entries()) CHECK(contains(name, ".tmp."));
    }  // destroyed unfinished
    CHECK(dir.entries().empty());
    {
        ShardWriter writer(dir.file("b"), kShardInt32);
        const uint32_t big[] = {2147483647u, 70000};
        writer.add_document(big, 2);
        const uint32_t negative_as_int32[] = {2147483648u};
        CHECK_THROWS(writer.add_document(negative_as_int32, 1));
        writer.finish();
        CHECK_THROWS_WITH_AS(writer.finish(), doctest::Contains("twice"), std::runtime_error);
        CHECK_THROWS(writer.add_document(big, 1));
    }
    CHECK(TokenShard::open(dir.file("b")).document(0) == std::vector<int>{2147483647, 70000});
    CHECK_THROWS_AS(ShardWriter(dir.file("c"), 6), std::runtime_error);
    CHECK_THROWS_WITH_AS(ShardWriter(dir.file("no/such/dir/x")), doctest::Contains("cannot create"), std::runtime_error);
}

TEST_CASE("data: ShardWriter + Tokenizer reproduce the shipped shard byte for byte (README section 4)") {
    TempDir dir;
    Tokenizer tokenizer = Tokenizer::from_file(data_path("tokenizer/pythia-tokenizer.json"));
    const std::vector<std::string> files = shipped_text_files();
    REQUIRE(files.size() == 13);
    {
        ShardWriter writer(dir.file("corpus"));
        for (const std::string& path : files) writer.add_document(tokenizer.encode(read_bytes(path)));
        writer.finish();
    }
    const std::string idx = read_bytes(dir.file("corpus.idx")), bin = read_bytes(dir.file("corpus.bin"));
    CHECK(idx == read_bytes(data_path(kShipped + ".idx")));
    CHECK(bin == read_bytes(data_path(kShipped + ".bin")));
    CHECK(sha256_hex(idx) == "bd2e42a2b9c6b11a32cbf981365959e544481e155c3b6287f86330deb47a6aab");
    CHECK(sha256_hex(bin) == "a4e7021750f8102150a9ba66d6875df552fd0cd24b2767f1dcd023f0dd2e32f4");
}

// ----------------------------------------------------------------------------------------------------------------
// Validation: corrupt and unusual files.

TEST_CASE("data: corrupt shards are refused with a message naming the file and the problem") {
    TempDir dir;
    const std::vector<std::vector<uint32_t>> docs = {{1, 2, 3}, {4, 5}, {6, 7, 8, 9}};
    const std::string good_bin = le(1, 2) + le(2, 2) + le(3, 2) + le(4, 2) + le(5, 2) + le(6, 2) + le(7, 2) + le(8, 2) + le(9, 2);
    const std::vector<int64_t> sizes{3, 2, 4}, pointers{0, 6, 10}, doc_idx{0, 1, 2, 3};
    const std::string good_idx = idx_bytes(8, sizes, pointers, doc_idx);
    const std::string p = dir.file("s");
    auto try_files = [&](const std::string& idx, const std::string& bin) {
        write_bytes(p + ".idx", idx);
        write_bytes(p + ".bin", bin);
        return open_error(p);
    };
    REQUIRE(try_files(good_idx, good_bin) == "");

    struct Case { const char* name; std::string idx, bin, file, message; };
    const std::string I = p + ".idx", B = p + ".bin";
    std::vector<Case> cases = {
        {"empty .idx", "", good_bin, I, "shorter than the 34-byte header"},
        {".idx cut inside the header", good_idx.substr(0, 20), good_bin, I, "shorter than the 34-byte header"},
        {".idx cut inside the arrays", good_idx.substr(0, good_idx.size() - 1), good_bin, I, "truncated"},
        {".idx cut after the sizes", good_idx.substr(0, 34 + 12), good_bin, I, "need 102 bytes, but the file has 46"},
        {".bin cut by one token", good_idx, good_bin.substr(0, 16), I, "document 2: 4 tokens at byte 10 end at byte 18, past the end"},
        {".bin cut inside a token", good_idx, good_bin.substr(0, 17), B, "not a whole number of 2-byte uint16 tokens"},
        {"empty .bin", good_idx, "", I, "document 0"},
        {"wrong magic", idx_bytes(8, sizes, pointers, doc_idx, 1, std::string("MMIDIDY\0\0", 9)), good_bin, I,
         "wrong magic 4D 4D 49 44 49 44 59 00 00"},
        {"old TNTIDX format", idx_bytes(8, sizes, pointers, doc_idx, 1, std::string("TNTIDX\0\0\0", 9)), good_bin, I, "TNTIDX"},
        {"safetensors file", le(8, 8) + "{}      " + std::string(40, '\0'), good_bin, I, "wrong magic"},
        {"wrong version", idx_bytes(8, sizes, pointers, doc_idx, 2), good_bin, I, "version 2, expected 1"},
        {"unknown dtype", idx_bytes(9, sizes, pointers, doc_idx), good_bin, I, "unknown dtype code 9"},
        {"dtype 0", idx_bytes(0, sizes, pointers, doc_idx), good_bin, I, "unknown dtype code 0"},
        {"float dtype", idx_bytes(6, sizes, pointers, doc_idx), good_bin, I, "dtype code 6 (float32) is not a token type"},
        {"uint8 dtype", idx_bytes(1, sizes, pointers, doc_idx), good_bin, I, "dtype code 1 (uint8)"},
        {"zero documents", idx_bytes(8, {}, {}, {0}), "", I, "no documents (N = 0)"},
        {"size past the end", idx_bytes(8, {3, 2, 5}, pointers, doc_idx), good_bin, I, "document 2: 5 tokens at byte 10 end at byte 20"},
        {"pointer past the end", idx_bytes(8, sizes, {0, 6, 1000}, doc_idx), good_bin, I, "document 2: 4 tokens at byte 1000"},
        {"huge pointer", idx_bytes(8, sizes, {0, 6, INT64_MAX - 1}, doc_idx), good_bin, I, "document 2"},
        {"huge size", idx_bytes(8, {3, 2, INT32_MAX}, pointers, doc_idx), good_bin, I, "document 2: 2147483647 tokens"},
        {"negative size", idx_bytes(8, {3, -2, 4}, pointers, doc_idx), good_bin, I, "document 1: size -2 is negative"},
        {"negative pointer", idx_bytes(8, sizes, {0, -6, 10}, doc_idx), good_bin, I, "document 1: pointer -6 is negative"},
        {"odd pointer", idx_bytes(8, sizes, {0, 5, 10}, doc_idx), good_bin, I, "pointer 5 is not a multiple of the 2-byte"},
        {"doc_idx not starting at 0", idx_bytes(8, sizes, pointers, {1, 2, 3}), good_bin, I, "doc_idx[0] = 1, expected 0"},
        {"doc_idx decreasing", idx_bytes(8, sizes, pointers, {0, 2, 1, 3}), good_bin, I, "doc_idx[2] = 1"},
        {"doc_idx past N", idx_bytes(8, sizes, pointers, {0, 1, 4}), good_bin, I, "doc_idx[2] = 4"},
        {"doc_idx empty", idx_bytes(8, sizes, pointers, {}), good_bin, I, "doc_idx is empty"},
    };
    // Header counts that would overflow 34 + 12 N + 8 M.
    std::string huge_n = good_idx;
    huge_n.replace(18, 8, le(UINT64_MAX / 4, 8));
    cases.push_back({"N near 2^64", huge_n, good_bin, I, "more than 2^64"});
    std::string huge_m = good_idx;
    huge_m.replace(26, 8, le(UINT64_MAX, 8));
    cases.push_back({"M = 2^64 - 1", huge_m, good_bin, I, "more than 2^64"});
    std::string big_m = good_idx;
    big_m.replace(26, 8, le(5, 8));
    cases.push_back({"M one too many", big_m, good_bin, I, "M = 5 doc_idx entries, which need 110 bytes, but the file has 102"});

    for (const Case& c : cases) {
        CAPTURE(c.name);
        const std::string message = try_files(c.idx, c.bin);
        CAPTURE(message);
        CHECK(contains(message, c.file + ": "));  // names the file at fault
        CHECK(contains(message, c.message));
    }

    // Missing files.
    std::filesystem::remove(p + ".bin");
    write_bytes(p + ".idx", good_idx);
    CHECK(contains(open_error(p), p + ".bin: cannot open: No such file or directory"));
    CHECK(contains(open_error(dir.file("nothing")), dir.file("nothing") + ".idx: cannot open"));
    // A directory where the .idx should be.
    std::filesystem::create_directory(dir.file("d.idx"));
    CHECK(contains(open_error(dir.file("d")), "not a regular file"));
    // check_data refuses a corrupt shard the same way (train --check-data exits non-zero with the message).
    write_bytes(p + ".bin", good_bin.substr(0, 17));
    CHECK_THROWS_WITH_AS(check_data(p), doctest::Contains("not a whole number"), std::runtime_error);
}

TEST_CASE("data: unusual but valid shards: trailing bytes, non-contiguous pointers, int32, empty documents") {
    TempDir dir;
    const std::string p = dir.file("s");
    // Documents stored out of order with a gap, plus bytes after the index: readable, not contiguous.
    write_bytes(p + ".bin", le(9, 2) + le(9, 2) + le(4, 2) + le(5, 2) + le(1, 2) + le(2, 2) + le(3, 2));
    write_bytes(p + ".idx", idx_bytes(8, {3, 2}, {8, 4}, {0, 1, 2}) + "extra");
    {
        const TokenShard shard = TokenShard::open(p);
        CHECK_FALSE(shard.contiguous());
        CHECK(shard.document(0) == std::vector<int>{1, 2, 3});
        CHECK(shard.document(1) == std::vector<int>{4, 5});
        CHECK(shard.num_tokens() == 5);
    }
    // doc_idx need not end at N (items written after the last end_document).
    write_bytes(p + ".idx", idx_bytes(8, {3, 2}, {8, 4}, {0}));
    CHECK(open_error(p) == "");
    // Contiguous with unused bytes at the end of the .bin.
    write_shard_by_hand(p, {{1, 2}}, 8);
    write_bytes(p + ".bin", le(1, 2) + le(2, 2) + le(0, 2));
    CHECK(TokenShard::open(p).bin_unused_bytes() == 2);

    // Empty documents are valid: they contribute their EOS (and padding) to the stream.
    write_shard_by_hand(p, {{}, {11, 12}, {}, {}, {13}}, 4);
    const auto shard = open_shared(p);
    CHECK(shard->dtype_code() == 4);
    const ShardStats s = shard_stats(*shard);
    CHECK(s.empty_documents == 3);
    CHECK(s.min_doc_tokens == 0);
    CHECK(s.max_doc_tokens == 2);
    CHECK(s.min_id == 11);
    CHECK(s.max_id == 13);
    SampleOptions vanilla;
    vanilla.T = 2;
    vanilla.shuffle = false;
    SampleLoader loader(shard, vanilla);
    CHECK(loader.stream_tokens() == 8);  // EOS | 11 12 EOS | EOS | EOS | 13 EOS
    std::vector<int> ids, mask;
    loader.next_batch(4, ids, mask);
    CHECK(ids == std::vector<int>{0, 11, 12, 0, 0, 0, 13, 0});
    CHECK(mask == std::vector<int>(8, 1));

    // An all-empty shard holds only EOS tokens; check_data reports no ids.
    write_shard_by_hand(p, {{}, {}}, 8);
    TempDir out_dir;
    const std::string table = capture_stdout(out_dir, [&] { check_data(p); });
    CHECK(contains(table, "token ids          none"));
    CHECK(contains(table, "empty documents    2"));
}

TEST_CASE("data: ids outside the vocabulary are refused by the loader and by check_data") {
    TempDir dir;
    const std::string p = dir.file("s");
    write_shard_by_hand(p, {{1, 2, 3}, {4, 50304, 6}, {7, 8}}, 8);
    SampleOptions opt;
    opt.T = 4;
    opt.shuffle = false;
    opt.vocab_size = 50304;
    SampleLoader loader = SampleLoader::open(p, opt);
    std::vector<int> ids, mask;
    loader.next_batch(1, ids, mask);  // 1 2 3 EOS: fine
    CHECK_THROWS_WITH_AS(loader.next_batch(1, ids, mask), doctest::Contains("document 1, token 1 has id 50304"),
                         std::runtime_error);
    opt.vocab_size = 0;  // no vocabulary check: uint16 ids are never negative
    SampleLoader unchecked = SampleLoader::open(p, opt);
    unchecked.next_batch(2, ids, mask);
    CHECK(ids[5] == 50304);

    const ShardStats s = shard_stats(TokenShard::open(p), 50304);
    CHECK(s.out_of_vocab == 1);
    CHECK(s.first_bad_doc == 1);
    CHECK(s.first_bad_offset == 1);
    TempDir out_dir;
    std::string table;
    CHECK_THROWS_WITH_AS(table = capture_stdout(out_dir, [&] { check_data(p); }), doctest::Contains("document 1, token 1"),
                         std::runtime_error);

    // int32 shards can hold negative ids: always refused.
    write_shard_by_hand(p, {{1, 0xFFFFFFFFu, 3, 4}}, 4);
    SampleLoader negative = SampleLoader::open(p, opt);
    CHECK_THROWS_WITH_AS(negative.next_batch(1, ids, mask), doctest::Contains("has id -1"), std::runtime_error);
    CHECK(shard_stats(TokenShard::open(p)).min_id == -1);
}

// ----------------------------------------------------------------------------------------------------------------
// The sample stream (token == position shards).

TEST_CASE("data: vanilla stream: documents + EOS in file order, cut in T-token samples, mask all 1") {
    TempDir dir;
    const std::string p = dir.file("s");
    const std::vector<size_t> sizes = {5, 0, 3, 10, 1, 7, 2, 9};
    const auto docs = counting_docs(sizes);
    write_shard_by_hand(p, docs, 4);
    const auto shard = open_shared(p);
    for (size_t T : {1, 4, 7, 16, 45}) {
        CAPTURE(T);
        SampleOptions opt;
        opt.T = T;
        opt.shuffle = false;
        SampleLoader loader(shard, opt);
        const Stream ref = reference_stream(docs, 0, docs.size(), false, 1, 0);
        REQUIRE(ref.ids.size() == 45);  // 37 tokens + 8 EOS
        CHECK(loader.stream_tokens() == 45);
        CHECK(loader.num_samples() == 45 / T);
        for (size_t s = 0; s < loader.num_samples(); s++) expect_sample(loader, ref, s, T);
        // Batches in stream order when not shuffled: B samples, row-major.
        std::vector<int> ids, mask;
        const size_t B = std::min<size_t>(3, loader.num_samples());
        loader.next_batch(B, ids, mask);
        CHECK(ids == std::vector<int>(ref.ids.begin(), ref.ids.begin() + B * T));
        CHECK(mask == std::vector<int>(B * T, 1));
    }
    // The counting tokens in order: the stream without EOS is 1, 2, 3, ...
    SampleOptions opt;
    opt.T = 45;
    opt.shuffle = false;
    SampleLoader whole(shard, opt);
    std::vector<int> ids, mask;
    whole.next_batch(1, ids, mask);
    std::vector<int> without_eos;
    for (int id : ids) if (id != 0) without_eos.push_back(id);
    for (size_t i = 0; i < without_eos.size(); i++) CHECK(without_eos[i] == (int)i + 1);
    // pad_blocks with LB = 1 is the vanilla stream.
    opt.pad_blocks = true;
    opt.LB = 1;
    SampleLoader lb1(shard, opt);
    std::vector<int> ids1, mask1;
    lb1.next_batch(1, ids1, mask1);
    CHECK(ids1 == ids);
    CHECK(mask1 == mask);
}

TEST_CASE("data: block stream: left pad, EOS, pad to the block boundary; every block from one document") {
    TempDir dir;
    const std::string p = dir.file("s");
    std::vector<size_t> sizes;
    for (size_t i = 0; i < 200; i++) sizes.push_back((i * 37) % 23);  // 0..22 tokens, some empty
    const auto docs = counting_docs(sizes);
    write_shard_by_hand(p, docs, 4);
    const auto shard = open_shared(p);
    for (size_t LB : {2, 4, 8}) {
        for (uint64_t seed : {42, 7}) {
            CAPTURE(LB);
            CAPTURE(seed);
            SampleOptions opt;
            opt.T = 8 * LB;
            opt.pad_blocks = true;
            opt.LB = LB;
            opt.seed = seed;
            opt.shuffle = false;
            SampleLoader loader(shard, opt);
            const Stream ref = reference_stream(docs, 0, docs.size(), true, LB, seed);
            CHECK(loader.stream_tokens() == ref.ids.size());
            CHECK(loader.num_samples() == ref.ids.size() / opt.T);
            for (size_t s = 0; s < loader.num_samples(); s++) expect_sample(loader, ref, s, opt.T);

            // Every block holds slots of one document only, and at least its EOS or one token is real.
            for (size_t b = 0; b + LB <= ref.ids.size(); b += LB) {
                std::set<size_t> owners(ref.doc_of.begin() + b, ref.doc_of.begin() + b + LB);
                CHECK(owners.size() == 1);
                CHECK(std::count(ref.mask.begin() + b, ref.mask.begin() + b + LB, 1) >= 1);
            }
            // Left pads are in 0..LB-1 and not all equal; each document's first real slot is its lp-th.
            std::set<size_t> pads;
            for (size_t d = 0; d < docs.size(); d++) {
                CHECK(loader.left_pad(d) < LB);
                pads.insert(loader.left_pad(d));
            }
            CHECK(pads.size() == LB);
            // Real tokens come out in counting order: the padding never reorders or drops a token.
            std::vector<int> real;
            for (size_t i = 0; i < ref.ids.size(); i++) if (ref.mask[i] && ref.ids[i] != 0) real.push_back(ref.ids[i]);
            for (size_t i = 0; i < real.size(); i++) REQUIRE(real[i] == (int)i + 1);
        }
    }
}

TEST_CASE("data: left pads: deterministic per (seed, document), uniform over 0..LB-1, independent of the split") {
    const size_t n = 40000, LB = 4;
    std::vector<size_t> counts(LB, 0);
    size_t same_as_other_seed = 0;
    for (size_t d = 0; d < n; d++) {
        const size_t lp = block_left_pad(42, d, LB);
        REQUIRE(lp < LB);
        CHECK(lp == block_left_pad(42, d, LB));
        counts[lp]++;
        same_as_other_seed += lp == block_left_pad(43, d, LB);
    }
    for (size_t c : counts) CHECK(std::abs((double)c - n / 4.0) < 5 * std::sqrt(n * 0.25 * 0.75));  // 5 sigma
    CHECK(std::abs((double)same_as_other_seed - n / 4.0) < 5 * std::sqrt(n * 0.25 * 0.75));
    // LB = 1: always 0.
    for (size_t d = 0; d < 100; d++) CHECK(block_left_pad(42, d, 1) == 0);
}

TEST_CASE("data: an EOS on the last slot of a block keeps mask 1 (SPEC 3.5 bug, fixed per SPEC 10.4)") {
    // Choose document sizes so that lp + size + 1 is a multiple of LB (rp = 0): the EOS is a block's last slot,
    // the case the original loader masked out. The next document then starts at a block boundary.
    TempDir dir;
    const std::string p = dir.file("s");
    const size_t LB = 4;
    const uint64_t seed = 42;
    std::vector<size_t> sizes;
    for (size_t d = 0; d < 12; d++) {
        const size_t lp = block_left_pad(seed, d, LB);
        sizes.push_back((2 * LB - 1 - lp) % LB + LB * (d % 3));  // lp + size + 1 = multiple of LB
    }
    const auto docs = counting_docs(sizes);
    write_shard_by_hand(p, docs, 4);
    SampleOptions opt;
    opt.T = 4 * LB;
    opt.pad_blocks = true;
    opt.LB = LB;
    opt.seed = seed;
    opt.shuffle = false;
    SampleLoader loader = SampleLoader::open(p, opt);
    // Segment d is lp + size + 1 slots (no right pad), so its EOS sits at (running total - 1), a block's last slot.
    size_t segment_end = 0, checked = 0, mid_sample = 0;
    for (size_t d = 0; d < docs.size(); d++) {
        segment_end += loader.left_pad(d) + sizes[d] + 1;
        REQUIRE(segment_end % LB == 0);
        const size_t eos = segment_end - 1, s = eos / opt.T, offset = eos % opt.T;
        if (s >= loader.num_samples()) break;  // in the dropped tail
        std::vector<int> ids(opt.T), mask(opt.T);
        loader.sample(s, ids.data(), mask.data());
        CAPTURE(d);
        CHECK(ids[offset] == 0);
        CHECK(mask[offset] == 1);                   // the original loader gave 0 here
        if (sizes[d] > 0 && offset > 0) CHECK(ids[offset - 1] == docs[d].back());
        checked++;
        mid_sample += offset + 1 < opt.T;           // the bug needed the EOS not to be the sample's last token
    }
    CHECK(checked >= 10);
    CHECK(mid_sample >= 5);
    const Stream ref = reference_stream(docs, 0, docs.size(), true, LB, seed);
    for (size_t s = 0; s < loader.num_samples(); s++) expect_sample(loader, ref, s, opt.T);
}

TEST_CASE("data: split: validation_start holds out the last documents; the two loaders see disjoint documents") {
    CHECK(validation_start(13, 0.0) == 13);
    CHECK(validation_start(13, 0.01) == 12);  // ceil(0.13) = 1 document
    CHECK(validation_start(13, 0.5) == 6);    // ceil(6.5) = 7 documents
    CHECK(validation_start(1000, 0.01) == 990);
    CHECK(validation_start(134000000, 0.001) == 133866000);
    CHECK_THROWS(validation_start(13, 1.0));
    CHECK_THROWS(validation_start(13, -0.1));
    CHECK_THROWS(validation_start(1, 0.5));  // would hold out the only document

    TempDir dir;
    const std::string p = dir.file("s");
    std::vector<size_t> sizes(100, 9);
    const auto docs = counting_docs(sizes);  // document d holds ids 9d+1 .. 9d+9
    write_shard_by_hand(p, docs, 4);
    const auto shard = open_shared(p);
    const size_t v = validation_start(shard->num_docs(), 0.1);
    CHECK(v == 90);
    SampleOptions train_opt;
    train_opt.T = 8;
    train_opt.pad_blocks = true;
    train_opt.LB = 4;
    train_opt.doc_end = v;
    SampleOptions val_opt = train_opt;
    val_opt.doc_begin = v;
    val_opt.doc_end = kAllDocuments;
    SampleLoader train(shard, train_opt), val(shard, val_opt);
    CHECK(train.num_docs() == 90);
    CHECK(val.num_docs() == 10);
    auto documents_seen = [](SampleLoader& loader) {
        std::set<int> seen;
        std::vector<int> ids, mask;
        for (size_t i = 0; i < loader.num_samples(); i++) {
            loader.next_batch(1, ids, mask);
            for (int id : ids) if (id != 0) seen.insert((id - 1) / 9);
        }
        return seen;
    };
    const std::set<int> train_docs = documents_seen(train), val_docs = documents_seen(val);
    CHECK(*train_docs.rbegin() < 90);
    CHECK(*val_docs.begin() >= 90);
    CHECK(val_docs.size() == 10);
    // Same pads for a document whichever split it is read through.
    const Stream ref = reference_stream(docs, v, docs.size(), true, 4, train_opt.seed);
    for (size_t s = 0; s < val.num_samples(); s++) expect_sample(val, ref, s, 8);
    // Bad ranges.
    SampleOptions bad = train_opt;
    bad.doc_begin = 50;
    bad.doc_end = 50;
    CHECK_THROWS_WITH_AS(SampleLoader(shard, bad), doctest::Contains("document range [50, 50)"), std::runtime_error);
    bad.doc_end = 101;
    CHECK_THROWS(SampleLoader(shard, bad));
    bad = train_opt;
    bad.T = 10;  // not a multiple of LB = 4
    CHECK_THROWS_WITH_AS(SampleLoader(shard, bad), doctest::Contains("not a multiple of the block length 4"), std::runtime_error);
    bad.T = 100000;
    CHECK_THROWS_WITH_AS(SampleLoader(shard, bad), doctest::Contains("less than one sample"), std::runtime_error);
}

TEST_CASE("data: shuffle: each epoch a seeded permutation of all samples, reshuffled per epoch") {
    TempDir dir;
    const std::string p = dir.file("s");
    std::vector<size_t> sizes;
    for (size_t i = 0; i < 300; i++) sizes.push_back(1 + (i * 13) % 17);
    write_shard_by_hand(p, counting_docs(sizes), 4);
    const auto shard = open_shared(p);
    SampleOptions opt;
    opt.T = 8;
    opt.pad_blocks = true;
    opt.LB = 4;
    SampleLoader loader(shard, opt);
    const size_t n = loader.num_samples();
    REQUIRE(n > 100);
    // Identify each sample by its content: the stream-order samples.
    std::map<std::vector<int>, size_t> index_of;
    for (size_t s = 0; s < n; s++) {
        std::vector<int> ids(8), mask(8);
        loader.sample(s, ids.data(), mask.data());
        ids.insert(ids.end(), mask.begin(), mask.end());
        index_of[ids] = s;
    }
    REQUIRE(index_of.size() == n);  // counting ids make samples distinct
    auto epoch_order = [&](SampleLoader& l) {
        std::vector<size_t> order;
        std::vector<int> ids, mask;
        for (size_t i = 0; i < n; i++) {
            l.next_batch(1, ids, mask);
            ids.insert(ids.end(), mask.begin(), mask.end());
            REQUIRE(index_of.count(ids) == 1);
            order.push_back(index_of[ids]);
        }
        return order;
    };
    const std::vector<size_t> e0 = epoch_order(loader);
    CHECK(loader.position().epoch == 1);
    CHECK(loader.position().index == 0);
    const std::vector<size_t> e1 = epoch_order(loader);
    std::vector<size_t> sorted0 = e0, sorted1 = e1, identity(n);
    std::sort(sorted0.begin(), sorted0.end());
    std::sort(sorted1.begin(), sorted1.end());
    for (size_t i = 0; i < n; i++) identity[i] = i;
    CHECK(sorted0 == identity);  // each sample exactly once per epoch
    CHECK(sorted1 == identity);
    CHECK(e0 != identity);
    CHECK(e0 != e1);            // reshuffled
    for (size_t i = 0; i < n; i++) CHECK(e0[i] == loader.sample_at(0, i));
    // Same seed, same order; another seed, another order.
    SampleLoader again(shard, opt);
    CHECK(epoch_order(again) == e0);
    opt.seed = 43;  // (also other left pads, so the samples differ: compare orders by index)
    SampleLoader other(shard, opt);
    std::vector<size_t> other_e0;
    for (size_t i = 0; i < other.num_samples(); i++) other_e0.push_back(other.sample_at(0, i));
    CHECK(other_e0 != e0);
    // A shuffle that is roughly uniform: sample 0 lands in each half of the order about equally often over epochs.
    size_t first_half = 0;
    for (uint64_t e = 0; e < 400; e++) {
        size_t where = 0;
        while (other.sample_at(e, where) != 0) where++;
        first_half += where < n / 2;
    }
    CHECK(first_half > 140);
    CHECK(first_half < 260);
    // shuffle = false: stream order, every epoch.
    opt.shuffle = false;
    opt.seed = 42;
    SampleLoader ordered(shard, opt);
    CHECK(epoch_order(ordered) == identity);
    CHECK(epoch_order(ordered) == identity);
}

TEST_CASE("data: position: save, restore in a fresh loader, and the batches continue exactly (across epochs)") {
    TempDir dir;
    const std::string p = dir.file("s");
    std::vector<size_t> sizes;
    for (size_t i = 0; i < 60; i++) sizes.push_back((i * 7) % 11);
    write_shard_by_hand(p, counting_docs(sizes), 8);
    for (bool pad : {false, true}) {
        CAPTURE(pad);
        SampleOptions opt;
        opt.T = 8;
        opt.pad_blocks = pad;
        opt.LB = 4;
        opt.seed = 1234;
        SampleLoader first = SampleLoader::open(p, opt);
        const size_t n = first.num_samples(), B = 5;
        REQUIRE(n > 2 * B);
        std::vector<int> ids, mask;
        for (size_t i = 0; i < n / B + 1; i++) first.next_batch(B, ids, mask);  // into epoch 1
        const LoaderPosition saved = first.position();
        CHECK(saved.epoch == 1);
        const std::string text = saved.to_string();
        CHECK(LoaderPosition::parse(text) == saved);
        std::vector<std::vector<int>> expected;
        for (size_t i = 0; i < 3 * n / B; i++) {  // through two more epoch boundaries
            first.next_batch(B, ids, mask);
            expected.push_back(ids);
            expected.push_back(mask);
        }
        SampleLoader resumed = SampleLoader::open(p, opt);
        resumed.restore(LoaderPosition::parse(text));
        CHECK(resumed.position() == saved);
        for (size_t i = 0; i < 3 * n / B; i++) {
            resumed.next_batch(B, ids, mask);
            CHECK(ids == expected[2 * i]);
            CHECK(mask == expected[2 * i + 1]);
        }
        CHECK(resumed.position() == first.position());
        // rewind: back to the first batch.
        SampleLoader fresh = SampleLoader::open(p, opt);
        std::vector<int> first_ids, first_mask;
        fresh.next_batch(B, first_ids, first_mask);
        resumed.rewind();
        resumed.next_batch(B, ids, mask);
        CHECK(ids == first_ids);

        // Positions from another seed or another stream are refused.
        LoaderPosition wrong = saved;
        wrong.seed = 1;
        CHECK_THROWS_WITH_AS(resumed.restore(wrong), doctest::Contains("cannot restore loader position"), std::runtime_error);
        wrong = saved;
        wrong.samples++;
        CHECK_THROWS(resumed.restore(wrong));
        wrong = saved;
        wrong.index = wrong.samples;
        CHECK_THROWS(resumed.restore(wrong));
    }
}

TEST_CASE("data: LoaderPosition text form") {
    const LoaderPosition p{42, 3, 17, 970};
    CHECK(p.to_string() == "seed=42 epoch=3 index=17 samples=970");
    CHECK(LoaderPosition::parse("seed=18446744073709551615 epoch=0 index=0 samples=1").seed == UINT64_MAX);
    for (const char* bad : {"", "seed=42", "seed=42 epoch=3 index=17", "seed=42 epoch=3 index=17 samples=970 ",
                            "seed=42  epoch=3 index=17 samples=970", "epoch=3 seed=42 index=17 samples=970",
                            "seed=-1 epoch=3 index=17 samples=970", "seed=42 epoch=x index=17 samples=970",
                            "seed=99999999999999999999 epoch=3 index=17 samples=970"}) {
        CAPTURE(bad);
        CHECK_THROWS_AS(LoaderPosition::parse(bad), std::runtime_error);
    }
}

TEST_CASE("data: batches from the shipped shard for a block config and a vanilla config") {
    const auto shard = open_shared(data_path(kShipped));
    for (bool pad : {true, false}) {
        SampleOptions opt;
        opt.T = 2048;
        opt.pad_blocks = pad;
        opt.LB = 4;
        opt.vocab_size = 50304;
        opt.doc_end = validation_start(shard->num_docs(), 0.01);
        SampleLoader loader(shard, opt);
        // 12 documents: 1,991,261 tokens minus the held-out last document, + 12 EOS (+ padding when pad).
        const uint64_t tokens = shard->num_tokens() - shard->doc_size(12) + 12;
        CHECK(loader.stream_tokens() >= tokens);
        CHECK(loader.stream_tokens() <= tokens + (pad ? 12 * 6 : 0));
        CHECK(loader.num_samples() == loader.stream_tokens() / 2048);
        std::vector<int> ids, mask;
        loader.next_batch(8, ids, mask);
        CHECK(ids.size() == 8 * 2048);
        CHECK(mask.size() == ids.size());
        size_t masked = (size_t)std::count(mask.begin(), mask.end(), 0);
        if (!pad) CHECK(masked == 0);
        for (size_t i = 0; i < ids.size(); i++) {
            REQUIRE(ids[i] >= 0);
            REQUIRE(ids[i] < 50304);
            if (mask[i] == 0) REQUIRE(ids[i] == 0);
        }
    }
}
