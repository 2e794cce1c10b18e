// test_tokenizer.cpp: the Pythia tokenizer (tokenizer.h) against Hugging Face's outputs (shared/data/tokenizer/
// reference), the Unicode NFC conformance file, and its own pieces (UTF-8, pre-tokenizer, BPE, loading errors).
#include <cstdio>
#include <fstream>
#include <sstream>
#include <sys/stat.h>

#include "test/sha256.h"     // defines: Sha256, sha256_hex
#include "test/test_util.h"  // defines: data_path, read_file_bytes
#include "tokenizer.h"       // defines: Tokenizer, normalize_nfc, split_gpt2, utf8_lossy, ...

namespace {

const std::string kUnicodeDir = "/usr/share/unicode";  // Debian's unicode-data

// The Pythia tokenizer, loaded once for all cases (encode fills its word cache, so it is not const).
Tokenizer& pythia() {
    static Tokenizer tokenizer = Tokenizer::from_file(data_path("tokenizer/pythia-tokenizer.json"));
    return tokenizer;
}

std::string read_text(const std::string& path) {
    std::vector<uint8_t> bytes = read_file_bytes(path);
    return std::string(bytes.begin(), bytes.end());
}

std::vector<JsonValue> read_jsonl(const std::string& path) {
    std::vector<JsonValue> rows;
    std::istringstream lines(read_text(path));
    std::string line;
    while (std::getline(lines, line))
        if (!line.empty()) rows.push_back(parse_json(line));
    return rows;
}

std::vector<uint32_t> json_ids(const JsonValue& array) {
    std::vector<uint32_t> ids;
    for (const JsonValue& v : array.items) ids.push_back(uint32_t(v.number));
    return ids;
}

// sha256 of ids stored as little-endian uint16, the format of corpus_token_stats.jsonl and of Pythia's .bin files.
std::string ids_u16le_sha256(const std::vector<uint32_t>& ids) {
    std::string bytes;
    bytes.reserve(2 * ids.size());
    for (uint32_t id : ids) {
        REQUIRE(id < 65536);
        bytes += char(id & 0xFF);
        bytes += char(id >> 8);
    }
    return sha256_hex(bytes);
}

std::string split_joined(std::string_view text) {  // the GPT-2 pieces of text joined by '|'
    std::string out;
    split_gpt2(text, [&](std::string_view piece) { out += (out.empty() ? "" : "|") + std::string(piece); });
    return out;
}

std::string nfc(std::string_view text) {
    std::string storage;
    return std::string(normalize_nfc(text, storage));
}

bool file_exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------- sha256

TEST_CASE("tokenizer: sha256 of the FIPS 180-4 / NIST test vectors") {
    CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    // 1,000,000 'a', fed in uneven chunks to exercise the block buffering.
    Sha256 h;
    const std::string chunk(997, 'a');
    size_t left = 1000000;
    while (left > 0) {
        const size_t n = std::min(left, chunk.size());
        h.update(chunk.data(), n);
        left -= n;
    }
    CHECK(h.hex_digest() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// ---------------------------------------------------------------------------------------------- UTF-8

TEST_CASE("tokenizer: invalid UTF-8 input is rejected with its byte offset") {
    const char* cases[][2] = {
        {"ab\x80", "at byte 2 (byte 0x80)"},          // lone continuation byte
        {"abc\xC3", "at byte 3 (byte 0xC3)"},         // truncated 2-byte sequence
        {"\xC0\xAF", "at byte 0 (byte 0xC0)"},        // overlong encoding
        {"x\xED\xA0\x80", "at byte 1 (byte 0xED)"},   // UTF-16 surrogate
        {"xy\xF4\x90\x80\x80", "at byte 2 (byte 0xF4)"},  // beyond U+10FFFF
    };
    for (const auto& c : cases) {
        CAPTURE(c[1]);
        try {
            pythia().encode(c[0]);
            FAIL("no error");
        } catch (const std::runtime_error& e) {
            CHECK(std::string(e.what()).find(c[1]) != std::string::npos);
        }
    }
}

TEST_CASE("tokenizer: utf8_lossy replaces maximal invalid subparts like Rust's from_utf8_lossy") {
    const std::string fffd = "\xEF\xBF\xBD";
    CHECK(utf8_lossy("plain é") == "plain é");
    CHECK(utf8_lossy("a\x80z") == "a" + fffd + "z");
    CHECK(utf8_lossy("\xE2\x82") == fffd);                       // a truncated 3-byte sequence is one subpart
    CHECK(utf8_lossy("\xE2\x82z") == fffd + "z");
    CHECK(utf8_lossy("\xF0\x9F\x98") == fffd);                   // truncated 4-byte sequence
    CHECK(utf8_lossy("\xF0\x80\x80") == fffd + fffd + fffd);     // F0 80: 80 is not a valid second byte after F0
    CHECK(utf8_lossy("\xED\xA0\x80") == fffd + fffd + fffd);     // surrogates: each byte alone
    CHECK(utf8_lossy("\xC0\xAF") == fffd + fffd);
    CHECK(utf8_lossy("\xFF\xFE") == fffd + fffd);
}

// ---------------------------------------------------------------------------------------------- Unicode

TEST_CASE("tokenizer: character classes of the split pattern") {
    size_t length = 0;
    CHECK(char_class_at("a", 0, &length) == unicode::kLetter);
    CHECK(char_class_at("7", 0, &length) == unicode::kNumber);
    CHECK(char_class_at("\t", 0, &length) == unicode::kSpace);
    CHECK(char_class_at("'", 0, &length) == unicode::kOther);
    CHECK(char_class_at("\x1C", 0, &length) == unicode::kOther);  // not White_Space (unlike Python's isspace)
    CHECK(char_class_at("\u00A0", 0, &length) == unicode::kSpace);
    CHECK(length == 2);
    CHECK(char_class_at("\u3000", 0, &length) == unicode::kSpace);
    CHECK(char_class_at("\u200B", 0, &length) == unicode::kOther);  // zero width space is Cf, not White_Space
    CHECK(char_class_at("\u4E2D", 0, &length) == unicode::kLetter);
    CHECK(char_class_at("\u2460", 0, &length) == unicode::kNumber);  // circled digit one: No
    CHECK(char_class_at("\u0301", 0, &length) == unicode::kOther);   // combining mark: neither L nor N
    CHECK(char_class_at("\U00011F02", 0, &length) == unicode::kLetter);  // Kawi (Unicode 15.0)
    CHECK(length == 4);
}

// Parses DerivedAge.txt: the code point ranges assigned in Unicode <= major.minor.
std::vector<std::pair<uint32_t, uint32_t>> assigned_ranges(int major, int minor) {
    std::vector<std::pair<uint32_t, uint32_t>> ranges;
    std::istringstream lines(read_text(kUnicodeDir + "/DerivedAge.txt"));
    std::string line;
    while (std::getline(lines, line)) {
        unsigned first = 0, last = 0;
        int ma = 0, mi = 0;
        if (std::sscanf(line.c_str(), "%x..%x ; %d.%d", &first, &last, &ma, &mi) == 4 ||
            (std::sscanf(line.c_str(), "%x ; %d.%d", &first, &ma, &mi) == 3 && (last = first, true))) {
            if (ma < major || (ma == major && mi <= minor)) ranges.emplace_back(first, last);
        }
    }
    return ranges;
}

// The conformance file, decompressed if Debian ships it compressed.
std::string read_normalization_test() {
    const std::string plain = kUnicodeDir + "/NormalizationTest.txt";
    if (file_exists(plain)) return read_text(plain);
    FILE* pipe = popen(("bzip2 -dc " + plain + ".bz2").c_str(), "r");
    REQUIRE_MESSAGE(pipe != nullptr, "cannot run bzip2 on " << plain << ".bz2");
    std::string text;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) text.append(buf, n);
    REQUIRE_MESSAGE(pclose(pipe) == 0, "bzip2 -dc " << plain << ".bz2 failed");
    return text;
}

std::string utf8_of_hex_list(const std::string& field) {
    std::istringstream words(field);
    std::string out;
    unsigned cp;
    while (words >> std::hex >> cp) utf8_append(out, cp);
    return out;
}

bool normalization_test_present() {
    return file_exists(kUnicodeDir + "/NormalizationTest.txt") || file_exists(kUnicodeDir + "/NormalizationTest.txt.bz2");
}

// Every NFC relation of the conformance file: c2 == NFC(c1) == NFC(c2) == NFC(c3), c4 == NFC(c4) == NFC(c5), and
// NFC(X) == X for every code point not in part 1. Our NFC is Unicode 9.0's (HF's); by Unicode's stability policy
// it must agree with the 15.0 file on every line whose characters were all assigned in 9.0. Lines using newer
// characters are counted and left out.
TEST_CASE("tokenizer: NFC passes NormalizationTest.txt (lines of Unicode <= 9.0 characters)" *
          doctest::skip(!normalization_test_present())) {
    const auto old = assigned_ranges(9, 0);
    REQUIRE(!old.empty());
    auto is_old = [&](const std::string& utf8) {
        for (size_t i = 0; i < utf8.size();) {
            const uint32_t cp = utf8_next(utf8, i);
            bool found = false;
            for (const auto& r : old)
                if (cp >= r.first && cp <= r.second) { found = true; break; }
            if (!found) return false;
        }
        return true;
    };
    std::istringstream lines(read_normalization_test());
    std::string line, part;
    std::vector<bool> in_part1(0x110000, false);
    size_t checked = 0, skipped_new = 0, failures = 0;
    while (std::getline(lines, line)) {
        if (line.empty() || line[0] == '#') continue;
        if (line[0] == '@') { part = line.substr(0, line.find(' ')); continue; }
        std::string c[5];
        size_t pos = 0;
        for (int k = 0; k < 5; k++) {
            const size_t semi = line.find(';', pos);
            REQUIRE(semi != std::string::npos);
            c[k] = utf8_of_hex_list(line.substr(pos, semi - pos));
            pos = semi + 1;
        }
        if (part == "@Part1") {
            size_t i = 0;
            in_part1[utf8_next(c[0], i)] = true;
        }
        if (!is_old(c[0])) { skipped_new++; continue; }
        checked++;
        const bool ok = nfc(c[0]) == c[1] && nfc(c[1]) == c[1] && nfc(c[2]) == c[1] && nfc(c[3]) == c[3] &&
                        nfc(c[4]) == c[3];
        if (!ok && ++failures <= 10) FAIL_CHECK("NFC mismatch on line: " << line);
    }
    CHECK(failures == 0);
    CHECK(checked > 17000);
    MESSAGE("NormalizationTest.txt: " << checked << " lines checked, " << skipped_new
                                      << " left out (characters newer than Unicode 9.0)");
    size_t identity_failures = 0;
    for (uint32_t cp = 0; cp < 0x110000; cp++) {
        if ((cp >= 0xD800 && cp <= 0xDFFF) || in_part1[cp]) continue;
        std::string s;
        utf8_append(s, cp);
        if (nfc(s) != s && ++identity_failures <= 10) FAIL_CHECK("NFC changes U+" << std::hex << cp);
    }
    CHECK(identity_failures == 0);
}

TEST_CASE("tokenizer: NFC knows only Unicode 9.0 characters, like HF's normalization crate") {
    // U+11938 = U+11935 U+11930 was added in Unicode 13.0: HF leaves the pair alone.
    CHECK(nfc("\U00011935\U00011930") == "\U00011935\U00011930");
    // U+08D3 (ccc 220) was added in 11.0: to HF it is a starter, so a + U+0300 compose and nothing reorders.
    CHECK(nfc("a\u0300\u08D3") == "\u00E0\u08D3");
    // Unicode <= 9.0 behaviour: composition, reordering, composition exclusions, Hangul.
    CHECK(nfc("cafe\u0301") == "caf\u00E9");
    CHECK(nfc("a\u0323\u0302") == "\u1EAD");            // reordered then composed
    CHECK(nfc("a\u0302\u0323") == "\u1EAD");
    CHECK(nfc("\u0958") == "\u0915\u093C");              // composition exclusion
    CHECK(nfc("\u1100\u1161\u11A8") == "\uAC01");        // Hangul L V T
    CHECK(nfc("\uAC00\u11A7") == "\uAC00\u11A7");        // T_BASE itself is no trailing consonant
}

// ---------------------------------------------------------------------------------------------- pre-tokenizer

TEST_CASE("tokenizer: GPT-2 split pattern") {
    CHECK(split_joined("Hello world") == "Hello| world");
    CHECK(split_joined("I'm can't") == "I|'m| can|'t");
    CHECK(split_joined("I'M") == "I|'|M");                  // contractions are lower case only
    CHECK(split_joined("dog's ''s") == "dog|'s| ''|s");
    CHECK(split_joined("a  b") == "a| | b");                // \s+(?!\S) leaves the last space to " b"
    CHECK(split_joined("a \t\tb") == "a| \t|\t|b");         // the last whitespace is a tab: alone, then b
    CHECK(split_joined("a\n\nb") == "a|\n|\n|b");
    CHECK(split_joined("end   ") == "end|   ");              // whitespace at the end stays together
    CHECK(split_joined("x 123 4.5") == "x| 123| 4|.|5");
    CHECK(split_joined("a!? ..b") == "a|!?| ..|b");
    CHECK(split_joined("\u00A0nbsp") == "\u00A0|nbsp");      // NBSP is \s but not the optional ' '
    CHECK(split_joined(" ") == " ");
    CHECK(split_joined("") == "");
}

// ---------------------------------------------------------------------------------------------- reference outputs

TEST_CASE("tokenizer: every edge case of edge_cases.jsonl matches HF (ids and both decodings)") {
    Tokenizer& tok = pythia();
    const auto rows = read_jsonl(data_path("tokenizer/reference/edge_cases.jsonl"));
    REQUIRE(rows.size() == 58);
    size_t matched = 0;
    for (const JsonValue& row : rows) {
        const std::string& text = row.at("text").string;
        CAPTURE(text);
        const std::vector<uint32_t> expected = json_ids(row.at("ids"));
        const std::vector<uint32_t> ids = tok.encode(text);
        CHECK(ids == expected);
        CHECK(tok.decode(expected, false) == row.at("decoded_keep_special").string);
        CHECK(tok.decode(expected, true) == row.at("decoded_skip_special").string);
        matched += ids == expected && tok.decode(expected, false) == row.at("decoded_keep_special").string &&
                   tok.decode(expected, true) == row.at("decoded_skip_special").string;
    }
    MESSAGE("edge cases matched: " << matched << " / " << rows.size());
}

TEST_CASE("tokenizer: every corpus of corpus_token_stats.jsonl matches HF (count, sha256 of ids) and round-trips") {
    Tokenizer& tok = pythia();
    const auto rows = read_jsonl(data_path("tokenizer/reference/corpus_token_stats.jsonl"));
    REQUIRE(rows.size() == 13);
    size_t matched = 0, total_tokens = 0;
    for (const JsonValue& row : rows) {
        const std::string& file = row.at("file").string;
        CAPTURE(file);
        const std::string text = read_text(data_path(file));
        REQUIRE(text.size() == size_t(row.at("bytes").number));
        const std::vector<uint32_t> ids = tok.encode(text);
        CHECK(ids.size() == size_t(row.at("tokens").number));
        const std::string hash = ids_u16le_sha256(ids);
        CHECK(hash == row.at("ids_u16le_sha256").string);
        const std::vector<uint32_t> first = json_ids(row.at("first_ids"));
        CHECK(std::vector<uint32_t>(ids.begin(), ids.begin() + std::min(ids.size(), first.size())) == first);
        CHECK(tok.decode(ids) == text);
        matched += hash == row.at("ids_u16le_sha256").string;
        total_tokens += ids.size();
    }
    CHECK(total_tokens == 1991261);
    MESSAGE("corpora matched: " << matched << " / " << rows.size() << ", " << total_tokens << " tokens");
}

TEST_CASE("tokenizer: encoding a corpus twice gives the same ids (the word cache changes nothing)") {
    const std::string text = read_text(data_path("text/enwik8-first100.txt"));
    Tokenizer fresh = Tokenizer::from_file(data_path("tokenizer/pythia-tokenizer.json"));
    const std::vector<uint32_t> first = fresh.encode(text);
    CHECK(fresh.encode(text) == first);
}

// ---------------------------------------------------------------------------------------------- decode

TEST_CASE("tokenizer: decode") {
    Tokenizer& tok = pythia();
    CHECK(tok.vocab_size() == 50277);
    CHECK(tok.token_to_id("<|endoftext|>") == 0);
    CHECK(tok.token_to_id("<|padding|>") == 1);
    CHECK(tok.is_special(0));
    CHECK(!tok.is_special(50254));
    CHECK(tok.decode({12092, 0, 1, 13}) == "Hello,");
    CHECK(tok.decode({12092, 0, 1, 13}, false) == "Hello<|endoftext|><|padding|>,");
    // Emoji 🤗 is 4 bytes over several tokens: a cut inside it decodes to U+FFFD, the whole to the emoji.
    const std::vector<uint32_t> emoji = tok.encode("\U0001F917");
    REQUIRE(emoji.size() > 1);
    CHECK(tok.decode(emoji) == "\U0001F917");
    CHECK(tok.decode(std::vector<uint32_t>(emoji.begin(), emoji.end() - 1)) == "\xEF\xBF\xBD");
    CHECK_THROWS_WITH_AS(tok.decode({5, 50277}), doctest::Contains("id 50277 (at position 1) is not a token of this tokenizer (it has 50277 ids)"),
                         std::runtime_error);
}

// ---------------------------------------------------------------------------------------------- BPE core

// A tiny tokenizer.json around `model`, with Pythia's pipeline.
std::string tiny_tokenizer_json(const std::string& model, const std::string& added = "[]") {
    return R"({"version":"1.0","truncation":null,"padding":null,"added_tokens":)" + added +
           R"(,"normalizer":{"type":"NFC"},"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,)"
           R"("trim_offsets":true},"post_processor":null,"decoder":{"type":"ByteLevel"},"model":)" + model + "}";
}

TEST_CASE("tokenizer: BPE merges by rank, leftmost first on ties") {
    // vocab: a b c ab bc abc aa; merges ranked: "b c" < "a b" < "a bc" < "a a".
    const std::string model =
        R"({"type":"BPE","dropout":null,"unk_token":null,"vocab":{"a":0,"b":1,"c":2,"ab":3,"bc":4,"abc":5,"aa":6},)"
        R"("merges":["b c","a b","a bc","a a"]})";
    Tokenizer tok = Tokenizer::from_json(tiny_tokenizer_json(model));
    CHECK(tok.encode("abc") == std::vector<uint32_t>{5});      // b c first, then a bc
    CHECK(tok.encode("ab") == std::vector<uint32_t>{3});
    CHECK(tok.encode("aaa") == std::vector<uint32_t>{6, 0});   // leftmost pair first
    CHECK(tok.encode("aaaa") == std::vector<uint32_t>{6, 6});
    CHECK(tok.encode("abab") == std::vector<uint32_t>{3, 3});
    CHECK(tok.encode("xa") == std::vector<uint32_t>{0});       // no token for 'x' and no unk: dropped, like HF
    CHECK(tok.decode({5, 0}) == "abca");
}

TEST_CASE("tokenizer: added tokens are matched leftmost-longest, raw ones before NFC") {
    const std::string model =
        R"({"type":"BPE","vocab":{"a":0,"b":1,"Ġ":2,"e":3,"Ì":4,"ģ":5},"merges":[]})";
    const std::string added =
        R"([{"id":6,"content":"ab","special":true,"normalized":false},)"
        R"({"id":7,"content":"aba","special":false,"normalized":false},)"
        R"({"id":8,"content":"  ","special":false,"normalized":true},)"
        R"({"id":9,"content":"é","special":false,"normalized":true}])";
    // Expected values: what HF tokenizers 0.23 gives for the same file.
    Tokenizer tok = Tokenizer::from_json(tiny_tokenizer_json(model, added));
    CHECK(tok.encode("abab") == std::vector<uint32_t>{7, 1});   // "aba" is longer than "ab" at position 0
    CHECK(tok.encode("ab  b") == std::vector<uint32_t>{6, 8, 1});
    CHECK(tok.encode("e\u0301") == std::vector<uint32_t>{9});   // normalized tokens see the NFC text
    // The ByteLevel decoder maps every token through the byte alphabet when it can: "é" is the alphabet's spelling
    // of byte 0xE9, which alone is invalid UTF-8. The space token has a character outside it and stays as it is.
    CHECK(tok.decode({6, 8, 9}) == "  \xEF\xBF\xBD");           // special token 6 skipped
    CHECK(tok.decode({6, 8, 9}, false) == "ab  \xEF\xBF\xBD");
}

// ---------------------------------------------------------------------------------------------- load errors

void check_load_error(const std::string& json, const std::string& expected) {
    CAPTURE(expected);
    try {
        Tokenizer::from_json(json);
        FAIL("no error");
    } catch (const std::runtime_error& e) {
        CHECK_MESSAGE(std::string(e.what()).find(expected) != std::string::npos, "message: " << std::string(e.what()));
    }
}

TEST_CASE("tokenizer: malformed tokenizer.json gives a clear error") {
    const std::string good_model = R"({"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]})";
    REQUIRE_NOTHROW(Tokenizer::from_json(tiny_tokenizer_json(good_model)));
    check_load_error("{\"model\": [1, 2,", "JSON");                               // bad JSON
    check_load_error("[1, 2]", "the top level must be an object");
    check_load_error(R"({"pre_tokenizer":{"type":"ByteLevel"},"decoder":{"type":"ByteLevel"}})", "missing 'tokenizer.model'");
    check_load_error(tiny_tokenizer_json(R"({"type":"WordPiece","vocab":{}})"), "model.type is 'WordPiece', only BPE");
    check_load_error(tiny_tokenizer_json(R"({"type":"BPE","merges":[]})"), "missing 'model.vocab'");
    check_load_error(tiny_tokenizer_json(R"({"type":"BPE","vocab":{"a":0},"merges":["a b"]})"),
                     "model.merges[0] refers to 'b', which is not in model.vocab");
    check_load_error(tiny_tokenizer_json(R"({"type":"BPE","vocab":{"a":0,"b":1},"merges":["a b"]})"),
                     "model.merges[0] refers to 'ab'");
    check_load_error(tiny_tokenizer_json(R"({"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["ab"]})"),
                     "model.merges[0] must be two tokens separated by one space");
    check_load_error(tiny_tokenizer_json(R"({"type":"BPE","vocab":{"a":-1},"merges":[]})"), "model.vocab['a'] must be an integer id");
    check_load_error(tiny_tokenizer_json(R"({"type":"BPE","vocab":{"a":0,"b":0},"merges":[]})"), "id 0 is given to two tokens");
    check_load_error(tiny_tokenizer_json(R"({"type":"BPE","vocab":{},"merges":[],"unk_token":"<unk>"})"),
                     "model.unk_token = \"<unk>\" is not supported");
    check_load_error(tiny_tokenizer_json(good_model, R"([{"id":5,"content":"a"}])"), "'a' has id 5 but model.vocab gives it id 0");
    check_load_error(tiny_tokenizer_json(good_model, R"([{"id":5,"content":"x"}])"),
                     "'x' has id 5, but Hugging Face tokenizers gives it id 3");
    check_load_error(tiny_tokenizer_json(good_model, R"([{"id":3,"content":"x","lstrip":true}])"),
                     "added_tokens[0].lstrip = true is not supported");
    check_load_error(tiny_tokenizer_json("{\"type\":\"BPE\",\"vocab\":{\"a\xF0\":0},\"merges\":[]}"), "UTF-8");
    std::string no_nfc = tiny_tokenizer_json(good_model);
    no_nfc.replace(no_nfc.find("\"NFC\""), 5, "\"NFKC\"");
    check_load_error(no_nfc, "normalizer type 'NFKC' is not supported");
}

TEST_CASE("tokenizer: a missing or truncated tokenizer file gives an error naming the file") {
    CHECK_THROWS_WITH_AS(Tokenizer::from_file("/nonexistent/tokenizer.json"),
                         "cannot open tokenizer file '/nonexistent/tokenizer.json'", std::runtime_error);
    const std::string full = read_text(data_path("tokenizer/pythia-tokenizer.json"));
    char path[] = "/tmp/blocktf_truncated_tokenizer_XXXXXX";
    const int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    close(fd);
    {
        std::ofstream out(path, std::ios::binary);
        out.write(full.data(), std::streamsize(full.size() / 2));
    }
    try {
        Tokenizer::from_file(path);
        FAIL("no error");
    } catch (const std::runtime_error& e) {
        const std::string message = e.what();
        CHECK(message.find(std::string("tokenizer file '") + path + "'") != std::string::npos);
        CHECK(message.find("JSON") != std::string::npos);
    }
    std::remove(path);
}
