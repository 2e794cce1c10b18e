// test_gpu.cu: GPU test cases (reported as skipped without a GPU). Outputs are poisoned before each check.
#include <cstring>
#include <random>
#include "blocktf.cu"
#include "loader.h"
#include "test/test_util.h"

// Host-side expectation of what the device stores for x: x itself (FP32) or its bf16 rounding (BF16).
static float expected_floatX(float x) {
    if (std::strcmp(kPrecisionName, "FP32") == 0) return x;
    return bf16_to_float(float_to_bf16(x));
}

static float floatX_to_float(floatX x) { return (float)x; }

GPU_TEST_CASE("gpu: parameter upload lays out the tensor table and rounds to floatX exactly") {
    ParameterBuffer weights(config_by_name("tiny_block"));
    std::vector<float> host(weights.table.num_params);
    std::mt19937 rng(42);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : host) x = normal(rng);
    host[0] = 1.0f + 1.0f / 256.0f;   // a bf16 tie: rounds to even (1.0)
    cudaCheck(cudaMemset(weights.params.data(), 0xFF, weights.table.num_params * sizeof(floatX)));   // poison: NaN
    weights.upload(host);

    std::vector<floatX> device(weights.table.num_params);
    weights.params.download(device.data(), device.size());
    size_t mismatches = 0;
    for (size_t i = 0; i < host.size(); i++) mismatches += floatX_to_float(device[i]) != expected_floatX(host[i]);
    CHECK(mismatches == 0);

    const ParamTensor& expansion = weights.table.get("token_decoder.expansion_layer.weight");
    floatX first;
    cudaCheck(cudaMemcpy(&first, weights.tensor(expansion.name), sizeof(floatX), cudaMemcpyDeviceToHost));
    CHECK(floatX_to_float(first) == expected_floatX(host[expansion.offset]));
}
