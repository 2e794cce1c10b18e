// test_loader.cpp: tests of loader.h: the JSON parser, the bf16/f16 conversions, the safetensors reader and
// writer. Expected values are written by hand (byte sequences, known bit patterns, values checked with
// Python's json module), never taken from the code under test.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>
#include "loader.h"
#include "test/test_util.h"

namespace {

// 8 little-endian bytes of n, built by hand.
std::string le64(uint64_t n) {
    std::string out;
    for (int i = 0; i < 8; i++) out += (char)((n >> (8 * i)) & 0xFF);
    return out;
}

// A safetensors file: header length, header, data.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
    return le64(header.size()) + header + data;
}

float float_from_bits(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint32_t bits_of(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return bits;
}

// Parses text that must be rejected; checks the message names the byte offset and the problem.
void check_json_error(const std::string& text, const std::string& expected) {
    INFO("input: " << text.substr(0, 60));
    CHECK_THROWS_WITH_AS(parse_json(text), doctest::Contains(expected.c_str()), std::runtime_error);
}

// The message SafetensorsFile::open throws for path; the test fails if it opens or throws anything else.
std::string open_error(const std::string& path) {
    try {
        SafetensorsFile::open(path);
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    FAIL_CHECK(path << " opened without an error");
    return "";
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("json: literals") {
    CHECK(parse_json("null").type == JsonValue::Type::Null);
    JsonValue t = parse_json("true"), f = parse_json(" false ");
    CHECK(t.type == JsonValue::Type::Bool);
    CHECK(t.as_bool() == true);
    CHECK(f.as_bool() == false);
}

TEST_CASE("json: numbers") {
    CHECK(parse_json("0").as_number() == 0.0);
    CHECK(parse_json("42").as_int64() == 42);
    CHECK(parse_json("-17").as_int64() == -17);
    CHECK(parse_json("3.25").as_number() == 3.25);
    CHECK(parse_json("-0.5").as_number() == -0.5);
    CHECK(parse_json("1e3").as_number() == 1000.0);
    CHECK(parse_json("1E+3").as_number() == 1000.0);
    CHECK(parse_json("25e-2").as_number() == 0.25);
    CHECK(parse_json("-1.5e2").as_number() == -150.0);
    CHECK(parse_json("0.1").as_number() == 0.1);  // correctly rounded, like the compiler's literal
    CHECK(parse_json("1.7976931348623157e308").as_number() == 1.7976931348623157e308);
    CHECK(parse_json("4.9406564584124654e-324").as_number() == 4.9406564584124654e-324);  // smallest subnormal

    JsonValue negative_zero = parse_json("-0");
    CHECK(negative_zero.as_number() == 0.0);
    CHECK(std::signbit(negative_zero.as_number()));
    CHECK(std::signbit(parse_json("-0.0e5").as_number()));
    CHECK_FALSE(std::signbit(parse_json("0").as_number()));

    // as_int64 is exact up to 2^53 and refuses what may have been rounded or is not an integer.
    CHECK(parse_json("9007199254740992").as_int64() == 9007199254740992LL);
    CHECK(parse_json("-9007199254740992").as_int64() == -9007199254740992LL);
    CHECK(parse_json("2.0").as_int64() == 2);
    CHECK(parse_json("5e2").as_int64() == 500);
    CHECK_THROWS_WITH_AS(parse_json("1e16").as_int64(), doctest::Contains("too large"), std::runtime_error);
    CHECK_THROWS_WITH_AS(parse_json("2.5").as_int64(), doctest::Contains("expected an integer, got 2.5"),
                         std::runtime_error);
}

TEST_CASE("json: strings and escapes") {
    CHECK(parse_json("\"\"").as_string().empty());
    CHECK(parse_json("\"hello\"").as_string() == "hello");
    CHECK(parse_json(R"("q\"b\\s\/n\nt\tr\rb\bf\f")").as_string() == "q\"b\\s/n\nt\tr\rb\bf\f");
    CHECK(parse_json(R"("\u0041\u0062")").as_string() == "Ab");
    CHECK(parse_json(R"("\u00e9")").as_string() == "\xC3\xA9");        // U+00E9, 2 UTF-8 bytes
    CHECK(parse_json(R"("\u00E9")").as_string() == "\xC3\xA9");        // upper-case hex
    CHECK(parse_json(R"("\u0120")").as_string() == "\xC4\xA0");        // the GPT-2 byte-level space
    CHECK(parse_json(R"("\u20AC")").as_string() == "\xE2\x82\xAC");    // U+20AC, 3 bytes
    CHECK(parse_json(R"("\uFFFF")").as_string() == "\xEF\xBF\xBF");
    CHECK(parse_json(R"("\uD83D\uDE00")").as_string() == "\xF0\x9F\x98\x80");  // U+1F600 from a surrogate pair
    CHECK(parse_json(R"("\uD800\uDC00")").as_string() == "\xF0\x90\x80\x80");  // U+10000, the first pair
    CHECK(parse_json(R"("\uDBFF\uDFFF")").as_string() == "\xF4\x8F\xBF\xBF");  // U+10FFFF, the last pair

    std::string nul = parse_json(R"("a\u0000b")").as_string();  // an escaped NUL is a real byte
    CHECK(nul.size() == 3);
    CHECK(nul == std::string("a\0b", 3));

    CHECK(parse_json("\"caf\xC3\xA9\"").as_string() == "caf\xC3\xA9");  // raw UTF-8 passes through
    CHECK(parse_json("\"\xFF\xFE\"").as_string() == "\xFF\xFE");        // so does invalid UTF-8
    CHECK(parse_json("\"\x7F\"").as_string() == "\x7F");                // DEL is not a control character in JSON
}

TEST_CASE("json: arrays, objects and nesting") {
    JsonValue v = parse_json(" {\"a\" : [1, {\"b\": null}, \"s\"],\n\t\"c\":{}, \"d\":[] ,\"a\": 2}\r\n");
    REQUIRE(v.type == JsonValue::Type::Object);
    REQUIRE(v.members.size() == 4);  // a repeated key is kept; members stay in file order
    CHECK(v.members[0].first == "a");
    CHECK(v.members[1].first == "c");
    CHECK(v.members[2].first == "d");
    CHECK(v.members[3].first == "a");

    const JsonValue& a = v.at("a");  // the first "a"
    REQUIRE(a.type == JsonValue::Type::Array);
    REQUIRE(a.items.size() == 3);
    CHECK(a.items[0].as_int64() == 1);
    CHECK(a.items[1].at("b").type == JsonValue::Type::Null);
    CHECK(a.items[2].as_string() == "s");
    CHECK(v.at("c").as_object().empty());
    CHECK(v.at("d").as_array().empty());

    CHECK(v.find("zzz") == nullptr);
    CHECK(a.find("a") == nullptr);  // not an object
    CHECK_THROWS_WITH_AS(v.at("zzz"), "JSON: missing key 'zzz'", std::runtime_error);

    JsonValue nested = parse_json("[[[[\"deep\"]]]]");
    CHECK(nested.items[0].items[0].items[0].items[0].as_string() == "deep");

    // Exactly the depth limit is fine.
    std::string at_limit = std::string(512, '[') + std::string(512, ']');
    JsonValue deepest = parse_json(at_limit);
    size_t depth = 0;
    const JsonValue* p = &deepest;
    while (p->type == JsonValue::Type::Array) {
        depth++;
        if (p->items.empty()) break;
        p = &p->items[0];
    }
    CHECK(depth == 512);
}

TEST_CASE("json: typed accessors throw on the wrong type") {
    JsonValue v = parse_json(R"({"n": 1, "s": "x", "a": [], "b": true})");
    CHECK_THROWS_WITH_AS(v.at("n").as_string(), "JSON: expected a string, got 1", std::runtime_error);
    CHECK_THROWS_WITH_AS(v.at("s").as_number(), "JSON: expected a number, got \"x\"", std::runtime_error);
    CHECK_THROWS_WITH_AS(v.at("s").as_int64(), doctest::Contains("expected a number"), std::runtime_error);
    CHECK_THROWS_WITH_AS(v.at("a").as_object(), "JSON: expected an object, got an array", std::runtime_error);
    CHECK_THROWS_WITH_AS(v.at("b").as_array(), "JSON: expected an array, got true", std::runtime_error);
    CHECK_THROWS_WITH_AS(v.at("n").as_bool(), "JSON: expected a boolean, got 1", std::runtime_error);
    CHECK_THROWS_WITH_AS(v.at("a").at("k"), "JSON: expected an object, got an array", std::runtime_error);
}

TEST_CASE("json: malformed inputs throw with the byte offset") {
    // Empty input and whitespace only.
    check_json_error("", "JSON: unexpected end of input, expected a value at byte 0");
    check_json_error("  \n", "unexpected end of input, expected a value at byte 3");
    // Strings.
    check_json_error("\"abc", "JSON: unterminated string at byte 0");
    check_json_error("[\"ok\", \"abc", "unterminated string at byte 7");
    check_json_error("\"abc\\", "unterminated escape sequence at byte 4");
    check_json_error(R"(["a\x"])", "invalid escape '\\x' at byte 3");
    check_json_error(R"("\U0041")", "invalid escape '\\U' at byte 1");
    check_json_error(R"("\u12G4")", "invalid hex digit in \\u escape at byte 5");
    check_json_error(R"("\u12")", "truncated \\u escape at byte 3");
    check_json_error(R"(["\u12"])", "invalid hex digit in \\u escape at byte 6");  // the closing quote
    check_json_error("\"\\u12", "truncated \\u escape at byte 3");
    check_json_error(R"("\uD800")", "high surrogate not followed by a \\u low surrogate at byte 1");
    check_json_error(R"("x\uD83Dy")", "high surrogate not followed by a \\u low surrogate at byte 2");
    check_json_error(R"("\uD800\u0041")", "high surrogate not followed by a low surrogate at byte 1");
    check_json_error(R"("\uD800\uD800")", "high surrogate not followed by a low surrogate at byte 1");
    check_json_error(R"("\uDC00")", "lone low surrogate in \\u escape at byte 1");
    check_json_error(R"("ab\uDFFF\uD800")", "lone low surrogate in \\u escape at byte 3");
    check_json_error("\"a\nb\"", "raw control character 0x0A in string at byte 2");
    check_json_error("\"a\tb\"", "raw control character 0x09 in string at byte 2");
    check_json_error(std::string("\"a\0b\"", 5), "raw control character 0x00 in string at byte 2");
    check_json_error("\"\x1F\"", "raw control character 0x1F in string at byte 1");
    // Arrays and objects.
    check_json_error("[1,2,]", "trailing comma before ']' at byte 5");
    check_json_error("{\"a\":1,}", "trailing comma before '}' at byte 7");
    check_json_error("{\"a\":1 , }", "trailing comma before '}' at byte 9");
    check_json_error("[1 2]", "expected ',' or ']' in array, found '2' at byte 3");
    check_json_error("{\"a\":1 \"b\":2}", "expected ',' or '}' in object, found '\"' at byte 7");
    check_json_error("{\"a\" 1}", "expected ':', found '1' at byte 5");
    check_json_error("{1:2}", "expected a string key, found '1' at byte 1");
    check_json_error("{'a':1}", "expected a string key, found ''' at byte 1");
    check_json_error("[", "unexpected end of input, expected a value at byte 1");
    check_json_error("[1", "expected ',' or ']' in array, found end of input at byte 2");
    check_json_error("{\"a\":", "unexpected end of input, expected a value at byte 5");
    check_json_error("[,1]", "unexpected ',', expected a value at byte 1");
    check_json_error("]", "unexpected ']', expected a value at byte 0");
    // Numbers.
    check_json_error("01", "leading zero in number at byte 0");
    check_json_error("[-012]", "leading zero in number at byte 1");
    check_json_error("1.", "expected a digit after the decimal point at byte 2");
    check_json_error("1.e5", "expected a digit after the decimal point at byte 2");
    check_json_error(".5", "unexpected '.', expected a value at byte 0");
    check_json_error("1e", "expected a digit in the exponent at byte 2");
    check_json_error("1e+", "expected a digit in the exponent at byte 3");
    check_json_error("-", "expected a digit after '-' at byte 1");
    check_json_error("-a", "expected a digit after '-' at byte 1");
    check_json_error("+1", "unexpected '+', expected a value at byte 0");
    check_json_error("0x10", "trailing characters after the JSON value at byte 1");
    check_json_error("1e400", "number out of the range of a double at byte 0");
    check_json_error("[0, -1e999]", "number out of the range of a double at byte 4");
    check_json_error("NaN", "unexpected 'N', expected a value at byte 0");
    check_json_error("-Infinity", "expected a digit after '-' at byte 1");
    // Literals.
    check_json_error("tru", "invalid literal, expected 'true' at byte 0");
    check_json_error("[nul]", "invalid literal, expected 'null' at byte 1");
    check_json_error("True", "unexpected 'T', expected a value at byte 0");
    // Trailing garbage.
    check_json_error("[1] x", "trailing characters after the JSON value at byte 4");
    check_json_error("{} {}", "trailing characters after the JSON value at byte 3");
    check_json_error("truex", "trailing characters after the JSON value at byte 4");
    check_json_error("\"a\"\"b\"", "trailing characters after the JSON value at byte 3");
    check_json_error("1\x01", "trailing characters after the JSON value at byte 1");
    // Bytes that are not JSON at all.
    check_json_error("\xEF\xBB\xBF{}", "unexpected byte 0xEF, expected a value at byte 0");  // a UTF-8 BOM
    check_json_error("\x01", "unexpected byte 0x01, expected a value at byte 0");
    // Nesting: one level past the limit, and far past it (must not overflow the stack).
    check_json_error(std::string(513, '['), "nesting deeper than 512 levels at byte 512");
    std::string objects;  // object j opens at byte 5j, at depth j + 1
    for (int i = 0; i < 600; i++) objects += "{\"k\":";
    check_json_error(objects, "nesting deeper than 512 levels at byte 2560");
    check_json_error(std::string(256, '[') + objects, "nesting deeper than 512 levels at byte 1536");  // 256 + 5 * 256
    check_json_error(std::string(1000000, '['), "nesting deeper than 512 levels at byte 512");
}

TEST_CASE("json: every prefix and single-byte corruption of a document is handled without crashing") {
    const std::string doc = R"({"a": [1, -2.5e3, true, null], "s": "x\u00e9\uD83D\uDE00\n", "o": {"k": false}})";
    REQUIRE_NOTHROW(parse_json(doc));
    size_t rejected = 0;
    for (size_t n = 0; n < doc.size(); n++) {
        // Every proper prefix is incomplete.
        CHECK_THROWS_AS(parse_json(std::string_view(doc).substr(0, n)), std::runtime_error);
    }
    const char replacements[] = {'\0', '"', '\\', '[', ']', '{', '}', ',', ':', '0', 'u', 'e', '-', '\n', '\xFF'};
    for (size_t i = 0; i < doc.size(); i++) {
        for (char r : replacements) {
            std::string corrupted = doc;
            corrupted[i] = r;
            try {
                parse_json(corrupted);
            } catch (const std::runtime_error& e) {
                rejected++;
                CHECK(std::string(e.what()).find(" at byte ") != std::string::npos);
            }
        }
    }
    CHECK(rejected > 0);
}

TEST_CASE("json: parses the Pythia tokenizer file in well under a second") {
    std::vector<uint8_t> bytes = read_file_bytes(data_path("tokenizer/pythia-tokenizer.json"));
    REQUIRE(bytes.size() > 2000000);
    std::string_view text((const char*)bytes.data(), bytes.size());

    auto start = std::chrono::steady_clock::now();
    JsonValue tokenizer = parse_json(text);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    MESSAGE("parsed " << bytes.size() << " bytes of tokenizer JSON in " << ms << " ms");
    CHECK(ms < 1000.0);

    // Expected values from Python: json.load(open(...)).
    const JsonValue& model = tokenizer.at("model");
    CHECK(model.at("type").as_string() == "BPE");
    CHECK(model.at("dropout").type == JsonValue::Type::Null);
    CHECK(model.at("fuse_unk").as_bool() == false);
    CHECK(tokenizer.at("version").as_string() == "1.0");
    CHECK(tokenizer.at("normalizer").at("type").as_string() == "NFC");
    CHECK(tokenizer.at("pre_tokenizer").at("add_prefix_space").as_bool() == false);

    const JsonValue& vocab = model.at("vocab");
    CHECK(vocab.as_object().size() == 50254);
    CHECK(vocab.members[0].first == "<|endoftext|>");
    CHECK(vocab.members[0].second.as_int64() == 0);
    CHECK(vocab.members.back().first == "\xC4\xA0Outcomes");  // "ĠOutcomes"
    CHECK(vocab.members.back().second.as_int64() == 50253);
    CHECK(vocab.at("\"").as_int64() == 3);             // written "\"" in the file
    CHECK(vocab.at("\\").as_int64() == 61);            // written "\\"
    CHECK(vocab.at("\xC2\xA1").as_int64() == 96);      // written "\u00a1" (U+00A1)
    CHECK(vocab.at("\xC4\xA0the").as_int64() == 253);  // "Ġthe"
    CHECK(vocab.at("hello").as_int64() == 25521);

    const JsonValue& merges = model.at("merges");
    CHECK(merges.as_array().size() == 50009);
    CHECK(merges.items[0].as_string() == "\xC4\xA0 \xC4\xA0");  // "Ġ Ġ"
    CHECK(merges.items.back().as_string() == "\xC4\xA0Out comes");

    const JsonValue& added = tokenizer.at("added_tokens");
    CHECK(added.as_array().size() == 25);
    CHECK(added.items[0].at("content").as_string() == "<|endoftext|>");
    CHECK(added.items[0].at("special").as_bool() == true);
    CHECK(added.items.back().at("id").as_int64() == 50276);
    CHECK(added.items.back().at("content").as_string() == "  ");
}

// ---------------------------------------------------------------------------------------------------------
// bf16 and f16 conversions
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("bf16: exact values convert both ways") {
    struct Exact { float value; uint16_t bits; };
    const Exact cases[] = {
        {1.0f, 0x3F80}, {-2.0f, 0xC000}, {0.5f, 0x3F00}, {0.0f, 0x0000}, {-0.0f, 0x8000},
        {3.140625f, 0x4049}, {1.015625f, 0x3F82}, {256.0f, 0x4380}, {-0.125f, 0xBE00},
        {std::numeric_limits<float>::infinity(), 0x7F80}, {-std::numeric_limits<float>::infinity(), 0xFF80},
    };
    for (const Exact& c : cases) {
        CAPTURE(c.value);
        CHECK(float_to_bf16(c.value) == c.bits);
        CHECK(bits_of(bf16_to_float(c.bits)) == bits_of(c.value));  // bitwise, so -0 is told from +0
    }
    CHECK(bf16_to_float(0x7F7F) == std::ldexp(255.0f, 120));   // the largest finite bf16, (2 - 2^-7) * 2^127
    CHECK(bf16_to_float(0x0080) == std::ldexp(1.0f, -126));    // the smallest normal
    CHECK(bf16_to_float(0x0001) == std::ldexp(1.0f, -133));    // the smallest subnormal
    CHECK(float_to_bf16(std::ldexp(1.0f, -133)) == 0x0001);
}

TEST_CASE("bf16: float_to_bf16 rounds to nearest, ties to even") {
    CHECK(float_to_bf16(float_from_bits(0x3F807FFF)) == 0x3F80);  // just below the midpoint: down
    CHECK(float_to_bf16(float_from_bits(0x3F808000)) == 0x3F80);  // tie, 0x3F80 is even: down
    CHECK(float_to_bf16(float_from_bits(0x3F808001)) == 0x3F81);  // just above the midpoint: up
    CHECK(float_to_bf16(float_from_bits(0x3F818000)) == 0x3F82);  // tie, 0x3F81 is odd: up to even
    CHECK(float_to_bf16(float_from_bits(0xBF808000)) == 0xBF80);  // negative tie: toward even magnitude
    CHECK(float_to_bf16(float_from_bits(0xBF818000)) == 0xBF82);
    // The same ties written as values: bf16 steps near 1 are 2^-7, so 1 + 2^-8 and 1 + 3 * 2^-8 are midpoints.
    CHECK(float_to_bf16(1.0f + 1.0f / 256) == 0x3F80);           // -> 1.0
    CHECK(float_to_bf16(1.0f + 3.0f / 256) == 0x3F82);           // -> 1.015625
    CHECK(float_to_bf16(float_from_bits(0x40490FDB)) == 0x4049);  // pi -> 3.140625
    CHECK(float_to_bf16(float_from_bits(0x3F7FFFFF)) == 0x3F80);  // just below 1 rounds up across the exponent
    // Overflow: the largest float rounds up to inf, just below the top midpoint stays finite.
    CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);
    CHECK(float_to_bf16(float_from_bits(0x7F7F7FFF)) == 0x7F7F);
    CHECK(float_to_bf16(float_from_bits(0xFF7FFFFF)) == 0xFF80);
    // Subnormals round the same way.
    CHECK(float_to_bf16(float_from_bits(0x00008000)) == 0x0000);  // tie to even zero
    CHECK(float_to_bf16(float_from_bits(0x00018000)) == 0x0002);  // tie to even 2
}

TEST_CASE("bf16: NaN stays NaN") {
    CHECK(float_to_bf16(float_from_bits(0x7FC00000)) == 0x7FC0);  // the canonical quiet NaN
    CHECK(std::isnan(bf16_to_float(0x7FC0)));
    CHECK(std::isnan(bf16_to_float(0x7F81)));                     // a signalling NaN bit pattern
    CHECK(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
    // Payload only in the bits that get dropped: plain rounding would give inf (0x7F80); it must stay NaN.
    uint16_t low_payload = float_to_bf16(float_from_bits(0x7F800001));
    CHECK((low_payload & 0x7F80) == 0x7F80);
    CHECK((low_payload & 0x007F) != 0);
    CHECK(std::isnan(bf16_to_float(low_payload)));
    // A NaN whose rounding would carry into the exponent must not wrap, and the sign is kept.
    uint16_t negative = float_to_bf16(float_from_bits(0xFFFFFFFF));
    CHECK(std::isnan(bf16_to_float(negative)));
    CHECK((negative & 0x8000) != 0);
    CHECK((float_to_bf16(float_from_bits(0xFF800001)) & 0x8000) != 0);
}

TEST_CASE("bf16: f16_to_float decodes IEEE half precision (the F16 read path)") {
    CHECK(f16_to_float(0x3C00) == 1.0f);
    CHECK(f16_to_float(0xC000) == -2.0f);
    CHECK(f16_to_float(0x3555) == 0.25f * (1.0f + 341.0f / 1024));  // 0.333251953125
    CHECK(f16_to_float(0x7BFF) == 65504.0f);                         // the largest finite half
    CHECK(f16_to_float(0x0400) == std::ldexp(1.0f, -14));           // the smallest normal
    CHECK(f16_to_float(0x0001) == std::ldexp(1.0f, -24));           // the smallest subnormal
    CHECK(f16_to_float(0x03FF) == std::ldexp(1023.0f, -24));         // the largest subnormal
    CHECK(bits_of(f16_to_float(0x0000)) == 0x00000000u);
    CHECK(bits_of(f16_to_float(0x8000)) == 0x80000000u);             // -0
    CHECK(f16_to_float(0x7C00) == std::numeric_limits<float>::infinity());
    CHECK(f16_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
    CHECK(std::isnan(f16_to_float(0x7E00)));
    CHECK(std::isnan(f16_to_float(0x7C01)));
}

// ---------------------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("safetensors: dtype names and sizes") {
    CHECK(std::string(dtype_name(DType::F32)) == "F32");
    CHECK(std::string(dtype_name(DType::BF16)) == "BF16");
    CHECK(std::string(dtype_name(DType::I64)) == "I64");
    CHECK(std::string(dtype_name(DType::BOOL)) == "BOOL");
    CHECK(dtype_size(DType::F64) == 8);
    CHECK(dtype_size(DType::F32) == 4);
    CHECK(dtype_size(DType::F16) == 2);
    CHECK(dtype_size(DType::BF16) == 2);
    CHECK(dtype_size(DType::I64) == 8);
    CHECK(dtype_size(DType::I32) == 4);
    CHECK(dtype_size(DType::I16) == 2);
    CHECK(dtype_size(DType::I8) == 1);
    CHECK(dtype_size(DType::U8) == 1);
    DType d = DType::F32;
    CHECK(dtype_from_name("BF16", &d));
    CHECK(d == DType::BF16);
    CHECK_FALSE(dtype_from_name("bf16", &d));
    CHECK_FALSE(dtype_from_name("F8_E4M3", &d));
}

TEST_CASE("safetensors: write, open and read back round trip") {
    TempDir dir;
    const std::string path = dir.file("model.safetensors");
    const float w[2][3] = {{1.0f, -2.5f, 3.25f}, {0.0f, -0.0f, 1e-30f}};
    const uint16_t b[4] = {0x3F80, 0xC000, 0x4049, 0x7F80};  // 1, -2, 3.140625, inf
    const uint16_t h[2] = {0x3C00, 0xC000};                  // f16 1, -2
    const int32_t ids[3] = {-7, 0, 2147483647};
    const int64_t big[2] = {-2147483648LL, 50276};
    const int64_t too_big[1] = {2147483648LL};
    const double d[2] = {0.5, -1e300};
    const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "quote \" back \\ nl \n"}};
    write_safetensors(path,
                      {{"w", DType::F32, {2, 3}, w},
                       {"b", DType::BF16, {4}, b},
                       {"empty", DType::F32, {0, 5}, nullptr},
                       {"h", DType::F16, {2}, h},
                       {"ids", DType::I32, {3}, ids},
                       {"big", DType::I64, {2, 1}, big},
                       {"too_big", DType::I64, {1}, too_big},
                       {"scalar", DType::F64, {}, d},
                       {"d", DType::F64, {2}, d}},
                      metadata);
    CHECK(dir.entries().size() == 1);  // the temp file was renamed away

    SafetensorsFile file = SafetensorsFile::open(path);
    CHECK(file.path() == path);
    CHECK(file.metadata() == metadata);
    REQUIRE(file.tensors().size() == 9);
    const char* order[] = {"w", "b", "empty", "h", "ids", "big", "too_big", "scalar", "d"};
    for (size_t i = 0; i < 9; i++) CHECK(file.tensors()[i].name == order[i]);

    const SafeTensor& tw = file.get("w");
    CHECK(tw.dtype == DType::F32);
    CHECK(tw.shape == std::vector<int64_t>{2, 3});
    CHECK(tw.numel() == 6);
    CHECK(tw.end - tw.begin == 24);
    CHECK(std::memcmp(file.bytes(tw), w, 24) == 0);
    std::vector<float> wf = file.read_f32("w");
    REQUIRE(wf.size() == 6);
    CHECK(wf[0] == 1.0f);
    CHECK(wf[1] == -2.5f);
    CHECK(wf[2] == 3.25f);
    CHECK(bits_of(wf[4]) == 0x80000000u);
    CHECK(wf[5] == 1e-30f);

    CHECK(file.read_f32("b") == std::vector<float>{1.0f, -2.0f, 3.140625f, std::numeric_limits<float>::infinity()});
    CHECK(file.read_f32("h") == std::vector<float>{1.0f, -2.0f});
    CHECK(file.read_f32("d") == std::vector<float>{0.5f, -std::numeric_limits<float>::infinity()});
    CHECK(file.get("scalar").shape.empty());
    CHECK(file.read_f32("scalar") == std::vector<float>{0.5f});  // a 0-d tensor has one element

    const SafeTensor& te = file.get("empty");
    CHECK(te.numel() == 0);
    CHECK(te.begin == te.end);
    CHECK(te.shape == std::vector<int64_t>{0, 5});
    CHECK(file.read_f32("empty").empty());

    CHECK(file.read_i32("ids") == std::vector<int32_t>{-7, 0, 2147483647});
    CHECK(file.read_i32("big") == std::vector<int32_t>{-2147483647 - 1, 50276});
    CHECK_THROWS_WITH_AS(file.read_i32("too_big"),
                         (path + ": tensor 'too_big': element 0 = 2147483648 does not fit in int32").c_str(),
                         std::runtime_error);

    CHECK(file.find("nope") == nullptr);
    CHECK(file.find("ids") == &file.get("ids"));
    CHECK_THROWS_WITH_AS(file.get("nope"), (path + ": no tensor named 'nope'").c_str(), std::runtime_error);
    CHECK_THROWS_WITH_AS(file.read_f32("ids"), doctest::Contains("tensor 'ids': read_f32 cannot read dtype I32"),
                         std::runtime_error);
    CHECK_THROWS_WITH_AS(file.read_i32("w"), doctest::Contains("tensor 'w': read_i32 cannot read dtype F32"),
                         std::runtime_error);

    // The tensors tile the data section back to back, in the order written.
    size_t offset = 0;
    for (const SafeTensor& t : file.tensors()) {
        CHECK(t.begin == offset);
        offset = t.end;
    }
    CHECK(offset == 24 + 8 + 0 + 4 + 12 + 16 + 8 + 8 + 16);
}

TEST_CASE("safetensors: the writer's bytes follow the format") {
    TempDir dir;
    const std::string path = dir.file("a.safetensors");
    const float a[2] = {1.0f, -2.0f};
    write_safetensors(path, {{"a", DType::F32, {2}, a}}, {});
    std::vector<uint8_t> bytes = read_file_bytes(path);
    const std::string expected_json = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    const size_t padded = 56;  // 54 bytes of JSON padded with two spaces to a multiple of 8
    REQUIRE(expected_json.size() == 54);
    REQUIRE(bytes.size() == 8 + padded + 8);
    const uint8_t length[8] = {56, 0, 0, 0, 0, 0, 0, 0};
    CHECK(std::memcmp(bytes.data(), length, 8) == 0);
    CHECK(std::string(bytes.begin() + 8, bytes.begin() + 8 + padded) == expected_json + "  ");
    const uint8_t data[8] = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0};  // 1.0f, -2.0f little-endian
    CHECK(std::memcmp(bytes.data() + 8 + padded, data, 8) == 0);

    // Writing again replaces the file in place.
    const float c[1] = {0.5f};
    write_safetensors(path, {{"c", DType::F32, {1}, c}}, {{"k", "v"}});
    SafetensorsFile file = SafetensorsFile::open(path);
    REQUIRE(file.tensors().size() == 1);
    CHECK(file.read_f32("c") == std::vector<float>{0.5f});
    CHECK(file.metadata().at("k") == "v");
    CHECK(dir.entries().size() == 1);
}

TEST_CASE("safetensors: reads hand-built files") {
    TempDir dir;
    const std::string path = dir.file("hand.safetensors");
    // Metadata last, tensors in reverse offset order, a header length that leaves the data unaligned,
    // and trailing spaces in the header (the format allows padding).
    const std::string header = R"({"i":{"dtype":"I64","shape":[2],"data_offsets":[4,20]},)"
                               R"("w":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]},)"
                               R"("__metadata__":{"k":"v","e":"\u00e9"}}   )";
    const std::string data = std::string("\x80\x3F\x00\xC0", 4) +                      // bf16 1.0, -2.0
                             std::string("\x05\x00\x00\x00\x00\x00\x00\x00", 8) +      // int64 5
                             std::string("\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF", 8);       // int64 -1
    write_bytes(path, safetensors_bytes(header, data));
    SafetensorsFile file = SafetensorsFile::open(path);
    REQUIRE(file.tensors().size() == 2);
    CHECK(file.tensors()[0].name == "i");  // header order, not offset order
    CHECK(file.tensors()[1].name == "w");
    CHECK(file.get("i").begin == 4);
    CHECK(file.get("i").end == 20);
    CHECK(file.read_f32("w") == std::vector<float>{1.0f, -2.0f});
    CHECK(file.read_i32("i") == std::vector<int32_t>{5, -1});
    CHECK(file.metadata().size() == 2);
    CHECK(file.metadata().at("e") == "\xC3\xA9");

    // A file with no tensors and no data is valid.
    write_bytes(path, safetensors_bytes("{}", ""));
    CHECK(SafetensorsFile::open(path).tensors().empty());
}

TEST_CASE("safetensors: malformed files are rejected with a message naming the file and the tensor") {
    TempDir dir;
    const std::string path = dir.file("bad.safetensors");
    // One header entry, written out by hand.
    auto entry = [](const char* name, const char* shape, const char* offsets) {
        return std::string("\"") + name + "\":{\"dtype\":\"F32\",\"shape\":" + shape +
               ",\"data_offsets\":" + offsets + "}";
    };
    auto one = [&](const char* name, const char* shape, const char* offsets) {
        return "{" + entry(name, shape, offsets) + "}";
    };
    const std::string zeros4(4, '\0'), zeros8(8, '\0'), zeros12(12, '\0'), zeros64(64, '\0');
    const std::string not_pair = "data_offsets must be an array of two non-negative integers";
    struct Case { std::string bytes; std::string expected; };
    const Case cases[] = {
        // Too short, bad header length.
        {"", "file is 0 bytes, shorter than the 8-byte header length"},
        {"\x01\x02\x03\x04\x05", "file is 5 bytes, shorter than the 8-byte header length"},
        {le64(0), "header length is 0"},
        {le64(0) + "{}", "header length is 0"},
        {le64(200000000) + "{}", "header length 200000000 is absurdly large"},
        {le64(UINT64_MAX) + "{}", "header length 18446744073709551615 is absurdly large"},
        {le64(100) + "{}", "header length 100 is past the end of the file (10 bytes)"},
        {le64(3) + "{}", "header length 3 is past the end of the file (10 bytes)"},
        // Header not JSON, or not an object.
        {safetensors_bytes("{\"a\":", ""),
         "header is not valid JSON (JSON: unexpected end of input, expected a value at byte 5 of the header)"},
        {safetensors_bytes("{\"a\":{}}x", ""),
         "header is not valid JSON (JSON: trailing characters after the JSON value at byte 8 of the header)"},
        {safetensors_bytes(std::string("{\0}", 3), ""), "header is not valid JSON"},
        {safetensors_bytes("[1,2]", ""), "header is an array, not a JSON object"},
        {safetensors_bytes("\"x\"", ""), "header is \"x\", not a JSON object"},
        // Entries: dtype and shape.
        {safetensors_bytes(R"({"a":5})", ""), "tensor 'a': entry is 5, not an object"},
        {safetensors_bytes(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", zeros4), "tensor 'a': missing \"dtype\""},
        {safetensors_bytes(R"({"a":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", zeros4),
         "tensor 'a': dtype is 4, not a string"},
        {safetensors_bytes(R"({"a":{"dtype":"F9","shape":[1],"data_offsets":[0,4]}})", zeros4),
         "tensor 'a': unknown dtype 'F9'"},
        {safetensors_bytes(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", zeros4), "tensor 'a': missing \"shape\""},
        {safetensors_bytes(one("a", "4", "[0,4]"), zeros4), "tensor 'a': shape is 4, not an array"},
        {safetensors_bytes(one("a", "[-1]", "[0,4]"), zeros4),
         "tensor 'a': shape[0] = -1 is not a non-negative integer"},
        {safetensors_bytes(one("a", "[1,2.5]", "[0,4]"), zeros4),
         "tensor 'a': shape[1] = 2.5 is not a non-negative integer"},
        {safetensors_bytes(one("a", "[\"1\"]", "[0,4]"), zeros4),
         "tensor 'a': shape[0] = \"1\" is not a non-negative integer"},
        {safetensors_bytes(one("a", "[1e300]", "[0,4]"), zeros4),
         "tensor 'a': shape[0] = 1.0000000000000001e+300 is not a non-negative integer"},
        // Entries: data_offsets.
        {safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1]}})", zeros4), "tensor 'a': missing \"data_offsets\""},
        {safetensors_bytes(one("a", "[1]", "[0]"), zeros4), "tensor 'a': " + not_pair},
        {safetensors_bytes(one("a", "[1]", "[0,4,8]"), zeros4), "tensor 'a': " + not_pair},
        {safetensors_bytes(one("a", "[1]", "[0,\"4\"]"), zeros4), "tensor 'a': " + not_pair},
        {safetensors_bytes(one("a", "[1]", "[-4,0]"), zeros4), "tensor 'a': " + not_pair},
        {safetensors_bytes(one("a", "[1]", "{}"), zeros4), "tensor 'a': " + not_pair},
        {safetensors_bytes(one("a", "[1]", "[8,4]"), zeros8), "tensor 'a': data_offsets [8, 4] have begin > end"},
        // Offsets past the data, wrong element count.
        {safetensors_bytes(one("x.weight", "[4,6]", "[0,96]"), zeros64),
         "tensor 'x.weight': data_offsets [0, 96] past the end of the data (64 bytes)"},
        {safetensors_bytes(one("a", "[1]", "[9007199254740988,9007199254740992]"), zeros8),
         "tensor 'a': data_offsets [9007199254740988, 9007199254740992] past the end of the data (8 bytes)"},
        {safetensors_bytes(one("a", "[3]", "[0,8]"), zeros8),
         "tensor 'a': data_offsets [0, 8] hold 8 bytes but shape [3] of F32 needs 12"},
        {safetensors_bytes(one("a", "[0]", "[0,8]"), zeros8),
         "tensor 'a': data_offsets [0, 8] hold 8 bytes but shape [0] of F32 needs 0"},
        {safetensors_bytes(one("a", "[4294967296,4294967296,4294967296]", "[0,8]"), zeros8),
         "tensor 'a': shape [4294967296, 4294967296, 4294967296] has too many elements"},
        // Duplicates, overlaps, holes.
        {safetensors_bytes("{" + entry("a", "[1]", "[0,4]") + "," + entry("a", "[1]", "[4,8]") + "}", zeros8),
         "tensor 'a': duplicate name"},
        {safetensors_bytes("{" + entry("a", "[2]", "[0,8]") + "," + entry("b", "[2]", "[4,12]") + "}", zeros12),
         "tensor 'b': data_offsets [4, 12] overlap tensor 'a' [0, 8]"},
        {safetensors_bytes("{" + entry("b", "[2]", "[4,12]") + "," + entry("a", "[2]", "[0,8]") + "}", zeros12),
         "tensor 'b': data_offsets [4, 12] overlap tensor 'a' [0, 8]"},
        {safetensors_bytes("{" + entry("a", "[2]", "[0,8]") + "," + entry("b", "[2]", "[0,8]") + "}", zeros8),
         "overlap tensor"},
        {safetensors_bytes("{" + entry("a", "[2]", "[0,8]") + "," + entry("z", "[0]", "[4,4]") + "}", zeros8),
         "tensor 'z': data_offsets [4, 4] overlap tensor 'a' [0, 8]"},
        {safetensors_bytes("{" + entry("a", "[1]", "[0,4]") + "," + entry("b", "[1]", "[8,12]") + "}", zeros12),
         "tensor 'b': data_offsets [8, 12] leave a hole: bytes [4, 8] of the data section belong to no tensor"},
        {safetensors_bytes(one("a", "[1]", "[4,8]"), zeros8),
         "tensor 'a': data_offsets [4, 8] leave a hole: bytes [0, 4]"},
        {safetensors_bytes(one("a", "[1]", "[0,4]"), zeros8),
         "bytes [4, 8] at the end of the data section (8 bytes) belong to no tensor (the last tensor is 'a')"},
        {safetensors_bytes("{}", zeros4), "bytes [0, 4] at the end of the data section (4 bytes) belong to no tensor"},
        // Metadata.
        {safetensors_bytes(R"({"__metadata__":[1]})", ""), "__metadata__ is an array, not an object"},
        {safetensors_bytes(R"({"__metadata__":{"k":1}})", ""), "__metadata__ 'k' is 1, not a string"},
        {safetensors_bytes(R"({"__metadata__":{"k":"a","k":"b"}})", ""), "__metadata__ has the key 'k' twice"},
        {safetensors_bytes(R"({"__metadata__":{},"__metadata__":{}})", ""), "header has \"__metadata__\" twice"},
    };
    for (const Case& c : cases) {
        write_bytes(path, c.bytes);
        // The message starts with the path and contains the expected text.
        CHECK_THROWS_WITH_AS(SafetensorsFile::open(path), doctest::Contains(c.expected.c_str()), std::runtime_error);
        std::string message = open_error(path);
        INFO("message: " << message);
        CHECK(message.rfind(path + ": ", 0) == 0);
    }
    // One whole message, checked word for word.
    write_bytes(path, safetensors_bytes(one("x.weight", "[4,6]", "[0,96]"), zeros64));
    const std::string expected = path + ": tensor 'x.weight': data_offsets [0, 96] past the end of the data (64 bytes)";
    CHECK_THROWS_WITH_AS(SafetensorsFile::open(path), expected.c_str(), std::runtime_error);
}

TEST_CASE("safetensors: missing files and directories are reported, not crashed on") {
    TempDir dir;
    CHECK_THROWS_WITH_AS(SafetensorsFile::open(dir.file("missing.safetensors")),
                         (dir.file("missing.safetensors") + ": cannot open: No such file or directory").c_str(),
                         std::runtime_error);
    CHECK_THROWS_WITH_AS(SafetensorsFile::open(dir.path), (dir.path + ": not a regular file").c_str(),
                         std::runtime_error);
}

TEST_CASE("safetensors: every truncation and many corruptions of a valid file are handled without crashing") {
    TempDir dir;
    const std::string good_path = dir.file("good.safetensors"), path = dir.file("damaged.safetensors");
    const float w[3] = {1, 2, 3};
    const int32_t ids[2] = {4, 5};
    write_safetensors(good_path, {{"w", DType::F32, {3}, w}, {"ids", DType::I32, {2}, ids}}, {{"k", "v"}});
    std::vector<uint8_t> good = read_file_bytes(good_path);
    std::string bytes(good.begin(), good.end());
    REQUIRE_NOTHROW(SafetensorsFile::open(good_path));

    // Every proper prefix loses data, so each must be rejected.
    for (size_t n = 0; n < bytes.size(); n++) {
        write_bytes(path, bytes.substr(0, n));
        CHECK_THROWS_AS(SafetensorsFile::open(path), std::runtime_error);
    }
    // Corrupt each byte of the length and the header in a few ways: open either succeeds or throws
    // std::runtime_error; nothing else (no crash, no other exception type).
    const size_t header_end = 8 + (size_t)good[0];
    const char replacements[] = {'\0', '\x7F', '\xFF', '"', '}', '9', '-', ' '};
    size_t rejected = 0;
    for (size_t i = 0; i < header_end; i++) {
        for (char r : replacements) {
            std::string damaged = bytes;
            damaged[i] = r;
            write_bytes(path, damaged);
            try {
                SafetensorsFile file = SafetensorsFile::open(path);
                for (const SafeTensor& t : file.tensors()) CHECK(t.end <= file.data_size());
            } catch (const std::runtime_error& e) {
                rejected++;
                CHECK(std::string(e.what()).rfind(path + ": ", 0) == 0);
            }
        }
    }
    CHECK(rejected > 0);
}

TEST_CASE("safetensors: the writer rejects bad input and leaves no temp file behind") {
    TempDir dir;
    const std::string path = dir.file("out.safetensors");
    const float x[2] = {1, 2};
    CHECK_THROWS_WITH_AS(write_safetensors(path, {{"a", DType::F32, {2}, x}, {"a", DType::F32, {2}, x}}, {}),
                         (path + ": tensor 'a': duplicate name").c_str(), std::runtime_error);
    CHECK_THROWS_WITH_AS(write_safetensors(path, {{"a", DType::F32, {-2}, x}}, {}),
                         (path + ": tensor 'a': shape [-2] has a negative dimension").c_str(), std::runtime_error);
    CHECK_THROWS_WITH_AS(write_safetensors(path, {{"__metadata__", DType::F32, {2}, x}}, {}),
                         doctest::Contains("tensor '__metadata__': the name is reserved"), std::runtime_error);
    CHECK_THROWS_WITH_AS(write_safetensors(path, {{"a", DType::F32, {2}, nullptr}}, {}),
                         (path + ": tensor 'a': data is null").c_str(), std::runtime_error);
    CHECK(dir.entries().size() == 0);

    // The directory does not exist: the temp file cannot be created.
    const std::string nowhere = dir.file("no/such/dir/out.safetensors");
    CHECK_THROWS_WITH_AS(write_safetensors(nowhere, {{"a", DType::F32, {2}, x}}, {}),
                         doctest::Contains((nowhere + ": cannot create").c_str()), std::runtime_error);

    // The target is a directory: everything is written, the rename fails, and the temp file must go.
    const std::string target = dir.file("a_directory");
    REQUIRE(std::filesystem::create_directory(target));
    CHECK_THROWS_WITH_AS(write_safetensors(target, {{"a", DType::F32, {2}, x}}, {}),
                         doctest::Contains((target + ": cannot rename the temp file over it").c_str()),
                         std::runtime_error);
    CHECK(dir.entries().size() == 1);  // just the directory

    // Names and metadata that need JSON escaping survive the round trip.
    const std::string odd = "we\"ird\\na\tme\x01";
    write_safetensors(path, {{odd, DType::F32, {2}, x}}, {{"k\"\n", "v\\\x1F"}});
    SafetensorsFile file = SafetensorsFile::open(path);
    CHECK(file.read_f32(odd) == std::vector<float>{1.0f, 2.0f});
    CHECK(file.metadata().at("k\"\n") == "v\\\x1F");
}

TEST_CASE("safetensors: the file handle is move-only") {
    static_assert(!std::is_copy_constructible_v<SafetensorsFile>, "a mapping must have one owner");
    static_assert(!std::is_copy_assignable_v<SafetensorsFile>, "a mapping must have one owner");
    static_assert(std::is_nothrow_move_constructible_v<SafetensorsFile>, "moves must not throw");
    TempDir dir;
    const float x[2] = {1, 2}, y[1] = {3};
    write_safetensors(dir.file("x.safetensors"), {{"x", DType::F32, {2}, x}}, {});
    write_safetensors(dir.file("y.safetensors"), {{"y", DType::F32, {1}, y}}, {});
    SafetensorsFile a = SafetensorsFile::open(dir.file("x.safetensors"));
    SafetensorsFile b = std::move(a);
    CHECK(b.read_f32("x") == std::vector<float>{1.0f, 2.0f});
    CHECK(a.tensors().empty());  // NOLINT(bugprone-use-after-move): a moved-from handle is empty
    b = SafetensorsFile::open(dir.file("y.safetensors"));  // the old mapping is released
    CHECK(b.read_f32("y") == std::vector<float>{3.0f});
    CHECK(b.find("x") == nullptr);
}
