// test_attention.cu: checks and times the fused attention kernels of dev/attention/fused_attention.cuh and the
// FlashAttention-2 kernels of dev/attention/flash2.cuh.
//   1. Each kernel pair (small: S <= 16; flash and flash2: any S) against a double-precision CPU reference (plain loops) on
//      fresh random inputs, rounded to floatX first so that both sides see the same numbers, with key masks that
//      leave some queries without any visible key and mask one sequence entirely. Outputs are poisoned (all bits
//      set: NaN in fp32 and bf16) before every kernel call. Per output, the norm-wise relative error
//      ||gpu - ref|| / ||ref|| must stay under 1e-5 (FP32 build) or 1e-2 (BF16 build); NaN never passes. A second
//      forward + backward into fresh poisoned buffers must give bitwise-equal outputs (determinism).
//   2. The fused kernels against blocktf's own attention_forward / attention_backward (cuBLAS path) on one medium
//      shape each: a cross-check of the semantics against the code they will replace.
//   3. flash2_attention_cached_prefill (new queries over a KV cache, generation's prefill) against the reference and
//      against blocktf's attention_cached, p0 = 0 and p0 > 0, left-padded prompts (masked leading positions), cache
//      slots past the new positions and masked slots filled with NaN (neither kernel may read them into a result).
//   4. A benchmark at the paper's shapes, fused vs blocktf's path (CUDA events, warm-up, median): one markdown table;
//      then cached prefill vs attention_cached at generation's shapes.
// Build, from the repository root (dev/attention/run.sh builds both precisions and runs them):
//   nvcc -std=c++17 -O2 -arch=sm_90 -I. -DBLOCKTF_PRECISION_BF16 dev/attention/test_attention.cu -o build/test_attention
//        -lcublas -lcublasLt          (or -DBLOCKTF_PRECISION_FP32)
// Run: build/test_attention [--quick] [--no-bench]. --quick: a few small shapes only (for compute-sanitizer).
// Exit status: 0 when every check passed, 1 otherwise.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include "blocktf.cu"
#include "dev/attention/fused_attention.cuh"
#include "dev/attention/flash2.cuh"

namespace {

constexpr bool kFp32Build = std::is_same<floatX, float>::value;
// METHOD.md: fp32 arithmetic lands far under 1e-3; bf16 operands between 1e-3 and 1e-2.
constexpr double kTolerance = kFp32Build ? 1e-5 : 1e-2;
// Fused vs blocktf's path: two implementations, each within kTolerance of the truth.
constexpr double kCrossTolerance = 2 * kTolerance;

int g_checks = 0, g_failures = 0;

void report(bool pass, const std::string& line) {
    g_checks++;
    if (!pass) g_failures++;
    std::printf("%s  %s\n", pass ? "PASS" : "FAIL", line.c_str());
    std::fflush(stdout);
}

// Runs one check; an exception (a CUDA error, a rejected shape) fails that check and the run goes on.
void guarded(const std::string& what, const std::function<void()>& check) {
    try {
        check();
    } catch (const std::exception& e) {
        report(false, what + ": exception: " + e.what());
    }
}

std::string format(const char* fmt, double value) {
    char buffer[64];
    std::snprintf(buffer, sizeof(buffer), fmt, value);
    return buffer;
}

// floatX <-> float on the host, through the bit patterns (loader.h's bf16 conversion rounds to nearest even).
float host_float(floatX x) {
    if (kFp32Build) { float f; std::memcpy(&f, &x, sizeof(f)); return f; }
    uint16_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return bf16_to_float(bits);
}
floatX host_floatX(float f) {
    floatX x;
    if (kFp32Build) std::memcpy(static_cast<void*>(&x), &f, sizeof(f));
    else { uint16_t bits = float_to_bf16(f); std::memcpy(static_cast<void*>(&x), &bits, sizeof(bits)); }
    return x;
}

// ----------------------------------------------------------------------------------------------------------------
// Shapes, inputs, outputs.

struct Shape {
    int nseq, S, NH, HS;
    size_t elements() const { return (size_t)nseq * NH * S * HS; }   // of q, k, v, out, dout, dq, dk, dv
    size_t rows() const { return (size_t)nseq * NH * S; }            // of lse, delta
    std::string str() const {
        char buffer[96];
        std::snprintf(buffer, sizeof(buffer), "nseq %4d NH %2d S %4d HS %3d", nseq, NH, S, HS);
        return buffer;
    }
};

enum class Kind { kSmall, kFlash, kFlash2 };
const char* kind_name(Kind kind) { return kind == Kind::kSmall ? "small" : kind == Kind::kFlash ? "flash" : "flash2"; }
bool has_lse(Kind kind) { return kind != Kind::kSmall; }

struct HostInputs {
    std::vector<float> q, k, v;   // (nseq, NH, S, HS), floatX-rounded
    std::vector<float> dout;      // (nseq, S, NH*HS)
    std::vector<int> key_mask;    // (nseq, S)
};
struct DeviceInputs {
    DeviceBuffer<floatX> q, k, v, dout;
    DeviceBuffer<int> key_mask;
};

// N(0, 1) values rounded to floatX: returned as floats, uploaded as floatX.
std::vector<float> random_values(size_t n, std::mt19937& rng, DeviceBuffer<floatX>& device) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<floatX> bits(n);
    std::vector<float> values(n);
    for (size_t i = 0; i < n; i++) {
        bits[i] = host_floatX(normal(rng));
        values[i] = host_float(bits[i]);
    }
    device = DeviceBuffer<floatX>(n);
    device.upload(bits.data(), n);
    return values;
}

// About 80% of keys visible at random, plus the cases that matter:
//   sequence 0: keys 0 and 1 masked, so queries 0 and 1 see no key; when S >= 128 also keys 59..132, which covers the
//     whole key tiles 64..127 of the flash forward and 64..95, 96..127 of its backward (the all-masked tile skip);
//   the last sequence, when nseq > 1: every key masked, so none of its queries sees a key.
std::vector<int> make_key_mask(const Shape& s, std::mt19937& rng) {
    std::vector<int> mask((size_t)s.nseq * s.S);
    for (int& m : mask) m = rng() % 5 != 0;
    for (int j = 0; j < std::min(2, s.S); j++) mask[j] = 0;
    if (s.S >= 128)
        for (int j = 59; j < std::min(133, s.S); j++) mask[j] = 0;
    if (s.nseq > 1)
        for (int j = 0; j < s.S; j++) mask[(size_t)(s.nseq - 1) * s.S + j] = 0;
    return mask;
}

void make_inputs(const Shape& s, uint32_t seed, HostInputs& host, DeviceInputs& device) {
    std::mt19937 rng(seed);
    host.q = random_values(s.elements(), rng, device.q);
    host.k = random_values(s.elements(), rng, device.k);
    host.v = random_values(s.elements(), rng, device.v);
    host.dout = random_values(s.elements(), rng, device.dout);
    host.key_mask = make_key_mask(s, rng);
    device.key_mask = DeviceBuffer<int>(host.key_mask.size());
    device.key_mask.upload(host.key_mask.data(), host.key_mask.size());
}

struct Outputs {
    DeviceBuffer<floatX> out;          // (nseq, S, NH*HS)
    DeviceBuffer<floatX> dq, dk, dv;   // (nseq, NH, S, HS)
    DeviceBuffer<float> lse, delta;    // (nseq, NH, S): flash only (delta is the backward's scratch)
    explicit Outputs(const Shape& s)
        : out(s.elements()), dq(s.elements()), dk(s.elements()), dv(s.elements()), lse(s.rows()), delta(s.rows()) {}
};

template <typename T>
void poison(DeviceBuffer<T>& buffer) { cudaCheck(cudaMemset(buffer.data(), 0xFF, buffer.size() * sizeof(T))); }

template <typename T>
std::vector<float> download(const DeviceBuffer<T>& buffer) {
    std::vector<T> raw(buffer.size());
    buffer.download(raw.data(), raw.size());
    std::vector<float> values(raw.size());
    for (size_t i = 0; i < raw.size(); i++) {
        if constexpr (std::is_same<T, float>::value) values[i] = raw[i];
        else values[i] = host_float(raw[i]);
    }
    return values;
}
template <typename T>
std::vector<unsigned char> download_bytes(const DeviceBuffer<T>& buffer) {
    std::vector<unsigned char> bytes(buffer.size() * sizeof(T));
    cudaCheck(cudaMemcpy(bytes.data(), buffer.data(), bytes.size(), cudaMemcpyDeviceToHost));
    return bytes;
}

// The fused kernels of one kind, exactly as blocktf would call them.
void fused_forward(Kind kind, Outputs& o, const DeviceInputs& in, const Shape& s, cudaStream_t stream) {
    if (kind == Kind::kSmall)
        small_attention_forward(o.out.data(), in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(), s.nseq, s.S, s.NH,
                                s.HS, stream);
    else if (kind == Kind::kFlash)
        flash_attention_forward(o.out.data(), o.lse.data(), in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(),
                                s.nseq, s.S, s.NH, s.HS, stream);
    else
        flash2_attention_forward(o.out.data(), o.lse.data(), in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(),
                                 s.nseq, s.S, s.NH, s.HS, stream);
}
void fused_backward(Kind kind, Outputs& o, const DeviceInputs& in, const Shape& s, cudaStream_t stream) {
    if (kind == Kind::kSmall)
        small_attention_backward(o.dq.data(), o.dk.data(), o.dv.data(), in.dout.data(), in.q.data(), in.k.data(),
                                 in.v.data(), in.key_mask.data(), s.nseq, s.S, s.NH, s.HS, stream);
    else if (kind == Kind::kFlash)
        flash_attention_backward(o.dq.data(), o.dk.data(), o.dv.data(), in.dout.data(), o.out.data(), o.lse.data(),
                                 in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(), o.delta.data(), s.nseq, s.S,
                                 s.NH, s.HS, stream);
    else
        flash2_attention_backward(o.dq.data(), o.dk.data(), o.dv.data(), in.dout.data(), o.out.data(), o.lse.data(),
                                  in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(), o.delta.data(), s.nseq, s.S,
                                  s.NH, s.HS, stream);
}

// Forward then backward, each output poisoned right before the call that writes it; synchronised and checked.
void run_poisoned(Kind kind, Outputs& o, const DeviceInputs& in, const Shape& s, cudaStream_t stream) {
    poison(o.out);
    poison(o.lse);
    fused_forward(kind, o, in, s, stream);
    cudaCheck(cudaStreamSynchronize(stream));
    poison(o.dq);
    poison(o.dk);
    poison(o.dv);
    poison(o.delta);
    fused_backward(kind, o, in, s, stream);
    cudaCheck(cudaStreamSynchronize(stream));
    cudaCheck(cudaGetLastError());
}

// ----------------------------------------------------------------------------------------------------------------
// The reference: the semantics of fused_attention.cuh's header comment, in double, plain loops.

struct Reference {
    std::vector<double> out, dq, dk, dv;   // layouts as the GPU's
    std::vector<double> lse;               // (nseq, NH, S); 0 for a query that sees no key (the kernels' convention)
};

Reference reference_attention(const Shape& s, const HostInputs& in) {
    const int S = s.S, NH = s.NH, HS = s.HS;
    const double scale = 1.0 / std::sqrt((double)HS);
    Reference r;
    r.out.assign(s.elements(), 0.0);
    r.dq.assign(s.elements(), 0.0);
    r.dk.assign(s.elements(), 0.0);
    r.dv.assign(s.elements(), 0.0);
    r.lse.assign(s.rows(), 0.0);
    std::vector<double> p(S), dp(S);
    std::vector<char> visible(S);
    for (int seq = 0; seq < s.nseq; seq++)
        for (int h = 0; h < NH; h++) {
            const size_t head = (size_t)seq * NH + h;
            auto at = [&](int t) { return (head * S + t) * HS; };                 // row t of q, k, v, dq, dk, dv
            auto merged = [&](int t) { return (((size_t)seq * S + t) * NH + h) * HS; };   // row t of out, dout
            for (int i = 0; i < S; i++) {
                double max_s = -INFINITY;
                for (int j = 0; j < S; j++) {
                    visible[j] = j <= i && in.key_mask[(size_t)seq * S + j] != 0;
                    if (!visible[j]) continue;
                    double dot = 0.0;
                    for (int d = 0; d < HS; d++) dot += (double)in.q[at(i) + d] * in.k[at(j) + d];
                    p[j] = scale * dot;
                    max_s = std::max(max_s, p[j]);
                }
                if (max_s == -INFINITY) continue;   // sees no key: out, lse, dq stay 0
                double sum = 0.0;
                for (int j = 0; j <= i; j++) if (visible[j]) sum += std::exp(p[j] - max_s);
                const double lse = max_s + std::log(sum);
                r.lse[head * S + i] = lse;
                double delta = 0.0;
                for (int j = 0; j <= i; j++) {
                    if (!visible[j]) continue;
                    p[j] = std::exp(p[j] - lse);
                    double dot = 0.0;
                    for (int d = 0; d < HS; d++) {
                        r.out[merged(i) + d] += p[j] * in.v[at(j) + d];
                        dot += (double)in.dout[merged(i) + d] * in.v[at(j) + d];
                    }
                    dp[j] = dot;
                    delta += p[j] * dp[j];
                }
                for (int j = 0; j <= i; j++) {
                    if (!visible[j]) continue;
                    const double ds = p[j] * (dp[j] - delta);
                    for (int d = 0; d < HS; d++) {
                        r.dv[at(j) + d] += p[j] * in.dout[merged(i) + d];
                        r.dq[at(i) + d] += scale * ds * in.k[at(j) + d];
                        r.dk[at(j) + d] += scale * ds * in.q[at(i) + d];
                    }
                }
            }
        }
    return r;
}

// ||gpu - ref|| / ||ref|| (||gpu|| when ref is all zeros); NaN when gpu holds a NaN or an infinity, so it fails.
double relative_error(const std::vector<float>& gpu, const std::vector<double>& ref) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < gpu.size(); i++) {
        if (!std::isfinite(gpu[i])) return NAN;
        diff += (gpu[i] - ref[i]) * (gpu[i] - ref[i]);
        norm += ref[i] * ref[i];
    }
    return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}
double relative_error(const std::vector<float>& gpu, const std::vector<float>& ref) {
    return relative_error(gpu, std::vector<double>(ref.begin(), ref.end()));
}

// ----------------------------------------------------------------------------------------------------------------
// 1. Fused kernels against the reference.

void check_fused(Kind kind, const Shape& s, uint32_t seed) {
    HostInputs host;
    DeviceInputs device;
    make_inputs(s, seed, host, device);
    const Reference ref = reference_attention(s, host);
    Outputs first(s), second(s);
    run_poisoned(kind, first, device, s, 0);
    run_poisoned(kind, second, device, s, 0);

    std::string line = std::string(kind_name(kind)) + "  " + s.str() + "  ";
    bool pass = true;
    auto compare = [&](const char* name, const std::vector<float>& gpu, const std::vector<double>& want) {
        const double error = relative_error(gpu, want);
        pass = pass && error < kTolerance;
        line += std::string(name) + format(" %.1e  ", error);
    };
    compare("out", download(first.out), ref.out);
    if (has_lse(kind)) compare("lse", download(first.lse), ref.lse);
    compare("dq", download(first.dq), ref.dq);
    compare("dk", download(first.dk), ref.dk);
    compare("dv", download(first.dv), ref.dv);
    bool same = download_bytes(first.out) == download_bytes(second.out) && download_bytes(first.dq) == download_bytes(second.dq) &&
                download_bytes(first.dk) == download_bytes(second.dk) && download_bytes(first.dv) == download_bytes(second.dv);
    if (has_lse(kind)) same = same && download_bytes(first.lse) == download_bytes(second.lse);
    line += same ? "rerun bitwise equal" : "RERUN DIFFERS";
    report(pass && same, line);
}

// ----------------------------------------------------------------------------------------------------------------
// 2. Fused kernels against blocktf's attention_forward / attention_backward (scratch sized as GpuStack sizes it).

void check_against_blocktf(Kind kind, const Shape& s, uint32_t seed) {
    Gpu gpu;
    HostInputs host;
    DeviceInputs device;
    make_inputs(s, seed, host, device);
    const Reference ref = reference_attention(s, host);
    AttentionScratch scratch(s.nseq, s.NH, s.S, s.HS);
    DeviceBuffer<floatX> out(s.elements()), dq(s.elements()), dk(s.elements()), dv(s.elements());
    poison(out);
    attention_forward(gpu, out.data(), device.q.data(), device.k.data(), device.v.data(), device.key_mask.data(), scratch,
                      s.nseq, s.S, s.NH, s.HS);
    poison(dq);
    poison(dk);
    poison(dv);
    attention_backward(gpu, dq.data(), dk.data(), dv.data(), device.dout.data(), device.q.data(), device.k.data(),
                       device.v.data(), device.key_mask.data(), scratch, s.nseq, s.S, s.NH, s.HS);
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    Outputs fused(s);
    run_poisoned(kind, fused, device, s, gpu.stream);

    std::string line = std::string(kind_name(kind)) + " vs blocktf  " + s.str() + "  fused-blocktf (blocktf-ref):  ";
    bool pass = true;
    auto compare = [&](const char* name, const DeviceBuffer<floatX>& mine, const DeviceBuffer<floatX>& theirs,
                       const std::vector<double>& want) {
        const std::vector<float> blocktf = download(theirs);
        const double error = relative_error(download(mine), blocktf);
        pass = pass && error < kCrossTolerance;
        line += std::string(name) + format(" %.1e", error) + format(" (%.1e)  ", relative_error(blocktf, want));
    };
    compare("out", fused.out, out, ref.out);
    compare("dq", fused.dq, dq, ref.dq);
    compare("dk", fused.dk, dk, ref.dk);
    compare("dv", fused.dv, dv, ref.dv);
    report(pass, line);
}

// ----------------------------------------------------------------------------------------------------------------
// 3. Cached prefill (flash2_attention_cached_prefill) against the reference and blocktf's attention_cached.

struct CachedShape {
    int nseq, S_new, NH, HS, capacity, p0;
    bool masked;   // false: key_mask null (every cached position visible)
    size_t q_elements() const { return (size_t)nseq * S_new * NH * HS; }         // of q and out
    size_t cache_elements() const { return (size_t)nseq * NH * capacity * HS; }  // of k_cache and v_cache
    std::string str() const {
        char buffer[128];
        std::snprintf(buffer, sizeof(buffer), "nseq %4d NH %2d S_new %4d capacity %4d p0 %3d HS %3d mask %s", nseq, NH, S_new,
                      capacity, p0, HS, masked ? "yes " : "null");
        return buffer;
    }
};

// out (nseq, S_new, NH*HS) in double: query i of (seq, h) (cache position p0 + i) over cached positions j <= p0 + i
// with key_mask[seq * capacity + j] = 1 (all when key_mask is empty); 0 for a query that sees no position.
std::vector<double> reference_cached(const CachedShape& c, const std::vector<float>& q, const std::vector<float>& k,
                                     const std::vector<float>& v, const std::vector<int>& key_mask) {
    const int HS = c.HS, NH = c.NH;
    const double scale = 1.0 / std::sqrt((double)HS);
    std::vector<double> out(c.q_elements(), 0.0), score(c.p0 + c.S_new);
    for (int seq = 0; seq < c.nseq; seq++)
        for (int h = 0; h < NH; h++) {
            auto cached = [&](int j) { return (((size_t)seq * NH + h) * c.capacity + j) * HS; };
            for (int i = 0; i < c.S_new; i++) {
                const size_t row = (((size_t)seq * c.S_new + i) * NH + h) * HS;
                const int last = c.p0 + i;
                double max_s = -INFINITY;
                for (int j = 0; j <= last; j++) {
                    if (!key_mask.empty() && key_mask[(size_t)seq * c.capacity + j] == 0) { score[j] = -INFINITY; continue; }
                    double dot = 0.0;
                    for (int d = 0; d < HS; d++) dot += (double)q[row + d] * k[cached(j) + d];
                    score[j] = scale * dot;
                    max_s = std::max(max_s, score[j]);
                }
                if (max_s == -INFINITY) continue;
                double sum = 0.0;
                for (int j = 0; j <= last; j++) if (score[j] != -INFINITY) sum += std::exp(score[j] - max_s);
                for (int j = 0; j <= last; j++) {
                    if (score[j] == -INFINITY) continue;
                    const double p = std::exp(score[j] - max_s) / sum;
                    for (int d = 0; d < HS; d++) out[row + d] += p * v[cached(j) + d];
                }
            }
        }
    return out;
}

// Left-padded prompts: sequence s masks its first pads[s % 6] positions (all of them for s % 6 == 3, so those queries
// see nothing); slots at or past p0 + S_new hold random mask bits (never consulted). Those slots, and every masked
// slot, hold NaN in k_cache and v_cache.
void check_cached(const CachedShape& c, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int end = c.p0 + c.S_new;
    std::vector<int> key_mask((size_t)c.nseq * c.capacity, 1);
    for (int seq = 0; seq < c.nseq; seq++) {
        const int pads[] = {0, 3, 70, end, 1, 64};
        for (int j = 0; j < std::min(end, pads[seq % 6]); j++) key_mask[(size_t)seq * c.capacity + j] = 0;
        for (int j = end; j < c.capacity; j++) key_mask[(size_t)seq * c.capacity + j] = rng() % 2;
    }
    floatX nan_bits;
    std::memset(static_cast<void*>(&nan_bits), 0xFF, sizeof(nan_bits));
    // Random values rounded to floatX; position j of cache row (seq, h) poisoned where it must never be read.
    auto make = [&](size_t n, bool cache, std::vector<float>& values, DeviceBuffer<floatX>& device) {
        std::vector<floatX> bits(n);
        values.resize(n);
        for (size_t e = 0; e < n; e++) {
            bits[e] = host_floatX(normal(rng));
            values[e] = host_float(bits[e]);
            if (cache) {
                const size_t row = e / c.HS, seq = row / ((size_t)c.NH * c.capacity);
                const int j = row % c.capacity;
                if (j >= end || (c.masked && key_mask[seq * c.capacity + j] == 0)) bits[e] = nan_bits;
            }
        }
        device = DeviceBuffer<floatX>(n);
        device.upload(bits.data(), n);
    };
    std::vector<float> q, k, v;
    DeviceBuffer<floatX> q_dev, k_dev, v_dev;
    make(c.q_elements(), false, q, q_dev);
    make(c.cache_elements(), true, k, k_dev);
    make(c.cache_elements(), true, v, v_dev);
    DeviceBuffer<int> mask_dev(key_mask.size());
    mask_dev.upload(key_mask.data(), key_mask.size());
    const int* mask = c.masked ? mask_dev.data() : nullptr;
    const std::vector<double> ref = reference_cached(c, q, k, v, c.masked ? key_mask : std::vector<int>());

    DeviceBuffer<floatX> first(c.q_elements()), second(c.q_elements()), blocktf_out(c.q_elements());
    for (DeviceBuffer<floatX>* out : {&first, &second}) {
        poison(*out);
        flash2_attention_cached_prefill(out->data(), q_dev.data(), k_dev.data(), v_dev.data(), mask, c.p0, c.nseq, c.S_new,
                                        c.NH, c.HS, c.capacity, 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    poison(blocktf_out);
    attention_cached(blocktf_out.data(), q_dev.data(), k_dev.data(), v_dev.data(), mask, nullptr, c.p0, c.nseq, c.S_new, c.NH,
                     c.HS, c.capacity, 0);
    cudaCheck(cudaDeviceSynchronize());

    const std::vector<float> mine = download(first), theirs = download(blocktf_out);
    const double error = relative_error(mine, ref), blocktf_error = relative_error(theirs, ref),
                 cross = relative_error(mine, theirs);
    const bool same = download_bytes(first) == download_bytes(second);
    const bool pass = error < kTolerance && blocktf_error < kTolerance && cross < kCrossTolerance && same;
    report(pass, "cached prefill  " + c.str() + format("  out %.1e", error) + format("  attention_cached %.1e", blocktf_error) +
                     format("  flash2-attention_cached %.1e  ", cross) + (same ? "rerun bitwise equal" : "RERUN DIFFERS"));
}

// ----------------------------------------------------------------------------------------------------------------
// 4. Benchmark.

// Pseudo-random values, uniform with variance 1 (splitmix64 of the index): benchmark inputs, never zeros.
__global__ void fill_random_kernel(floatX* x, size_t n, uint64_t seed) {
    GRID_STRIDE_LOOP(i, n) {
        uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f);   // [0, 1)
        x[i] = to_floatX((2.0f * u - 1.0f) * 1.7320508f);
    }
}

DeviceBuffer<floatX> random_device_tensor(size_t n, uint64_t seed) {
    DeviceBuffer<floatX> buffer(n);
    fill_random_kernel<<<grid_for(n, 256), 256>>>(buffer.data(), n, seed);
    cudaCheckLaunch();
    return buffer;
}

// Median over `repeats` timed calls (CUDA events around each) after `warmup` untimed ones, in ms.
double median_ms(const std::function<void()>& run, cudaStream_t stream, int warmup = 3, int repeats = 20) {
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    for (int r = 0; r < warmup; r++) run();
    cudaCheck(cudaStreamSynchronize(stream));
    std::vector<float> times(repeats);
    for (int r = 0; r < repeats; r++) {
        cudaCheck(cudaEventRecord(start, stream));
        run();
        cudaCheck(cudaEventRecord(stop, stream));
        cudaCheck(cudaEventSynchronize(stop));
        cudaCheck(cudaEventElapsedTime(&times[r], start, stop));
    }
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    std::sort(times.begin(), times.end());
    return times[repeats / 2];
}

struct BenchCase {
    const char* name;
    std::vector<Kind> kinds;   // each timed against the same cuBLAS-path numbers
    Shape shape;
};

// One row per kernel and pass: | shape | kernel | pass | fused ms | cuBLAS-path ms | speedup | fused TFLOP/s | fused GB/s |
// FLOPs counted for the causal half: 4·S(S+1)/2·HS per (sequence, head) forward, 2.5x that backward. GB/s over the
// compulsory bytes (each tensor read or written once: forward q, k, v, out; backward q, k, v, dout, dq, dk, dv, and for
// flash and flash2 also out, lse, δ).
void benchmark(const char* device_name) {
    const BenchCase cases[] = {
        {"block_main_b4_85 token decoder", {Kind::kSmall}, {4088, 5, 12, 64}},
        {"block_main_b4_85 block decoder", {Kind::kFlash, Kind::kFlash2}, {8, 511, 12, 64}},
        {"vanilla_160", {Kind::kFlash, Kind::kFlash2}, {8, 2048, 12, 64}},
        {"block_main_b4_1.2b token decoder", {Kind::kSmall}, {16 * 511, 5, 16, 128}},
        {"block_main_b4_1.2b block decoder", {Kind::kFlash, Kind::kFlash2}, {16, 511, 16, 128}},
    };
    std::printf("\nBenchmark (%s build, %s): median of 20 calls after 3 warm-up calls (CUDA events), fused kernels vs "
                "blocktf's attention_forward/backward\n\n", kPrecisionName, device_name);
    std::printf("| shape | kernel | pass | fused ms | cuBLAS-path ms | speedup | fused TFLOP/s | fused GB/s |\n");
    std::printf("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    Gpu gpu;
    for (const BenchCase& c : cases) {
        const Shape& s = c.shape;
        DeviceInputs in;
        in.q = random_device_tensor(s.elements(), 1);
        in.k = random_device_tensor(s.elements(), 2);
        in.v = random_device_tensor(s.elements(), 3);
        in.dout = random_device_tensor(s.elements(), 4);
        std::mt19937 rng(5);
        std::vector<int> mask((size_t)s.nseq * s.S);
        for (int& m : mask) m = rng() % 32 != 0;   // ~3% padded keys
        in.key_mask = DeviceBuffer<int>(mask.size());
        in.key_mask.upload(mask.data(), mask.size());
        Outputs fused(s);
        AttentionScratch scratch(s.nseq, s.NH, s.S, s.HS);
        DeviceBuffer<floatX> out(s.elements()), dq(s.elements()), dk(s.elements()), dv(s.elements());

        const double blocktf_forward_ms = median_ms([&] {
            attention_forward(gpu, out.data(), in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(), scratch, s.nseq,
                              s.S, s.NH, s.HS);
        }, gpu.stream);
        const double blocktf_backward_ms = median_ms([&] {
            attention_backward(gpu, dq.data(), dk.data(), dv.data(), in.dout.data(), in.q.data(), in.k.data(), in.v.data(),
                               in.key_mask.data(), scratch, s.nseq, s.S, s.NH, s.HS);
        }, gpu.stream);
        for (Kind kind : c.kinds) {
            // The forward once first: the backward reads its out and lse.
            fused_forward(kind, fused, in, s, gpu.stream);
            const double fused_forward_ms = median_ms([&] { fused_forward(kind, fused, in, s, gpu.stream); }, gpu.stream);
            const double fused_backward_ms = median_ms([&] { fused_backward(kind, fused, in, s, gpu.stream); }, gpu.stream);
            cudaCheck(cudaGetLastError());

            const double heads = (double)s.nseq * s.NH, E = (double)s.elements(), rows = (double)s.rows();
            const double forward_flops = heads * 4.0 * s.S * (s.S + 1) / 2.0 * s.HS;
            const double x = sizeof(floatX);
            const bool flash = has_lse(kind);
            const double forward_bytes = 4 * E * x + (flash ? 4 * rows : 0);
            const double backward_bytes = 7 * E * x + (flash ? E * x + 12 * rows : 0);
            const std::string shape = std::string(c.name) + ": " + s.str();
            auto row = [&](const char* pass, double fused_ms, double blocktf_ms, double flops, double bytes) {
                std::printf("| %s | %s | %s | %.3f | %.3f | %.2fx | %.1f | %.0f |\n", shape.c_str(), kind_name(kind), pass,
                            fused_ms, blocktf_ms, blocktf_ms / fused_ms, flops / (fused_ms * 1e9), bytes / (fused_ms * 1e6));
            };
            row("forward", fused_forward_ms, blocktf_forward_ms, forward_flops, forward_bytes);
            row("backward", fused_backward_ms, blocktf_backward_ms, 2.5 * forward_flops, backward_bytes);
            std::fflush(stdout);
        }
    }
}

// Generation's prefill: flash2_attention_cached_prefill vs blocktf's attention_cached, at p0 = 0 with left-padded
// prompts (sequence s masks its first (37 s) % 128 positions). FLOPs: 4·HS per visible-by-causality (query, position)
// pair, S_new(S_new+1)/2 + p0·S_new pairs per (sequence, head).
void benchmark_cached(const char* device_name) {
    struct CachedCase {
        const char* name;
        CachedShape shape;
    };
    const CachedCase cases[] = {
        {"vanilla generation prefill, P 2048", {256, 2048, 12, 64, 2176, 0, true}},
        {"block decoder generation prefill, 512 blocks", {2048, 512, 12, 64, 544, 0, true}},
    };
    std::printf("\nBenchmark (cached prefill, %s build, %s): flash2_attention_cached_prefill (median of 10 calls after 2 "
                "warm-up calls) vs attention_cached (median of 3 after 1)\n\n", kPrecisionName, device_name);
    std::printf("| shape | flash2 ms | attention_cached ms | speedup | flash2 TFLOP/s | attention_cached TFLOP/s |\n");
    std::printf("| --- | --- | --- | --- | --- | --- |\n");
    cudaStream_t stream = 0;
    for (const CachedCase& c : cases) {
        const CachedShape& s = c.shape;
        DeviceBuffer<floatX> q = random_device_tensor(s.q_elements(), 11);
        DeviceBuffer<floatX> k_cache = random_device_tensor(s.cache_elements(), 12);
        DeviceBuffer<floatX> v_cache = random_device_tensor(s.cache_elements(), 13);
        DeviceBuffer<floatX> out(s.q_elements());
        std::vector<int> mask((size_t)s.nseq * s.capacity, 1);
        for (int seq = 0; seq < s.nseq; seq++)
            for (int j = 0; j < (37 * seq) % 128; j++) mask[(size_t)seq * s.capacity + j] = 0;
        DeviceBuffer<int> key_mask(mask.size());
        key_mask.upload(mask.data(), mask.size());
        const double flash2_ms = median_ms([&] {
            flash2_attention_cached_prefill(out.data(), q.data(), k_cache.data(), v_cache.data(), key_mask.data(), s.p0, s.nseq,
                                            s.S_new, s.NH, s.HS, s.capacity, stream);
        }, stream, 2, 10);
        const double cached_ms = median_ms([&] {
            attention_cached(out.data(), q.data(), k_cache.data(), v_cache.data(), key_mask.data(), nullptr, s.p0, s.nseq,
                             s.S_new, s.NH, s.HS, s.capacity, stream);
        }, stream, 1, 3);
        cudaCheck(cudaGetLastError());
        const double flops = (double)s.nseq * s.NH * 4.0 * s.HS * ((double)s.S_new * (s.S_new + 1) / 2.0 + (double)s.p0 * s.S_new);
        std::printf("| %s: %s | %.3f | %.3f | %.1fx | %.1f | %.1f |\n", c.name, s.str().c_str(), flash2_ms, cached_ms,
                    cached_ms / flash2_ms, flops / (flash2_ms * 1e9), flops / (cached_ms * 1e9));
        std::fflush(stdout);
    }
}

}  // namespace

int main(int argc, char** argv) {
    bool quick = false, bench = true;
    for (int a = 1; a < argc; a++) {
        const std::string arg = argv[a];
        if (arg == "--quick") { quick = true; bench = false; }
        else if (arg == "--no-bench") bench = false;
        else {
            std::fprintf(stderr, "usage: %s [--quick] [--no-bench]\n", argv[0]);
            return 2;
        }
    }
    try {
        int devices = 0;
        if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
            std::printf("FAIL  no CUDA device: this program needs a GPU\n");
            return 1;
        }
        cudaDeviceProp prop;
        cudaCheck(cudaGetDeviceProperties(&prop, 0));
        std::printf("test_attention: %s build on %s; tolerance %.0e on ||gpu - ref|| / ||ref|| per output (fused vs "
                    "blocktf: %.0e)%s\n", kPrecisionName, prop.name, kTolerance, kCrossTolerance, quick ? "; quick set" : "");
        std::printf("Each line: kernel, shape, relative error of out (lse) dq dk dv against a double-precision reference, "
                    "and whether a second run gave the same bits.\n\n");
        uint32_t seed = 100;

        // Small kernels: every S x HS of the brief, NH 1..4, nseq 64 / 37 / 5 in turn.
        const int small_S[] = {1, 2, 5, 9, 16}, small_HS[] = {16, 32, 64, 128}, small_nseq[] = {64, 37, 5};
        int index = 0;
        for (int S : small_S)
            for (int HS : small_HS) {
                const Shape shape{small_nseq[index % 3], S, 1 + index % 4, HS};
                index++;
                if (quick && !(S == 5 || S == 16)) continue;
                const Shape checked = quick ? Shape{7, S, 3, HS} : shape;
                const uint32_t check_seed = seed++;
                guarded("small  " + checked.str(), [&] { check_fused(Kind::kSmall, checked, check_seed); });
            }

        // Flash and flash2 kernels: S 1, 7, 64, 130, 511 with nseq 3, NH 2; S 2048 with nseq 1, NH 2; each HS.
        const int flash_S[] = {1, 7, 64, 130, 511, 2048}, flash_HS[] = {32, 64, 128};
        for (Kind kind : {Kind::kFlash, Kind::kFlash2}) {
            if (kind == Kind::kFlash2) seed = 300;   // the flash checks keep their seeds
            for (int S : flash_S)
                for (int HS : flash_HS) {
                    if (quick && S > 130) continue;
                    const Shape shape = S == 2048 ? Shape{1, S, 2, HS} : quick ? Shape{3, S, 1, HS} : Shape{3, S, 2, HS};
                    const uint32_t check_seed = seed++;
                    guarded(std::string(kind_name(kind)) + "  " + shape.str(), [&] { check_fused(kind, shape, check_seed); });
                }
        }

        if (!quick) {
            std::printf("\nCross-check against blocktf's cuBLAS attention (relative error fused vs blocktf, then in brackets "
                        "blocktf vs the reference):\n");
            const Shape small_shape{64, 5, 4, 64}, flash_shape{4, 300, 3, 64}, flash_shape_128{2, 300, 2, 128};
            guarded("small vs blocktf", [&] { check_against_blocktf(Kind::kSmall, small_shape, 900); });
            guarded("flash vs blocktf", [&] { check_against_blocktf(Kind::kFlash, flash_shape, 901); });
            guarded("flash2 vs blocktf", [&] { check_against_blocktf(Kind::kFlash2, flash_shape, 902); });
            guarded("flash2 vs blocktf", [&] { check_against_blocktf(Kind::kFlash2, flash_shape_128, 903); });
        }

        // Cached prefill: p0 = 0 and p0 > 0, left-padded prompts, a null mask, S_new 1 (one step), each HS.
        std::printf("\nCached prefill (flash2_attention_cached_prefill) against the reference and blocktf's attention_cached "
                    "(relative errors of out; NaN in every cache slot that must not be read):\n");
        const CachedShape cached_shapes[] = {
            {6, 130, 2, 64, 200, 0, true},  {3, 64, 2, 64, 300, 77, true}, {2, 1, 2, 64, 40, 17, true},
            {6, 70, 1, 128, 100, 5, true},  {2, 129, 2, 32, 160, 0, false}, {6, 300, 1, 64, 400, 33, true},
            {2, 511, 2, 128, 600, 33, true}, {6, 511, 2, 64, 544, 0, true}, {1, 2048, 2, 64, 2176, 0, true},
        };
        seed = 500;
        for (const CachedShape& c : cached_shapes) {
            const uint32_t check_seed = seed++;
            if (quick && (c.S_new > 130 || c.nseq * c.NH > 8)) continue;
            guarded("cached prefill  " + c.str(), [&] { check_cached(c, check_seed); });
        }

        std::printf("\n%s: %d of %d checks passed%s\n", g_failures == 0 ? "ALL PASSED" : "FAILURES", g_checks - g_failures,
                    g_checks, g_failures == 0 ? "" : " (lines starting with FAIL above)");
        if (bench) {
            benchmark(prop.name);
            benchmark_cached(prop.name);
        }
    } catch (const std::exception& e) {
        std::printf("FAIL  exception: %s\n", e.what());
        return 1;
    }
    return g_failures == 0 ? 0 : 1;
}
