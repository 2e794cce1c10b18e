// test_util.h: small helpers shared by the test files of ./test_blocktf.
// defines: gpu_present, GPU_TEST_CASE, data_path, fixture_path, relative_error, read_file_bytes, write_bytes, TempDir
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>
#include <unistd.h>
#include <cuda_runtime.h>
#include <doctest/doctest.h>

// True when the CUDA runtime finds a usable GPU. On a machine without a driver the runtime call just
// returns an error code, so this is safe to call anywhere.
inline bool gpu_present() {
    static const bool present = [] {
        int count = 0;
        return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
    }();
    return present;
}

// A test case that needs a GPU: reported by doctest as skipped (never as passed) when none is present.
#define GPU_TEST_CASE(name) TEST_CASE("[gpu] " name * doctest::skip(!gpu_present()))

// Shared data (tokenizer, texts, shards): $BLOCKTF_DATA_DIR, set by `make test` from DATA_DIR.
inline std::string data_path(const std::string& relative) {
    const char* dir = std::getenv("BLOCKTF_DATA_DIR");
    return std::string(dir ? dir : "../shared/data") + "/" + relative;
}

// Committed golden files; the test binary runs from the repository root.
inline std::string fixture_path(const std::string& name) { return "test/fixtures/" + name; }

// Norm-wise relative error ||out - ref|| / ||ref|| (METHOD.md), in double. NaN anywhere gives NaN,
// which fails every `<` comparison, so NaN never passes.
template <typename A, typename B>
double relative_error(const A* out, const B* ref, size_t n) {
    double diff2 = 0.0, ref2 = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)out[i] - (double)ref[i];
        diff2 += d * d;
        ref2 += (double)ref[i] * (double)ref[i];
    }
    if (ref2 == 0.0) return diff2 == 0.0 ? 0.0 : INFINITY;
    return std::sqrt(diff2 / ref2);
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    REQUIRE(f.good());
    f.write(bytes.data(), (std::streamsize)bytes.size());
    REQUIRE(f.good());
}

inline std::vector<uint8_t> read_file_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    REQUIRE_MESSAGE(f.good(), "cannot open " << path);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// A fresh directory under /tmp, removed with everything in it at the end of the test.
struct TempDir {
    std::string path;
    TempDir() {
        char pattern[] = "/tmp/blocktf_test_XXXXXX";
        REQUIRE(mkdtemp(pattern) != nullptr);
        path = pattern;
    }
    ~TempDir() {
        std::error_code ignored;
        std::filesystem::remove_all(path, ignored);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    std::string file(const std::string& name) const { return path + "/" + name; }
    std::vector<std::string> entries() const {   // names in the directory, sorted
        std::vector<std::string> names;
        for (const auto& entry : std::filesystem::directory_iterator(path)) names.push_back(entry.path().filename().string());
        std::sort(names.begin(), names.end());
        return names;
    }
};
