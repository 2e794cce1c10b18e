// test_gpu.cu: every GPU kernel against the CPU reference (test/reference.h) on fresh random inputs, then the
// whole model against the reference and against the PyTorch fixtures. Reported as skipped without a GPU.
// Outputs are poisoned (all bits set: NaN in fp32 and bf16) before each run, so an unwritten element fails.
// Tolerances (METHOD.md, norm-wise relative error): FP32 build 1e-5; BF16 build 1e-2 for a kernel's activation
// outputs and the tensor table's bf16_tolerance (1e-3..1e-2 by kind) for a kernel's parameter gradients. The whole
// BF16 model stores every activation and gradient in bf16 along a chain of dozens of kernels: its gradients are held
// to kBf16ChainFactor times the table's tolerance (measured on the H200: 0.5-1.4% vs the reference on the same
// weights; dev/NOTES.md).
#include <cstring>
#include <random>
#include <unistd.h>
#include "blocktf.cu"
#include "test/test_models.h"

constexpr bool kFp32Build = std::is_same<floatX, float>::value;
constexpr double kKernelTolerance = kFp32Build ? 1e-5 : 1e-2;

constexpr double kBf16ChainFactor = 3.0;
static double gradient_tolerance(const ParamTensor& t) { return kFp32Build ? 1e-5 : kBf16ChainFactor * t.bf16_tolerance; }
// One kernel's parameter-gradient output of the given kind (kBf16Tol* of model.h).
static double kernel_gradient_tolerance(float bf16_tolerance) { return kFp32Build ? 1e-5 : bf16_tolerance; }

// floatX <-> float on the host, through the bit patterns (loader.h's bf16 conversion rounds to nearest even).
static float host_float(floatX x) {
    if (kFp32Build) { float f; std::memcpy(&f, &x, sizeof(f)); return f; }
    uint16_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return bf16_to_float(bits);
}
static floatX host_floatX(float f) {
    floatX x;
    if (kFp32Build) std::memcpy(static_cast<void*>(&x), &f, sizeof(f));
    else { uint16_t bits = float_to_bf16(f); std::memcpy(static_cast<void*>(&x), &bits, sizeof(bits)); }
    return x;
}
static float round_to_floatX(float f) { return host_float(host_floatX(f)); }

// A tensor on both sides: host values already rounded to floatX, so the reference sees exactly the GPU's inputs.
struct TestTensor {
    std::vector<float> host;
    DeviceBuffer<floatX> device;
};
static TestTensor make_tensor(std::vector<float> values) {
    TestTensor t;
    std::vector<floatX> bits(values.size());
    for (size_t i = 0; i < values.size(); i++) {
        bits[i] = host_floatX(values[i]);
        values[i] = host_float(bits[i]);
    }
    t.host = std::move(values);
    t.device = DeviceBuffer<floatX>(t.host.size());
    t.device.upload(bits.data(), bits.size());
    return t;
}
static TestTensor random_tensor(size_t n, std::mt19937& rng, float mean = 0.0f, float stddev = 1.0f) {
    std::normal_distribution<float> normal(mean, stddev);
    std::vector<float> values(n);
    for (float& v : values) v = normal(rng);
    return make_tensor(values);
}
// A device array (float or floatX) as host floats.
template <typename T>
static std::vector<float> download(const T* device, size_t n) {
    std::vector<T> raw(n);
    cudaCheck(cudaMemcpy(raw.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
    if constexpr (std::is_same<T, float>::value) return raw;
    std::vector<float> out(n);
    for (size_t i = 0; i < n; i++) out[i] = host_float(raw[i]);
    return out;
}
template <typename T>
static DeviceBuffer<T> poisoned(size_t n) {
    DeviceBuffer<T> buffer(n);
    if (n > 0) cudaCheck(cudaMemset(buffer.data(), 0xFF, n * sizeof(T)));
    return buffer;
}
template <typename T>   // an empty buffer (a scratch the call's path does not use) stays empty
static void poison(DeviceBuffer<T>& buffer) { if (buffer.size() > 0) cudaCheck(cudaMemset(buffer.data(), 0xFF, buffer.size() * sizeof(T))); }

// Checks and reports (a MESSAGE, shown by gpu_check.sh) the norm-wise relative error of out against ref.
#define CHECK_CLOSE(out, ref, n, tolerance)                                                                \
    do {                                                                                                   \
        double error_ = relative_error((out).data(), (ref).data(), (n));                                   \
        MESSAGE(#out " vs " #ref ": relative error " << error_ << " (tolerance " << (tolerance) << ")");   \
        CHECK(error_ < (tolerance));                                                                       \
    } while (0)

// ----------------------------------------------------------------------------------------------------------------
// Kernels, one by one.

// LayerNorm forward with both outputs of a parallel-residual layer (LN1 and LN2 of the same x) at widths that take
// 1, 3 and 8 (bf16; fp32: 1, 6 and 16) 16-byte packs per lane, against the reference run once per weight set.
// With residual, the normalised row is the previous layer's sum x + a + b, formed by the kernel (rounded once to
// floatX, as add3) and written in place over x, as the stacks do.
static void check_layernorm_forward_pair(int N, int C, bool residual, uint32_t seed) {
    CAPTURE(N); CAPTURE(C); CAPTURE(residual);
    std::mt19937 rng(seed);
    TestTensor x = random_tensor(N * C, rng, 0.5f, 2.0f);
    TestTensor a = random_tensor(N * C, rng, 0.0f, 0.5f), b = random_tensor(N * C, rng, -0.2f, 1.0f);
    TestTensor w1 = random_tensor(C, rng, 1.0f, 0.1f), b1 = random_tensor(C, rng, 0.0f, 0.1f);
    TestTensor w2 = random_tensor(C, rng, 1.0f, 0.3f), b2 = random_tensor(C, rng, 0.5f, 0.1f);
    auto out1 = poisoned<floatX>(N * C), out2 = poisoned<floatX>(N * C);
    auto mean = poisoned<float>(N), rstd = poisoned<float>(N);
    const LayerNormInput input = residual ? LayerNormInput(x.device.data(), a.device.data(), b.device.data(), x.device.data())
                                          : LayerNormInput(x.device.data());
    layernorm_forward({out1.data(), w1.device.data(), b1.device.data()}, {out2.data(), w2.device.data(), b2.device.data()},
                      mean.data(), rstd.data(), input, N, C, 0);
    std::vector<float> normalised = x.host;
    if (residual) {
        for (size_t i = 0; i < normalised.size(); i++) normalised[i] = round_to_floatX(x.host[i] + a.host[i] + b.host[i]);
        const std::vector<float> sum = download(x.device.data(), N * C);
        size_t mismatches = 0;
        for (size_t i = 0; i < sum.size(); i++) mismatches += sum[i] != normalised[i];
        CHECK(mismatches == 0);   // the same fp32 sum, rounded once: bit-identical
    }
    std::vector<float> out1_ref(N * C), out2_ref(N * C), mean_ref(N), rstd_ref(N);
    ref::layernorm_forward(out1_ref.data(), mean_ref.data(), rstd_ref.data(), normalised.data(), w1.host.data(), b1.host.data(), N, C);
    ref::layernorm_forward(out2_ref.data(), mean_ref.data(), rstd_ref.data(), normalised.data(), w2.host.data(), b2.host.data(), N, C);
    CHECK_CLOSE(download(out1.data(), N * C), out1_ref, N * C, kKernelTolerance);
    CHECK_CLOSE(download(out2.data(), N * C), out2_ref, N * C, kKernelTolerance);
    CHECK_CLOSE(download(mean.data(), N), mean_ref, N, 1e-5);
    CHECK_CLOSE(download(rstd.data(), N), rstd_ref, N, 1e-5);
}

GPU_TEST_CASE("gpu: layernorm forward, two outputs from one pass, several widths, with and without the residual sum") {
    for (bool residual : {false, true}) {
        check_layernorm_forward_pair(13, 48, residual, 21);
        check_layernorm_forward_pair(37, 768, residual, 22);
        check_layernorm_forward_pair(5, 2048, residual, 23);
    }
}

// One LayerNorm forward and backward. The backward's parameter gradients are sums over rows by blocks of rows
// (chunks): the shapes give one row per chunk (N = 37), many rows per chunk and per warp, and 1 to 8 (bf16; fp32: 1
// to 16) packs per lane.
static void check_layernorm(int N, int C, uint32_t seed) {
    CAPTURE(N); CAPTURE(C);
    Gpu gpu;
    std::mt19937 rng(seed);
    TestTensor x = random_tensor(N * C, rng, 0.5f, 2.0f), w = random_tensor(C, rng, 1.0f, 0.1f), b = random_tensor(C, rng, 0.0f, 0.1f);
    auto out = poisoned<floatX>(N * C);
    auto mean = poisoned<float>(N), rstd = poisoned<float>(N);
    layernorm_forward(out.data(), mean.data(), rstd.data(), x.device.data(), w.device.data(), b.device.data(), N, C, gpu.stream);
    std::vector<float> out_ref(N * C), mean_ref(N), rstd_ref(N);
    ref::layernorm_forward(out_ref.data(), mean_ref.data(), rstd_ref.data(), x.host.data(), w.host.data(), b.host.data(), N, C);
    CHECK_CLOSE(download(out.data(), N * C), out_ref, N * C, kKernelTolerance);
    CHECK_CLOSE(download(mean.data(), N), mean_ref, N, 1e-5);
    CHECK_CLOSE(download(rstd.data(), N), rstd_ref, N, 1e-5);

    // backward: parameter gradients start from non-zero values to check that they accumulate
    TestTensor dout = random_tensor(N * C, rng), dw = random_tensor(C, rng), db = random_tensor(C, rng);
    auto dinp = poisoned<floatX>(N * C);
    layernorm_backward(gpu, dinp.data(), dw.device.data(), db.device.data(), dout.device.data(), x.device.data(),
                       w.device.data(), mean.data(), rstd.data(), N, C);
    std::vector<float> dinp_ref(N * C), dw_ref = dw.host, db_ref = db.host;
    ref::layernorm_backward(dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.host.data(), x.host.data(), w.host.data(),
                            mean_ref.data(), rstd_ref.data(), N, C);
    CHECK_CLOSE(download(dinp.data(), N * C), dinp_ref, N * C, kKernelTolerance);
    CHECK_CLOSE(download(dw.device.data(), C), dw_ref, C, kernel_gradient_tolerance(kBf16TolVector));
    CHECK_CLOSE(download(db.device.data(), C), db_ref, C, kernel_gradient_tolerance(kBf16TolVector));
}

GPU_TEST_CASE("gpu: layernorm forward and backward") {
    check_layernorm(37, 96, 1);
    check_layernorm(5000, 768, 2);
    check_layernorm(600, 2048, 3);
}

// Column sums (bias and LayerNorm gradients) accumulated into a non-zero dst, against sums in double: one chunk of
// few rows, column packs that leave a block part-full, many chunks at the token decoder's size; run twice, the
// results must be bit-identical (the order is fixed).
static void check_column_sums(int N, int C, uint32_t seed) {
    CAPTURE(N); CAPTURE(C);
    Gpu gpu;
    std::mt19937 rng(seed);
    TestTensor src = random_tensor((size_t)N * C, rng), dst = random_tensor(C, rng, 0.0f, 10.0f);
    std::vector<float> ref = dst.host;
    for (int c = 0; c < C; c++) {
        double sum = dst.host[c];
        for (int r = 0; r < N; r++) sum += src.host[(size_t)r * C + c];
        ref[c] = (float)sum;
    }
    DeviceBuffer<floatX> first(C), second(C);
    for (DeviceBuffer<floatX>* out : {&first, &second}) {
        cudaCheck(cudaMemcpy(out->data(), dst.device.data(), C * sizeof(floatX), cudaMemcpyDeviceToDevice));
        column_sum_accumulate(gpu, out->data(), src.device.data(), N, C);
    }
    const std::vector<float> once = download(first.data(), C), again = download(second.data(), C);
    CHECK_CLOSE(once, ref, C, kernel_gradient_tolerance(kBf16TolVector));
    CHECK(once == again);
}

GPU_TEST_CASE("gpu: column sums (bias and LayerNorm gradients), several shapes, deterministic") {
    check_column_sums(7, 40, 31);
    check_column_sums(130, 264, 32);
    check_column_sums(1000, 3072, 33);
    check_column_sums(20440, 768, 34);
}

GPU_TEST_CASE("gpu: linear forward (with and without the bias epilogue) and backward") {
    Gpu gpu;
    std::mt19937 rng(2);
    const int N = 50, IC = 48, OC = 80;
    TestTensor x = random_tensor(N * IC, rng), w = random_tensor(OC * IC, rng, 0.0f, 0.15f), b = random_tensor(OC, rng);
    auto out = poisoned<floatX>(N * OC);
    linear_forward(gpu, out.data(), x.device.data(), w.device.data(), b.device.data(), N, IC, OC);
    std::vector<float> out_ref(N * OC);
    ref::matmul_forward(out_ref.data(), x.host.data(), w.host.data(), b.host.data(), N, IC, OC);
    CHECK_CLOSE(download(out.data(), N * OC), out_ref, N * OC, kKernelTolerance);

    auto logits = poisoned<floatX>(N * OC);   // the LM head's form: no bias
    linear_forward(gpu, logits.data(), x.device.data(), w.device.data(), nullptr, N, IC, OC);
    ref::matmul_forward(out_ref.data(), x.host.data(), w.host.data(), (const float*)nullptr, N, IC, OC);
    CHECK_CLOSE(download(logits.data(), N * OC), out_ref, N * OC, kKernelTolerance);

    TestTensor dout = random_tensor(N * OC, rng), dw = random_tensor(OC * IC, rng), db = random_tensor(OC, rng);
    auto dinp = poisoned<floatX>(N * IC);
    linear_backward(gpu, dinp.data(), dw.device.data(), db.device.data(), dout.device.data(), x.device.data(), w.device.data(), N, IC, OC);
    std::vector<float> dinp_ref(N * IC), dw_ref = dw.host, db_ref = db.host;
    ref::matmul_backward(dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.host.data(), x.host.data(), w.host.data(), N, IC, OC);
    CHECK_CLOSE(download(dinp.data(), N * IC), dinp_ref, N * IC, kKernelTolerance);
    CHECK_CLOSE(download(dw.device.data(), OC * IC), dw_ref, OC * IC, kernel_gradient_tolerance(kBf16TolMatrix));
    CHECK_CLOSE(download(db.device.data(), OC), db_ref, OC, kernel_gradient_tolerance(kBf16TolVector));
}

// RoPE + head split + attention, forward and backward, for one shape.
static void check_attention(int nseq, int S, int NH, int HS, uint32_t seed) {
    CAPTURE(nseq); CAPTURE(S); CAPTURE(NH); CAPTURE(HS);
    Gpu gpu;
    std::mt19937 rng(seed);
    const int C = NH * HS, rot = HS / 4;
    const size_t n = (size_t)nseq * S;
    TestTensor qkv = random_tensor(n * 3 * C, rng);
    std::vector<int> key_mask(n);
    for (int& m : key_mask) m = rng() % 5 != 0;   // ~20% masked keys, including some first keys
    DeviceBuffer<int> key_mask_device(n);
    key_mask_device.upload(key_mask.data(), n);
    DeviceBuffer<float> cos_device, sin_device;
    upload_rope_tables(cos_device, sin_device, S, rot);

    auto q = poisoned<floatX>(n * C), k = poisoned<floatX>(n * C), v = poisoned<floatX>(n * C), out = poisoned<floatX>(n * C);
    AttentionScratch scratch(nseq, NH, S, HS);
    poison(scratch.scores); poison(scratch.dprobs); poison(scratch.probs); poison(scratch.dscores);
    poison(scratch.heads); poison(scratch.dheads); poison(scratch.delta);
    auto lse = poisoned<float>(attention_lse_size(nseq, NH, S, HS));
    rope_split_heads_kernel<<<rope_heads_grid(nseq, S, NH, HS), 256>>>(q.data(), k.data(), v.data(), qkv.device.data(), cos_device.data(),
                                                           sin_device.data(), nseq, S, NH, HS, rot);
    cudaCheckLaunch();
    attention_forward(gpu, out.data(), lse.data(), q.data(), k.data(), v.data(), key_mask_device.data(), scratch, nseq, S, NH, HS);

    std::vector<float> qkv_ref = qkv.host, out_ref(n * C), probs_ref((size_t)nseq * NH * S * S);
    ref::rope_forward(qkv_ref.data(), nseq, S, NH, HS, rot);
    ref::attention_forward(out_ref.data(), probs_ref.data(), qkv_ref.data(), key_mask.data(), nseq, S, NH, HS);
    CHECK_CLOSE(download(out.data(), n * C), out_ref, n * C, kKernelTolerance);

    TestTensor dout = random_tensor(n * C, rng);
    auto dq = poisoned<floatX>(n * C), dk = poisoned<floatX>(n * C), dv = poisoned<floatX>(n * C), dqkv = poisoned<floatX>(n * 3 * C);
    attention_backward(gpu, dq.data(), dk.data(), dv.data(), dout.device.data(), out.data(), lse.data(), q.data(), k.data(),
                       v.data(), key_mask_device.data(), scratch, nseq, S, NH, HS);
    rope_merge_heads_backward_kernel<<<rope_heads_grid(nseq, S, NH, HS), 256>>>(dqkv.data(), dq.data(), dk.data(), dv.data(), cos_device.data(),
                                                                    sin_device.data(), nseq, S, NH, HS, rot);
    cudaCheckLaunch();
    std::vector<float> dqkv_ref(n * 3 * C);
    ref::attention_backward(dqkv_ref.data(), dout.host.data(), qkv_ref.data(), probs_ref.data(), nseq, S, NH, HS);
    ref::rope_backward(dqkv_ref.data(), nseq, S, NH, HS, rot);
    CHECK_CLOSE(download(dqkv.data(), n * 3 * C), dqkv_ref, n * 3 * C, kKernelTolerance);
}

GPU_TEST_CASE("gpu: RoPE + attention forward and backward, token-decoder, block-decoder and long shapes") {
    check_attention(40, 5, 2, 16, 3);     // many tiny sequences (the token decoder: P+LB-1 = 5): the small kernels
    check_attention(70, 5, 3, 64, 6);     // the small kernels at the paper configs' head sizes, and their limit S = 16
    check_attention(9, 16, 2, 128, 7);
    check_attention(33, 9, 1, 32, 8);
    check_attention(3, 70, 2, 32, 4);     // rows longer than a warp, masked keys (BF16: flash attention from here on)
    check_attention(2, 511, 3, 128, 9);   // the block decoder's 511 blocks at head size 128 (block_main_b4_300 and up)
    check_attention(1, 2048, 1, 64, 5);   // the longest sequence a Pythia config trains on
}

// Cached attention (generation): S_new queries at cache positions p0.. over a (nseq, NH, capacity, HS) cache, against
// plain loops in double. Key masks with leading padding (left-padded prompts) and one sequence whose queries see no
// key; capacities past 256 keys, so every warp of the kernel takes more than one chunk, and short caches (up to
// kShortCache positions), which get one warp per query row.
// The reference for one query over one head's cache (keys, values: capacity x HS, floats or doubles):
// softmax(q . k_j / sqrt(HS)) over the positions j <= last with mask[j] = 1, times v_j, into out (HS values); out is
// left as it was (0) when no position is visible, as the kernels output 0.
template <typename Query, typename Cached>
static void reference_cached_attention(float* out, const Query* q, const Cached* keys, const Cached* values, const int* mask,
                                       int last, int HS) {
    std::vector<double> score;
    std::vector<int> visible;
    for (int j = 0; j <= last; j++) {
        if (!mask[j]) continue;
        double dot = 0.0;
        for (int d = 0; d < HS; d++) dot += (double)q[d] * (double)keys[(size_t)j * HS + d];
        score.push_back(dot / std::sqrt((double)HS));
        visible.push_back(j);
    }
    if (visible.empty()) return;
    const double max = *std::max_element(score.begin(), score.end());
    double sum = 0.0;
    for (double& z : score) sum += (z = std::exp(z - max));
    for (int d = 0; d < HS; d++) {
        double acc = 0.0;
        for (size_t t = 0; t < visible.size(); t++) acc += score[t] / sum * (double)values[(size_t)visible[t] * HS + d];
        out[d] = (float)acc;
    }
}

enum class Position { Device, Host };   // p0 from a device counter (a decode graph) or from the host (a prefill)
// warps_per_row > 0: attention_cached with that many warps a query row; 0: attention_over_cache, the path generation takes.
static void check_cached_attention(int nseq, int S_new, int NH, int HS, int capacity, int p0, uint32_t seed,
                                   Position position = Position::Device, int warps_per_row = 0) {
    CAPTURE(nseq); CAPTURE(S_new); CAPTURE(NH); CAPTURE(HS); CAPTURE(capacity); CAPTURE(p0); CAPTURE(position == Position::Host);
    CAPTURE(warps_per_row);
    std::mt19937 rng(seed);
    const size_t C = (size_t)NH * HS, cache = (size_t)nseq * NH * capacity * HS;
    TestTensor q = random_tensor(nseq * S_new * C, rng, 0.0f, 2.0f);
    TestTensor k = random_tensor(cache, rng), v = random_tensor(cache, rng);
    std::vector<int> key_mask((size_t)nseq * capacity);
    for (int seq = 0; seq < nseq; seq++)
        for (int j = 0; j < capacity; j++)
            key_mask[(size_t)seq * capacity + j] = seq == 1 ? 0 : j >= 3 * seq && rng() % 7 != 0;   // seq 1 sees nothing
    DeviceBuffer<int> key_mask_device(key_mask.size());
    key_mask_device.upload(key_mask.data(), key_mask.size());
    auto out = poisoned<floatX>(nseq * S_new * C);
    DeviceBuffer<int> dyn_pos(1);
    const int start = position == Position::Device ? p0 / 2 : 0;   // a decode graph: device counter plus offset
    dyn_pos.upload(&start, 1);
    const int* device_position = position == Position::Device ? dyn_pos.data() : nullptr;
    if (warps_per_row > 0)
        attention_cached(out.data(), q.device.data(), k.device.data(), v.device.data(), key_mask_device.data(), device_position,
                         p0 - start, nseq, S_new, NH, HS, capacity, 0, warps_per_row);
    else
        attention_over_cache(out.data(), q.device.data(), k.device.data(), v.device.data(), key_mask_device.data(), device_position,
                             p0 - start, nseq, S_new, NH, HS, capacity, 0);
    cudaCheck(cudaDeviceSynchronize());

    std::vector<float> ref(nseq * S_new * C, 0.0f);
    for (int seq = 0; seq < nseq; seq++)
        for (int i = 0; i < S_new; i++)
            for (int h = 0; h < NH; h++) {
                const size_t row = ((size_t)seq * S_new + i) * C + (size_t)h * HS, head = ((size_t)seq * NH + h) * capacity * HS;
                reference_cached_attention(ref.data() + row, q.host.data() + row, k.host.data() + head, v.host.data() + head,
                                           key_mask.data() + (size_t)seq * capacity, std::min(p0 + i, capacity - 1), HS);
            }
    CHECK_CLOSE(download(out.data(), nseq * S_new * C), ref, ref.size(), kKernelTolerance);
}

GPU_TEST_CASE("gpu: cached attention (generation) at every supported head size, decode and prefill (flash in BF16)") {
    for (int HS : {16, 32, 64, 128}) {
        check_cached_attention(3, 1, 2, HS, 300, 290, 11);   // a decode step late in a long cache
        check_cached_attention(3, 5, 3, HS, 40, 0, 12);      // a prefill from position 0
        check_cached_attention(4, 3, 1, HS, 600, 517, 13);   // keys past 512: warps take three chunks
        check_cached_attention(5, 2, 2, HS, 64, 61, 14);     // the longest cache that gets one warp per row: two chunks
        check_cached_attention(6, 5, 2, HS, 5, 0, 15);       // the token decoder's whole cache (P + LB - 1 = 5)
        // prefills longer than 16 positions at a host position: flash attention in the BF16 build (HS >= 32)
        check_cached_attention(3, 100, 2, HS, 300, 37, 16, Position::Host);
        check_cached_attention(2, 200, 2, HS, 200, 0, 17, Position::Host);
        // every warps-per-row choice on long caches (the small cases above take 8, or 1 for <= 64 positions)
        for (int warps : {1, 2, 4}) {
            check_cached_attention(3, 1, 2, HS, 300, 290, 18, Position::Device, warps);
            check_cached_attention(4, 3, 1, HS, 600, 517, 19, Position::Device, warps);
        }
    }
}

// The fused decode steps over a short cache (rope_append_attend) against the CPU reference: q and k of the S_new new
// positions p0 + s rotated at angle p0 + s - pos_shift (clamped to 0), k and v appended there, the other cache
// positions left as they were, and each new query's attention over the visible positions <= p0 + s. Sequence 1 sees
// no key (output 0).
static void check_rope_append_attend(int nseq, int S_new, int NH, int HS, int capacity, int p0, uint32_t seed) {
    CAPTURE(nseq); CAPTURE(S_new); CAPTURE(NH); CAPTURE(HS); CAPTURE(capacity); CAPTURE(p0);
    std::mt19937 rng(seed);
    const int rot = HS / 4, heads = nseq * NH;
    const size_t cache = (size_t)heads * capacity * HS, new_rows = (size_t)nseq * S_new * NH;
    TestTensor qkv = random_tensor(new_rows * 3 * HS, rng, 0.0f, 2.0f);
    TestTensor k = random_tensor(cache, rng), v = random_tensor(cache, rng);
    std::vector<int> key_mask((size_t)nseq * capacity), pos_shift(nseq);
    for (int seq = 0; seq < nseq; seq++) {
        pos_shift[seq] = 3 * seq;   // the last sequences' angles clamp to 0 when p0 is small
        for (int j = 0; j < capacity; j++) key_mask[(size_t)seq * capacity + j] = seq != 1 && (j >= p0 || rng() % 4 != 0);
    }
    DeviceBuffer<int> key_mask_device(key_mask.size()), pos_shift_device(nseq), dyn_pos(1);
    key_mask_device.upload(key_mask.data(), key_mask.size());
    pos_shift_device.upload(pos_shift.data(), nseq);
    const int start = p0 / 2;   // a decode graph: device counter plus offset
    dyn_pos.upload(&start, 1);
    DeviceBuffer<float> cos_table, sin_table;
    upload_rope_tables(cos_table, sin_table, capacity, rot);
    auto out = poisoned<floatX>(new_rows * HS);
    rope_append_attend(out.data(), k.device.data(), v.device.data(), qkv.device.data(), cos_table.data(), sin_table.data(),
                       pos_shift_device.data(), key_mask_device.data(), dyn_pos.data(), p0 - start, nseq, S_new, NH, HS, rot,
                       capacity, 0);
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<float> k_after = download(k.device.data(), cache), v_after = download(v.device.data(), cache);

    // the reference cache: the new positions' rotated keys and values written in
    std::vector<double> k_ref(k.host.begin(), k.host.end()), v_ref(v.host.begin(), v.host.end());
    std::vector<std::vector<double>> q_rot(new_rows);
    for (int seq = 0; seq < nseq; seq++)
        for (int s = 0; s < S_new; s++)
            for (int h = 0; h < NH; h++) {
                const size_t row = ((size_t)seq * S_new + s) * NH + h;
                const int angle = std::max(0, p0 + s - pos_shift[seq]);
                // the reference rotates a sequence's rows by their index: put this head's (q, k, v) at index `angle`
                std::vector<double> rotated((size_t)(angle + 1) * 3 * HS, 0.0);
                std::copy(qkv.host.begin() + row * 3 * HS, qkv.host.begin() + (row + 1) * 3 * HS, rotated.begin() + (size_t)angle * 3 * HS);
                ref::rope_forward(rotated.data(), 1, angle + 1, 1, HS, rot);
                const double* r = rotated.data() + (size_t)angle * 3 * HS;
                q_rot[row].assign(r, r + HS);
                const size_t at = (((size_t)seq * NH + h) * capacity + p0 + s) * HS;
                std::copy(r + HS, r + 2 * HS, k_ref.begin() + at);
                std::copy(r + 2 * HS, r + 3 * HS, v_ref.begin() + at);
            }
    std::vector<float> k_new, v_new, k_new_ref, v_new_ref;
    size_t unchanged = 0, changed_elsewhere = 0;
    for (size_t i = 0; i < cache; i++) {
        const int j = (int)(i / HS % capacity);
        if (j >= p0 && j < p0 + S_new) {
            k_new.push_back(k_after[i]), v_new.push_back(v_after[i]);
            k_new_ref.push_back((float)k_ref[i]), v_new_ref.push_back((float)v_ref[i]);
        } else {
            (k_after[i] == k.host[i] && v_after[i] == v.host[i] ? unchanged : changed_elsewhere)++;
        }
    }
    CHECK(changed_elsewhere == 0);
    CHECK(unchanged == (size_t)heads * (capacity - S_new) * HS);
    CHECK_CLOSE(k_new, k_new_ref, k_new.size(), kKernelTolerance);
    CHECK_CLOSE(v_new, v_new_ref, v_new.size(), kKernelTolerance);

    std::vector<float> out_ref(new_rows * HS, 0.0f);
    for (int seq = 0; seq < nseq; seq++)
        for (int s = 0; s < S_new; s++)
            for (int h = 0; h < NH; h++) {
                const size_t row = ((size_t)seq * S_new + s) * NH + h, head = ((size_t)seq * NH + h) * capacity * HS;
                reference_cached_attention(out_ref.data() + row * HS, q_rot[row].data(), k_ref.data() + head, v_ref.data() + head,
                                           key_mask.data() + (size_t)seq * capacity, p0 + s, HS);
            }
    CHECK_CLOSE(download(out.data(), new_rows * HS), out_ref, out_ref.size(), kKernelTolerance);
}

GPU_TEST_CASE("gpu: fused RoPE + cache append + attention for one or two new positions over a short cache") {
    for (int HS : {16, 32, 64, 128}) {
        check_rope_append_attend(3, 1, 2, HS, 5, 4, 21);     // the token decoder's last local step (P + LB - 1 = 5)
        check_rope_append_attend(5, 1, 3, HS, 5, 0, 22);     // the first position: each row sees only its own key
        check_rope_append_attend(4, 1, 3, HS, 64, 61, 23);   // the longest short cache, rotary angles shifted
        check_rope_append_attend(7, 1, 1, HS, 9, 6, 24);     // heads that do not fill the last warp
        check_rope_append_attend(6, 2, 2, HS, 5, 0, 25);     // the token decoder's prefix (P = 2) into an empty cache
        check_rope_append_attend(5, 2, 3, HS, 40, 27, 26);   // two new positions after a cached stretch
    }
}

GPU_TEST_CASE("gpu: GELU forward and backward") {
    std::mt19937 rng(6);
    const size_t n = 1000;
    TestTensor x = random_tensor(n, rng, 0.0f, 3.0f), dout = random_tensor(n, rng);
    auto out = poisoned<floatX>(n), dinp = poisoned<floatX>(n);
    gelu_forward(out.data(), x.device.data(), n, 0);
    gelu_backward(dinp.data(), dout.device.data(), x.device.data(), n, 0);
    std::vector<float> out_ref(n), dinp_ref(n);
    ref::gelu_forward(out_ref.data(), x.host.data(), n);
    ref::gelu_backward(dinp_ref.data(), dout.host.data(), x.host.data(), n);
    CHECK_CLOSE(download(out.data(), n), out_ref, n, kKernelTolerance);
    CHECK_CLOSE(download(dinp.data(), n), dinp_ref, n, kKernelTolerance);
}

// ReplayedWork (the training stacks' CUDA graphs): the first call with a key runs as ordinary launches, the second is
// captured, later ones replay the graph and read the buffers' current contents; a new key or a reallocation of the
// Gpu's scratch starts over. The work is one GELU on fresh input values every call, checked against the reference.
GPU_TEST_CASE("gpu: replayed work runs eagerly, is captured, then replays; a new key or new scratch starts over") {
    std::mt19937 rng(7);
    const size_t n = 1000;
    Gpu gpu;
    ReplayedWork work;
    TestTensor a = random_tensor(n, rng), b = random_tensor(n, rng);
    DeviceBuffer<floatX> out(n);
    enum class How { Eager, Captured, Replayed };
    auto run = [&](TestTensor& x) {
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<floatX> bits(n);
        for (size_t i = 0; i < n; i++) {
            bits[i] = host_floatX(normal(rng));
            x.host[i] = host_float(bits[i]);
        }
        x.device.upload(bits.data(), n);   // the legacy stream's copies order with gpu.stream (a blocking stream)
        cudaCheck(cudaMemset(out.data(), 0xFF, n * sizeof(floatX)));
        How how = How::Replayed;
        work.run(gpu, {x.device.data(), out.data()}, [&] {
            cudaStreamCaptureStatus status;
            cudaCheck(cudaStreamIsCapturing(gpu.stream, &status));
            how = status == cudaStreamCaptureStatusActive ? How::Captured : How::Eager;
            gelu_forward(out.data(), x.device.data(), n, gpu.stream);
        });
        std::vector<float> expected(n);
        ref::gelu_forward(expected.data(), x.host.data(), n);
        CHECK_CLOSE(download(out.data(), n), expected, n, kKernelTolerance);
        return how;
    };
    CHECK(run(a) == How::Eager);
    CHECK(run(a) == How::Captured);
    CHECK(run(a) == How::Replayed);
    CHECK(run(a) == How::Replayed);
    CHECK(run(b) == How::Eager);   // another input buffer: a new key
    CHECK(run(b) == How::Captured);
    gpu.column_scratch(1 << 20, 1 << 12);   // the first request for column scratch allocates it
    CHECK(run(b) == How::Eager);
    CHECK(run(b) == How::Captured);
    CHECK(run(b) == How::Replayed);
}

// V = 1001 takes the scalar kernel, V = 50304 (Pythia's padded vocabulary) the packed one; in row 0 every logit but
// the target's is the same value (ties everywhere, the maximum far from the first element). The logits are floatX,
// as the LM head writes them; the reference reads the same rounded values.
static void check_cross_entropy(int rows, int V, uint32_t seed) {
    CAPTURE(rows); CAPTURE(V);
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> values((size_t)rows * V);
    for (float& z : values) z = normal(rng);
    std::vector<int> targets(rows);
    for (int& t : targets) t = rng() % V;
    std::fill(values.begin(), values.begin() + V, 0.5f);
    values[targets[0]] = 4.0f;
    const TestTensor logits_tensor = make_tensor(values);
    const std::vector<float>& logits = logits_tensor.host;
    DeviceBuffer<int> targets_device(rows);
    targets_device.upload(targets.data(), rows);
    auto losses = poisoned<float>(rows);
    auto dlogits = poisoned<floatX>((size_t)rows * V);
    cross_entropy(dlogits.data(), losses.data(), logits_tensor.device.data(), targets_device.data(), rows, V, 1.0f / rows, 0);
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<float> losses_gpu = download(losses.data(), rows);
    for (int r = 0; r < rows; r++) {
        const char one = 1;
        CHECK(losses_gpu[r] == doctest::Approx(ref::cross_entropy_forward(logits.data() + (size_t)r * V, &targets[r], &one, 1, V)).epsilon(1e-5));
    }
    std::vector<char> valid(rows, 1);
    std::vector<float> dlogits_ref((size_t)rows * V);
    ref::cross_entropy_backward(dlogits_ref.data(), logits.data(), targets.data(), valid.data(), rows, V);
    CHECK_CLOSE(download(dlogits.data(), (size_t)rows * V), dlogits_ref, (size_t)rows * V, kKernelTolerance);
}

GPU_TEST_CASE("gpu: fused cross-entropy (loss and gradient)") {
    check_cross_entropy(7, 1001, 7);
    check_cross_entropy(5, 50304, 17);
}

GPU_TEST_CASE("gpu: embedding gather and deterministic bucketed backward") {
    std::mt19937 rng(8);
    const int V = 50, C = 40, N = 300;
    TestTensor table = random_tensor(V * C, rng), dtable = random_tensor(V * C, rng), dout = random_tensor(N * C, rng);
    std::vector<int> ids(N), rows(N);
    for (int q = 0; q < N; q++) {
        ids[q] = rng() % 7 == 0 ? 3 : rng() % V;   // one id used very often
        rows[q] = q;
    }
    BatchPlan plan;   // the gather's ids and the backward's buckets, as the model sends them (DevicePlan)
    plan.input_ids = ids;
    plan.input_buckets = make_buckets(ids, rows);
    DevicePlan device_plan;
    device_plan.upload(plan, 0);
    auto out = poisoned<floatX>(N * C);
    gather_rows(out.data(), table.device.data(), device_plan.input_ids, N, C, 0);
    std::vector<float> out_ref(N * C);
    ref::embedding_forward(out_ref.data(), ids.data(), table.host.data(), N, C);
    CHECK_CLOSE(download(out.data(), N * C), out_ref, N * C, 1e-7);   // a copy: exact

    const DeviceBuckets& buckets = device_plan.input_buckets;
    embedding_backward(dtable.device.data(), dout.device.data(), buckets, C, 0);
    std::vector<float> first = download(dtable.device.data(), V * C);
    std::vector<float> dtable_ref = dtable.host;
    ref::embedding_backward(dtable_ref.data(), dout.host.data(), ids.data(), N, C);
    CHECK_CLOSE(first, dtable_ref, V * C, kernel_gradient_tolerance(kBf16TolEmbedding));
    // determinism: the same sums again give bit-identical results
    dtable.device.upload(std::vector<floatX>(V * C, host_floatX(0.0f)).data(), V * C);
    embedding_backward(dtable.device.data(), dout.device.data(), buckets, C, 0);
    std::vector<float> second = download(dtable.device.data(), V * C);
    dtable.device.upload(std::vector<floatX>(V * C, host_floatX(0.0f)).data(), V * C);
    embedding_backward(dtable.device.data(), dout.device.data(), buckets, C, 0);
    CHECK(download(dtable.device.data(), V * C) == second);
}

// ----------------------------------------------------------------------------------------------------------------
// The whole model.

// Reference weights rounded to floatX, so both sides start from identical parameters.
template <typename Real>
static std::vector<float> rounded_params(Reference<Real>& model) {
    std::vector<float> host(model.params.begin(), model.params.end());
    for (float& x : host) x = round_to_floatX(x);
    std::copy(host.begin(), host.end(), model.params.begin());
    return host;
}

// GPU logits of the scored rows, in the reference's layout (block: (rows, LB) slots; vanilla: (B, T) positions).
static std::vector<float> reference_logits_of_scored_rows(const Reference<float>& model, const Batch& batch) {
    const ModelConfig& c = model.cfg;
    std::vector<float> out;
    auto take = [&](size_t row) { out.insert(out.end(), model.logits.begin() + row * c.V, model.logits.begin() + (row + 1) * c.V); };
    if (c.is_block) {
        const int NB = batch.T / c.LB;
        for (int b = 0; b < batch.B; b++)
            for (int k = 1; k < NB; k++)
                for (int j = 0; j < c.LB; j++)
                    if (batch.mask[(size_t)b * batch.T + k * c.LB + j]) take(((size_t)b * (NB - 1) + k - 1) * c.LB + j);
    } else {
        for (int b = 0; b < batch.B; b++)
            for (int t = 0; t + 1 < batch.T; t++)
                if (batch.mask[(size_t)b * batch.T + t + 1]) take((size_t)b * batch.T + t);
    }
    return out;
}

// Loss, logits, every gradient and three AdamW updates of the GPU model against the CPU reference: after each
// update both sides must still compute the same loss. (Weights are not compared after updates: Adam's
// m / sqrt(v) turns rounding noise in near-zero gradients into full-size steps; the AdamW kernel is checked alone.)
static void check_model_against_reference(const char* config_name, const Batch& batch) {
    Reference<float> reference(config_by_name(config_name));
    randomize_params(reference, 11);
    std::vector<float> host = rounded_params(reference);
    GpuModel model(reference.cfg, batch.B, batch.T);
    model.load_parameters(host);
    model.keep_logits = true;
    BatchPlan plan = plan_batch(model.cfg, batch.B, batch.T, batch.ids, batch.mask);
    ref::AdamW<float> reference_adamw(reference.table);
    for (int step = 0; step < 3; step++) {
        CAPTURE(step);
        cudaCheck(cudaMemset(model.grads.data(), 0xFF, model.grads.size() * sizeof(floatX)));   // zero_grad must overwrite
        model.zero_grad();
        model.forward(plan, 1.0f);
        model.backward();
        const float loss = model.finish().loss;
        reference.zero_grad();
        double loss_ref = reference.forward(batch);
        reference.backward();
        CHECK(std::fabs(loss - loss_ref) / loss_ref < kKernelTolerance);
        if (step == 0) {
            std::vector<float> logits_ref = reference_logits_of_scored_rows(reference, batch);
            REQUIRE(model.host_logits.size() == logits_ref.size());
            CHECK_CLOSE(model.host_logits, logits_ref, logits_ref.size(), kKernelTolerance);
            std::vector<float> grads = download(model.grads.data(), model.table.num_trainable);
            double worst = 0.0;
            for (const ParamTensor& t : model.table.tensors) {
                if (!t.trainable) continue;
                CAPTURE(t.name);
                double error = relative_error(grads.data() + t.offset, reference.grads.data() + t.offset, t.numel);
                worst = std::max(worst, error);
                CHECK(error < gradient_tolerance(t));
            }
            MESSAGE(std::string(config_name) << " GPU vs CPU reference (" << std::string(kPrecisionName)
                                             << "): worst gradient error " << worst);
        }
        model.update(AdamWSettings{1e-3f});
        const float norm = model.finish().norm;
        double norm_ref = reference_adamw.step(reference.params, reference.grads, reference.table, 1e-3f);
        CHECK(std::fabs(norm - norm_ref) / norm_ref < kKernelTolerance);
    }
}

GPU_TEST_CASE("gpu: AdamW with clipping matches the reference on identical gradients") {
    Reference<float> reference(config_by_name("tiny_vanilla"));
    randomize_params(reference, 12);
    GpuModel model(reference.cfg, 1, 16);
    model.load_parameters(std::vector<float>(reference.params.begin(), reference.params.end()));
    ref::AdamW<float> reference_adamw(reference.table);
    std::mt19937 rng(13);
    for (int step = 0; step < 3; step++) {
        CAPTURE(step);
        // gradients large enough to be clipped on the first step, small enough not to be on the later ones
        TestTensor grads = random_tensor(model.table.num_trainable, rng, 0.0f, step == 0 ? 0.1f : 1e-4f);
        cudaCheck(cudaMemcpy(model.grads.data(), grads.device.data(), grads.host.size() * sizeof(floatX), cudaMemcpyDeviceToDevice));
        std::copy(grads.host.begin(), grads.host.end(), reference.grads.begin());
        model.update(AdamWSettings{1e-3f});
        const GpuModel::Finished result = model.finish();
        double norm_ref = reference_adamw.step(reference.params, reference.grads, reference.table, 1e-3f);
        CHECK(result.updated);
        CHECK(result.norm == doctest::Approx(norm_ref).epsilon(1e-5));
        CHECK(model.adam_steps == step + 1);
    }
    std::vector<float> master = download(model.master.data(), model.table.num_params);
    std::vector<float> m = download(model.adam_m.data(), model.table.num_trainable);
    std::vector<float> v = download(model.adam_v.data(), model.table.num_trainable);
    for (const ParamTensor& t : model.table.tensors) {
        CAPTURE(t.name);
        CHECK(relative_error(master.data() + t.offset, reference.params.data() + t.offset, t.numel) < 1e-6);
        if (!t.trainable) continue;
        CHECK(relative_error(m.data() + t.offset, reference_adamw.m.data() + t.offset, t.numel) < 1e-6);
        CHECK(relative_error(v.data() + t.offset, reference_adamw.v.data() + t.offset, t.numel) < 1e-6);
    }
}

// The GPU decides whether a step is finite (train.cu reads the outcome afterwards): an infinite gradient norm, or a
// NaN loss with finite gradients, leaves weights, moments and the step count as they were; the next finite step
// is applied as AdamW's first.
GPU_TEST_CASE("gpu: an update with a non-finite gradient norm or loss is skipped on the GPU") {
    const ModelConfig config = config_by_name("tiny_vanilla");
    Reference<float> reference(config);
    randomize_params(reference, 14);
    std::vector<float> weights(reference.params.begin(), reference.params.end());
    weights[reference.table.get("embed_out.weight").offset] = NAN;   // one logit of every row: every loss is NaN
    GpuModel model(config, 2, 16);
    model.load_parameters(weights);
    std::mt19937 rng(15);
    TestTensor finite = random_tensor(model.table.num_trainable, rng, 0.0f, 1e-3f);
    auto state = [&] {
        std::vector<float> all = download(model.master.data(), model.table.num_params);
        for (const DeviceBuffer<float>* moments : {&model.adam_m, &model.adam_v}) {
            std::vector<float> values = download(moments->data(), model.table.num_trainable);
            all.insert(all.end(), values.begin(), values.end());
        }
        return all;
    };
    const std::vector<float> before = state();
    const Batch batch = vanilla_test_batch(16);
    const BatchPlan plan = plan_batch(config, batch.B, batch.T, batch.ids, batch.mask);

    std::vector<floatX> infinite_grads(model.table.num_trainable, host_floatX(1e-3f));
    infinite_grads[7] = host_floatX(INFINITY);
    model.grads.upload(infinite_grads.data(), infinite_grads.size());
    model.update(AdamWSettings{1e-3f});
    GpuModel::Finished result = model.finish();
    CHECK(!result.updated);
    CHECK(std::isinf(result.norm));

    model.zero_grad();
    model.forward(plan, 1.0f);
    model.backward();
    cudaCheck(cudaMemcpy(model.grads.data(), finite.device.data(), finite.host.size() * sizeof(floatX), cudaMemcpyDeviceToDevice));
    model.update(AdamWSettings{1e-3f});
    result = model.finish();
    CHECK(!result.updated);
    CHECK(std::isnan(result.loss));
    CHECK(std::isfinite(result.norm));
    CHECK(model.adam_steps == 0);
    const std::vector<float> after = state();
    CHECK(std::memcmp(after.data(), before.data(), before.size() * sizeof(float)) == 0);

    model.update(AdamWSettings{1e-3f});   // the same finite gradients, no forward since the last finish: applied
    result = model.finish();
    CHECK(result.updated);
    CHECK(model.adam_steps == 1);
    const std::vector<float> m = download(model.adam_m.data(), model.table.num_trainable);
    CHECK(m[0] == doctest::Approx((1.0f - kAdamBeta1) * finite.host[0]).epsilon(1e-5));   // the first step's moment
}

GPU_TEST_CASE("gpu: tiny_block model (loss, logits, every gradient, AdamW) matches the CPU reference") {
    check_model_against_reference("tiny_block", block_test_batch(21));
}

GPU_TEST_CASE("gpu: tiny_vanilla model (loss, logits, every gradient, AdamW) matches the CPU reference") {
    check_model_against_reference("tiny_vanilla", vanilla_test_batch(22));
}

// The PyTorch fixtures: logits, loss, every gradient and the 10 AdamW step losses of dev/make_fixtures.py.
// The fixture's weights are fp32; the BF16 build rounds them to bf16, which alone moves the gradients by ~0.5%
// (measured on the H200: worst 2.0e-2 here vs 1.4e-2 against the reference on identical bf16 weights).
constexpr double kWeightRoundingTolerance = kFp32Build ? 0.0 : 1e-2;
static void check_model_against_fixture(const char* config_name) {
    SafetensorsFile golden = SafetensorsFile::open(fixture_path(std::string(config_name) + ".golden.safetensors"));
    SafetensorsFile weights = SafetensorsFile::open(fixture_path(std::string(config_name) + ".model.safetensors"));
    ModelConfig config = config_by_name(config_name);
    Batch batch = fixture_batch(config, golden);
    GpuModel model(config, batch.B, batch.T);
    model.load_parameters(read_params_by_table(weights, model.table));
    model.keep_logits = true;
    BatchPlan plan = plan_batch(config, batch.B, batch.T, batch.ids, batch.mask);

    model.zero_grad();
    model.forward(plan, 1.0f);
    model.backward();
    const float loss = model.finish().loss;
    CHECK(std::fabs(loss - golden.read_f32("loss")[0]) / golden.read_f32("loss")[0] < kKernelTolerance);
    std::vector<float> grads = download(model.grads.data(), model.table.num_trainable);
    double worst_grad = 0.0, worst_step = 0.0;
    for (const ParamTensor& t : model.table.tensors) {
        if (!t.trainable) continue;
        CAPTURE(t.name);
        std::vector<float> ref_grad = golden.read_f32("grad." + t.name);
        double error = relative_error(grads.data() + t.offset, ref_grad.data(), t.numel);
        worst_grad = std::max(worst_grad, error);
        CHECK(error < gradient_tolerance(t) + kWeightRoundingTolerance);
    }
    const float lr = std::stof(golden.metadata().at("lr"));
    std::vector<float> step_losses = golden.read_f32("step_losses");
    model.update(AdamWSettings{lr});
    model.finish();
    for (int step = 1; step < 10; step++) {
        CAPTURE(step);
        model.zero_grad();
        model.forward(plan, 1.0f);
        model.backward();
        model.update(AdamWSettings{lr});
        const float step_loss = model.finish().loss;
        double error = std::fabs(step_loss - step_losses[step]) / step_losses[step];
        worst_step = std::max(worst_step, error);
        CHECK(error < kKernelTolerance);
    }
    MESSAGE(std::string(config_name) << " GPU (" << std::string(kPrecisionName) << ") vs PyTorch fixture: worst gradient "
                                     << worst_grad << ", worst of 10 step losses " << worst_step);
}

GPU_TEST_CASE("gpu: tiny_block matches the PyTorch fixture (loss, gradients, 10 AdamW steps)") {
    check_model_against_fixture("tiny_block");
}

GPU_TEST_CASE("gpu: tiny_vanilla matches the PyTorch fixture (loss, gradients, 10 AdamW steps)") {
    check_model_against_fixture("tiny_vanilla");
}

// ----------------------------------------------------------------------------------------------------------------
// Checkpoints.

TEST_CASE("checkpoint: config.json round trip for every named config, and clear errors") {
    for (const ModelConfig& c : named_configs()) {
        CAPTURE(c.name);
        ModelConfig back = config_from_json(parse_json(config_to_json(c)), "config.json");
        CHECK(back.name == c.name);
        CHECK(back.is_block == c.is_block);
        CHECK(build_tensor_table(back).num_params == build_tensor_table(c).num_params);
        CHECK(back.token_decoder.NH == c.token_decoder.NH);
        CHECK(back.DE == c.DE);
    }
    CHECK_THROWS_WITH_AS(config_from_json(parse_json("{\"model_type\": \"gpt_neox\", \"vocab_size\": 96}"), "x/config.json"),
                         doctest::Contains("x/config.json: \"seq_len\" must be a positive integer"), std::runtime_error);
    CHECK_THROWS_WITH_AS(config_from_json(parse_json("{\"model_type\": \"llama\"}"), "c.json"),
                         doctest::Contains("\"model_type\" must be"), std::runtime_error);
}

GPU_TEST_CASE("gpu: a run saved and resumed gives bit-identical losses and weights") {
    namespace fs = std::filesystem;
    const ModelConfig config = config_by_name("tiny_block");
    Reference<float> init(config);
    randomize_params(init, 31);
    const std::vector<float> weights(init.params.begin(), init.params.end());
    std::vector<BatchPlan> plans;
    for (int k = 0; k < 6; k++) {
        Batch batch = block_test_batch(100 + k);
        plans.push_back(plan_batch(config, batch.B, batch.T, batch.ids, batch.mask));
    }
    auto train_steps = [&](GpuModel& model, int first, int last) {
        std::vector<float> losses;
        for (int step = first; step < last; step++) {
            model.zero_grad();
            model.forward(plans[step], 1.0f);
            model.backward();
            model.update(AdamWSettings{learning_rate(step, 1e-3f, 2, 6)});
            losses.push_back(model.finish().loss);
        }
        return losses;
    };
    GpuModel uninterrupted(config, 2, 32);
    uninterrupted.load_parameters(weights);
    std::vector<float> expected = train_steps(uninterrupted, 0, 6);

    const std::string dir = (fs::temp_directory_path() / ("blocktf_resume_" + std::to_string(getpid()))).string();
    fs::remove_all(dir);
    {
        GpuModel first_half(config, 2, 32);
        first_half.load_parameters(weights);
        std::vector<float> losses = train_steps(first_half, 0, 3);
        CHECK(std::memcmp(losses.data(), expected.data(), 3 * sizeof(float)) == 0);
        save_checkpoint(first_half, dir + "/checkpoint-3", CheckpointState{3, {{"data_position", "42"}}});
    }
    CHECK(latest_checkpoint(dir) == dir + "/checkpoint-3");
    CHECK(read_checkpoint_config(dir + "/checkpoint-3").name == "tiny_block");
    GpuModel resumed(config, 2, 32);
    CheckpointState state = load_checkpoint(resumed, dir + "/checkpoint-3", true);
    CHECK(state.step == 3);
    CHECK(state.resume.at("data_position") == "42");
    std::vector<float> losses = train_steps(resumed, 3, 6);
    CHECK(std::memcmp(losses.data(), expected.data() + 3, 3 * sizeof(float)) == 0);
    std::vector<float> a = download(uninterrupted.master.data(), uninterrupted.table.num_params);
    std::vector<float> b = download(resumed.master.data(), resumed.table.num_params);
    CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);

    // the exported weights: every table tensor under its original key, bf16
    SafetensorsFile exported = SafetensorsFile::open(dir + "/checkpoint-3/model.safetensors");
    CHECK(exported.tensors().size() == resumed.table.tensors.size());
    CHECK(exported.get("token_decoder.expansion_layer.weight").dtype == DType::BF16);
    CHECK(exported.metadata().at("format") == "pt");
    fs::remove_all(dir);
}

// Writes a checkpoint-like .safetensors of the config's tensors (zeros), plus extra tensors, into dir.
static std::string write_weights(const std::string& dir, const ModelConfig& config,
                                 const std::vector<std::pair<std::string, std::vector<int64_t>>>& extra = {}) {
    std::filesystem::create_directories(dir);
    TensorTable table = build_tensor_table(config);
    static std::vector<float> zeros;
    zeros.assign(table.num_params + 4096, 0.0f);
    std::vector<TensorToWrite> tensors;
    for (const ParamTensor& t : table.tensors)
        tensors.push_back({t.name, DType::F32, std::vector<int64_t>(t.shape.begin(), t.shape.end()), zeros.data()});
    for (const auto& e : extra) tensors.push_back({e.first, DType::F32, e.second, zeros.data()});
    const std::string path = dir + "/model.safetensors";
    write_safetensors(path, tensors, {{"format", "pt"}});
    return path;
}

TEST_CASE("checkpoint: released layouts load: config-less block weights, HF GPT-NeoX config, old Pythia buffers") {
    namespace fs = std::filesystem;
    const std::string root = (fs::temp_directory_path() / ("blocktf_import_" + std::to_string(getpid()))).string();
    fs::remove_all(root);

    // a released block checkpoint: model.safetensors only; the shape is inferred and recognised
    const std::string block_weights = write_weights(root + "/block", config_by_name("tiny_block"));
    CHECK(read_checkpoint_config(root + "/block").name == "tiny_block");
    CHECK(read_checkpoint_config(block_weights).name == "tiny_block");   // the file itself works too

    // a HuggingFace GPTNeoXForCausalLM directory: config.json with HF's keys, weights with the 2023 buffers
    const ModelConfig vanilla = config_by_name("tiny_vanilla");
    const std::string hf = root + "/pythia";
    write_weights(hf, vanilla, {{"gpt_neox.layers.0.attention.bias", {1, 1, 16, 16}}, {"gpt_neox.layers.0.attention.masked_bias", {}},
                                {"gpt_neox.layers.1.attention.rotary_emb.inv_freq", {2}}});
    const std::string hf_config = "{\"architectures\": [\"GPTNeoXForCausalLM\"], \"model_type\": \"gpt_neox\", \"vocab_size\": 96, "
                                  "\"hidden_size\": 32, \"num_attention_heads\": 2, \"num_hidden_layers\": 2, \"intermediate_size\": 96, "
                                  "\"max_position_embeddings\": 16, \"rotary_pct\": 0.25, \"use_parallel_residual\": true, "
                                  "\"hidden_act\": \"gelu\", \"tie_word_embeddings\": false}";
    write_text_file_atomically(hf + "/config.json", hf_config);
    ModelConfig loaded = read_checkpoint_config(hf);
    CHECK(loaded.name == "tiny_vanilla");
    CHECK(read_checkpoint_weights(SafetensorsFile::open(hf + "/model.safetensors"), build_tensor_table(loaded)).size() ==
          build_tensor_table(vanilla).num_params);

    // what does not fit is named
    std::string unsupported = hf_config;
    unsupported.replace(unsupported.find("0.25"), 4, "0.5");
    write_text_file_atomically(hf + "/config.json", unsupported);
    CHECK_THROWS_WITH_AS(read_checkpoint_config(hf), doctest::Contains("rotary_pct must be 0.25"), std::runtime_error);
    write_weights(root + "/odd", vanilla, {{"gpt_neox.layers.0.attention.extra.weight", {4}}});
    CHECK_THROWS_WITH_AS(read_checkpoint_weights(SafetensorsFile::open(root + "/odd/model.safetensors"), build_tensor_table(vanilla)),
                         doctest::Contains("unexpected tensor gpt_neox.layers.0.attention.extra.weight"), std::runtime_error);
    CHECK_THROWS_WITH_AS(read_checkpoint_weights(SafetensorsFile::open(block_weights), build_tensor_table(vanilla)),
                         doctest::Contains("missing tensor gpt_neox.embed_in.weight"), std::runtime_error);
    CHECK_THROWS_WITH_AS(read_checkpoint_config(root + "/odd"), doctest::Contains("head count is not stored"), std::runtime_error);
    CHECK_THROWS_WITH_AS(read_checkpoint_config(root + "/nothing"), doctest::Contains("not a checkpoint"), std::runtime_error);
    fs::remove_all(root);
}
