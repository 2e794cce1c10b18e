// blocktf.cu: the GPU side of blocktf, included by train.cu, infer.cu and the GPU tests (llm.c style: one file
// holds the model's device code; model-agnostic pieces live in headers).
// defines: floatX (the storage type of weights and activations), cudaCheck/cublasCheck, DeviceBuffer,
// the fp32 -> floatX conversion kernel, ParameterBuffer (one device buffer laid out by the tensor table).
//
// Forward, backward and AdamW kernels come with issue 5; this file holds what they stand on.
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include "model.h"

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

inline void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
    if (status != cudaSuccess)
        throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(status) + " in " + call + " at " + file +
                                 ":" + std::to_string(line));
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
// A typed device allocation that frees itself. Move-only.
template <typename T>
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t count) : count_(count) {
        if (count > 0) cudaCheck(cudaMalloc(&data_, count * sizeof(T)));
    }
    DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), count_(other.count_) { other.data_ = nullptr; other.count_ = 0; }
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
        std::swap(data_, other.data_);
        std::swap(count_, other.count_);
        return *this;
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { if (data_) cudaFree(data_); }

    T* data() const { return data_; }
    size_t size() const { return count_; }
    void upload(const T* host, size_t count) { cudaCheck(cudaMemcpy(data_, host, count * sizeof(T), cudaMemcpyHostToDevice)); }
    void download(T* host, size_t count) const { cudaCheck(cudaMemcpy(host, data_, count * sizeof(T), cudaMemcpyDeviceToHost)); }

private:
    T* data_ = nullptr;
    size_t count_ = 0;
};

// ----------------------------------------------------------------------------------------------------------------
// fp32 -> floatX, round to nearest even (the rounding of __float2bfloat16_rn). in: (n) fp32   out: (n) floatX
// One thread per element; a grid-stride loop so any n fits the grid.

__device__ inline floatX to_floatX(float x) {
#if defined(BLOCKTF_PRECISION_FP32)
    return x;
#else
    return __float2bfloat16_rn(x);
#endif
}

__global__ void convert_to_floatX_kernel(floatX* out, const float* in, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = to_floatX(in[i]);
}

inline void convert_to_floatX(floatX* out, const float* in, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    const int block_size = 256;
    const size_t blocks_needed = (n + block_size - 1) / block_size;
    const int grid_size = (int)std::min<size_t>(blocks_needed, 65536);
    convert_to_floatX_kernel<<<grid_size, block_size, 0, stream>>>(out, in, n);
    cudaCheckLaunch();
}

// ----------------------------------------------------------------------------------------------------------------
// The model's weights on the GPU: one floatX buffer of table.num_params elements, each tensor at its table
// offset, plus the fp32 master copy the optimizer updates.
struct ParameterBuffer {
    TensorTable table;
    DeviceBuffer<float> master;   // (num_params) fp32
    DeviceBuffer<floatX> params;  // (num_params) what the kernels read

    explicit ParameterBuffer(const ModelConfig& config)
        : table(build_tensor_table(config)), master(table.num_params), params(table.num_params) {}

    // host: (num_params) fp32, laid out by the table.
    void upload(const std::vector<float>& host) {
        if (host.size() != table.num_params) throw std::runtime_error("ParameterBuffer::upload: wrong number of values");
        master.upload(host.data(), host.size());
        convert_to_floatX(params.data(), master.data(), host.size(), 0);
        cudaCheck(cudaDeviceSynchronize());
    }
    floatX* tensor(const std::string& name) const { return params.data() + table.get(name).offset; }
};

inline void print_device_info() {
    int device = 0;
    cudaDeviceProp prop;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaGetDeviceProperties(&prop, device));
    std::printf("device: %s, compute capability %d.%d, %d SMs, %.1f GiB; built for PRECISION=%s\n", prop.name, prop.major,
                prop.minor, prop.multiProcessorCount, prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), kPrecisionName);
}
