// loader.h: the file formats blocktf reads and writes, header-only, host code.
// defines: JsonValue, parse_json                         (section 1: JSON, RFC 8259)
//          bf16_to_float, float_to_bf16, f16_to_float     (section 2: 16-bit float conversions)
//          DType, dtype_size, dtype_name, dtype_from_name (section 3: safetensors element types)
//          SafeTensor, SafetensorsFile                    (section 4: safetensors reader, mmapped)
//          TensorToWrite, write_safetensors               (section 5: safetensors writer, atomic)
//
// Every error is a std::runtime_error whose message names the file (when there is one) and what is
// wrong. No input bytes, however malformed, make these functions crash or read out of bounds.
// Helpers that are not part of the API live in namespace loader_detail, out of the other headers' way.
#pragma once
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
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

// safetensors data is little-endian and is read with memcpy; a big-endian host would need byte swaps.
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
