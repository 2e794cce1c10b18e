// tokenizer.h: the Pythia (GPT-NeoX-20B) tokenizer, reproducing exactly what Hugging Face `tokenizers` does with
// its tokenizer.json (shared/data/README.md section 1). Header-only C++17, host code, no dependencies beyond
// loader.h (JSON) and the generated unicode_tables.h.
// defines: utf8_check, utf8_find_invalid, utf8_lossy, utf8_next, utf8_append  (section 1)
//          char_class_at, combining_class, nfc_quick             (section 2)
//          normalize_nfc                                         (section 3)
//          split_gpt2                                            (section 4)
//          kByteAlphabet, byte_level_to_bytes                    (section 5)
//          AddedTokenMatcher                                     (section 6)
//          MergeTable, bpe_word, WordCache                       (section 7)
//          Tokenizer: from_file, from_json, encode, decode       (sections 8, 9)
//
// The encode pipeline, in HF's order:
//   1. the input must be valid UTF-8 (HF only ever sees Rust strings); otherwise a runtime_error gives the offset;
//   2. added tokens with "normalized": false (<|endoftext|>, <|padding|>) are cut out of the raw text,
//      leftmost-longest; each remaining piece is
//   3. NFC-normalized (Unicode 9.0 data, as HF's normalization crate; see unicode_tables.h),
//   4. searched for added tokens with "normalized": true (the runs of 2..24 spaces), leftmost-longest;
//   5. split by the GPT-2 pattern  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      (hand-written matcher, Oniguruma semantics: first alternative that matches wins, greedy runs; classes
//      from the UCD of unicode_tables.h, 15.0, where HF's Oniguruma has 16.0: characters new in 16.0 differ);
//   6. each piece's bytes are BPE-merged (lowest merge rank first, leftmost on ties) into vocabulary ids.
// Byte-level: the vocabulary spells every byte as one printable character (GPT-2's bytes_to_unicode). Internally
// we work on raw bytes and only use that alphabet to read the vocabulary and merges.
//
// Decode (HF's ByteLevel decoder): each token -> bytes through the byte-level alphabet, or as its own UTF-8 when it
// has a character outside the alphabet (the space-run tokens); then each maximal invalid UTF-8 subsequence is
// replaced by U+FFFD, exactly like Rust's String::from_utf8_lossy.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "loader.h"          // defines: JsonValue, parse_json
#include "unicode_tables.h"  // defines: unicode::kClassRanges, kCombiningClassRanges, kDecompositions, ...

// ============================================================================================
// Section 1: UTF-8
// ============================================================================================

// Length of the valid UTF-8 sequence at p[0..n), or 0 when it is invalid; then *invalid_length is the length of its
// "maximal subpart" (1..3 bytes: the lead byte plus the continuation bytes that were still plausible). Replacing
// each maximal subpart by one U+FFFD is the Unicode-recommended practice, and what Rust's from_utf8_lossy does.
inline size_t utf8_valid_length(const uint8_t* p, size_t n, size_t* invalid_length) {
    const uint8_t b0 = p[0];
    if (b0 < 0x80) return 1;
    size_t continuation = 0;           // continuation bytes the lead byte asks for
    uint8_t second_lo = 0x80, second_hi = 0xBF;  // the second byte's range excludes overlong forms and surrogates
    if (b0 >= 0xC2 && b0 <= 0xDF) continuation = 1;
    else if (b0 == 0xE0) { continuation = 2; second_lo = 0xA0; }
    else if (b0 == 0xED) { continuation = 2; second_hi = 0x9F; }
    else if (b0 >= 0xE1 && b0 <= 0xEF) continuation = 2;
    else if (b0 == 0xF0) { continuation = 3; second_lo = 0x90; }
    else if (b0 == 0xF4) { continuation = 3; second_hi = 0x8F; }
    else if (b0 >= 0xF1 && b0 <= 0xF3) continuation = 3;
    else { *invalid_length = 1; return 0; }  // 0x80..0xC1, 0xF5..0xFF never start a sequence
    for (size_t k = 1; k <= continuation; k++) {
        const uint8_t lo = k == 1 ? second_lo : 0x80, hi = k == 1 ? second_hi : 0xBF;
        if (k >= n || p[k] < lo || p[k] > hi) { *invalid_length = k; return 0; }
    }
    return continuation + 1;
}

// Offset of the first invalid UTF-8 sequence in text, or std::string_view::npos when text is valid UTF-8.
inline size_t utf8_find_invalid(std::string_view text) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(text.data());
    const size_t n = text.size();
    size_t i = 0, invalid = 0;
    while (i < n) {
        if (p[i] < 0x80) { i++; continue; }
        const size_t len = utf8_valid_length(p + i, n - i, &invalid);
        if (len == 0) return i;
        i += len;
    }
    return std::string_view::npos;
}

// Throws if text is not valid UTF-8, naming the byte offset of the first invalid sequence.
inline void utf8_check(std::string_view text) {
    const size_t bad = utf8_find_invalid(text);
    if (bad == std::string_view::npos) return;
    char msg[96];
    std::snprintf(msg, sizeof(msg), "invalid UTF-8 in the input at byte %zu (byte 0x%02X)", bad,
                  static_cast<uint8_t>(text[bad]));
    throw std::runtime_error(msg);
}

// Repairs bytes into valid UTF-8: each maximal invalid subpart becomes U+FFFD (Rust's String::from_utf8_lossy).
inline std::string utf8_lossy(std::string_view bytes) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(bytes.data());
    const size_t n = bytes.size();
    std::string out;
    out.reserve(n);
    size_t i = 0, invalid = 0, clean_from = 0;
    while (i < n) {
        if (p[i] < 0x80) { i++; continue; }
        const size_t len = utf8_valid_length(p + i, n - i, &invalid);
        if (len > 0) { i += len; continue; }
        out.append(bytes.substr(clean_from, i - clean_from));
        out.append("\xEF\xBF\xBD");  // U+FFFD REPLACEMENT CHARACTER
        i += invalid;
        clean_from = i;
    }
    out.append(bytes.substr(clean_from));
    return out;
}

// Decodes the code point at text[i] and advances i. The text must be valid UTF-8 (checked before).
inline uint32_t utf8_next(std::string_view text, size_t& i) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(text.data()) + i;
    if (p[0] < 0x80) { i += 1; return p[0]; }
    if (p[0] < 0xE0) { i += 2; return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu); }
    if (p[0] < 0xF0) { i += 3; return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu); }
    i += 4;
    return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
}

inline void utf8_append(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += char(cp);
    } else if (cp < 0x800) {
        out += char(0xC0 | (cp >> 6));
        out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += char(0xE0 | (cp >> 12));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    } else {
        out += char(0xF0 | (cp >> 18));
        out += char(0x80 | ((cp >> 12) & 0x3F));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    }
}

// ============================================================================================
// Section 2: Unicode lookups (binary search in the generated range tables)
// ============================================================================================

// The range of `table` that contains cp, or nullptr. Tables are sorted, non-overlapping, with fields first/last.
template <typename Range, size_t N>
constexpr const Range* find_range(const Range (&table)[N], uint32_t cp) {
    size_t lo = 0, hi = N;  // find the last range with first <= cp
    while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        if (table[mid].first <= cp) lo = mid + 1;
        else hi = mid;
    }
    return (lo > 0 && cp <= table[lo - 1].last) ? &table[lo - 1] : nullptr;
}

constexpr unicode::CharClass char_class_lookup(uint32_t cp) {
    const unicode::ClassRange* r = find_range(unicode::kClassRanges, cp);
    return r ? r->cls : unicode::kOther;
}

// The ASCII classes, computed at compile time from the same table: the pre-tokenizer's hot path.
struct AsciiClassTable { unicode::CharClass cls[128]; };
constexpr AsciiClassTable make_ascii_class_table() {
    AsciiClassTable t{};
    for (uint32_t c = 0; c < 128; c++) t.cls[c] = char_class_lookup(c);
    return t;
}
inline constexpr AsciiClassTable kAsciiClasses = make_ascii_class_table();

// Class of the code point at text[i] for the split pattern; *length gets its UTF-8 length.
inline unicode::CharClass char_class_at(std::string_view text, size_t i, size_t* length) {
    const uint8_t b = static_cast<uint8_t>(text[i]);
    if (b < 0x80) { *length = 1; return kAsciiClasses.cls[b]; }
    size_t j = i;
    const uint32_t cp = utf8_next(text, j);
    *length = j - i;
    return char_class_lookup(cp);
}

inline uint8_t combining_class(uint32_t cp) {
    if (cp < unicode::kNfcQuickBelow) return 0;
    const unicode::CombiningClassRange* r = find_range(unicode::kCombiningClassRanges, cp);
    return r ? r->ccc : 0;
}

// "Quick" code points cannot change under NFC and cannot combine with what precedes them: NFC of a text is the
// concatenation of the NFC of its segments, cut before every quick code point.
inline bool nfc_quick(uint32_t cp) {
    return cp < unicode::kNfcQuickBelow || find_range(unicode::kNfcNotQuickRanges, cp) == nullptr;
}

// ============================================================================================
// Section 3: NFC normalization (UAX #15: full canonical decomposition, canonical ordering, composition)
// ============================================================================================

// Hangul syllables are composed arithmetically (Unicode section 3.12).
constexpr uint32_t kHangulSBase = 0xAC00, kHangulLBase = 0x1100, kHangulVBase = 0x1161, kHangulTBase = 0x11A7;
constexpr uint32_t kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
constexpr uint32_t kHangulNCount = kHangulVCount * kHangulTCount, kHangulSCount = kHangulLCount * kHangulNCount;

// Appends the full canonical decomposition of cp to out.
inline void nfc_decompose(uint32_t cp, std::vector<uint32_t>& out) {
    if (cp >= kHangulSBase && cp < kHangulSBase + kHangulSCount) {
        const uint32_t s = cp - kHangulSBase;
        out.push_back(kHangulLBase + s / kHangulNCount);
        out.push_back(kHangulVBase + (s % kHangulNCount) / kHangulTCount);
        if (s % kHangulTCount != 0) out.push_back(kHangulTBase + s % kHangulTCount);
        return;
    }
    const auto* begin = std::begin(unicode::kDecompositions);
    const auto* end = std::end(unicode::kDecompositions);
    const auto* d = std::lower_bound(begin, end, cp,
                                     [](const unicode::Decomposition& e, uint32_t c) { return e.code_point < c; });
    if (d == end || d->code_point != cp) { out.push_back(cp); return; }
    out.insert(out.end(), unicode::kDecompositionData + d->offset, unicode::kDecompositionData + d->offset + d->length);
}

// The primary composite of (a, b), or 0 when there is none (0 is never a composite).
inline uint32_t nfc_compose_pair(uint32_t a, uint32_t b) {
    if (a >= kHangulLBase && a < kHangulLBase + kHangulLCount && b >= kHangulVBase && b < kHangulVBase + kHangulVCount)
        return kHangulSBase + ((a - kHangulLBase) * kHangulVCount + (b - kHangulVBase)) * kHangulTCount;
    if (a >= kHangulSBase && a < kHangulSBase + kHangulSCount && (a - kHangulSBase) % kHangulTCount == 0 &&
        b > kHangulTBase && b < kHangulTBase + kHangulTCount)
        return a + (b - kHangulTBase);
    const auto* begin = std::begin(unicode::kCompositions);
    const auto* end = std::end(unicode::kCompositions);
    const auto* c = std::lower_bound(begin, end, std::make_pair(a, b), [](const unicode::Composition& e, auto key) {
        return e.first != key.first ? e.first < key.first : e.second < key.second;
    });
    return (c != end && c->first == a && c->second == b) ? c->composite : 0;
}

// Canonical ordering: every run of non-starters is stably sorted by combining class.
inline void nfc_reorder(std::vector<uint32_t>& cps) {
    size_t i = 0;
    while (i < cps.size()) {
        if (combining_class(cps[i]) == 0) { i++; continue; }
        size_t j = i;
        while (j < cps.size() && combining_class(cps[j]) != 0) j++;
        if (j - i > 1)
            std::stable_sort(cps.begin() + i, cps.begin() + j,
                             [](uint32_t x, uint32_t y) { return combining_class(x) < combining_class(y); });
        i = j;
    }
}

// Canonical composition, in place: each character combines with the last starter unless blocked (a character
// between them has class 0 or a class >= its own).
inline void nfc_compose(std::vector<uint32_t>& cps) {
    const size_t kNone = SIZE_MAX;
    size_t starter = kNone;  // index in the output of the last starter
    int last_class = -1;     // class of the last character kept after the starter; -1: none (adjacent)
    size_t out = 0;
    for (size_t i = 0; i < cps.size(); i++) {
        const uint32_t c = cps[i];
        const int cc = combining_class(c);
        const bool blocked = last_class != -1 && (last_class == 0 || last_class >= cc);
        if (starter != kNone && !blocked) {
            const uint32_t composite = nfc_compose_pair(cps[starter], c);
            if (composite != 0) { cps[starter] = composite; continue; }
        }
        if (cc == 0) { starter = out; last_class = -1; }
        else { last_class = cc; }
        cps[out++] = c;
    }
    cps.resize(out);
}

// NFC of one segment (valid UTF-8), appended to out. `scratch` is reused to avoid allocations.
inline void nfc_segment(std::string_view segment, std::string& out, std::vector<uint32_t>& scratch) {
    scratch.clear();
    for (size_t i = 0; i < segment.size();) nfc_decompose(utf8_next(segment, i), scratch);
    nfc_reorder(scratch);
    nfc_compose(scratch);
    for (uint32_t cp : scratch) utf8_append(out, cp);
}

// NFC of valid UTF-8 text. Returns `text` itself when it is already NFC (the common case, found by a quick scan),
// else a view of `storage` holding the normalized text. Only the segments around non-quick code points are
// normalized; quick ones are copied.
inline std::string_view normalize_nfc(std::string_view text, std::string& storage) {
    std::vector<uint32_t> scratch;
    size_t copied = 0;        // text[0, copied) is already in storage
    size_t segment_start = 0; // start of the last quick code point: segments are cut there
    bool changed = false;
    size_t i = 0;
    while (i < text.size()) {
        // ASCII, and 2-byte sequences with lead bytes below 0xCC (code points below U+0300), are all quick.
        const uint8_t lead = static_cast<uint8_t>(text[i]);
        if (lead < 0x80) { segment_start = i++; continue; }
        if (lead < 0xCC) { segment_start = i; i += 2; continue; }
        const size_t start = i;
        const uint32_t cp = utf8_next(text, i);
        if (nfc_quick(cp)) { segment_start = start; continue; }
        // A non-quick code point: its segment runs from segment_start to the next quick code point.
        size_t end = i;
        while (end < text.size()) {
            size_t next = end;
            if (nfc_quick(utf8_next(text, next))) break;
            end = next;
        }
        if (!changed) { storage.clear(); changed = true; }
        storage.append(text.substr(copied, segment_start - copied));
        nfc_segment(text.substr(segment_start, end - segment_start), storage, scratch);
        copied = i = segment_start = end;
    }
    if (!changed) return text;
    storage.append(text.substr(copied));
    return storage;
}

// ============================================================================================
// Section 4: pre-tokenizer, the GPT-2 split pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// At each position the first alternative that matches wins (regex alternation, not longest match); the runs are
// greedy. \s+(?!\S) before a non-space backtracks by one character: a whitespace run followed by a word gives
// all but its last character to this piece, and the last one (a space) then starts the word's " ?\p{L}+".
// ============================================================================================

// Length of the contraction ('s 't 're 've 'm 'll 'd, lower case only) at text[i] (an apostrophe), or 0.
inline size_t contraction_length(std::string_view text, size_t i) {
    if (i + 1 >= text.size()) return 0;
    const char a = text[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 >= text.size()) return 0;
    const char b = text[i + 2];
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

// End of the run of code points of class `cls` that starts at text[i].
inline size_t skip_class_run(std::string_view text, size_t i, unicode::CharClass cls) {
    size_t length = 0;
    while (i < text.size() && char_class_at(text, i, &length) == cls) i += length;
    return i;
}

// Splits valid UTF-8 text into pieces by the GPT-2 pattern, calling emit(piece) for each (pieces are non-empty and
// cover the text in order).
template <typename Emit>
void split_gpt2(std::string_view text, Emit&& emit) {
    using unicode::CharClass;
    size_t i = 0, length = 0;
    while (i < text.size()) {
        const size_t start = i;
        if (text[i] == '\'') {
            const size_t k = contraction_length(text, i);
            if (k > 0) { emit(text.substr(start, k)); i += k; continue; }
        }
        // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": an optional ASCII space, then a run of one class.
        CharClass cls = char_class_at(text, i, &length);
        size_t run_start = i;
        if (text[i] == ' ' && i + 1 < text.size()) {
            size_t next_length = 0;
            const CharClass next = char_class_at(text, i + 1, &next_length);
            if (next != unicode::kSpace) { cls = next; run_start = i + 1; }
        }
        if (cls != unicode::kSpace) {
            i = skip_class_run(text, run_start, cls);
            emit(text.substr(start, i - start));
            continue;
        }
        // "\s+(?!\S)|\s+": the whitespace run, minus its last character when a non-space follows it.
        size_t last_start = i;
        while (i < text.size() && char_class_at(text, i, &length) == unicode::kSpace) { last_start = i; i += length; }
        if (i < text.size() && last_start > start) i = last_start;
        emit(text.substr(start, i - start));
    }
}

// ============================================================================================
// Section 5: the byte-level alphabet (GPT-2's bytes_to_unicode)
// ============================================================================================

// Byte b is spelled as the character U+00bb when that is printable (33..126, 161..172, 174..255), and otherwise
// as U+0100 + k for the k-th non-printable byte in order (so the space 0x20 is U+0120 'Ġ', '\n' is U+010A 'Ċ').
// The alphabet therefore lies in U+0000..U+0143.
constexpr uint32_t kByteAlphabetEnd = 0x144;
struct ByteAlphabet {
    uint32_t code_point[256];           // byte -> character
    int16_t byte_of[kByteAlphabetEnd];  // character -> byte, -1 if the character is not in the alphabet
};
constexpr ByteAlphabet make_byte_alphabet() {
    ByteAlphabet a{};
    for (uint32_t c = 0; c < kByteAlphabetEnd; c++) a.byte_of[c] = -1;
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; b++) {
        const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        a.code_point[b] = printable ? b : next++;
        a.byte_of[a.code_point[b]] = int16_t(b);
    }
    return a;
}
inline constexpr ByteAlphabet kByteAlphabet = make_byte_alphabet();

// The raw bytes a byte-level token spells into `bytes`; false if a character is not in the alphabet.
inline bool byte_level_to_bytes(std::string_view token, std::string& bytes) {
    bytes.clear();
    for (size_t i = 0; i < token.size();) {
        const uint32_t cp = utf8_next(token, i);
        if (cp >= kByteAlphabetEnd || kByteAlphabet.byte_of[cp] < 0) return false;
        bytes += char(kByteAlphabet.byte_of[cp]);
    }
    return true;
}

// The byte-level spelling of raw bytes (for looking bytes up in the vocabulary).
inline std::string bytes_to_byte_level(std::string_view bytes) {
    std::string out;
    for (unsigned char b : bytes) utf8_append(out, kByteAlphabet.code_point[b]);
    return out;
}

// ============================================================================================
// Section 6: added tokens, matched leftmost-longest by a byte trie
// ============================================================================================

class AddedTokenMatcher {
public:
    void add(std::string_view content, uint32_t id) {
        size_t node = 0;
        for (unsigned char b : content) {
            int32_t& child = nodes_[node].child[b];
            if (child == 0) {
                child = int32_t(nodes_.size());
                nodes_.emplace_back();  // invalidates `child`, which is not used after this
            }
            node = size_t(nodes_[node].child[b]);
        }
        nodes_[node].id = int64_t(id);
        if (!content.empty()) can_start_[static_cast<unsigned char>(content[0])] = true;
    }

    // Splits text into pieces, in order: on_text(piece) for text between matches, on_token(id) for each match.
    // At each position the longest token that matches there is taken (leftmost-longest, like HF's aho-corasick).
    template <typename OnText, typename OnToken>
    void split(std::string_view text, OnText&& on_text, OnToken&& on_token) const {
        size_t text_start = 0, i = 0;
        while (i < text.size()) {
            if (!can_start_[static_cast<unsigned char>(text[i])]) { i++; continue; }
            size_t match_length = 0;
            int64_t match_id = -1;
            size_t node = 0;
            for (size_t k = i; k < text.size(); k++) {
                const int32_t child = nodes_[node].child[static_cast<unsigned char>(text[k])];
                if (child == 0) break;
                node = size_t(child);
                if (nodes_[node].id >= 0) { match_length = k + 1 - i; match_id = nodes_[node].id; }
            }
            if (match_id < 0) { i++; continue; }
            if (i > text_start) on_text(text.substr(text_start, i - text_start));
            on_token(uint32_t(match_id));
            i += match_length;
            text_start = i;
        }
        if (text_start < text.size()) on_text(text.substr(text_start));
    }

private:
    struct Node {
        int32_t child[256] = {};  // 0 = no child (the root is never a child)
        int64_t id = -1;          // the token ending here, or -1
    };
    std::vector<Node> nodes_ = std::vector<Node>(1);
    bool can_start_[256] = {};
};

// ============================================================================================
// Section 7: BPE
// ============================================================================================

// Merge rules: (left id, right id) -> (rank, merged id), in an open-addressing hash table (linear probing).
// Looked up once per candidate pair, so it is the heart of BPE speed.
class MergeTable {
public:
    struct Merge { uint32_t rank, id; };

    void reserve(size_t count) {
        size_t capacity = 16;
        while (capacity < 2 * count) capacity *= 2;  // load factor <= 1/2 keeps probes short
        slots_.assign(capacity, Slot{kEmpty, {0, 0}});
        mask_ = capacity - 1;
    }

    // Inserts or overwrites (a repeated pair keeps its last rank, as HF's HashMap does).
    void insert(uint32_t left, uint32_t right, Merge merge) {
        if (2 * (count_ + 1) > slots_.size()) grow();
        const uint64_t key = pack(left, right);
        size_t s = slot_of(key);
        while (slots_[s].key != kEmpty && slots_[s].key != key) s = (s + 1) & mask_;
        if (slots_[s].key == kEmpty) count_++;
        slots_[s] = Slot{key, merge};
    }

    const Merge* find(uint32_t left, uint32_t right) const {
        const uint64_t key = pack(left, right);
        for (size_t s = slot_of(key);; s = (s + 1) & mask_) {
            if (slots_[s].key == key) return &slots_[s].merge;
            if (slots_[s].key == kEmpty) return nullptr;
        }
    }

    size_t size() const { return count_; }

private:
    static constexpr uint64_t kEmpty = ~uint64_t(0);  // no real key: ids are < 2^31
    struct Slot { uint64_t key; Merge merge; };

    static uint64_t pack(uint32_t left, uint32_t right) { return (uint64_t(left) << 32) | right; }
    size_t slot_of(uint64_t key) const { return size_t((key * 0x9E3779B97F4A7C15ull) >> 20) & mask_; }
    void grow() {
        std::vector<Slot> old = std::move(slots_);
        count_ = 0;
        reserve(std::max<size_t>(8, old.size()));
        for (const Slot& s : old)
            if (s.key != kEmpty) insert(uint32_t(s.key >> 32), uint32_t(s.key), s.merge);
    }

    std::vector<Slot> slots_;
    size_t mask_ = 0, count_ = 0;
};

// Scratch buffers of one BPE run, kept between words to avoid allocations.
struct BpeScratch {
    struct Symbol { uint32_t id; int32_t prev, next; bool alive; };
    struct Candidate {
        uint32_t rank, position;
        bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : position > o.position; }
    };
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;  // a min-heap on (rank, position) through std::push_heap/pop_heap
};

// Byte-pair encoding of one pre-token, appending its ids to out. byte_ids[b] is the id of the single byte b
// (-1 if the vocabulary lacks it: HF with no unk_token drops such bytes). Repeatedly merges the adjacent pair
// with the lowest merge rank (leftmost first on ties), through a linked list of symbols and a heap of candidate
// pairs; a candidate whose pair has changed since it was pushed is stale and skipped. O(n log n) per word.
inline void bpe_word(std::string_view word, const int32_t* byte_ids, const MergeTable& merges, BpeScratch& scratch,
                     std::vector<uint32_t>& out) {
    if (word.size() > size_t(INT32_MAX)) throw std::runtime_error("BPE: a single pre-token of 2 GiB or more");
    auto& symbols = scratch.symbols;
    auto& heap = scratch.heap;
    symbols.clear();
    heap.clear();
    for (unsigned char b : word) {
        if (byte_ids[b] < 0) continue;
        const int32_t index = int32_t(symbols.size());
        symbols.push_back({uint32_t(byte_ids[b]), index - 1, index + 1, true});
    }
    if (symbols.empty()) return;
    symbols.back().next = -1;

    const auto greater = [](const BpeScratch::Candidate& a, const BpeScratch::Candidate& b) { return a > b; };
    const auto push_candidate = [&](int32_t left) {
        const int32_t right = symbols[size_t(left)].next;
        if (left < 0 || right < 0) return;
        const MergeTable::Merge* m = merges.find(symbols[size_t(left)].id, symbols[size_t(right)].id);
        if (!m) return;
        heap.push_back({m->rank, uint32_t(left)});
        std::push_heap(heap.begin(), heap.end(), greater);
    };
    for (size_t i = 0; i + 1 < symbols.size(); i++) push_candidate(int32_t(i));

    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), greater);
        const BpeScratch::Candidate top = heap.back();
        heap.pop_back();
        BpeScratch::Symbol& left = symbols[top.position];
        if (!left.alive || left.next < 0) continue;
        BpeScratch::Symbol& right = symbols[size_t(left.next)];
        const MergeTable::Merge* m = merges.find(left.id, right.id);
        if (!m || m->rank != top.rank) continue;  // stale: this pair was changed by another merge
        left.id = m->id;
        right.alive = false;
        left.next = right.next;
        if (right.next >= 0) symbols[size_t(right.next)].prev = int32_t(top.position);
        if (left.prev >= 0) push_candidate(left.prev);
        push_candidate(int32_t(top.position));
    }
    for (int32_t i = 0; i >= 0; i = symbols[size_t(i)].next) out.push_back(symbols[size_t(i)].id);
}

// A cache of word -> ids, so a word seen before skips BPE. Keys and ids live in two arenas; the hash table holds
// offsets into them (32-bit, which the arena budget keeps in range). It is cleared when it reaches its budget,
// which bounds memory on endless input.
class WordCache {
public:
    static constexpr size_t kMaxWordBytes = 256;        // longer words are rare and not worth storing
    static constexpr size_t kMaxArenaBytes = 64 << 20;  // clear the cache beyond this

    // The cached ids of word, or nullptr. `hash` must be hash(word).
    const uint32_t* find(std::string_view word, uint64_t hash, size_t* count) const {
        if (slots_.empty()) return nullptr;
        for (size_t s = hash & mask_;; s = (s + 1) & mask_) {
            const Slot& slot = slots_[s];
            if (slot.length == kEmptyLength) return nullptr;
            if (slot.hash == hash && slot.length == word.size() &&
                std::memcmp(keys_.data() + slot.key_offset, word.data(), word.size()) == 0) {
                *count = slot.id_count;
                return ids_.data() + slot.id_offset;
            }
        }
    }

    void insert(std::string_view word, uint64_t hash, const uint32_t* ids, size_t count) {
        if (word.size() > kMaxWordBytes) return;
        if (keys_.size() + 4 * ids_.size() > kMaxArenaBytes) clear();
        if (2 * (size_ + 1) > slots_.size()) rehash(std::max<size_t>(1024, 2 * slots_.size()));
        size_t s = hash & mask_;
        while (slots_[s].length != kEmptyLength) s = (s + 1) & mask_;
        slots_[s] = Slot{hash, uint32_t(keys_.size()), uint32_t(word.size()), uint32_t(ids_.size()), uint32_t(count)};
        keys_.append(word);
        ids_.insert(ids_.end(), ids, ids + count);
        size_++;
    }

    void clear() {
        slots_.clear();
        keys_.clear();
        ids_.clear();
        size_ = 0;
        mask_ = 0;
    }

    // FNV-1a, 64 bit: words are short, so a simple byte loop is fast enough.
    static uint64_t hash(std::string_view word) {
        uint64_t h = 0xcbf29ce484222325ull;
        for (unsigned char c : word) h = (h ^ c) * 0x100000001b3ull;
        return h ^ (h >> 29);
    }

private:
    static constexpr uint32_t kEmptyLength = ~uint32_t(0);
    struct Slot { uint64_t hash; uint32_t key_offset, length, id_offset, id_count; };

    void rehash(size_t capacity) {
        std::vector<Slot> old = std::move(slots_);
        slots_.assign(capacity, Slot{0, 0, kEmptyLength, 0, 0});
        mask_ = capacity - 1;
        for (const Slot& slot : old) {
            if (slot.length == kEmptyLength) continue;
            size_t s = slot.hash & mask_;
            while (slots_[s].length != kEmptyLength) s = (s + 1) & mask_;
            slots_[s] = slot;
        }
    }

    std::vector<Slot> slots_;
    std::string keys_;
    std::vector<uint32_t> ids_;
    size_t size_ = 0, mask_ = 0;
};

// ============================================================================================
// Section 8: loading tokenizer.json
// ============================================================================================

// A short description of a JSON value for error messages: strings, numbers and booleans by value, the rest by type.
inline std::string tokenizer_json_brief(const JsonValue& value) {
    switch (value.type) {
        case JsonValue::Type::Null: return "null";
        case JsonValue::Type::Bool: return value.boolean ? "true" : "false";
        case JsonValue::Type::Number: {
            char buf[32];
            std::snprintf(buf, sizeof(buf), "%.17g", value.number);
            return buf;
        }
        case JsonValue::Type::String:
            return "\"" + (value.string.size() <= 40 ? value.string : value.string.substr(0, 40) + "...") + "\"";
        case JsonValue::Type::Array: return "an array";
        case JsonValue::Type::Object: return "an object";
    }
    return "an unknown value";
}

// JSON access with messages that name the place in tokenizer.json ("model.vocab must be an object, got ...").
inline const JsonValue& tokenizer_json_member(const JsonValue& object, std::string_view key, const std::string& where) {
    if (object.type != JsonValue::Type::Object) throw std::runtime_error(where + " must be an object");
    const JsonValue* value = object.find(key);
    if (!value) throw std::runtime_error("missing '" + where + "." + std::string(key) + "'");
    return *value;
}

inline const std::string& tokenizer_json_string(const JsonValue& value, const std::string& what) {
    if (value.type != JsonValue::Type::String) throw std::runtime_error(what + " must be a string, got " + tokenizer_json_brief(value));
    return value.string;
}

// Token ids are array indices here, so they are bounded: a corrupt id must not allocate gigabytes.
constexpr uint32_t kMaxTokenId = (1u << 24) - 1;

inline uint32_t tokenizer_json_id(const JsonValue& value, const std::string& what) {
    if (value.type != JsonValue::Type::Number || value.number < 0 || value.number > kMaxTokenId ||
        value.number != double(uint32_t(value.number)))
        throw std::runtime_error(what + " must be an integer id in 0.." + std::to_string(kMaxTokenId) + ", got " +
                                 tokenizer_json_brief(value));
    return uint32_t(value.number);
}

// A flag that is allowed only in one state here: `key` absent, null or equal to `expected` (HF's default).
inline void tokenizer_json_expect_flag(const JsonValue& object, std::string_view key, bool expected,
                                       const std::string& where) {
    const JsonValue* value = object.find(key);
    if (!value || value->type == JsonValue::Type::Null) return;
    if (value->type != JsonValue::Type::Bool || value->boolean != expected)
        throw std::runtime_error(where + "." + std::string(key) + " = " + tokenizer_json_brief(*value) + " is not supported (only " +
                                 (expected ? "true" : "false") + ")");
}

// A member that must be absent or null (an option this implementation does not have).
inline void tokenizer_json_expect_null(const JsonValue& object, std::string_view key, const std::string& where) {
    const JsonValue* value = object.find(key);
    if (value && value->type != JsonValue::Type::Null)
        throw std::runtime_error(where + "." + std::string(key) + " = " + tokenizer_json_brief(*value) + " is not supported (only null)");
}

// The "type" of a pipeline component ("normalizer", ...), or "" when the component is null or absent.
inline std::string tokenizer_json_component_type(const JsonValue& root, std::string_view key) {
    const JsonValue* component = root.find(key);
    if (!component || component->type == JsonValue::Type::Null) return "";
    return tokenizer_json_string(tokenizer_json_member(*component, "type", std::string(key)), std::string(key) + ".type");
}

// ============================================================================================
// Section 9: the tokenizer
// ============================================================================================

class Tokenizer {
public:
    // Loads a Hugging Face tokenizer.json; every error is a runtime_error naming the file and what is wrong.
    static Tokenizer from_file(const std::string& path) {
        std::ifstream file(path, std::ios::binary);
        if (!file) throw std::runtime_error("cannot open tokenizer file '" + path + "'");
        std::ostringstream text;
        text << file.rdbuf();
        if (file.bad()) throw std::runtime_error("cannot read tokenizer file '" + path + "'");
        try {
            return from_json(text.str());
        } catch (const std::runtime_error& e) {
            throw std::runtime_error("tokenizer file '" + path + "': " + e.what());
        }
    }

    static Tokenizer from_json(std::string_view json_text) {
        const JsonValue root = parse_json(json_text);
        if (root.type != JsonValue::Type::Object) throw std::runtime_error("the top level must be an object");
        Tokenizer t;
        t.check_pipeline(root);
        t.load_model(tokenizer_json_member(root, "model", "tokenizer"));
        if (const JsonValue* added = root.find("added_tokens"); added && added->type != JsonValue::Type::Null)
            t.load_added_tokens(*added);
        return t;
    }

    // Token ids of UTF-8 text (throws on invalid UTF-8, naming the byte offset). Not const: it fills a cache of
    // words seen before, so use one Tokenizer per thread.
    std::vector<uint32_t> encode(std::string_view text) {
        std::vector<uint32_t> ids;
        encode_append(text, ids);
        return ids;
    }

    void encode_append(std::string_view text, std::vector<uint32_t>& ids) {
        utf8_check(text);
        raw_added_.split(
            text,
            [&](std::string_view piece) {
                const std::string_view normalized = nfc_ ? normalize_nfc(piece, nfc_storage_) : piece;
                normalized_added_.split(
                    normalized,
                    [&](std::string_view part) { split_gpt2(part, [&](std::string_view word) { encode_word(word, ids); }); },
                    [&](uint32_t id) { ids.push_back(id); });
            },
            [&](uint32_t id) { ids.push_back(id); });
    }

    // Text of token ids. skip_special drops special tokens (<|endoftext|>, <|padding|>), HF's default; bytes that
    // do not form valid UTF-8 (a token sequence cut inside a character) become U+FFFD. Throws on unknown ids.
    std::string decode(const std::vector<uint32_t>& ids, bool skip_special = true) const {
        std::string bytes;
        for (size_t i = 0; i < ids.size(); i++) {
            const uint32_t id = ids[i];
            if (id >= kinds_.size() || kinds_[id] == Kind::Missing)
                throw std::runtime_error("decode: id " + std::to_string(id) + " (at position " + std::to_string(i) +
                                         ") is not a token of this tokenizer (it has " +
                                         std::to_string(kinds_.size()) + " ids)");
            if (skip_special && kinds_[id] == Kind::Special) continue;
            bytes += decoded_[id];
        }
        return utf8_lossy(bytes);
    }

    // Number of ids (largest id + 1): 50277 for Pythia.
    size_t vocab_size() const { return kinds_.size(); }
    bool is_special(uint32_t id) const { return id < kinds_.size() && kinds_[id] == Kind::Special; }
    // The id of a token given as HF spells it (added-token text or byte-level string), or -1.
    int64_t token_to_id(std::string_view token) const {
        auto it = token_ids_.find(std::string(token));
        return it == token_ids_.end() ? -1 : int64_t(it->second);
    }
    size_t merge_count() const { return merges_.size(); }
    // Forgets the words seen so far (memory, or a benchmark that wants a cold start); results never depend on it.
    void clear_cache() { cache_.clear(); }

private:
    enum class Kind : uint8_t { Missing, Normal, Special };

    // The parts of the pipeline around the model must be the ones this file implements (Pythia's).
    void check_pipeline(const JsonValue& root) {
        tokenizer_json_expect_null(root, "truncation", "tokenizer");
        tokenizer_json_expect_null(root, "padding", "tokenizer");
        const std::string normalizer = tokenizer_json_component_type(root, "normalizer");
        if (normalizer != "" && normalizer != "NFC")
            throw std::runtime_error("normalizer type '" + normalizer + "' is not supported (only NFC or none)");
        nfc_ = normalizer == "NFC";
        for (const char* key : {"pre_tokenizer", "decoder"}) {
            const std::string type = tokenizer_json_component_type(root, key);
            if (type != "ByteLevel")
                throw std::runtime_error(std::string(key) + " type '" + type + "' is not supported (only ByteLevel)");
            const JsonValue& component = root.at(key);
            tokenizer_json_expect_flag(component, "add_prefix_space", false, key);
            tokenizer_json_expect_flag(component, "use_regex", true, key);
        }
        // ByteLevel post-processing only trims offsets; it adds no tokens.
        const std::string post = tokenizer_json_component_type(root, "post_processor");
        if (post != "" && post != "ByteLevel")
            throw std::runtime_error("post_processor type '" + post + "' is not supported (only ByteLevel or none)");
    }

    void load_model(const JsonValue& model) {
        const std::string& type = tokenizer_json_string(tokenizer_json_member(model, "type", "model"), "model.type");
        if (type != "BPE") throw std::runtime_error("model.type is '" + type + "', only BPE is supported");
        for (const char* key : {"dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"})
            tokenizer_json_expect_null(model, key, "model");
        tokenizer_json_expect_flag(model, "byte_fallback", false, "model");
        tokenizer_json_expect_flag(model, "ignore_merges", false, "model");
        load_vocab(tokenizer_json_member(model, "vocab", "model"));
        load_merges(tokenizer_json_member(model, "merges", "model"));
    }

    // model.vocab: {"byte-level token": id}. Also fills the single-byte ids and each id's decoded bytes.
    void load_vocab(const JsonValue& vocab) {
        if (vocab.type != JsonValue::Type::Object)
            throw std::runtime_error("model.vocab must be an object, got " + tokenizer_json_brief(vocab));
        token_ids_.reserve(vocab.members.size());
        model_vocab_count_ = vocab.members.size();
        for (const auto& [token, value] : vocab.members) {
            const uint32_t id = tokenizer_json_id(value, "model.vocab['" + token + "']");
            set_token(token, id, Kind::Normal, "model.vocab");
        }
        std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
        for (uint32_t b = 0; b < 256; b++) {
            std::string spelled;
            utf8_append(spelled, kByteAlphabet.code_point[b]);
            if (auto it = token_ids_.find(spelled); it != token_ids_.end()) byte_ids_[b] = int32_t(it->second);
        }
    }

    // Records token <-> id and the bytes the id decodes to (HF's ByteLevel decoder: the byte-level alphabet
    // mapped back, or the token's own UTF-8 when it has a character outside the alphabet, like a space).
    void set_token(const std::string& token, uint32_t id, Kind kind, const char* where) {
        if (id >= kinds_.size()) {
            kinds_.resize(size_t(id) + 1, Kind::Missing);
            decoded_.resize(size_t(id) + 1);
        }
        if (kinds_[id] != Kind::Missing)
            throw std::runtime_error(std::string(where) + ": id " + std::to_string(id) + " is given to two tokens");
        if (utf8_find_invalid(token) != std::string_view::npos)
            throw std::runtime_error(std::string(where) + ": token of id " + std::to_string(id) + " is not valid UTF-8");
        if (!token_ids_.emplace(token, id).second)
            throw std::runtime_error(std::string(where) + ": token '" + token + "' appears twice");
        kinds_[id] = kind;
        if (!byte_level_to_bytes(token, decoded_[id])) decoded_[id] = token;
    }

    // model.merges: "left right" strings (or [left, right] pairs); rank = position in the list.
    void load_merges(const JsonValue& list) {
        if (list.type != JsonValue::Type::Array)
            throw std::runtime_error("model.merges must be an array, got " + tokenizer_json_brief(list));
        merges_.reserve(list.items.size());
        std::string left, right;
        for (size_t rank = 0; rank < list.items.size(); rank++) {
            const JsonValue& item = list.items[rank];
            const std::string where = "model.merges[" + std::to_string(rank) + "]";
            if (item.type == JsonValue::Type::String) {
                const size_t space = item.string.find(' ');
                if (space == std::string::npos || item.string.find(' ', space + 1) != std::string::npos)
                    throw std::runtime_error(where + " must be two tokens separated by one space, got " + tokenizer_json_brief(item));
                left = item.string.substr(0, space);
                right = item.string.substr(space + 1);
            } else if (item.type == JsonValue::Type::Array && item.items.size() == 2) {
                left = tokenizer_json_string(item.items[0], where + "[0]");
                right = tokenizer_json_string(item.items[1], where + "[1]");
            } else {
                throw std::runtime_error(where + " must be a string \"left right\" or a pair, got " + tokenizer_json_brief(item));
            }
            const uint32_t left_id = vocab_id(left, where), right_id = vocab_id(right, where);
            const uint32_t merged_id = vocab_id(left + right, where);
            merges_.insert(left_id, right_id, MergeTable::Merge{uint32_t(rank), merged_id});
        }
    }

    uint32_t vocab_id(const std::string& token, const std::string& where) const {
        auto it = token_ids_.find(token);
        if (it == token_ids_.end()) throw std::runtime_error(where + " refers to '" + token + "', which is not in model.vocab");
        return it->second;
    }

    // added_tokens: [{"id", "content", "special", "normalized", "lstrip", "rstrip", "single_word"}].
    void load_added_tokens(const JsonValue& list) {
        if (list.type != JsonValue::Type::Array)
            throw std::runtime_error("added_tokens must be an array, got " + tokenizer_json_brief(list));
        for (size_t i = 0; i < list.items.size(); i++) {
            const JsonValue& token = list.items[i];
            const std::string where = "added_tokens[" + std::to_string(i) + "]";
            const uint32_t id = tokenizer_json_id(tokenizer_json_member(token, "id", where), where + ".id");
            const std::string& content =
                tokenizer_json_string(tokenizer_json_member(token, "content", where), where + ".content");
            if (content.empty()) throw std::runtime_error(where + ".content is empty");
            for (const char* flag : {"lstrip", "rstrip", "single_word"}) tokenizer_json_expect_flag(token, flag, false, where);
            const JsonValue* special_value = token.find("special");
            const bool special = special_value && special_value->type == JsonValue::Type::Bool && special_value->boolean;
            const JsonValue* normalized_value = token.find("normalized");
            const bool normalized = normalized_value && normalized_value->type == JsonValue::Type::Bool
                                        ? normalized_value->boolean
                                        : !special;  // HF's default
            add_token(content, id, special, where);
            (normalized ? normalized_added_ : raw_added_).add(content, id);
        }
    }

    // HF does not take an added token's id from the file: a token already in model.vocab keeps its vocabulary id,
    // and the others get the next ids after the vocabulary, in file order. We require the file to agree, so that
    // the ids we produce are HF's.
    void add_token(const std::string& content, uint32_t id, bool special, const std::string& where) {
        const Kind kind = special ? Kind::Special : Kind::Normal;
        auto it = token_ids_.find(content);
        if (it != token_ids_.end()) {
            if (it->second != id)
                throw std::runtime_error(where + ": '" + content + "' has id " + std::to_string(id) +
                                         " but model.vocab gives it id " + std::to_string(it->second));
            kinds_[id] = kind;
            return;
        }
        const size_t hf_id = model_vocab_count_ + added_count_;
        if (id != hf_id)
            throw std::runtime_error(where + ": '" + content + "' has id " + std::to_string(id) +
                                     ", but Hugging Face tokenizers gives it id " + std::to_string(hf_id) +
                                     " (the next id after model.vocab and the earlier added tokens)");
        set_token(content, id, kind, where.c_str());
        added_count_++;
    }

    // One pre-token: its single byte, its cached ids, or BPE (then cached).
    void encode_word(std::string_view word, std::vector<uint32_t>& ids) {
        if (word.size() == 1) {
            const int32_t id = byte_ids_[static_cast<unsigned char>(word[0])];
            if (id >= 0) ids.push_back(uint32_t(id));
            return;
        }
        const uint64_t hash = WordCache::hash(word);
        size_t count = 0;
        if (const uint32_t* cached = cache_.find(word, hash, &count)) {
            ids.insert(ids.end(), cached, cached + count);
            return;
        }
        const size_t start = ids.size();
        bpe_word(word, byte_ids_, merges_, scratch_, ids);
        cache_.insert(word, hash, ids.data() + start, ids.size() - start);
    }

    // The model
    std::unordered_map<std::string, uint32_t> token_ids_;  // token as HF spells it -> id (vocab and added tokens)
    std::vector<Kind> kinds_;                              // (vocab_size) what each id is
    std::vector<std::string> decoded_;                     // (vocab_size) the bytes each id decodes to
    int32_t byte_ids_[256];                                // id of each single byte, -1 if none
    MergeTable merges_;
    AddedTokenMatcher raw_added_;         // added tokens matched before normalization ("normalized": false)
    AddedTokenMatcher normalized_added_;  // added tokens matched in the normalized text ("normalized": true)
    bool nfc_ = false;
    size_t model_vocab_count_ = 0;  // entries of model.vocab
    size_t added_count_ = 0;        // added tokens that are not in model.vocab
    // Scratch state of encode
    WordCache cache_;
    BpeScratch scratch_;
    std::string nfc_storage_;
};
