// test_attention.cu: checks and times blocktf.cu's attention implementations, each called directly (not through the
// attention_forward/backward dispatcher): the small kernels (S <= 16), flash attention (FlashAttention-2 on mma.sync,
// BF16 build only), the matmul path (batched cuBLAS GEMMs), and for generation flash_attention_cached_prefill and
// attention_cached.
//   1. Every path that accepts a shape against a double-precision CPU reference (plain loops) on fresh random inputs,
//      rounded to floatX first so that both sides see the same numbers, with key masks that leave some queries without
//      any visible key, skip whole key tiles of the flash kernels, and mask one sequence entirely. Outputs are poisoned
//      (all bits set: NaN in fp32 and bf16) before every call. Per output (out, flash's lse, dq, dk, dv), the norm-wise
//      relative error ||gpu - ref|| / ||ref|| must stay under 1e-5 (FP32 build) or 1e-2 (BF16 build); NaN never
//      passes. A second forward + backward into fresh poisoned buffers must give bitwise-equal outputs (determinism).
//   2. Flash against the matmul path on the same inputs, for S > 16 (where a stack takes one or the other).
//   3. The flash entry points refuse, with a std::runtime_error, what they do not serve: anything in the FP32 build,
//      head size 16 in the BF16 build.
//   4. Cached prefill (new queries over a KV cache) against the reference: attention_cached, and in the BF16 build
//      flash_attention_cached_prefill (also against attention_cached, and rerun bitwise); p0 = 0 and p0 > 0,
//      left-padded prompts, cache slots past the new positions and masked slots filled with NaN (never to be read).
//   5. A benchmark (BF16 build) at the paper's shapes, each path against the matmul path (CUDA events, warm-up,
//      median): one markdown table; then flash_attention_cached_prefill against attention_cached; then
//      attention_cached at decode shapes (S_new = 1, GB/s), with each warps-per-row choice forced beside its own.
// Build, from the repository root (dev/attention/run.sh builds both precisions and runs them):
//   nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -DBLOCKTF_SM90A -I. -DBLOCKTF_PRECISION_BF16
//        dev/attention/test_attention.cu -o build/test_attention -lcublas -lcublasLt   (or -DBLOCKTF_PRECISION_FP32)
// Run: build/test_attention [--quick] [--no-bench] [--decode-bench]. --quick: a few small shapes, no benchmark (for
// compute-sanitizer); --decode-bench: only the decode-shape benchmark, no checks.
// Exit status: 0 when every check passed, 1 otherwise.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include "blocktf.cu"   // defines: the attention paths under test, DeviceBuffer, Gpu, cudaCheck

namespace {

constexpr bool kFp32Build = std::is_same<floatX, float>::value;
// METHOD.md: fp32 arithmetic lands far under 1e-3; bf16 operands between 1e-3 and 1e-2.
constexpr double kTolerance = kFp32Build ? 1e-5 : 1e-2;
// One path against another: two implementations, each within kTolerance of the truth.
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

// One report line of relative errors; it fails when any error reaches its tolerance (or is NaN).
struct ErrorLine {
    std::string text;
    bool pass = true;
    void add(const char* name, double error, double tolerance) {
        pass = pass && error < tolerance;
        text += "  " + std::string(name) + format(" %.1e", error);
    }
};

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
// Shapes, inputs, device buffers.

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

struct HostInputs {
    std::vector<float> q, k, v;   // (nseq, NH, S, HS), floatX-rounded
    std::vector<float> dout;      // (nseq, S, NH*HS)
    std::vector<int> key_mask;    // (nseq, S)
};
struct DeviceInputs {
    DeviceBuffer<floatX> q, k, v, dout;   // as HostInputs
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

template <typename T>
void poison(DeviceBuffer<T>& buffer) {
    if (buffer.size() > 0) cudaCheck(cudaMemset(buffer.data(), 0xFF, buffer.size() * sizeof(T)));
}

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
    if (!bytes.empty()) cudaCheck(cudaMemcpy(bytes.data(), buffer.data(), bytes.size(), cudaMemcpyDeviceToHost));
    return bytes;
}

// ----------------------------------------------------------------------------------------------------------------
// The three paths of a stack's attention, called directly.

const char* path_name(AttentionPath path) {
    return path == AttentionPath::Small ? "small" : path == AttentionPath::Flash ? "flash" : "matmul";
}

// Every path that accepts the shape: small for S <= 16 (all our head sizes are its), flash in the BF16 build for head
// sizes 32, 64, 128 (any S), matmul always.
std::vector<AttentionPath> paths_accepting(const Shape& s) {
    std::vector<AttentionPath> paths;
    if (s.S <= kSmallMaxS) paths.push_back(AttentionPath::Small);
    if (kFlashAttentionBuild && flash_head_size(s.HS)) paths.push_back(AttentionPath::Flash);
    paths.push_back(AttentionPath::Matmul);
    return paths;
}

// What one path writes at one shape, and the scratch it needs.
struct PathOutputs {
    AttentionPath path;
    DeviceBuffer<floatX> out;          // (nseq, S, NH*HS)
    DeviceBuffer<float> lse;           // (nseq, NH, S), flash only
    DeviceBuffer<floatX> dq, dk, dv;   // (nseq, NH, S, HS)
    AttentionScratch scratch;          // flash: delta; matmul: the (S, S) scores and probabilities
    PathOutputs(AttentionPath p, const Shape& s)
        : path(p), out(s.elements()), lse(p == AttentionPath::Flash ? s.rows() : 0), dq(s.elements()), dk(s.elements()),
          dv(s.elements()), scratch(s.nseq, s.NH, s.S, s.HS, p) {}
};

void path_forward(Gpu& gpu, PathOutputs& o, const DeviceInputs& in, const Shape& s) {
    switch (o.path) {
        case AttentionPath::Small:
            small_attention_forward(o.out.data(), in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(), s.nseq, s.S,
                                    s.NH, s.HS, gpu.stream);
            break;
        case AttentionPath::Flash:
            flash_attention_forward(o.out.data(), o.lse.data(), in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(),
                                    s.nseq, s.S, s.NH, s.HS, gpu.stream);
            break;
        case AttentionPath::Matmul:
            matmul_attention_forward(gpu, o.out.data(), in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(),
                                     o.scratch, s.nseq, s.S, s.NH, s.HS);
            break;
    }
}

// Flash's backward reads the out and lse of path_forward.
void path_backward(Gpu& gpu, PathOutputs& o, const DeviceInputs& in, const Shape& s) {
    switch (o.path) {
        case AttentionPath::Small:
            small_attention_backward(o.dq.data(), o.dk.data(), o.dv.data(), in.dout.data(), in.q.data(), in.k.data(),
                                     in.v.data(), in.key_mask.data(), s.nseq, s.S, s.NH, s.HS, gpu.stream);
            break;
        case AttentionPath::Flash:
            flash_attention_backward(o.dq.data(), o.dk.data(), o.dv.data(), in.dout.data(), o.out.data(), o.lse.data(),
                                     in.q.data(), in.k.data(), in.v.data(), in.key_mask.data(), o.scratch.delta.data(),
                                     s.nseq, s.S, s.NH, s.HS, gpu.stream);
            break;
        case AttentionPath::Matmul:
            matmul_attention_backward(gpu, o.dq.data(), o.dk.data(), o.dv.data(), in.dout.data(), in.q.data(), in.k.data(),
                                      in.v.data(), in.key_mask.data(), o.scratch, s.nseq, s.S, s.NH, s.HS);
            break;
    }
}

// Forward then backward, each output poisoned right before the call that writes it; synchronised and checked.
void run_poisoned(Gpu& gpu, PathOutputs& o, const DeviceInputs& in, const Shape& s) {
    poison(o.out);
    poison(o.lse);
    path_forward(gpu, o, in, s);
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    poison(o.dq);
    poison(o.dk);
    poison(o.dv);
    poison(o.scratch.delta);
    path_backward(gpu, o, in, s);
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    cudaCheck(cudaGetLastError());
}

bool bitwise_equal(const PathOutputs& a, const PathOutputs& b) {
    return download_bytes(a.out) == download_bytes(b.out) && download_bytes(a.lse) == download_bytes(b.lse) &&
           download_bytes(a.dq) == download_bytes(b.dq) && download_bytes(a.dk) == download_bytes(b.dk) &&
           download_bytes(a.dv) == download_bytes(b.dv);
}

// ----------------------------------------------------------------------------------------------------------------
// The reference: the semantics of blocktf.cu's attention (SPEC 1.1.5), in double, plain loops.

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
            auto at = [&](int t) { return (head * S + t) * HS; };                         // row t of q, k, v, dq, dk, dv
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
// 1, 2. Each path against the reference, flash against the matmul path.

// Runs the path twice and reports its errors against the reference and whether the reruns agree bit for bit; returns
// the first run's outputs.
PathOutputs check_path(Gpu& gpu, AttentionPath path, const Shape& s, const DeviceInputs& in, const Reference& ref) {
    PathOutputs first(path, s), second(path, s);
    run_poisoned(gpu, first, in, s);
    run_poisoned(gpu, second, in, s);
    ErrorLine line;
    line.add("out", relative_error(download(first.out), ref.out), kTolerance);
    if (path == AttentionPath::Flash) line.add("lse", relative_error(download(first.lse), ref.lse), kTolerance);
    line.add("dq", relative_error(download(first.dq), ref.dq), kTolerance);
    line.add("dk", relative_error(download(first.dk), ref.dk), kTolerance);
    line.add("dv", relative_error(download(first.dv), ref.dv), kTolerance);
    const bool same = bitwise_equal(first, second);
    report(line.pass && same, std::string(path_name(path)) + "  " + s.str() + line.text +
                                  (same ? "  rerun bitwise equal" : "  RERUN DIFFERS"));
    return first;
}

void check_flash_against_matmul(const PathOutputs& flash, const PathOutputs& matmul, const Shape& s) {
    ErrorLine line;
    line.add("out", relative_error(download(flash.out), download(matmul.out)), kCrossTolerance);
    line.add("dq", relative_error(download(flash.dq), download(matmul.dq)), kCrossTolerance);
    line.add("dk", relative_error(download(flash.dk), download(matmul.dk)), kCrossTolerance);
    line.add("dv", relative_error(download(flash.dv), download(matmul.dv)), kCrossTolerance);
    report(line.pass, "flash vs matmul  " + s.str() + line.text);
}

// Every path that accepts the shape, on the same inputs and reference.
void check_shape(Gpu& gpu, const Shape& s, uint32_t seed) {
    HostInputs host;
    DeviceInputs device;
    make_inputs(s, seed, host, device);
    const Reference ref = reference_attention(s, host);
    std::vector<PathOutputs> checked;   // the paths that ran without an exception
    for (AttentionPath path : paths_accepting(s))
        guarded(std::string(path_name(path)) + "  " + s.str(),
                [&] { checked.push_back(check_path(gpu, path, s, device, ref)); });
    auto outputs_of = [&](AttentionPath path) -> const PathOutputs* {
        for (const PathOutputs& o : checked) if (o.path == path) return &o;
        return nullptr;
    };
    const PathOutputs *flash = outputs_of(AttentionPath::Flash), *matmul = outputs_of(AttentionPath::Matmul);
    if (s.S > kSmallMaxS && flash != nullptr && matmul != nullptr) check_flash_against_matmul(*flash, *matmul, s);
}

// Short sequences (the token decoder): every S x HS, NH 1..4, nseq 64 / 37 / 5 in turn. Long sequences (the block
// decoder, the vanilla model): S 17 (the shortest a stack sends to flash), 64, 130, 511 with nseq 3, NH 2, and S 2048
// with nseq 1, NH 2, at each flash head size. --quick: smaller nseq and NH, no S past 130.
std::vector<Shape> checked_shapes(bool quick) {
    std::vector<Shape> shapes;
    const int short_S[] = {1, 2, 5, 9, 16}, short_HS[] = {16, 32, 64, 128}, short_nseq[] = {64, 37, 5};
    int index = 0;
    for (int S : short_S)
        for (int HS : short_HS) {
            const Shape shape{short_nseq[index % 3], S, 1 + index % 4, HS};
            index++;
            if (!quick) shapes.push_back(shape);
            else if (S == 5 || S == 16) shapes.push_back({7, S, 3, HS});
        }
    const int long_S[] = {17, 64, 130, 511, 2048}, long_HS[] = {32, 64, 128};
    for (int S : long_S)
        for (int HS : long_HS) {
            if (!quick) shapes.push_back(S == 2048 ? Shape{1, S, 2, HS} : Shape{3, S, 2, HS});
            else if (S <= 130) shapes.push_back({3, S, 1, HS});
        }
    return shapes;
}

// ----------------------------------------------------------------------------------------------------------------
// 3. What flash attention refuses.

// The call must throw a std::runtime_error whose message holds `expected`, before launching anything.
void expect_refusal(const std::string& what, const char* expected, const std::function<void()>& call) {
    try {
        call();
        cudaCheck(cudaDeviceSynchronize());
        report(false, what + ": ran instead of throwing");
    } catch (const std::runtime_error& e) {
        const bool pass = std::strstr(e.what(), expected) != nullptr;
        const std::string message = std::string("threw std::runtime_error \"") + e.what() + "\"";
        report(pass, what + ": " + message + (pass ? "" : " (expected \"" + std::string(expected) + "\")"));
    } catch (const std::exception& e) {
        report(false, what + ": threw something other than std::runtime_error: " + e.what());
    }
}

// FP32 build: every flash entry point, at a shape it would serve in the BF16 build. BF16 build: head size 16.
void check_flash_refusals() {
    const Shape s{2, 40, 2, kFlashAttentionBuild ? 16 : 64};
    const char* expected = kFlashAttentionBuild ? "head size 16" : "needs the BF16 build";
    DeviceBuffer<floatX> q(s.elements()), k(s.elements()), v(s.elements()), out(s.elements()), dout(s.elements());
    DeviceBuffer<floatX> dq(s.elements()), dk(s.elements()), dv(s.elements());
    DeviceBuffer<float> lse(s.rows()), delta(s.rows());
    DeviceBuffer<int> key_mask((size_t)s.nseq * s.S);
    for (DeviceBuffer<floatX>* b : {&q, &k, &v, &out, &dout})
        cudaCheck(cudaMemset(b->data(), 0, b->size() * sizeof(floatX)));
    cudaCheck(cudaMemset(lse.data(), 0, lse.size() * sizeof(float)));
    cudaCheck(cudaMemset(key_mask.data(), 0, key_mask.size() * sizeof(int)));
    const std::string where = std::string(kPrecisionName) + " build, " + s.str();
    expect_refusal("flash_attention_forward refuses (" + where + ")", expected, [&] {
        flash_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), key_mask.data(), s.nseq, s.S, s.NH,
                                s.HS, 0);
    });
    expect_refusal("flash_attention_backward refuses (" + where + ")", expected, [&] {
        flash_attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(), q.data(), k.data(),
                                 v.data(), key_mask.data(), delta.data(), s.nseq, s.S, s.NH, s.HS, 0);
    });
    // As a prefill of all S positions from p0 = 0 into a cache of capacity S: q, out (nseq, S, NH*HS).
    expect_refusal("flash_attention_cached_prefill refuses (" + where + ")", expected, [&] {
        flash_attention_cached_prefill(out.data(), q.data(), k.data(), v.data(), key_mask.data(), 0, s.nseq, s.S, s.NH,
                                       s.HS, s.S, 0);
    });
}

// ----------------------------------------------------------------------------------------------------------------
// 4. Cached prefill against the reference; flash_attention_cached_prefill against attention_cached.

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
    std::vector<int> key_mask((size_t)c.nseq * c.capacity, 1);   // (nseq, capacity)
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
    DeviceBuffer<floatX> q_dev, k_dev, v_dev;   // q: (nseq, S_new, NH*HS); k, v: (nseq, NH, capacity, HS)
    make(c.q_elements(), false, q, q_dev);
    make(c.cache_elements(), true, k, k_dev);
    make(c.cache_elements(), true, v, v_dev);
    DeviceBuffer<int> mask_dev(key_mask.size());
    mask_dev.upload(key_mask.data(), key_mask.size());
    const int* mask = c.masked ? mask_dev.data() : nullptr;
    const std::vector<double> ref = reference_cached(c, q, k, v, c.masked ? key_mask : std::vector<int>());

    DeviceBuffer<floatX> cached_out(c.q_elements());
    poison(cached_out);
    attention_cached(cached_out.data(), q_dev.data(), k_dev.data(), v_dev.data(), mask, nullptr, c.p0, c.nseq, c.S_new, c.NH,
                     c.HS, c.capacity, 0);
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<float> cached = download(cached_out);
    ErrorLine line;
    line.add("attention_cached", relative_error(cached, ref), kTolerance);
    bool same = true;
    if (kFlashAttentionBuild) {
        DeviceBuffer<floatX> first(c.q_elements()), second(c.q_elements());
        for (DeviceBuffer<floatX>* out : {&first, &second}) {
            poison(*out);
            flash_attention_cached_prefill(out->data(), q_dev.data(), k_dev.data(), v_dev.data(), mask, c.p0, c.nseq, c.S_new,
                                           c.NH, c.HS, c.capacity, 0);
            cudaCheck(cudaDeviceSynchronize());
        }
        const std::vector<float> flash = download(first);
        line.add("flash", relative_error(flash, ref), kTolerance);
        line.add("flash-attention_cached", relative_error(flash, cached), kCrossTolerance);
        same = download_bytes(first) == download_bytes(second);
        line.text += same ? "  rerun bitwise equal" : "  RERUN DIFFERS";
    }
    report(line.pass && same, "cached prefill  " + c.str() + line.text);
}

// p0 = 0 and p0 > 0, left-padded prompts, a null mask, S_new 1 (one step), each head size.
void check_cached_prefill(bool quick) {
    const CachedShape shapes[] = {
        {6, 130, 2, 64, 200, 0, true},  {3, 64, 2, 64, 300, 77, true}, {2, 1, 2, 64, 40, 17, true},
        {6, 70, 1, 128, 100, 5, true},  {2, 129, 2, 32, 160, 0, false}, {6, 300, 1, 64, 400, 33, true},
        {2, 511, 2, 128, 600, 33, true}, {6, 511, 2, 64, 544, 0, true}, {1, 2048, 2, 64, 2176, 0, true},
    };
    uint32_t seed = 500;
    for (const CachedShape& c : shapes) {
        const uint32_t check_seed = seed++;
        if (quick && (c.S_new > 130 || c.nseq * c.NH > 8)) continue;
        guarded("cached prefill  " + c.str(), [&] { check_cached(c, check_seed); });
    }
}

// ----------------------------------------------------------------------------------------------------------------
// 5. Benchmark (BF16 build).

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

struct PassTimes {
    double forward_ms, backward_ms;
};
PassTimes time_path(Gpu& gpu, PathOutputs& o, const DeviceInputs& in, const Shape& s) {
    path_forward(gpu, o, in, s);   // once first: flash's backward reads its out and lse
    PassTimes t;
    t.forward_ms = median_ms([&] { path_forward(gpu, o, in, s); }, gpu.stream);
    t.backward_ms = median_ms([&] { path_backward(gpu, o, in, s); }, gpu.stream);
    cudaCheck(cudaGetLastError());
    return t;
}

// One row per pass: | shape | path | pass | ms | matmul-path ms | speedup | TFLOP/s | matmul-path TFLOP/s | GB/s |.
// FLOPs counted for the causal half: 4·HS·S(S+1)/2 per (sequence, head) forward, 2.5x that backward. GB/s over the
// compulsory bytes (each tensor read or written once: forward q, k, v, out; backward q, k, v, dout, dq, dk, dv, and
// for flash also out, lse, δ).
void benchmark(Gpu& gpu, const char* device_name) {
    struct BenchCase {
        const char* name;
        AttentionPath path;   // timed against the matmul path
        Shape shape;          // {nseq, S, NH, HS}
    };
    const BenchCase cases[] = {
        {"vanilla_160", AttentionPath::Flash, {8, 2048, 12, 64}},
        {"block_main_b4_1.2b block decoder", AttentionPath::Flash, {16, 511, 16, 128}},
        {"block_main_b4_85 token decoder", AttentionPath::Small, {4088, 5, 12, 64}},
        {"block_main_b4_1.2b token decoder", AttentionPath::Small, {16 * 511, 5, 16, 128}},
    };
    std::printf("\nBenchmark (%s build, %s): median of 20 calls after 3 warm-up calls (CUDA events), each path vs "
                "matmul_attention_forward/backward\n\n", kPrecisionName, device_name);
    std::printf("| shape | path | pass | ms | matmul-path ms | speedup | TFLOP/s | matmul-path TFLOP/s | GB/s |\n");
    std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
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
        PassTimes tested, matmul;
        {
            PathOutputs outputs(c.path, s);
            tested = time_path(gpu, outputs, in, s);
        }
        {
            PathOutputs outputs(AttentionPath::Matmul, s);
            matmul = time_path(gpu, outputs, in, s);
        }

        const double E = (double)s.elements(), rows = (double)s.rows(), x = sizeof(floatX);
        const double forward_flops = (double)s.nseq * s.NH * 4.0 * s.HS * s.S * (s.S + 1) / 2.0;
        const bool flash = c.path == AttentionPath::Flash;
        const double forward_bytes = 4 * E * x + (flash ? 4 * rows : 0);
        const double backward_bytes = 7 * E * x + (flash ? E * x + 12 * rows : 0);
        const std::string shape = std::string(c.name) + ": " + s.str();
        auto row = [&](const char* pass, double ms, double matmul_ms, double flops, double bytes) {
            std::printf("| %s | %s | %s | %.3f | %.3f | %.2fx | %.1f | %.1f | %.0f |\n", shape.c_str(), path_name(c.path), pass,
                        ms, matmul_ms, matmul_ms / ms, flops / (ms * 1e9), flops / (matmul_ms * 1e9), bytes / (ms * 1e6));
        };
        row("forward", tested.forward_ms, matmul.forward_ms, forward_flops, forward_bytes);
        row("backward", tested.backward_ms, matmul.backward_ms, 2.5 * forward_flops, backward_bytes);
        std::fflush(stdout);
    }
}

struct NamedCachedShape {   // a benchmark case: what it stands for, and its shape
    const char* name;
    CachedShape shape;
};

// The device buffers of a timed cached-attention call: q, k_cache and v_cache random (seeds seed, seed + 1, seed + 2),
// out, and a key mask in which sequence seq masks its first masked_prefix(seq) cache positions.
struct CachedBenchInputs {
    DeviceBuffer<floatX> q, k_cache, v_cache, out;
    DeviceBuffer<int> key_mask;
    CachedBenchInputs(const CachedShape& s, uint64_t seed, const std::function<int(int)>& masked_prefix)
        : q(random_device_tensor(s.q_elements(), seed)), k_cache(random_device_tensor(s.cache_elements(), seed + 1)),
          v_cache(random_device_tensor(s.cache_elements(), seed + 2)), out(s.q_elements()),
          key_mask((size_t)s.nseq * s.capacity) {
        std::vector<int> mask((size_t)s.nseq * s.capacity, 1);
        for (int seq = 0; seq < s.nseq; seq++)
            for (int j = 0; j < masked_prefix(seq); j++) mask[(size_t)seq * s.capacity + j] = 0;
        key_mask.upload(mask.data(), mask.size());
    }
};

// Generation's prefill: flash_attention_cached_prefill vs attention_cached, at p0 = 0 with left-padded prompts
// (sequence s masks its first (37 s) % 128 positions). FLOPs: 4·HS per visible-by-causality (query, position) pair,
// S_new(S_new+1)/2 + p0·S_new pairs per (sequence, head).
void benchmark_cached(const char* device_name) {
    const NamedCachedShape cases[] = {
        {"vanilla generation prefill, P 2048", {256, 2048, 12, 64, 2176, 0, true}},
        {"block decoder generation prefill, 512 blocks", {2048, 512, 12, 64, 544, 0, true}},
    };
    std::printf("\nBenchmark (cached prefill, %s build, %s): flash_attention_cached_prefill (median of 10 calls after 2 "
                "warm-up calls) vs attention_cached (median of 3 after 1)\n\n", kPrecisionName, device_name);
    std::printf("| shape | flash ms | attention_cached ms | speedup | flash TFLOP/s | attention_cached TFLOP/s |\n");
    std::printf("| --- | --- | --- | --- | --- | --- |\n");
    cudaStream_t stream = 0;
    for (const NamedCachedShape& c : cases) {
        const CachedShape& s = c.shape;
        CachedBenchInputs in(s, 11, [](int seq) { return (37 * seq) % 128; });
        const double flash_ms = median_ms([&] {
            flash_attention_cached_prefill(in.out.data(), in.q.data(), in.k_cache.data(), in.v_cache.data(), in.key_mask.data(),
                                           s.p0, s.nseq, s.S_new, s.NH, s.HS, s.capacity, stream);
        }, stream, 2, 10);
        const double cached_ms = median_ms([&] {
            attention_cached(in.out.data(), in.q.data(), in.k_cache.data(), in.v_cache.data(), in.key_mask.data(), nullptr, s.p0,
                             s.nseq, s.S_new, s.NH, s.HS, s.capacity, stream);
        }, stream, 1, 3);
        cudaCheck(cudaGetLastError());
        const double pairs = (double)s.S_new * (s.S_new + 1) / 2.0 + (double)s.p0 * s.S_new;   // per (sequence, head)
        const double flops = (double)s.nseq * s.NH * 4.0 * s.HS * pairs;
        std::printf("| %s: %s | %.3f | %.3f | %.1fx | %.1f | %.1f |\n", c.name, s.str().c_str(), flash_ms, cached_ms,
                    cached_ms / flash_ms, flops / (flash_ms * 1e9), flops / (cached_ms * 1e9));
        std::fflush(stdout);
    }
}

// Generation's decode steps: attention_cached with one new query per sequence over a long cache (S_new = 1, the
// query at the newest position p0), at the batch sizes and average cache lengths of issue 8's generation settings.
// Memory-bound: GB/s over the bytes it must read and write (the visible cached keys and values, q and out), against
// the H200's 4.25 TB/s device-copy ceiling (issue 8).
void benchmark_decode(const char* device_name) {
    const NamedCachedShape cases[] = {
        {"vanilla_410 P128/D2048 batch 64, mean cache", {64, 1, 16, 64, 2176, 1151, true}},
        {"vanilla_160 P128/D2048 batch 128, mean cache", {128, 1, 12, 64, 2176, 1151, true}},
        {"vanilla_160 P2048/D128 batch 256, mean cache", {256, 1, 12, 64, 2176, 2111, true}},
        {"block_main_b4_85 block decoder P128/D2048 batch 512", {512, 1, 12, 64, 544, 287, true}},
        {"block_main_b4_85 block decoder P128/D2048 batch 4096", {4096, 1, 12, 64, 544, 287, true}},
        {"block_main_b4_85 block decoder P2048/D128 batch 2048", {2048, 1, 12, 64, 544, 527, true}},
        {"block_main_b4_300 block decoder P128/D2048 batch 4096", {4096, 1, 16, 64, 544, 287, true}},
        {"block_main_b4_1.2b block decoder P128/D2048 batch 512", {512, 1, 16, 128, 544, 287, true}},
    };
    constexpr double kCopyCeilingGBs = 4250.0;
    std::printf("\nBenchmark (decode attention, %s build, %s): attention_cached, S_new = 1, every cached position "
                "visible through the key mask; median of 20 calls after 3 warm-up calls, with the warps per query row "
                "that attention_cached_warps_per_row picks (auto) and with each choice forced\n\n", kPrecisionName, device_name);
    std::printf("| shape | auto: warps | ms | GB/s | %% of 4.25 TB/s | ms, 1 warp | 2 warps | 4 warps | 8 warps |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    cudaStream_t stream = 0;
    for (const NamedCachedShape& c : cases) {
        const CachedShape& s = c.shape;
        CachedBenchInputs in(s, 21, [](int) { return 0; });
        auto time_warps = [&](int warps_per_row) {   // 0: attention_cached's own choice
            const double ms = median_ms([&] {
                attention_cached(in.out.data(), in.q.data(), in.k_cache.data(), in.v_cache.data(), in.key_mask.data(), nullptr,
                                 s.p0, s.nseq, s.S_new, s.NH, s.HS, s.capacity, stream, warps_per_row);
            }, stream);
            cudaCheck(cudaGetLastError());
            return ms;
        };
        const double ms = time_warps(0);
        const int chosen = attention_cached_warps_per_row((size_t)s.nseq * s.S_new * s.NH, s.capacity);
        const double visible = s.p0 + 1;   // cached positions 0..p0
        const double bytes = ((double)s.nseq * s.NH * s.HS * (2 * visible + 2)) * sizeof(floatX) + (double)s.nseq * visible * sizeof(int);
        const double gbs = bytes / (ms * 1e6);
        std::printf("| %s: %s | %d | %.3f | %.0f | %.0f%% |", c.name, s.str().c_str(), chosen, ms, gbs, 100.0 * gbs / kCopyCeilingGBs);
        for (int warps : {1, 2, 4, kAttentionWarps}) std::printf(" %.3f |", time_warps(warps));
        std::printf("\n");
        std::fflush(stdout);
    }
}

}  // namespace

int main(int argc, char** argv) {
    bool quick = false, bench = kFlashAttentionBuild;   // the benchmark times flash attention: BF16 build only
    bool decode_bench_only = false;
    for (int a = 1; a < argc; a++) {
        const std::string arg = argv[a];
        if (arg == "--quick") { quick = true; bench = false; }
        else if (arg == "--no-bench") bench = false;
        else if (arg == "--decode-bench") decode_bench_only = true;
        else {
            const bool help = arg == "--help";
            std::fprintf(help ? stdout : stderr, "usage: %s [--quick] [--no-bench] [--decode-bench]\n"
                         "  --quick         a few small shapes, no benchmark (for compute-sanitizer)\n"
                         "  --no-bench      every check, no benchmark (the FP32 build never runs it)\n"
                         "  --decode-bench  only the decode-attention benchmark, no checks\n", argv[0]);
            return help ? 0 : 2;
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
        if (decode_bench_only) {
            benchmark_decode(prop.name);
            return 0;
        }
        std::printf("test_attention: %s build on %s; tolerance %.0e on ||gpu - ref|| / ||ref|| per output (one path vs "
                    "another: %.0e)%s\n", kPrecisionName, prop.name, kTolerance, kCrossTolerance, quick ? "; quick set" : "");
        std::printf("Paths: small (S <= 16), %s, matmul. Each line: path, shape, relative error of out (lse) dq dk dv "
                    "against a double-precision reference, and whether a second run gave the same bits.\n\n",
                    kFlashAttentionBuild ? "flash" : "flash (BF16 build only: checked to refuse)");
        Gpu gpu;
        uint32_t seed = 100;
        for (const Shape& shape : checked_shapes(quick)) check_shape(gpu, shape, seed++);

        std::printf("\nFlash attention refuses what it does not serve:\n");
        guarded("flash refusals", check_flash_refusals);

        std::printf("\nCached prefill against the reference%s (relative errors of out; NaN in every cache slot that must "
                    "not be read):\n", kFlashAttentionBuild ? ", flash_attention_cached_prefill against attention_cached" : "");
        check_cached_prefill(quick);

        if (bench) {
            guarded("benchmark", [&] {
                benchmark(gpu, prop.name);
                benchmark_cached(prop.name);
                benchmark_decode(prop.name);
            });
        }
    } catch (const std::exception& e) {
        report(false, std::string("exception: ") + e.what());
    }
    if (g_failures == 0) std::printf("\nALL PASSED: %d checks\n", g_checks);
    else std::printf("\nFAILURES: %d of %d checks failed (lines starting with FAIL above)\n", g_failures, g_checks);
    return g_failures == 0 ? 0 : 1;
}
