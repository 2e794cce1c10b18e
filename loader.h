// loader.h: the file formats blocktf reads and writes, header-only, host code.
// defines: JsonValue, parse_json                         (section 1: JSON, RFC 8259)
//          bf16_to_float, float_to_bf16, f16_to_float     (section 2: 16-bit float conversions)
//          DType, dtype_size, dtype_name, dtype_from_name (section 3: safetensors element types)
//          SafeTensor, SafetensorsFile                    (section 4: safetensors reader, mmapped)
//          TensorToWrite, write_safetensors               (section 5: safetensors writer, atomic)
//          TokenShard                                     (section 6: Megatron .bin/.idx token shards, mmapped)
//          SampleOptions, SampleLoader, LoaderPosition,   (section 7: training samples, SPEC 3.5 and 10.4)
//          block_left_pad, validation_start
//          ShardStats, shard_stats, check_data            (section 8: shard statistics, ./train --check-data)
//          ShardWriter                                    (section 9: shard writer, atomic)
//
// Every error is a std::runtime_error whose message names the file (when there is one) and what is
// wrong. No input bytes, however malformed, make these functions crash or read out of bounds.
// Helpers that are not part of the API live in namespace loader_detail, out of the other headers' way.
#pragma once
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// safetensors and Megatron data are little-endian and read with memcpy; a big-endian host would need byte swaps.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "loader.h assumes a little-endian host");

// ============================================================================================
// Section 1: JSON (RFC 8259)
// ============================================================================================

// Deeper nesting than this is rejected, so a hostile file cannot overflow the parser's stack.
constexpr size_t JSON_MAX_DEPTH = 512;

// Integers up to 2^53 are exact in a double; as_int64() refuses anything beyond, which may have been rounded.
constexpr double JSON_MAX_EXACT_INTEGER = 9007199254740992.0;  // 2^53

struct JsonValue {
    enum class Type { Null, Bool, Number, String, Array, Object };
    Type type = Type::Null;
    bool boolean = false;
    double number = 0.0;
    std::string string;                                       // Type::String, UTF-8, escapes decoded
    std::vector<JsonValue> items;                             // Type::Array
    std::vector<std::pair<std::string, JsonValue>> members;   // Type::Object, in file order

    // Object member (the first one, if a key repeats), or nullptr; also nullptr if this is not an object.
    const JsonValue* find(std::string_view key) const;
    // Object member; throws "JSON: missing key 'k'" (or a type error if this is not an object).
    const JsonValue& at(std::string_view key) const;

    // Typed accessors: each throws "JSON: expected <type>, got <what>" on the wrong type.
    bool as_bool() const;
    double as_number() const;
    int64_t as_int64() const;  // a Number that is an integer with |x| <= 2^53
    const std::string& as_string() const;
    const std::vector<JsonValue>& as_array() const;
    const std::vector<std::pair<std::string, JsonValue>>& as_object() const;
};

inline JsonValue parse_json(std::string_view text);  // throws std::runtime_error("JSON: <what> at byte <offset>")

inline const char* json_type_name(JsonValue::Type type) {
    switch (type) {
        case JsonValue::Type::Null: return "null";
        case JsonValue::Type::Bool: return "a boolean";
        case JsonValue::Type::Number: return "a number";
        case JsonValue::Type::String: return "a string";
        case JsonValue::Type::Array: return "an array";
        case JsonValue::Type::Object: return "an object";
    }
    return "an unknown type";
}

// A short description of a value for error messages: numbers and strings by value, the rest by type.
inline std::string json_brief(const JsonValue& value) {
    if (value.type == JsonValue::Type::Number) {
        char buf[32];
        std::snprintf(buf, sizeof(buf), "%.17g", value.number);
        return buf;
    }
    if (value.type == JsonValue::Type::String) {
        const size_t max_shown = 40;
        if (value.string.size() <= max_shown) return "\"" + value.string + "\"";
        return "\"" + value.string.substr(0, max_shown) + "...\"";
    }
    if (value.type == JsonValue::Type::Bool) return value.boolean ? "true" : "false";
    return json_type_name(value.type);
}

namespace loader_detail {

inline void json_expect_type(const JsonValue& value, JsonValue::Type type) {
    if (value.type != type)
        throw std::runtime_error(std::string("JSON: expected ") + json_type_name(type) + ", got " + json_brief(value));
}

}  // namespace loader_detail

inline const JsonValue* JsonValue::find(std::string_view key) const {
    if (type != Type::Object) return nullptr;
    for (const auto& member : members)
        if (member.first == key) return &member.second;
    return nullptr;
}

inline const JsonValue& JsonValue::at(std::string_view key) const {
    loader_detail::json_expect_type(*this, Type::Object);
    const JsonValue* value = find(key);
    if (!value) throw std::runtime_error("JSON: missing key '" + std::string(key) + "'");
    return *value;
}

inline bool JsonValue::as_bool() const {
    loader_detail::json_expect_type(*this, Type::Bool);
    return boolean;
}
inline double JsonValue::as_number() const {
    loader_detail::json_expect_type(*this, Type::Number);
    return number;
}
inline const std::string& JsonValue::as_string() const {
    loader_detail::json_expect_type(*this, Type::String);
    return string;
}
inline const std::vector<JsonValue>& JsonValue::as_array() const {
    loader_detail::json_expect_type(*this, Type::Array);
    return items;
}
inline const std::vector<std::pair<std::string, JsonValue>>& JsonValue::as_object() const {
    loader_detail::json_expect_type(*this, Type::Object);
    return members;
}

inline int64_t JsonValue::as_int64() const {
    loader_detail::json_expect_type(*this, Type::Number);
    if (number != std::floor(number))  // NaN fails here and inf below; neither comes out of parse_json
        throw std::runtime_error("JSON: expected an integer, got " + json_brief(*this));
    if (std::fabs(number) > JSON_MAX_EXACT_INTEGER)
        throw std::runtime_error("JSON: integer " + json_brief(*this) + " is too large to be exact (|x| <= 2^53)");
    return (int64_t)number;
}

namespace loader_detail {

// Recursive-descent parser over one text. pos_ is the byte offset of the next unread character.
class JsonParser {
public:
    explicit JsonParser(std::string_view text) : text_(text) {}

    JsonValue parse_document() {
        JsonValue value = parse_value();
        skip_whitespace();
        if (pos_ != text_.size()) fail("trailing characters after the JSON value", pos_);
        return value;
    }

private:
    std::string_view text_;
    size_t pos_ = 0;
    size_t depth_ = 0;  // arrays and objects currently open

    [[noreturn]] void fail(const std::string& what, size_t offset) const {
        throw std::runtime_error("JSON: " + what + " at byte " + std::to_string(offset));
    }

    bool at_end() const { return pos_ >= text_.size(); }
    char peek() const { return text_[pos_]; }  // only when !at_end()

    // "'x'" for a printable character, "byte 0x01" otherwise, "end of input" past the end.
    std::string describe_current() const {
        if (at_end()) return "end of input";
        unsigned char c = (unsigned char)peek();
        if (c >= 0x20 && c < 0x7F) return std::string("'") + (char)c + "'";
        char buf[16];
        std::snprintf(buf, sizeof(buf), "byte 0x%02X", c);
        return buf;
    }

    void skip_whitespace() {
        while (!at_end()) {
            char c = peek();
            if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
            pos_++;
        }
    }

    void expect(char c) {
        if (at_end() || peek() != c) fail(std::string("expected '") + c + "', found " + describe_current(), pos_);
        pos_++;
    }

    JsonValue parse_value() {
        skip_whitespace();
        if (at_end()) fail("unexpected end of input, expected a value", pos_);
        char c = peek();
        if (c == '{') return parse_object();
        if (c == '[') return parse_array();
        if (c == '"') {
            JsonValue value;
            value.type = JsonValue::Type::String;
            value.string = parse_string();
            return value;
        }
        if (c == 't') return parse_literal("true");
        if (c == 'f') return parse_literal("false");
        if (c == 'n') return parse_literal("null");
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        fail("unexpected " + describe_current() + ", expected a value", pos_);
    }

    void enter_container() {
        if (++depth_ > JSON_MAX_DEPTH)
            fail("nesting deeper than " + std::to_string(JSON_MAX_DEPTH) + " levels", pos_);
        pos_++;  // past '{' or '['
    }

    JsonValue parse_object() {
        enter_container();
        JsonValue object;
        object.type = JsonValue::Type::Object;
        skip_whitespace();
        if (!at_end() && peek() == '}') { pos_++; depth_--; return object; }
        while (true) {
            skip_whitespace();
            if (at_end() || peek() != '"') {
                if (!at_end() && peek() == '}' && !object.members.empty()) fail("trailing comma before '}'", pos_);
                fail("expected a string key, found " + describe_current(), pos_);
            }
            std::string key = parse_string();
            skip_whitespace();
            expect(':');
            JsonValue value = parse_value();
            object.members.emplace_back(std::move(key), std::move(value));
            skip_whitespace();
            if (!at_end() && peek() == ',') { pos_++; continue; }
            if (!at_end() && peek() == '}') { pos_++; break; }
            fail("expected ',' or '}' in object, found " + describe_current(), pos_);
        }
        depth_--;
        return object;
    }

    JsonValue parse_array() {
        enter_container();
        JsonValue array;
        array.type = JsonValue::Type::Array;
        skip_whitespace();
        if (!at_end() && peek() == ']') { pos_++; depth_--; return array; }
        while (true) {
            skip_whitespace();
            if (!at_end() && peek() == ']') fail("trailing comma before ']'", pos_);
            array.items.push_back(parse_value());
            skip_whitespace();
            if (!at_end() && peek() == ',') { pos_++; continue; }
            if (!at_end() && peek() == ']') { pos_++; break; }
            fail("expected ',' or ']' in array, found " + describe_current(), pos_);
        }
        depth_--;
        return array;
    }

    JsonValue parse_literal(std::string_view word) {
        if (text_.substr(pos_, word.size()) != word)
            fail("invalid literal, expected '" + std::string(word) + "'", pos_);
        pos_ += word.size();
        JsonValue value;
        if (word == "null") return value;
        value.type = JsonValue::Type::Bool;
        value.boolean = (word == "true");
        return value;
    }

    bool at_digit() const { return !at_end() && peek() >= '0' && peek() <= '9'; }

    void skip_digits() {
        while (at_digit()) pos_++;
    }

    // number = [ "-" ] ( "0" / [1-9] *DIGIT ) [ "." 1*DIGIT ] [ ( "e" / "E" ) [ "+" / "-" ] 1*DIGIT ]
    JsonValue parse_number() {
        const size_t start = pos_;
        if (peek() == '-') pos_++;
        if (!at_digit()) fail("expected a digit after '-'", pos_);
        if (peek() == '0') {
            pos_++;
            if (at_digit()) fail("leading zero in number", start);
        } else {
            skip_digits();
        }
        if (!at_end() && peek() == '.') {
            pos_++;
            if (!at_digit()) fail("expected a digit after the decimal point", pos_);
            skip_digits();
        }
        if (!at_end() && (peek() == 'e' || peek() == 'E')) {
            pos_++;
            if (!at_end() && (peek() == '+' || peek() == '-')) pos_++;
            if (!at_digit()) fail("expected a digit in the exponent", pos_);
            skip_digits();
        }
        JsonValue value;
        value.type = JsonValue::Type::Number;
        // from_chars is locale-independent and accepts every token the grammar above lets through.
        const char* first = text_.data() + start;
        const char* last = text_.data() + pos_;
        std::from_chars_result result = std::from_chars(first, last, value.number);
        if (result.ec == std::errc::result_out_of_range) fail("number out of the range of a double", start);
        if (result.ec != std::errc() || result.ptr != last) fail("malformed number", start);
        return value;
    }

    // Four hex digits of a \u escape, as a code unit.
    uint32_t parse_hex4() {
        if (text_.size() - pos_ < 4) fail("truncated \\u escape", pos_);
        uint32_t unit = 0;
        for (size_t i = 0; i < 4; i++) {
            char c = text_[pos_ + i];
            uint32_t digit;
            if (c >= '0' && c <= '9') digit = (uint32_t)(c - '0');
            else if (c >= 'a' && c <= 'f') digit = (uint32_t)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') digit = (uint32_t)(c - 'A' + 10);
            else fail("invalid hex digit in \\u escape", pos_ + i);
            unit = unit * 16 + digit;
        }
        pos_ += 4;
        return unit;
    }

    static void append_utf8(std::string& out, uint32_t code_point) {
        if (code_point < 0x80) {
            out += (char)code_point;
        } else if (code_point < 0x800) {
            out += (char)(0xC0 | (code_point >> 6));
            out += (char)(0x80 | (code_point & 0x3F));
        } else if (code_point < 0x10000) {
            out += (char)(0xE0 | (code_point >> 12));
            out += (char)(0x80 | ((code_point >> 6) & 0x3F));
            out += (char)(0x80 | (code_point & 0x3F));
        } else {
            out += (char)(0xF0 | (code_point >> 18));
            out += (char)(0x80 | ((code_point >> 12) & 0x3F));
            out += (char)(0x80 | ((code_point >> 6) & 0x3F));
            out += (char)(0x80 | (code_point & 0x3F));
        }
    }

    // A \uXXXX escape (pos_ just past the 'u'), joining a surrogate pair into one code point.
    uint32_t parse_unicode_escape() {
        const size_t escape_start = pos_ - 2;  // the backslash
        uint32_t unit = parse_hex4();
        if (unit >= 0xDC00 && unit <= 0xDFFF) fail("lone low surrogate in \\u escape", escape_start);
        if (unit < 0xD800 || unit > 0xDBFF) return unit;
        if (text_.substr(pos_, 2) != "\\u") fail("high surrogate not followed by a \\u low surrogate", escape_start);
        pos_ += 2;
        uint32_t low = parse_hex4();
        if (low < 0xDC00 || low > 0xDFFF) fail("high surrogate not followed by a low surrogate", escape_start);
        return 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
    }

    void parse_escape(std::string& out) {
        pos_++;  // past the backslash
        if (at_end()) fail("unterminated escape sequence", pos_ - 1);
        char c = text_[pos_++];
        switch (c) {
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u': append_utf8(out, parse_unicode_escape()); break;
            default: {
                pos_--;  // back onto the bad character
                bool printable = (unsigned char)c >= 0x20 && (unsigned char)c < 0x7F;
                fail(printable ? std::string("invalid escape '\\") + c + "'" : "invalid escape, " + describe_current(),
                     pos_ - 1);
            }
        }
    }

    // A string starting at the opening quote; returns its decoded UTF-8 bytes. Bytes >= 0x80 pass through.
    std::string parse_string() {
        const size_t start = pos_;
        pos_++;  // past the opening quote
        std::string out;
        while (true) {
            // Copy the longest run of plain characters in one go; this is the hot loop for big files.
            size_t run = pos_;
            while (run < text_.size()) {
                unsigned char c = (unsigned char)text_[run];
                if (c == '"' || c == '\\' || c < 0x20) break;
                run++;
            }
            out.append(text_.data() + pos_, run - pos_);
            pos_ = run;
            if (at_end()) fail("unterminated string", start);
            unsigned char c = (unsigned char)peek();
            if (c == '"') { pos_++; return out; }
            if (c == '\\') { parse_escape(out); continue; }
            char buf[64];
            std::snprintf(buf, sizeof(buf), "raw control character 0x%02X in string", c);
            fail(buf, pos_);
        }
    }
};

}  // namespace loader_detail

inline JsonValue parse_json(std::string_view text) { return loader_detail::JsonParser(text).parse_document(); }

// ============================================================================================
// Section 2: 16-bit float conversions (bit patterns in uint16_t, values in float)
// ============================================================================================

// bf16 is the top half of a float32: same sign and 8-bit exponent, mantissa cut from 23 to 7 bits.
inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
}

// Round to nearest, ties to even. Overflow rounds to inf as IEEE requires; NaN stays NaN (quiet bit set,
// so a NaN whose payload lives only in the dropped low bits does not turn into inf).
inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((bits >> 16) | 0x0040u);
    uint32_t lsb = (bits >> 16) & 1u;          // the kept bit that decides a tie
    uint32_t rounded = bits + 0x7FFFu + lsb;   // carries into the kept half when above (or at an odd) midpoint
    return (uint16_t)(rounded >> 16);
}

// IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float f16_to_float(uint16_t bits) {
    uint32_t sign = (uint32_t)(bits >> 15) << 31;
    uint32_t exponent = (bits >> 10) & 0x1Fu;
    uint32_t mantissa = bits & 0x3FFu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
        float magnitude = std::ldexp((float)mantissa, -24);
        return sign ? -magnitude : magnitude;
    }
    uint32_t wide;
    if (exponent == 0x1F) wide = sign | 0x7F800000u | (mantissa << 13);  // inf or NaN (payload kept)
    else wide = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
}

// ============================================================================================
// Section 3: safetensors element types
// ============================================================================================

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

namespace loader_detail {

// One table: the dtype, its name in a safetensors header, its size in bytes.
struct DTypeInfo { DType dtype; const char* name; size_t size; };
inline constexpr DTypeInfo DTYPE_TABLE[] = {
    {DType::F64, "F64", 8}, {DType::F32, "F32", 4}, {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},
    {DType::I64, "I64", 8}, {DType::I32, "I32", 4}, {DType::I16, "I16", 2}, {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1},
};

inline const DTypeInfo& dtype_info(DType dtype) {
    for (const DTypeInfo& info : DTYPE_TABLE)
        if (info.dtype == dtype) return info;
    throw std::runtime_error("invalid DType value " + std::to_string((int)dtype));
}

}  // namespace loader_detail

inline size_t dtype_size(DType dtype) { return loader_detail::dtype_info(dtype).size; }
inline const char* dtype_name(DType dtype) { return loader_detail::dtype_info(dtype).name; }

// Returns false for a name not in the table.
inline bool dtype_from_name(std::string_view name, DType* out) {
    for (const loader_detail::DTypeInfo& info : loader_detail::DTYPE_TABLE)
        if (name == info.name) { *out = info.dtype; return true; }
    return false;
}

// ============================================================================================
// Section 4: safetensors reader
// ============================================================================================
// File layout: [8 bytes: N, little-endian uint64][N bytes: JSON header][data section]
// Header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {k: v}}
// Offsets are relative to the data section, data is little-endian row-major, and the tensors must cover the
// data section exactly (no overlaps, no holes).

// The header length is a user-controlled number; anything beyond this is not a real safetensors file.
constexpr size_t SAFETENSORS_MAX_HEADER = 100000000;  // 100 MB, MAX_HEADER_SIZE of the safetensors library

struct SafeTensor {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    size_t begin = 0, end = 0;  // byte range [begin, end) within the data section
    size_t numel() const {
        size_t n = 1;
        for (int64_t dim : shape) n *= (size_t)dim;
        return n;
    }
};

namespace loader_detail {

inline std::string format_shape(const std::vector<int64_t>& shape) {
    std::string out = "[";
    for (size_t i = 0; i < shape.size(); i++) out += (i ? ", " : "") + std::to_string(shape[i]);
    return out + "]";
}

inline std::string format_range(size_t begin, size_t end) {
    return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// Multiplies the dims of a shape, or returns false if the element count does not fit in size_t.
inline bool checked_numel(const std::vector<int64_t>& shape, size_t* out) {
    size_t n = 1;
    for (int64_t dim : shape) if (dim == 0) { *out = 0; return true; }
    for (int64_t dim : shape) {
        if (n > std::numeric_limits<size_t>::max() / (size_t)dim) return false;
        n *= (size_t)dim;
    }
    *out = n;
    return true;
}

// A JSON number that is a non-negative integer (at most 2^53, so it was parsed exactly), or false.
inline bool json_to_size(const JsonValue& value, size_t* out) {
    if (value.type != JsonValue::Type::Number) return false;
    double x = value.number;
    if (x < 0 || x != std::floor(x) || x > JSON_MAX_EXACT_INTEGER) return false;
    *out = (size_t)x;
    return true;
}

// One header entry -> SafeTensor, checked against the data section size. Messages start with the tensor name.
inline SafeTensor parse_tensor_entry(const std::string& name, const JsonValue& entry, size_t data_size) {
    const std::string where = "tensor '" + name + "': ";
    if (entry.type != JsonValue::Type::Object)
        throw std::runtime_error(where + "entry is " + json_brief(entry) + ", not an object");
    SafeTensor t;
    t.name = name;

    const JsonValue* dtype = entry.find("dtype");
    if (!dtype) throw std::runtime_error(where + "missing \"dtype\"");
    if (dtype->type != JsonValue::Type::String)
        throw std::runtime_error(where + "dtype is " + json_brief(*dtype) + ", not a string");
    if (!dtype_from_name(dtype->string, &t.dtype))
        throw std::runtime_error(where + "unknown dtype '" + dtype->string + "'");

    const JsonValue* shape = entry.find("shape");
    if (!shape) throw std::runtime_error(where + "missing \"shape\"");
    if (shape->type != JsonValue::Type::Array)
        throw std::runtime_error(where + "shape is " + json_brief(*shape) + ", not an array");
    for (size_t i = 0; i < shape->items.size(); i++) {
        size_t dim;
        if (!json_to_size(shape->items[i], &dim))
            throw std::runtime_error(where + "shape[" + std::to_string(i) + "] = " + json_brief(shape->items[i]) +
                                     " is not a non-negative integer");
        t.shape.push_back((int64_t)dim);
    }

    const JsonValue* offsets = entry.find("data_offsets");
    if (!offsets) throw std::runtime_error(where + "missing \"data_offsets\"");
    if (offsets->type != JsonValue::Type::Array || offsets->items.size() != 2 ||
        !json_to_size(offsets->items[0], &t.begin) || !json_to_size(offsets->items[1], &t.end))
        throw std::runtime_error(where + "data_offsets must be an array of two non-negative integers");
    if (t.begin > t.end)
        throw std::runtime_error(where + "data_offsets " + format_range(t.begin, t.end) + " have begin > end");
    if (t.end > data_size)
        throw std::runtime_error(where + "data_offsets " + format_range(t.begin, t.end) +
                                 " past the end of the data (" + std::to_string(data_size) + " bytes)");

    size_t numel;
    const size_t itemsize = dtype_size(t.dtype);
    if (!checked_numel(t.shape, &numel) || numel > std::numeric_limits<size_t>::max() / itemsize)
        throw std::runtime_error(where + "shape " + format_shape(t.shape) + " has too many elements");
    if (t.end - t.begin != numel * itemsize)
        throw std::runtime_error(where + "data_offsets " + format_range(t.begin, t.end) + " hold " +
                                 std::to_string(t.end - t.begin) + " bytes but shape " + format_shape(t.shape) +
                                 " of " + dtype_name(t.dtype) + " needs " + std::to_string(numel * itemsize));
    return t;
}

// "__metadata__": an object of string -> string.
inline std::map<std::string, std::string> parse_metadata(const JsonValue& value) {
    if (value.type != JsonValue::Type::Object)
        throw std::runtime_error("__metadata__ is " + json_brief(value) + ", not an object");
    std::map<std::string, std::string> metadata;
    for (const auto& [key, v] : value.members) {
        if (v.type != JsonValue::Type::String)
            throw std::runtime_error("__metadata__ '" + key + "' is " + json_brief(v) + ", not a string");
        if (!metadata.emplace(key, v.string).second)
            throw std::runtime_error("__metadata__ has the key '" + key + "' twice");
    }
    return metadata;
}

// The tensors, sorted by offset, must tile [0, data_size) exactly. Zero-byte tensors may sit at any boundary.
inline void check_coverage(const std::vector<SafeTensor>& tensors, size_t data_size) {
    std::vector<const SafeTensor*> sorted;
    for (const SafeTensor& t : tensors) sorted.push_back(&t);
    std::sort(sorted.begin(), sorted.end(), [](const SafeTensor* a, const SafeTensor* b) {
        return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    size_t covered = 0;  // bytes [0, covered) belong to the tensors seen so far
    const SafeTensor* previous = nullptr;
    for (const SafeTensor* t : sorted) {
        const std::string where = "tensor '" + t->name + "': data_offsets " + format_range(t->begin, t->end);
        if (t->begin < covered)
            throw std::runtime_error(where + " overlap tensor '" + previous->name + "' " +
                                     format_range(previous->begin, previous->end));
        if (t->begin > covered)
            throw std::runtime_error(where + " leave a hole: bytes " + format_range(covered, t->begin) +
                                     " of the data section belong to no tensor");
        covered = t->end;
        previous = t;
    }
    if (covered != data_size)
        throw std::runtime_error("bytes " + format_range(covered, data_size) + " at the end of the data section (" +
                                 std::to_string(data_size) + " bytes) belong to no tensor" +
                                 (previous ? " (the last tensor is '" + previous->name + "')" : std::string()));
}

}  // namespace loader_detail

// Memory-maps a .safetensors file read-only and validates its header on open. Move-only; unmaps on destruction.
// Note: like any mmap reader, a file truncated by another process while mapped can raise SIGBUS.
class SafetensorsFile {
public:
    static SafetensorsFile open(const std::string& path) {
        SafetensorsFile file;
        file.path_ = path;
        file.map_whole_file();
        try {
            file.parse_header();
        } catch (const std::runtime_error& e) {
            throw std::runtime_error(path + ": " + e.what());
        }
        return file;
    }

    SafetensorsFile(SafetensorsFile&& other) noexcept { *this = std::move(other); }
    SafetensorsFile& operator=(SafetensorsFile&& other) noexcept {
        if (this != &other) {
            unmap();
            path_ = std::move(other.path_);
            tensors_ = std::move(other.tensors_);
            metadata_ = std::move(other.metadata_);
            index_ = std::move(other.index_);
            map_ = std::exchange(other.map_, nullptr);
            map_size_ = std::exchange(other.map_size_, 0);
            data_ = std::exchange(other.data_, nullptr);
            data_size_ = std::exchange(other.data_size_, 0);
        }
        return *this;
    }
    SafetensorsFile(const SafetensorsFile&) = delete;
    SafetensorsFile& operator=(const SafetensorsFile&) = delete;
    ~SafetensorsFile() { unmap(); }

    const std::string& path() const { return path_; }
    const std::vector<SafeTensor>& tensors() const { return tensors_; }  // in header order
    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    size_t data_size() const { return data_size_; }

    const SafeTensor* find(const std::string& name) const {
        auto it = index_.find(name);
        return it == index_.end() ? nullptr : &tensors_[it->second];
    }

    const SafeTensor& get(const std::string& name) const {
        const SafeTensor* t = find(name);
        if (!t) throw std::runtime_error(path_ + ": no tensor named '" + name + "'");
        return *t;
    }

    // The tensor's raw little-endian bytes (end - begin of them); no alignment is guaranteed.
    const uint8_t* bytes(const SafeTensor& t) const {
        if (t.begin > t.end || t.end > data_size_)
            throw std::runtime_error(path_ + ": tensor '" + t.name + "': data_offsets " +
                                     loader_detail::format_range(t.begin, t.end) +
                                     " are not inside this file's data section");
        return data_ + t.begin;
    }

    // F32 as is; BF16, F16 and F64 converted (F64 rounds to nearest float). Integer dtypes throw.
    std::vector<float> read_f32(const std::string& name) const {
        const SafeTensor& t = get(name);
        const uint8_t* src = bytes(t);
        std::vector<float> out(t.numel());
        const size_t n = out.size();
        switch (t.dtype) {
            case DType::F32: if (n > 0) std::memcpy(out.data(), src, n * sizeof(float)); break;
            case DType::BF16: for (size_t i = 0; i < n; i++) out[i] = bf16_to_float(load<uint16_t>(src, i)); break;
            case DType::F16: for (size_t i = 0; i < n; i++) out[i] = f16_to_float(load<uint16_t>(src, i)); break;
            case DType::F64: for (size_t i = 0; i < n; i++) out[i] = (float)load<double>(src, i); break;
            default: throw wrong_dtype(t, "read_f32", "F32, BF16, F16 or F64");
        }
        return out;
    }

    // I32 as is; I64 converted, throwing on a value outside the int32 range. Float dtypes throw.
    std::vector<int32_t> read_i32(const std::string& name) const {
        const SafeTensor& t = get(name);
        const uint8_t* src = bytes(t);
        std::vector<int32_t> out(t.numel());
        if (t.dtype == DType::I32) {
            if (!out.empty()) std::memcpy(out.data(), src, out.size() * sizeof(int32_t));
        } else if (t.dtype == DType::I64) {
            for (size_t i = 0; i < out.size(); i++) {
                int64_t v = load<int64_t>(src, i);
                if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
                    throw std::runtime_error(path_ + ": tensor '" + name + "': element " + std::to_string(i) + " = " +
                                             std::to_string(v) + " does not fit in int32");
                out[i] = (int32_t)v;
            }
        } else {
            throw wrong_dtype(t, "read_i32", "I32 or I64");
        }
        return out;
    }

private:
    SafetensorsFile() = default;

    std::string path_;
    const uint8_t* map_ = nullptr;   // the whole file, map_size_ bytes
    size_t map_size_ = 0;
    const uint8_t* data_ = nullptr;  // the data section, data_size_ bytes (points into map_)
    size_t data_size_ = 0;
    std::vector<SafeTensor> tensors_;
    std::map<std::string, std::string> metadata_;
    std::map<std::string, size_t> index_;  // name -> position in tensors_

    // Element i of type T at src, which may be unaligned.
    template <typename T>
    static T load(const uint8_t* src, size_t i) {
        T value;
        std::memcpy(&value, src + i * sizeof(T), sizeof(T));
        return value;
    }

    std::runtime_error wrong_dtype(const SafeTensor& t, const char* reader, const char* accepted) const {
        return std::runtime_error(path_ + ": tensor '" + t.name + "': " + reader + " cannot read dtype " +
                                  dtype_name(t.dtype) + " (it reads " + accepted + ")");
    }

    void unmap() {
        if (map_) munmap((void*)map_, map_size_);
        map_ = nullptr;
        map_size_ = 0;
    }

    [[noreturn]] void fail_errno(const char* what) const {
        throw std::runtime_error(path_ + ": " + what + ": " + std::strerror(errno));
    }

    // Maps the file; errors here name the file themselves.
    void map_whole_file() {
        int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) fail_errno("cannot open");
        struct stat st;
        if (fstat(fd, &st) != 0) { int err = errno; ::close(fd); errno = err; fail_errno("cannot stat"); }
        if (!S_ISREG(st.st_mode)) { ::close(fd); throw std::runtime_error(path_ + ": not a regular file"); }
        const size_t size = (size_t)st.st_size;
        if (size < 8) {
            ::close(fd);
            throw std::runtime_error(path_ + ": file is " + std::to_string(size) +
                                     " bytes, shorter than the 8-byte header length; not a safetensors file");
        }
        void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
        int err = errno;
        ::close(fd);  // the mapping stays valid without the descriptor
        if (p == MAP_FAILED) { errno = err; fail_errno("cannot mmap"); }
        map_ = (const uint8_t*)p;
        map_size_ = size;
    }

    // Header length, JSON header, tensors and metadata; messages are prefixed with the path by open().
    void parse_header() {
        uint64_t header_size = 0;
        for (int i = 7; i >= 0; i--) header_size = (header_size << 8) | map_[i];  // little-endian
        const size_t file_size = map_size_;
        if (header_size == 0) throw std::runtime_error("header length is 0");
        if (header_size > SAFETENSORS_MAX_HEADER)
            throw std::runtime_error("header length " + std::to_string(header_size) + " is absurdly large (limit " +
                                     std::to_string(SAFETENSORS_MAX_HEADER) + " bytes); not a safetensors file?");
        if (header_size > file_size - 8)
            throw std::runtime_error("header length " + std::to_string(header_size) +
                                     " is past the end of the file (" + std::to_string(file_size) + " bytes)");
        data_ = map_ + 8 + header_size;
        data_size_ = file_size - 8 - (size_t)header_size;

        JsonValue header;
        try {
            header = parse_json(std::string_view((const char*)map_ + 8, (size_t)header_size));
        } catch (const std::runtime_error& e) {
            throw std::runtime_error(std::string("header is not valid JSON (") + e.what() + " of the header)");
        }
        if (header.type != JsonValue::Type::Object)
            throw std::runtime_error("header is " + json_brief(header) + ", not a JSON object");

        bool seen_metadata = false;
        for (const auto& [name, entry] : header.members) {
            if (name == "__metadata__") {
                if (seen_metadata) throw std::runtime_error("header has \"__metadata__\" twice");
                seen_metadata = true;
                metadata_ = loader_detail::parse_metadata(entry);
                continue;
            }
            if (!index_.emplace(name, tensors_.size()).second)
                throw std::runtime_error("tensor '" + name + "': duplicate name, it appears twice in the header");
            tensors_.push_back(loader_detail::parse_tensor_entry(name, entry, data_size_));
        }
        loader_detail::check_coverage(tensors_, data_size_);
    }
};

// ============================================================================================
// Section 5: safetensors writer
// ============================================================================================

struct TensorToWrite {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    const void* data;  // numel * dtype_size bytes, little-endian row-major; may be null for 0 elements
};

namespace loader_detail {

// A JSON string literal: quotes, backslashes and control characters escaped, other bytes as they are.
inline std::string json_quote(std::string_view s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '"') out += "\\\"";
        else if (c == '\\') out += "\\\\";
        else if ((unsigned char)c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\u%04x", (unsigned)(unsigned char)c);
            out += buf;
        } else out += c;
    }
    return out + "\"";
}

// Validates the tensors and returns the header JSON, padded with spaces to a multiple of 8 bytes so that the
// data section starts 8-byte aligned. Tensors are laid out back to back in the order given.
inline std::string build_safetensors_header(const std::vector<TensorToWrite>& tensors,
                                            const std::map<std::string, std::string>& metadata) {
    std::string header = "{";
    if (!metadata.empty()) {
        header += "\"__metadata__\":{";
        bool first = true;
        for (const auto& [key, value] : metadata) {
            header += (first ? "" : ",") + json_quote(key) + ":" + json_quote(value);
            first = false;
        }
        header += "}";
    }
    std::set<std::string> seen;
    size_t offset = 0;
    for (const TensorToWrite& t : tensors) {
        const std::string where = "tensor '" + t.name + "': ";
        if (t.name == "__metadata__") throw std::runtime_error(where + "the name is reserved for metadata");
        if (!seen.insert(t.name).second) throw std::runtime_error(where + "duplicate name");
        for (int64_t dim : t.shape)
            if (dim < 0)
                throw std::runtime_error(where + "shape " + format_shape(t.shape) + " has a negative dimension");
        size_t numel;
        const size_t itemsize = dtype_size(t.dtype);
        if (!checked_numel(t.shape, &numel) || numel > std::numeric_limits<size_t>::max() / itemsize)
            throw std::runtime_error(where + "shape " + format_shape(t.shape) + " has too many elements");
        if (numel > 0 && !t.data) throw std::runtime_error(where + "data is null");
        const size_t nbytes = numel * itemsize;
        std::string shape_json = "[";
        for (size_t i = 0; i < t.shape.size(); i++) shape_json += (i ? "," : "") + std::to_string(t.shape[i]);
        shape_json += "]";
        header += (header.size() > 1 ? "," : "") + json_quote(t.name) + ":{\"dtype\":\"" + dtype_name(t.dtype) +
                  "\",\"shape\":" + shape_json + ",\"data_offsets\":[" + std::to_string(offset) + "," +
                  std::to_string(offset + nbytes) + "]}";
        offset += nbytes;
    }
    header += "}";
    while (header.size() % 8 != 0) header += ' ';
    if (header.size() > SAFETENSORS_MAX_HEADER)
        throw std::runtime_error("header would be " + std::to_string(header.size()) +
                                 " bytes, more than readers accept (" + std::to_string(SAFETENSORS_MAX_HEADER) + ")");
    return header;
}

// write() until all n bytes are out, retrying on EINTR and short writes. Returns false with errno set on error.
inline bool write_all(int fd, const void* data, size_t n) {
    const uint8_t* p = (const uint8_t*)data;
    while (n > 0) {
        ssize_t written = ::write(fd, p, n);
        if (written < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        p += written;
        n -= (size_t)written;
    }
    return true;
}

// Best effort: makes the rename itself durable. A failure here does not undo a completed write.
inline void fsync_parent_directory(const std::string& path) {
    size_t slash = path.rfind('/');
    std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    (void)fsync(fd);
    ::close(fd);
}

}  // namespace loader_detail

// Atomic: writes path + ".tmp.<pid>", fsyncs it and renames it over path, so a reader sees the old file or
// the complete new one. On any failure the temp file is removed and the error thrown.
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
    std::string header;
    try {
        header = loader_detail::build_safetensors_header(tensors, metadata);
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(path + ": " + e.what());
    }
    uint8_t length_bytes[8];
    for (int i = 0; i < 8; i++) length_bytes[i] = (uint8_t)((uint64_t)header.size() >> (8 * i));  // little-endian

    const std::string tmp = path + ".tmp." + std::to_string((long)getpid());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw std::runtime_error(path + ": cannot create " + tmp + ": " + std::strerror(errno));
    auto fail = [&](const char* what) {
        int err = errno;
        if (fd >= 0) ::close(fd);
        ::unlink(tmp.c_str());
        throw std::runtime_error(path + ": " + what + ": " + std::strerror(err));
    };
    using loader_detail::write_all;
    if (!write_all(fd, length_bytes, sizeof(length_bytes)) || !write_all(fd, header.data(), header.size()))
        fail("cannot write the header");
    for (const TensorToWrite& t : tensors) {
        size_t numel = 0;
        loader_detail::checked_numel(t.shape, &numel);  // cannot fail: build_safetensors_header checked it
        if (numel > 0 && !write_all(fd, t.data, numel * dtype_size(t.dtype))) fail("cannot write tensor data");
    }
    if (fsync(fd) != 0) fail("cannot fsync");
    int closed = ::close(fd);
    fd = -1;
    if (closed != 0) fail("cannot close");
    if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename the temp file over it");
    loader_detail::fsync_parent_directory(path);
}

// ============================================================================================
// Section 6: Megatron token shards (PREFIX.bin + PREFIX.idx, "MMIDIDX" version 1): reader
// ============================================================================================
// The format Pythia's pre-tokenized Pile comes in (shared/docs/MMAP_FORMAT.md). PREFIX.idx, little-endian,
// arrays packed with no alignment (so every read goes through memcpy):
//   offset 0        9 bytes  magic "MMIDIDX\0\0"
//          9        u64      version, 1
//          17       u8       dtype code of the tokens in .bin: 8 = uint16 (Pythia), 4 = int32 (large vocabularies)
//          18       u64      N: items; one item = one document, as Megatron's preprocess_data writes them
//          26       u64      M: entries of doc_idx (N + 1 from Megatron's builder)
//          34       i32[N]   sizes: tokens of item i
//          34+4N    i64[N]   pointers: byte offset of item i in .bin
//          34+12N   i64[M]   doc_idx: item where each Megatron document starts, [0, ..., N]; not used for training
// PREFIX.bin: the tokens of every item, back to back, no header.
// Both files are memory-mapped: opening reads only the index, and a 600 GB .bin is paged in as samples touch it.

constexpr char kShardMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kShardVersion = 1;
constexpr size_t kShardHeaderBytes = 34;  // magic 9 + version 8 + dtype 1 + N 8 + M 8
constexpr uint8_t kShardUInt16 = 8;       // Megatron's code for uint16, chosen by its builder when vocab < 65500
constexpr uint8_t kShardInt32 = 4;        // Megatron's code for int32, chosen for larger vocabularies
constexpr int kShardEodId = 0;            // <|endoftext|> of the Pythia tokenizer: EOS, and the PAD id (SPEC 3.5)
constexpr int kShardCheckVocab = 50304;   // Pythia's embedding rows (model.h kPythiaVocab): larger ids cannot train

namespace loader_detail {

// Megatron's dtype codes (indexed_dataset.py `dtypes`). Only 8 and 4 hold tokens; the others are named for messages.
inline const char* shard_dtype_name(uint8_t code) {
    switch (code) {
        case 1: return "uint8";
        case 2: return "int8";
        case 3: return "int16";
        case 4: return "int32";
        case 5: return "int64";
        case 6: return "float32";
        case 7: return "float64";
        case 8: return "uint16";
        default: return nullptr;
    }
}

// Element of type T at byte p, which may be unaligned.
template <typename T>
T load_unaligned(const uint8_t* p) {
    T value;
    std::memcpy(&value, p, sizeof(T));
    return value;
}

// "1234567" -> "1,234,567", for tables people read.
inline std::string with_commas(uint64_t n) {
    std::string digits = std::to_string(n), out;
    for (size_t i = 0; i < digits.size(); i++) {
        if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
        out += digits[i];
    }
    return out;
}

inline std::string hex_bytes(const uint8_t* p, size_t n) {
    std::string out;
    char buf[4];
    for (size_t i = 0; i < n; i++) {
        std::snprintf(buf, sizeof(buf), "%02X", p[i]);
        out += (i ? " " : "") + std::string(buf);
    }
    return out;
}

// A whole file mapped read-only. Move-only. An empty file maps nothing: data() is null and size() 0.
class MappedFile {
public:
    MappedFile() = default;
    explicit MappedFile(const std::string& path) : path_(path) {
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) fail_errno("cannot open");
        struct stat st;
        if (fstat(fd, &st) != 0) { int err = errno; ::close(fd); errno = err; fail_errno("cannot stat"); }
        if (!S_ISREG(st.st_mode)) { ::close(fd); throw std::runtime_error(path_ + ": not a regular file"); }
        size_ = (size_t)st.st_size;
        if (size_ > 0) {
            void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
            int err = errno;
            ::close(fd);  // the mapping stays valid without the descriptor
            if (p == MAP_FAILED) { errno = err; fail_errno("cannot mmap"); }
            data_ = (const uint8_t*)p;
        } else {
            ::close(fd);
        }
    }
    MappedFile(MappedFile&& other) noexcept { *this = std::move(other); }
    MappedFile& operator=(MappedFile&& other) noexcept {
        if (this != &other) {
            unmap();
            path_ = std::move(other.path_);
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    ~MappedFile() { unmap(); }

    const std::string& path() const { return path_; }
    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    // A hint to the kernel about the coming access pattern (MADV_SEQUENTIAL, MADV_RANDOM); failures are harmless.
    void advise(int advice) const {
        if (data_) (void)madvise((void*)data_, size_, advice);
    }

private:
    std::string path_;
    const uint8_t* data_ = nullptr;
    size_t size_ = 0;

    void unmap() {
        if (data_) munmap((void*)data_, size_);
        data_ = nullptr;
        size_ = 0;
    }
    [[noreturn]] void fail_errno(const char* what) const {
        throw std::runtime_error(path_ + ": " + what + ": " + std::strerror(errno));
    }
};

}  // namespace loader_detail

// A validated, memory-mapped shard. open() checks, before anything is read through it: the magic, the version,
// the dtype (8 = uint16 or 4 = int32), that the .idx holds the N + M entries its header declares, that the .bin
// is a whole number of tokens, that every document's sizes[i] >= 0 and its bytes [pointers[i], pointers[i] +
// sizes[i]*itemsize) lie inside the .bin (pointers aligned to the token size), and that doc_idx starts at 0, never
// decreases and stays <= N. Sums are 64-bit. A shard with no documents is rejected. Each error message names the
// file and what is wrong. Token values are not scanned here (that is check_data's job, and SampleLoader checks the
// ids it hands out): opening the full Pile (134M documents, a 2.7 GB index) only reads the index.
// Like any mmap reader, a file truncated by another process while mapped can raise SIGBUS.
class TokenShard {
public:
    static TokenShard open(const std::string& prefix) {
        TokenShard shard;
        shard.prefix_ = prefix;
        shard.idx_ = loader_detail::MappedFile(prefix + ".idx");
        shard.bin_ = loader_detail::MappedFile(prefix + ".bin");
        shard.read_header();
        shard.check_documents();
        shard.check_doc_idx();
        return shard;
    }

    const std::string& prefix() const { return prefix_; }
    const std::string& idx_path() const { return idx_.path(); }
    const std::string& bin_path() const { return bin_.path(); }
    size_t idx_bytes() const { return idx_.size(); }
    size_t bin_bytes() const { return bin_.size(); }
    uint8_t dtype_code() const { return dtype_code_; }
    const char* dtype_name() const { return loader_detail::shard_dtype_name(dtype_code_); }
    size_t itemsize() const { return itemsize_; }          // bytes per token: 2 or 4
    size_t num_docs() const { return num_docs_; }          // N
    size_t num_doc_idx() const { return num_doc_idx_; }    // M
    uint64_t num_tokens() const { return num_tokens_; }    // sum of sizes
    // True when pointers are the running sum of sizes (what every writer produces); bin_unused_bytes() then
    // counts the bytes after the last document, which no document refers to.
    bool contiguous() const { return contiguous_; }
    uint64_t bin_unused_bytes() const { return contiguous_ ? bin_.size() - num_tokens_ * itemsize_ : 0; }

    size_t doc_size(size_t doc) const {  // tokens of document doc
        check_doc(doc);
        return (size_t)loader_detail::load_unaligned<int32_t>(sizes_ + 4 * doc);
    }
    uint64_t doc_pointer(size_t doc) const {  // byte offset of document doc in .bin
        check_doc(doc);
        return (uint64_t)loader_detail::load_unaligned<int64_t>(pointers_ + 8 * doc);
    }
    int64_t doc_idx(size_t j) const {
        if (j >= num_doc_idx_)
            throw std::runtime_error(prefix_ + ": doc_idx entry " + std::to_string(j) + " of " + std::to_string(num_doc_idx_));
        return loader_detail::load_unaligned<int64_t>(doc_idx_ + 8 * j);
    }
    // The raw little-endian tokens of document doc, inside the mapping (doc_size * itemsize bytes, unaligned).
    const uint8_t* doc_bytes(size_t doc) const { return bin_.data() + doc_pointer(doc); }

    // Tokens [begin, begin + count) of document doc, widened to int. Copies only those tokens.
    void read_tokens(size_t doc, size_t begin, size_t count, int* out) const {
        const size_t size = doc_size(doc);
        if (begin > size || count > size - begin)
            throw std::runtime_error(prefix_ + ": tokens [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                                     ") of document " + std::to_string(doc) + ", which has " + std::to_string(size));
        const uint8_t* src = doc_bytes(doc) + begin * itemsize_;
        if (dtype_code_ == kShardUInt16) {
            for (size_t i = 0; i < count; i++) out[i] = loader_detail::load_unaligned<uint16_t>(src + 2 * i);
        } else if (count > 0) {
            static_assert(sizeof(int) == 4, "int32 shards are copied straight into int");
            std::memcpy(out, src, count * 4);
        }
    }
    std::vector<int> document(size_t doc) const {
        std::vector<int> tokens(doc_size(doc));
        read_tokens(doc, 0, tokens.size(), tokens.data());
        return tokens;
    }

    // Access-pattern hint for the .bin: MADV_RANDOM for shuffled training, MADV_SEQUENTIAL for a full scan.
    void advise_bin(int advice) const { bin_.advise(advice); }

private:
    std::string prefix_;
    loader_detail::MappedFile idx_, bin_;
    uint8_t dtype_code_ = 0;
    size_t itemsize_ = 0;
    size_t num_docs_ = 0, num_doc_idx_ = 0;
    uint64_t num_tokens_ = 0;
    bool contiguous_ = true;
    const uint8_t* sizes_ = nullptr;     // (N) i32, inside idx_
    const uint8_t* pointers_ = nullptr;  // (N) i64, inside idx_
    const uint8_t* doc_idx_ = nullptr;   // (M) i64, inside idx_

    void check_doc(size_t doc) const {
        if (doc >= num_docs_)
            throw std::runtime_error(prefix_ + ": document " + std::to_string(doc) + " of " + std::to_string(num_docs_));
    }
    [[noreturn]] void fail_idx(const std::string& what) const { throw std::runtime_error(idx_.path() + ": " + what); }

    void read_header() {
        const size_t size = idx_.size();
        const uint8_t* p = idx_.data();
        if (size < kShardHeaderBytes)
            fail_idx("the file is " + std::to_string(size) + " bytes, shorter than the " +
                     std::to_string(kShardHeaderBytes) + "-byte header of a Megatron index (truncated, or not an index)");
        if (std::memcmp(p, kShardMagic, sizeof(kShardMagic)) != 0) {
            const bool old_format = std::memcmp(p, "TNTIDX\0\0", 8) == 0;
            fail_idx("wrong magic " + loader_detail::hex_bytes(p, 9) +
                     ", expected 4D 4D 49 44 49 44 58 00 00 (\"MMIDIDX\\0\\0\"): not a Megatron mmap index" +
                     (old_format ? " (this is Megatron's older non-mmap \"TNTIDX\" format, which blocktf does not read)" : ""));
        }
        const uint64_t version = loader_detail::load_unaligned<uint64_t>(p + 9);
        if (version != kShardVersion)
            fail_idx("version " + std::to_string(version) + ", expected " + std::to_string(kShardVersion));
        dtype_code_ = p[17];
        const char* name = loader_detail::shard_dtype_name(dtype_code_);
        if (!name)
            fail_idx("unknown dtype code " + std::to_string(dtype_code_) +
                     " (Megatron's codes are 1..8; token shards use 8 = uint16 or 4 = int32)");
        if (dtype_code_ != kShardUInt16 && dtype_code_ != kShardInt32)
            fail_idx("dtype code " + std::to_string(dtype_code_) + " (" + name +
                     ") is not a token type blocktf reads (8 = uint16 or 4 = int32)");
        itemsize_ = dtype_code_ == kShardUInt16 ? 2 : 4;

        const uint64_t n = loader_detail::load_unaligned<uint64_t>(p + 18);
        const uint64_t m = loader_detail::load_unaligned<uint64_t>(p + 26);
        if (n == 0) fail_idx("the index holds no documents (N = 0)");
        // 34 + 12 N + 8 M in 128 bits: header values are untrusted and may be anything up to 2^64 - 1.
        const unsigned __int128 needed = (unsigned __int128)kShardHeaderBytes + (unsigned __int128)n * 12 +
                                         (unsigned __int128)m * 8;
        if (needed > size)
            fail_idx("the header declares N = " + std::to_string(n) + " documents and M = " + std::to_string(m) +
                     " doc_idx entries, which need " +
                     (needed >> 64 ? std::string("more than 2^64") : std::to_string((uint64_t)needed)) +
                     " bytes, but the file has " + std::to_string(size) + " (truncated, or a corrupt header)");
        num_docs_ = (size_t)n;
        num_doc_idx_ = (size_t)m;
        sizes_ = p + kShardHeaderBytes;
        pointers_ = sizes_ + 4 * num_docs_;
        doc_idx_ = pointers_ + 8 * num_docs_;
    }

    // One pass over sizes and pointers: every document inside the .bin, 64-bit token total, contiguity.
    void check_documents() {
        const uint64_t bin_size = bin_.size();
        if (bin_size % itemsize_ != 0)
            throw std::runtime_error(bin_.path() + ": the file is " + std::to_string(bin_size) + " bytes, not a whole number of " +
                                     std::to_string(itemsize_) + "-byte " + dtype_name() + " tokens (truncated?)");
        uint64_t total = 0, expected_pointer = 0;
        bool contiguous = true;
        for (size_t i = 0; i < num_docs_; i++) {
            const int32_t size = loader_detail::load_unaligned<int32_t>(sizes_ + 4 * i);
            const int64_t pointer = loader_detail::load_unaligned<int64_t>(pointers_ + 8 * i);
            if (size < 0 || pointer < 0 || (uint64_t)pointer % itemsize_ != 0 ||
                (uint64_t)pointer + (uint64_t)size * itemsize_ > bin_size)  // < 2^63 + 2^33: no overflow
                fail_document(i, size, pointer);
            contiguous = contiguous && (uint64_t)pointer == expected_pointer;
            expected_pointer = (uint64_t)pointer + (uint64_t)size * itemsize_;
            total += (uint64_t)size;
        }
        num_tokens_ = total;
        contiguous_ = contiguous;
    }

    [[noreturn]] void fail_document(size_t i, int32_t size, int64_t pointer) const {
        const std::string doc = "document " + std::to_string(i) + ": ";
        if (size < 0) fail_idx(doc + "size " + std::to_string(size) + " is negative");
        if (pointer < 0) fail_idx(doc + "pointer " + std::to_string(pointer) + " is negative");
        if ((uint64_t)pointer % itemsize_ != 0)
            fail_idx(doc + "pointer " + std::to_string(pointer) + " is not a multiple of the " + std::to_string(itemsize_) +
                     "-byte token size");
        fail_idx(doc + std::to_string(size) + " tokens at byte " + std::to_string(pointer) + " end at byte " +
                 std::to_string((uint64_t)pointer + (uint64_t)size * itemsize_) + ", past the end of " + bin_.path() + " (" +
                 std::to_string(bin_.size()) + " bytes): truncated .bin, or a corrupt size or pointer");
    }

    void check_doc_idx() {
        if (num_doc_idx_ == 0) fail_idx("doc_idx is empty (M = 0); Megatron's builder always writes at least [0]");
        int64_t previous = 0;
        for (size_t j = 0; j < num_doc_idx_; j++) {
            const int64_t v = loader_detail::load_unaligned<int64_t>(doc_idx_ + 8 * j);
            if ((j == 0 && v != 0) || v < previous || (uint64_t)v > num_docs_)
                fail_idx("doc_idx[" + std::to_string(j) + "] = " + std::to_string(v) +
                         (j == 0 ? ", expected 0" : ": doc_idx must rise from 0 to at most N = " + std::to_string(num_docs_) +
                                                        " (previous entry " + std::to_string(previous) + ")"));
            previous = v;
        }
    }
};

// ============================================================================================
// Section 7: training samples from a shard (SPEC 3.5, with the EOS-mask fix of SPEC 10.4)
// ============================================================================================
// The stream. The documents [doc_begin, doc_end) of the shard, in file order (Pythia's Pile is pre-shuffled),
// each followed by one EOS (id 0; Pythia's files have none of their own):
//   vanilla (pad_blocks false):  doc EOS doc EOS ...                    every mask value 1
//   block   (pad_blocks true):   [PAD x lp] doc EOS [PAD x rp] ...      PAD = id 0 with mask 0, the rest mask 1
// where lp = left_pad(doc) in 0..LB-1 and rp is the smallest count that makes lp + size + 1 + rp a multiple of LB,
// so every block belongs to one document. The EOS keeps mask 1 also when it is the last slot of a block (the
// original loader zeroed it there, SPEC 3.5; SPEC 10.4 fixes it). Block mode with LB = 1 equals vanilla.
// Sample s is stream positions [s*T, (s+1)*T); samples = stream length / T, the tail dropped, as the original.
// Labels and block masks are not produced here: they follow from (ids, mask) (labels = ids where mask is 1,
// -100 elsewhere; a block is real when any slot is), and the GPU side's plan_batch derives them.
//
// Randomness (our own generator, documented so that a run can be reproduced; not numpy's):
//   mix64(z)              the splitmix64 output function (Steele, Lea, Flood 2014), a bijection on 64 bits;
//   left_pad(doc)         floor(mix64(pad_key + (doc+1)*G) * LB / 2^64) with pad_key = mix64(seed ^ kPadStream) and G
//                         the golden-ratio increment of splitmix64: the doc-th output of a splitmix64 generator,
//                         scaled to 0..LB-1 (bias < LB/2^64). It depends only on (seed, file index of the document),
//                         so any document's pad is known without drawing the others and a split does not move it.
//                         The original draws numpy RandomState(42).randint(LB, size=num_docs); same distribution.
//   epoch e's order       Fisher-Yates over [0, samples) with j = uniform(0..i) for i = samples-1 down to 1, drawn
//                         from a splitmix64 generator seeded with mix64(mix64(seed ^ kShuffleStream) + e), uniform by
//                         Lemire's multiply-and-reject. Every epoch is a new permutation (the original: HF Trainer's
//                         RandomSampler, reshuffled every epoch). shuffle = false keeps stream order every epoch.
// Position. (seed, epoch, index): `index` samples of epoch `epoch` have been handed out. After the last sample of an
// epoch the position is (epoch + 1, 0). restore() checks the seed and the samples-per-epoch count, so a checkpoint
// resumes exactly the same sequence of batches, or is refused when the data or the options changed.
// Threads: sample() is const and may run on several threads; next_batch(), sample_at() and restore() change the
// loader, so one thread at a time (a prefetch thread that owns the loader is fine).
// Cost. Construction: one pass over the split's sizes, building start_ (8 bytes per document: 1.1 GB for 134M
// documents). Each epoch: one shuffle (4 bytes per sample). Each sample: a binary search in start_, then spans
// copied from the mapping. Nothing per token beyond that copy (and the vocabulary check that rides on it).

constexpr uint64_t kPadStream = 0x7061645f6c656674ull;      // "pad_left": the left-pad stream of a seed
constexpr uint64_t kShuffleStream = 0x73687566666c6521ull;  // "shuffle!": the sample-order stream of a seed
constexpr size_t kAllDocuments = std::numeric_limits<size_t>::max();

namespace loader_detail {

inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
constexpr uint64_t kSplitMixIncrement = 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio

// splitmix64: state += G, output mix64(state).
struct SplitMix64 {
    uint64_t state;
    uint64_t next() { return mix64(state += kSplitMixIncrement); }
    // Uniform in [0, n), n > 0, exactly (Lemire 2019: multiply, reject the few values that would bias).
    uint64_t below(uint64_t n) {
        unsigned __int128 m = (unsigned __int128)next() * n;
        if ((uint64_t)m < n) {
            const uint64_t threshold = (0 - n) % n;
            while ((uint64_t)m < threshold) m = (unsigned __int128)next() * n;
        }
        return (uint64_t)(m >> 64);
    }
};

}  // namespace loader_detail

// The left pad of document doc (file index) for a block length LB: 0..LB-1 (see above).
inline size_t block_left_pad(uint64_t seed, size_t doc, size_t LB) {
    const uint64_t pad_key = loader_detail::mix64(seed ^ kPadStream);
    const uint64_t x = loader_detail::mix64(pad_key + ((uint64_t)doc + 1) * loader_detail::kSplitMixIncrement);
    return (size_t)(((unsigned __int128)x * LB) >> 64);
}

// Document-level split: the last ceil(val_fraction * num_docs) documents (at least one when val_fraction > 0) are
// held out. Returns the first held-out document: train on [0, start), validate on [start, num_docs).
inline size_t validation_start(size_t num_docs, double val_fraction) {
    if (!(val_fraction >= 0.0 && val_fraction < 1.0))
        throw std::runtime_error("validation fraction " + std::to_string(val_fraction) + " is not in [0, 1)");
    if (val_fraction == 0.0) return num_docs;
    const size_t held_out = std::max<size_t>(1, (size_t)std::ceil(val_fraction * (double)num_docs));
    if (held_out >= num_docs)
        throw std::runtime_error("holding out " + std::to_string(held_out) + " of " + std::to_string(num_docs) +
                                 " documents for validation leaves none to train on");
    return num_docs - held_out;
}

struct SampleOptions {
    size_t T = 2048;                     // tokens per sample (the model's T)
    bool pad_blocks = false;             // block stream (lp, rp padding) instead of the vanilla stream
    size_t LB = 1;                       // block length; used with pad_blocks, T must be a multiple of it
    uint64_t seed = 42;                  // left pads and sample order
    bool shuffle = true;                 // false: samples in stream order, every epoch the same
    size_t doc_begin = 0;                // the documents [doc_begin, doc_end) of the shard (a split)
    size_t doc_end = kAllDocuments;      // kAllDocuments: to the last one
    int vocab_size = 0;                  // > 0: an id outside [0, vocab_size) in a sample is an error
};

// Where a SampleLoader is: a checkpoint saves it (to_string) and a resumed run restores it.
struct LoaderPosition {
    uint64_t seed = 0;
    uint64_t epoch = 0;
    uint64_t index = 0;        // samples of this epoch already handed out
    uint64_t samples = 0;      // samples per epoch of the stream this position belongs to (checked on restore)

    bool operator==(const LoaderPosition& o) const {
        return seed == o.seed && epoch == o.epoch && index == o.index && samples == o.samples;
    }
    // "seed=42 epoch=1 index=17 samples=970"
    std::string to_string() const {
        return "seed=" + std::to_string(seed) + " epoch=" + std::to_string(epoch) + " index=" + std::to_string(index) +
               " samples=" + std::to_string(samples);
    }
    static LoaderPosition parse(const std::string& text) {
        LoaderPosition p;
        const char* keys[4] = {"seed=", "epoch=", "index=", "samples="};
        uint64_t* fields[4] = {&p.seed, &p.epoch, &p.index, &p.samples};
        const char* c = text.data();
        const char* end = text.data() + text.size();
        for (int k = 0; k < 4; k++) {
            const size_t key_len = std::strlen(keys[k]);
            if (k > 0 && (c == end || *c++ != ' ')) c = nullptr;
            if (!c || (size_t)(end - c) < key_len || std::memcmp(c, keys[k], key_len) != 0) c = nullptr;
            std::from_chars_result r{};
            if (c) r = std::from_chars(c + key_len, end, *fields[k]);
            if (!c || r.ec != std::errc())
                throw std::runtime_error("loader position '" + text + "' is not of the form 'seed=S epoch=E index=I samples=N'");
            c = r.ptr;
        }
        if (c != end) throw std::runtime_error("loader position '" + text + "' has trailing characters");
        return p;
    }
};

class SampleLoader {
public:
    SampleLoader(std::shared_ptr<const TokenShard> shard, const SampleOptions& options)
        : shard_(std::move(shard)), opt_(options) {
        if (!shard_) throw std::runtime_error("SampleLoader: no shard");
        const std::string& name = shard_->prefix();
        if (opt_.doc_end == kAllDocuments) opt_.doc_end = shard_->num_docs();
        if (opt_.T == 0) throw std::runtime_error(name + ": sample length T must be > 0");
        if (opt_.pad_blocks && (opt_.LB == 0 || opt_.T % opt_.LB != 0))
            throw std::runtime_error(name + ": sample length " + std::to_string(opt_.T) + " is not a multiple of the block length " +
                                     std::to_string(opt_.LB));
        if (!opt_.pad_blocks) opt_.LB = 1;
        if (opt_.doc_begin >= opt_.doc_end || opt_.doc_end > shard_->num_docs())
            throw std::runtime_error(name + ": document range [" + std::to_string(opt_.doc_begin) + ", " +
                                     std::to_string(opt_.doc_end) + ") is empty or not inside the shard's " +
                                     std::to_string(shard_->num_docs()) + " documents");
        build_starts();
        if (opt_.shuffle) shard_->advise_bin(MADV_RANDOM);
    }
    static SampleLoader open(const std::string& prefix, const SampleOptions& options) {
        return SampleLoader(std::make_shared<const TokenShard>(TokenShard::open(prefix)), options);
    }

    const TokenShard& shard() const { return *shard_; }
    const SampleOptions& options() const { return opt_; }
    size_t num_docs() const { return opt_.doc_end - opt_.doc_begin; }
    uint64_t stream_tokens() const { return starts_.back(); }    // padded stream length, tail included
    size_t num_samples() const { return num_samples_; }          // per epoch
    size_t left_pad(size_t doc) const { return opt_.pad_blocks ? block_left_pad(opt_.seed, doc, opt_.LB) : 0; }

    // The next B samples in this epoch's order (rolling into the next epoch when one ends).
    // ids, mask: (B, T) row-major, resized here.
    void next_batch(size_t B, std::vector<int>& ids, std::vector<int>& mask) {
        const size_t T = opt_.T;
        ids.resize(B * T);
        mask.resize(B * T);
        for (size_t b = 0; b < B; b++) {
            sample(sample_at(epoch_, index_), ids.data() + b * T, mask.data() + b * T);
            if (++index_ == num_samples_) {
                epoch_++;
                index_ = 0;
            }
        }
    }

    // The sample at index of epoch's order, a number in [0, samples).
    size_t sample_at(uint64_t epoch, uint64_t index) {
        if (index >= num_samples_) throw std::runtime_error(shard_->prefix() + ": sample index past the epoch");
        if (!opt_.shuffle) return (size_t)index;
        if (order_epoch_ != epoch) build_order(epoch);
        return order_[index];
    }

    // Sample s of the stream (s < samples): ids and mask, T values each.
    void sample(size_t s, int* ids, int* mask) const {
        if (s >= num_samples_)
            throw std::runtime_error(shard_->prefix() + ": sample " + std::to_string(s) + " of " + std::to_string(num_samples_));
        const uint64_t begin = (uint64_t)s * opt_.T;
        // k: the split's document whose padded segment holds position begin.
        size_t k = (size_t)(std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin()) - 1;
        size_t filled = 0;
        while (filled < opt_.T) {
            const uint64_t from = begin + filled - starts_[k];  // first wanted position inside document k's segment
            const uint64_t to = std::min<uint64_t>(starts_[k + 1] - starts_[k], from + (opt_.T - filled));
            write_segment(opt_.doc_begin + k, (size_t)from, (size_t)to, ids + filled, mask + filled);
            filled += (size_t)(to - from);
            k++;
        }
    }

    LoaderPosition position() const { return LoaderPosition{opt_.seed, epoch_, index_, num_samples_}; }
    void restore(const LoaderPosition& p) {
        if (p.seed != opt_.seed || p.samples != num_samples_ || p.index >= num_samples_)
            throw std::runtime_error(shard_->prefix() + ": cannot restore loader position '" + p.to_string() +
                                     "': this loader has seed " + std::to_string(opt_.seed) + " and " +
                                     std::to_string(num_samples_) + " samples per epoch (different data, split, T, "
                                     "block length, padding or seed than the run that saved it?)");
        epoch_ = p.epoch;
        index_ = p.index;
    }
    void rewind() { epoch_ = index_ = 0; }  // back to the first sample of epoch 0 (a fixed validation set)

private:
    std::shared_ptr<const TokenShard> shard_;
    SampleOptions opt_;
    std::vector<uint64_t> starts_;   // (docs + 1) stream position where each document's segment starts; last = total
    size_t num_samples_ = 0;
    uint64_t epoch_ = 0, index_ = 0;
    std::vector<uint32_t> order_;    // (samples) epoch order_epoch_'s permutation, when shuffling
    uint64_t order_epoch_ = std::numeric_limits<uint64_t>::max();

    // Segment length of a document: lp + size + 1 (EOS), rounded up to the block length (LB = 1 when not padding).
    void build_starts() {
        const size_t n = num_docs(), LB = opt_.LB;
        starts_.resize(n + 1);
        starts_[0] = 0;
        for (size_t k = 0; k < n; k++) {
            const size_t doc = opt_.doc_begin + k;
            const uint64_t used = (uint64_t)left_pad(doc) + shard_->doc_size(doc) + 1;
            starts_[k + 1] = starts_[k] + (used + LB - 1) / LB * LB;
        }
        const uint64_t samples = starts_[n] / opt_.T;
        if (samples == 0)
            throw std::runtime_error(shard_->prefix() + ": documents [" + std::to_string(opt_.doc_begin) + ", " +
                                     std::to_string(opt_.doc_end) + ") make a stream of " + std::to_string(starts_[n]) +
                                     " tokens, less than one sample of " + std::to_string(opt_.T));
        if (opt_.shuffle && samples > std::numeric_limits<uint32_t>::max())
            throw std::runtime_error(shard_->prefix() + ": " + std::to_string(samples) +
                                     " samples per epoch; the shuffle supports up to 2^32 - 1");
        num_samples_ = (size_t)samples;
    }

    void build_order(uint64_t epoch) {
        order_.resize(num_samples_);
        for (size_t i = 0; i < num_samples_; i++) order_[i] = (uint32_t)i;
        loader_detail::SplitMix64 rng{loader_detail::mix64(loader_detail::mix64(opt_.seed ^ kShuffleStream) + epoch)};
        for (size_t i = num_samples_ - 1; i > 0; i--) std::swap(order_[i], order_[rng.below(i + 1)]);
        order_epoch_ = epoch;
    }

    // Positions [from, to) of document doc's segment [PAD x lp][tokens][EOS][PAD x rp] into ids, mask.
    void write_segment(size_t doc, size_t from, size_t to, int* ids, int* mask) const {
        const size_t lp = left_pad(doc), size = shard_->doc_size(doc);
        const size_t token_begin = lp, eos = lp + size;  // the segment's parts: [0, lp) [lp, eos) [eos] (eos, end)
        const int pad_mask = opt_.pad_blocks ? 0 : 1;    // the vanilla stream has no pads; its mask is all 1
        for (size_t p = from; p < std::min(to, token_begin); p++) { ids[p - from] = kShardEodId; mask[p - from] = pad_mask; }
        const size_t a = std::max(from, token_begin), b = std::min(to, eos);
        if (a < b) {
            shard_->read_tokens(doc, a - token_begin, b - a, ids + (a - from));
            std::fill(mask + (a - from), mask + (b - from), 1);
            check_ids(doc, a - token_begin, ids + (a - from), b - a);
        }
        if (from <= eos && eos < to) { ids[eos - from] = kShardEodId; mask[eos - from] = 1; }
        for (size_t p = std::max(from, eos + 1); p < to; p++) { ids[p - from] = kShardEodId; mask[p - from] = pad_mask; }
    }

    // Ids outside the model's vocabulary would index past its embedding: refuse them, naming where they are.
    void check_ids(size_t doc, size_t offset, const int* ids, size_t n) const {
        const int limit = opt_.vocab_size > 0 ? opt_.vocab_size : std::numeric_limits<int>::max();
        bool bad = false;
        for (size_t i = 0; i < n; i++) bad |= ids[i] < 0 || ids[i] >= limit;
        if (!bad) return;
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= limit)
                throw std::runtime_error(shard_->bin_path() + ": document " + std::to_string(doc) + ", token " +
                                         std::to_string(offset + i) + " has id " + std::to_string(ids[i]) +
                                         ", outside the model's vocabulary [0, " + std::to_string(limit) + ")");
    }
};

// ============================================================================================
// Section 8: shard statistics and ./train --check-data
// ============================================================================================

struct ShardStats {
    size_t documents = 0, doc_idx_entries = 0, empty_documents = 0;
    size_t min_doc_tokens = 0, max_doc_tokens = 0;
    uint64_t tokens = 0;
    int64_t min_id = -1, max_id = -1;         // -1 when the shard has no tokens
    uint64_t eod_tokens = 0;                   // tokens with id 0 (<|endoftext|>); Pythia's files have none
    uint64_t out_of_vocab = 0;                 // ids < 0 or >= the vocabulary checked against
    size_t first_bad_doc = 0, first_bad_offset = 0;  // where the first out-of-vocabulary id is
};

namespace loader_detail {

// min, max, zero count and out-of-range count of n tokens of type T; out-of-range = outside [0, limit).
template <typename T>
void scan_tokens(const uint8_t* src, size_t n, int64_t limit, int64_t& min_id, int64_t& max_id, uint64_t& zeros,
                 uint64_t& bad, size_t& first_bad) {
    T lo = std::numeric_limits<T>::max(), hi = std::numeric_limits<T>::min();
    uint64_t z = 0, b = 0;
    for (size_t i = 0; i < n; i++) {
        const T v = load_unaligned<T>(src + i * sizeof(T));
        lo = std::min(lo, v);
        hi = std::max(hi, v);
        z += v == 0;
        b += (int64_t)v < 0 || (int64_t)v >= limit;
    }
    if (n > 0) {
        min_id = min_id < 0 ? (int64_t)lo : std::min<int64_t>(min_id, lo);
        max_id = std::max<int64_t>(max_id, hi);
    }
    if (b > 0 && bad == 0)
        for (size_t i = 0; i < n; i++) {
            const int64_t v = load_unaligned<T>(src + i * sizeof(T));
            if (v < 0 || v >= limit) { first_bad = i; break; }
        }
    zeros += z;
    bad += b;
}

}  // namespace loader_detail

// Reads every token once (sequentially, in chunks). With show_progress, a line on stderr about once a second.
inline ShardStats shard_stats(const TokenShard& shard, int64_t vocab_size = kShardCheckVocab, bool show_progress = false) {
    using clock = std::chrono::steady_clock;
    ShardStats s;
    s.documents = shard.num_docs();
    s.doc_idx_entries = shard.num_doc_idx();
    s.tokens = shard.num_tokens();
    s.min_doc_tokens = std::numeric_limits<size_t>::max();
    shard.advise_bin(MADV_SEQUENTIAL);
    const auto start = clock::now();
    auto last_report = start;
    uint64_t done = 0;  // tokens scanned
    const size_t chunk = (size_t)1 << 24;
    bool reported = false;
    auto report = [&] {
        const auto now = clock::now();
        if (!show_progress || now - last_report < std::chrono::seconds(1)) return;
        const double seconds = std::chrono::duration<double>(now - start).count();
        std::fprintf(stderr, "\rscanning %s: %5.1f%% of %s tokens, %.0f MB/s   ", shard.bin_path().c_str(),
                     100.0 * (double)done / (double)std::max<uint64_t>(s.tokens, 1),
                     loader_detail::with_commas(s.tokens).c_str(), done * shard.itemsize() / seconds / 1e6);
        last_report = now;
        reported = true;
    };
    for (size_t doc = 0; doc < s.documents; doc++) {
        const size_t n = shard.doc_size(doc);
        s.empty_documents += n == 0;
        s.min_doc_tokens = std::min(s.min_doc_tokens, n);
        s.max_doc_tokens = std::max(s.max_doc_tokens, n);
        const uint8_t* src = shard.doc_bytes(doc);
        for (size_t begin = 0; begin < n; begin += chunk) {
            const size_t count = std::min(chunk, n - begin);
            const uint64_t bad_before = s.out_of_vocab;
            size_t first_bad = 0;
            if (shard.dtype_code() == kShardUInt16)
                loader_detail::scan_tokens<uint16_t>(src + begin * 2, count, vocab_size, s.min_id, s.max_id, s.eod_tokens,
                                                     s.out_of_vocab, first_bad);
            else
                loader_detail::scan_tokens<int32_t>(src + begin * 4, count, vocab_size, s.min_id, s.max_id, s.eod_tokens,
                                                    s.out_of_vocab, first_bad);
            if (bad_before == 0 && s.out_of_vocab > 0) { s.first_bad_doc = doc; s.first_bad_offset = begin + first_bad; }
            done += count;
            if (count == chunk) report();  // inside a very long document
        }
        if ((doc & 0xFFFF) == 0) report();
    }
    if (reported) std::fprintf(stderr, "\n");
    return s;
}

// ./train --check-data PREFIX: validates the shard (TokenShard::open), reads every token and prints a table of
// statistics on stdout. Throws (after the table) when an id could not be trained on: outside [0, 50304).
inline void check_data(const std::string& prefix) {
    using loader_detail::with_commas;
    const TokenShard shard = TokenShard::open(prefix);
    const bool large = shard.bin_bytes() > ((size_t)1 << 28);
    const ShardStats s = shard_stats(shard, kShardCheckVocab, large);
    auto row = [](const char* name, const std::string& value) { std::printf("  %-18s %s\n", name, value.c_str()); };
    std::printf("shard %s: valid\n", prefix.c_str());
    row("index", shard.idx_path() + ", " + with_commas(shard.idx_bytes()) + " bytes, MMIDIDX version 1");
    row("tokens file", shard.bin_path() + ", " + with_commas(shard.bin_bytes()) + " bytes");
    row("dtype", std::string(shard.dtype_name()) + " (code " + std::to_string(shard.dtype_code()) + ", " +
                     std::to_string(shard.itemsize()) + " bytes per token)");
    row("documents", with_commas(s.documents) + " (doc_idx: " + with_commas(s.doc_idx_entries) + " entries, last " +
                         std::to_string(shard.doc_idx(s.doc_idx_entries - 1)) + ")");
    row("tokens", with_commas(s.tokens));
    char mean[32];
    std::snprintf(mean, sizeof(mean), "%.1f", (double)s.tokens / (double)s.documents);
    row("tokens/document", "min " + with_commas(s.min_doc_tokens) + ", mean " + mean + ", max " + with_commas(s.max_doc_tokens));
    row("empty documents", with_commas(s.empty_documents));
    row("token ids", s.tokens == 0 ? std::string("none") : "min " + std::to_string(s.min_id) + ", max " + std::to_string(s.max_id));
    row("EOD tokens (id 0)", with_commas(s.eod_tokens) + (s.eod_tokens == 0 ? " (none appended; the loader adds one per document)" : ""));
    row("layout", shard.contiguous() ? (shard.bin_unused_bytes() == 0 ? std::string("contiguous, .bin fully used")
                                                                      : "contiguous, " + with_commas(shard.bin_unused_bytes()) +
                                                                            " bytes after the last document unused")
                                     : std::string("not contiguous (pointers are not the running sum of sizes)"));
    std::fflush(stdout);
    if (s.out_of_vocab > 0)
        throw std::runtime_error(shard.bin_path() + ": " + with_commas(s.out_of_vocab) + " token ids are outside [0, " +
                                 std::to_string(kShardCheckVocab) + "), the Pythia model's vocabulary (first: document " +
                                 std::to_string(s.first_bad_doc) + ", token " + std::to_string(s.first_bad_offset) + ")");
}

// ============================================================================================
// Section 9: shard writer (the same format, as Megatron's MMapIndexedDatasetBuilder writes it)
// ============================================================================================

namespace loader_detail {

// An output file written through a buffer under a temporary name (path + ".tmp.<pid>") and moved over path by
// rename_into_place() after sync(). Until then, destruction removes the temporary file.
class TempFileWriter {
public:
    explicit TempFileWriter(const std::string& path)
        : path_(path), tmp_(path + ".tmp." + std::to_string((long)getpid())) {
        fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd_ < 0) throw std::runtime_error(path_ + ": cannot create " + tmp_ + ": " + std::strerror(errno));
        buffer_.reserve(kBufferBytes);
    }
    TempFileWriter(const TempFileWriter&) = delete;
    TempFileWriter& operator=(const TempFileWriter&) = delete;
    ~TempFileWriter() {
        if (fd_ >= 0) ::close(fd_);
        if (!renamed_) ::unlink(tmp_.c_str());
    }

    void write(const void* data, size_t n) {
        if (buffer_.size() + n > kBufferBytes) flush();
        if (n >= kBufferBytes) {
            if (!write_all(fd_, data, n)) fail("cannot write");
        } else {
            buffer_.insert(buffer_.end(), (const uint8_t*)data, (const uint8_t*)data + n);
        }
    }
    template <typename T>
    void write_value(T value) { write(&value, sizeof(T)); }  // little-endian host (static_assert at the top)

    void sync() {  // flush, fsync and close: the data is on disk under the temporary name
        flush();
        if (fsync(fd_) != 0) fail("cannot fsync");
        const int closed = ::close(fd_);
        fd_ = -1;
        if (closed != 0) fail("cannot close");
    }
    void rename_into_place() {
        if (std::rename(tmp_.c_str(), path_.c_str()) != 0) fail("cannot rename the temporary file over it");
        renamed_ = true;
        fsync_parent_directory(path_);
    }

private:
    static constexpr size_t kBufferBytes = (size_t)1 << 20;
    std::string path_, tmp_;
    int fd_ = -1;
    bool renamed_ = false;
    std::vector<uint8_t> buffer_;

    void flush() {
        if (!buffer_.empty() && !write_all(fd_, buffer_.data(), buffer_.size())) fail("cannot write");
        buffer_.clear();
    }
    [[noreturn]] void fail(const char* what) const {
        throw std::runtime_error(path_ + ": " + what + " (" + tmp_ + "): " + std::strerror(errno));
    }
};

}  // namespace loader_detail

// Writes PREFIX.bin and PREFIX.idx: one item per document (sizes, pointers = running byte sum, doc_idx =
// [0, 1, ..., N]), byte for byte what Megatron's builder writes for the same tokens. Both files are written under
// temporary names and renamed into place by finish(), .bin first, then .idx; a writer destroyed before finish()
// (an error, Ctrl-C unwinding) leaves no files behind. Ids must fit the dtype (uint16: 0..65535).
class ShardWriter {
public:
    explicit ShardWriter(const std::string& prefix, uint8_t dtype_code = kShardUInt16)
        : prefix_(prefix), dtype_code_(dtype_code), bin_(prefix + ".bin"), idx_(prefix + ".idx") {
        if (dtype_code != kShardUInt16 && dtype_code != kShardInt32)
            throw std::runtime_error(prefix + ": ShardWriter writes dtype 8 (uint16) or 4 (int32), not " + std::to_string(dtype_code));
    }

    void add_document(const uint32_t* ids, size_t count) {
        if (finished_) throw std::runtime_error(prefix_ + ": add_document after finish");
        if (count > (size_t)std::numeric_limits<int32_t>::max())
            throw std::runtime_error(prefix_ + ": document " + std::to_string(sizes_.size()) + " has " + std::to_string(count) +
                                     " tokens, more than an int32 size can hold");
        const uint32_t limit = dtype_code_ == kShardUInt16 ? 65535u : (uint32_t)std::numeric_limits<int32_t>::max();
        for (size_t i = 0; i < count; i++)
            if (ids[i] > limit)
                throw std::runtime_error(prefix_ + ": document " + std::to_string(sizes_.size()) + ", token " + std::to_string(i) +
                                         ": id " + std::to_string(ids[i]) + " does not fit in " +
                                         loader_detail::shard_dtype_name(dtype_code_));
        if (dtype_code_ == kShardUInt16) {
            narrow_.resize(count);
            for (size_t i = 0; i < count; i++) narrow_[i] = (uint16_t)ids[i];
            bin_.write(narrow_.data(), count * 2);
        } else {
            bin_.write(ids, count * 4);
        }
        sizes_.push_back((int32_t)count);
        tokens_ += count;
    }
    void add_document(const std::vector<uint32_t>& ids) { add_document(ids.data(), ids.size()); }

    size_t num_docs() const { return sizes_.size(); }
    uint64_t num_tokens() const { return tokens_; }

    // Writes the index, makes both files durable, renames them into place.
    void finish() {
        if (finished_) throw std::runtime_error(prefix_ + ": finish called twice");
        if (sizes_.empty()) throw std::runtime_error(prefix_ + ": no documents were added; a shard needs at least one");
        const uint64_t n = sizes_.size();
        const size_t itemsize = dtype_code_ == kShardUInt16 ? 2 : 4;
        idx_.write(kShardMagic, sizeof(kShardMagic));
        idx_.write_value<uint64_t>(kShardVersion);
        idx_.write_value<uint8_t>(dtype_code_);
        idx_.write_value<uint64_t>(n);
        idx_.write_value<uint64_t>(n + 1);
        idx_.write(sizes_.data(), sizes_.size() * sizeof(int32_t));
        int64_t pointer = 0;
        for (int32_t size : sizes_) {
            idx_.write_value<int64_t>(pointer);
            pointer += (int64_t)size * (int64_t)itemsize;
        }
        for (uint64_t i = 0; i <= n; i++) idx_.write_value<int64_t>((int64_t)i);
        bin_.sync();
        idx_.sync();
        bin_.rename_into_place();
        idx_.rename_into_place();
        finished_ = true;
    }

private:
    std::string prefix_;
    uint8_t dtype_code_;
    loader_detail::TempFileWriter bin_, idx_;
    std::vector<int32_t> sizes_;    // (documents) tokens per document, written to the index at the end
    std::vector<uint16_t> narrow_;  // scratch: one document's ids as uint16
    uint64_t tokens_ = 0;
    bool finished_ = false;
};
