// blocktf.cu: the GPU side of blocktf, included by train.cu, infer.cu and the GPU tests (llm.c style: one file
// holds the model's device code; model-agnostic pieces live in headers).
// defines, top to bottom: floatX and the CUDA/cuBLAS checks, DeviceBuffer; elementwise kernels (GELU, residual
// add, row gather/scatter); LayerNorm; matrix products (Gpu: cuBLASLt plans, linear_forward/backward, batched
// GEMMs); RoPE + head split; attention; deterministic embedding gradients; token-decoder input; fused
// cross-entropy; gradient norm and AdamW; GpuStack (one GPT-NeoX stack with its activations); BatchPlan (a
// micro-batch prepared on the host); GpuModel (the whole model: forward, backward, update); checkpoints.
//
// Conventions (as in test/reference.h): X_forward beside X_backward with the same argument order (outputs,
// inputs, weights, scratch, dims); activation gradients are written (=), parameter gradients accumulate (+=).
// Every CUDA and cuBLAS call is checked; every size and offset is a size_t.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <map>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <string>
#include <type_traits>
#include <vector>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda.h>   // CUtensorMap (the TMA descriptor type); the driver is not linked
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include "loader.h"   // defines: JSON, safetensors reading and writing, bf16 conversion
#include "model.h"

// Everything below has internal linkage: a program includes this file once, but the GPU tests include it in two
// translation units (test_gpu.cu directly, test_infer.cu through infer.cu, as llm.c's test includes its trainer).
namespace {

// ----------------------------------------------------------------------------------------------------------------
// Precision: PRECISION=BF16 stores weights and activations in bf16 (fp32 master weights and AdamW moments);
// PRECISION=FP32 builds the same code in fp32, to test against the CPU reference at 1e-5.
#if defined(BLOCKTF_PRECISION_FP32)
typedef float floatX;
constexpr const char* kPrecisionName = "FP32";
#elif defined(BLOCKTF_PRECISION_BF16)
typedef __nv_bfloat16 floatX;
constexpr const char* kPrecisionName = "BF16";
#else
#error "build with -DBLOCKTF_PRECISION_BF16 or -DBLOCKTF_PRECISION_FP32 (the Makefile's PRECISION)"
#endif

// ----------------------------------------------------------------------------------------------------------------
// Every CUDA and cuBLAS return code is checked; a failure throws with the call, file and line.

// An allocation that did not fit in GPU memory: recoverable (the context stays usable), so callers that size
// things by trying (./infer --bench --batch auto) can catch it.
struct CudaOutOfMemory : std::runtime_error {
    using std::runtime_error::runtime_error;
};

inline void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
    if (status == cudaSuccess) return;
    const std::string message = std::string("CUDA error: ") + cudaGetErrorString(status) + " in " + call + " at " + file + ":" +
                                std::to_string(line);
    if (status == cudaErrorMemoryAllocation) {
        cudaGetLastError();   // not sticky: clear it so the next check does not see it again
        throw CudaOutOfMemory(message);
    }
    throw std::runtime_error(message);
}
inline void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS)
        throw std::runtime_error(std::string("cuBLAS error: ") + cublasGetStatusString(status) + " in " + call + " at " +
                                 file + ":" + std::to_string(line));
}
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)
#define cublasCheck(call) cublas_check((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors surface here, not at the next unrelated call.
#define cudaCheckLaunch() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// ----------------------------------------------------------------------------------------------------------------
// Typed allocations that free themselves, move-only: DeviceBuffer in GPU memory, PinnedBuffer in page-locked host
// memory (copies between it and the device are truly asynchronous: the host does not wait).
template <typename T, bool kPinnedHost>
class CudaBuffer {
public:
    CudaBuffer() = default;
    explicit CudaBuffer(size_t count) : count_(count) {
        if (count == 0) return;
        if constexpr (kPinnedHost) cudaCheck(cudaHostAlloc((void**)&data_, count * sizeof(T), cudaHostAllocDefault));
        else cudaCheck(cudaMalloc(&data_, count * sizeof(T)));
    }
    CudaBuffer(CudaBuffer&& other) noexcept : data_(other.data_), count_(other.count_) { other.data_ = nullptr; other.count_ = 0; }
    CudaBuffer& operator=(CudaBuffer&& other) noexcept {
        std::swap(data_, other.data_);
        std::swap(count_, other.count_);
        return *this;
    }
    CudaBuffer(const CudaBuffer&) = delete;
    CudaBuffer& operator=(const CudaBuffer&) = delete;
    ~CudaBuffer() {
        if (!data_) return;
        if constexpr (kPinnedHost) cudaFreeHost(data_);
        else cudaFree(data_);
    }

    T* data() const { return data_; }
    size_t size() const { return count_; }
    // Device buffers: synchronous copies from and to the host.
    void upload(const T* host, size_t count) {
        static_assert(!kPinnedHost, "upload is for device buffers");
        cudaCheck(cudaMemcpy(data_, host, count * sizeof(T), cudaMemcpyHostToDevice));
    }
    void download(T* host, size_t count) const {
        static_assert(!kPinnedHost, "download is for device buffers");
        cudaCheck(cudaMemcpy(host, data_, count * sizeof(T), cudaMemcpyDeviceToHost));
    }

private:
    T* data_ = nullptr;
    size_t count_ = 0;
};
template <typename T>
using DeviceBuffer = CudaBuffer<T, false>;
template <typename T>
using PinnedBuffer = CudaBuffer<T, true>;

// ----------------------------------------------------------------------------------------------------------------
// Small helpers for kernels.

__host__ __device__ inline float to_f32(float x) { return x; }
__host__ __device__ inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ inline floatX to_floatX(float x) {
#if defined(BLOCKTF_PRECISION_FP32)
    return x;
#else
    return __float2bfloat16_rn(x);
#endif
}

__device__ inline float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffff, x, offset);
    return x;
}
__device__ inline float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset));
    return x;
}
// Sum over each aligned group of G lanes (G a power of 2 dividing 32); every lane of the warp must take part.
template <int G>
__device__ inline float group_sum(float x) {
#pragma unroll
    for (int offset = 1; offset < G; offset *= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
    return x;
}

// Sum over a thread block in a fixed order (warps, then warp 0 over the warp results): deterministic.
// Every thread gets the result. shared: at least 32 floats.
__device__ inline float block_sum(float x, float* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_sum(x);
    __syncthreads();   // shared may still be read from a previous call
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < warps ? shared[lane] : 0.0f;
    return warp_sum(x);
}
__device__ inline float block_max(float x, float* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < warps ? shared[lane] : -INFINITY;
    return warp_max(x);
}

// 16 bytes of floatX: one vector load or store (rows whose length is a multiple of kPack start 16-byte aligned).
constexpr int kPack = 16 / sizeof(floatX);
struct alignas(16) FloatXPack {
    floatX x[kPack];
};
// One pack (kPack values from a 16-byte aligned src) as floats, and back; load_floats and store_floats move as many
// fp32 values (as float4s).
__device__ inline void load_pack(float (&x)[kPack], const floatX* src) {
    const FloatXPack packed = *reinterpret_cast<const FloatXPack*>(src);
#pragma unroll
    for (int e = 0; e < kPack; e++) x[e] = to_f32(packed.x[e]);
}
__device__ inline void store_pack(floatX* dst, const float (&x)[kPack]) {
    FloatXPack packed;
#pragma unroll
    for (int e = 0; e < kPack; e++) packed.x[e] = to_floatX(x[e]);
    *reinterpret_cast<FloatXPack*>(dst) = packed;
}
__device__ inline void load_floats(float (&x)[kPack], const float* src) {
#pragma unroll
    for (int f = 0; f < kPack / 4; f++) {
        const float4 four = reinterpret_cast<const float4*>(src)[f];
        x[4 * f] = four.x, x[4 * f + 1] = four.y, x[4 * f + 2] = four.z, x[4 * f + 3] = four.w;
    }
}
__device__ inline void store_floats(float* dst, const float (&x)[kPack]) {
#pragma unroll
    for (int f = 0; f < kPack / 4; f++) reinterpret_cast<float4*>(dst)[f] = make_float4(x[4 * f], x[4 * f + 1], x[4 * f + 2], x[4 * f + 3]);
}

// Grid for one thread per element with a grid-stride loop (any n fits).
inline int grid_for(size_t n, int block_size) {
    return (int)std::max<size_t>(1, std::min<size_t>((n + block_size - 1) / block_size, 65536));
}
// Blocks for a kernel with one warp per row (8 warps a block); no cap: gridDim.x goes to 2^31-1.
inline unsigned warp_rows_grid(size_t rows) { return (unsigned)((rows + 7) / 8); }
#define GRID_STRIDE_LOOP(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// ----------------------------------------------------------------------------------------------------------------
// Shared memory: asynchronous copies from device memory (inline PTX), and the opt-in to more than 48 KB a block.

// The most shared memory one block may have on this device (with the opt-in), in bytes.
inline size_t max_block_smem() {
    static const int limit = [] {
        int device = 0, bytes = 0;
        cudaCheck(cudaGetDevice(&device));
        cudaCheck(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
        return bytes;
    }();
    return (size_t)limit;
}

// Raises a kernel's dynamic shared-memory limit to bytes (needed above 48 KB), after checking the device has them,
// and asks for the largest shared-memory carveout, so that the blocks per SM the kernel was built for fit.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel* kernel, size_t bytes, const char* who) {
    const size_t device_limit = max_block_smem();
    if (bytes > device_limit)
        throw std::runtime_error(std::string(who) + ": needs " + std::to_string(bytes) + " bytes of shared memory per block, the device has " +
                                 std::to_string(device_limit));
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, (int)cudaSharedmemCarveoutMaxShared));
}

// Shared-memory address (as ldmatrix and cp.async take it) of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Asynchronous global -> shared copies: 16 bytes (.cg: bypasses L1) or 4 bytes (.ca); only src_bytes (0 or the full
// size) are read, the rest of the destination is zero-filled. src must be a valid, aligned address even when
// src_bytes is 0 (callers pass the matrix's first row then).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// Closes the group of this thread's copies issued since the last commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
// Waits until at most kPending of this thread's committed groups are still in flight. Other threads' copies become
// visible only after a __syncthreads that follows their own wait.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ----------------------------------------------------------------------------------------------------------------
// Elementwise kernels. Shapes are flat (n) unless stated.

// fp32 -> floatX, round to nearest even (the rounding of __float2bfloat16_rn).
__global__ void convert_to_floatX_kernel(floatX* out, const float* in, size_t n) {
    GRID_STRIDE_LOOP(i, n) out[i] = to_floatX(in[i]);
}
inline void convert_to_floatX(floatX* out, const float* in, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    convert_to_floatX_kernel<<<grid_for(n, 256), 256, 0, stream>>>(out, in, n);
    cudaCheckLaunch();
}

// host fp32 values into a floatX device array through a bounded fp32 staging buffer (256 MiB at a time), so that
// loading a large model does not need a second full-size fp32 copy on the GPU.
inline void upload_as_floatX(floatX* out, const std::vector<float>& host) {
    constexpr size_t kStagingFloats = 64ull << 20;
    const size_t chunk = std::min<size_t>(host.size(), kStagingFloats);
    DeviceBuffer<float> staging(chunk);
    for (size_t start = 0; start < host.size(); start += chunk) {
        const size_t n = std::min(chunk, host.size() - start);
        staging.upload(host.data() + start, n);
        convert_to_floatX(out + start, staging.data(), n, 0);
        cudaCheck(cudaStreamSynchronize(0));   // staging is rewritten by the next chunk
    }
}

// floatX device values into host floats (after the stream's work so far; returns when they are on the host).
inline void download_as_floats(float* host, const floatX* device, size_t n, cudaStream_t stream) {
    std::vector<floatX> staging(n);
    cudaCheck(cudaMemcpyAsync(staging.data(), device, n * sizeof(floatX), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    for (size_t i = 0; i < n; i++) host[i] = to_f32(staging[i]);
}

// The elementwise kernels of every layer read and write 16-byte packs: n must be a multiple of kPack
// (every caller's n is rows x a width, and validate_config keeps widths multiples of 8).
inline size_t packs_of(size_t n, const char* who) {
    if (n % kPack != 0) throw std::runtime_error(std::string(who) + ": " + std::to_string(n) + " elements, not a multiple of " + std::to_string(kPack));
    return n / kPack;
}

// GELU, exact erf form (SPEC 1.1.6): gelu(z) = 0.5 z (1 + erf(z/√2));  gelu'(z) = Φ(z) + z φ(z). out may alias inp.
__device__ inline float gelu(float z) { return 0.5f * z * (1.0f + erff(z * (float)M_SQRT1_2)); }
__global__ void gelu_forward_kernel(FloatXPack* out, const FloatXPack* inp, size_t packs) {
    GRID_STRIDE_LOOP(i, packs) {
        FloatXPack x = inp[i];
#pragma unroll
        for (int e = 0; e < kPack; e++) x.x[e] = to_floatX(gelu(to_f32(x.x[e])));
        out[i] = x;
    }
}
__global__ void gelu_backward_kernel(FloatXPack* dinp, const FloatXPack* dout, const FloatXPack* inp, size_t packs) {
    GRID_STRIDE_LOOP(i, packs) {
        const FloatXPack z = inp[i], g = dout[i];
        FloatXPack d;
#pragma unroll
        for (int e = 0; e < kPack; e++) {
            const float x = to_f32(z.x[e]);
            const float cdf = 0.5f * (1.0f + erff(x * (float)M_SQRT1_2));
            const float pdf = expf(-0.5f * x * x) * (float)(0.5 * M_2_SQRTPI * M_SQRT1_2);   // 1/√(2π)
            d.x[e] = to_floatX(to_f32(g.x[e]) * (cdf + x * pdf));
        }
        dinp[i] = d;
    }
}
inline void gelu_forward(floatX* out, const floatX* inp, size_t n, cudaStream_t stream) {
    const size_t packs = packs_of(n, "gelu_forward");
    gelu_forward_kernel<<<grid_for(packs, 256), 256, 0, stream>>>(reinterpret_cast<FloatXPack*>(out),
                                                                    reinterpret_cast<const FloatXPack*>(inp), packs);
    cudaCheckLaunch();
}
inline void gelu_backward(floatX* dinp, const floatX* dout, const floatX* inp, size_t n, cudaStream_t stream) {
    const size_t packs = packs_of(n, "gelu_backward");
    gelu_backward_kernel<<<grid_for(packs, 256), 256, 0, stream>>>(reinterpret_cast<FloatXPack*>(dinp), reinterpret_cast<const FloatXPack*>(dout),
                                                                     reinterpret_cast<const FloatXPack*>(inp), packs);
    cudaCheckLaunch();
}

// out = a + b + c in fp32, rounded once: the backward of the parallel residual, dx + dx1 + dx2 (the forward's sum
// x + attn + mlp is formed the same way inside the next LayerNorm, LayerNormInput). out may alias a.
__global__ void add3_kernel(FloatXPack* out, const FloatXPack* a, const FloatXPack* b, const FloatXPack* c, size_t packs) {
    GRID_STRIDE_LOOP(i, packs) {
        const FloatXPack x = a[i], y = b[i], z = c[i];
        FloatXPack sum;
#pragma unroll
        for (int e = 0; e < kPack; e++) sum.x[e] = to_floatX(to_f32(x.x[e]) + to_f32(y.x[e]) + to_f32(z.x[e]));
        out[i] = sum;
    }
}
inline void add3(floatX* out, const floatX* a, const floatX* b, const floatX* c, size_t n, cudaStream_t stream) {
    const size_t packs = packs_of(n, "add3");
    add3_kernel<<<grid_for(packs, 256), 256, 0, stream>>>(reinterpret_cast<FloatXPack*>(out), reinterpret_cast<const FloatXPack*>(a),
                                                          reinterpret_cast<const FloatXPack*>(b), reinterpret_cast<const FloatXPack*>(c), packs);
    cudaCheckLaunch();
}

// Row gather and scatter. src: (rows_src, C)   index: (n) rows of src   out: (n, C)
// gather: out[q] = src[index[q]] (embedding lookups, picking the LM-head rows);
// scatter: dsrc[index[q]] = dout[q] (indices distinct; the caller zeroes the other rows).
__global__ void gather_rows_kernel(floatX* out, const floatX* src, const int* index, size_t n, size_t C) {
    GRID_STRIDE_LOOP(i, n * C) out[i] = src[(size_t)index[i / C] * C + i % C];
}
__global__ void scatter_rows_kernel(floatX* dsrc, const floatX* dout, const int* index, size_t n, size_t C) {
    GRID_STRIDE_LOOP(i, n * C) dsrc[(size_t)index[i / C] * C + i % C] = dout[i];
}
inline void gather_rows(floatX* out, const floatX* src, const int* index, size_t n, size_t C, cudaStream_t stream) {
    if (n == 0) return;
    gather_rows_kernel<<<grid_for(n * C, 256), 256, 0, stream>>>(out, src, index, n, C);
    cudaCheckLaunch();
}
inline void scatter_rows(floatX* dsrc, const floatX* dout, const int* index, size_t n, size_t C, cudaStream_t stream) {
    if (n == 0) return;
    scatter_rows_kernel<<<grid_for(n * C, 256), 256, 0, stream>>>(dsrc, dout, index, n, C);
    cudaCheckLaunch();
}

// ----------------------------------------------------------------------------------------------------------------
// LayerNorm (SPEC 1.1.2), statistics in fp32. One warp per row.
// inp, out: (N, C)   weight, bias: (C)   mean, rstd: (N) fp32, kept for the backward pass.

// Where a normalised row goes: out = xhat * weight + bias.
struct LayerNormOutput {
    floatX* out;
    const floatX* weight;
    const floatX* bias;
};

// What is normalised: x, or the parallel residual of the layer before, x + branch_a + branch_b (attention and MLP
// outputs), summed in fp32 and rounded once exactly as add3 does, and also written to sum_out (if non-null) as the
// next residual stream. Fusing the sum saves a kernel and a round trip of the stream through memory.
struct LayerNormInput {
    const floatX* x;
    const floatX* branch_a = nullptr;
    const floatX* branch_b = nullptr;
    floatX* sum_out = nullptr;   // may alias x (each element is read before it is written, by the same thread)
    LayerNormInput(const floatX* x) : x(x) {}   // implicit: a plain x is passed as itself
    LayerNormInput(const floatX* x, const floatX* branch_a, const floatX* branch_b, floatX* sum_out)
        : x(x), branch_a(branch_a), branch_b(branch_b), sum_out(sum_out) {}
};

// The row sits in registers (lane l holds its 16-byte packs l, l + 32, ..., kPacks at most), so x is read once, as
// whole vectors. The two LayerNorms of a parallel-residual layer normalise the same x (SPEC 1.1.1): a second output
// (second.out non-null) is written from the same statistics, in the same pass.
template <int kPacks>
__global__ void layernorm_forward_kernel(LayerNormOutput first, LayerNormOutput second, float* mean, float* rstd,
                                         LayerNormInput inp, int N, int C) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const int packs = C / kPack;
    const size_t row_start = (size_t)row * C;
    auto row_of = [&](const floatX* tensor) { return reinterpret_cast<const FloatXPack*>(tensor + row_start); };
    float v[kPacks][kPack];
    float sum = 0.0f;
#pragma unroll
    for (int u = 0; u < kPacks; u++) {
        const int p = lane + 32 * u;
        FloatXPack packed = p < packs ? row_of(inp.x)[p] : FloatXPack{};
        if (inp.branch_a != nullptr && p < packs) {
            const FloatXPack a = row_of(inp.branch_a)[p], b = row_of(inp.branch_b)[p];
#pragma unroll
            for (int e = 0; e < kPack; e++) packed.x[e] = to_floatX(to_f32(packed.x[e]) + to_f32(a.x[e]) + to_f32(b.x[e]));
            if (inp.sum_out != nullptr) reinterpret_cast<FloatXPack*>(inp.sum_out + row_start)[p] = packed;
        }
#pragma unroll
        for (int e = 0; e < kPack; e++) {
            v[u][e] = to_f32(packed.x[e]);
            sum += v[u][e];
        }
    }
    const float m = warp_sum(sum) / C;
    float var = 0.0f;
#pragma unroll
    for (int u = 0; u < kPacks; u++)
#pragma unroll
        for (int e = 0; e < kPack; e++) {
            const float d = lane + 32 * u < packs ? v[u][e] - m : 0.0f;
            var += d * d;
        }
    const float r = rsqrtf(warp_sum(var) / C + kLayerNormEps);
    const LayerNormOutput outputs[2] = {first, second};
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const LayerNormOutput& o = outputs[k];
        if (o.out == nullptr) continue;
#pragma unroll
        for (int u = 0; u < kPacks; u++) {
            const int p = lane + 32 * u;
            if (p >= packs) continue;
            const FloatXPack w = reinterpret_cast<const FloatXPack*>(o.weight)[p], b = reinterpret_cast<const FloatXPack*>(o.bias)[p];
            FloatXPack y;
#pragma unroll
            for (int e = 0; e < kPack; e++) y.x[e] = to_floatX((v[u][e] - m) * r * to_f32(w.x[e]) + to_f32(b.x[e]));
            reinterpret_cast<FloatXPack*>(o.out + (size_t)row * C)[p] = y;
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// With xhat = (x - mean) rstd and g = dout * weight: dinp = rstd (g - mean(g) - xhat mean(g xhat)); and the
// parameter gradients dweight = Σ_rows dout xhat, dbias = Σ_rows dout. One warp per row as in the forward (lane l:
// packs l, l + 32, ...), the row's x and dout held in registers (as packs) from their one read to the write of dinp;
// a block takes one chunk of rows and keeps its lanes' sums of dout xhat and dout in registers (mean and rstd are
// known, so they accumulate in the pass that forms mean(g) and mean(g xhat)). The block's warps add their sums
// into shared memory one warp after the other, and the block writes them to partials: (chunks, C) for dweight,
// then (chunks, C) for dbias. layernorm_backward adds the chunks to dweight and dbias (column_sum_accumulate, fixed
// order): deterministic. Up to 4 packs a lane (widths to 1024 in bf16) the registers are held to 128, so that two
// blocks fit on an SM (164 registers otherwise; measured on b4_300, width 1024: 0.7% slower a training step).
constexpr int kLayerNormBackwardWarps = 8, kLayerNormBackwardBlocks = 264;   // 2 blocks per SM of an H200
template <int kPacks>
__global__ void __launch_bounds__(kLayerNormBackwardWarps * 32, kPacks <= 4 ? 2 : 1)
layernorm_backward_kernel(floatX* dinp, float* partials, const floatX* dout, const floatX* inp, const floatX* weight,
                          const float* mean, const float* rstd, int N, int C, int rows_per_chunk) {
    extern __shared__ float block_sums[];   // (2C): Σ dout xhat, then Σ dout, over the block's rows
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, packs = C / kPack;
    const int first = blockIdx.x * rows_per_chunk, last = min(N, first + rows_per_chunk);
    const FloatXPack* weight_packs = reinterpret_cast<const FloatXPack*>(weight);
    float dweight[kPacks][kPack] = {}, dbias[kPacks][kPack] = {};
    for (int row = first + warp; row < last; row += kLayerNormBackwardWarps) {
        const size_t start = (size_t)row * C;
        const FloatXPack* x_row = reinterpret_cast<const FloatXPack*>(inp + start);
        const FloatXPack* dy_row = reinterpret_cast<const FloatXPack*>(dout + start);
        FloatXPack x[kPacks], dy[kPacks];
#pragma unroll
        for (int u = 0; u < kPacks; u++) {
            const int p = lane + 32 * u;
            if (p < packs) {
                x[u] = x_row[p];
                dy[u] = dy_row[p];
            }
        }
        const float m = mean[row], r = rstd[row];
        float g_sum = 0.0f, gx_sum = 0.0f;
#pragma unroll
        for (int u = 0; u < kPacks; u++) {
            if (lane + 32 * u >= packs) continue;
            const FloatXPack w = weight_packs[lane + 32 * u];
#pragma unroll
            for (int e = 0; e < kPack; e++) {
                const float xhat = (to_f32(x[u].x[e]) - m) * r, d = to_f32(dy[u].x[e]), g = d * to_f32(w.x[e]);
                g_sum += g;
                gx_sum += g * xhat;
                dweight[u][e] += d * xhat;
                dbias[u][e] += d;
            }
        }
        const float g_mean = warp_sum(g_sum) / C, gx_mean = warp_sum(gx_sum) / C;
        FloatXPack* dx_row = reinterpret_cast<FloatXPack*>(dinp + start);
#pragma unroll
        for (int u = 0; u < kPacks; u++) {
            if (lane + 32 * u >= packs) continue;
            const FloatXPack w = weight_packs[lane + 32 * u];
            FloatXPack dx;
#pragma unroll
            for (int e = 0; e < kPack; e++)
                dx.x[e] = to_floatX(r * (to_f32(dy[u].x[e]) * to_f32(w.x[e]) - g_mean - (to_f32(x[u].x[e]) - m) * r * gx_mean));
            dx_row[lane + 32 * u] = dx;
        }
    }
    for (int w = 0; w < kLayerNormBackwardWarps; w++) {
        if (warp == w)
#pragma unroll
            for (int u = 0; u < kPacks; u++) {
                const int c0 = (lane + 32 * u) * kPack;
                if (c0 >= C) continue;
#pragma unroll
                for (int e = 0; e < kPack; e++) {
                    block_sums[c0 + e] = (w == 0 ? 0.0f : block_sums[c0 + e]) + dweight[u][e];
                    block_sums[C + c0 + e] = (w == 0 ? 0.0f : block_sums[C + c0 + e]) + dbias[u][e];
                }
            }
        __syncthreads();
    }
    const size_t chunks = gridDim.x;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        partials[blockIdx.x * (size_t)C + c] = block_sums[c];
        partials[(chunks + blockIdx.x) * C + c] = block_sums[C + c];
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Matrix products. Linear layers go through cuBLASLt (bias fused as an epilogue), with one plan (descriptors and
// the heuristic's algorithm) cached per shape; attention's many small per-head products go through cuBLAS's
// strided-batched GEMM. All accumulate in fp32 (CUBLAS_COMPUTE_32F: no TF32, so the FP32 build is exact fp32).
//
// cuBLAS is column-major; a row-major (R, C) matrix is a column-major (C, R) one. So for row-major tensors,
// out (N, OC) = inp (N, IC) · W^T (W: (OC, IC)) is the column-major product out^T = W^T... see linear_forward.

#if defined(BLOCKTF_PRECISION_FP32)
constexpr cudaDataType kCudaFloatX = CUDA_R_32F;
#else
constexpr cudaDataType kCudaFloatX = CUDA_R_16BF;
#endif

struct MatmulKey {
    int m, n, k;
    bool trans_a, trans_b, has_bias;
    cudaDataType d_type;
    int align_a, align_b, align_d, align_bias;   // pointer alignments in bytes (capped at 256): they limit the algorithms
    bool operator<(const MatmulKey& o) const {
        return std::tie(m, n, k, trans_a, trans_b, has_bias, d_type, align_a, align_b, align_d, align_bias) <
               std::tie(o.m, o.n, o.k, o.trans_a, o.trans_b, o.has_bias, o.d_type, o.align_a, o.align_b, o.align_d, o.align_bias);
    }
};

struct MatmulPlan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo;
};

inline int pointer_alignment(const void* p) {
    uintptr_t address = (uintptr_t)p;
    int alignment = 256;
    while (alignment > 1 && address % alignment != 0) alignment /= 2;
    return alignment;
}

// The GPU context every launcher that needs cuBLAS takes: handles, stream, workspace, cached plans.
// stream: its own stream, a blocking one: work on it still orders with the legacy stream's synchronous copies
// (DeviceBuffer::upload and download), and, unlike the legacy stream, it can be captured into a CUDA graph.
class Gpu {
public:
    cudaStream_t stream = 0;
    cublasHandle_t blas = nullptr;
    cublasLtHandle_t lt = nullptr;

    Gpu() : workspace_(kWorkspaceBytes) {
        cudaCheck(cudaStreamCreate(&own_stream_));
        stream = own_stream_;
        cublasCheck(cublasCreate(&blas));
        cublasCheck(cublasSetStream(blas, stream));
        cublasCheck(cublasSetWorkspace(blas, workspace_.data(), kWorkspaceBytes));
        cublasCheck(cublasLtCreate(&lt));
    }
    ~Gpu() {
        for (auto& entry : plans_) {
            cublasLtMatmulDescDestroy(entry.second.desc);
            cublasLtMatrixLayoutDestroy(entry.second.a);
            cublasLtMatrixLayoutDestroy(entry.second.b);
            cublasLtMatrixLayoutDestroy(entry.second.d);
        }
        cublasLtDestroy(lt);
        cublasDestroy(blas);
        cudaStreamDestroy(own_stream_);
    }
    Gpu(const Gpu&) = delete;
    Gpu& operator=(const Gpu&) = delete;

    // D (m, n) column-major = op(A) · op(B) + beta·D [+ bias (m) broadcast over columns]. A, B: floatX.
    // op(A) is (m, k): A is stored (m, k) or, transposed, (k, m); likewise op(B) is (k, n).
    void matmul(void* D, cudaDataType d_type, const floatX* A, const floatX* B, int m, int n, int k, bool trans_a,
                bool trans_b, const floatX* bias, float beta) {
        MatmulKey key{m, n, k, trans_a, trans_b, bias != nullptr, d_type, pointer_alignment(A), pointer_alignment(B),
                      pointer_alignment(D), bias ? pointer_alignment(bias) : 256};
        auto it = plans_.find(key);
        if (it == plans_.end()) it = plans_.emplace(key, make_plan(key)).first;
        MatmulPlan& plan = it->second;
        if (bias) cublasCheck(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
        const float alpha = 1.0f;
        cublasCheck(cublasLtMatmul(lt, plan.desc, &alpha, A, plan.a, B, plan.b, &beta, D, plan.d, D, plan.d, &plan.algo,
                                   workspace_.data(), kWorkspaceBytes, stream));
    }

    // Scratch of column_sum_accumulate: at least `floats` partial sums and `counters` arrival counters, zero between
    // calls. Scratch buffers grow when a call needs more.
    struct ColumnScratch {
        float* partials;
        unsigned* arrivals;
    };
    ColumnScratch column_scratch(size_t floats, size_t counters) {
        if (column_arrivals_.size() < counters) {
            grow(column_arrivals_, counters);
            cudaCheck(cudaMemsetAsync(column_arrivals_.data(), 0, column_arrivals_.size() * sizeof(unsigned), stream));
        }
        return {grow(column_partials_, floats), column_arrivals_.data()};
    }
    // Scratch of layernorm_backward: at least `floats` partial sums (its own: it hands them to column_sum_accumulate).
    float* layernorm_partials(size_t floats) { return grow(layernorm_partials_, floats); }
    // Counts the scratch reallocations: a CUDA graph captured before the last one holds freed addresses (ReplayedWork).
    uint64_t scratch_generation() const { return scratch_generation_; }

private:
    static constexpr size_t kWorkspaceBytes = 32ull << 20;
    cudaStream_t own_stream_ = nullptr;
    DeviceBuffer<uint8_t> workspace_;
    DeviceBuffer<float> column_partials_, layernorm_partials_;
    DeviceBuffer<unsigned> column_arrivals_;
    uint64_t scratch_generation_ = 0;

    // buffer, reallocated (twice as large) when it has fewer than n elements; cudaFree waits for the device.
    template <typename T>
    T* grow(DeviceBuffer<T>& buffer, size_t n) {
        if (buffer.size() < n) {
            buffer = DeviceBuffer<T>(std::max(n, 2 * buffer.size()));
            scratch_generation_++;
        }
        return buffer.data();
    }
    std::map<MatmulKey, MatmulPlan> plans_;

    MatmulPlan make_plan(const MatmulKey& key) {
        MatmulPlan plan;
        cublasCheck(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t op_a = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
        cublasCheck(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
        cublasCheck(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
        if (key.has_bias) {
            cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
            cublasCheck(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
            cudaDataType bias_type = kCudaFloatX;
            cublasCheck(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
        }
        // Stored shapes (rows, cols) in column-major terms; the leading dimension is the row count.
        int a_rows = key.trans_a ? key.k : key.m, a_cols = key.trans_a ? key.m : key.k;
        int b_rows = key.trans_b ? key.n : key.k, b_cols = key.trans_b ? key.k : key.n;
        cublasCheck(cublasLtMatrixLayoutCreate(&plan.a, kCudaFloatX, a_rows, a_cols, a_rows));
        cublasCheck(cublasLtMatrixLayoutCreate(&plan.b, kCudaFloatX, b_rows, b_cols, b_rows));
        cublasCheck(cublasLtMatrixLayoutCreate(&plan.d, key.d_type, key.m, key.n, key.m));

        cublasLtMatmulPreference_t preference;
        cublasCheck(cublasLtMatmulPreferenceCreate(&preference));
        size_t workspace = kWorkspaceBytes;
        uint32_t align_a = key.align_a, align_b = key.align_b, align_d = key.align_d;
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
        cublasLtMatmulHeuristicResult_t result;
        int found = 0;
        cublasCheck(cublasLtMatmulAlgoGetHeuristic(lt, plan.desc, plan.a, plan.b, plan.d, plan.d, preference, 1, &result, &found));
        cublasCheck(cublasLtMatmulPreferenceDestroy(preference));
        if (found == 0)
            throw std::runtime_error("cuBLASLt has no algorithm for the product m=" + std::to_string(key.m) + " n=" +
                                     std::to_string(key.n) + " k=" + std::to_string(key.k));
        plan.algo = result.algo;
        return plan;
    }
};

// Row-major linear layer: out (N, OC) = inp (N, IC) · weight^T + bias, weight (OC, IC) as PyTorch stores it.
// Column-major view: out^T (OC, N) = op_T(weight^T stored (IC, OC)) · inp^T (IC, N).
inline void linear_forward(Gpu& gpu, floatX* out, const floatX* inp, const floatX* weight, const floatX* bias, int N, int IC, int OC) {
    gpu.matmul(out, kCudaFloatX, weight, inp, OC, N, IC, true, false, bias, 0.0f);
}

// dst (C) += column sums of src (N, C): the bias and LayerNorm gradients. Deterministic (unlike atomics) in one
// kernel: a block of kColumnPackLanes column packs x kColumnRowLanes row lanes sums one chunk of rows of its packs
// and writes the chunk's sums to partials (chunks, C) fp32; the last block of a column range to arrive (a counter
// per range, which that block resets for the next call) adds the chunks' sums to dst in a fixed order, rounding
// once. Narrow blocks (8 packs) and about kColumnBlocksWanted blocks keep enough loads in flight at every width.
// (The same kernel adds up fp32 partial sums: layernorm_backward's.)
// A matrix-vector product with a ones vector, as before, ran cuBLAS's split-K kernels plus a reduction kernel
// (dev/NOTES.md).
constexpr int kColumnPackLanes = 8, kColumnRowLanes = 32, kColumnThreads = kColumnPackLanes * kColumnRowLanes;
constexpr int kColumnBlocksWanted = 528, kColumnMinRows = 64;   // 4 blocks per SM of an H200; rows per chunk at least

// Each thread holds kPack sums of its column pack (pack lane) over its row lane's rows. Returns their sum over the
// row lanes, in a fixed order (shuffles inside each warp, then warp by warp), in threads t < kColumnPackLanes * kPack:
// thread t gets element t % kPack of pack lane t / kPack. warp_sums: the block's scratch.
__device__ inline float sum_over_row_lanes(float (&sum)[kPack], float (*warp_sums)[kColumnPackLanes][kPack]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int e = 0; e < kPack; e++)
        for (int offset = kColumnPackLanes; offset < 32; offset *= 2) sum[e] += __shfl_xor_sync(0xffffffff, sum[e], offset);
    __syncthreads();   // warp_sums may still be read from a previous call
    if (lane < kColumnPackLanes)
#pragma unroll
        for (int e = 0; e < kPack; e++) warp_sums[warp][lane][e] = sum[e];
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.x < kColumnPackLanes * kPack)
        for (int w = 0; w < kColumnThreads / 32; w++) total += warp_sums[w][threadIdx.x / kPack][threadIdx.x % kPack];
    return total;
}

template <typename Value>   // floatX or fp32
__global__ void __launch_bounds__(kColumnThreads)
column_sums_kernel(floatX* dst, float* partials, unsigned* arrivals, const Value* src, int N, int C, int rows_per_chunk) {
    __shared__ float warp_sums[kColumnThreads / 32][kColumnPackLanes][kPack];
    __shared__ bool last;
    const int pack_lane = threadIdx.x % kColumnPackLanes, row_lane = threadIdx.x / kColumnPackLanes;
    const size_t column = ((size_t)blockIdx.x * kColumnPackLanes + pack_lane) * kPack;   // this thread's pack
    const bool owns_pack = column < (size_t)C;
    const int out_column = blockIdx.x * kColumnPackLanes * kPack + threadIdx.x;          // sum_over_row_lanes' result
    const bool has_result = threadIdx.x < kColumnPackLanes * kPack && out_column < C;
    const int first = blockIdx.y * rows_per_chunk, last_row = min(N, first + rows_per_chunk);
    float sum[kPack] = {};
    if (owns_pack) {
#pragma unroll 8
        for (int r = first + row_lane; r < last_row; r += kColumnRowLanes) {   // 8 loads in flight
            float x[kPack];
            if constexpr (std::is_same<Value, float>::value) load_floats(x, src + (size_t)r * C + column);
            else load_pack(x, src + (size_t)r * C + column);
#pragma unroll
            for (int e = 0; e < kPack; e++) sum[e] += x[e];
        }
    }
    const float chunk_total = sum_over_row_lanes(sum, warp_sums);
    if (has_result) partials[(size_t)blockIdx.y * C + out_column] = chunk_total;

    __threadfence();   // this chunk's sums are visible device-wide before the block is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&arrivals[blockIdx.x], 1u) == gridDim.y - 1;
        if (last) arrivals[blockIdx.x] = 0;   // every chunk has arrived: ready for the next call
    }
    __syncthreads();
    if (!last) return;
    // The last chunk of this column range to arrive: row lane l adds chunks l, l + kColumnRowLanes, ... (read from
    // L2, where the other blocks wrote them), then the row lanes are summed in order as above.
#pragma unroll
    for (int e = 0; e < kPack; e++) sum[e] = 0.0f;
    if (owns_pack)
        for (int k = row_lane; k < (int)gridDim.y; k += kColumnRowLanes) {
            const float4* chunk = reinterpret_cast<const float4*>(partials + (size_t)k * C + column);
#pragma unroll
            for (int f = 0; f < kPack / 4; f++) {
                const float4 v = __ldcg(chunk + f);
                sum[4 * f] += v.x, sum[4 * f + 1] += v.y, sum[4 * f + 2] += v.z, sum[4 * f + 3] += v.w;
            }
        }
    const float total = sum_over_row_lanes(sum, warp_sums);
    if (has_result) dst[out_column] = to_floatX(to_f32(dst[out_column]) + total);
}

// N rows cut into at most `wanted` (>= 1) chunks of equal size but the last: rows_per_chunk, and how many chunks.
struct RowChunks {
    int rows_per_chunk, chunks;
};
inline RowChunks row_chunks(int N, int wanted) {
    const int rows_per_chunk = (N + wanted - 1) / wanted;
    return {rows_per_chunk, (N + rows_per_chunk - 1) / rows_per_chunk};
}

// src: floatX or fp32. C: a multiple of kPack (validate_config); src 16-byte aligned.
template <typename Value>
inline void column_sum_accumulate(Gpu& gpu, floatX* dst, const Value* src, int N, int C) {
    if (N <= 0 || C <= 0) return;
    if (C % kPack != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
        throw std::runtime_error("column_sum_accumulate: width " + std::to_string(C) + " must be a multiple of " +
                                 std::to_string(kPack) + " and the rows 16-byte aligned");
    const int column_blocks = (C / kPack + kColumnPackLanes - 1) / kColumnPackLanes;
    const int wanted_chunks = std::max(1, std::min((N + kColumnMinRows - 1) / kColumnMinRows, kColumnBlocksWanted / column_blocks));
    const RowChunks split = row_chunks(N, wanted_chunks);
    const Gpu::ColumnScratch scratch = gpu.column_scratch((size_t)split.chunks * C, column_blocks);
    column_sums_kernel<<<dim3(column_blocks, split.chunks), kColumnThreads, 0, gpu.stream>>>(
        dst, scratch.partials, scratch.arrivals, src, N, C, split.rows_per_chunk);
    cudaCheckLaunch();
}

// dinp (N, IC) = dout (N, OC) · weight (written);  dweight (OC, IC) += dout^T · inp;  dbias (OC) += column sums of dout.
// Column-major: dinp^T = weight^T (IC, OC) · dout^T (OC, N);  dweight^T (IC, OC) += inp^T (IC, N) · dout (N, OC).
inline void linear_backward(Gpu& gpu, floatX* dinp, floatX* dweight, floatX* dbias, const floatX* dout, const floatX* inp,
                            const floatX* weight, int N, int IC, int OC) {
    gpu.matmul(dinp, kCudaFloatX, weight, dout, IC, N, OC, false, false, nullptr, 0.0f);
    gpu.matmul(dweight, kCudaFloatX, inp, dout, IC, OC, N, false, true, nullptr, 1.0f);
    if (dbias) column_sum_accumulate(gpu, dbias, dout, N, OC);
}

// Many independent column-major products C_i = alpha op(A_i) op(B_i) (i < batch), each at a fixed stride.
inline void batched_matmul(Gpu& gpu, void* C, cudaDataType c_type, const floatX* A, const floatX* B, int m, int n, int k,
                           bool trans_a, bool trans_b, int lda, int ldb, int ldc, long long stride_a, long long stride_b,
                           long long stride_c, int batch, float alpha) {
    const float beta = 0.0f;
    cublasCheck(cublasGemmStridedBatchedEx(gpu.blas, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                           m, n, k, &alpha, A, kCudaFloatX, lda, stride_a, B, kCudaFloatX, ldb, stride_b,
                                           &beta, C, c_type, ldc, stride_c, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ----------------------------------------------------------------------------------------------------------------
// LayerNorm launchers. dinp is written; dweight, dbias accumulate.

// second: LN2 of the same x (parallel residual), or {} for none. C: a multiple of 8 (validate_config), at most 512
// packs (4096 in bf16, 2048 in fp32).
// Both directions keep a row in registers, kPacks 16-byte packs per lane. layernorm_lane_packs: the packs per lane a
// row of C values needs, after checking C (who: the caller, for the message); with_layernorm_packs calls
// launch(std::integral_constant<int, kPacks>) with the fewest of 1, 2, 4, 8 and 16 that hold them.
inline int layernorm_lane_packs(const char* who, int C) {
    const int lanes_packs = (C / kPack + 31) / 32;
    if (C % kPack != 0 || lanes_packs > 16)
        throw std::runtime_error(std::string(who) + ": width " + std::to_string(C) + " must be a multiple of " +
                                 std::to_string(kPack) + " and at most " + std::to_string(16 * 32 * kPack));
    return lanes_packs;
}
template <typename Launch>
inline void with_layernorm_packs(int lanes_packs, Launch launch) {
    if (lanes_packs <= 1) launch(std::integral_constant<int, 1>{});
    else if (lanes_packs <= 2) launch(std::integral_constant<int, 2>{});
    else if (lanes_packs <= 3) launch(std::integral_constant<int, 3>{});   // width 768 in bf16
    else if (lanes_packs <= 4) launch(std::integral_constant<int, 4>{});
    else if (lanes_packs <= 8) launch(std::integral_constant<int, 8>{});
    else launch(std::integral_constant<int, 16>{});
}

inline void layernorm_forward(LayerNormOutput first, LayerNormOutput second, float* mean, float* rstd,
                              LayerNormInput inp, int N, int C, cudaStream_t stream) {
    constexpr int kRowsPerBlock = 4;   // 4 warps: more blocks than SMs already at the decode steps' 512 rows
    const unsigned grid = (unsigned)((N + kRowsPerBlock - 1) / kRowsPerBlock), threads = 32 * kRowsPerBlock;
    with_layernorm_packs(layernorm_lane_packs("layernorm_forward", C), [&](auto packs) {
        layernorm_forward_kernel<decltype(packs)::value><<<grid, threads, 0, stream>>>(first, second, mean, rstd, inp, N, C);
    });
    cudaCheckLaunch();
}
inline void layernorm_forward(floatX* out, float* mean, float* rstd, LayerNormInput inp, const floatX* weight,
                              const floatX* bias, int N, int C, cudaStream_t stream) {
    layernorm_forward({out, weight, bias}, {}, mean, rstd, inp, N, C, stream);
}
// C: a multiple of kPack, at most 512 packs, as the forward.
inline void layernorm_backward(Gpu& gpu, floatX* dinp, floatX* dweight, floatX* dbias, const floatX* dout, const floatX* inp,
                               const floatX* weight, const float* mean, const float* rstd, int N, int C) {
    const int lanes_packs = layernorm_lane_packs("layernorm_backward", C);
    if (N <= 0) return;
    const RowChunks split = row_chunks(N, kLayerNormBackwardBlocks);
    float* partials = gpu.layernorm_partials(2 * (size_t)split.chunks * C);
    const size_t smem = 2 * (size_t)C * sizeof(float);   // at most 32 KB: within the default limit
    with_layernorm_packs(lanes_packs, [&](auto packs) {
        layernorm_backward_kernel<decltype(packs)::value><<<split.chunks, kLayerNormBackwardWarps * 32, smem, gpu.stream>>>(
            dinp, partials, dout, inp, weight, mean, rstd, N, C, split.rows_per_chunk);
    });
    cudaCheckLaunch();
    column_sum_accumulate(gpu, dweight, partials, split.chunks, C);
    column_sum_accumulate(gpu, dbias, partials + (size_t)split.chunks * C, split.chunks, C);
}

// ----------------------------------------------------------------------------------------------------------------
// Rotary embedding fused with the head split (SPEC 1.1.3-4). The fused QKV output (nseq, S, NH, 3, HS) becomes
// q, k, v in (nseq, NH, S, HS), the layout the batched attention products want, with q and k rotated:
//   u'_m = u_m cos - u_{m+h} sin,   u'_{m+h} = u_{m+h} cos + u_m sin,   angle p θ_m, θ_m = base^(-2m/rot), h = rot/2
// on the first rot = HS/4 dims of each head. The backward rotates by the opposite angle (direction -1) and merges
// the heads back. cos_table, sin_table: (S, rot/2) fp32, made in double on the host (make_rope_tables).

// Element d of one head's query or key u (HS values) after the rotation of its position, whose angle table row is
// cos_row, sin_row (rot/2 values); direction -1 rotates back (the backward pass). Dims d >= rot pass unchanged.
__device__ inline float rope_element(const floatX* u, int d, int rot, const float* cos_row, const float* sin_row, float direction) {
    const float x = to_f32(u[d]);
    if (d >= rot) return x;
    const int half = rot / 2;
    const bool low = d < half;
    const int m = low ? d : d - half;
    const float partner = to_f32(u[low ? d + half : d - half]);
    return low ? x * cos_row[m] - direction * partner * sin_row[m] : x * cos_row[m] + direction * partner * sin_row[m];
}

// The pack of head row u (HS values) that starts at dim d0, rotated element by element as rope_element does (a pack
// past the rotary slice is returned as it is).
__device__ inline FloatXPack rope_pack(const floatX* u, int d0, int rot, const float* cos_row, const float* sin_row,
                                       float direction) {
    FloatXPack packed = *reinterpret_cast<const FloatXPack*>(u + d0);
    if (d0 < rot)
#pragma unroll
        for (int e = 0; e < kPack; e++) packed.x[e] = to_floatX(rope_element(u, d0 + e, rot, cos_row, sin_row, direction));
    return packed;
}

// Pack t of the fused QKV layout's q part, (nseq, S, NH, HS) in packs of kPack: its head row (seq, s, h) and first dim.
struct HeadPack {
    size_t fused_row, seq;   // fused_row = (seq * S + s) * NH + h
    int s, h, d0;
};
__device__ inline HeadPack head_pack(size_t t, int S, int NH, int HS) {
    const int packs_per_head = HS / kPack;
    HeadPack p;
    p.fused_row = t / packs_per_head;
    p.d0 = (int)(t % packs_per_head) * kPack;
    p.h = p.fused_row % NH;
    const size_t token = p.fused_row / NH;
    p.s = token % S;
    p.seq = token / S;
    return p;
}

// One thread per 16-byte pack of q (and the same pack of k and v); a rotated element reads its partner from the same
// head row (rope_element). HS is a multiple of kPack (validate_config).
__global__ void rope_split_heads_kernel(floatX* q, floatX* k, floatX* v, const floatX* qkv, const float* cos_table,
                                        const float* sin_table, int nseq, int S, int NH, int HS, int rot) {
    const size_t packs = (size_t)nseq * S * NH * HS / kPack;
    const int half = rot / 2;
    GRID_STRIDE_LOOP(t, packs) {
        const HeadPack p = head_pack(t, S, NH, HS);
        const floatX* row = qkv + p.fused_row * 3 * HS;
        const size_t out = ((p.seq * NH + p.h) * S + p.s) * HS + p.d0;
        *reinterpret_cast<FloatXPack*>(v + out) = *reinterpret_cast<const FloatXPack*>(row + 2 * HS + p.d0);
        for (int part = 0; part < 2; part++)
            *reinterpret_cast<FloatXPack*>((part == 0 ? q : k) + out) =
                rope_pack(row + part * HS, p.d0, rot, cos_table + p.s * half, sin_table + p.s * half, 1.0f);
    }
}

__global__ void rope_merge_heads_backward_kernel(floatX* dqkv, const floatX* dq, const floatX* dk, const floatX* dv,
                                                 const float* cos_table, const float* sin_table, int nseq, int S, int NH,
                                                 int HS, int rot) {
    const size_t packs = (size_t)nseq * S * NH * HS / kPack;
    const int half = rot / 2;
    GRID_STRIDE_LOOP(t, packs) {
        const HeadPack p = head_pack(t, S, NH, HS);
        floatX* row = dqkv + p.fused_row * 3 * HS;
        const size_t head_row = ((p.seq * NH + p.h) * S + p.s) * HS;
        *reinterpret_cast<FloatXPack*>(row + 2 * HS + p.d0) = *reinterpret_cast<const FloatXPack*>(dv + head_row + p.d0);
        for (int part = 0; part < 2; part++)
            *reinterpret_cast<FloatXPack*>(row + part * HS + p.d0) =
                rope_pack((part == 0 ? dq : dk) + head_row, p.d0, rot, cos_table + p.s * half, sin_table + p.s * half, -1.0f);
    }
}

// Launch geometry of the RoPE kernels (these two and rope_append_kv's): one thread per pack of the (nseq, S, NH, HS) q.
inline int rope_heads_grid(int nseq, int S, int NH, int HS) {
    if (HS % kPack != 0) throw std::runtime_error("RoPE: head size " + std::to_string(HS) + " is not a multiple of " + std::to_string(kPack));
    return grid_for((size_t)nseq * S * NH * HS / kPack, 256);
}

// cos and sin of p θ_m for p < S, m < rot/2: (S, rot/2) each, computed in double, stored fp32 (SPEC 10.5).
inline void make_rope_tables(std::vector<float>& cos_table, std::vector<float>& sin_table, int S, int rot) {
    const int half = rot / 2;
    cos_table.resize((size_t)S * half);
    sin_table.resize((size_t)S * half);
    for (int p = 0; p < S; p++)
        for (int m = 0; m < half; m++) {
            double angle = p * std::pow((double)kRotaryBase, -2.0 * m / rot);
            cos_table[(size_t)p * half + m] = (float)std::cos(angle);
            sin_table[(size_t)p * half + m] = (float)std::sin(angle);
        }
}

// The tables of make_rope_tables on the device: cos, sin (S, rot/2) fp32.
inline void upload_rope_tables(DeviceBuffer<float>& cos, DeviceBuffer<float>& sin, int S, int rot) {
    std::vector<float> cos_table, sin_table;
    make_rope_tables(cos_table, sin_table, S, rot);
    cos = DeviceBuffer<float>(cos_table.size());
    sin = DeviceBuffer<float>(sin_table.size());
    cos.upload(cos_table.data(), cos_table.size());
    sin.upload(sin_table.data(), sin_table.size());
}

// Head merge: (nseq, NH, S, HS) -> (nseq, S, NH*HS), and the split for the backward pass (to_heads = true).
__global__ void permute_heads_kernel(floatX* out, const floatX* inp, int nseq, int S, int NH, int HS, bool to_heads) {
    const size_t n = (size_t)nseq * S * NH * HS;
    GRID_STRIDE_LOOP(i, n) {   // i indexes the merged layout (seq, s, h, d)
        const int d = i % HS, h = (i / HS) % NH, s = (i / ((size_t)HS * NH)) % S;
        const size_t seq = i / ((size_t)HS * NH * S);
        const size_t head_index = ((seq * NH + h) * S + s) * HS + d;
        if (to_heads) out[head_index] = inp[i];
        else out[i] = inp[head_index];
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Attention (SPEC 1.1.5): causal, key-padding mask, scale HS^-0.5. Per (sequence, head): scores = q k^T · scale,
// masked softmax, out = probs · v. Three implementations behind attention_forward/backward (attention_path picks):
// short sequences (the token decoder) take the fused small kernels; longer ones flash attention in the BF16 build,
// and in the FP32 build batched GEMMs with the (S, S) scores in one scratch buffer reused by every layer (the
// backward recomputes them instead of keeping a (S, S) matrix per layer).

// One warp per score row. scores: (nseq*NH, S, S) fp32   key_mask: (nseq, S)   probs: (nseq*NH, S, S)
// Query i sees keys j <= i with key_mask[j] = 1; invisible keys get probability 0 (a row seeing none: all 0).
__global__ void attention_softmax_kernel(floatX* probs, const float* scores, const int* key_mask, int nseq, int NH, int S) {
    const size_t row = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)nseq * NH * S) return;
    const int i = row % S;
    const int* mask = key_mask + row / ((size_t)NH * S) * S;
    const float* z = scores + row * S;
    float max_z = -INFINITY;
    for (int j = lane; j <= i; j += 32) if (mask[j]) max_z = fmaxf(max_z, z[j]);
    max_z = warp_max(max_z);
    float sum = 0.0f;
    for (int j = lane; j <= i; j += 32) if (mask[j]) sum += expf(z[j] - max_z);
    sum = warp_sum(sum);
    const float inv_sum = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int j = lane; j < S; j += 32)
        probs[row * S + j] = to_floatX(j <= i && mask[j] ? expf(z[j] - max_z) * inv_sum : 0.0f);
}

// dscores_ij = p_ij (dp_ij - Σ_k p_ik dp_ik), one warp per row. dprobs: fp32.
__global__ void attention_softmax_backward_kernel(floatX* dscores, const floatX* probs, const float* dprobs, size_t rows, int S) {
    const size_t row = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const floatX* p = probs + row * S;
    const float* dp = dprobs + row * S;
    float dot = 0.0f;
    for (int j = lane; j < S; j += 32) dot += to_f32(p[j]) * dp[j];
    dot = warp_sum(dot);
    for (int j = lane; j < S; j += 32) dscores[row * S + j] = to_floatX(to_f32(p[j]) * (dp[j] - dot));
}

// Small attention: S <= 16 (the token decoder: S = P + LB - 1 = 5 in every paper config), one fused kernel per
// direction instead of the batched GEMMs and softmax kernels below, which cost 5x more at these sizes (dev/NOTES.md).
//
// A group of G = HS / kPack lanes serves one (sequence, head): lane g owns dims [g kPack, (g + 1) kPack) of every
// row, one 16-byte pack, so a warp serves 32 / G heads. Each lane first copies its packs of the head's rows into
// the head's slot of shared memory with cp.async, all copies in flight at once and no registers held (read one row
// at a time, the loads' latency bounded the kernel); a lane reads back only its own packs, so its own wait is the
// only synchronisation. A dot product is kPack FMAs and log2(G) shuffles inside the group (group_sum), after which
// every lane of the group holds it: each lane keeps its query's scores in registers (s[j], j < kSmallMaxS, loops
// unrolled) and does the softmax itself. The query loop runs the same count in every lane, so the shuffles never
// diverge; lanes past the last head compute on a copy of it and store nothing. fp32 math, nothing (S, S) in device
// memory; the backward recomputes the probabilities and keeps them, and the score gradients, in the slot for its
// key pass.
//
// One call, H = nseq*NH heads, E = H*S*HS elements per tensor: the forward reads q, k, v and writes out (4E floatX)
// for 2·E·(S+1) FLOPs (causal: S(S+1)/2 pairs of 4·HS); the backward reads q, k, v, dout and writes dq, dk, dv (7E
// floatX) for 5·E·(S+1) FLOPs. At S = 5 that is under 2 FLOPs per byte: memory-bound by far.

constexpr int kSmallMaxS = 16;
constexpr int kSmallMaxWarps = 8;                     // warps per block at most
constexpr size_t kSmallSmemPerBlock = 64 << 10;       // one warp of the largest slots (S = 16) fits

// Bytes of one head's slot: `matrices` (S, HS) floatX matrices, then (backward) p and ds, (S, S) fp32 each; rounded to
// 16 so every slot starts 16-byte aligned.
__host__ __device__ inline size_t small_slot_bytes(int matrices, bool scores, int S, int HS) {
    const size_t bytes = (size_t)matrices * S * HS * sizeof(floatX) + (scores ? 2 * (size_t)S * S * sizeof(float) : 0);
    return (bytes + 15) / 16 * 16;
}

// This lane's packs of rows 0..S-1 (stride values apart from src) to staged[j * HS], in flight until cp_async_wait.
template <int HS>
__device__ inline void stage_rows(floatX* staged, const floatX* src, size_t stride, int S) {
    for (int j = 0; j < S; j++) cp_async_16(smem_address(staged + j * HS), src + j * stride, 16);
}
// a · (this lane's pack of row), summed over the group of G lanes that holds the whole row.
template <int G>
__device__ inline float group_dot(const float (&a)[kPack], const floatX* row) {
    float b[kPack];
    load_pack(b, row);
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < kPack; e++) dot += a[e] * b[e];
    return group_sum<G>(dot);
}
// acc += weight · (this lane's pack of row)
__device__ inline void add_scaled_pack(float (&acc)[kPack], float weight, const floatX* row) {
    float b[kPack];
    load_pack(b, row);
#pragma unroll
    for (int e = 0; e < kPack; e++) acc[e] += weight * b[e];
}

// The lane's place: head = seq * NH + h (the last head for lanes past it: active false), its first dim d0, and its
// head's slot of shared memory (slot_bytes each).
template <int HS>
struct SmallLane {
    static constexpr int G = HS / kPack;   // lanes per head
    static_assert(HS % kPack == 0 && 32 % G == 0, "a head must be whole 16-byte packs, a warp whole heads");
    size_t head, seq;
    int h, d0;
    bool active;
    unsigned char* slot;
    __device__ SmallLane(size_t heads, int NH, unsigned char* smem, size_t slot_bytes) {
        const size_t global_slot = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / G;
        active = global_slot < heads;
        head = active ? global_slot : heads - 1;
        seq = head / NH;
        h = head % NH;
        d0 = threadIdx.x % G * kPack;
        slot = smem + threadIdx.x / G * slot_bytes;
    }
    // Matrix m of the slot, at this lane's first dim.
    __device__ floatX* staged(int m, int S) const { return reinterpret_cast<floatX*>(slot) + (size_t)m * S * HS + d0; }
};

// Bit j set: key j of this sequence is visible (j < S <= 32). mask_row: (S) ints.
__device__ inline unsigned visible_key_bits(const int* mask_row, int S) {
    unsigned bits = 0;
    for (int j = 0; j < S; j++) bits |= (mask_row[j] != 0 ? 1u : 0u) << j;
    return bits;
}

// s[j]: score of key j, -inf for a key not seen. In place: the softmax over the seen keys (all 0 if none is).
__device__ inline void small_softmax(float (&s)[kSmallMaxS]) {
    float max_s = -INFINITY;
#pragma unroll
    for (int j = 0; j < kSmallMaxS; j++) max_s = fmaxf(max_s, s[j]);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kSmallMaxS; j++) {
        s[j] = s[j] == -INFINITY ? 0.0f : expf(s[j] - max_s);
        sum += s[j];
    }
    const float inv_sum = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
    for (int j = 0; j < kSmallMaxS; j++) s[j] *= inv_sum;
}

// Scores of query i (this lane's pack qi) over keys j <= i (rows HS apart from keys), scaled, -inf for a masked key.
// Every lane computes every dot product (the shuffles must not diverge).
template <int HS>
__device__ inline void small_scores(float (&s)[kSmallMaxS], const float (&qi)[kPack], const floatX* keys, int i,
                                    unsigned visible, float scale) {
#pragma unroll
    for (int j = 0; j < kSmallMaxS; j++) {
        s[j] = -INFINITY;
        if (j <= i) {
            const float dot = group_dot<SmallLane<HS>::G>(qi, keys + j * HS) * scale;
            if ((visible >> j) & 1u) s[j] = dot;
        }
    }
}

extern __shared__ __align__(16) unsigned char small_smem[];

// Forward. Slot: q, k, v of the head. Per query i: its scores and softmax in registers, out_i = Σ_j p_ij v_j.
template <int HS>
__global__ void __launch_bounds__(kSmallMaxWarps * 32)
small_attention_forward_kernel(floatX* out, const floatX* q, const floatX* k, const floatX* v, const int* key_mask,
                               int nseq, int S, int NH, float scale) {
    const SmallLane<HS> lane((size_t)nseq * NH, NH, small_smem, small_slot_bytes(3, false, S, HS));
    const size_t head_offset = lane.head * S * HS + lane.d0;
    floatX *qs = lane.staged(0, S), *ks = lane.staged(1, S), *vs = lane.staged(2, S);
    stage_rows<HS>(qs, q + head_offset, HS, S);
    stage_rows<HS>(ks, k + head_offset, HS, S);
    stage_rows<HS>(vs, v + head_offset, HS, S);
    cp_async_commit();
    const unsigned visible = visible_key_bits(key_mask + lane.seq * S, S);
    cp_async_wait<0>();
    for (int i = 0; i < S; i++) {
        float qi[kPack], p[kSmallMaxS], o[kPack] = {};
        load_pack(qi, qs + i * HS);
        small_scores<HS>(p, qi, ks, i, visible, scale);
        small_softmax(p);
#pragma unroll
        for (int j = 0; j < kSmallMaxS; j++)
            if (j <= i) add_scaled_pack(o, p[j], vs + j * HS);
        if (lane.active) store_pack(out + ((lane.seq * S + i) * NH + lane.h) * HS + lane.d0, o);
    }
}

// Backward. Slot: q, k, v, dout of the head, then p and ds. Query pass, per query i: s_ij and dp_ij = dO_i·v_j,
// p = softmax, δ_i = Σ_j p_ij dp_ij, ds_ij = p_ij (dp_ij - δ_i) / sqrt(HS), dq_i = Σ_j ds_ij k_j; p_ij and ds_ij go
// to the slot. Key pass, per key j: dk_j = Σ_{i>=j} ds_ij q_i, dv_j = Σ_{i>=j} p_ij dO_i.
template <int HS>
__global__ void __launch_bounds__(kSmallMaxWarps * 32)
small_attention_backward_kernel(floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* q, const floatX* k,
                                const floatX* v, const int* key_mask, int nseq, int S, int NH, float scale) {
    const SmallLane<HS> lane((size_t)nseq * NH, NH, small_smem, small_slot_bytes(4, true, S, HS));
    const size_t head_offset = lane.head * S * HS + lane.d0;
    floatX *qs = lane.staged(0, S), *ks = lane.staged(1, S), *vs = lane.staged(2, S), *dos = lane.staged(3, S);
    stage_rows<HS>(qs, q + head_offset, HS, S);
    stage_rows<HS>(ks, k + head_offset, HS, S);
    stage_rows<HS>(vs, v + head_offset, HS, S);
    stage_rows<HS>(dos, dout + (lane.seq * S * NH + lane.h) * HS + lane.d0, (size_t)NH * HS, S);   // row i: token i
    cp_async_commit();
    float* probs = reinterpret_cast<float*>(lane.slot + 4 * (size_t)S * HS * sizeof(floatX));   // [i][j]
    float* dscores = probs + S * S;
    const bool writer = lane.d0 == 0;   // every lane of the group holds the same p and ds: one writes them
    const unsigned visible = visible_key_bits(key_mask + lane.seq * S, S);
    cp_async_wait<0>();

    for (int i = 0; i < S; i++) {
        float qi[kPack], doi[kPack], p[kSmallMaxS], dp[kSmallMaxS], dqi[kPack] = {};
        load_pack(qi, qs + i * HS);
        load_pack(doi, dos + i * HS);
        small_scores<HS>(p, qi, ks, i, visible, scale);
#pragma unroll
        for (int j = 0; j < kSmallMaxS; j++) dp[j] = j <= i ? group_dot<SmallLane<HS>::G>(doi, vs + j * HS) : 0.0f;
        small_softmax(p);
        float delta = 0.0f;
#pragma unroll
        for (int j = 0; j < kSmallMaxS; j++) delta += p[j] * dp[j];
#pragma unroll
        for (int j = 0; j < kSmallMaxS; j++)
            if (j <= i) {
                const float ds = p[j] * (dp[j] - delta) * scale;   // gradient of q_i·k_j
                add_scaled_pack(dqi, ds, ks + j * HS);
                if (writer) {
                    probs[i * S + j] = p[j];
                    dscores[i * S + j] = ds;
                }
            }
        if (lane.active) store_pack(dq + head_offset + (size_t)i * HS, dqi);
    }
    __syncwarp();   // the group's writer and readers share a warp
    for (int j = 0; j < S; j++) {
        float dkj[kPack] = {}, dvj[kPack] = {};
        for (int i = j; i < S; i++) {
            add_scaled_pack(dkj, dscores[i * S + j], qs + i * HS);
            add_scaled_pack(dvj, probs[i * S + j], dos + i * HS);
        }
        if (lane.active) {
            store_pack(dk + head_offset + (size_t)j * HS, dkj);
            store_pack(dv + head_offset + (size_t)j * HS, dvj);
        }
    }
}

// The head sizes the attention kernels are built for: with_head_size calls launch(std::integral_constant<int, HS>)
// for HS among kMin..128 (powers of two from 16; the flash kernels start at 32) and throws naming who for any other.
template <int kMin = 16, typename Launch>
inline void with_head_size(const char* who, int HS, Launch launch) {
    if constexpr (kMin <= 16)
        if (HS == 16) return launch(std::integral_constant<int, 16>{});
    if (HS == 32) return launch(std::integral_constant<int, 32>{});
    if (HS == 64) return launch(std::integral_constant<int, 64>{});
    if (HS == 128) return launch(std::integral_constant<int, 128>{});
    throw std::runtime_error(std::string(who) + ": head size " + std::to_string(HS) + " is not one of " +
                             (kMin <= 16 ? "16, " : "") + "32, 64 and 128");
}

inline void check_small_attention_shape(const char* who, int nseq, int S, int NH) {
    if (S < 1 || S > kSmallMaxS)
        throw std::runtime_error(std::string(who) + ": sequence length " + std::to_string(S) + " outside 1.." +
                                 std::to_string(kSmallMaxS) + " (use flash attention)");
    if ((size_t)nseq * NH > 0x7fffffffull) throw std::runtime_error(std::string(who) + ": too many heads for one grid");
}

// Grid of the small kernels: HS / kPack lanes per head, kSmallMaxWarps warps per block, fewer when the heads' slots
// (slot_bytes each) would pass kSmallSmemPerBlock.
struct SmallLaunch {
    unsigned blocks;
    int threads;
    size_t smem;
};
inline SmallLaunch small_attention_launch(int HS, size_t heads, size_t slot_bytes) {
    const int heads_per_warp = 32 / (HS / kPack);
    const size_t smem_per_warp = slot_bytes * heads_per_warp;
    const int warps = (int)std::max<size_t>(1, std::min<size_t>(kSmallMaxWarps, kSmallSmemPerBlock / smem_per_warp));
    const size_t heads_per_block = (size_t)warps * heads_per_warp;
    return {(unsigned)((heads + heads_per_block - 1) / heads_per_block), warps * 32, warps * smem_per_warp};
}

template <int HS>
inline void small_attention_forward_launch(floatX* out, const floatX* q, const floatX* k, const floatX* v,
                                           const int* key_mask, int nseq, int S, int NH, cudaStream_t stream) {
    const SmallLaunch launch = small_attention_launch(HS, (size_t)nseq * NH, small_slot_bytes(3, false, S, HS));
    allow_dynamic_smem(small_attention_forward_kernel<HS>, launch.smem, "small attention forward");
    small_attention_forward_kernel<HS><<<launch.blocks, launch.threads, launch.smem, stream>>>(
        out, q, k, v, key_mask, nseq, S, NH, 1.0f / std::sqrt((float)HS));
    cudaCheckLaunch();
}

template <int HS>
inline void small_attention_backward_launch(floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* q,
                                            const floatX* k, const floatX* v, const int* key_mask, int nseq, int S,
                                            int NH, cudaStream_t stream) {
    const SmallLaunch launch = small_attention_launch(HS, (size_t)nseq * NH, small_slot_bytes(4, true, S, HS));
    allow_dynamic_smem(small_attention_backward_kernel<HS>, launch.smem, "small attention backward");
    small_attention_backward_kernel<HS><<<launch.blocks, launch.threads, launch.smem, stream>>>(
        dq, dk, dv, dout, q, k, v, key_mask, nseq, S, NH, 1.0f / std::sqrt((float)HS));
    cudaCheckLaunch();
}

// q, k, v: (nseq, NH, S, HS), 1 <= S <= 16, HS in {16, 32, 64, 128}   key_mask: (nseq, S)   out: (nseq, S, NH*HS).
inline void small_attention_forward(floatX* out, const floatX* q, const floatX* k, const floatX* v, const int* key_mask,
                                    int nseq, int S, int NH, int HS, cudaStream_t stream) {
    check_small_attention_shape("small_attention_forward", nseq, S, NH);
    if ((size_t)nseq * NH == 0) return;
    with_head_size("small_attention_forward", HS, [&](auto hs) {
        small_attention_forward_launch<decltype(hs)::value>(out, q, k, v, key_mask, nseq, S, NH, stream);
    });
}

// dout: (nseq, S, NH*HS) -> dq, dk, dv: (nseq, NH, S, HS), written. Recomputes the probabilities.
inline void small_attention_backward(floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* q, const floatX* k,
                                     const floatX* v, const int* key_mask, int nseq, int S, int NH, int HS,
                                     cudaStream_t stream) {
    check_small_attention_shape("small_attention_backward", nseq, S, NH);
    if ((size_t)nseq * NH == 0) return;
    with_head_size("small_attention_backward", HS, [&](auto hs) {
        small_attention_backward_launch<decltype(hs)::value>(dq, dk, dv, dout, q, k, v, key_mask, nseq, S, NH, stream);
    });
}

// ----------------------------------------------------------------------------------------------------------------
// Flash attention (FlashAttention-2, Dao 2023) on mma.sync tensor cores, for the BF16 build: the stacks' attention
// when S > 16 (the block decoder's 511 blocks, the vanilla model's 2048 tokens), and generation's prefill. At head
// size 64 (every model of issue 8) the sm_90a build runs the same algorithm on Hopper's wgmma instead (after the
// mma.sync kernels below: forward_block_wgmma, backward_dkdv_block_wgmma, backward_dq_block_wgmma). Nothing
// (S, S)-sized is ever stored: the forward keeps each row's log-sum-exp (lse) for the backward, which recomputes the
// probabilities. Checked against the CPU reference in test/test_gpu.cu and against a double-precision reference
// (plus determinism and sanitizers) by dev/attention/test_attention.cu, which also times it.
//
// Semantics (SPEC 1.1.5): query i sees keys j <= i (+ p0 for the cache) with
// key_mask[j] = 1; s_ij = q_i·k_j / sqrt(HS); p_i = softmax_j(s_ij) in fp32; out_i = Σ_j p_ij v_j. A query that sees no
// key outputs 0 and stores lse = 0; the backward gives it (and every invisible key) zero gradients.
//
// ================================================================================================================
// Design (FlashAttention-2, Dao 2023), all three kernels on mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32:
//   every product is C (16 x 8, fp32) += A (16 x 16, bf16) · B (16 x 8, bf16) issued by one warp; a warp owns 16 rows
//   (or 32: two "row groups") of the side it keeps (queries in the forward and the dq pass, keys in the dk/dv pass)
//   and walks tiles of the other side, which the block stages in shared memory with cp.async (two stages: the next
//   tile's copy is in flight while the warps compute on the current one). Everything else stays in registers: the
//   warp's own operand fragments, the score tile, the running softmax statistics and the output/gradient
//   accumulators. The score tile's C fragments become the A fragments of the next product in registers (bf16
//   packing only), so nothing (S, S)-sized ever touches shared or device memory.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"); lane = 4*g + t with
// g = lane / 4 (the "group", 0..7) and t = lane % 4 (0..3); a register .b32 holds two bf16, the lower column (or row)
// index in the low half:
//   A (16 x 16, row-major), 4 regs: a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, 2t+9]
//                                   a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, "col"), 2 regs:      b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C (16 x 8, fp32), 4 regs:       c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
// So the C fragments of two adjacent 8-column tiles n = 2kk, 2kk+1 of a (16 x N) result are, packed to bf16, exactly
// the A fragment of k-step kk of a product that takes that result as its left operand:
//   a0 = (c[2kk][0], c[2kk][1])  a1 = (c[2kk][2], c[2kk][3])  a2 = (c[2kk+1][0], c[2kk+1][1])  a3 = (c[2kk+1][2], c[2kk+1][3])
// (c_to_a below). A thread holds rows g and g+8 of each row group: the row statistics (max, sum) of a row are spread
// over the 4 threads t = 0..3 of one quad and reduced with two xor-shuffles (1, 2).
//
// Shared memory: every tile is row-major bf16 with its rows padded from HS to kLd = HS + 8 elements (HS*2 + 16
// bytes). ldmatrix reads 8 rows x 16 bytes per 8x8 matrix; with the 16-byte pad, row r starts in 16-byte bank group
// (r * (kLd / 8)) % 8 = (r + const) % 8, so the 8 rows of a matrix hit 8 different bank groups: conflict-free, and the
// same holds for the 16-byte cp.async stores (8 consecutive chunks of a row). Operands are loaded with ldmatrix.x4:
//   A (rows r0.., cols k0..): lane l gives the address of row r0 + (l % 16), col k0 + 8 * (l / 16); the 4 matrices
//     come back as a0..a3.
//   B = T^T for a stored tile T (n rows, k cols; e.g. K in q·k^T): lane l gives row n0 + (l % 8) + 8 * (l / 16), col
//     k0 + 8 * ((l / 8) % 2); registers 0, 1 are (b0, b1) of n-tile n0 and 2, 3 those of n-tile n0 + 8.
//   B = T for a stored tile T (k rows, n cols; e.g. V in p·v): ldmatrix.trans, lane l gives row k0 + (l % 16), col
//     n0 + 8 * (l / 16); registers 0, 1 are (b0, b1) of n-tile n0 and 2, 3 those of n-tile n0 + 8.
// Rows past the end of a matrix, and key rows that are masked, are zero-filled by cp.async (src-size 0), so no
// garbage (not even NaN left in an unused cache slot) reaches a product.
//
// Softmax: scores are kept in the log2 domain with the scale folded in, x = s · HS^-0.5 · log2(e), so that each
// probability is one FFMA and one ex2.approx: p = 2^(s·c - m). m = running row max (-inf until the row has seen a
// visible key; 0 is used in its place then, so every exp2 is exp2(-inf) = 0 and nothing is NaN), l = running row sum
// (kept per thread, quad-reduced once at the end), and the output accumulator is rescaled by 2^(m_old - m_new) when
// the max grows. lse_i = ln2 · (m_i + log2 l_i) (natural log, fp32).
// Masking: causal key tiles past a warp's last query are never computed (skipped per warp; the block's last tile is
// the one holding its last query's diagonal); the element-wise mask (causal j <= i + p0, key visibility from the
// key_mask, j < number of keys) is applied only on tiles that cross a warp's diagonal or hold a masked/missing key;
// a tile whose keys are all masked is skipped. Key visibility of a tile is one __ballot_sync per 32 keys.
//
// Kernels and their shapes (4 warps = 128 threads per block in all three):
//   forward (also the cached prefill; strides are parameters): block = kBlockM queries of one (sequence, head),
//     key tiles of 64. HS 32, 64: 2 row groups per warp (32 queries), kBlockM = 128; HS 128: 1 row group, kBlockM = 64
//     (two would need 128 accumulator registers per thread for o alone).
//     Per key tile a warp runs S = Q K^T (16 x 64 per row group: HS/16 x 8 mma), the online softmax in registers,
//     O += P V (16 x HS: 4 x HS/8 mma). Shared: Q (kBlockM rows) + 2 stages x (K, V: 64 rows).
//   backward, deterministic, no atomics: (1) δ_i = dO_i·out_i (a small vectorised kernel); (2) dk/dv pass: block = 64
//     keys, a warp 16 of them (their K, and at HS 32 V, held as A fragments; else read from shared memory at each use)
//     with their dK, dV accumulators in registers; per query tile (64; 32 at HS 128), double-buffered with its lse and
//     δ: S^T = K Q^T, dP^T = V dO^T, P^T = 2^(S^T c - lse_i log2e), dS^T = P^T (dP^T - δ_i), dV += P^T dO,
//     dK += dS^T Q (P^T and dS^T go from C to A fragments in registers); (3) dq pass: block = 64 queries, a warp 16,
//     with Q, dO fragments and the dQ accumulator; per key tile (64; 32 at HS 128): S = Q K^T, dP = dO V^T, P, dS,
//     dQ += dS K. The dq pass recomputes S and dP instead of accumulating dq with atomics: 7 products per visible
//     pair instead of 5 (3.5x the forward's FLOPs instead of 2.5x), the price of bitwise-reproducible gradients.
//     A block or warp whose keys are all masked skips its products; a masked key's dK, dV rows are written as zeros
//     (its rows of P^T, dS^T only ever feed its own output rows, so the dk/dv pass needs no key mask per element).
//
// Resources (nvcc 13.0, sm_90, no spills unless said; H200 SM: 64K registers, 228 KB shared memory, 4 SMSPs):
//                 registers (HS 32 / 64 / 128)   shared memory per block        blocks (warps) per SM
//   forward       186 / 248 / 226                30 / 54 / 85 KB                2 (8), by registers
//   dk/dv pass    159 / 168* / 236               31 / 55 / 68.5 KB              3 / 3 / 2, by registers
//   dq pass       146 / 168 / 168                30 / 54 / 68 KB                3 (12)
//   (* capped by __launch_bounds__ for 3 blocks per SM: 32 bytes of spill, 6 reloads of loop-invariant values per
//   query tile.) Where the registers go, forward HS 64 per thread: q fragments 2 groups x 16, o 2 x 32, scores
//   2 x 32 (the packed p reuses them), statistics 8, plus B fragments the compiler loads ahead of their mma.
//
// FLOPs and bytes. Forward: 4·HS·S(S+1)/2 per (sequence, head), causal. Device memory sees q, k, v, out once (4E
//   bf16); each block re-reads K and V up to its diagonal from L2: at S 2048, HS 64, kBlockM 128, 16 KB of K, V per
//   128x64 tile pair (2 MFLOP) -> 128 FLOP per L2 byte, ~0.8 GB per call (~0.1 ms of L2 bandwidth at ~8 TB/s,
//   overlapped). Backward: 7 products per visible pair (S, dP twice) = 3.5x the forward's FLOPs executed for the 2.5x
//   counted; device memory: q, k, v, dout, out (δ pass), dq, dk, dv once; Q/dO (dk/dv pass) and K/V (dq pass) tiles
//   from L2, 64 rows of the owning side per block.
//
// Measured on the H200 (dev/attention/run.sh; nseq 8, NH 12, S 2048, HS 64, FLOPs counted causal): forward 216
// TFLOP/s, backward 182 TFLOP/s counted as 2.5x the forward's FLOPs, 6.2x and 5.5x the matmul path; the prefill
// 34-41x attention_cached (dev/NOTES.md). The wgmma kernels at that shape: forward 0.174 ms (296 TFLOP/s), backward
// 0.416 ms (310 TFLOP/s counted), against 0.237 and 0.710 ms here.

namespace flash {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }

// ================================================================================================================
// Primitives: inline PTX.

// The block's dynamic shared memory (128-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
    extern __shared__ __align__(128) unsigned char flash_smem[];
    return flash_smem;
}

// d (16 x 8 fp32 C fragment) += a (16 x 16 bf16 A fragment) · (b0, b1) (16 x 8 bf16 B fragment). Layouts: the flash section's header.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices from shared memory; lane l gives the address (16-byte aligned) of row l % 8 of matrix l / 8.
// Without trans, lane l receives in r[i] elements (l / 4, 2(l % 4)), (l / 4, 2(l % 4) + 1) of matrix i; with trans,
// elements (2(l % 4), l / 4), (2(l % 4) + 1, l / 4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// 2^x (ex2.approx.ftz: about 2 ulp; 2^-inf = +0).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Two floats -> bf16x2 (round to nearest even), lo in the low half (the lower column/row of a fragment register).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 packed = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &packed, sizeof(bits));
    return bits;
}

// The bf16 in the low 16 bits of bits, as a float.
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) {
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)(bits & 0xffffu)));
}

// ================================================================================================================
// Tile helpers, all for bf16 tiles of HS columns with padded rows of kLd = HS + 8 elements in shared memory.

template <int HS>
struct Tile {
    static_assert(HS == 32 || HS == 64 || HS == 128, "head size 32, 64 or 128");
    static constexpr int kLd = HS + 8;                 // row stride in elements (16-byte pad: see the flash section's header)
    static constexpr int kRowBytes = kLd * 2;
    static constexpr int kChunksPerRow = HS / 8;       // 16-byte chunks per row
    __host__ __device__ static constexpr uint32_t bytes(int rows) { return (uint32_t)rows * kRowBytes; }
};

// Block-cooperative cp.async of rows [row0, row0 + kRows) of a matrix whose row r starts at src + r * stride (HS
// bf16, 16-byte aligned) into the tile at shared address dst. Row row0 + r is copied when valid(r), else zero-filled.
template <int HS, int kRows, typename Valid>
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* src, size_t stride, int row0, Valid valid) {
    using T = Tile<HS>;
    constexpr int kChunks = kRows * T::kChunksPerRow;
    static_assert(kChunks % kThreads == 0, "whole rounds of chunks");
#pragma unroll
    for (int u = 0; u < kChunks / kThreads; u++) {
        const int index = u * kThreads + threadIdx.x;
        const int r = index / T::kChunksPerRow, c = index % T::kChunksPerRow;
        const bool ok = valid(r);
        const bf16* from = src + (ok ? (size_t)(row0 + r) * stride + c * 8 : 0);
        cp_async_16(dst + r * T::kRowBytes + c * 16, from, ok ? 16 : 0);
    }
}

// lse and δ of rows [row0, row0 + count) of one head ((S) values each) to the shared arrays dst_lse, dst_delta
// (count floats each, by cp.async); 0 for rows at or past S. Threads 0..count-1 copy lse, count..2count-1 copy δ.
__device__ __forceinline__ void load_row_stats(uint32_t dst_lse, uint32_t dst_delta, const float* lse, const float* delta,
                                               int row0, int count, int S) {
    if ((int)threadIdx.x < 2 * count) {
        const bool is_delta = (int)threadIdx.x >= count;
        const int r = threadIdx.x % count, i = row0 + r;
        const bool ok = i < S;
        cp_async_4((is_delta ? dst_delta : dst_lse) + 4 * r, (is_delta ? delta : lse) + (ok ? i : 0), ok ? 4 : 0);
    }
}

// Bit r (r < kKeys, kKeys 32 or 64): key k0 + r exists (< kv_len) and is visible (mask null, or mask[k0 + r] != 0).
// Warp-collective; every lane gets the same bits.
template <int kKeys>
__device__ __forceinline__ uint64_t key_bits(const int* mask, int k0, int kv_len) {
    static_assert(kKeys == 32 || kKeys == 64, "one or two ballots");
    const int lane = threadIdx.x % 32;
    uint64_t bits = 0;
#pragma unroll
    for (int u = 0; u < kKeys / 32; u++) {
        const int j = k0 + 32 * u + lane;
        const bool visible = j < kv_len && (mask == nullptr || mask[j] != 0);
        bits |= (uint64_t)__ballot_sync(0xffffffffu, visible) << (32 * u);
    }
    return bits;
}
template <int kKeys>
__host__ __device__ constexpr uint64_t all_bits() { return kKeys == 64 ? ~0ull : (1ull << kKeys) - 1; }

// A fragments of kGroups row groups (rows row0 + 16 mr + 0..15) x K columns of a stored tile at shared address tile.
template <int kGroups, int K, int kLd>
__device__ __forceinline__ void load_a(uint32_t (&a)[kGroups][K / 16][4], uint32_t tile, int row0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int mr = 0; mr < kGroups; mr++)
#pragma unroll
        for (int kk = 0; kk < K / 16; kk++)
            ldmatrix_x4(a[mr][kk], tile + ((row0 + 16 * mr + lane % 16) * kLd + 16 * kk + 8 * (lane / 16)) * 2);
}

// acc[mr] (16 x N) += A[mr] (16 x K) · B (K x N) for every row group mr, B's fragments (k step kk, column pair np: a
// 16 x 16 block as two n8 halves) loaded by load_b(b, kk, np) from shared memory.
template <int kGroups, int N, int K, typename LoadB>
__device__ __forceinline__ void mma_tile(float (&acc)[kGroups][N / 8][4], const uint32_t (&a)[kGroups][K / 16][4],
                                         LoadB load_b) {
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++)
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            load_b(b, kk, np);
#pragma unroll
            for (int mr = 0; mr < kGroups; mr++) {
                mma_16816(acc[mr][2 * np], a[mr][kk], b[0], b[1]);
                mma_16816(acc[mr][2 * np + 1], a[mr][kk], b[2], b[3]);
            }
        }
}

// acc[mr] (16 x N) += A[mr] (16 x K) · T^T, T the stored tile (rows 0..N-1, columns 0..K-1) at shared address tile.
template <int kGroups, int N, int K, int kLd>
__device__ __forceinline__ void mma_a_bt(float (&acc)[kGroups][N / 8][4], const uint32_t (&a)[kGroups][K / 16][4],
                                         uint32_t tile) {
    const int lane = threadIdx.x % 32;
    const uint32_t lane_offset = ((lane % 8 + 8 * (lane / 16)) * kLd + 8 * ((lane / 8) % 2)) * 2;
    mma_tile<kGroups, N, K>(acc, a, [&](uint32_t (&b)[4], int kk, int np) {
        ldmatrix_x4(b, tile + lane_offset + (16 * np * kLd + 16 * kk) * 2);
    });
}

// The same for one row group whose A fragments are read from shared memory as they are needed (rows row0..row0+15
// of the stored tile a_tile), where holding them in registers for the whole pass would cost too many registers.
template <int N, int K, int kLd>
__device__ __forceinline__ void mma_a_bt_smem_a(float (&acc)[1][N / 8][4], uint32_t a_tile, int row0, uint32_t tile) {
    const int lane = threadIdx.x % 32;
    const uint32_t lane_offset = ((lane % 8 + 8 * (lane / 16)) * kLd + 8 * ((lane / 8) % 2)) * 2;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        uint32_t a[1][1][4];
        load_a<1, 16, kLd>(a, a_tile + 16 * kk * 2, row0);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            ldmatrix_x4(b, tile + lane_offset + (16 * np * kLd + 16 * kk) * 2);
            mma_16816(acc[0][2 * np], a[0][0], b[0], b[1]);
            mma_16816(acc[0][2 * np + 1], a[0][0], b[2], b[3]);
        }
    }
}

// acc[mr] (16 x N) += A[mr] (16 x K) · T, T the stored tile (rows 0..K-1, columns 0..N-1) at shared address tile,
// through ldmatrix.trans.
template <int kGroups, int N, int K, int kLd>
__device__ __forceinline__ void mma_a_b(float (&acc)[kGroups][N / 8][4], const uint32_t (&a)[kGroups][K / 16][4],
                                        uint32_t tile) {
    const int lane = threadIdx.x % 32;
    const uint32_t lane_offset = ((lane % 16) * kLd + 8 * (lane / 16)) * 2;
    mma_tile<kGroups, N, K>(acc, a, [&](uint32_t (&b)[4], int kk, int np) {
        ldmatrix_x4_trans(b, tile + lane_offset + (16 * kk * kLd + 16 * np) * 2);
    });
}

// C fragments of a (16 x N) fp32 result -> A fragments (bf16) of the same matrix as a left operand (the flash section's header).
template <int N>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < N / 16; kk++) {
        a[kk][0] = pack_bf16x2(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16x2(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[n][e] = 0.0f;
}

// Row half hh (0: row g, 1: row g + 8) of a (16 x HS) C-fragment accumulator, times factor, to row (HS bf16 in device
// memory), or zeros when !keep (a select, so that an inf or NaN in a discarded accumulator never leaks): each thread
// writes its column pairs 8n + 2t as 4-byte stores.
template <int HS>
__device__ __forceinline__ void store_row(bf16* row, const float (&acc)[HS / 8][4], int hh, float factor, bool keep) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        const float x = keep ? acc[n][2 * hh] * factor : 0.0f, y = keep ? acc[n][2 * hh + 1] * factor : 0.0f;
        *reinterpret_cast<uint32_t*>(row + 8 * n + 2 * t) = pack_bf16x2(x, y);
    }
}

// Sets to -inf the entries of a (16 x N) score tile (C fragments; rows: queries, columns: keys) that are masked:
// column c (key k0 + c) is visible to row r (query i) iff bit c of bits is set and k0 + c <= i + offset; the caller
// passes diagonal = (i of row 0) + offset - k0, so the test is c <= diagonal + r. The thread's columns are
// 8n + 2t + (e % 2): shifting bits and the limit by 2t leaves compile-time column offsets.
template <int N>
__device__ __forceinline__ void mask_scores(float (&s)[N / 8][4], uint64_t bits, int diagonal) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const uint64_t my_bits = bits >> (2 * t);
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int limit = diagonal + g + 8 * hh - 2 * t;   // visible iff 8n + e%2 <= limit
#pragma unroll
        for (int n = 0; n < N / 8; n++)
#pragma unroll
            for (int odd = 0; odd < 2; odd++) {
                const int c = 8 * n + odd;
                if (c > limit || !(my_bits & (1ull << c))) s[n][2 * hh + odd] = -INFINITY;
            }
    }
}

// ================================================================================================================
// Forward (and cached prefill).

template <int HS>
struct ForwardConfig {
    static constexpr int kGroups = HS <= 64 ? 2 : 1;           // 16-row groups per warp
    static constexpr int kWarpRows = 16 * kGroups;
    static constexpr int kBlockM = kWarps * kWarpRows;         // queries per block: 128 (HS 32, 64) or 64 (HS 128)
    static constexpr int kBlockN = 64;                         // keys per tile
    // Blocks per SM the register allocation must allow (__launch_bounds__): 2, i.e. up to 255 registers; at 3 (168
    // registers) the HS 64 kernel spills ~400 bytes inside its loop.
    static constexpr int kMinBlocks = 2;
    // Shared memory: Q (kBlockM rows), then stage s = 0, 1: K (kBlockN rows), V (kBlockN rows).
    static constexpr uint32_t kQ = 0;
    static constexpr uint32_t kStage0 = Tile<HS>::bytes(kBlockM);
    static constexpr uint32_t kStageBytes = 2 * Tile<HS>::bytes(kBlockN);
    static constexpr uint32_t kSmemBytes = kStage0 + 2 * kStageBytes;
};

// One forward launch: query rows i < n_q of each (seq, h) over key rows j < kv_len; query i sees key j iff
// j <= i + offset and key_mask (nullable) says visible. Strides in elements.
struct ForwardParams {
    bf16* out;                  // row i of (seq, h) at out + seq * out_seq_stride + i * out_row_stride + h * HS
    float* lse;                 // nullable; (seq * NH + h) * n_q + i
    const bf16* q;              // row i at q + seq * q_seq_stride + h * q_head_stride + i * q_row_stride
    const bf16 *k, *v;          // row j at k + seq * kv_seq_stride + h * kv_head_stride + j * HS
    const int* key_mask;        // nullable; key j of seq at key_mask[seq * mask_seq_stride + j]
    size_t q_seq_stride, q_head_stride, kv_seq_stride, kv_head_stride, out_seq_stride, mask_seq_stride;
    int q_row_stride, out_row_stride;
    int NH, n_q, kv_len, offset;
    float scale_log2;           // HS^-0.5 · log2(e)
};

// Online softmax of one 16-row group (the flash section's header) for its (16 x BN) score tile s (C fragments, masked
// entries -inf): for each of this thread's two rows hh (g, g + 8) the running max m (log2 domain) and this thread's
// part of the running sum l are updated, s becomes the probabilities 2^(s·scale_log2 - m), and the (16 x HS) output
// accumulator o is rescaled by 2^(m_old - m_new).
template <int BN, int HS>
__device__ __forceinline__ void online_softmax(float (&s)[BN / 8][4], float (&o)[HS / 8][4], float (&m)[2], float (&l)[2],
                                               float scale_log2) {
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < BN / 8; n++) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * hh], s[n][2 * hh + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float m_new = fmaxf(m[hh], tile_max * scale_log2);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;   // row has seen no visible key yet
        const float alpha = exp2_approx(m[hh] - m_use);          // 0 while m was -inf
        m[hh] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < BN / 8; n++)
#pragma unroll
            for (int e = 2 * hh; e < 2 * hh + 2; e++) {
                const float prob = exp2_approx(fmaf(s[n][e], scale_log2, -m_use));
                s[n][e] = prob;
                sum += prob;
            }
        l[hh] = l[hh] * alpha + sum;
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            o[n][2 * hh] *= alpha;
            o[n][2 * hh + 1] *= alpha;
        }
    }
}

// The end of the forward for one 16-row group whose first query is row0 (of head = seq * NH + h): out_i = o_i / l_i,
// lse_i = ln2 (m_i + log2 l_i) for this thread's rows below n_q; a row that saw no key: out 0, lse 0.
template <int HS>
__device__ __forceinline__ void store_forward_rows(const ForwardParams& p, size_t seq, int h, int head, int row0,
                                                   const float (&o)[HS / 8][4], const float (&m)[2], const float (&l)[2]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        float sum = l[hh];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int i = row0 + g + 8 * hh;
        if (i < p.n_q) {
            const bool seen = sum > 0.0f;
            store_row<HS>(p.out + seq * p.out_seq_stride + (size_t)i * p.out_row_stride + h * HS, o, hh,
                          seen ? 1.0f / sum : 0.0f, seen);
            if (p.lse != nullptr && t == 0) p.lse[(size_t)head * p.n_q + i] = seen ? kLn2 * (m[hh] + log2f(sum)) : 0.0f;
        }
    }
}

// One forward block's share of the inputs (head = seq * NH + h, queries q0 .. q0 + kBlockM - 1): its q, k, v rows
// and key mask (the strides of ForwardParams), its last query, and the key tiles of kBlockN it visits: keys past the
// last query (+ offset) are visible to none of its queries (n_tiles >= 1: the last query sees key 0 at least).
struct ForwardHead {
    size_t seq;
    int h;
    const bf16 *q, *k, *v;
    const int* mask;
    int q_last, n_tiles;
};
template <int kBlockM, int kBlockN>
__device__ __forceinline__ ForwardHead forward_head(const ForwardParams& p, int head, int q0) {
    const size_t seq = head / p.NH;
    const int h = head % p.NH;
    const int q_last = imin(q0 + kBlockM, p.n_q) - 1;
    const int key_end = imin(p.kv_len, q_last + p.offset + 1);
    return {seq, h, p.q + seq * p.q_seq_stride + h * p.q_head_stride, p.k + seq * p.kv_seq_stride + h * p.kv_head_stride,
            p.v + seq * p.kv_seq_stride + h * p.kv_head_stride, p.key_mask ? p.key_mask + seq * p.mask_seq_stride : nullptr,
            q_last, (key_end + kBlockN - 1) / kBlockN};
}

// Block (head = seq * NH + h, query tile). The scheme: the flash section's header.
template <int HS>
__device__ __forceinline__ void forward_block(const ForwardParams& p, int head, int tile) {
    using C = ForwardConfig<HS>;
    using T = Tile<HS>;
    constexpr int G = C::kGroups, BN = C::kBlockN, kLd = T::kLd;
    const int warp = threadIdx.x / 32;
    const int q0 = tile * C::kBlockM;
    const ForwardHead in = forward_head<C::kBlockM, BN>(p, head, q0);
    const bf16 *q = in.q, *k = in.k, *v = in.v;
    const int* mask = in.mask;
    const int n_tiles = in.n_tiles;
    const uint32_t smem = smem_address(dynamic_smem());
    const uint32_t s_q = smem + C::kQ;
    auto s_k = [&](int stage) { return smem + C::kStage0 + stage * C::kStageBytes; };
    auto s_v = [&](int stage) { return s_k(stage) + T::bytes(BN); };

    // The warp's queries: w0 .. w0 + kWarpRows - 1 (absolute indices).
    const int w0 = q0 + warp * C::kWarpRows, w_last = w0 + C::kWarpRows - 1;

    // Prologue: Q and key tile 0, one commit group.
    load_tile<HS, C::kBlockM>(s_q, q, p.q_row_stride, q0, [&](int r) { return q0 + r < p.n_q; });
    uint64_t bits_next = key_bits<BN>(mask, 0, p.kv_len);
    load_tile<HS, BN>(s_k(0), k, HS, 0, [&](int r) { return (bits_next >> r) & 1; });
    load_tile<HS, BN>(s_v(0), v, HS, 0, [&](int r) { return (bits_next >> r) & 1; });
    cp_async_commit();

    uint32_t qf[G][HS / 16][4];
    float o[G][HS / 8][4];
    float m[G][2], l[G][2];   // per row half hh: running max (log2 domain), this thread's part of the running sum
#pragma unroll
    for (int mr = 0; mr < G; mr++) {
        zero(o[mr]);
        m[mr][0] = m[mr][1] = -INFINITY;
        l[mr][0] = l[mr][1] = 0.0f;
    }

    for (int kt = 0; kt < n_tiles; kt++) {
        const int stage = kt % 2, k0 = kt * BN;
        const uint64_t bits = bits_next;
        if (kt + 1 < n_tiles) {   // the next tile into the other stage (last read in iteration kt - 1)
            bits_next = key_bits<BN>(mask, k0 + BN, p.kv_len);
            load_tile<HS, BN>(s_k(1 - stage), k, HS, k0 + BN, [&](int r) { return (bits_next >> r) & 1; });
            load_tile<HS, BN>(s_v(1 - stage), v, HS, k0 + BN, [&](int r) { return (bits_next >> r) & 1; });
        }
        cp_async_commit();
        cp_async_wait<1>();       // this thread's copies of tile kt (and Q) landed
        __syncthreads();          // everyone's did
        if (kt == 0) load_a<G, HS, kLd>(qf, s_q, warp * C::kWarpRows);

        // Warp-uniform skips: every key of the tile after every query of the warp, no visible key, no real query.
        if (bits != 0 && k0 <= w_last + p.offset && w0 < p.n_q) {
            float s[G][BN / 8][4];
#pragma unroll
            for (int mr = 0; mr < G; mr++) zero(s[mr]);
            mma_a_bt<G, BN, HS, kLd>(s, qf, s_k(stage));

            // Element mask where the tile crosses a query's diagonal or holds a masked or missing key.
            if (k0 + BN - 1 > w0 + p.offset || bits != all_bits<BN>())
#pragma unroll
                for (int mr = 0; mr < G; mr++) mask_scores<BN>(s[mr], bits, w0 + 16 * mr + p.offset - k0);

#pragma unroll
            for (int mr = 0; mr < G; mr++) online_softmax<BN, HS>(s[mr], o[mr], m[mr], l[mr], p.scale_log2);

            // O += P V, P's A fragments straight from the score registers.
            uint32_t pf[G][BN / 16][4];
#pragma unroll
            for (int mr = 0; mr < G; mr++) c_to_a<BN>(pf[mr], s[mr]);
            mma_a_b<G, HS, BN, kLd>(o, pf, s_v(stage));
        }
        __syncthreads();   // every warp is done with this stage before iteration kt + 1 refills it
    }

#pragma unroll
    for (int mr = 0; mr < G; mr++) store_forward_rows<HS>(p, in.seq, in.h, head, w0 + 16 * mr, o[mr], m[mr], l[mr]);
}

// ================================================================================================================
// Forward on Hopper's warpgroup MMA, head size 64 (the sm_90a build: GPU_ARCH=90a defines BLOCKTF_SM90A; plain sm_90
// has no wgmma). The algorithm of forward_block; what changes is who multiplies. A block is one warpgroup (its 4
// warps, 128 threads) and owns 64 queries; each product is issued for all 64 at once as asynchronous
// wgmma.mma_async instructions, instead of each warp issuing mma.sync for its own 32.
//   - Q, K and V tiles sit in shared memory in the 128-byte swizzle layout that wgmma reads through a matrix
//     descriptor: row r (64 bf16 = 128 bytes) at byte r * 128, its 16-byte chunk c at chunk position c ^ (r % 8),
//     every tile 1024-byte aligned.
//   - S = Q K^T: m64n64k16 with A = Q and B = K, both "K-major" (a row's 64 dims contiguous), 4 steps of 16 dims,
//     the descriptors' start moving 32 bytes a step inside the swizzled rows. O += P V: m64n64k16 with A = P in
//     registers (the score registers packed to bf16, c_to_a as in forward_block) and B = V "MN-major" (transposed: a
//     key's row holds the 64 output columns), 4 steps of 16 keys, 2048 bytes apart.
//   - The m64nNk16 accumulator holds, in warp w, rows 16w .. 16w + 15 in exactly mma.m16n8k16's C-fragment order
//     repeated over N / 8 column tiles, and an A fragment in registers is mma.m16n8k16's A fragment (PTX ISA, "Register
//     Fragments and Shared Memory Matrix Layouts" of wgmma): the mask, the online softmax and the store are
//     forward_block's, per warp. Skips are decided per block (all 128 threads issue a wgmma, or none).
//   - Tiles arrive by TMA (namespace tma below): one thread issues a 64-row copy, the hardware swizzles it, and the
//     block waits on an mbarrier. The cp.async version spent ~100 of the forward loop's ~450 PTX instructions forming
//     addresses and zero-fill predicates for 16-byte copies (forward 0.193 -> 0.182 ms, backward 0.466 -> 0.416).
// Ordering rules: wgmma.fence before the first wgmma that reads registers written by ordinary instructions (the P
// fragments, the rescaled O); TMA writes are in wgmma's (async) proxy and visible once the mbarrier phase completes,
// ordinary shared-memory writes (zeroed rows) only after fence.proxy.async and the block barrier; an accumulator is
// read only after wgmma.wait_group, and fence_registers keeps the compiler from moving ordinary reads or writes of it
// across the asynchronous region. Register A operands are used once: held across loop iterations (Q fragments, in a
// first version), ptxas gave their registers to other values after the first wgmma that read them, and every key
// tile after the first got wrong scores.
// Measured (dev/attention, vanilla_160's shape): 0.174 ms, 296 TFLOP/s, against 0.237 ms for forward_block.

#ifdef BLOCKTF_SM90A
namespace wgmma {

// Descriptor of a shared-memory tile in the 128-byte swizzle layout (rows of 128 bytes, 8-row groups 1024 bytes
// apart): start address / 16 (bits 0-13), leading-dimension offset (bits 16-29; not used by this layout, 1 by
// convention), stride-dimension offset 1024 / 16 (bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63).
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t address) {
    return (uint64_t)((address & 0x3FFFFu) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Makes this thread's earlier generic-proxy writes to shared memory (cp.async included) visible to wgmma's reads.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// An empty asm that "reads and writes" each register: ordinary code cannot move across it.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(r[n][e])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_registers(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+r"(r[n][e])::"memory");
}

// The accumulator of an m64n64k16 wgmma in inline asm: operands %0..%31 (this thread's 32 floats of d, in C-fragment
// order), and the instruction's opening up to the brace list that names them.
#define BLOCKTF_WGMMA_64x64x16_D(d)                                                                                   \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),        \
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),     \
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),     \
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),     \
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define BLOCKTF_WGMMA_64x64x16_OPEN                                                                                   \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "  \
    "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "

// The two products, m64n64k16: d (the warpgroup's 64 x 64 fp32 accumulator; this thread's part as C fragments of 8
// column tiles) = d · accumulate + A (64 x 16 bf16) · B (16 x 64 bf16). Asynchronous: d is valid after commit() and
// wait_all().
// mma_rs: A is this thread's A fragment (registers), B in shared memory at descriptor b, stored MN-major (a row per k,
// holding the 64 output columns: V in P V).
__device__ __forceinline__ void mma_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %37, 0;\n" BLOCKTF_WGMMA_64x64x16_OPEN
                 "{%32, %33, %34, %35}, %36, accumulate, 1, 1, 1;\n}\n"
                 : BLOCKTF_WGMMA_64x64x16_D(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

// mma_ss: A and B both in shared memory (descriptors a, b), both K-major (a row per output row or column, holding
// its 16 k: Q and K in Q K^T).
__device__ __forceinline__ void mma_ss(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %34, 0;\n" BLOCKTF_WGMMA_64x64x16_OPEN
                 "%32, %33, accumulate, 1, 1, 0, 0;\n}\n"
                 : BLOCKTF_WGMMA_64x64x16_D(d)
                 : "l"(a), "l"(b), "r"(accumulate));
}

// The products of the attention kernels, on 64 x 64 tiles of bf16 in the 128-byte swizzle layout (64-row tiles, 8 KB),
// issued without waiting (the caller brackets them: fence(), issue..., commit(), wait_all(), fence_registers).
// acc = A B^T: A, B the tiles at shared addresses a_tile, b_tile (rows of 64 dims; 4 steps of 16 dims, 32 bytes
// apart inside the swizzled rows).
__device__ __forceinline__ void issue_abt(float (&acc)[8][4], uint32_t a_tile, uint32_t b_tile) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) mma_ss(acc, sw128_descriptor(a_tile + 32 * kk), sw128_descriptor(b_tile + 32 * kk), kk > 0);
}
// acc += A B: A (64 x 64) this thread's A fragments (c_to_a of a 64 x 64 result), B the tile at shared address b_tile
// (64 rows of k; 4 steps of 16 rows, 2048 bytes apart).
__device__ __forceinline__ void issue_ab(float (&acc)[8][4], const uint32_t (&a)[4][4], uint32_t b_tile) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) mma_rs(acc, a[kk], sw128_descriptor(b_tile + 2048 * kk), 1);
}

// acc += C B, waited for: C a 64 x 64 fp32 result in registers (P, dS) packed to bf16 A fragments, B the tile at
// b_tile (issue_ab).
__device__ __forceinline__ void accumulate_product(float (&acc)[8][4], const float (&c)[8][4], uint32_t b_tile) {
    uint32_t a[4][4];
    c_to_a<64>(a, c);
    fence_registers(a);
    fence_registers(acc);
    fence();
    issue_ab(acc, a, b_tile);
    commit();
    wait_all();
    fence_registers(acc);
}

}  // namespace wgmma

// Tiles arrive by the Tensor Memory Accelerator (TMA): one thread issues a copy of a whole 64-row box described by a
// tensor map (built on the host, passed as a __grid_constant__ kernel parameter), the hardware writes it into shared
// memory already in the 128-byte swizzle layout and zero-fills rows past the tensor's end, and the copy's bytes are
// counted on an mbarrier in shared memory. Each pipeline stage has one mbarrier; filling a stage is one phase of it:
// the issuing thread arrives with the number of bytes to expect (expect_bytes), the copies count them down, and the
// phase completes when all have landed; everyone waits for the phase's parity (wait). Before a stage is refilled the
// block passes a barrier, so its wgmma reads (waited for) and ordinary reads of the old contents are done.
namespace tma {

// A tensor of rows of 64 bf16 (one head's row of q, k, v or dout) indexed (seq, head, row), with arbitrary strides:
// the map's dimensions are (64, heads, rows, nseq) when heads are interleaved in a row (the merged layout, the
// smaller stride first) and (64, rows, heads, nseq) otherwise.
struct RowsMap {
    CUtensorMap map;
    int heads_inner;
};

// The block's two stage mbarriers (static shared memory, stage s's at the returned address + 8 s), initialised by
// thread 0 for one arrival a phase and made visible to the TMA unit; a block barrier before anyone else waits on them
// makes them visible to the block.
__device__ __forceinline__ uint32_t stage_barriers() {
    __shared__ alignas(8) uint64_t barriers[2];
    const uint32_t base = smem_address(barriers);
    if (threadIdx.x == 0) {
        for (int stage = 0; stage < 2; stage++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(base + 8 * stage) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    return base;
}
// The one arrival of a phase, announcing the bytes its copies will deliver.
__device__ __forceinline__ void expect_bytes(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\nwaiting_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra waiting_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// Rows row0 .. row0 + 63 of head h of sequence seq into the 8 KB tile at dst (1024-byte aligned), counted on bar.
__device__ __forceinline__ void load_rows(uint32_t dst, const RowsMap& m, int row0, int h, int seq, uint32_t bar) {
    const int c1 = m.heads_inner ? h : row0, c2 = m.heads_inner ? row0 : h;
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(&m.map)), "r"(0), "r"(c1), "r"(c2), "r"(seq), "r"(bar)
                 : "memory");
}

// Zeroes, block-cooperatively, the rows r of a landed 64-row tile whose bit r of visible is 0, and makes the zeros
// visible to wgmma. A masked key's row of V may hold anything (a generation cache slot never written, NaN in the
// tests), and its probability 0 times NaN would reach the output; rows past the tensor's end arrive as zeros.
__device__ __forceinline__ void zero_invisible_rows(uint32_t tile, uint64_t visible) {
    static_assert(64 * 8 % kThreads == 0, "whole rounds of 16-byte chunks");
#pragma unroll
    for (int u = 0; u < 64 * 8 / kThreads; u++) {
        const int index = u * kThreads + threadIdx.x, r = index / 8;
        if (!((visible >> r) & 1)) asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(tile + 16 * index), "r"(0) : "memory");
    }
    wgmma::fence_async_shared();
    __syncthreads();
}

}  // namespace tma

struct WgmmaForwardConfig {
    static constexpr int kBlockM = 64;   // queries per block: one warpgroup (the block's 4 warps), 16 a warp
    static constexpr int kBlockN = 64;   // keys per tile
    // Blocks per SM the register allocation must allow (__launch_bounds__): 5, up to 102 registers (95 used, no
    // spill), 42 KB of shared memory each. At vanilla_160's shape 0.174 / 0.175 ms against 0.181 / 0.185 at 4 blocks
    // (109 registers; two rounds in one run): the kernel is latency-bound, and a fifth warp per scheduler hides more.
    static constexpr int kMinBlocks = 5;
    // Shared memory from a 1024-byte aligned base, every tile 128-byte swizzled (8 KB): Q, then stage s = 0, 1: K, V.
    static constexpr uint32_t kTileBytes = 64 * 128;
    static constexpr uint32_t kQ = 0;
    static constexpr uint32_t kStage0 = kTileBytes;
    static constexpr uint32_t kStageBytes = 2 * kTileBytes;
    static constexpr uint32_t kSmemBytes = kStage0 + 2 * kStageBytes + 1024;   // + room to align the base
};

// The forward's tensor maps: q (rows n_q), k and v (rows kv_len).
struct ForwardMaps {
    tma::RowsMap q, k, v;
};

// Block (head = seq * NH + h, query tile) of the forward, wgmma version (see above; the scheme: forward_block).
__device__ __forceinline__ void forward_block_wgmma(const ForwardParams& p, const ForwardMaps& maps, int head, int tile) {
    using C = WgmmaForwardConfig;
    constexpr int HS = 64, BN = C::kBlockN;
    const int warp = threadIdx.x / 32;
    const int q0 = tile * C::kBlockM;
    const ForwardHead in = forward_head<C::kBlockM, BN>(p, head, q0);
    const int* mask = in.mask;
    const int q_last = in.q_last, n_tiles = in.n_tiles, h = in.h, seq = (int)in.seq;
    const uint32_t smem = (smem_address(dynamic_smem()) + 1023u) & ~1023u;
    const uint32_t s_q = smem + C::kQ;
    auto s_k = [&](int stage) { return smem + C::kStage0 + stage * C::kStageBytes; };
    auto s_v = [&](int stage) { return s_k(stage) + C::kTileBytes; };
    const uint32_t landed = tma::stage_barriers();   // stage s's tiles have arrived
    auto bar = [&](int stage) { return landed + 8 * stage; };
    const int w0 = q0 + 16 * warp;   // the warp's queries w0 .. w0 + 15 (absolute indices)

    // Key tile kt into stage kt % 2 (Q too with tile 0), issued by one thread.
    auto load_key_tile = [&](int kt) {
        const int stage = kt % 2;
        tma::expect_bytes(bar(stage), (kt == 0 ? 3 : 2) * C::kTileBytes);
        if (kt == 0) tma::load_rows(s_q, maps.q, q0, h, seq, bar(stage));
        tma::load_rows(s_k(stage), maps.k, kt * BN, h, seq, bar(stage));
        tma::load_rows(s_v(stage), maps.v, kt * BN, h, seq, bar(stage));
    };
    if (threadIdx.x == 0) load_key_tile(0);
    __syncthreads();
    uint64_t bits_next = key_bits<BN>(mask, 0, p.kv_len);

    float o[HS / 8][4];
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};   // per row half hh, as in forward_block
    zero(o);

    for (int kt = 0; kt < n_tiles; kt++) {
        const int stage = kt % 2, k0 = kt * BN;
        const uint64_t bits = bits_next;
        if (kt + 1 < n_tiles) {   // into the stage iteration kt - 1 read
            bits_next = key_bits<BN>(mask, k0 + BN, p.kv_len);
            if (threadIdx.x == 0) load_key_tile(kt + 1);
        }
        tma::wait(bar(stage), (kt / 2) % 2);

        // Block-uniform skips (the block is the warpgroup): no visible key, every key after every query.
        if (bits != 0 && k0 <= q_last + p.offset) {
            if (bits != all_bits<BN>()) tma::zero_invisible_rows(s_v(stage), bits);
            float s[BN / 8][4];
            wgmma::fence();
            wgmma::issue_abt(s, s_q, s_k(stage));   // S = Q K^T
            wgmma::commit();
            wgmma::wait_all();
            wgmma::fence_registers(s);

            if (k0 + BN - 1 > w0 + p.offset || bits != all_bits<BN>()) mask_scores<BN>(s, bits, w0 + p.offset - k0);
            online_softmax<BN, HS>(s, o, m, l, p.scale_log2);

            wgmma::accumulate_product(o, s, s_v(stage));   // O += P V
        }
        __syncthreads();   // every warp is done with this stage before iteration kt + 1 refills it
    }
    store_forward_rows<HS>(p, in.seq, in.h, head, w0, o, m, l);
}
#endif  // BLOCKTF_SM90A

// ================================================================================================================
// Backward.

template <int HS>
struct BackwardConfig {
    static constexpr int kBlock = kWarps * 16;                 // own rows per block: keys (dk/dv) or queries (dq)
    static constexpr int kTile = HS <= 64 ? 64 : 32;           // other-side rows per tile: queries (dk/dv) or keys (dq)
    // Whether the warp's own A fragments (its 16 rows of K and V in the dk/dv pass, of Q and dO in the dq pass) are
    // held in registers for the whole pass, or read from shared memory (ldmatrix) at every use.
    // Blocks per SM the register allocation must allow (168 registers for 3, 255 for 2). nvcc 13 at 3: dk/dv HS 32
    // 164 registers, HS 64 168 with 24 bytes of spill (loop-invariant pointers, ~5 LDL per query tile: cheap), HS 128
    // would spill 332 bytes, so 2; dq HS 32 139, HS 64 168 with 20 bytes of spill (the same kind), HS 128 168 without.
    // Without the cap: dk/dv 191 / 250 / 240, dq 150 / 195 / 198 (HS 32 / 64 / 128): 2 blocks per SM.
    static constexpr int kDkdvMinBlocks = HS == 128 ? 2 : 3;
    static constexpr int kDqMinBlocks = 3;
    // dk/dv at HS 64 and 3 blocks per SM: holding both K and V fragments spills ~130 bytes inside the loop; V read
    // at every use instead costs 4 more ldmatrix.x4 per query tile (+6% shared-memory reads) and leaves 6 reloads of
    // loop-invariant values per tile.
    static constexpr bool kDkdvKInRegisters = HS <= 64;
    static constexpr bool kDkdvVInRegisters = HS <= 32 || (HS == 64 && kDkdvMinBlocks < 3);
    static constexpr bool kDqFragsInRegisters = HS <= 64;
    static constexpr int kLd = Tile<HS>::kLd;
    // dk/dv pass: K, V (kBlock rows each), then stage s = 0, 1: Q, dO (kTile rows each), lse, δ (kTile floats each).
    static constexpr uint32_t kDkdvK = 0, kDkdvV = Tile<HS>::bytes(kBlock), kDkdvStage0 = 2 * Tile<HS>::bytes(kBlock);
    static constexpr uint32_t kDkdvStageBytes = 2 * Tile<HS>::bytes(kTile) + 2 * 4 * kTile;
    static constexpr uint32_t kDkdvSmemBytes = kDkdvStage0 + 2 * kDkdvStageBytes;
    // dq pass: Q, dO (kBlock rows each), then stage s = 0, 1: K, V (kTile rows each).
    static constexpr uint32_t kDqQ = 0, kDqDout = Tile<HS>::bytes(kBlock), kDqStage0 = 2 * Tile<HS>::bytes(kBlock);
    static constexpr uint32_t kDqStageBytes = 2 * Tile<HS>::bytes(kTile);
    static constexpr uint32_t kDqSmemBytes = kDqStage0 + 2 * kDqStageBytes;
};

// Training layouts: q, k, v, dq, dk, dv (nseq, NH, S, HS); dout (nseq, S, NH*HS); lse, delta (nseq, NH, S).
struct BackwardParams {
    bf16 *dq, *dk, *dv;
    const bf16 *dout, *q, *k, *v;
    const float *lse, *delta;
    const int* key_mask;        // (nseq, S); nullable (all visible)
    int S, NH;
    float scale, scale_log2;    // HS^-0.5 and HS^-0.5 · log2(e)
};

// One head's share of the backward's inputs: its sequence, its rows of q, k, v (S x HS each, at offset in the head
// layout), its rows of dout (row i at dout + i * dout_stride: dout is in the merged layout, heads interleaved) and
// its sequence's key mask (S; null: every key visible).
struct BackwardHead {
    size_t seq, offset;
    const bf16 *q, *k, *v, *dout;
    size_t dout_stride;
    const int* mask;
};
template <int HS>
__device__ __forceinline__ BackwardHead backward_head(const BackwardParams& p, int head) {
    const size_t seq = head / p.NH;
    const int h = head % p.NH, S = p.S;
    const size_t offset = (size_t)head * S * HS;
    return {seq, offset, p.q + offset, p.k + offset, p.v + offset, p.dout + (seq * S * p.NH + h) * HS, (size_t)p.NH * HS,
            p.key_mask ? p.key_mask + seq * S : nullptr};
}

// δ_i = Σ_d dO_id · out_id over the merged layout (nseq, S, NH*HS): HS/8 threads per row (seq, i, h), each 8
// elements (one 16-byte vector of each), reduced by xor-shuffles within the group (fixed order: deterministic).
// Writes delta[(seq * NH + h) * S + i]. rows = nseq * S * NH.
template <int HS>
__device__ __forceinline__ void delta_thread(float* delta, const bf16* dout, const bf16* out, size_t rows, int S, int NH,
                                             size_t thread) {
    constexpr int kLanes = HS / 8;
    const size_t row = thread / kLanes;
    const int part = thread % kLanes;
    float sum = 0.0f;
    if (row < rows) {
        const uint4 a = reinterpret_cast<const uint4*>(dout + row * HS)[part];
        const uint4 b = reinterpret_cast<const uint4*>(out + row * HS)[part];
        const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int w = 0; w < 4; w++)
#pragma unroll
            for (int half = 0; half < 2; half++)   // element 2w + half: the low half first
                sum += bf16_bits_to_float(aw[w] >> (16 * half)) * bf16_bits_to_float(bw[w] >> (16 * half));
    }
    sum = group_sum<kLanes>(sum);
    if (row < rows && part == 0) {
        const int h = row % NH, i = (row / NH) % S;
        const size_t seq = row / ((size_t)NH * S);
        delta[(seq * NH + h) * S + i] = sum;
    }
}

// The dk/dv pass's element-wise step for one warp's 16 keys key0 + g + 8(e/2) (rows) x a tile of BQ queries i0 + c
// (columns): the causal mask where the tile crosses the warp's diagonal (query i0 + c sees key j iff j <= i0 + c) and
// queries past S, applied to S^T so that P^T = 2^-inf = 0 there; then P^T = 2^(S^T c - lse_i log2e) into st and
// dS^T = P^T (dP^T - δ_i) into dpt. lse_s, delta_s: the tile's BQ row statistics (shared memory). Masked keys need no
// mask here: their rows of P^T, dS^T only reach their own dK, dV rows, which are written as zeros.
template <int BQ>
__device__ __forceinline__ void dkdv_probabilities(float (&st)[BQ / 8][4], float (&dpt)[BQ / 8][4], const float* lse_s,
                                                   const float* delta_s, int key0, int i0, int S, float scale_log2) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    if (i0 < key0 + 15 || i0 + BQ > S) {
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int low = key0 + g + 8 * hh - i0 - 2 * t, high = S - i0 - 2 * t;   // visible: low <= c' < high
#pragma unroll
            for (int n = 0; n < BQ / 8; n++)
#pragma unroll
                for (int odd = 0; odd < 2; odd++) {
                    const int c = 8 * n + odd;
                    if (c < low || c >= high) st[n][2 * hh + odd] = -INFINITY;
                }
        }
    }
#pragma unroll
    for (int n = 0; n < BQ / 8; n++) {
        const int c = 8 * n + 2 * t;
        const float2 lse_pair = *reinterpret_cast<const float2*>(lse_s + c);
        const float2 delta_pair = *reinterpret_cast<const float2*>(delta_s + c);
        const float neg_lse2[2] = {-lse_pair.x * kLog2e, -lse_pair.y * kLog2e};
        const float dl[2] = {delta_pair.x, delta_pair.y};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float prob = exp2_approx(fmaf(st[n][e], scale_log2, neg_lse2[e % 2]));
            dpt[n][e] = prob * (dpt[n][e] - dl[e % 2]);
            st[n][e] = prob;
        }
    }
}

// The dq pass's element-wise step for one warp's 16 queries q0 + g + 8(e/2) (rows) x a tile of BK keys j0 + c
// (columns): the mask where the tile crosses the diagonal or holds masked or missing keys (bits: key_bits), then
// dS = P (dP - δ_i) into s, P = 2^(S c - lse_i log2e); neg_lse2, dl: -lse·log2e and δ of this thread's two rows.
template <int BK>
__device__ __forceinline__ void dq_probabilities(float (&s)[BK / 8][4], const float (&dp)[BK / 8][4], uint64_t bits, int q0,
                                                 int j0, const float (&neg_lse2)[2], const float (&dl)[2], float scale_log2) {
    if (j0 + BK - 1 > q0 || bits != all_bits<BK>()) mask_scores<BK>(s, bits, q0 - j0);
#pragma unroll
    for (int n = 0; n < BK / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float prob = exp2_approx(fmaf(s[n][e], scale_log2, neg_lse2[e / 2]));
            s[n][e] = prob * (dp[n][e] - dl[e / 2]);
        }
}

// The dq pass's row statistics of this thread's two rows w0 + g + 8hh: -lse·log2e and δ (0 for rows past S).
__device__ __forceinline__ void dq_row_stats(const BackwardParams& p, int head, int w0, float (&neg_lse2)[2], float (&dl)[2]) {
    const int g = threadIdx.x % 32 / 4;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int i = w0 + g + 8 * hh;
        neg_lse2[hh] = i < p.S ? -p.lse[(size_t)head * p.S + i] * kLog2e : 0.0f;
        dl[hh] = i < p.S ? p.delta[(size_t)head * p.S + i] : 0.0f;
    }
}

// The passes' ends for one warp's 16 rows from row0: dk = scale · dK and dv = dV for keys below S (a masked key,
// bit r of warp_bits clear, gets zeros); dq = scale · dQ for queries below S.
template <int HS>
__device__ __forceinline__ void store_dkdv_rows(const BackwardParams& p, const BackwardHead& in, int row0, uint32_t warp_bits,
                                                const float (&dk)[HS / 8][4], const float (&dv)[HS / 8][4]) {
    const int g = threadIdx.x % 32 / 4;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int r = g + 8 * hh, j = row0 + r;
        if (j < p.S) {
            const bool visible = (warp_bits >> r) & 1;
            store_row<HS>(p.dk + in.offset + (size_t)j * HS, dk, hh, p.scale, visible);
            store_row<HS>(p.dv + in.offset + (size_t)j * HS, dv, hh, 1.0f, visible);
        }
    }
}
template <int HS>
__device__ __forceinline__ void store_dq_rows(const BackwardParams& p, const BackwardHead& in, int row0, const float (&dq)[HS / 8][4]) {
    const int g = threadIdx.x % 32 / 4;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int i = row0 + g + 8 * hh;
        if (i < p.S) store_row<HS>(p.dq + in.offset + (size_t)i * HS, dq, hh, p.scale, true);
    }
}

// The dk/dv pass's block of 64 keys: k0 (its first), w0 (the calling warp's first: warp w owns k0 + 16w ..
// k0 + 16w + 15), the head's lse and δ rows, and which keys of the block and of the warp are visible (key_bits).
struct DkdvKeys {
    int k0, w0;
    const float *lse, *delta;
    uint64_t block_bits;
    uint32_t warp_bits;
};
__device__ __forceinline__ DkdvKeys dkdv_keys(const BackwardParams& p, const BackwardHead& in, int head, int tile) {
    const int warp = threadIdx.x / 32, k0 = tile * 64;
    const uint64_t block_bits = key_bits<64>(in.mask, k0, p.S);
    return {k0, k0 + 16 * warp, p.lse + (size_t)head * p.S, p.delta + (size_t)head * p.S, block_bits,
            (uint32_t)(block_bits >> (16 * warp)) & 0xffffu};
}

// dk/dv pass, block (head, key tile of kBlock keys); warp w owns keys k0 + 16w .. k0 + 16w + 15.
template <int HS>
__device__ __forceinline__ void backward_dkdv_block(const BackwardParams& p, int head, int tile) {
    using C = BackwardConfig<HS>;
    using T = Tile<HS>;
    constexpr int BQ = C::kTile, kLd = C::kLd;
    static_assert(C::kBlock == 64, "the block's key visibility is one 64-bit word");
    const int warp = threadIdx.x / 32;
    const int S = p.S;
    const BackwardHead in = backward_head<HS>(p, head);
    const DkdvKeys keys = dkdv_keys(p, in, head, tile);
    const int k0 = keys.k0, w0 = keys.w0;

    unsigned char* smem_ptr = dynamic_smem();
    const uint32_t smem = smem_address(smem_ptr);
    const uint32_t s_k = smem + C::kDkdvK, s_v = smem + C::kDkdvV;
    // Stage layout: Q tile, dO tile, lse (BQ floats), δ (BQ floats).
    auto stage_offset = [&](int stage) { return C::kDkdvStage0 + stage * C::kDkdvStageBytes; };
    auto s_q = [&](int stage) { return smem + stage_offset(stage); };
    auto s_do = [&](int stage) { return s_q(stage) + T::bytes(BQ); };
    auto s_lse = [&](int stage) { return s_q(stage) + 2 * T::bytes(BQ); };
    auto lse_tile = [&](int stage) { return reinterpret_cast<const float*>(smem_ptr + stage_offset(stage) + 2 * T::bytes(BQ)); };

    float dk[1][HS / 8][4], dv[1][HS / 8][4];   // the warp's 16 rows (one row group)
    zero(dk[0]);
    zero(dv[0]);
    if (keys.block_bits != 0) {   // block-uniform; otherwise every key of the block is masked and dk = dv = 0
        const int q_begin = k0 / BQ * BQ;                      // earlier queries see none of the block's keys
        const int n_tiles = (S - q_begin + BQ - 1) / BQ;       // >= 1: k0 < S
        auto load_query_tile = [&](int stage, int i0) {
            load_tile<HS, BQ>(s_q(stage), in.q, HS, i0, [&](int r) { return i0 + r < S; });
            load_tile<HS, BQ>(s_do(stage), in.dout, in.dout_stride, i0, [&](int r) { return i0 + r < S; });
            load_row_stats(s_lse(stage), s_lse(stage) + 4 * BQ, keys.lse, keys.delta, i0, BQ, S);
        };
        load_tile<HS, C::kBlock>(s_k, in.k, HS, k0, [&](int r) { return (keys.block_bits >> r) & 1; });
        load_tile<HS, C::kBlock>(s_v, in.v, HS, k0, [&](int r) { return (keys.block_bits >> r) & 1; });
        load_query_tile(0, q_begin);
        cp_async_commit();

        uint32_t kf[1][HS / 16][4], vf[1][HS / 16][4];   // used when held in registers
        for (int qt = 0; qt < n_tiles; qt++) {
            const int stage = qt % 2, i0 = q_begin + qt * BQ;
            if (qt + 1 < n_tiles) load_query_tile(1 - stage, i0 + BQ);   // the stage read in iteration qt - 1
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            if (C::kDkdvKInRegisters && qt == 0) load_a<1, HS, kLd>(kf, s_k, 16 * warp);
            if (C::kDkdvVInRegisters && qt == 0) load_a<1, HS, kLd>(vf, s_v, 16 * warp);
            // Skip: the warp's keys all masked, or every query of the tile before every key of the warp.
            if (keys.warp_bits != 0 && i0 + BQ - 1 >= w0) {
                float st[1][BQ / 8][4], dpt[1][BQ / 8][4];
                zero(st[0]);
                zero(dpt[0]);
                // S^T = K Q^T (16 keys x BQ queries), dP^T = V dO^T
                if constexpr (C::kDkdvKInRegisters) mma_a_bt<1, BQ, HS, kLd>(st, kf, s_q(stage));
                else mma_a_bt_smem_a<BQ, HS, kLd>(st, s_k, 16 * warp, s_q(stage));
                if constexpr (C::kDkdvVInRegisters) mma_a_bt<1, BQ, HS, kLd>(dpt, vf, s_do(stage));
                else mma_a_bt_smem_a<BQ, HS, kLd>(dpt, s_v, 16 * warp, s_do(stage));
                // P^T, dS^T; element (key w0 + g + 8(e/2), query i0 + c).
                const float* lse_s = lse_tile(stage);
                dkdv_probabilities<BQ>(st[0], dpt[0], lse_s, lse_s + BQ, w0, i0, S, p.scale_log2);
                uint32_t pf[1][BQ / 16][4], dsf[1][BQ / 16][4];
                c_to_a<BQ>(pf[0], st[0]);
                c_to_a<BQ>(dsf[0], dpt[0]);
                mma_a_b<1, HS, BQ, kLd>(dv, pf, s_do(stage));     // dV += P^T dO
                mma_a_b<1, HS, BQ, kLd>(dk, dsf, s_q(stage));     // dK += dS^T Q
            }
            __syncthreads();   // every warp is done with this stage before iteration qt + 1 refills it
        }
    }
    store_dkdv_rows<HS>(p, in, w0, keys.warp_bits, dk[0], dv[0]);
}

// dq pass, block (head, query tile of kBlock queries); warp w owns queries q0 + 16w .. q0 + 16w + 15.
template <int HS>
__device__ __forceinline__ void backward_dq_block(const BackwardParams& p, int head, int tile) {
    using C = BackwardConfig<HS>;
    using T = Tile<HS>;
    constexpr int BK = C::kTile, kLd = C::kLd;
    const int warp = threadIdx.x / 32;
    const int S = p.S;
    const BackwardHead in = backward_head<HS>(p, head);
    const int q0 = tile * C::kBlock, w0 = q0 + 16 * warp;
    const int key_end = imin(q0 + C::kBlock, S);               // keys past the block's last query: invisible
    const int n_tiles = (key_end + BK - 1) / BK;

    const uint32_t smem = smem_address(dynamic_smem());
    const uint32_t s_q = smem + C::kDqQ, s_do = smem + C::kDqDout;
    auto s_k = [&](int stage) { return smem + C::kDqStage0 + stage * C::kDqStageBytes; };
    auto s_v = [&](int stage) { return s_k(stage) + T::bytes(BK); };

    load_tile<HS, C::kBlock>(s_q, in.q, HS, q0, [&](int r) { return q0 + r < S; });
    load_tile<HS, C::kBlock>(s_do, in.dout, in.dout_stride, q0, [&](int r) { return q0 + r < S; });
    uint64_t bits_next = key_bits<BK>(in.mask, 0, S);
    load_tile<HS, BK>(s_k(0), in.k, HS, 0, [&](int r) { return (bits_next >> r) & 1; });
    load_tile<HS, BK>(s_v(0), in.v, HS, 0, [&](int r) { return (bits_next >> r) & 1; });
    cp_async_commit();

    float neg_lse2[2], dl[2];
    dq_row_stats(p, head, w0, neg_lse2, dl);
    float dq[1][HS / 8][4];
    zero(dq[0]);
    uint32_t qf[1][HS / 16][4], of[1][HS / 16][4];   // used when kDqFragsInRegisters

    for (int kt = 0; kt < n_tiles; kt++) {
        const int stage = kt % 2, j0 = kt * BK;
        const uint64_t bits = bits_next;
        if (kt + 1 < n_tiles) {
            bits_next = key_bits<BK>(in.mask, j0 + BK, S);
            load_tile<HS, BK>(s_k(1 - stage), in.k, HS, j0 + BK, [&](int r) { return (bits_next >> r) & 1; });
            load_tile<HS, BK>(s_v(1 - stage), in.v, HS, j0 + BK, [&](int r) { return (bits_next >> r) & 1; });
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (C::kDqFragsInRegisters && kt == 0) {
            load_a<1, HS, kLd>(qf, s_q, 16 * warp);
            load_a<1, HS, kLd>(of, s_do, 16 * warp);
        }
        // Skip: no visible key, every key after every query of the warp, or no real query in the warp.
        if (bits != 0 && j0 <= w0 + 15 && w0 < S) {
            float s[1][BK / 8][4], dp[1][BK / 8][4];
            zero(s[0]);
            zero(dp[0]);
            if constexpr (C::kDqFragsInRegisters) {
                mma_a_bt<1, BK, HS, kLd>(s, qf, s_k(stage));     // S = Q K^T (16 queries x BK keys)
                mma_a_bt<1, BK, HS, kLd>(dp, of, s_v(stage));    // dP = dO V^T
            } else {
                mma_a_bt_smem_a<BK, HS, kLd>(s, s_q, 16 * warp, s_k(stage));
                mma_a_bt_smem_a<BK, HS, kLd>(dp, s_do, 16 * warp, s_v(stage));
            }
            // dS; element (query w0 + g + 8(e/2), key j0 + c).
            dq_probabilities<BK>(s[0], dp[0], bits, w0, j0, neg_lse2, dl, p.scale_log2);
            uint32_t dsf[1][BK / 16][4];
            c_to_a<BK>(dsf[0], s[0]);
            mma_a_b<1, HS, BK, kLd>(dq, dsf, s_k(stage));         // dQ += dS K
        }
        __syncthreads();
    }
    store_dq_rows<HS>(p, in, w0, dq[0]);
}

#ifdef BLOCKTF_SM90A
// Backward on wgmma, head size 64: the passes of backward_dkdv_block and backward_dq_block with the block = one
// warpgroup owning 64 rows (keys, or queries) and the other side in tiles of 64, every product a wgmma on 128-byte
// swizzled tiles (the forward's scheme and ordering rules): two products issued together (S and dP, or their
// transposes) from shared memory, then the element-wise step per warp in registers, then two products with the
// results as register A operands (used once). Skips are per block; the element-wise masks are the mma.sync passes'.
struct WgmmaBackwardConfig {
    static constexpr int kBlock = 64;   // own rows per block (one warpgroup, 16 a warp)
    static constexpr int kTile = 64;    // other-side rows per tile
    static constexpr uint32_t kTileBytes = 64 * 128;
    // dk/dv: K, V, then stage s = 0, 1: Q, dO; then stage s's lse and δ (64 floats each). dq: Q, dO, then stage s:
    // K, V. The same 48 KB of tiles (1024-byte aligned base) and, for dk/dv, 1 KB of row statistics.
    static constexpr uint32_t kStage0 = 2 * kTileBytes, kStageBytes = 2 * kTileBytes;
    static constexpr uint32_t kStats = kStage0 + 2 * kStageBytes, kStatsBytes = 2 * 4 * kTile;
    static constexpr uint32_t kDkdvSmemBytes = kStats + 2 * kStatsBytes + 1024;   // + room to align the base
    static constexpr uint32_t kDqSmemBytes = kStats + 1024;
    // Blocks per SM the register allocation must allow. nvcc 13: dk/dv (four 64 x 64 accumulators: dK, dV, S^T, dP^T)
    // 160 registers at 3 blocks, dq 123 at 4, no spill. Backward at vanilla_160's shape (dev/attention, with cp.async
    // loads then): 0.512 ms at (2, 3) blocks, 0.488 at (3, 3), 0.468 at (3, 4); 0.416 with TMA at (3, 4).
    static constexpr int kDkdvMinBlocks = 3, kDqMinBlocks = 4;
};

// The backward's tensor maps: q, k, v, dout (rows S). The dk/dv pass's row statistics (lse, δ of a query tile) come
// by cp.async: a head's 64 floats start at any 4-byte boundary, and TMA copies start at 16-byte ones. Masked keys'
// rows of k and v arrive as they are (a training forward makes them finite): their probabilities are 0, and their
// own dk, dv rows are written as zeros.
struct BackwardMaps {
    tma::RowsMap q, k, v, dout;
};

// dk/dv pass, block (head, key tile of 64 keys); warp w owns keys k0 + 16w .. k0 + 16w + 15.
__device__ __forceinline__ void backward_dkdv_block_wgmma(const BackwardParams& p, const BackwardMaps& maps, int head, int tile) {
    using C = WgmmaBackwardConfig;
    constexpr int HS = 64, BQ = C::kTile;
    const int S = p.S, h = head % p.NH, seq = head / p.NH;
    const BackwardHead in = backward_head<HS>(p, head);
    const DkdvKeys keys = dkdv_keys(p, in, head, tile);
    const int k0 = keys.k0, w0 = keys.w0;

    unsigned char* smem_ptr = dynamic_smem();
    const uint32_t smem_raw = smem_address(smem_ptr), smem = (smem_raw + 1023u) & ~1023u;
    const uint32_t s_k = smem, s_v = smem + C::kTileBytes;
    auto s_q = [&](int stage) { return smem + C::kStage0 + stage * C::kStageBytes; };
    auto s_do = [&](int stage) { return s_q(stage) + C::kTileBytes; };
    auto s_stats = [&](int stage) { return smem + C::kStats + stage * C::kStatsBytes; };   // lse, then δ
    auto stats_tile = [&](int stage) { return reinterpret_cast<const float*>(smem_ptr + (s_stats(stage) - smem_raw)); };
    const uint32_t landed = tma::stage_barriers();   // stage s's tiles have arrived
    auto bar = [&](int stage) { return landed + 8 * stage; };

    float dk[HS / 8][4], dv[HS / 8][4];   // rows: the warp's 16 keys
    zero(dk);
    zero(dv);
    if (keys.block_bits != 0) {   // block-uniform; otherwise every key of the block is masked and dk = dv = 0
        const int q_begin = k0;                            // earlier queries see none of the block's keys
        const int n_tiles = (S - q_begin + BQ - 1) / BQ;   // >= 1: k0 < S
        // Query tile qt into stage qt % 2 (the block's K and V too with tile 0): the tiles issued by one thread, the
        // row statistics by every thread (one cp.async group; waited for before the block barrier that precedes
        // their use).
        auto load_query_tile = [&](int qt) {
            const int stage = qt % 2, i0 = q_begin + qt * BQ;
            if (threadIdx.x == 0) {
                tma::expect_bytes(bar(stage), (qt == 0 ? 4 : 2) * C::kTileBytes);
                if (qt == 0) {
                    tma::load_rows(s_k, maps.k, k0, h, seq, bar(stage));
                    tma::load_rows(s_v, maps.v, k0, h, seq, bar(stage));
                }
                tma::load_rows(s_q(stage), maps.q, i0, h, seq, bar(stage));
                tma::load_rows(s_do(stage), maps.dout, i0, h, seq, bar(stage));
            }
            load_row_stats(s_stats(stage), s_stats(stage) + 4 * BQ, keys.lse, keys.delta, i0, BQ, S);
            cp_async_commit();
        };
        __syncthreads();   // after thread 0 initialised the stage barriers (without it, racecheck reports hazards here)
        load_query_tile(0);
        cp_async_wait<0>();
        __syncthreads();

        for (int qt = 0; qt < n_tiles; qt++) {
            const int stage = qt % 2, i0 = q_begin + qt * BQ;
            if (qt + 1 < n_tiles) load_query_tile(qt + 1);   // into the stage iteration qt - 1 read
            tma::wait(bar(stage), (qt / 2) % 2);
            float st[BQ / 8][4], dpt[BQ / 8][4];   // element (key w0 + g + 8(e/2), query i0 + c)
            wgmma::fence();
            wgmma::issue_abt(st, s_k, s_q(stage));     // S^T = K Q^T
            wgmma::issue_abt(dpt, s_v, s_do(stage));   // dP^T = V dO^T
            wgmma::commit();
            wgmma::wait_all();
            wgmma::fence_registers(st);
            wgmma::fence_registers(dpt);
            const float* lse_s = stats_tile(stage);
            dkdv_probabilities<BQ>(st, dpt, lse_s, lse_s + BQ, w0, i0, S, p.scale_log2);
            uint32_t pf[BQ / 16][4], dsf[BQ / 16][4];
            c_to_a<BQ>(pf, st);
            c_to_a<BQ>(dsf, dpt);
            wgmma::fence_registers(pf);
            wgmma::fence_registers(dsf);
            wgmma::fence_registers(dv);
            wgmma::fence_registers(dk);
            wgmma::fence();
            wgmma::issue_ab(dv, pf, s_do(stage));   // dV += P^T dO
            wgmma::issue_ab(dk, dsf, s_q(stage));   // dK += dS^T Q
            wgmma::commit();
            wgmma::wait_all();
            wgmma::fence_registers(dv);
            wgmma::fence_registers(dk);
            cp_async_wait<0>();   // the next tile's row statistics
            __syncthreads();      // every warp is done with this stage before iteration qt + 1 refills it
        }
    }
    store_dkdv_rows<HS>(p, in, w0, keys.warp_bits, dk, dv);
}

// dq pass, block (head, query tile of 64 queries); warp w owns queries q0 + 16w .. q0 + 16w + 15.
__device__ __forceinline__ void backward_dq_block_wgmma(const BackwardParams& p, const BackwardMaps& maps, int head, int tile) {
    using C = WgmmaBackwardConfig;
    constexpr int HS = 64, BK = C::kTile;
    const int warp = threadIdx.x / 32;
    const int S = p.S, h = head % p.NH, seq = head / p.NH;
    const BackwardHead in = backward_head<HS>(p, head);
    const int q0 = tile * C::kBlock, w0 = q0 + 16 * warp;
    const int key_end = imin(q0 + C::kBlock, S);               // keys past the block's last query: invisible
    const int n_tiles = (key_end + BK - 1) / BK;

    const uint32_t smem = (smem_address(dynamic_smem()) + 1023u) & ~1023u;
    const uint32_t s_q = smem, s_do = smem + C::kTileBytes;
    auto s_k = [&](int stage) { return smem + C::kStage0 + stage * C::kStageBytes; };
    auto s_v = [&](int stage) { return s_k(stage) + C::kTileBytes; };
    const uint32_t landed = tma::stage_barriers();   // stage s's tiles have arrived
    auto bar = [&](int stage) { return landed + 8 * stage; };

    // Key tile kt into stage kt % 2 (the block's Q and dO too with tile 0), issued by one thread.
    auto load_key_tile = [&](int kt) {
        const int stage = kt % 2;
        tma::expect_bytes(bar(stage), (kt == 0 ? 4 : 2) * C::kTileBytes);
        if (kt == 0) {
            tma::load_rows(s_q, maps.q, q0, h, seq, bar(stage));
            tma::load_rows(s_do, maps.dout, q0, h, seq, bar(stage));
        }
        tma::load_rows(s_k(stage), maps.k, kt * BK, h, seq, bar(stage));
        tma::load_rows(s_v(stage), maps.v, kt * BK, h, seq, bar(stage));
    };
    if (threadIdx.x == 0) load_key_tile(0);
    __syncthreads();
    uint64_t bits_next = key_bits<BK>(in.mask, 0, S);

    float neg_lse2[2], dl[2];
    dq_row_stats(p, head, w0, neg_lse2, dl);
    float dq[HS / 8][4];
    zero(dq);

    for (int kt = 0; kt < n_tiles; kt++) {
        const int stage = kt % 2, j0 = kt * BK;
        const uint64_t bits = bits_next;
        if (kt + 1 < n_tiles) {   // into the stage iteration kt - 1 read
            bits_next = key_bits<BK>(in.mask, j0 + BK, S);
            if (threadIdx.x == 0) load_key_tile(kt + 1);
        }
        tma::wait(bar(stage), (kt / 2) % 2);
        if (bits != 0) {   // block-uniform skip: no visible key (key tiles after the last query are not visited)
            float s[BK / 8][4], dp[BK / 8][4];   // element (query w0 + g + 8(e/2), key j0 + c)
            wgmma::fence();
            wgmma::issue_abt(s, s_q, s_k(stage));     // S = Q K^T
            wgmma::issue_abt(dp, s_do, s_v(stage));   // dP = dO V^T
            wgmma::commit();
            wgmma::wait_all();
            wgmma::fence_registers(s);
            wgmma::fence_registers(dp);
            dq_probabilities<BK>(s, dp, bits, w0, j0, neg_lse2, dl, p.scale_log2);
            wgmma::accumulate_product(dq, s, s_k(stage));   // dQ += dS K
        }
        __syncthreads();
    }
    store_dq_rows<HS>(p, in, w0, dq);
}
#endif  // BLOCKTF_SM90A

// ================================================================================================================
// Launch geometry and parameters.

// Training forward: q, k, v (nseq, NH, S, HS), out (nseq, S, NH*HS), lse (nseq, NH, S), key_mask (nseq, S).
template <int HS>
inline ForwardParams training_forward_params(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                             const int* key_mask, int S, int NH) {
    ForwardParams p{};
    p.out = out;
    p.lse = lse;
    p.q = q;
    p.k = k;
    p.v = v;
    p.key_mask = key_mask;
    p.q_seq_stride = p.kv_seq_stride = (size_t)NH * S * HS;
    p.q_head_stride = p.kv_head_stride = (size_t)S * HS;
    p.q_row_stride = HS;
    p.out_seq_stride = (size_t)S * NH * HS;
    p.out_row_stride = NH * HS;
    p.mask_seq_stride = S;
    p.NH = NH;
    p.n_q = S;
    p.kv_len = S;
    p.offset = 0;
    p.scale_log2 = kLog2e / std::sqrt((float)HS);
    return p;
}

// Cached prefill: q, out (nseq, S_new, NH*HS); k_cache, v_cache (nseq, NH, capacity, HS); key_mask (nseq, capacity)
// or null; query i at cache position p0 + i (p0 + S_new <= capacity).
template <int HS>
inline ForwardParams cached_prefill_params(bf16* out, const bf16* q, const bf16* k_cache, const bf16* v_cache,
                                           const int* key_mask, int p0, int S_new, int NH, int capacity) {
    ForwardParams p{};
    p.out = out;
    p.lse = nullptr;
    p.q = q;
    p.k = k_cache;
    p.v = v_cache;
    p.key_mask = key_mask;
    p.q_seq_stride = (size_t)S_new * NH * HS;
    p.q_head_stride = HS;
    p.q_row_stride = NH * HS;
    p.kv_seq_stride = (size_t)NH * capacity * HS;
    p.kv_head_stride = (size_t)capacity * HS;
    p.out_seq_stride = (size_t)S_new * NH * HS;
    p.out_row_stride = NH * HS;
    p.mask_seq_stride = capacity;
    p.NH = NH;
    p.n_q = S_new;
    p.kv_len = p0 + S_new;
    p.offset = p0;
    p.scale_log2 = kLog2e / std::sqrt((float)HS);
    return p;
}

template <int HS>
inline BackwardParams backward_params(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                                      const bf16* v, const float* lse, const float* delta, const int* key_mask, int S,
                                      int NH) {
    BackwardParams p{};
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.dout = dout;
    p.q = q;
    p.k = k;
    p.v = v;
    p.lse = lse;
    p.delta = delta;
    p.key_mask = key_mask;
    p.S = S;
    p.NH = NH;
    p.scale = 1.0f / std::sqrt((float)HS);
    p.scale_log2 = kLog2e / std::sqrt((float)HS);
    return p;
}

template <int HS> inline int forward_tiles(int n_q) { return (n_q + ForwardConfig<HS>::kBlockM - 1) / ForwardConfig<HS>::kBlockM; }
template <int HS> inline int backward_tiles(int S) { return (S + BackwardConfig<HS>::kBlock - 1) / BackwardConfig<HS>::kBlock; }
template <int HS> inline size_t delta_threads(size_t rows) { return rows * (HS / 8); }

// Grid order: blockIdx.x = head (up to 2^31 - 1), blockIdx.y = tile, the tiles with the most work first (the last
// query tiles in the forward and the dq pass, the first key tiles in the dk/dv pass), so the long blocks start in
// the first wave and the short ones fill the tail.
__host__ __device__ inline int longest_first(int y, int tiles) { return tiles - 1 - y; }

// ================================================================================================================
// Kernels and their launchers.

template <int HS>
__global__ void __launch_bounds__(kThreads, ForwardConfig<HS>::kMinBlocks) forward_kernel(const ForwardParams p) {
    forward_block<HS>(p, blockIdx.x, longest_first(blockIdx.y, gridDim.y));
}
#ifdef BLOCKTF_SM90A
// The tensor maps are __grid_constant__: TMA reads them from the kernel's parameter space, by address.
__global__ void __launch_bounds__(kThreads, WgmmaForwardConfig::kMinBlocks)
    forward_wgmma_kernel(const ForwardParams p, const __grid_constant__ ForwardMaps maps) {
    forward_block_wgmma(p, maps, blockIdx.x, longest_first(blockIdx.y, gridDim.y));
}
__global__ void __launch_bounds__(kThreads, WgmmaBackwardConfig::kDkdvMinBlocks)
    backward_dkdv_wgmma_kernel(const BackwardParams p, const __grid_constant__ BackwardMaps maps) {
    backward_dkdv_block_wgmma(p, maps, blockIdx.x, blockIdx.y);
}
__global__ void __launch_bounds__(kThreads, WgmmaBackwardConfig::kDqMinBlocks)
    backward_dq_wgmma_kernel(const BackwardParams p, const __grid_constant__ BackwardMaps maps) {
    backward_dq_block_wgmma(p, maps, blockIdx.x, longest_first(blockIdx.y, gridDim.y));
}
#endif
template <int HS>
__global__ void __launch_bounds__(kThreads, BackwardConfig<HS>::kDkdvMinBlocks) backward_dkdv_kernel(const BackwardParams p) {
    backward_dkdv_block<HS>(p, blockIdx.x, blockIdx.y);
}
template <int HS>
__global__ void __launch_bounds__(kThreads, BackwardConfig<HS>::kDqMinBlocks) backward_dq_kernel(const BackwardParams p) {
    backward_dq_block<HS>(p, blockIdx.x, longest_first(blockIdx.y, gridDim.y));
}
template <int HS>
__global__ void __launch_bounds__(256) delta_kernel(float* delta, const bf16* dout, const bf16* out, size_t rows, int S, int NH) {
    delta_thread<HS>(delta, dout, out, rows, S, NH, blockIdx.x * (size_t)blockDim.x + threadIdx.x);
}

}  // namespace flash


// ================================================================================================================
// Entry points. The kernels multiply bf16 on tensor cores, so they serve the BF16 build; the FP32 build, which exists
// to match the CPU reference to 1e-5, keeps the matmul path (uses_flash_attention says which a stack takes).

constexpr bool kFlashAttentionBuild = std::is_same<floatX, __nv_bfloat16>::value;
inline bool flash_head_size(int HS) { return HS == 32 || HS == 64 || HS == 128; }

inline void check_flash_args(const char* who, int nseq, int n_q, int NH, int HS, int block_rows,
                             std::initializer_list<const void*> tensors) {
    if (!kFlashAttentionBuild) throw std::runtime_error(std::string(who) + ": flash attention needs the BF16 build");
    if (!flash_head_size(HS))
        throw std::runtime_error(std::string(who) + ": head size " + std::to_string(HS) + " not in {32, 64, 128}");
    if (n_q < 1) throw std::runtime_error(std::string(who) + ": sequence length must be at least 1");
    if (nseq < 0 || NH < 1 || (size_t)nseq * NH > 0x7fffffffull) throw std::runtime_error(std::string(who) + ": bad nseq or NH for one grid");
    if ((n_q + block_rows - 1) / block_rows > 65535) throw std::runtime_error(std::string(who) + ": sequence too long for one grid");
    for (const void* p : tensors)
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
            throw std::runtime_error(std::string(who) + ": tensors must be 16-byte aligned");
}

namespace flash {
#ifdef BLOCKTF_SM90A
// Tensor maps (TMA descriptors) are made by the driver's cuTensorMapEncodeTiled, found through the runtime so that
// nothing links the driver library.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* function = nullptr;
        cudaDriverEntryPointQueryResult found{};
        cudaCheck(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found));
        if (found != cudaDriverEntryPointSuccess || !function) throw std::runtime_error("the CUDA driver has no cuTensorMapEncodeTiled");
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
    }();
    return encode;
}
inline void encode_tensor_map(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, const void* base, const cuuint64_t* dims,
                              const cuuint64_t* byte_strides, const cuuint32_t* box, CUtensorMapSwizzle swizzle, const char* who) {
    const cuuint32_t element_strides[4] = {1, 1, 1, 1};
    const CUresult result = tensor_map_encoder()(map, type, rank, const_cast<void*>(base), dims, byte_strides, box, element_strides,
                                                 CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (result != CUDA_SUCCESS) throw std::runtime_error(std::string(who) + ": cuTensorMapEncodeTiled failed (CUresult " + std::to_string((int)result) + ")");
}

// Row (seq, h, i) of 64 bf16 at base + seq * seq_stride + h * head_stride + i * row_stride (strides in elements,
// multiples of 8: 16 bytes), rows 0 .. rows - 1 (boxes reaching past them are zero-filled), read as 64-row tiles
// in the 128-byte swizzle layout.
inline tma::RowsMap rows_map(const bf16* base, int rows, size_t row_stride, int NH, size_t head_stride, int nseq, size_t seq_stride,
                             const char* who) {
    for (size_t stride : {row_stride, head_stride, seq_stride})
        if (stride % 8 != 0) throw std::runtime_error(std::string(who) + ": row strides must be multiples of 16 bytes for TMA");
    tma::RowsMap m{};
    m.heads_inner = head_stride < row_stride;
    const cuuint64_t dims[4] = {64, (cuuint64_t)(m.heads_inner ? NH : rows), (cuuint64_t)(m.heads_inner ? rows : NH), (cuuint64_t)nseq};
    const cuuint64_t strides[3] = {2 * (m.heads_inner ? head_stride : row_stride), 2 * (m.heads_inner ? row_stride : head_stride), 2 * seq_stride};
    const cuuint32_t box[4] = {64, m.heads_inner ? 1u : 64u, m.heads_inner ? 64u : 1u, 1};
    encode_tensor_map(&m.map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, base, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B, who);
    return m;
}
#endif

template <int HS>
inline void launch_forward(const ForwardParams& p, int nseq, cudaStream_t stream) {
#ifdef BLOCKTF_SM90A
    if constexpr (HS == 64) {
        using C = WgmmaForwardConfig;
        const char* who = "flash attention forward (wgmma)";
        allow_dynamic_smem(forward_wgmma_kernel, C::kSmemBytes, who);
        const ForwardMaps maps{rows_map(p.q, p.n_q, p.q_row_stride, p.NH, p.q_head_stride, nseq, p.q_seq_stride, who),
                               rows_map(p.k, p.kv_len, HS, p.NH, p.kv_head_stride, nseq, p.kv_seq_stride, who),
                               rows_map(p.v, p.kv_len, HS, p.NH, p.kv_head_stride, nseq, p.kv_seq_stride, who)};
        const dim3 grid((unsigned)(nseq * p.NH), (unsigned)((p.n_q + C::kBlockM - 1) / C::kBlockM));
        forward_wgmma_kernel<<<grid, kThreads, C::kSmemBytes, stream>>>(p, maps);
        cudaCheckLaunch();
        return;
    }
#endif
    constexpr uint32_t smem = ForwardConfig<HS>::kSmemBytes;
    allow_dynamic_smem(forward_kernel<HS>, smem, "flash attention forward");
    const dim3 grid((unsigned)(nseq * p.NH), (unsigned)forward_tiles<HS>(p.n_q));
    forward_kernel<HS><<<grid, kThreads, smem, stream>>>(p);
    cudaCheckLaunch();
}

template <int HS>
inline void launch_backward(const BackwardParams& p, const bf16* out, float* delta, int nseq, cudaStream_t stream) {
    using C = BackwardConfig<HS>;
    const size_t rows = (size_t)nseq * p.S * p.NH;
    const size_t threads = delta_threads<HS>(rows);
    if ((threads + 255) / 256 > 0x7fffffffull) throw std::runtime_error("flash attention backward: too many rows for one grid");
    delta_kernel<HS><<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(delta, p.dout, out, rows, p.S, p.NH);
    cudaCheckLaunch();
    const dim3 grid((unsigned)(nseq * p.NH), (unsigned)backward_tiles<HS>(p.S));
#ifdef BLOCKTF_SM90A
    if constexpr (HS == 64) {
        using W = WgmmaBackwardConfig;
        static_assert(W::kBlock == C::kBlock, "the grid of backward_tiles");
        const char* who = "flash attention backward (wgmma)";
        allow_dynamic_smem(backward_dkdv_wgmma_kernel, W::kDkdvSmemBytes, who);
        allow_dynamic_smem(backward_dq_wgmma_kernel, W::kDqSmemBytes, who);
        const size_t head_stride = (size_t)p.S * HS, seq_stride = (size_t)p.NH * head_stride;
        const BackwardMaps maps{rows_map(p.q, p.S, HS, p.NH, head_stride, nseq, seq_stride, who),
                                rows_map(p.k, p.S, HS, p.NH, head_stride, nseq, seq_stride, who),
                                rows_map(p.v, p.S, HS, p.NH, head_stride, nseq, seq_stride, who),
                                rows_map(p.dout, p.S, (size_t)p.NH * HS, p.NH, HS, nseq, seq_stride, who)};
        backward_dkdv_wgmma_kernel<<<grid, kThreads, W::kDkdvSmemBytes, stream>>>(p, maps);
        cudaCheckLaunch();
        backward_dq_wgmma_kernel<<<grid, kThreads, W::kDqSmemBytes, stream>>>(p, maps);
        cudaCheckLaunch();
        return;
    }
#endif
    allow_dynamic_smem(backward_dkdv_kernel<HS>, C::kDkdvSmemBytes, "flash attention backward (dk, dv)");
    allow_dynamic_smem(backward_dq_kernel<HS>, C::kDqSmemBytes, "flash attention backward (dq)");
    backward_dkdv_kernel<HS><<<grid, kThreads, C::kDkdvSmemBytes, stream>>>(p);
    cudaCheckLaunch();
    backward_dq_kernel<HS><<<grid, kThreads, C::kDqSmemBytes, stream>>>(p);
    cudaCheckLaunch();
}

// Queries per block of the forward kernel launch_forward<HS> takes.
inline int forward_block_rows(int HS) {
#ifdef BLOCKTF_SM90A
    if (HS == 64) return WgmmaForwardConfig::kBlockM;
#endif
    return HS == 128 ? ForwardConfig<128>::kBlockM : ForwardConfig<64>::kBlockM;
}
inline const bf16* as_bf16(const floatX* p) { return reinterpret_cast<const bf16*>(p); }
inline bf16* as_bf16(floatX* p) { return reinterpret_cast<bf16*>(p); }
}  // namespace flash

// q, k, v: (nseq, NH, S, HS), HS in {32, 64, 128}, k rotated   key_mask: (nseq, S)   out: (nseq, S, NH*HS)
// lse: (nseq, NH, S) fp32, written for the backward (0 for a query that sees no key). Tensors 16-byte aligned.
inline void flash_attention_forward(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                                    const int* key_mask, int nseq, int S, int NH, int HS, cudaStream_t stream) {
    using namespace flash;
    check_flash_args("flash_attention_forward", nseq, S, NH, HS, forward_block_rows(HS), {out, q, k, v});
    if (nseq == 0) return;
    bf16* o = as_bf16(out);
    const bf16 *qb = as_bf16(q), *kb = as_bf16(k), *vb = as_bf16(v);
    with_head_size<32>("flash_attention_forward", HS, [&](auto hs) {
        launch_forward<decltype(hs)::value>(training_forward_params<decltype(hs)::value>(o, lse, qb, kb, vb, key_mask, S, NH), nseq, stream);
    });
}

// dout: (nseq, S, NH*HS); out, lse: what flash_attention_forward wrote for these q, k, v -> dq, dk, dv:
// (nseq, NH, S, HS), written, deterministic. delta: scratch of (nseq, NH, S) fp32.
inline void flash_attention_backward(floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* out,
                                     const float* lse, const floatX* q, const floatX* k, const floatX* v,
                                     const int* key_mask, float* delta, int nseq, int S, int NH, int HS,
                                     cudaStream_t stream) {
    using namespace flash;
    check_flash_args("flash_attention_backward", nseq, S, NH, HS, BackwardConfig<64>::kBlock, {dq, dk, dv, dout, out, q, k, v});
    if (nseq == 0) return;
    bf16 *dqb = as_bf16(dq), *dkb = as_bf16(dk), *dvb = as_bf16(dv);
    const bf16 *dob = as_bf16(dout), *ob = as_bf16(out), *qb = as_bf16(q), *kb = as_bf16(k), *vb = as_bf16(v);
    with_head_size<32>("flash_attention_backward", HS, [&](auto hs) {
        launch_backward<decltype(hs)::value>(backward_params<decltype(hs)::value>(dqb, dkb, dvb, dob, qb, kb, vb, lse, delta, key_mask, S, NH), ob, delta,
                                  nseq, stream);
    });
}

// Generation's prefill: new queries q (nseq, S_new, NH*HS) (heads merged, rotated) at cache positions p0 .. p0 +
// S_new - 1 over k_cache, v_cache (nseq, NH, capacity, HS) (the new keys and values already appended); query i sees
// cached positions j <= p0 + i with key_mask[seq * capacity + j] = 1 (key_mask null: all visible). out: (nseq, S_new,
// NH*HS). Needs p0 >= 0, p0 + S_new <= capacity. The semantics of attention_cached with dyn_pos = null.
inline void flash_attention_cached_prefill(floatX* out, const floatX* q, const floatX* k_cache, const floatX* v_cache,
                                           const int* key_mask, int p0, int nseq, int S_new, int NH, int HS, int capacity,
                                           cudaStream_t stream) {
    using namespace flash;
    if (p0 < 0 || S_new < 1 || p0 + (long long)S_new > capacity)
        throw std::runtime_error("flash_attention_cached_prefill: needs p0 >= 0, S_new >= 1 and p0 + S_new <= capacity");
    check_flash_args("flash_attention_cached_prefill", nseq, S_new, NH, HS, forward_block_rows(HS), {out, q, k_cache, v_cache});
    if (nseq == 0) return;
    bf16* o = as_bf16(out);
    const bf16 *qb = as_bf16(q), *kb = as_bf16(k_cache), *vb = as_bf16(v_cache);
    with_head_size<32>("flash_attention_cached_prefill", HS, [&](auto hs) {
        launch_forward<decltype(hs)::value>(cached_prefill_params<decltype(hs)::value>(o, qb, kb, vb, key_mask, p0, S_new, NH, capacity), nseq, stream);
    });
}

// ================================================================================================================
// Dispatch: which implementation a stack's attention takes, and the scratch it needs.

enum class AttentionPath {
    Small,    // S <= 16: the fused small kernels (the token decoder)
    Flash,    // BF16 build, S > 16, head size 32, 64 or 128: flash attention
    Matmul,   // otherwise (the FP32 build's long sequences): batched GEMMs with the (S, S) scores in scratch
};
inline AttentionPath attention_path(int S, int HS) {
    if (S <= kSmallMaxS && (HS == 16 || HS == 32 || HS == 64 || HS == 128)) return AttentionPath::Small;
    if (kFlashAttentionBuild && flash_head_size(HS)) return AttentionPath::Flash;
    return AttentionPath::Matmul;
}

// Scratch of one attention call, shared by a stack's layers; sized for its path. The flash path keeps, per layer, its
// lse (nseq, NH, S) beside the layer's activations (attention_lse_size); the matmul path recomputes the (S, S)
// probabilities in the backward instead of keeping them per layer.
struct AttentionScratch {
    DeviceBuffer<float> scores, dprobs;   // matmul: (nseq*NH, S, S) fp32
    DeviceBuffer<floatX> probs, dscores;  // matmul: (nseq*NH, S, S)
    DeviceBuffer<floatX> heads, dheads;   // matmul: (nseq, NH, S, HS), output before the head merge, its gradient
    DeviceBuffer<float> delta;            // flash: (nseq, NH, S), the backward's δ_i = dO_i · out_i

    AttentionScratch() = default;
    AttentionScratch(size_t nseq, int NH, int S, int HS, AttentionPath path) {
        const size_t square = nseq * NH * S * S, head = nseq * NH * S * HS;
        switch (path) {
            case AttentionPath::Small: break;
            case AttentionPath::Flash: delta = DeviceBuffer<float>(nseq * NH * S); break;
            case AttentionPath::Matmul:
                scores = DeviceBuffer<float>(square); dprobs = DeviceBuffer<float>(square);
                probs = DeviceBuffer<floatX>(square); dscores = DeviceBuffer<floatX>(square);
                heads = DeviceBuffer<floatX>(head); dheads = DeviceBuffer<floatX>(head);
                break;
        }
    }
    AttentionScratch(size_t nseq, int NH, int S, int HS) : AttentionScratch(nseq, NH, S, HS, attention_path(S, HS)) {}
};
// Floats of the per-layer lse the forward writes for the backward (0 unless the path is flash).
inline size_t attention_lse_size(size_t nseq, int NH, int S, int HS) {
    return attention_path(S, HS) == AttentionPath::Flash ? nseq * NH * S : 0;
}

// scores (col-major per batch: M[j, i] = k_j · q_i, i.e. row-major scores[i][j]) = scale · op_T(K^T) · Q^T.
inline void attention_scores(Gpu& gpu, float* scores, const floatX* q, const floatX* k, int batch, int S, int HS) {
    const long long head = (long long)S * HS, square = (long long)S * S;
    batched_matmul(gpu, scores, CUDA_R_32F, k, q, S, S, HS, true, false, HS, HS, S, head, head, square, batch,
                   1.0f / std::sqrt((float)HS));
}

// The matmul path. q, k, v: (nseq, NH, S, HS)   key_mask: (nseq, S)   out: (nseq, S, C) heads merged.
inline void matmul_attention_forward(Gpu& gpu, floatX* out, const floatX* q, const floatX* k, const floatX* v,
                                     const int* key_mask, AttentionScratch& scratch, int nseq, int S, int NH, int HS) {
    const int batch = nseq * NH;
    const long long head = (long long)S * HS, square = (long long)S * S;
    attention_scores(gpu, scratch.scores.data(), q, k, batch, S, HS);
    const size_t rows = (size_t)batch * S;
    attention_softmax_kernel<<<warp_rows_grid(rows), 256, 0, gpu.stream>>>(scratch.probs.data(), scratch.scores.data(), key_mask, nseq, NH, S);
    cudaCheckLaunch();
    // heads^T (HS, S) = v^T (HS, S) · probs^T (S, S)
    batched_matmul(gpu, scratch.heads.data(), kCudaFloatX, v, scratch.probs.data(), HS, S, S, false, false, HS, S, HS,
                   head, square, head, batch, 1.0f);
    permute_heads_kernel<<<grid_for(rows * HS, 256), 256, 0, gpu.stream>>>(out, scratch.heads.data(), nseq, S, NH, HS, false);
    cudaCheckLaunch();
}

// dout: (nseq, S, C) -> dq, dk, dv: (nseq, NH, S, HS), written. Recomputes the probabilities:
//   dv = probs^T dO;  dprobs = dO v^T;  dscores = softmax backward;  dq = scale dscores k;  dk = scale dscores^T q
inline void matmul_attention_backward(Gpu& gpu, floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* q,
                                      const floatX* k, const floatX* v, const int* key_mask, AttentionScratch& scratch,
                                      int nseq, int S, int NH, int HS) {
    const int batch = nseq * NH;
    const long long head = (long long)S * HS, square = (long long)S * S;
    const size_t rows = (size_t)batch * S;
    const float scale = 1.0f / std::sqrt((float)HS);
    attention_scores(gpu, scratch.scores.data(), q, k, batch, S, HS);
    attention_softmax_kernel<<<warp_rows_grid(rows), 256, 0, gpu.stream>>>(scratch.probs.data(), scratch.scores.data(), key_mask, nseq, NH, S);
    cudaCheckLaunch();
    permute_heads_kernel<<<grid_for(rows * HS, 256), 256, 0, gpu.stream>>>(scratch.dheads.data(), dout, nseq, S, NH, HS, true);
    cudaCheckLaunch();
    const floatX* dO = scratch.dheads.data();
    // dv^T (HS, S) = dO^T (HS, S) · probs (S, S) [stored as probs^T, transposed]
    batched_matmul(gpu, dv, kCudaFloatX, dO, scratch.probs.data(), HS, S, S, false, true, HS, S, HS, head, square, head, batch, 1.0f);
    // dprobs, stored like scores: M[j, i] = v_j · dO_i
    batched_matmul(gpu, scratch.dprobs.data(), CUDA_R_32F, v, dO, S, S, HS, true, false, HS, HS, S, head, head, square, batch, 1.0f);
    attention_softmax_backward_kernel<<<warp_rows_grid(rows), 256, 0, gpu.stream>>>(scratch.dscores.data(), scratch.probs.data(), scratch.dprobs.data(), rows, S);
    cudaCheckLaunch();
    // dq^T (HS, S) = k^T (HS, S) · dscores^T (S, S);  dk^T (HS, S) = q^T (HS, S) · dscores (S, S)
    batched_matmul(gpu, dq, kCudaFloatX, k, scratch.dscores.data(), HS, S, S, false, false, HS, S, HS, head, square, head, batch, scale);
    batched_matmul(gpu, dk, kCudaFloatX, q, scratch.dscores.data(), HS, S, S, false, true, HS, S, HS, head, square, head, batch, scale);
}

// q, k, v: (nseq, NH, S, HS)   key_mask: (nseq, S)   out: (nseq, S, C) heads merged, by the path attention_path picks.
// lse: (nseq, NH, S) written on the flash path (kept for the backward), else unused and may be null.
inline void attention_forward(Gpu& gpu, floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                              const int* key_mask, AttentionScratch& scratch, int nseq, int S, int NH, int HS) {
    switch (attention_path(S, HS)) {
        case AttentionPath::Small: small_attention_forward(out, q, k, v, key_mask, nseq, S, NH, HS, gpu.stream); break;
        case AttentionPath::Flash: flash_attention_forward(out, lse, q, k, v, key_mask, nseq, S, NH, HS, gpu.stream); break;
        case AttentionPath::Matmul: matmul_attention_forward(gpu, out, q, k, v, key_mask, scratch, nseq, S, NH, HS); break;
    }
}

// dout: (nseq, S, C) -> dq, dk, dv: (nseq, NH, S, HS), written. out, lse: what attention_forward wrote (the flash
// path reads them).
inline void attention_backward(Gpu& gpu, floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* out,
                               const float* lse, const floatX* q, const floatX* k, const floatX* v, const int* key_mask,
                               AttentionScratch& scratch, int nseq, int S, int NH, int HS) {
    switch (attention_path(S, HS)) {
        case AttentionPath::Small:
            small_attention_backward(dq, dk, dv, dout, q, k, v, key_mask, nseq, S, NH, HS, gpu.stream);
            break;
        case AttentionPath::Flash:
            flash_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, key_mask, scratch.delta.data(), nseq, S, NH, HS, gpu.stream);
            break;
        case AttentionPath::Matmul:
            matmul_attention_backward(gpu, dq, dk, dv, dout, q, k, v, key_mask, scratch, nseq, S, NH, HS);
            break;
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Embedding gradients without atomics: the rows that used each token id are grouped on the host (Buckets), and
// one thread block per distinct id sums its rows in a fixed order, so the result is deterministic.

// For an embedding table: which rows of a gradient tensor belong to which token id.
struct Buckets {
    std::vector<int> ids;      // (num_buckets) distinct token ids
    std::vector<int> starts;   // (num_buckets + 1) bucket b owns rows[starts[b] .. starts[b+1])
    std::vector<int> rows;     // (total) rows of the gradient tensor, ascending within a bucket
};

// ids[q] is the token embedded at gradient row rows_of[q]. Counting sort by id keeps rows in ascending order.
inline Buckets make_buckets(const std::vector<int>& ids, const std::vector<int>& rows_of) {
    std::vector<std::pair<int, int>> pairs(ids.size());
    for (size_t q = 0; q < ids.size(); q++) pairs[q] = {ids[q], rows_of[q]};
    std::sort(pairs.begin(), pairs.end());
    Buckets buckets;
    for (size_t q = 0; q < pairs.size(); q++) {
        if (q == 0 || pairs[q].first != pairs[q - 1].first) {
            buckets.ids.push_back(pairs[q].first);
            buckets.starts.push_back((int)q);
        }
        buckets.rows.push_back(pairs[q].second);
    }
    buckets.starts.push_back((int)pairs.size());
    return buckets;
}

// dtable (V, C): row ids[b] += Σ over the bucket's rows of dsrc (rows, C).
__global__ void embedding_backward_kernel(floatX* dtable, const floatX* dsrc, const int* ids, const int* starts,
                                          const int* rows, int C) {
    const int b = blockIdx.x;
    floatX* out = dtable + (size_t)ids[b] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float sum = to_f32(out[c]);
        for (int q = starts[b]; q < starts[b + 1]; q++) sum += to_f32(dsrc[(size_t)rows[q] * C + c]);
        out[c] = to_floatX(sum);
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Token-decoder input (SPEC 1.5): for each target row r, positions 0..P-1 are the prefix vectors and P+j is the
// embedding of token y_j (j < LB-1).
// prefix: (rows, P*HT)   token_ids: (rows, LB-1)   embed: (V, HT)   x: (rows, S = P+LB-1, HT)
__global__ void token_input_kernel(floatX* x, const floatX* prefix, const floatX* embed, const int* token_ids, int rows,
                                   int S, int P, int HT) {
    const size_t n = (size_t)rows * S * HT;
    GRID_STRIDE_LOOP(i, n) {
        const int c = i % HT, s = (i / HT) % S;
        const size_t r = i / ((size_t)HT * S);
        x[i] = s < P ? prefix[(r * P + s) * HT + c] : embed[(size_t)token_ids[r * (S - P) + s - P] * HT + c];
    }
}
// dprefix (rows, P*HT) = dx[:, 0..P-1]; the token positions' gradients go to the embedding through Buckets.
__global__ void token_input_backward_kernel(floatX* dprefix, const floatX* dx, int rows, int S, int P, int HT) {
    const size_t n = (size_t)rows * P * HT;
    GRID_STRIDE_LOOP(i, n) {
        const int c = i % HT, s = (i / HT) % P;
        const size_t r = i / ((size_t)HT * P);
        dprefix[i] = dx[(r * S + s) * HT + c];
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Softmax cross-entropy in fp32 (SPEC 10.5), fused with its gradient: one block per scored row, two passes over the
// row's logits (they do not fit on chip: 50304 values = 98 KB in bf16): one for the softmax statistics, one for the
// gradient. The logits are stored like every activation, in floatX: bf16 in the BF16 build, as PyTorch's autocast and
// HF's bf16 models produce them (SPEC 21); the softmax and the loss are computed in fp32 from them.
// logits: (n, V) floatX   targets: (n)   losses: (n) fp32 = logsumexp(z) - z[target]
// dlogits: (n, V) = (softmax(z) - onehot(target)) * dloss, where dloss = 1 / (scored rows · accumulation steps).

// The running statistics of a softmax: max m and Σ exp(z - m) over the values seen. Added to one value at a time and
// merged pairwise in a fixed order, so the result is deterministic.
struct SoftmaxStats {
    float max, sum;
};
__device__ inline SoftmaxStats softmax_add(SoftmaxStats a, float z) {
    if (z > a.max) return {z, a.sum * expf(a.max - z) + 1.0f};   // expf(-inf) = 0 for the first value
    return {a.max, a.sum + expf(z - a.max)};
}
__device__ inline SoftmaxStats softmax_merge(SoftmaxStats a, SoftmaxStats b) {
    const float m = fmaxf(a.max, b.max);
    if (m == -INFINITY) return a;   // neither has seen a value
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}
// Over a warp, then over a thread block (every thread gets the result; shared: at least 32 SoftmaxStats), as
// warp_sum and block_sum do for sums.
__device__ inline SoftmaxStats warp_softmax_merge(SoftmaxStats x) {
    for (int offset = 16; offset > 0; offset >>= 1)
        x = softmax_merge(x, {__shfl_xor_sync(0xffffffff, x.max, offset), __shfl_xor_sync(0xffffffff, x.sum, offset)});
    return x;
}
__device__ inline SoftmaxStats block_softmax_merge(SoftmaxStats x, SoftmaxStats* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_softmax_merge(x);
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    return warp_softmax_merge(lane < warps ? shared[lane] : SoftmaxStats{-INFINITY, 0.0f});
}

// kPacked: V % kPack == 0, so every row starts 16-byte aligned and is read (and its gradient written) in packs.
template <bool kPacked>
__global__ void cross_entropy_kernel(floatX* dlogits, float* losses, const floatX* logits, const int* targets, int V, float dloss) {
    __shared__ SoftmaxStats shared[32];
    const size_t row = blockIdx.x;
    const floatX* z = logits + row * V;
    SoftmaxStats stats{-INFINITY, 0.0f};
    if constexpr (kPacked) {
        for (int p = threadIdx.x; p < V / kPack; p += blockDim.x) {
            float x[kPack];
            load_pack(x, z + p * kPack);
#pragma unroll
            for (int e = 0; e < kPack; e++) stats = softmax_add(stats, x[e]);
        }
    } else {
        for (int v = threadIdx.x; v < V; v += blockDim.x) stats = softmax_add(stats, to_f32(z[v]));
    }
    stats = block_softmax_merge(stats, shared);
    const int target = targets[row];
    if (threadIdx.x == 0) losses[row] = logf(stats.sum) + stats.max - to_f32(z[target]);
    if (dlogits == nullptr) return;
    const float scale = dloss / stats.sum;
    auto gradient = [&](int v, float zv) { return expf(zv - stats.max) * scale - (v == target ? dloss : 0.0f); };
    if constexpr (kPacked) {
        for (int p = threadIdx.x; p < V / kPack; p += blockDim.x) {
            float x[kPack];
            load_pack(x, z + p * kPack);
#pragma unroll
            for (int e = 0; e < kPack; e++) x[e] = gradient(p * kPack + e, x[e]);
            store_pack(dlogits + row * V + p * kPack, x);
        }
    } else {
        for (int v = threadIdx.x; v < V; v += blockDim.x) dlogits[row * V + v] = to_floatX(gradient(v, to_f32(z[v])));
    }
}

// dlogits null: losses only (validation, scoring).
inline void cross_entropy(floatX* dlogits, float* losses, const floatX* logits, const int* targets, int rows, int V,
                          float dloss, cudaStream_t stream) {
    if (rows == 0) return;
    if (V % kPack == 0) cross_entropy_kernel<true><<<rows, 512, 0, stream>>>(dlogits, losses, logits, targets, V, dloss);
    else cross_entropy_kernel<false><<<rows, 512, 0, stream>>>(dlogits, losses, logits, targets, V, dloss);
    cudaCheckLaunch();
}

// out[0] = scale Σ in[0..n) in a fixed order (one block), or added to out[0] with accumulate: the micro-batch
// losses' mean into the loss sum, the squared gradient norm.
__global__ void sum_kernel(float* out, const float* in, size_t n, float scale, bool accumulate) {
    __shared__ float shared[32];
    float sum = 0.0f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) sum += in[i];
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) out[0] = (accumulate ? out[0] : 0.0f) + scale * sum;
}

// ----------------------------------------------------------------------------------------------------------------
// AdamW (SPEC 3.3) with global-norm clipping. Gradient norm: per-block partial sums of squares over a fixed grid,
// then sum_kernel: deterministic. Both kernels move whole 16-byte packs (each is a pass over every parameter's
// state, memory-bound: the norm reads 2 bytes a parameter in BF16, AdamW reads 14 and writes 14).
constexpr int kNormBlocks = 1024;
// Whole packs in grid-stride order; the n % kPack values past the last pack go to the first threads of block 0.
__global__ void squared_norm_partials_kernel(float* partials, const floatX* grads, size_t n) {
    __shared__ float shared[32];
    float sum = 0.0f;
    const size_t packs = n / kPack;
    GRID_STRIDE_LOOP(i, packs) {
        float g[kPack];
        load_pack(g, grads + i * kPack);
#pragma unroll
        for (int e = 0; e < kPack; e++) sum += g[e] * g[e];
    }
    if (blockIdx.x == 0 && threadIdx.x < n % kPack) {
        const float g = to_f32(grads[packs * kPack + threadIdx.x]);
        sum += g * g;
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// Every trainable tensor in one launch: one block per AdamChunk, a run of at most kAdamChunk values of one tensor
// (adamw_chunks lists them once per model). Chunks start 16-byte aligned (tensors start kTensorAlignment-aligned);
// only a tensor's last chunk may end in a part pack, done value by value.
constexpr int kAdamThreads = 256, kAdamChunk = kAdamThreads * kPack * 4;
struct AdamChunk {
    size_t offset;
    unsigned count;
    unsigned decay;   // 1: weight decay applies (SPEC 3.3: matrices, not biases or LayerNorm)
};
inline std::vector<AdamChunk> adamw_chunks(const TensorTable& table) {
    std::vector<AdamChunk> chunks;
    for (const ParamTensor& t : table.tensors) {
        if (!t.trainable) continue;
        for (size_t start = 0; start < t.numel; start += kAdamChunk)
            chunks.push_back({t.offset + start, (unsigned)std::min<size_t>(kAdamChunk, t.numel - start), t.decay ? 1u : 0u});
    }
    return chunks;
}

// g = grad * grad_scale; m, v moments; p -= lr (m̂ / (√v̂ + eps) + wd p), p the fp32 master value.
__device__ inline void adamw_value(float g, float& m, float& v, float& p, float lr, float bias1, float bias2, float weight_decay) {
    m = kAdamBeta1 * m + (1.0f - kAdamBeta1) * g;
    v = kAdamBeta2 * v + (1.0f - kAdamBeta2) * g * g;
    p -= lr * ((m / bias1) / (sqrtf(v / bias2) + kAdamEps) + weight_decay * p);
}

// master, m, v updated; params = floatX(master). The gradients are scaled by min(1, clip / (norm + 1e-6)),
// norm = √squared_norm; nothing changes when the loss sum or the norm is not finite (the step is skipped).
__global__ void __launch_bounds__(kAdamThreads)
adamw_kernel(floatX* params, float* master, float* m, float* v, const floatX* grads, const AdamChunk* chunks,
             const float* loss_sum, const float* squared_norm, float lr, float clip, float bias1, float bias2, float weight_decay) {
    const float norm = sqrtf(*squared_norm);
    if (!isfinite(*loss_sum) || !isfinite(norm)) return;
    const float grad_scale = fminf(1.0f, clip / (norm + kClipEps));
    const AdamChunk chunk = chunks[blockIdx.x];
    const float decay = chunk.decay ? weight_decay : 0.0f;
    for (unsigned i = threadIdx.x * kPack; i < chunk.count; i += kAdamThreads * kPack) {
        const size_t o = chunk.offset + i;
        if (i + kPack <= chunk.count) {
            float g[kPack], mo[kPack], vo[kPack], p[kPack];
            load_pack(g, grads + o);
            load_floats(mo, m + o);
            load_floats(vo, v + o);
            load_floats(p, master + o);
#pragma unroll
            for (int e = 0; e < kPack; e++) adamw_value(g[e] * grad_scale, mo[e], vo[e], p[e], lr, bias1, bias2, decay);
            store_floats(m + o, mo);
            store_floats(v + o, vo);
            store_floats(master + o, p);
            store_pack(params + o, p);
        } else {
            for (size_t j = o; j < chunk.offset + chunk.count; j++) {
                adamw_value(to_f32(grads[j]) * grad_scale, m[j], v[j], master[j], lr, bias1, bias2, decay);
                params[j] = to_floatX(master[j]);
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------------------------
// A GPT-NeoX stack on the GPU (SPEC 1.1) over nseq independent sequences of S positions: the block decoder
// (nseq = B, S = NB-1 blocks), the token decoder (nseq = B*(NB-1), S = P+LB-1) or the vanilla model (nseq = B, S = T).
// It owns its activations, sized at construction; parameters and gradients are buffers laid out by the table.

// Offsets of one layer's 12 tensors in the parameter (and gradient) buffer.
struct LayerOffsets {
    size_t ln1_w, ln1_b, ln2_w, ln2_b, qkv_w, qkv_b, dense_w, dense_b, fc_w, fc_b, proj_w, proj_b;
};

inline LayerOffsets layer_offsets(const TensorTable& table, const std::string& prefix, int l) {
    const std::string p = prefix + "layers." + std::to_string(l) + ".";
    auto at = [&](const char* name) { return table.get(p + name).offset; };
    return {at("input_layernorm.weight"), at("input_layernorm.bias"), at("post_attention_layernorm.weight"),
            at("post_attention_layernorm.bias"), at("attention.query_key_value.weight"), at("attention.query_key_value.bias"),
            at("attention.dense.weight"), at("attention.dense.bias"), at("mlp.dense_h_to_4h.weight"), at("mlp.dense_h_to_4h.bias"),
            at("mlp.dense_4h_to_h.weight"), at("mlp.dense_4h_to_h.bias")};
}

struct GpuLayerActivations {
    DeviceBuffer<floatX> x;                                     // (n, C) layer input, the residual stream
    DeviceBuffer<floatX> ln1, ln2;                              // (n, C) LN1(x), LN2(x)
    DeviceBuffer<float> x_mean, x_rstd;                         // (n) statistics of x, shared by LN1 and LN2
    DeviceBuffer<floatX> q, k, v;                               // (nseq, NH, S, HS), q and k rotated
    DeviceBuffer<floatX> att;                                   // (n, C) attention output, heads merged
    DeviceBuffer<float> lse;                                    // (nseq, NH, S) flash attention's, else empty
    DeviceBuffer<floatX> fc, fc_gelu;                           // (n, I) before and after GELU
};

// A fixed sequence of GPU work, captured into a CUDA graph and replayed: one graph launch instead of a stack's ~100
// (forward) or ~300 (backward) kernel launches, whose queueing gaps cost ~1-3% of a training step, or of a
// generation's decode step (Generation). A replay does
// what the captured calls did, with the same kernel arguments, so a graph is only valid while nothing they depend
// on changes: the caller's key (the pointers it passes in) and the Gpu's scratch buffers (scratch_generation). The
// first call with a new key or scratch runs as ordinary launches (the scratch grows then, and lazy setup such as
// cuBLASLt plans happens outside a capture); the second captures, later ones replay.
class ReplayedWork {
public:
    ReplayedWork() = default;
    ReplayedWork(const ReplayedWork&) = delete;
    ReplayedWork& operator=(const ReplayedWork&) = delete;
    ~ReplayedWork() { release(); }

    template <typename Enqueue>
    void run(Gpu& gpu, std::vector<const void*> key, Enqueue&& enqueue) {
        key.push_back(&gpu);
        if (key != key_ || generation_ != gpu.scratch_generation()) {
            release();
            enqueue();
            key_ = std::move(key);
            generation_ = gpu.scratch_generation();
            return;
        }
        if (!exec_) {
            cudaGraph_t graph = capture(gpu.stream, enqueue);
            const cudaError_t instantiated = cudaGraphInstantiate(&exec_, graph, 0);
            cudaGraphDestroy(graph);
            cudaCheck(instantiated);
            if (generation_ != gpu.scratch_generation()) {
                release();
                throw std::logic_error("ReplayedWork: scratch reallocated during a capture");
            }
        }
        cudaCheck(cudaGraphLaunch(exec_, gpu.stream));
    }

private:
    cudaGraphExec_t exec_ = nullptr;
    std::vector<const void*> key_;
    uint64_t generation_ = 0;

    void release() {
        if (exec_) cudaGraphExecDestroy(exec_);
        exec_ = nullptr;
    }
    // The work enqueue() puts on stream, as a graph (nothing runs). Relaxed mode: the captured code still makes calls
    // that are not stream work (kernel attributes, tensor maps).
    template <typename Enqueue>
    static cudaGraph_t capture(cudaStream_t stream, Enqueue& enqueue) {
        cudaGraph_t graph = nullptr;
        cudaCheck(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
        try {
            enqueue();
        } catch (...) {
            if (cudaStreamEndCapture(stream, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
            throw;
        }
        cudaCheck(cudaStreamEndCapture(stream, &graph));
        return graph;
    }
};

class GpuStack {
public:
    GpuStack(const StackConfig& config, const std::string& prefix, const TensorTable& table, int nseq, int S)
        : cfg_(config), nseq_(nseq), S_(S), n_((size_t)nseq * S) {
        const size_t C = cfg_.C, I = cfg_.I, n = n_;
        for (int l = 0; l < cfg_.L; l++) {
            offsets_.push_back(layer_offsets(table, prefix, l));
            GpuLayerActivations a;
            a.x = DeviceBuffer<floatX>(n * C);
            a.ln1 = DeviceBuffer<floatX>(n * C);
            a.ln2 = DeviceBuffer<floatX>(n * C);
            a.x_mean = DeviceBuffer<float>(n); a.x_rstd = DeviceBuffer<float>(n);
            a.q = DeviceBuffer<floatX>(n * C); a.k = DeviceBuffer<floatX>(n * C); a.v = DeviceBuffer<floatX>(n * C);
            a.att = DeviceBuffer<floatX>(n * C);
            a.lse = DeviceBuffer<float>(attention_lse_size(nseq, cfg_.NH, S, cfg_.HS()));
            a.fc = DeviceBuffer<floatX>(n * I); a.fc_gelu = DeviceBuffer<floatX>(n * I);
            layers_.push_back(std::move(a));
        }
        final_w_ = table.get(prefix + "final_layer_norm.weight").offset;
        final_b_ = table.get(prefix + "final_layer_norm.bias").offset;
        x_final_ = DeviceBuffer<floatX>(n * C);
        out_ = DeviceBuffer<floatX>(n * C);
        mean_ = DeviceBuffer<float>(n);
        rstd_ = DeviceBuffer<float>(n);
        // scratch shared by the layers
        qkv_ = DeviceBuffer<floatX>(n * 3 * C);
        dqkv_ = DeviceBuffer<floatX>(n * 3 * C);
        branch_a_ = DeviceBuffer<floatX>(n * C);
        branch_b_ = DeviceBuffer<floatX>(n * C);
        dln_ = DeviceBuffer<floatX>(n * C);
        dfc_ = DeviceBuffer<floatX>(n * I);
        dgelu_ = DeviceBuffer<floatX>(n * I);
        attention_ = AttentionScratch(nseq, cfg_.NH, S, cfg_.HS());
        upload_rope_tables(rope_cos_, rope_sin_, S, cfg_.rotary_dims());
    }

    const floatX* out() const { return out_.data(); }   // (n, C) after the final LayerNorm

    // inp: (n, C)   key_mask: (nseq, S), must stay valid until backward.
    // Per layer: x_out = x + dense(attention(LN1(x))) + mlp(LN2(x)) (parallel residual, SPEC 1.1.1).
    void forward(Gpu& gpu, const floatX* inp, const int* key_mask, const floatX* params) {
        key_mask_ = key_mask;
        forward_work_.run(gpu, {inp, key_mask, params}, [&] { enqueue_forward(gpu, inp, key_mask, params); });
    }

    // dout: (n, C) gradient of out()   dinp: (n, C) written   grads: parameter gradients, accumulated.
    void backward(Gpu& gpu, floatX* dinp, const floatX* dout, floatX* grads, const floatX* params) {
        backward_work_.run(gpu, {dinp, dout, grads, params, key_mask_}, [&] { enqueue_backward(gpu, dinp, dout, grads, params); });
    }

private:
    StackConfig cfg_;
    int nseq_, S_;
    size_t n_;
    std::vector<LayerOffsets> offsets_;
    size_t final_w_ = 0, final_b_ = 0;
    std::vector<GpuLayerActivations> layers_;
    DeviceBuffer<floatX> x_final_, out_;
    DeviceBuffer<float> mean_, rstd_;
    DeviceBuffer<float> rope_cos_, rope_sin_;   // (S, rot/2)
    const int* key_mask_ = nullptr;
    // scratch
    DeviceBuffer<floatX> qkv_, dqkv_, branch_a_, branch_b_, dln_, dfc_, dgelu_;
    AttentionScratch attention_;
    ReplayedWork forward_work_, backward_work_;

    void enqueue_forward(Gpu& gpu, const floatX* inp, const int* key_mask, const floatX* params) {
        const int n = (int)n_, C = cfg_.C, I = cfg_.I, NH = cfg_.NH, HS = cfg_.HS();
        cudaCheck(cudaMemcpyAsync(layers_[0].x.data(), inp, n_ * C * sizeof(floatX), cudaMemcpyDeviceToDevice, gpu.stream));
        floatX* attn_out = branch_a_.data();
        floatX* mlp_out = branch_b_.data();
        // x of layer l > 0 (and of the final LayerNorm) is the previous layer's residual sum, formed inside LayerNorm
        auto residual_into = [&](int l, floatX* x) {
            return l == 0 ? LayerNormInput(x) : LayerNormInput(layers_[l - 1].x.data(), attn_out, mlp_out, x);
        };
        for (int l = 0; l < cfg_.L; l++) {
            GpuLayerActivations& a = layers_[l];
            const LayerOffsets& o = offsets_[l];
            const floatX* w = params;
            layernorm_forward({a.ln1.data(), w + o.ln1_w, w + o.ln1_b}, {a.ln2.data(), w + o.ln2_w, w + o.ln2_b},
                              a.x_mean.data(), a.x_rstd.data(), residual_into(l, a.x.data()), n, C, gpu.stream);
            linear_forward(gpu, qkv_.data(), a.ln1.data(), w + o.qkv_w, w + o.qkv_b, n, C, 3 * C);
            rope_split_heads_kernel<<<rope_heads_grid(nseq_, S_, NH, HS), 256, 0, gpu.stream>>>(a.q.data(), a.k.data(), a.v.data(), qkv_.data(),
                rope_cos_.data(), rope_sin_.data(), nseq_, S_, NH, HS, cfg_.rotary_dims());
            cudaCheckLaunch();
            attention_forward(gpu, a.att.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(), key_mask, attention_, nseq_,
                              S_, NH, HS);
            linear_forward(gpu, attn_out, a.att.data(), w + o.dense_w, w + o.dense_b, n, C, C);

            linear_forward(gpu, a.fc.data(), a.ln2.data(), w + o.fc_w, w + o.fc_b, n, C, I);
            gelu_forward(a.fc_gelu.data(), a.fc.data(), n_ * I, gpu.stream);
            linear_forward(gpu, mlp_out, a.fc_gelu.data(), w + o.proj_w, w + o.proj_b, n, I, C);
        }
        layernorm_forward(out_.data(), mean_.data(), rstd_.data(), residual_into(cfg_.L, x_final_.data()), params + final_w_,
                          params + final_b_, n, C, gpu.stream);
    }

    void enqueue_backward(Gpu& gpu, floatX* dinp, const floatX* dout, floatX* grads, const floatX* params) {
        const int n = (int)n_, C = cfg_.C, I = cfg_.I, NH = cfg_.NH, HS = cfg_.HS();
        floatX* dx = dinp;   // the residual stream's gradient, built in place in dinp
        floatX* dx_ln1 = branch_a_.data();
        floatX* dx_ln2 = branch_b_.data();
        layernorm_backward(gpu, dx, grads + final_w_, grads + final_b_, dout, x_final_.data(), params + final_w_,
                           mean_.data(), rstd_.data(), n, C);
        for (int l = cfg_.L - 1; l >= 0; l--) {
            GpuLayerActivations& a = layers_[l];
            const LayerOffsets& o = offsets_[l];
            const floatX* w = params;
            floatX* g = grads;
            // MLP branch: proj -> GELU -> fc -> LN2
            linear_backward(gpu, dgelu_.data(), g + o.proj_w, g + o.proj_b, dx, a.fc_gelu.data(), w + o.proj_w, n, I, C);
            gelu_backward(dfc_.data(), dgelu_.data(), a.fc.data(), n_ * I, gpu.stream);
            linear_backward(gpu, dln_.data(), g + o.fc_w, g + o.fc_b, dfc_.data(), a.ln2.data(), w + o.fc_w, n, C, I);
            layernorm_backward(gpu, dx_ln2, g + o.ln2_w, g + o.ln2_b, dln_.data(), a.x.data(), w + o.ln2_w,
                               a.x_mean.data(), a.x_rstd.data(), n, C);
            // attention branch: dense -> attention -> RoPE + head split -> QKV -> LN1
            // (dln_ holds the attention output's gradient; dq, dk, dv live in the qkv scratch, free in the backward)
            linear_backward(gpu, dln_.data(), g + o.dense_w, g + o.dense_b, dx, a.att.data(), w + o.dense_w, n, C, C);
            floatX* dq = qkv_.data();   // (n, C) each, in the head layout, inside the qkv scratch
            floatX* dk = dq + n_ * C;
            floatX* dv = dk + n_ * C;
            attention_backward(gpu, dq, dk, dv, dln_.data(), a.att.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(),
                               key_mask_, attention_, nseq_, S_, NH, HS);
            floatX* dqkv = dqkv_.data();
            rope_merge_heads_backward_kernel<<<rope_heads_grid(nseq_, S_, NH, HS), 256, 0, gpu.stream>>>(dqkv, dq, dk, dv,
                rope_cos_.data(), rope_sin_.data(), nseq_, S_, NH, HS, cfg_.rotary_dims());
            cudaCheckLaunch();
            linear_backward(gpu, dln_.data(), g + o.qkv_w, g + o.qkv_b, dqkv, a.ln1.data(), w + o.qkv_w, n, C, 3 * C);
            layernorm_backward(gpu, dx_ln1, g + o.ln1_w, g + o.ln1_b, dln_.data(), a.x.data(), w + o.ln1_w,
                               a.x_mean.data(), a.x_rstd.data(), n, C);
            // the residual passes dx through; both branches add theirs
            add3(dx, dx, dx_ln1, dx_ln2, n_ * C, gpu.stream);
        }
    }
};

// ----------------------------------------------------------------------------------------------------------------
// One micro-batch, described on the host with everything the GPU needs precomputed (index lists, masks, buckets),
// so the step itself does no per-token host work. ids, mask: (B, T) as in SPEC 3.5 (block models: mask = attention
// mask, padding slots 0; vanilla models: mask marks the scored targets).
struct BatchPlan {
    int B = 0, T = 0;
    std::vector<int> input_ids;      // block: (B*(NB-1)*LB) ids of blocks 0..NB-2, the embedder's input; vanilla: (B*T)
    std::vector<int> input_mask;     // key mask of the first stack: block (B*(NB-1)) block mask; vanilla (B*T) ones
    std::vector<int> token_ids;      // block: (B*(NB-1), LB-1) y_0..y_{LB-2} of each target block
    std::vector<int> token_mask;     // block: (B*(NB-1), P+LB-1) token-decoder key mask [1 x P, a_0..a_{LB-2}]
    std::vector<int> head_rows;      // (scored) row of the last stack's output that predicts each scored token
    std::vector<int> head_targets;   // (scored) the token it predicts
    std::vector<int> head_positions; // (scored) where that token is in the batch: b*T + t
    Buckets input_buckets;           // embedder (block) / embed_in (vanilla): rows of the first stack's input
    Buckets token_buckets;           // block: token decoder embed_in: rows of the token-decoder input
};

inline BatchPlan plan_batch(const ModelConfig& cfg, int B, int T, const std::vector<int>& ids, const std::vector<int>& mask) {
    if (B <= 0 || T < 2 || ids.size() != (size_t)B * T || mask.size() != ids.size())
        throw std::runtime_error("batch: ids and mask must both be (B, T) with B >= 1, T >= 2");
    for (size_t i = 0; i < ids.size(); i++) {
        if (ids[i] < 0 || ids[i] >= cfg.V)
            throw std::runtime_error("batch: token id " + std::to_string(ids[i]) + " is outside the vocabulary (" + std::to_string(cfg.V) + " rows)");
        if (mask[i] != 0 && mask[i] != 1) throw std::runtime_error("batch: mask values must be 0 or 1");
    }
    BatchPlan plan;
    plan.B = B;
    plan.T = T;
    std::vector<int> input_rows, token_rows;
    if (!cfg.is_block) {
        plan.input_ids = ids;
        plan.input_mask.assign(ids.size(), 1);   // the vanilla stream has no padding
        for (int b = 0; b < B; b++)
            for (int t = 0; t + 1 < T; t++)      // position t predicts token t+1
                if (mask[(size_t)b * T + t + 1]) {
                    plan.head_rows.push_back(b * T + t);
                    plan.head_targets.push_back(ids[(size_t)b * T + t + 1]);
                    plan.head_positions.push_back(b * T + t + 1);
                }
        for (size_t i = 0; i < ids.size(); i++) input_rows.push_back((int)i);
        plan.input_buckets = make_buckets(plan.input_ids, input_rows);
        return plan;
    }
    if (T % cfg.LB != 0 || T / cfg.LB < 2) throw std::runtime_error("batch: T must be a multiple of the block length, >= 2 blocks");
    const int LB = cfg.LB, P = cfg.P, NB = T / LB, S = cfg.token_seq_len();
    auto at = [&](const std::vector<int>& v, int b, int i, int j) { return v[(size_t)b * T + i * LB + j]; };
    for (int b = 0; b < B; b++)
        for (int i = 0; i + 1 < NB; i++) {   // context blocks 0..NB-2 (SPEC 1.4)
            int any_real = 0;
            for (int j = 0; j < LB; j++) {
                input_rows.push_back((int)plan.input_ids.size());
                plan.input_ids.push_back(at(ids, b, i, j));
                any_real |= at(mask, b, i, j);
            }
            plan.input_mask.push_back(any_real);
        }
    for (int b = 0; b < B; b++)
        for (int k = 1; k < NB; k++) {       // target block k, token-decoder row r
            const int r = b * (NB - 1) + k - 1;
            for (int s = 0; s < P; s++) plan.token_mask.push_back(1);
            for (int j = 0; j + 1 < LB; j++) {
                plan.token_ids.push_back(at(ids, b, k, j));
                plan.token_mask.push_back(at(mask, b, k, j));
                token_rows.push_back(r * S + P + j);
            }
            for (int j = 0; j < LB; j++)     // position P-1+j predicts y_j (SPEC 1.5); only real tokens are scored
                if (at(mask, b, k, j)) {
                    plan.head_rows.push_back(r * S + P - 1 + j);
                    plan.head_targets.push_back(at(ids, b, k, j));
                    plan.head_positions.push_back(b * T + k * LB + j);
                }
        }
    plan.input_buckets = make_buckets(plan.input_ids, input_rows);
    plan.token_buckets = make_buckets(plan.token_ids, token_rows);
    return plan;
}

// A BatchPlan's int arrays on the device, sent in one asynchronous copy: they are packed into one pinned host
// buffer and copied on the model's stream, where the copy comes after the previous micro-batch's kernels (which
// read the same device buffer), so the host does not wait for the GPU. The host refills the pinned buffer only once
// its previous copy has finished (an event; by then long done, unless the host runs far ahead).
struct DeviceBuckets {   // a Buckets on the device
    const int* ids = nullptr;
    const int* starts = nullptr;
    const int* rows = nullptr;
    size_t count = 0;
};
class DevicePlan {
public:
    const int* input_ids = nullptr;
    const int* input_mask = nullptr;
    const int* token_ids = nullptr;
    const int* token_mask = nullptr;
    const int* head_rows = nullptr;
    const int* head_targets = nullptr;
    DeviceBuckets input_buckets, token_buckets;

    DevicePlan() { cudaCheck(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming)); }
    DevicePlan(const DevicePlan&) = delete;
    DevicePlan& operator=(const DevicePlan&) = delete;
    ~DevicePlan() { cudaEventDestroy(copied_); }

    void upload(const BatchPlan& plan, cudaStream_t stream) {
        const std::pair<const std::vector<int>*, const int**> arrays[] = {
            {&plan.input_ids, &input_ids}, {&plan.input_mask, &input_mask}, {&plan.token_ids, &token_ids},
            {&plan.token_mask, &token_mask}, {&plan.head_rows, &head_rows}, {&plan.head_targets, &head_targets},
            {&plan.input_buckets.ids, &input_buckets.ids}, {&plan.input_buckets.starts, &input_buckets.starts},
            {&plan.input_buckets.rows, &input_buckets.rows}, {&plan.token_buckets.ids, &token_buckets.ids},
            {&plan.token_buckets.starts, &token_buckets.starts}, {&plan.token_buckets.rows, &token_buckets.rows}};
        size_t total = 0;
        for (const auto& array : arrays) total += array.first->size();
        cudaCheck(cudaEventSynchronize(copied_));
        if (host_.size() < total) {   // the first plan, or a larger one (freeing device_ waits for its readers)
            host_ = PinnedBuffer<int>(total);
            device_ = DeviceBuffer<int>(total);
        }
        size_t offset = 0;
        for (const auto& array : arrays) {
            std::copy(array.first->begin(), array.first->end(), host_.data() + offset);
            *array.second = device_.data() + offset;
            offset += array.first->size();
        }
        input_buckets.count = plan.input_buckets.ids.size();
        token_buckets.count = plan.token_buckets.ids.size();
        if (total > 0) cudaCheck(cudaMemcpyAsync(device_.data(), host_.data(), total * sizeof(int), cudaMemcpyHostToDevice, stream));
        cudaCheck(cudaEventRecord(copied_, stream));
    }

private:
    PinnedBuffer<int> host_;
    DeviceBuffer<int> device_;
    cudaEvent_t copied_ = nullptr;
};

inline void embedding_backward(floatX* dtable, const floatX* dsrc, const DeviceBuckets& buckets, int C, cudaStream_t stream) {
    if (buckets.count == 0) return;
    embedding_backward_kernel<<<(unsigned)buckets.count, 256, 0, stream>>>(dtable, dsrc, buckets.ids, buckets.starts, buckets.rows, C);
    cudaCheckLaunch();
}

// AdamW hyperparameters that a run may change (SPEC 3.3 defaults); betas and eps stay those of model.h.
struct AdamWSettings {
    float lr = 0.0f;
    float weight_decay = kWeightDecay;
    float clip = kGradClip;
};

// ----------------------------------------------------------------------------------------------------------------
// The model on one GPU: one buffer per role, laid out by the tensor table (SPEC section 10.5 numerics):
//   params (floatX, what kernels read), master (fp32), grads (floatX, trainable prefix), adam_m, adam_v (fp32).
// forward() also runs the LM head's backward when it is asked for gradients (the fused classifier: logits are made
// chunk by chunk and never exist for the whole batch), backward() the rest.
class GpuModel {
public:
    ModelConfig cfg;
    TensorTable table;
    Gpu gpu;
    DeviceBuffer<floatX> params;   // (num_params)
    DeviceBuffer<float> master;    // (num_params)
    DeviceBuffer<floatX> grads;    // (num_trainable)
    DeviceBuffer<float> adam_m, adam_v;   // (num_trainable)
    int adam_steps = 0;
    bool keep_logits = false;      // copy every scored row's logits to host_logits (tests, infer --dump-logits)
    std::vector<float> host_logits;   // (scored, V) when keep_logits

    // Activations are sized for micro-batches of B sequences of T tokens. Scoring (forward only, infer --score) skips
    // the training state: master weights, gradients and AdamW moments (14 bytes per parameter).
    enum class Use { Training, Scoring };
    GpuModel(const ModelConfig& config, int B, int T, Use use = Use::Training)
        : cfg(config), table(build_tensor_table(config)), params(table.num_params), training_(use == Use::Training), B_(B), T_(T) {
        if (training_) {
            master = DeviceBuffer<float>(table.num_params);
            grads = DeviceBuffer<floatX>(table.num_trainable);
            adam_m = DeviceBuffer<float>(table.num_trainable);
            adam_v = DeviceBuffer<float>(table.num_trainable);
            const std::vector<AdamChunk> chunks = adamw_chunks(table);
            adam_chunks_ = DeviceBuffer<AdamChunk>(chunks.size());
            adam_chunks_.upload(chunks.data(), chunks.size());
        }
        if (cfg.is_block) {
            if (T % cfg.LB != 0 || T / cfg.LB < 2) throw std::runtime_error("GpuModel: T must be a multiple of the block length, >= 2 blocks");
            const int rows = B * (T / cfg.LB - 1), S = cfg.token_seq_len();
            block_stack_ = std::make_unique<GpuStack>(cfg.block_decoder, "block_decoder.gpt_neox.", table, B, T / cfg.LB - 1);
            token_stack_ = std::make_unique<GpuStack>(cfg.token_decoder, "token_decoder.gpt_neox.", table, rows, S);
            first_input_ = DeviceBuffer<floatX>((size_t)rows * cfg.block_decoder.C);
            dfirst_input_ = DeviceBuffer<floatX>((size_t)rows * cfg.block_decoder.C);
            dcontext_ = DeviceBuffer<floatX>((size_t)rows * cfg.block_decoder.C);
            prefix_ = DeviceBuffer<floatX>((size_t)rows * cfg.P * cfg.token_decoder.C);
            dprefix_ = DeviceBuffer<floatX>((size_t)rows * cfg.P * cfg.token_decoder.C);
            top_input_ = DeviceBuffer<floatX>((size_t)rows * S * cfg.token_decoder.C);
            dtop_input_ = DeviceBuffer<floatX>((size_t)rows * S * cfg.token_decoder.C);
            dtop_out_ = DeviceBuffer<floatX>((size_t)rows * S * cfg.token_decoder.C);
            top_rows_ = (size_t)rows * S;
        } else {
            token_stack_ = std::make_unique<GpuStack>(cfg.token_decoder, "gpt_neox.", table, B, T);
            dtop_input_ = DeviceBuffer<floatX>((size_t)B * T * cfg.token_decoder.C);
            dtop_out_ = DeviceBuffer<floatX>((size_t)B * T * cfg.token_decoder.C);
            top_rows_ = (size_t)B * T;
        }
        const size_t HT = cfg.token_decoder.C, max_scored = (size_t)B * T;
        head_in_ = DeviceBuffer<floatX>(max_scored * HT);
        dhead_ = DeviceBuffer<floatX>(max_scored * HT);
        losses_ = DeviceBuffer<float>(max_scored);
        const size_t chunk = std::min<size_t>(max_scored, kHeadChunkRows);
        logits_ = DeviceBuffer<floatX>(chunk * cfg.V);
        dlogits_ = DeviceBuffer<floatX>(chunk * cfg.V);
        scalars_ = DeviceBuffer<float>(kNormPartials + kNormBlocks);
        cudaCheck(cudaMemsetAsync(scalars_.data(), 0, scalars_.size() * sizeof(float), gpu.stream));
    }

    // host: (num_params) fp32 laid out by the table: the master weights, and params rounded from them.
    void load_parameters(const std::vector<float>& host) {
        if (host.size() != table.num_params) throw std::runtime_error("load_parameters: expected one value per table element");
        if (!training_) {
            upload_as_floatX(params.data(), host);
            return;
        }
        master.upload(host.data(), host.size());
        convert_to_floatX(params.data(), master.data(), host.size(), gpu.stream);
        cudaCheck(cudaStreamSynchronize(gpu.stream));
    }

    // A training step is zero_grad(), forward() and backward() for each micro-batch, update(), then finish(): every
    // call but finish() only enqueues work on the stream, so the GPU never waits for the host within a step.

    void zero_grad() { cudaCheck(cudaMemsetAsync(grads.data(), 0, grads.size() * sizeof(floatX), gpu.stream)); }

    // Enqueues the forward of a micro-batch: the mean cross-entropy of its scored tokens is added to the loss sum that
    // finish() reads. With grad_scale > 0 (training) it also computes the LM head's gradients for a loss scaled by
    // grad_scale (1 / accumulation steps); backward() then does the rest.
    void forward(const BatchPlan& plan, float grad_scale) {
        if (plan.B != B_ || plan.T != T_) throw std::runtime_error("GpuModel::forward: batch shape differs from the model's");
        if (grad_scale > 0 && !training_) throw std::runtime_error("GpuModel::forward: a scoring model has no gradients");
        batch_.upload(plan, gpu.stream);
        scored_ = plan.head_rows.size();
        const int HT = cfg.token_decoder.C;
        if (cfg.is_block) {
            const int rows = plan.B * (plan.T / cfg.LB - 1), DB = cfg.block_decoder.C, DE = cfg.DE, P = cfg.P, S = cfg.token_seq_len();
            // embedder (SPEC 1.2): (rows*LB, DE) rows of the table are (rows, DB) concatenated block embeddings
            gather_rows(first_input_.data(), param("embedder.embeddings.weight"), batch_.input_ids, (size_t)rows * cfg.LB, DE, gpu.stream);
            block_stack_->forward(gpu, first_input_.data(), batch_.input_mask, params.data());
            linear_forward(gpu, prefix_.data(), block_stack_->out(), param("token_decoder.expansion_layer.weight"),
                           param("token_decoder.expansion_layer.bias"), rows, DB, P * HT);
            token_input_kernel<<<grid_for(top_rows_ * HT, 256), 256, 0, gpu.stream>>>(top_input_.data(), prefix_.data(),
                param("token_decoder.gpt_neox.embed_in.weight"), batch_.token_ids, rows, S, P, HT);
            cudaCheckLaunch();
            token_stack_->forward(gpu, top_input_.data(), batch_.token_mask, params.data());
        } else {
            floatX* embedded = dtop_out_.data();   // free until backward; holds the embeddings during forward
            gather_rows(embedded, param("gpt_neox.embed_in.weight"), batch_.input_ids, top_rows_, HT, gpu.stream);
            token_stack_->forward(gpu, embedded, batch_.input_mask, params.data());
        }
        head(grad_scale);
    }

    // grads += d(loss * grad_scale)/d(params) for the last forward (called with grad_scale > 0).
    void backward() {
        const int HT = cfg.token_decoder.C;
        cudaCheck(cudaMemsetAsync(dtop_out_.data(), 0, top_rows_ * HT * sizeof(floatX), gpu.stream));
        scatter_rows(dtop_out_.data(), dhead_.data(), batch_.head_rows, scored_, HT, gpu.stream);
        token_stack_->backward(gpu, dtop_input_.data(), dtop_out_.data(), grads.data(), params.data());
        if (!cfg.is_block) {
            embedding_backward(grad("gpt_neox.embed_in.weight"), dtop_input_.data(), batch_.input_buckets, HT, gpu.stream);
            return;
        }
        const int rows = B_ * (T_ / cfg.LB - 1), DB = cfg.block_decoder.C, P = cfg.P, S = cfg.token_seq_len();
        token_input_backward_kernel<<<grid_for((size_t)rows * P * HT, 256), 256, 0, gpu.stream>>>(dprefix_.data(), dtop_input_.data(), rows, S, P, HT);
        cudaCheckLaunch();
        embedding_backward(grad("token_decoder.gpt_neox.embed_in.weight"), dtop_input_.data(), batch_.token_buckets, HT, gpu.stream);
        linear_backward(gpu, dcontext_.data(), grad("token_decoder.expansion_layer.weight"), grad("token_decoder.expansion_layer.bias"),
                        dprefix_.data(), block_stack_->out(), param("token_decoder.expansion_layer.weight"), rows, DB, P * HT);
        block_stack_->backward(gpu, dfirst_input_.data(), dcontext_.data(), grads.data(), params.data());
        embedding_backward(grad("embedder.embeddings.weight"), dfirst_input_.data(), batch_.input_buckets, cfg.DE, gpu.stream);
    }

    // Enqueues one AdamW update of every trainable tensor (SPEC 3.3), the gradients scaled by
    // min(1, clip / (norm + 1e-6)) with norm their global L2 norm (deterministic). The clip coefficient is formed
    // on the GPU, and the update is skipped there, leaving weights and moments as they were, when the loss sum of
    // the forwards since the last finish() or the norm is not finite.
    void update(const AdamWSettings& settings) {
        if (!training_) throw std::runtime_error("GpuModel::update: a scoring model has no optimizer state");
        float* squared_norm = scalars_.data() + kSquaredNorm;
        squared_norm_partials_kernel<<<kNormBlocks, 256, 0, gpu.stream>>>(scalars_.data() + kNormPartials, grads.data(), table.num_trainable);
        cudaCheckLaunch();
        sum_kernel<<<1, 1024, 0, gpu.stream>>>(squared_norm, scalars_.data() + kNormPartials, kNormBlocks, 1.0f, false);
        cudaCheckLaunch();
        const int step = adam_steps + 1;   // counted by finish() once the update is known to have been applied
        const float bias1 = 1.0f - std::pow(kAdamBeta1, (float)step), bias2 = 1.0f - std::pow(kAdamBeta2, (float)step);
        update_enqueued_ = true;
        if (adam_chunks_.size() == 0) return;   // nothing trainable
        adamw_kernel<<<(unsigned)adam_chunks_.size(), kAdamThreads, 0, gpu.stream>>>(params.data(), master.data(), adam_m.data(),
            adam_v.data(), grads.data(), adam_chunks_.data(), scalars_.data() + kLossSum, squared_norm, settings.lr,
            settings.clip, bias1, bias2, settings.weight_decay);
        cudaCheckLaunch();
    }

    // Waits for the GPU (the one synchronisation of a training step). loss: the mean of the micro-batch losses of the
    // forwards since the last finish(); norm: the gradient norm of update() before clipping (NaN without an update).
    // updated: whether the update was applied (both finite). Starts a new loss sum.
    struct Finished {
        float loss, norm;
        bool updated;
    };
    Finished finish() {
        cudaCheck(cudaMemcpyAsync(finished_.data(), scalars_.data(), 2 * sizeof(float), cudaMemcpyDeviceToHost, gpu.stream));
        cudaCheck(cudaMemsetAsync(scalars_.data() + kLossSum, 0, sizeof(float), gpu.stream));
        cudaCheck(cudaStreamSynchronize(gpu.stream));
        Finished result{forwards_ > 0 ? finished_.data()[kLossSum] / forwards_ : NAN,
                        update_enqueued_ ? std::sqrt(finished_.data()[kSquaredNorm]) : NAN, false};
        result.updated = update_enqueued_ && std::isfinite(finished_.data()[kLossSum]) && std::isfinite(result.norm);
        if (result.updated) adam_steps++;
        forwards_ = 0;
        update_enqueued_ = false;
        return result;
    }

    // The cross-entropy of each scored token of the last forward, in the plan's head order (plan.head_positions).
    std::vector<float> token_losses() const {
        std::vector<float> host(scored_);
        if (scored_ > 0) losses_.download(host.data(), scored_);
        return host;
    }

    floatX* param(const std::string& name) { return params.data() + table.get(name).offset; }
    floatX* grad(const std::string& name) {
        const ParamTensor& t = table.get(name);
        if (!t.trainable) throw std::runtime_error("no gradient for the untrained tensor " + name);
        return grads.data() + t.offset;
    }

private:
    static constexpr size_t kHeadChunkRows = 4096;   // logits of at most 4096 rows exist at once (V=50304: 0.4 GB bf16)
    bool training_;
    int B_, T_;
    std::unique_ptr<GpuStack> block_stack_, token_stack_;   // vanilla: token_stack_ is the whole model
    size_t top_rows_ = 0;   // rows of the last stack's output
    DeviceBuffer<floatX> first_input_, dfirst_input_;   // block: (rows, DB) block embeddings and their gradient
    DeviceBuffer<floatX> dcontext_;                     // block: (rows, DB) gradient of the block decoder's output
    DeviceBuffer<floatX> prefix_, dprefix_;             // block: (rows, P*HT)
    DeviceBuffer<floatX> top_input_, dtop_input_, dtop_out_;   // (top_rows, HT)
    DeviceBuffer<floatX> head_in_, dhead_;              // (scored, HT)
    DeviceBuffer<float> losses_;                        // (scored)
    DeviceBuffer<floatX> logits_, dlogits_;             // (chunk, V)
    // scalars_: [kLossSum] the forwards' loss sum, [kSquaredNorm] the squared gradient norm, then the norm's
    // partial sums; finish() reads the first two (through finished_).
    static constexpr int kLossSum = 0, kSquaredNorm = 1, kNormPartials = 2;
    DeviceBuffer<float> scalars_;
    PinnedBuffer<float> finished_{2};
    int forwards_ = 0;                                  // forwards since the last finish()
    bool update_enqueued_ = false;                      // update() since the last finish()
    DeviceBuffer<AdamChunk> adam_chunks_;               // training: adamw_chunks(table)
    DevicePlan batch_;                                  // the last forward's micro-batch
    size_t scored_ = 0;                                 // its scored tokens

    // LM head + cross-entropy over the scored rows, chunk by chunk; with gradients, dhead and embed_out's gradient.
    // The mean loss is added to the loss sum.
    void head(float grad_scale) {
        const int HT = cfg.token_decoder.C, V = cfg.V;
        const char* embed_out_name = cfg.is_block ? "token_decoder.embed_out.weight" : "embed_out.weight";
        const floatX* embed_out = param(embed_out_name);
        if (keep_logits) host_logits.resize(scored_ * V);
        forwards_++;
        if (scored_ == 0) return;   // a loss of 0
        gather_rows(head_in_.data(), token_stack_->out(), batch_.head_rows, scored_, HT, gpu.stream);
        const float dloss = grad_scale / (float)scored_;
        for (size_t start = 0; start < scored_; start += kHeadChunkRows) {
            const int count = (int)std::min(kHeadChunkRows, scored_ - start);
            const floatX* h = head_in_.data() + start * HT;
            linear_forward(gpu, logits_.data(), h, embed_out, nullptr, count, HT, V);
            cross_entropy(grad_scale > 0 ? dlogits_.data() : nullptr, losses_.data() + start, logits_.data(),
                          batch_.head_targets + start, count, V, dloss, gpu.stream);
            if (keep_logits) download_as_floats(host_logits.data() + start * V, logits_.data(), (size_t)count * V, gpu.stream);
            if (grad_scale > 0)
                linear_backward(gpu, dhead_.data() + start * HT, grad(embed_out_name), nullptr, dlogits_.data(), h, embed_out, count, HT, V);
        }
        sum_kernel<<<1, 1024, 0, gpu.stream>>>(scalars_.data() + kLossSum, losses_.data(), scored_, 1.0f / (float)scored_, true);
        cudaCheckLaunch();
    }
};

// ----------------------------------------------------------------------------------------------------------------
// Checkpoints (SPEC section 10.1). A checkpoint is a directory:
//   model.safetensors      every tensor of the table under its original key, bf16 (what the PyTorch code loads)
//   config.json            the model shape
//   optimizer.safetensors  fp32 master weights and AdamW moments, flat as the table lays them out; its metadata
//                          holds the step, the AdamW step count and the caller's resume state (data position, ...)
// It is written as DIR.tmp and renamed to DIR when complete: a crash never leaves a half-written DIR.

inline std::string config_to_json(const ModelConfig& c) {
    auto stack = [](const StackConfig& s) {
        return "{\"layers\": " + std::to_string(s.L) + ", \"hidden\": " + std::to_string(s.C) + ", \"heads\": " +
               std::to_string(s.NH) + ", \"intermediate\": " + std::to_string(s.I) + "}";
    };
    std::string json = "{\n  \"blocktf_config\": " + loader_detail::json_quote(c.name) + ",\n  \"model_type\": \"" +
                       (c.is_block ? "block_transformer" : "gpt_neox") + "\",\n  \"vocab_size\": " + std::to_string(c.V) +
                       ",\n  \"seq_len\": " + std::to_string(c.T) + ",\n";
    if (c.is_block)
        json += "  \"block_length\": " + std::to_string(c.LB) + ",\n  \"prefix_length\": " + std::to_string(c.P) +
                ",\n  \"embedder_width\": " + std::to_string(c.DE) + ",\n  \"block_decoder\": " + stack(c.block_decoder) + ",\n";
    json += "  \"token_decoder\": " + stack(c.token_decoder) + "\n}\n";
    return json;
}

inline ModelConfig config_from_json(const JsonValue& json, const std::string& where) {
    auto number = [&](const JsonValue& object, const char* key) {
        const JsonValue* v = object.find(key);
        if (!v || v->type != JsonValue::Type::Number || v->number != (int)v->number || v->number <= 0)
            throw std::runtime_error(where + ": \"" + key + "\" must be a positive integer");
        return (int)v->number;
    };
    auto stack = [&](const char* key) {
        const JsonValue* s = json.find(key);
        if (!s || s->type != JsonValue::Type::Object) throw std::runtime_error(where + ": \"" + key + "\" must be an object");
        return StackConfig{number(*s, "layers"), number(*s, "hidden"), number(*s, "heads"), number(*s, "intermediate")};
    };
    const JsonValue* name = json.find("blocktf_config");
    const JsonValue* type = json.find("model_type");
    if (!type || type->type != JsonValue::Type::String || (type->string != "block_transformer" && type->string != "gpt_neox"))
        throw std::runtime_error(where + ": \"model_type\" must be \"block_transformer\" or \"gpt_neox\"");
    ModelConfig c;
    c.name = name && name->type == JsonValue::Type::String ? name->string : "checkpoint";
    c.is_block = type->string == "block_transformer";
    c.V = number(json, "vocab_size");
    c.T = number(json, "seq_len");
    if (c.is_block) {
        c.LB = number(json, "block_length");
        c.P = number(json, "prefix_length");
        c.DE = number(json, "embedder_width");
        c.block_decoder = stack("block_decoder");
    }
    c.token_decoder = stack("token_decoder");
    // training defaults of the named config of the same name, if there is one
    for (const ModelConfig& named : named_configs())
        if (named.name == c.name) c.train = named.train;
    validate_config(c);
    return c;
}

inline std::string read_text_file(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) throw std::runtime_error("cannot open " + path);
    return std::string(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

inline void write_text_file_atomically(const std::string& path, const std::string& text) {
    const std::string temporary = path + ".tmp";
    {
        std::ofstream file(temporary, std::ios::binary | std::ios::trunc);
        file << text;
        if (!file.flush()) throw std::runtime_error("cannot write " + temporary);
    }
    std::filesystem::rename(temporary, path);
}

// A HuggingFace GPTNeoXForCausalLM config.json (a Pythia model saved with save_pretrained, SPEC 6.2). Only the
// GPT-NeoX variant blocktf implements is accepted; anything else is named.
inline ModelConfig config_from_hf_gpt_neox(const JsonValue& json, const std::string& where) {
    auto value = [&](const char* key) -> const JsonValue& {
        const JsonValue* v = json.find(key);
        if (!v) throw std::runtime_error(where + ": \"" + key + "\" is missing");
        return *v;
    };
    auto integer = [&](const char* key) {
        const JsonValue& v = value(key);
        if (v.type != JsonValue::Type::Number || v.number != (int)v.number || v.number <= 0)
            throw std::runtime_error(where + ": \"" + key + "\" must be a positive integer");
        return (int)v.number;
    };
    auto require = [&](bool ok, const std::string& what) {
        if (!ok) throw std::runtime_error(where + ": unsupported GPT-NeoX variant: " + what);
    };
    const JsonValue* rotary = json.find("rotary_pct");
    const JsonValue* parallel = json.find("use_parallel_residual");
    const JsonValue* act = json.find("hidden_act");
    const JsonValue* tied = json.find("tie_word_embeddings");
    require(!rotary || (rotary->type == JsonValue::Type::Number && rotary->number == 0.25), "rotary_pct must be 0.25");
    require(!parallel || (parallel->type == JsonValue::Type::Bool && parallel->boolean), "use_parallel_residual must be true");
    require(!act || (act->type == JsonValue::Type::String && act->string == "gelu"), "hidden_act must be \"gelu\" (exact erf)");
    require(!tied || (tied->type == JsonValue::Type::Bool && !tied->boolean), "tie_word_embeddings must be false");
    ModelConfig c;
    c.name = "imported_gpt_neox";
    c.V = integer("vocab_size");
    c.T = std::min(integer("max_position_embeddings"), kTrainSeqLen);
    c.token_decoder = StackConfig{integer("num_hidden_layers"), integer("hidden_size"), integer("num_attention_heads"),
                                  integer("intermediate_size")};
    for (const ModelConfig& named : named_configs())   // a known shape keeps its name and training settings
        if (!named.is_block && named.V == c.V && named.token_decoder.L == c.token_decoder.L && named.token_decoder.C == c.token_decoder.C &&
            named.token_decoder.NH == c.token_decoder.NH && named.token_decoder.I == c.token_decoder.I)
            return named;
    validate_config(c);
    return c;
}

// Where a checkpoint's files are: a directory holding model.safetensors (and config.json unless it is a released
// block checkpoint), or the .safetensors file itself.
struct CheckpointFiles {
    std::string dir;       // holds config.json, if any
    std::string weights;   // the model's .safetensors
};
inline CheckpointFiles locate_checkpoint(const std::string& path) {
    namespace fs = std::filesystem;
    if (fs::is_regular_file(path)) return {fs::path(path).parent_path().string(), path};
    if (fs::is_directory(path) && fs::exists(fs::path(path) / "model.safetensors")) return {path, (fs::path(path) / "model.safetensors").string()};
    throw std::runtime_error(path + ": not a checkpoint (neither a .safetensors file nor a directory holding model.safetensors)");
}

// The model shape of a checkpoint: blocktf's config.json, a HuggingFace GPT-NeoX config.json, or for a released
// block checkpoint without one, inferred from the tensor shapes (SPEC 6.1; the result is printed to stderr).
inline ModelConfig read_checkpoint_config(const std::string& path) {
    namespace fs = std::filesystem;
    const CheckpointFiles files = locate_checkpoint(path);
    const std::string config_path = (fs::path(files.dir) / "config.json").string();
    if (fs::exists(config_path)) {
        JsonValue json = parse_json(read_text_file(config_path));
        if (json.type != JsonValue::Type::Object) throw std::runtime_error(config_path + ": not a JSON object");
        return json.find("blocktf_config") ? config_from_json(json, config_path) : config_from_hf_gpt_neox(json, config_path);
    }
    SafetensorsFile weights = SafetensorsFile::open(files.weights);
    if (weights.find("gpt_neox.embed_in.weight"))
        throw std::runtime_error(files.weights + " is a vanilla GPT-NeoX checkpoint without config.json: its head count is not "
                                 "stored in the weights; put the model's HuggingFace config.json beside it");
    std::vector<std::pair<std::string, std::vector<size_t>>> shapes;
    for (const SafeTensor& t : weights.tensors()) shapes.push_back({t.name, std::vector<size_t>(t.shape.begin(), t.shape.end())});
    ModelConfig c = infer_block_config(shapes);
    std::fprintf(stderr, "%s has no config.json; inferred from the tensor shapes: %s, LB %d, P %d, DE %d, block decoder %d x %d "
                         "(%d heads), token decoder %d x %d (%d heads), V %d\n", files.weights.c_str(), c.name.c_str(), c.LB, c.P,
                 c.DE, c.block_decoder.L, c.block_decoder.C, c.block_decoder.NH, c.token_decoder.L, c.token_decoder.C,
                 c.token_decoder.NH, c.V);
    return c;
}

struct CheckpointState {
    long step = 0;                                  // optimizer updates done
    std::map<std::string, std::string> resume;      // the trainer's state: data position, options, ...
};

inline void save_checkpoint(GpuModel& model, const std::string& dir, const CheckpointState& state) {
    namespace fs = std::filesystem;
    const TensorTable& table = model.table;
    std::vector<float> master(table.num_params), m(table.num_trainable), v(table.num_trainable);
    model.master.download(master.data(), master.size());
    model.adam_m.download(m.data(), m.size());
    model.adam_v.download(v.data(), v.size());
    std::vector<uint16_t> weights(table.num_params);
    for (size_t i = 0; i < weights.size(); i++) weights[i] = float_to_bf16(master[i]);

    const std::string temporary = dir + ".tmp";
    fs::remove_all(temporary);
    fs::create_directories(temporary);
    std::vector<TensorToWrite> tensors;
    for (const ParamTensor& t : table.tensors)
        tensors.push_back({t.name, DType::BF16, std::vector<int64_t>(t.shape.begin(), t.shape.end()), weights.data() + t.offset});
    write_safetensors(temporary + "/model.safetensors", tensors, {{"format", "pt"}});
    write_text_file_atomically(temporary + "/config.json", config_to_json(model.cfg));
    std::map<std::string, std::string> metadata = state.resume;
    metadata["step"] = std::to_string(state.step);
    metadata["adam_steps"] = std::to_string(model.adam_steps);
    metadata["precision"] = kPrecisionName;
    write_safetensors(temporary + "/optimizer.safetensors",
                      {{"master", DType::F32, {(int64_t)master.size()}, master.data()},
                       {"adam_m", DType::F32, {(int64_t)m.size()}, m.data()},
                       {"adam_v", DType::F32, {(int64_t)v.size()}, v.data()}},
                      metadata);
    if (fs::exists(dir)) {   // re-saving a step: swap the old one out only once the new one is complete
        fs::remove_all(dir + ".old");
        fs::rename(dir, dir + ".old");
        fs::rename(temporary, dir);
        fs::remove_all(dir + ".old");
    } else {
        fs::rename(temporary, dir);
    }
}

// Buffers that 2023 Pythia checkpoints saved next to the weights (SPEC 6.2): the causal mask, masked_bias and the
// rotary inv_freq. blocktf recomputes what they hold, so they are skipped.
inline bool is_ignored_buffer(const std::string& name) {
    for (const char* suffix : {".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"})
        if (name.size() > std::strlen(suffix) && name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) == 0)
            return true;
    return false;
}

// The weights of a checkpoint (every tensor of the model's table, by name and shape) as fp32, laid out by the table.
inline std::vector<float> read_checkpoint_weights(const SafetensorsFile& file, const TensorTable& table) {
    std::vector<float> host(table.num_params, 0.0f);
    std::string problems;
    for (const ParamTensor& t : table.tensors) {
        const SafeTensor* stored = file.find(t.name);
        if (!stored) {
            problems += "\n  missing tensor " + t.name;
            continue;
        }
        if (std::vector<size_t>(stored->shape.begin(), stored->shape.end()) != t.shape) {
            problems += "\n  tensor " + t.name + " has shape " + loader_detail::format_shape(stored->shape) + ", the config needs " +
                        loader_detail::format_shape(std::vector<int64_t>(t.shape.begin(), t.shape.end()));
            continue;
        }
        std::vector<float> values = file.read_f32(t.name);
        std::copy(values.begin(), values.end(), host.begin() + t.offset);
    }
    for (const SafeTensor& stored : file.tensors())
        if (!table.find(stored.name) && !is_ignored_buffer(stored.name)) problems += "\n  unexpected tensor " + stored.name;
    if (!problems.empty()) throw std::runtime_error(file.path() + " does not fit the model:" + problems);
    return host;
}

// Loads a checkpoint's weights, and with with_optimizer its exact fp32 master weights and AdamW state too.
inline CheckpointState load_checkpoint(GpuModel& model, const std::string& dir, bool with_optimizer) {
    const TensorTable& table = model.table;
    CheckpointState state;
    if (!with_optimizer) {
        model.load_parameters(read_checkpoint_weights(SafetensorsFile::open(locate_checkpoint(dir).weights), table));
        return state;
    }
    SafetensorsFile optimizer = SafetensorsFile::open(dir + "/optimizer.safetensors");
    std::vector<float> master = optimizer.read_f32("master"), m = optimizer.read_f32("adam_m"), v = optimizer.read_f32("adam_v");
    if (master.size() != table.num_params || m.size() != table.num_trainable || v.size() != table.num_trainable)
        throw std::runtime_error(optimizer.path() + ": optimizer state has the wrong size for this model");
    model.load_parameters(master);
    model.adam_m.upload(m.data(), m.size());
    model.adam_v.upload(v.data(), v.size());
    state.resume = optimizer.metadata();
    auto integer = [&](const char* key) {
        auto it = state.resume.find(key);
        if (it == state.resume.end()) throw std::runtime_error(optimizer.path() + ": metadata lacks \"" + key + "\"");
        return std::stol(it->second);
    };
    state.step = integer("step");
    model.adam_steps = (int)integer("adam_steps");
    return state;
}

// The newest complete checkpoint-<step> directory under out_dir, or "" when there is none.
inline std::string latest_checkpoint(const std::string& out_dir) {
    namespace fs = std::filesystem;
    std::string best;
    long best_step = -1;
    if (!fs::is_directory(out_dir)) return best;
    for (const fs::directory_entry& entry : fs::directory_iterator(out_dir)) {
        const std::string name = entry.path().filename().string();
        if (name.rfind("checkpoint-", 0) != 0 || name.find('.') != std::string::npos) continue;
        char* end = nullptr;
        long step = std::strtol(name.c_str() + 11, &end, 10);
        if (*end != '\0' || step <= best_step) continue;
        if (!fs::exists(entry.path() / "model.safetensors") || !fs::exists(entry.path() / "optimizer.safetensors")) continue;
        best_step = step;
        best = entry.path().string();
    }
    return best;
}

inline void print_device_info() {
    int device = 0;
    cudaDeviceProp prop;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaGetDeviceProperties(&prop, device));
    std::printf("device: %s, compute capability %d.%d, %d SMs, %.1f GiB; built for PRECISION=%s\n", prop.name, prop.major,
                prop.minor, prop.multiProcessorCount, prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), kPrecisionName);
}

// ================================================================================================================
// Generation: KV caches and cached decoding (issue 6)
// ================================================================================================================
// Cached generation (SPEC 5.1, with the training positions of SPEC 10.3):
//   block model: prompts are left-padded (id 0, mask 0) to one common block boundary; the prefill runs every
//     prompt block through the embedder and the block decoder (cache over blocks, positions 0.. counting pad
//     blocks, key mask any(mask) per block). Then per block: expansion of the newest block-decoder output into P
//     prefix vectors, the token decoder's local generation of LB tokens with its own cache of P+LB-1 positions
//     (rewritten every block: prefix at 0..P-1, token j at P+j, keys all visible), embedding of the new block and
//     one block-decoder step.
//   vanilla model: prompts are left-padded to one common length (pads masked as keys, rotary positions shifted per
//     row so that a row's first real token is at 0, as HF does); prefill, then one token per step.
// A row that emits <|endoftext|> keeps being computed (its later ids are ignored); the host stops launching steps
// once every row has stopped. Every buffer is allocated before the first step. A decode step (a block for the
// block model, a token for vanilla) is captured once into a CUDA graph and replayed; what changes between steps
// (the position in the main cache, the output column) lives in two device counters that the step advances itself,
// so the host never waits for a token: it polls events to stream the ids out of pinned memory.

// ----------------------------------------------------------------------------------------------------------------
// Weights for inference: the parameter buffer of the tensor table, without any training state.
struct InferenceModel {
    ModelConfig cfg;
    TensorTable table;
    DeviceBuffer<floatX> params;   // (num_params)

    explicit InferenceModel(const ModelConfig& config)
        : cfg(config), table(build_tensor_table(config)), params(table.num_params) {}

    // host: (num_params) fp32 laid out by the table.
    void load(const std::vector<float>& host) {
        if (host.size() != table.num_params) throw std::runtime_error("InferenceModel::load: expected one value per table element");
        upload_as_floatX(params.data(), host);
    }
    const floatX* param(const std::string& name) const { return params.data() + table.get(name).offset; }
};

// What --checkpoint names: a checkpoint (a directory holding model.safetensors, or the .safetensors file) or a
// training output directory, whose newest complete checkpoint-<step>/ is taken. Throws saying what was expected.
inline std::string resolve_checkpoint(const std::string& path) {
    namespace fs = std::filesystem;
    if (!fs::exists(path)) throw std::runtime_error("checkpoint '" + path + "' does not exist");
    if (fs::is_directory(path) && !fs::exists(fs::path(path) / "model.safetensors")) {
        const std::string latest = latest_checkpoint(path);
        if (latest.empty())
            throw std::runtime_error("no checkpoint in '" + path + "': it holds neither model.safetensors nor a complete "
                                     "checkpoint-<step>/ directory");
        return latest;
    }
    return path;
}

// Weights and shape (read_checkpoint_config) of the checkpoint that path names (resolve_checkpoint).
inline std::unique_ptr<InferenceModel> load_inference_model(const std::string& path) {
    const std::string checkpoint = resolve_checkpoint(path);
    auto model = std::make_unique<InferenceModel>(read_checkpoint_config(checkpoint));
    model->load(read_checkpoint_weights(SafetensorsFile::open(locate_checkpoint(checkpoint).weights), model->table));
    return model;
}

// ----------------------------------------------------------------------------------------------------------------
// Cached attention kernels. A KV cache holds, per layer, k and v of every cached position: (nseq, NH, capacity, HS),
// k already rotated. New positions start at p0 = (dyn_pos ? *dyn_pos : 0) + pos_offset: dyn_pos is a device counter,
// so one captured graph runs at a new position on every replay.

// RoPE at cache positions, fused with the head split and the cache append. qkv: (nseq, S_new, NH, 3, HS) fused as the
// QKV linear writes it; q: (nseq, S_new, NH, HS) rotated; position s of sequence seq is written to cache position
// p0+s and rotated by angle (p0 + s - pos_shift[seq]) θ (pos_shift null: 0). One thread per 16-byte pack of q (and
// the same pack of k and v); a rotated element reads its partner (rope_element) from the same head row.
__global__ void rope_append_kv_kernel(floatX* q, floatX* k_cache, floatX* v_cache, const floatX* qkv, const float* cos_table,
                                      const float* sin_table, const int* pos_shift, const int* dyn_pos, int pos_offset,
                                      int nseq, int S_new, int NH, int HS, int rot, int capacity) {
    const size_t packs = (size_t)nseq * S_new * NH * HS / kPack;
    const int half = rot / 2;
    const int p0 = (dyn_pos ? *dyn_pos : 0) + pos_offset;
    GRID_STRIDE_LOOP(t, packs) {
        const HeadPack hp = head_pack(t, S_new, NH, HS);
        const int p = p0 + hp.s;
        if (p >= capacity) continue;   // the host sizes caches so this never happens; it only guards memory
        const int angle_p = max(0, p - (pos_shift ? pos_shift[hp.seq] : 0));   // pads before position 0 are masked
        const float* cos_row = cos_table + (size_t)angle_p * half;
        const float* sin_row = sin_table + (size_t)angle_p * half;
        const floatX* row = qkv + hp.fused_row * 3 * HS;   // head h of token (seq, s) in the fused layout
        const size_t cached = ((hp.seq * NH + hp.h) * capacity + p) * HS + hp.d0;
        *reinterpret_cast<FloatXPack*>(v_cache + cached) = *reinterpret_cast<const FloatXPack*>(row + 2 * HS + hp.d0);
        *reinterpret_cast<FloatXPack*>(q + hp.fused_row * HS + hp.d0) = rope_pack(row, hp.d0, rot, cos_row, sin_row, 1.0f);
        *reinterpret_cast<FloatXPack*>(k_cache + cached) = rope_pack(row + HS, hp.d0, rot, cos_row, sin_row, 1.0f);
    }
}

// Attention of new queries over a cache (SPEC 1.1.5): query i (cache position p0+i) sees cached positions j <= p0+i
// with key_mask[j] = 1 (key_mask: (nseq, capacity), or null: all visible); scores scaled by HS^-0.5, softmax in
// fp32. q, out: (nseq, S_new, NH, HS) = (nseq, S_new, C) with the heads merged.
// A query row (sequence, query, head) gets kWarpsPerRow warps of a kAttentionWarps-warp block (so a block serves
// kAttentionWarps / kWarpsPerRow rows): 1, 2, 4 or 8, as attention_cached_warps_per_row picks. The row's warps take
// turns over chunks of 32 keys with an online softmax each, and their partial results are merged at the end. Keys and
// values are read the same way, coalesced: a pass covers kRowsPerPass cache rows, kLanesPerRow lanes a row, each lane
// one 16-byte part of it, and a lane issues the loads of all of a chunk's passes before it uses any (the chunk's
// keys; then, after the softmax update, its values). A memory-bound kernel needs many bytes in flight: with one load
// per lane at a time it stayed at 60% of the copy ceiling with few rows (dev/NOTES.md). The launch bounds leave the
// registers for them at kAttentionCachedBlocksPerSM blocks per SM. For the scores each lane holds the matching part
// of q in registers, the row's lanes sum their partial dot products by shuffles, and lane j of the warp collects key
// j's score; for the weighted sum of values the row groups' partial sums are added by shuffles at the end. A query
// that sees no key outputs 0, as the reference does.
constexpr int kAttentionWarps = 8;
constexpr int kAttentionCachedBlocksPerSM = 2;   // the launch bounds' minimum: registers for load_chunk_parts' loads

// attention_cached_kernel's loads: this lane's 16-byte part of each of the kPasses cache rows it covers in a chunk of
// 32 (rows: chunk + (pass * kRowsPerPass + row_in_pass) * HS), issued together; a row whose key is invisible (lane j's
// key_visible: row j) is not read and its part is zero.
template <int HS, int kPasses, int kRowsPerPass>
__device__ inline void load_chunk_parts(FloatXPack (&parts)[kPasses], const floatX* chunk, bool key_visible, int row_in_pass,
                                        int part) {
#pragma unroll
    for (int pass = 0; pass < kPasses; pass++) {
        const int row = pass * kRowsPerPass + row_in_pass;
        parts[pass] = FloatXPack{};
        if (__shfl_sync(0xffffffff, key_visible, row)) parts[pass] = reinterpret_cast<const FloatXPack*>(chunk + (size_t)row * HS)[part];
    }
}

template <int HS, int kWarpsPerRow>
__global__ void __launch_bounds__(kAttentionWarps * 32, kAttentionCachedBlocksPerSM)
attention_cached_kernel(floatX* out, const floatX* q, const floatX* k_cache, const floatX* v_cache, const int* key_mask,
                        const int* dyn_pos, int pos_offset, size_t rows, int S_new, int NH, int capacity, float scale) {
    constexpr int kLanesPerRow = HS / kPack;       // lanes that hold one cache row between them
    constexpr int kRowsPerPass = 32 / kLanesPerRow;
    constexpr int kPasses = 32 / kRowsPerPass;     // passes over a chunk of 32 cache rows
    constexpr int kRowsPerBlock = kAttentionWarps / kWarpsPerRow;
    static_assert(HS % kPack == 0 && 32 % kLanesPerRow == 0, "a row must be whole 16-byte vectors, a warp whole rows");
    __shared__ float m_s[kAttentionWarps], l_s[kAttentionWarps], o_s[kAttentionWarps][HS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int local_row = warp / kWarpsPerRow, rank = warp % kWarpsPerRow;   // this warp's row, its place among the row's warps
    const int row_thread = rank * 32 + lane;                                  // thread index among the row's threads
    const size_t row = (size_t)blockIdx.x * kRowsPerBlock + local_row;        // ((seq * S_new) + i) * NH + h
    const bool active = row < rows;                                           // no early return: a barrier follows
    const int h = row % NH, i = (row / NH) % S_new;
    const size_t seq = row / ((size_t)NH * S_new);
    const int row_in_pass = lane / kLanesPerRow, part = lane % kLanesPerRow;   // cache row of a pass, 16-byte part of it
    const int last = active ? min((dyn_pos ? *dyn_pos : 0) + pos_offset + i, capacity - 1) : -1;   // newest visible position
    float q_part[kPack];   // this lane's part of q, times the scale
    {
        const FloatXPack packed = active ? reinterpret_cast<const FloatXPack*>(q + row * HS)[part] : FloatXPack{};
#pragma unroll
        for (int e = 0; e < kPack; e++) q_part[e] = to_f32(packed.x[e]) * scale;
    }

    const floatX* keys = k_cache + (seq * NH + h) * capacity * HS;
    const floatX* values = v_cache + (seq * NH + h) * capacity * HS;
    const int* mask = key_mask ? key_mask + seq * capacity : nullptr;
    float m = -INFINITY, l = 0.0f, o[kPack];   // o: dims part*kPack.. of this lane's rows' weighted sum
#pragma unroll
    for (int e = 0; e < kPack; e++) o[e] = 0.0f;
    for (int base = rank * 32; base <= last; base += kWarpsPerRow * 32) {
        // lane j: whether key base + j is visible (one mask read per lane and chunk); an invisible key is never read
        const bool key_visible = base + lane <= last && (mask == nullptr || mask[base + lane] != 0);
        if (!__any_sync(0xffffffff, key_visible)) continue;   // the same for every lane
        // The chunk's keys: all kPasses parts this lane needs (rows base + pass * kRowsPerPass + row_in_pass) loaded
        // before any is used, so they are in flight together; invisible rows stay zero.
        FloatXPack parts[kPasses];
        load_chunk_parts<HS, kPasses, kRowsPerPass>(parts, keys + (size_t)base * HS, key_visible, row_in_pass, part);
        float score = -INFINITY;   // lane j: key base + j
#pragma unroll
        for (int pass = 0; pass < kPasses; pass++) {
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < kPack; e++) dot += q_part[e] * to_f32(parts[pass].x[e]);
#pragma unroll
            for (int offset = 1; offset < kLanesPerRow; offset *= 2) dot += __shfl_xor_sync(0xffffffff, dot, offset);
            const float key_score = __shfl_sync(0xffffffff, dot, (lane % kRowsPerPass) * kLanesPerRow);
            if (lane / kRowsPerPass == pass) score = key_score;
        }
        if (!key_visible) score = -INFINITY;
        const float m_new = fmaxf(m, warp_max(score));   // finite: some key of the chunk is visible
        const float correction = expf(m - m_new);        // 0 while m is still -inf
        const float p = expf(score - m_new);             // 0 for an invisible key (score -inf)
        l = l * correction + warp_sum(p);
#pragma unroll
        for (int e = 0; e < kPack; e++) o[e] *= correction;
        // The chunk's values, loaded the same way into the same registers.
        load_chunk_parts<HS, kPasses, kRowsPerPass>(parts, values + (size_t)base * HS, key_visible, row_in_pass, part);
#pragma unroll
        for (int pass = 0; pass < kPasses; pass++) {
            const float pj = __shfl_sync(0xffffffff, p, pass * kRowsPerPass + row_in_pass);
#pragma unroll
            for (int e = 0; e < kPack; e++) o[e] += pj * to_f32(parts[pass].x[e]);
        }
        m = m_new;
    }
    // sum the row groups: afterwards every lane holds the warp's total for dims part*kPack..
#pragma unroll
    for (int offset = kLanesPerRow; offset < 32; offset *= 2)
#pragma unroll
        for (int e = 0; e < kPack; e++) o[e] += __shfl_xor_sync(0xffffffff, o[e], offset);
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
    if (row_in_pass == 0)
#pragma unroll
        for (int e = 0; e < kPack; e++) o_s[warp][part * kPack + e] = o[e];
    __syncthreads();
    const int first_warp = local_row * kWarpsPerRow;
    for (int d = row_thread; d < HS && active; d += kWarpsPerRow * 32) {
        float m_all = -INFINITY;
        for (int w = first_warp; w < first_warp + kWarpsPerRow; w++) m_all = fmaxf(m_all, m_s[w]);
        float l_all = 0.0f, o_all = 0.0f;
        if (m_all != -INFINITY)
            for (int w = first_warp; w < first_warp + kWarpsPerRow; w++) {
                const float f = expf(m_s[w] - m_all);   // a warp that saw no key has m = -inf: f = 0
                l_all += l_s[w] * f;
                o_all += o_s[w][d] * f;
            }
        out[row * HS + d] = to_floatX(l_all > 0.0f ? o_all / l_all : 0.0f);
    }
}

inline void rope_append_kv(floatX* q, floatX* k_cache, floatX* v_cache, const floatX* qkv, const float* cos_table,
                           const float* sin_table, const int* pos_shift, const int* dyn_pos, int pos_offset, int nseq,
                           int S_new, int NH, int HS, int rot, int capacity, cudaStream_t stream) {
    rope_append_kv_kernel<<<rope_heads_grid(nseq, S_new, NH, HS), 256, 0, stream>>>(q, k_cache, v_cache, qkv, cos_table, sin_table, pos_shift,
                                                                dyn_pos, pos_offset, nseq, S_new, NH, HS, rot, capacity);
    cudaCheckLaunch();
}

template <int HS, int kWarpsPerRow>
inline void attention_cached_launch(floatX* out, const floatX* q, const floatX* k_cache, const floatX* v_cache,
                                    const int* key_mask, const int* dyn_pos, int pos_offset, size_t rows, int S_new,
                                    int NH, int capacity, cudaStream_t stream) {
    constexpr int kRowsPerBlock = kAttentionWarps / kWarpsPerRow;
    const size_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    if (blocks > 0x7fffffffu) throw std::runtime_error("attention_cached: too many query rows for one grid");
    attention_cached_kernel<HS, kWarpsPerRow><<<(unsigned)blocks, kAttentionWarps * 32, 0, stream>>>(
        out, q, k_cache, v_cache, key_mask, dyn_pos, pos_offset, rows, S_new, NH, capacity, 1.0f / std::sqrt((float)HS));
    cudaCheckLaunch();
}

// Warps per query row: 1 for a cache of at most kShortCache positions (the token decoder's few keys, where more warps
// would only wait). For a longer cache, fewer warps a row merge less and more warps a row read more in parallel. On
// the H200 (dev/attention's decode benchmark, dev/NOTES.md) the best was the fewest of 1, 2, 4 and 8 that make about
// two waves of resident warps (kAttentionCachedBlocksPerSM blocks of kAttentionWarps on every SM): 1 from 6,144 rows
// (the block decoders from batch 512), 4 at 1,024 and 1,536 rows and 2 at 3,072 (vanilla decoding at batch 64-256).
constexpr int kShortCache = 64;
inline int attention_cached_warps_per_row(size_t rows, int capacity) {
    if (capacity <= kShortCache) return 1;
    static const int sms = [] {
        int device = 0, count = 0;
        cudaCheck(cudaGetDevice(&device));
        cudaCheck(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
        return count;
    }();
    const double resident_warps = (double)kAttentionCachedBlocksPerSM * kAttentionWarps * sms;
    for (int warps : {1, 2, 4})
        if ((double)rows * warps >= 1.75 * resident_warps) return warps;
    return kAttentionWarps;
}

template <int HS>
inline void attention_cached_for_head_size(floatX* out, const floatX* q, const floatX* k_cache, const floatX* v_cache,
                                           const int* key_mask, const int* dyn_pos, int pos_offset, size_t rows,
                                           int S_new, int NH, int capacity, int warps_per_row, cudaStream_t stream) {
    switch (warps_per_row) {
        case 1: attention_cached_launch<HS, 1>(out, q, k_cache, v_cache, key_mask, dyn_pos, pos_offset, rows, S_new, NH, capacity, stream); break;
        case 2: attention_cached_launch<HS, 2>(out, q, k_cache, v_cache, key_mask, dyn_pos, pos_offset, rows, S_new, NH, capacity, stream); break;
        case 4: attention_cached_launch<HS, 4>(out, q, k_cache, v_cache, key_mask, dyn_pos, pos_offset, rows, S_new, NH, capacity, stream); break;
        case kAttentionWarps:
            attention_cached_launch<HS, kAttentionWarps>(out, q, k_cache, v_cache, key_mask, dyn_pos, pos_offset, rows, S_new, NH,
                                                         capacity, stream);
            break;
        default: throw std::runtime_error("cached attention: " + std::to_string(warps_per_row) + " warps per row is not one of 1, 2, 4, 8");
    }
}

// warps_per_row: 0 takes attention_cached_warps_per_row's choice; tests force 1, 2 and 4 (their small batches take 8).
inline void attention_cached(floatX* out, const floatX* q, const floatX* k_cache, const floatX* v_cache, const int* key_mask,
                             const int* dyn_pos, int pos_offset, int nseq, int S_new, int NH, int HS, int capacity,
                             cudaStream_t stream, int warps_per_row = 0) {
    const size_t rows = (size_t)nseq * S_new * NH;
    if (rows == 0) return;
    const int warps = warps_per_row > 0 ? warps_per_row : attention_cached_warps_per_row(rows, capacity);
    with_head_size("cached attention", HS, [&](auto hs) {
        attention_cached_for_head_size<decltype(hs)::value>(out, q, k_cache, v_cache, key_mask, dyn_pos, pos_offset, rows, S_new, NH, capacity,
                                                 warps, stream);
    });
}

// Attention of S_new new queries over a cache, by the fastest path that serves it: a prefill of more than kSmallMaxS
// positions at a host-known position (dyn_pos null) takes flash attention in the BF16 build; decode steps, whose
// position is a device counter read by a replayed graph, and short or FP32 prefills take attention_cached.
inline void attention_over_cache(floatX* out, const floatX* q, const floatX* k_cache, const floatX* v_cache,
                                 const int* key_mask, const int* dyn_pos, int pos_offset, int nseq, int S_new, int NH,
                                 int HS, int capacity, cudaStream_t stream) {
    if (dyn_pos == nullptr && S_new > kSmallMaxS && kFlashAttentionBuild && flash_head_size(HS))
        flash_attention_cached_prefill(out, q, k_cache, v_cache, key_mask, pos_offset, nseq, S_new, NH, HS, capacity, stream);
    else
        attention_cached(out, q, k_cache, v_cache, key_mask, dyn_pos, pos_offset, nseq, S_new, NH, HS, capacity, stream);
}

// Decode steps over a short cache (capacity <= kShortCache: the token decoder, whose cache holds its P prefix vectors
// and the block's tokens), rope_append_kv and attention_cached fused into one kernel: with so few keys, the two
// launches and the round trip of q through memory cost more than the attention itself. kNew new positions per
// sequence (1: a local step; 2: the prefix, P = 2) at p0, p0 + 1, ... A group of HS / kPack lanes serves one
// (sequence, head), each lane one 16-byte part of a row: the lanes rotate q and k of the new positions (as
// rope_append_kv) and append k and v to the cache; then each new query s takes, with an online softmax, the new
// positions t <= s (their keys and values still in registers) and the cached positions j < p0, kChunk at a time so
// their loads are in flight together (2: more would cost registers and occupancy), each key read once for all the
// queries. The group's lanes sum their partial dot products by shuffles. Same inputs and outputs as the two kernels
// it replaces: qkv (nseq, kNew, NH, 3, HS) fused; out (nseq, kNew, NH, HS); a query that sees no key outputs 0.
template <int HS, int kNew>
__global__ void __launch_bounds__(256)
rope_append_attend_kernel(floatX* out, floatX* k_cache, floatX* v_cache, const floatX* qkv, const float* cos_table,
                          const float* sin_table, const int* pos_shift, const int* key_mask, const int* dyn_pos,
                          int pos_offset, int heads, int NH, int rot, int capacity, float scale) {
    constexpr int kLanesPerRow = HS / kPack, kChunk = 2;
    static_assert(HS % kPack == 0 && 32 % kLanesPerRow == 0, "a row must be whole 16-byte vectors, a warp whole rows");
    const int p0 = (dyn_pos ? *dyn_pos : 0) + pos_offset;   // the first new position, the same for every sequence
    if (p0 + kNew > capacity) return;   // the host sizes caches so this never happens; it only guards memory (uniform)
    const int head = (int)(((size_t)blockIdx.x * blockDim.x + threadIdx.x) / kLanesPerRow);   // seq * NH + h
    const int part = threadIdx.x % kLanesPerRow, d0 = part * kPack;
    const bool active = head < heads;   // inactive lanes still take part in the shuffles
    const int seq = head / NH, h = head % NH, half = rot / 2;
    const size_t cached = (size_t)head * capacity * HS + d0;   // this lane's part of the head's cache position 0
    auto new_row = [&](int s) { return ((size_t)seq * kNew + s) * NH + h; };   // row of qkv and out

    FloatXPack k_new[kNew], v_new[kNew];
    float q_part[kNew][kPack];
#pragma unroll
    for (int s = 0; s < kNew; s++) {
        k_new[s] = v_new[s] = FloatXPack{};
        FloatXPack q_new{};
        if (active) {
            const int p = p0 + s;
            const int angle_p = max(0, p - (pos_shift ? pos_shift[seq] : 0));   // pads before position 0 are masked
            const float* cos_row = cos_table + (size_t)angle_p * half;
            const float* sin_row = sin_table + (size_t)angle_p * half;
            const floatX* row = qkv + new_row(s) * 3 * HS;
            q_new = rope_pack(row, d0, rot, cos_row, sin_row, 1.0f);
            k_new[s] = rope_pack(row + HS, d0, rot, cos_row, sin_row, 1.0f);
            v_new[s] = *reinterpret_cast<const FloatXPack*>(row + 2 * HS + d0);
            *reinterpret_cast<FloatXPack*>(k_cache + cached + (size_t)p * HS) = k_new[s];
            *reinterpret_cast<FloatXPack*>(v_cache + cached + (size_t)p * HS) = v_new[s];
        }
#pragma unroll
        for (int e = 0; e < kPack; e++) q_part[s][e] = to_f32(q_new.x[e]) * scale;
    }
    const int* mask = key_mask && active ? key_mask + (size_t)seq * capacity : nullptr;
    auto visible = [&](int j) { return active && (mask == nullptr || mask[j] != 0); };
    // q_s . key over the group's lanes (every lane of the warp takes part in the shuffles)
    auto score_of = [&](int s, const FloatXPack& key) {
        float score = 0.0f;
#pragma unroll
        for (int e = 0; e < kPack; e++) score += q_part[s][e] * to_f32(key.x[e]);
        return group_sum<kLanesPerRow>(score);
    };
    float m[kNew], l[kNew], o[kNew][kPack];
#pragma unroll
    for (int s = 0; s < kNew; s++) {
        m[s] = -INFINITY;
        l[s] = 0.0f;
#pragma unroll
        for (int e = 0; e < kPack; e++) o[s][e] = 0.0f;
    }
    auto accumulate = [&](int s, float score, const FloatXPack& value) {   // online softmax of query s
        const float m_new = fmaxf(m[s], score);
        const float correction = expf(m[s] - m_new);   // 0 while m is still -inf
        const float weight = expf(score - m_new);
        l[s] = l[s] * correction + weight;
#pragma unroll
        for (int e = 0; e < kPack; e++) o[s][e] = o[s][e] * correction + weight * to_f32(value.x[e]);
        m[s] = m_new;
    };
    // the new positions, from registers: query s sees t <= s
#pragma unroll
    for (int t = 0; t < kNew; t++)
#pragma unroll
        for (int s = t; s < kNew; s++) {
            const float score = score_of(s, k_new[t]);
            if (visible(p0 + t)) accumulate(s, score, v_new[t]);
        }
    // the cached positions j < p0, seen by every new query
    for (int base = 0; base < p0; base += kChunk) {
        FloatXPack keys[kChunk], values[kChunk];
#pragma unroll
        for (int u = 0; u < kChunk; u++) {
            const int j = base + u;
            const bool read = j < p0 && visible(j);   // an invisible key is never read
            keys[u] = read ? *reinterpret_cast<const FloatXPack*>(k_cache + cached + (size_t)j * HS) : FloatXPack{};
            values[u] = read ? *reinterpret_cast<const FloatXPack*>(v_cache + cached + (size_t)j * HS) : FloatXPack{};
        }
#pragma unroll
        for (int u = 0; u < kChunk; u++)
#pragma unroll
            for (int s = 0; s < kNew; s++) {
                const float score = score_of(s, keys[u]);
                if (base + u < p0 && visible(base + u)) accumulate(s, score, values[u]);
            }
    }
    if (!active) return;
#pragma unroll
    for (int s = 0; s < kNew; s++) {
        FloatXPack result;
#pragma unroll
        for (int e = 0; e < kPack; e++) result.x[e] = to_floatX(l[s] > 0.0f ? o[s][e] / l[s] : 0.0f);
        *reinterpret_cast<FloatXPack*>(out + new_row(s) * HS + d0) = result;
    }
}

// S_new <= kFusedMaxNew new positions per sequence at p0 = (dyn_pos ? *dyn_pos : 0) + pos_offset over a cache of at
// most kShortCache positions: what rope_append_kv followed by attention_over_cache computes, in one launch (q itself
// is not written).
constexpr int kFusedMaxNew = 2;
inline void rope_append_attend(floatX* out, floatX* k_cache, floatX* v_cache, const floatX* qkv, const float* cos_table,
                               const float* sin_table, const int* pos_shift, const int* key_mask, const int* dyn_pos,
                               int pos_offset, int nseq, int S_new, int NH, int HS, int rot, int capacity, cudaStream_t stream) {
    if (capacity > kShortCache || S_new < 1 || S_new > kFusedMaxNew)
        throw std::runtime_error("rope_append_attend: takes 1 to " + std::to_string(kFusedMaxNew) + " new positions over a cache of at most " +
                                 std::to_string(kShortCache) + ", not " + std::to_string(S_new) + " over " + std::to_string(capacity));
    const int heads = nseq * NH;
    if (heads == 0) return;
    const float scale = 1.0f / std::sqrt((float)HS);
    constexpr int kThreads = 256;
    const unsigned blocks = (unsigned)(((size_t)heads * (HS / kPack) + kThreads - 1) / kThreads);
    auto launch = [&](auto kernel) {
        kernel<<<blocks, kThreads, 0, stream>>>(out, k_cache, v_cache, qkv, cos_table, sin_table, pos_shift, key_mask, dyn_pos,
                                                pos_offset, heads, NH, rot, capacity, scale);
    };
    with_head_size("cached attention", HS, [&](auto hs) {
        S_new == 1 ? launch(rope_append_attend_kernel<decltype(hs)::value, 1>) : launch(rope_append_attend_kernel<decltype(hs)::value, 2>);
    });
    cudaCheckLaunch();
}

// ----------------------------------------------------------------------------------------------------------------
// A GPT-NeoX stack (SPEC 1.1) for cached decoding over nseq sequences: each forward runs S_new new positions per
// sequence, appends their keys and values to the cache and attends over everything cached up to them. Owns its
// cache (capacity positions per sequence) and scratch for up to max_new positions per call.
class KvStack {
public:
    KvStack(const StackConfig& config, const std::string& prefix, const TensorTable& table, int nseq, int capacity, int max_new)
        : cfg_(config), nseq_(nseq), capacity_(capacity), max_new_(max_new) {
        if (nseq < 1 || capacity < 1 || max_new < 1 || max_new > capacity)
            throw std::runtime_error("KvStack: needs nseq, capacity >= 1 and 1 <= max_new <= capacity");
        for (int l = 0; l < cfg_.L; l++) offsets_.push_back(layer_offsets(table, prefix, l));
        final_w_ = table.get(prefix + "final_layer_norm.weight").offset;
        final_b_ = table.get(prefix + "final_layer_norm.bias").offset;
        const size_t C = cfg_.C, I = cfg_.I, n = (size_t)nseq * max_new;
        k_cache_ = DeviceBuffer<floatX>((size_t)cfg_.L * nseq * capacity * C);
        v_cache_ = DeviceBuffer<floatX>((size_t)cfg_.L * nseq * capacity * C);
        x_ = DeviceBuffer<floatX>(n * C);
        ln1_ = DeviceBuffer<floatX>(n * C);
        ln2_ = DeviceBuffer<floatX>(n * C);
        qkv_ = DeviceBuffer<floatX>(n * 3 * C);
        q_ = DeviceBuffer<floatX>(n * C);
        att_ = DeviceBuffer<floatX>(n * C);
        attn_out_ = DeviceBuffer<floatX>(n * C);
        mlp_out_ = DeviceBuffer<floatX>(n * C);
        fc_ = DeviceBuffer<floatX>(n * I);
        out_ = DeviceBuffer<floatX>(n * C);
        mean_ = DeviceBuffer<float>(n);
        rstd_ = DeviceBuffer<float>(n);
        upload_rope_tables(rope_cos_, rope_sin_, capacity, cfg_.rotary_dims());
    }

    const floatX* out() const { return out_.data(); }   // (nseq, S_new, C) of the last forward, after the final LayerNorm
    int capacity() const { return capacity_; }

    // inp: (nseq, S_new, C), the new positions' inputs, which start at cache position p0 = (dyn_pos ? *dyn_pos : 0) +
    // pos_offset; the caller guarantees p0 + S_new <= capacity. key_mask: (nseq, capacity) or null (all visible).
    // pos_shift: (nseq) rotary position = cache position - pos_shift[seq], or null.
    // Per layer: x = x + dense(attention(LN1(x))) + mlp(LN2(x)) (parallel residual, SPEC 1.1.1).
    void forward(Gpu& gpu, const floatX* inp, int S_new, const int* dyn_pos, int pos_offset, const int* key_mask,
                 const int* pos_shift, const floatX* params) {
        if (S_new < 1 || S_new > max_new_)
            throw std::runtime_error("KvStack::forward: " + std::to_string(S_new) + " new positions, scratch for " + std::to_string(max_new_));
        const int n = nseq_ * S_new, C = cfg_.C, I = cfg_.I, NH = cfg_.NH, HS = cfg_.HS();
        const size_t layer_cache = (size_t)nseq_ * capacity_ * C;
        // The residual stream x: the input, then x_. Layer l > 0 (and the final LayerNorm) normalises the previous
        // layer's sum x + attn_out + mlp_out, which its LayerNorm forms and writes to x_ (in place once x is x_).
        const floatX* x = inp;
        for (int l = 0; l < cfg_.L; l++) {
            const LayerOffsets& o = offsets_[l];
            const floatX* w = params;
            floatX* k_cache = k_cache_.data() + l * layer_cache;
            floatX* v_cache = v_cache_.data() + l * layer_cache;
            const LayerNormInput ln_input = l == 0 ? LayerNormInput(x) : LayerNormInput(x, attn_out_.data(), mlp_out_.data(), x_.data());
            layernorm_forward({ln1_.data(), w + o.ln1_w, w + o.ln1_b}, {ln2_.data(), w + o.ln2_w, w + o.ln2_b}, mean_.data(),
                              rstd_.data(), ln_input, n, C, gpu.stream);
            if (l > 0) x = x_.data();
            linear_forward(gpu, qkv_.data(), ln1_.data(), w + o.qkv_w, w + o.qkv_b, n, C, 3 * C);
            if (S_new <= kFusedMaxNew && capacity_ <= kShortCache) {   // the token decoder
                rope_append_attend(att_.data(), k_cache, v_cache, qkv_.data(), rope_cos_.data(), rope_sin_.data(), pos_shift,
                                   key_mask, dyn_pos, pos_offset, nseq_, S_new, NH, HS, cfg_.rotary_dims(), capacity_, gpu.stream);
            } else {
                rope_append_kv(q_.data(), k_cache, v_cache, qkv_.data(), rope_cos_.data(), rope_sin_.data(), pos_shift, dyn_pos,
                               pos_offset, nseq_, S_new, NH, HS, cfg_.rotary_dims(), capacity_, gpu.stream);
                attention_over_cache(att_.data(), q_.data(), k_cache, v_cache, key_mask, dyn_pos, pos_offset, nseq_, S_new, NH,
                                     HS, capacity_, gpu.stream);
            }
            linear_forward(gpu, attn_out_.data(), att_.data(), w + o.dense_w, w + o.dense_b, n, C, C);

            linear_forward(gpu, fc_.data(), ln2_.data(), w + o.fc_w, w + o.fc_b, n, C, I);
            gelu_forward(fc_.data(), fc_.data(), (size_t)n * I, gpu.stream);   // elementwise: in place is safe
            linear_forward(gpu, mlp_out_.data(), fc_.data(), w + o.proj_w, w + o.proj_b, n, I, C);
        }
        const LayerNormInput last_sum(x, attn_out_.data(), mlp_out_.data(), nullptr);   // the sum itself is not needed after
        layernorm_forward(out_.data(), mean_.data(), rstd_.data(), last_sum, params + final_w_, params + final_b_, n, C, gpu.stream);
    }

private:
    StackConfig cfg_;
    int nseq_, capacity_, max_new_;
    std::vector<LayerOffsets> offsets_;
    size_t final_w_ = 0, final_b_ = 0;
    DeviceBuffer<floatX> k_cache_, v_cache_;               // (L, nseq, NH, capacity, HS), k rotated
    DeviceBuffer<float> rope_cos_, rope_sin_;              // (capacity, rot/2)
    DeviceBuffer<floatX> x_, ln1_, ln2_, q_, att_, attn_out_, mlp_out_, out_;   // (nseq * max_new, C)
    DeviceBuffer<floatX> qkv_;                             // (nseq * max_new, 3C)
    DeviceBuffer<floatX> fc_;                              // (nseq * max_new, I), GELU applied in place
    DeviceBuffer<float> mean_, rstd_;                      // (nseq * max_new), written by LayerNorm, unused
};

// ----------------------------------------------------------------------------------------------------------------
// Token choice on the GPU (SPEC 5.2): greedy, or sampling with temperature, top-k and top-p, one thread block per
// row, no host involvement. Sampling works on integer weights w_v = floor(2^40 exp(z_v - max z)) (z = logits /
// temperature), so every sum is exact and order-independent: results are deterministic and a row's random draw
// picks exactly one id. Ids whose probability is below 2^-40 of the most likely one are never drawn.
struct SamplingSettings {
    float temperature = 0.0f;   // 0: greedy (argmax; the lowest id on ties); > 0: sample from softmax(logits / temperature)
    int top_k = 0;              // sample only among the top_k most likely ids (0: all); ties at the cut are kept
    float top_p = 1.0f;         // then only among the smallest most-likely set of probability >= top_p (1: all)
    uint64_t seed = 0;          // the draw of row b's generated token c uses hash(seed, b, c): runs are reproducible
};

inline void validate_sampling(const SamplingSettings& s) {
    if (!(s.temperature >= 0.0f) || !std::isfinite(s.temperature)) throw std::runtime_error("temperature must be a finite number >= 0");
    if (s.top_k < 0) throw std::runtime_error("top-k must be >= 0 (0 keeps every id)");
    if (!(s.top_p > 0.0f && s.top_p <= 1.0f)) throw std::runtime_error("top-p must be in (0, 1] (1 keeps every id)");
}

constexpr int kSampleThreads = 1024;
constexpr float kSampleWeightOne = 1099511627776.0f;   // 2^40: the weight of the most likely id; V * 2^40 < 2^64

// Floats mapped to unsigned integers of the same order (larger float, larger key).
__device__ inline uint32_t order_key(float x) {
    const uint32_t bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// SplitMix64's finaliser: a counter-based random number generator (Steele, Lea, Flood 2014).
__host__ __device__ inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Radix select over a thread block: the largest key K with  Σ_{v: key_v >= K} w_v >= need  (1 <= need <= Σ w_v),
// where weight(v, key) returns w_v and sets key_v. With weights 1 this is the key of the need-th largest value; with
// probability weights, the cut of the smallest most-likely set of mass >= need. Four passes over 8-bit digits; the
// digit histogram is summed with integer atomics, so the result does not depend on thread timing.
// hist: 256 shared entries; digit_out, need_out: shared scalars.
template <typename Weight>
__device__ uint32_t radix_select(int V, unsigned long long need, Weight weight, unsigned long long* hist,
                                 uint32_t* digit_out, unsigned long long* need_out) {
    uint32_t prefix = 0, prefix_mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            uint32_t key;
            const unsigned long long w = weight(v, key);
            if (w != 0 && (key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], w);
        }
        __syncthreads();
        if (threadIdx.x < 32) {   // warp 0: lane owns digits [8 lane, 8 lane + 8); find the digit where need is reached
            const int lane = threadIdx.x;
            unsigned long long own = 0;
            for (int b = 0; b < 8; b++) own += hist[lane * 8 + b];
            unsigned long long suffix = own;   // weight of digits >= 8 lane
            for (int offset = 1; offset < 32; offset <<= 1) {
                const unsigned long long other = __shfl_down_sync(0xffffffff, suffix, offset);
                if (lane + offset < 32) suffix += other;
            }
            const unsigned long long above = suffix - own;   // weight of the digits of higher lanes
            if (above < need && need <= suffix) {            // exactly one lane
                unsigned long long acc = above;
                for (int b = lane * 8 + 7; b >= lane * 8; b--) {
                    if (acc + hist[b] >= need) {
                        *digit_out = (uint32_t)b;
                        *need_out = need - acc;
                        break;
                    }
                    acc += hist[b];
                }
            }
        }
        __syncthreads();
        prefix |= *digit_out << shift;
        prefix_mask |= 0xFFu << shift;
        need = *need_out;
    }
    __syncthreads();   // every thread has read digit_out and need_out before anyone reuses them
    return prefix;
}

// Visits a row of logits, visit(value, id), each thread its ids in increasing order (so keeping the first of equal
// values keeps the lowest id). A row of whole packs (V % kPack == 0; rows are then 16-byte aligned) is read 16 bytes
// at a time, two loads in flight per thread: the row is read once at nearly the copy rate. Other rows: one value.
template <typename Visit>
__device__ inline void for_each_logit(const floatX* z, int V, Visit visit) {
    if (V % kPack != 0) {
        for (int v = threadIdx.x; v < V; v += blockDim.x) visit(to_f32(z[v]), v);
        return;
    }
    const int packs = V / kPack, stride = blockDim.x;
    auto visit_pack = [&](const float (&x)[kPack], int p) {
#pragma unroll
        for (int e = 0; e < kPack; e++) visit(x[e], p * kPack + e);
    };
    for (int p = threadIdx.x; p < packs; p += 2 * stride) {
        const bool second = p + stride < packs;
        float a[kPack], b[kPack];
        load_pack(a, z + p * kPack);
        load_pack(b, z + (second ? p + stride : p) * kPack);
        visit_pack(a, p);
        if (second) visit_pack(b, p + stride);
    }
}

// logits: (B, V) floatX, one block per row (read as fp32). The chosen id of row b goes to current[b], to
// history[b * history_stride + col] with col = (dyn_col ? *dyn_col : 0) + col_offset (also the random draw's counter),
// and, when block_ids is set, to block_ids[b * block_stride + slot].
__global__ void __launch_bounds__(kSampleThreads)
sample_kernel(int* current, int* history, int history_stride, const int* dyn_col, int col_offset, int* block_ids,
              int block_stride, int slot, const floatX* logits, int V, SamplingSettings settings) {
    __shared__ float reduce_shared[32];
    __shared__ float best_shared[32];
    __shared__ int best_id_shared[32];
    __shared__ unsigned long long hist[256];
    __shared__ unsigned long long scan[32];
    __shared__ unsigned long long total_shared, need_shared;
    __shared__ uint32_t digit_shared;
    __shared__ int chosen;
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
    const floatX* z = logits + (size_t)row * V;
    const int col = (dyn_col ? *dyn_col : 0) + col_offset;
    if (tid == 0) chosen = 0;

    if (settings.temperature <= 0.0f) {
        // greedy: the largest logit, the lowest id among equal ones (NaN never wins)
        float best = -INFINITY;
        int best_id = 0x7fffffff;
        for_each_logit(z, V, [&](float x, int v) {
            if (x > best) {
                best = x;
                best_id = v;
            }
        });
        for (int pass = 0; pass < 2; pass++) {   // within each warp, then warp 0 over the warps' winners
            for (int offset = 16; offset > 0; offset >>= 1) {
                const float other = __shfl_xor_sync(0xffffffff, best, offset);
                const int other_id = __shfl_xor_sync(0xffffffff, best_id, offset);
                if (other > best || (other == best && other_id < best_id)) {
                    best = other;
                    best_id = other_id;
                }
            }
            if (pass == 1) break;
            if (lane == 0) {
                best_shared[warp] = best;
                best_id_shared[warp] = best_id;
            }
            __syncthreads();
            best = lane < warps ? best_shared[lane] : -INFINITY;
            best_id = lane < warps ? best_id_shared[lane] : 0x7fffffff;
        }
        if (tid == 0) chosen = best_id == 0x7fffffff ? 0 : best_id;
    } else {
        const float temperature = settings.temperature;
        float z_max = -INFINITY;
        for_each_logit(z, V, [&](float x, int) { z_max = fmaxf(z_max, x / temperature); });
        z_max = block_max(z_max, reduce_shared);
        uint32_t cut = 0;   // ids with key < cut are out
        if (settings.top_k > 0 && settings.top_k < V) {
            auto count = [&](int v, uint32_t& key) -> unsigned long long {
                key = order_key(to_f32(z[v]) / temperature);
                return 1ull;
            };
            cut = radix_select(V, (unsigned long long)settings.top_k, count, hist, &digit_shared, &need_shared);
        }
        auto weight = [&](int v, uint32_t& key) -> unsigned long long {
            const float zv = to_f32(z[v]) / temperature;
            key = order_key(zv);
            return key >= cut ? (unsigned long long)(expf(zv - z_max) * kSampleWeightOne) : 0ull;
        };
        if (settings.top_p < 1.0f) {
            if (tid == 0) total_shared = 0;
            __syncthreads();
            unsigned long long local = 0;
            for (int v = tid; v < V; v += blockDim.x) {
                uint32_t key;
                local += weight(v, key);
            }
            atomicAdd(&total_shared, local);
            __syncthreads();
            const unsigned long long total = total_shared;
            unsigned long long need = (unsigned long long)ceil((double)settings.top_p * (double)total);
            need = need < 1 ? 1 : need > total ? total : need;
            const uint32_t cut_p = radix_select(V, need, weight, hist, &digit_shared, &need_shared);
            cut = max(cut, cut_p);
        }
        // Draw: thread t owns the contiguous ids [begin, end); an exclusive scan of the threads' weights in id order
        // gives each its interval of [0, total), and the thread whose interval holds the random target walks its ids.
        const int chunk = (V + blockDim.x - 1) / blockDim.x;
        const int begin = min(V, tid * chunk), end = min(V, begin + chunk);
        unsigned long long local = 0;
        for (int v = begin; v < end; v++) {
            uint32_t key;
            local += weight(v, key);
        }
        unsigned long long inclusive = local;
        for (int offset = 1; offset < 32; offset <<= 1) {
            const unsigned long long other = __shfl_up_sync(0xffffffff, inclusive, offset);
            if (lane >= offset) inclusive += other;
        }
        if (lane == 31) scan[warp] = inclusive;
        __syncthreads();
        if (warp == 0) {
            const unsigned long long own = lane < warps ? scan[lane] : 0;
            unsigned long long warp_inclusive = own;
            for (int offset = 1; offset < 32; offset <<= 1) {
                const unsigned long long other = __shfl_up_sync(0xffffffff, warp_inclusive, offset);
                if (lane >= offset) warp_inclusive += other;
            }
            if (lane < warps) scan[lane] = warp_inclusive - own;   // weight before warp `lane`
            if (lane == 31) total_shared = warp_inclusive;
        }
        __syncthreads();
        const unsigned long long exclusive = scan[warp] + inclusive - local, total = total_shared;
        const uint64_t random = splitmix64(splitmix64(splitmix64(settings.seed) ^ (uint64_t)row) ^ (uint64_t)col);
        const unsigned long long target = __umul64hi(random, total);   // uniform in [0, total); total >= 2^40
        if (local > 0 && exclusive <= target && target < exclusive + local) {
            unsigned long long acc = exclusive;
            for (int v = begin; v < end; v++) {
                uint32_t key;
                acc += weight(v, key);
                if (target < acc) {
                    chosen = v;
                    break;
                }
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        current[row] = chosen;
        history[(size_t)row * history_stride + col] = chosen;
        if (block_ids) block_ids[(size_t)row * block_stride + slot] = chosen;
    }
}

// kept: (B, columns, V) fp32; logits (B, V) go to column (dyn_col ? *dyn_col : 0) + col_offset (tests).
__global__ void keep_logits_kernel(float* kept, const floatX* logits, int B, int V, int columns, const int* dyn_col, int col_offset) {
    const int col = (dyn_col ? *dyn_col : 0) + col_offset;
    if (col >= columns) return;
    GRID_STRIDE_LOOP(i, (size_t)B * V) kept[((i / V) * columns + col) * V + i % V] = to_f32(logits[i]);
}

// counters: [0] the next position of the main cache, [1] the next output column.
__global__ void set_counters_kernel(int* counters, int position, int column) {
    counters[0] = position;
    counters[1] = column;
}
__global__ void advance_counters_kernel(int* counters, int positions, int columns) {
    counters[0] += positions;
    counters[1] += columns;
}

// ----------------------------------------------------------------------------------------------------------------
// The context a generation needs, in tokens: block models count the prompt padded to a block boundary and the new
// tokens rounded up to whole blocks (SPEC 5.1: the block decoder positions are blocks, pads included).
inline int generation_context_tokens(const ModelConfig& cfg, int longest_prompt, int max_new_tokens) {
    if (!cfg.is_block) return longest_prompt + max_new_tokens;
    const int prompt_blocks = (longest_prompt + cfg.LB - 1) / cfg.LB, new_blocks = (max_new_tokens + cfg.LB - 1) / cfg.LB;
    return (prompt_blocks + new_blocks) * cfg.LB;
}
// The most new tokens that fit in the model's context (T tokens) after a prompt; <= 0 when the prompt alone fills it.
inline int max_new_tokens_that_fit(const ModelConfig& cfg, int longest_prompt) {
    if (!cfg.is_block) return cfg.T - longest_prompt;
    return (cfg.T / cfg.LB - (longest_prompt + cfg.LB - 1) / cfg.LB) * cfg.LB;
}

struct GenerationOptions {
    int max_new_tokens = 64;
    SamplingSettings sampling;
    bool stop_at_eos = true;    // a row stops at <|endoftext|>; the run ends early once every row has stopped
    bool keep_logits = false;   // tests: keep the logits every generated id was chosen from, as fp32 (kept_logits())
    bool cuda_graph = true;     // replay the captured decode step (false: launch every kernel each step, for tests)
};

// One batch of prompts through cached generation. The constructor checks the prompts against the model and
// allocates everything (caches, scratch, pinned output); run() does the prefill and the decode steps, and may be
// called again (benchmarks: the same prompts, the captured graph reused).
// Checks a generation request before anything is allocated; returns the longest prompt's length. Throws naming the
// prompt (1-based) or the option that is wrong.
inline int validate_generation(const ModelConfig& cfg, const std::vector<std::vector<int>>& prompts, const GenerationOptions& options) {
    validate_sampling(options.sampling);
    if (prompts.empty()) throw std::runtime_error("generation needs at least one prompt");
    if (options.max_new_tokens < 1) throw std::runtime_error("the number of new tokens must be >= 1");
    int longest = 0;
    for (size_t b = 0; b < prompts.size(); b++) {
        if (prompts[b].empty()) throw std::runtime_error("prompt " + std::to_string(b + 1) + " is empty (it has no tokens)");
        for (int id : prompts[b])
            if (id < 0 || id >= cfg.V)
                throw std::runtime_error("prompt " + std::to_string(b + 1) + " has token id " + std::to_string(id) +
                                         ", outside the model's vocabulary of " + std::to_string(cfg.V));
        longest = std::max(longest, (int)prompts[b].size());
    }
    const int needed = generation_context_tokens(cfg, longest, options.max_new_tokens);
    if (needed > cfg.T)
        throw std::runtime_error("the longest prompt has " + std::to_string(longest) + " tokens and " +
                                 std::to_string(options.max_new_tokens) + " new ones are asked for: that needs " +
                                 std::to_string(needed) + " positions" +
                                 (cfg.is_block ? " (whole blocks of " + std::to_string(cfg.LB) + ")" : "") +
                                 ", but the model's context is " + std::to_string(cfg.T) + " tokens");
    return longest;
}

class Generation {
public:
    Generation(const InferenceModel& model, const std::vector<std::vector<int>>& prompts, const GenerationOptions& options)
        : model_(model), cfg_(model.cfg), options_(options), longest_(validate_generation(model.cfg, prompts, options)),
          B_((int)prompts.size()), max_new_(options.max_new_tokens) {
        const int longest = longest_;
        const int LB = cfg_.is_block ? cfg_.LB : 1;
        Tp_ = (longest + LB - 1) / LB * LB;
        if (cfg_.is_block) {
            n0_ = Tp_ / LB;
            steps_ = (max_new_ + LB - 1) / LB;
            columns_ = steps_ * LB;
        } else {
            steps_ = max_new_ - 1;   // the prefill chooses the first token
            columns_ = max_new_;
        }

        // prompts, left-padded with id 0; the main stack's key mask and (vanilla) rotary shift
        std::vector<int> ids((size_t)B_ * Tp_, kEosId), last_rows(B_);
        const int capacity = cfg_.is_block ? n0_ + steps_ : Tp_ + max_new_ - 1;
        std::vector<int> key_mask((size_t)B_ * capacity, 1), shift(B_, 0);
        pad_.resize(B_);
        for (int b = 0; b < B_; b++) {
            pad_[b] = Tp_ - (int)prompts[b].size();
            std::copy(prompts[b].begin(), prompts[b].end(), ids.begin() + (size_t)b * Tp_ + pad_[b]);
            if (cfg_.is_block) {
                for (int i = 0; i < n0_; i++) key_mask[(size_t)b * capacity + i] = (i + 1) * LB > pad_[b];   // any(mask)
                last_rows[b] = b * n0_ + n0_ - 1;
            } else {
                for (int j = 0; j < pad_[b]; j++) key_mask[(size_t)b * capacity + j] = 0;
                shift[b] = pad_[b];
                last_rows[b] = b * Tp_ + Tp_ - 1;
            }
        }
        prompt_ids_ = upload_ints(ids);
        key_mask_ = upload_ints(key_mask);
        last_rows_ = upload_ints(last_rows);
        if (!cfg_.is_block) pos_shift_ = upload_ints(shift);
        counters_ = DeviceBuffer<int>(2);
        current_ = DeviceBuffer<int>(B_);
        history_ = DeviceBuffer<int>((size_t)B_ * columns_);
        host_tokens_ = PinnedBuffer<int>((size_t)B_ * columns_);
        logits_ = DeviceBuffer<floatX>((size_t)B_ * cfg_.V);
        if (options.keep_logits) kept_ = DeviceBuffer<float>((size_t)B_ * columns_ * cfg_.V);

        const int HT = cfg_.token_decoder.C;
        if (cfg_.is_block) {
            const int DB = cfg_.block_decoder.C, P = cfg_.P;
            main_ = std::make_unique<KvStack>(cfg_.block_decoder, "block_decoder.gpt_neox.", model.table, B_, capacity, n0_);
            token_ = std::make_unique<KvStack>(cfg_.token_decoder, "token_decoder.gpt_neox.", model.table, B_, cfg_.token_seq_len(), P);
            embedded_ = DeviceBuffer<floatX>((size_t)B_ * n0_ * DB);
            context_ = DeviceBuffer<floatX>((size_t)B_ * DB);
            prefix_ = DeviceBuffer<floatX>((size_t)B_ * P * HT);
            token_embedded_ = DeviceBuffer<floatX>((size_t)B_ * HT);
            block_ids_ = DeviceBuffer<int>((size_t)B_ * LB);
            std::vector<int> token_last(B_);
            for (int b = 0; b < B_; b++) token_last[b] = b * P + P - 1;
            token_last_rows_ = upload_ints(token_last);
        } else {
            main_ = std::make_unique<KvStack>(cfg_.token_decoder, "gpt_neox.", model.table, B_, capacity, Tp_);
            embedded_ = DeviceBuffer<floatX>((size_t)B_ * Tp_ * HT);
        }
        hidden_ = DeviceBuffer<floatX>((size_t)B_ * HT);
        for (cudaEvent_t& e : events_) cudaCheck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        cudaCheck(cudaEventCreate(&prefill_done_));
        row_done_.assign(B_, 0);
        cudaCheck(cudaDeviceSynchronize());   // the uploads above went through the legacy stream
    }

    ~Generation() {
        for (cudaEvent_t e : events_) if (e) cudaEventDestroy(e);
        if (prefill_done_) cudaEventDestroy(prefill_done_);
    }
    Generation(const Generation&) = delete;
    Generation& operator=(const Generation&) = delete;

    int rows() const { return B_; }
    int padded_prompt_length() const { return Tp_; }   // tokens, pads included (block models: whole blocks)
    int pad(int row) const { return pad_[row]; }         // left pads of a row
    cudaStream_t stream() const { return gpu_.stream; }
    // Recorded on stream() when the last run's prefill was done (a timing event: decode time = stop - this).
    cudaEvent_t prefill_done() const { return prefill_done_; }

    // Prefill and decode. on_tokens(ready) runs on the host whenever the first `ready` generated ids of every row have
    // arrived in tokens() (ready grows; at most max_new_tokens). The run stops early once every row has stopped.
    template <typename OnTokens>
    void run(OnTokens&& on_tokens) {
        ready_ = 0;
        pending_head_ = pending_tail_ = 0;
        std::fill(row_done_.begin(), row_done_.end(), 0);
        prefill();
        cudaCheck(cudaEventRecord(prefill_done_, gpu_.stream));
        if (!cfg_.is_block) enqueue_copy(0, 1, on_tokens);
        for (int step = 0; step < steps_ && !all_done(); step++) {
            if (options_.cuda_graph) decode_work_.run(gpu_, {}, [&] { decode_step(); });   // eager once, then a graph
            else decode_step();
            const int first = cfg_.is_block ? step * cfg_.LB : step + 1;
            enqueue_copy(first, cfg_.is_block ? cfg_.LB : 1, on_tokens);
            poll(on_tokens, false);
        }
        poll(on_tokens, true);
        cudaCheck(cudaStreamSynchronize(gpu_.stream));
    }
    void run() { run([](int) {}); }

    // Row b's generated ids, valid for the first `ready` (of run's callback; all after run) entries.
    const int* tokens(int row) const { return host_tokens_.data() + (size_t)row * columns_; }
    int ready() const { return ready_; }
    // Row b's completion: its first max_new_tokens ids, cut before the first <|endoftext|> when stop_at_eos.
    std::vector<int> completion(int row) const {
        std::vector<int> out;
        for (int c = 0; c < std::min(ready_, max_new_); c++) {
            const int id = tokens(row)[c];
            if (options_.stop_at_eos && id == kEosId) break;
            out.push_back(id);
        }
        return out;
    }
    // keep_logits: (B, max_new_tokens, V) the logits each generated id was chosen from, as fp32.
    std::vector<float> kept_logits() const {
        if (!options_.keep_logits) throw std::runtime_error("kept_logits: the generation was not asked to keep logits");
        cudaCheck(cudaStreamSynchronize(gpu_.stream));
        std::vector<float> all((size_t)B_ * columns_ * cfg_.V), out;
        kept_.download(all.data(), all.size());
        for (int b = 0; b < B_; b++) {
            const float* first = all.data() + (size_t)b * columns_ * cfg_.V;
            out.insert(out.end(), first, first + (size_t)max_new_ * cfg_.V);
        }
        return out;
    }

private:
    static constexpr int kInFlight = 8;   // decode steps the host may run ahead of the ids it has received

    const InferenceModel& model_;
    ModelConfig cfg_;
    GenerationOptions options_;
    int longest_ = 0;   // validated first, before any member allocates
    int B_ = 0, max_new_ = 0, Tp_ = 0, n0_ = 0, steps_ = 0, columns_ = 0;
    std::vector<int> pad_;
    Gpu gpu_;                               // its stream (capturable) runs the generation and the decode graph
    std::unique_ptr<KvStack> main_;         // block decoder, or the vanilla stack
    std::unique_ptr<KvStack> token_;        // block models: the token decoder, its cache rewritten every block
    DeviceBuffer<int> prompt_ids_;          // (B, Tp) left-padded prompts
    DeviceBuffer<int> key_mask_;            // (B, main capacity) 1 = the cached position is visible
    DeviceBuffer<int> pos_shift_;           // vanilla: (B) left pads of each row
    DeviceBuffer<int> last_rows_;           // (B) the main stack's prefill output row that conditions the first step
    DeviceBuffer<int> token_last_rows_;     // block: (B) row b*P + P-1 of the token decoder's prefix output
    DeviceBuffer<int> counters_;            // [0] next main-cache position, [1] next output column
    DeviceBuffer<int> current_;             // (B) the newest id of each row
    DeviceBuffer<int> block_ids_;           // block: (B, LB) the block being generated
    DeviceBuffer<int> history_;             // (B, columns) every generated id
    DeviceBuffer<floatX> embedded_;         // block: (B*n0, DB) prefill, (B, DB) a new block; vanilla: (B*Tp, C), (B, C)
    DeviceBuffer<floatX> context_;          // block: (B, DB) the newest block-decoder output
    DeviceBuffer<floatX> prefix_;           // block: (B, P*HT) = (B*P, HT) prefix vectors
    DeviceBuffer<floatX> token_embedded_;   // block: (B, HT) the newest token's token-decoder embedding
    DeviceBuffer<floatX> hidden_;           // (B, HT) LM-head input gathered from a prefill output
    DeviceBuffer<floatX> logits_;           // (B, V)
    DeviceBuffer<float> kept_;              // keep_logits: (B, columns, V)
    PinnedBuffer<int> host_tokens_;         // (B, columns) the ids, copied after each step
    ReplayedWork decode_work_;              // decode_step(): run once as launches (cuBLASLt plans made), then replayed
    cudaEvent_t events_[kInFlight] = {};
    cudaEvent_t prefill_done_ = nullptr;
    int pending_ready_[kInFlight] = {};     // ids available once events_[slot] has completed
    int pending_head_ = 0, pending_tail_ = 0;
    int ready_ = 0;
    std::vector<char> row_done_;

    DeviceBuffer<int> upload_ints(const std::vector<int>& host) {
        DeviceBuffer<int> buffer(host.size());
        buffer.upload(host.data(), host.size());
        return buffer;
    }
    const floatX* param(const char* name) const { return model_.param(name); }

    // LM head and token choice for the B rows of input (B, HT); the ids go to output column dyn_col + col_offset
    // and, for slot >= 0, to block_ids[:, slot].
    void head_and_sample(const floatX* input, const int* dyn_col, int col_offset, int slot) {
        const int HT = cfg_.token_decoder.C, V = cfg_.V;
        const floatX* embed_out = param(cfg_.is_block ? "token_decoder.embed_out.weight" : "embed_out.weight");
        linear_forward(gpu_, logits_.data(), input, embed_out, nullptr, B_, HT, V);
        if (options_.keep_logits) {
            keep_logits_kernel<<<grid_for((size_t)B_ * V, 256), 256, 0, gpu_.stream>>>(kept_.data(), logits_.data(), B_, V, columns_,
                                                                                       dyn_col, col_offset);
            cudaCheckLaunch();
        }
        sample_kernel<<<B_, kSampleThreads, 0, gpu_.stream>>>(current_.data(), history_.data(), columns_, dyn_col, col_offset,
                                                              slot >= 0 ? block_ids_.data() : nullptr, cfg_.LB, slot,
                                                              logits_.data(), V, options_.sampling);
        cudaCheckLaunch();
    }

    // The prompts through the main stack; vanilla also chooses the first token.
    void prefill() {
        cudaStream_t stream = gpu_.stream;
        if (cfg_.is_block) {
            // embedder (SPEC 1.2): (B*Tp, DE) table rows are (B*n0, DB) block embeddings
            gather_rows(embedded_.data(), param("embedder.embeddings.weight"), prompt_ids_.data(), (size_t)B_ * Tp_, cfg_.DE, stream);
            main_->forward(gpu_, embedded_.data(), n0_, nullptr, 0, key_mask_.data(), nullptr, model_.params.data());
            gather_rows(context_.data(), main_->out(), last_rows_.data(), B_, cfg_.block_decoder.C, stream);
            set_counters_kernel<<<1, 1, 0, stream>>>(counters_.data(), n0_, 0);
        } else {
            const int C = cfg_.token_decoder.C;
            gather_rows(embedded_.data(), param("gpt_neox.embed_in.weight"), prompt_ids_.data(), (size_t)B_ * Tp_, C, stream);
            main_->forward(gpu_, embedded_.data(), Tp_, nullptr, 0, key_mask_.data(), pos_shift_.data(), model_.params.data());
            gather_rows(hidden_.data(), main_->out(), last_rows_.data(), B_, C, stream);
            head_and_sample(hidden_.data(), nullptr, 0, -1);
            set_counters_kernel<<<1, 1, 0, stream>>>(counters_.data(), Tp_, 1);
        }
        cudaCheckLaunch();
    }

    // One decode step: vanilla, one token; block, one block (LB tokens) and the block-decoder step after it.
    // Everything it launches is graph-capturable: no allocation, no host synchronisation, positions from counters_.
    void decode_step() {
        cudaStream_t stream = gpu_.stream;
        const floatX* params = model_.params.data();
        int* position = counters_.data();
        int* column = counters_.data() + 1;
        if (!cfg_.is_block) {
            const int C = cfg_.token_decoder.C;
            gather_rows(embedded_.data(), param("gpt_neox.embed_in.weight"), current_.data(), B_, C, stream);
            main_->forward(gpu_, embedded_.data(), 1, position, 0, key_mask_.data(), pos_shift_.data(), params);
            head_and_sample(main_->out(), column, 0, -1);
            advance_counters_kernel<<<1, 1, 0, stream>>>(counters_.data(), 1, 1);
            cudaCheckLaunch();
            return;
        }
        const int LB = cfg_.LB, P = cfg_.P, DB = cfg_.block_decoder.C, HT = cfg_.token_decoder.C;
        // expansion (SPEC 1.5): P prefix vectors, then the token decoder's local generation at positions 0..P+LB-2
        linear_forward(gpu_, prefix_.data(), context_.data(), param("token_decoder.expansion_layer.weight"),
                       param("token_decoder.expansion_layer.bias"), B_, DB, P * HT);
        token_->forward(gpu_, prefix_.data(), P, nullptr, 0, nullptr, nullptr, params);
        gather_rows(hidden_.data(), token_->out(), token_last_rows_.data(), B_, HT, stream);
        head_and_sample(hidden_.data(), column, 0, 0);
        for (int j = 0; j + 1 < LB; j++) {   // token j in, token j+1 out
            gather_rows(token_embedded_.data(), param("token_decoder.gpt_neox.embed_in.weight"), current_.data(), B_, HT, stream);
            token_->forward(gpu_, token_embedded_.data(), 1, nullptr, P + j, nullptr, nullptr, params);
            head_and_sample(token_->out(), column, j + 1, j + 1);
        }
        // the new block through the embedder and one block-decoder step at the next block position
        gather_rows(embedded_.data(), param("embedder.embeddings.weight"), block_ids_.data(), (size_t)B_ * LB, cfg_.DE, stream);
        main_->forward(gpu_, embedded_.data(), 1, position, 0, key_mask_.data(), nullptr, params);
        cudaCheck(cudaMemcpyAsync(context_.data(), main_->out(), (size_t)B_ * DB * sizeof(floatX), cudaMemcpyDeviceToDevice, stream));
        advance_counters_kernel<<<1, 1, 0, stream>>>(counters_.data(), 1, LB);
        cudaCheckLaunch();
    }

    // Copies output columns [first, first+count) to pinned memory and records when they are there.
    template <typename OnTokens>
    void enqueue_copy(int first, int count, OnTokens& on_tokens) {
        if (pending_tail_ - pending_head_ == kInFlight) poll_one(on_tokens, true);
        const size_t pitch = (size_t)columns_ * sizeof(int);
        cudaCheck(cudaMemcpy2DAsync(host_tokens_.data() + first, pitch, history_.data() + first, pitch, count * sizeof(int), B_,
                                    cudaMemcpyDeviceToHost, gpu_.stream));
        const int slot = pending_tail_ % kInFlight;
        cudaCheck(cudaEventRecord(events_[slot], gpu_.stream));
        pending_ready_[slot] = first + count;
        pending_tail_++;
    }

    // Takes the oldest pending copy if it has completed (or waits for it); returns whether it did.
    template <typename OnTokens>
    bool poll_one(OnTokens& on_tokens, bool wait) {
        if (pending_head_ == pending_tail_) return false;
        const int slot = pending_head_ % kInFlight;
        if (wait) {
            cudaCheck(cudaEventSynchronize(events_[slot]));
        } else {
            const cudaError_t status = cudaEventQuery(events_[slot]);
            if (status == cudaErrorNotReady) {
                const cudaError_t last = cudaGetLastError();   // clear it in case the runtime recorded "not ready"
                if (last != cudaErrorNotReady) cudaCheck(last);
                return false;
            }
            cudaCheck(status);
        }
        pending_head_++;
        const int ready = std::min(pending_ready_[slot], max_new_);
        for (int b = 0; b < B_; b++)
            for (int c = ready_; c < ready && !row_done_[b]; c++)
                if (options_.stop_at_eos && tokens(b)[c] == kEosId) row_done_[b] = 1;
        if (ready > ready_) {
            ready_ = ready;
            on_tokens(ready_);
        }
        return true;
    }
    template <typename OnTokens>
    void poll(OnTokens& on_tokens, bool wait) {
        while (poll_one(on_tokens, wait)) {}
    }
    bool all_done() const {
        if (ready_ >= max_new_) return true;
        return std::all_of(row_done_.begin(), row_done_.end(), [](char done) { return done != 0; });
    }
};

}  // namespace
