#!/usr/bin/env python3
"""gen_unicode_tables.py: writes unicode_tables.h, the Unicode data that tokenizer.h needs.

    python3 dev/gen_unicode_tables.py [--ucd-dir /usr/share/unicode] [--nfc-age 9.0] [--out unicode_tables.h]

Input: the Unicode Character Database as Debian's package `unicode-data` installs it (/usr/share/unicode).
Output: a header of sorted tables (ranges wherever the data allows) for
  1. the pre-tokenizer's character classes: Letter = \\p{L} (Lu Ll Lt Lm Lo), Number = \\p{N} (Nd Nl No),
     Space = \\s (the White_Space property, which is what Oniguruma's Unicode \\s means);
  2. NFC: canonical combining classes, full canonical decompositions, primary composites (composition pairs
     minus Full_Composition_Exclusion) and the code points NFC must look at (ccc != 0 or NFC_Quick_Check != Yes).
     Hangul syllables are algorithmic and not in the tables.

Why --nfc-age 9.0: Hugging Face tokenizers normalizes with the crate unicode-normalization-alignments 0.1.12,
whose tables are Unicode 9.0.0. To reproduce its output exactly, the NFC tables keep only characters assigned
in Unicode <= 9.0 (DerivedAge.txt). Unicode's normalization stability policy guarantees that the data of those
characters did not change since, so this restriction *is* the Unicode 9.0 NFC data. The character classes use
the full UCD given (HF's regex engine, Oniguruma, has its own, newer tables).
"""
import argparse
import os
import sys

NEEDED_FILES = ["UnicodeData.txt", "PropList.txt", "DerivedAge.txt", "CompositionExclusions.txt",
                "DerivedNormalizationProps.txt", "ReadMe.txt"]

# Hangul syllables compose and decompose algorithmically (Unicode 3.12); the tables leave them out.
S_BASE, L_BASE, V_BASE, T_BASE = 0xAC00, 0x1100, 0x1161, 0x11A7
L_COUNT, V_COUNT, T_COUNT = 19, 21, 28
S_COUNT = L_COUNT * V_COUNT * T_COUNT

# Table sizes of unicode-normalization-alignments 0.1.12 (Unicode 9.0.0): non-zero combining classes,
# canonical decompositions, composition pairs. The restriction to age <= 9.0 must land exactly on them.
HF_NFC_9_0_COUNTS = (814, 2060, 940)

# The fast path in tokenizer.h treats every code point below this as "NFC does nothing here" (its UTF-8 lead
# byte is < 0xCC); the generator checks that it is true.
NFC_QUICK_BELOW = 0x300


def fail(message):
    sys.exit("gen_unicode_tables.py: error: " + message)


def data_lines(path):
    """The data lines of a UCD file: comments stripped, fields split on ';' and trimmed."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                yield [field.strip() for field in line.split(";")]


def parse_range(text):
    """'0041' or '0041..005A' -> (first, last)."""
    if ".." in text:
        a, b = text.split("..")
        return int(a, 16), int(b, 16)
    return int(text, 16), int(text, 16)


def read_unicode_data(path):
    """UnicodeData.txt -> (category, ccc, canonical decomposition) dicts; <..., First>/<..., Last> pairs expanded."""
    category, ccc, decomposition = {}, {}, {}
    range_start = None
    for fields in data_lines(path):
        cp, name, gc, cc, decomp = int(fields[0], 16), fields[1], fields[2], int(fields[3]), fields[5]
        if name.endswith(", First>"):
            range_start = cp
            continue
        first = range_start if name.endswith(", Last>") else cp
        range_start = None
        for c in range(first, cp + 1):
            category[c] = gc
        if cc:
            ccc[cp] = cc
        if decomp and not decomp.startswith("<"):     # "<compat> ..." mappings are not canonical
            decomposition[cp] = [int(x, 16) for x in decomp.split()]
    return category, ccc, decomposition


def read_property(path, name):
    """Code points having binary property `name` in a PropList-style file."""
    result = set()
    for fields in data_lines(path):
        if len(fields) >= 2 and fields[1] == name:
            first, last = parse_range(fields[0])
            result.update(range(first, last + 1))
    return result


def read_nfc_quick_check(path):
    """DerivedNormalizationProps.txt: code point -> 'N' or 'M' for NFC_QC (absent = Yes)."""
    result = {}
    for fields in data_lines(path):
        if len(fields) >= 3 and fields[1] == "NFC_QC":
            first, last = parse_range(fields[0])
            for c in range(first, last + 1):
                result[c] = fields[2]
    return result


def read_ages(path):
    """DerivedAge.txt: code point -> (major, minor) of the version that assigned it."""
    ages = {}
    for fields in data_lines(path):
        first, last = parse_range(fields[0])
        major, minor = (int(x) for x in fields[1].split("."))
        for c in range(first, last + 1):
            ages[c] = (major, minor)
    return ages


def read_ucd_version(path):
    """The version line of ReadMe.txt ('... Unicode 15.0.0 ...' or the URL of the version folder)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for word in text.replace("/", " ").split():
        parts = word.strip(".,()").split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and int(parts[0]) >= 3:
            return ".".join(parts)
    fail("no Unicode version (like 15.0.0) found in " + path)


def merge_ranges(values):
    """{code point: value} -> [(first, last, value)] of maximal runs of consecutive code points with one value."""
    ranges = []
    for c in sorted(values):
        v = values[c]
        if ranges and ranges[-1][1] == c - 1 and ranges[-1][2] == v:
            ranges[-1][1] = c
        else:
            ranges.append([c, c, v])
    return [tuple(r) for r in ranges]


def char_classes(category, white_space):
    """code point -> 'Letter' / 'Number' / 'Space' for the pre-tokenizer's \\p{L}, \\p{N}, \\s."""
    classes = {}
    for c, gc in category.items():
        if gc in ("Lu", "Ll", "Lt", "Lm", "Lo"):
            classes[c] = "Letter"
        elif gc in ("Nd", "Nl", "No"):
            classes[c] = "Number"
    for c in white_space:
        if c in classes:
            fail("U+%04X is both White_Space and %s; the pre-tokenizer assumes the classes are disjoint"
                 % (c, classes[c]))
        classes[c] = "Space"
    return classes


def full_decomposition(c, decomposition):
    """Recursive canonical decomposition of c (without Hangul): a list of code points."""
    if c not in decomposition:
        return [c]
    out = []
    for d in decomposition[c]:
        out.extend(full_decomposition(d, decomposition))
    return out


def nfc_data(ccc, decomposition, exclusions, full_exclusion_ucd, ages, max_age):
    """NFC tables for characters assigned in Unicode <= max_age: (ccc, full decompositions, compositions, not_quick)."""
    keep = lambda c: c in ages and ages[c] <= max_age
    ccc = {c: v for c, v in ccc.items() if keep(c)}
    decomposition = {c: d for c, d in decomposition.items() if keep(c)}
    for c, d in decomposition.items():
        if not all(keep(x) for x in d):
            fail("U+%04X (kept) decomposes into a character newer than %d.%d" % ((c,) + max_age))

    # Full_Composition_Exclusion = the listed exclusions + singletons + decompositions starting with a
    # non-starter (UAX #15). Derived here and compared with the UCD's own derivation.
    full_exclusion = {c for c in exclusions if keep(c)}
    for c, d in decomposition.items():
        if len(d) == 1 or ccc.get(c, 0) != 0 or ccc.get(d[0], 0) != 0:
            full_exclusion.add(c)
    ucd = {c for c in full_exclusion_ucd if keep(c)}
    if full_exclusion != ucd:
        fail("derived Full_Composition_Exclusion differs from DerivedNormalizationProps.txt at %s"
             % sorted("U+%04X" % c for c in full_exclusion ^ ucd)[:10])

    compositions = {}
    for c, d in decomposition.items():
        if c not in full_exclusion:
            if len(d) != 2:
                fail("primary composite U+%04X does not decompose into a pair" % c)
            compositions[(d[0], d[1])] = c
    full = {c: full_decomposition(c, decomposition) for c in decomposition}

    # NFC_Quick_Check, derived: No = excluded from composition, Maybe = can be the second of a pair.
    seconds = {b for (_a, b) in compositions}
    seconds |= set(range(V_BASE, V_BASE + V_COUNT)) | set(range(T_BASE + 1, T_BASE + T_COUNT))
    not_quick = set(ccc) | seconds | full_exclusion
    return ccc, full, compositions, not_quick, seconds, full_exclusion


def check_nfc_data(ccc, full, compositions, not_quick, seconds, full_exclusion, nfc_qc, ages, max_age):
    """Consistency checks that tokenizer.h relies on. Fails loudly rather than writing a wrong header."""
    for c, qc in nfc_qc.items():
        if c in ages and ages[c] <= max_age and not (S_BASE <= c < S_BASE + S_COUNT):
            derived = "N" if c in full_exclusion else "M" if c in seconds else "Y"
            if derived != qc:
                fail("derived NFC_QC of U+%04X is %s, DerivedNormalizationProps.txt says %s" % (c, derived, qc))
    for c in not_quick:
        if c < NFC_QUICK_BELOW:
            fail("U+%04X needs NFC work but is below the fast-path limit U+%04X" % (c, NFC_QUICK_BELOW))
    for c, d in full.items():
        # A quick character may decompose, but then only into a starter that cannot compose backwards:
        # this is what makes "a quick character starts a new normalization segment" true.
        if c not in not_quick and (ccc.get(d[0], 0) != 0 or d[0] in seconds):
            fail("quick character U+%04X decomposes into a non-starter or a second" % c)
        if len(d) > 4:
            fail("U+%04X decomposes into %d characters; tokenizer.h assumes at most 4" % (c, len(d)))


def c_identifier_list(items, per_line, indent="    "):
    lines = []
    for i in range(0, len(items), per_line):
        lines.append(indent + " ".join(items[i:i + per_line]))
    return "\n".join(lines)


def write_header(path, ucd_version, nfc_age, classes, ccc, full, compositions, not_quick):
    class_ranges = merge_ranges(classes)
    ccc_ranges = merge_ranges(ccc)
    quick_ranges = merge_ranges({c: 1 for c in not_quick})
    decomp_entries, decomp_data = [], []
    for c in sorted(full):
        decomp_entries.append("{0x%04X, %d, %d}," % (c, len(decomp_data), len(full[c])))
        decomp_data.extend(full[c])
    if len(decomp_data) > 0xFFFF:
        fail("decomposition data has %d entries; Decomposition::offset is 16 bits" % len(decomp_data))
    comp_entries = ["{0x%04X, 0x%04X, 0x%04X}," % (a, b, compositions[(a, b)]) for (a, b) in sorted(compositions)]

    age = "%d.%d.0" % nfc_age
    out = []
    out.append("// unicode_tables.h: Unicode data for tokenizer.h (pre-tokenizer classes, NFC).")
    out.append("// GENERATED by dev/gen_unicode_tables.py from Debian's unicode-data (Unicode %s); do not edit by hand,"
               % ucd_version)
    out.append("// rerun the script (dev/README.md). All tables are sorted by code point for binary search.")
    out.append("// defines: unicode::CharClass, kClassRanges, kCombiningClassRanges, kNfcNotQuickRanges, kDecompositions,")
    out.append("//          kDecompositionData, kCompositions, kUcdVersion, kNfcVersion, kNfcQuickBelow")
    out.append("#pragma once")
    out.append("#include <cstdint>")
    out.append("")
    out.append("namespace unicode {")
    out.append("")
    out.append("// Version of the UCD the character classes come from.")
    out.append('inline constexpr const char* kUcdVersion = "%s";' % ucd_version)
    out.append("// The NFC tables hold only characters assigned in Unicode <= this version: Hugging Face tokenizers'")
    out.append("// NFC (crate unicode-normalization-alignments 0.1.12) knows Unicode 9.0.0 and nothing newer.")
    out.append('inline constexpr const char* kNfcVersion = "%s";' % age)
    out.append("// Every code point below this is NFC-inert (combining class 0, NFC_Quick_Check = Yes).")
    out.append("inline constexpr uint32_t kNfcQuickBelow = 0x%X;" % NFC_QUICK_BELOW)
    out.append("")
    out.append("// Pre-tokenizer classes of the GPT-2 split pattern: \\p{L} = Lu Ll Lt Lm Lo, \\p{N} = Nd Nl No,")
    out.append("// \\s = White_Space. Code points in no range (incl. unassigned ones) are Other.")
    out.append("enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };")
    out.append("struct ClassRange { uint32_t first, last; CharClass cls; };")
    out.append("inline constexpr ClassRange kClassRanges[] = {  // %d ranges" % len(class_ranges))
    out.append(c_identifier_list(["{0x%04X, 0x%04X, k%s}," % (a, b, v) for a, b, v in class_ranges], 4))
    out.append("};")
    out.append("")
    out.append("// Canonical combining class (ccc) of the code points where it is not 0.")
    out.append("struct CombiningClassRange { uint32_t first, last; uint8_t ccc; };")
    out.append("inline constexpr CombiningClassRange kCombiningClassRanges[] = {  // %d ranges" % len(ccc_ranges))
    out.append(c_identifier_list(["{0x%04X, 0x%04X, %d}," % r for r in ccc_ranges], 4))
    out.append("};")
    out.append("")
    out.append("// Code points NFC has to look at: ccc != 0 or NFC_Quick_Check No/Maybe (composition-excluded")
    out.append("// characters and characters that can combine with the one before). All others are 'quick': a quick")
    out.append("// character starts a segment that normalizes independently of the text before it.")
    out.append("struct Range { uint32_t first, last; };")
    out.append("inline constexpr Range kNfcNotQuickRanges[] = {  // %d ranges" % len(quick_ranges))
    out.append(c_identifier_list(["{0x%04X, 0x%04X}," % (a, b) for a, b, _ in quick_ranges], 6))
    out.append("};")
    out.append("")
    out.append("// Full (recursive) canonical decomposition of each decomposable code point (Hangul excluded):")
    out.append("// kDecompositionData[offset .. offset + length).")
    out.append("struct Decomposition { uint32_t code_point; uint16_t offset; uint8_t length; };")
    out.append("inline constexpr Decomposition kDecompositions[] = {  // %d code points" % len(decomp_entries))
    out.append(c_identifier_list(decomp_entries, 5))
    out.append("};")
    out.append("inline constexpr uint32_t kDecompositionData[] = {")
    out.append(c_identifier_list(["0x%04X," % c for c in decomp_data], 10))
    out.append("};")
    out.append("")
    out.append("// Primary composites: (first, second) -> composite, sorted by (first, second). Hangul excluded.")
    out.append("struct Composition { uint32_t first, second, composite; };")
    out.append("inline constexpr Composition kCompositions[] = {  // %d pairs" % len(comp_entries))
    out.append(c_identifier_list(comp_entries, 4))
    out.append("};")
    out.append("")
    out.append("}  // namespace unicode")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    return len(class_ranges), len(ccc_ranges), len(quick_ranges), len(decomp_entries), len(comp_entries)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ucd-dir", default="/usr/share/unicode", help="folder of the UCD text files")
    parser.add_argument("--nfc-age", default="9.0", help="keep NFC data of characters assigned up to this version")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                      "unicode_tables.h"))
    args = parser.parse_args()

    missing = [f for f in NEEDED_FILES if not os.path.isfile(os.path.join(args.ucd_dir, f))]
    if missing:
        fail("missing %s in %s. Install Debian's Unicode data: apt-get install unicode-data"
             % (", ".join(missing), args.ucd_dir))
    path = lambda name: os.path.join(args.ucd_dir, name)
    nfc_age = tuple(int(x) for x in args.nfc_age.split("."))

    ucd_version = read_ucd_version(path("ReadMe.txt"))
    category, ccc, decomposition = read_unicode_data(path("UnicodeData.txt"))
    classes = char_classes(category, read_property(path("PropList.txt"), "White_Space"))
    ages = read_ages(path("DerivedAge.txt"))
    exclusions = {c for fields in data_lines(path("CompositionExclusions.txt"))
                  for c in range(parse_range(fields[0])[0], parse_range(fields[0])[1] + 1)}
    full_exclusion_ucd = read_property(path("DerivedNormalizationProps.txt"), "Full_Composition_Exclusion")

    ccc, full, compositions, not_quick, seconds, full_exclusion = nfc_data(
        ccc, decomposition, exclusions, full_exclusion_ucd, ages, nfc_age)
    check_nfc_data(ccc, full, compositions, not_quick, seconds, full_exclusion,
                   read_nfc_quick_check(path("DerivedNormalizationProps.txt")), ages, nfc_age)
    counts = (len(ccc), len(full), len(compositions))
    if nfc_age == (9, 0) and counts != HF_NFC_9_0_COUNTS:
        fail("NFC data restricted to Unicode 9.0 has %s ccc/decomposition/composition entries, the HF crate has %s"
             % (counts, HF_NFC_9_0_COUNTS))

    sizes = write_header(args.out, ucd_version, nfc_age, classes, ccc, full, compositions, not_quick)
    print("wrote %s: UCD %s, NFC data of Unicode <= %s (%d ccc, %d decompositions, %d compositions)"
          % (os.path.normpath(args.out), ucd_version, args.nfc_age, *counts))
    print("  ranges: %d classes, %d ccc, %d not-quick; %d decomposition entries, %d composition pairs" % sizes)


if __name__ == "__main__":
    main()
