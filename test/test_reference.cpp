// test_reference.cpp: the CPU reference model checked by finite differences (every trainable tensor, block and
// vanilla, with padding) and against the PyTorch golden fixtures of dev/make_fixtures.py.
#include <cmath>
#include <cstdio>
#include <random>
#include "test/reference.h"
#include "test/test_util.h"

using ref::Batch;
using ref::Reference;

// Weights on the scale where every term matters (the same scheme as dev/make_fixtures.py): matrices N(0, 1/fan_in),
// embedding tables N(0, 1), biases N(0, 0.1²), LayerNorm weights 1 + N(0, 0.1²).
template <typename Real>
static void randomize_params(Reference<Real>& model, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (const ParamTensor& t : model.table.tensors) {
        Real* p = model.params.data() + t.offset;
        bool is_layernorm = t.name.find("layernorm") != std::string::npos || t.name.find("layer_norm") != std::string::npos;
        bool is_weight = t.name.size() > 6 && t.name.compare(t.name.size() - 6, 6, "weight") == 0;
        for (size_t i = 0; i < t.numel; i++) {
            double z = normal(rng);
            if (t.is_embedding) p[i] = (Real)z;
            else if (is_layernorm && is_weight) p[i] = (Real)(1.0 + 0.1 * z);
            else if (t.shape.size() == 1) p[i] = (Real)(0.1 * z);
            else p[i] = (Real)(z / std::sqrt((double)t.shape[1]));
        }
    }
}

// A block batch (B = 2, T = 32, LB = 4) with every masking case of SPEC 3.5:
// sample 0: document with left pad 3, its EOS on the last slot of a block, then a document with left pad 1 whose
// EOS is followed by padding to the block boundary; sample 1: an EOS mid-sequence and a fully padded block 5.
static Batch block_test_batch(uint64_t seed) {
    std::mt19937_64 rng(seed);
    Batch batch;
    batch.B = 2;
    batch.T = 32;
    batch.ids.resize(64);
    batch.mask.assign(64, 1);
    for (int& id : batch.ids) id = 2 + (int)(rng() % 94);
    auto pad = [&](int b, int t) { batch.ids[b * 32 + t] = kEosId; batch.mask[b * 32 + t] = 0; };
    auto eos = [&](int b, int t) { batch.ids[b * 32 + t] = kEosId; };
    for (int t = 0; t < 3; t++) pad(0, t);   // block 0: left pad 3, one token
    eos(0, 11);                              // document A ends on the last slot of block 2
    pad(0, 12);                              // document B: left pad 1 in block 3
    eos(0, 18);                              // ... ends mid block 4
    pad(0, 19);                              // right pad to the block boundary
    eos(1, 9);
    for (int t = 20; t < 24; t++) pad(1, t); // block 5 is all padding
    return batch;
}

// A vanilla batch (B = 2, T = 16) with three unscored targets.
static Batch vanilla_test_batch(uint64_t seed) {
    std::mt19937_64 rng(seed);
    Batch batch;
    batch.B = 2;
    batch.T = 16;
    batch.ids.resize(32);
    batch.mask.assign(32, 1);
    for (int& id : batch.ids) id = (int)(rng() % 96);
    batch.ids[7] = kEosId;
    batch.mask[5] = batch.mask[16 + 9] = batch.mask[16 + 15] = 0;
    return batch;
}

// Central differences in double along a random unit direction d of each trainable tensor:
// (loss(p + h d) - loss(p - h d)) / 2h must equal <grad, d>. One check covers every element of the tensor;
// h = 1e-4 keeps the truncation error (~h²) and the rounding error (~1e-16 / h) both near 1e-9 relative.
static void check_gradients_by_finite_differences(const char* config, const Batch& batch) {
    Reference<double> model(config_by_name(config));
    randomize_params(model, 1234);
    model.zero_grad();
    double loss = model.forward(batch);
    model.backward();
    REQUIRE(std::isfinite(loss));

    std::mt19937_64 rng(99);
    std::normal_distribution<double> normal(0.0, 1.0);
    const double h = 1e-4;
    double worst = 0.0;
    for (const ParamTensor& t : model.table.tensors) {
        CAPTURE(t.name);
        const double* grad = model.grads.data() + t.offset;
        double* p = model.params.data() + t.offset;
        if (!t.trainable) {   // the block decoder's embed_in: saved in checkpoints, never read
            for (size_t i = 0; i < t.numel; i++) REQUIRE(grad[i] == 0.0);
            continue;
        }
        for (int trial = 0; trial < 2; trial++) {
            std::vector<double> direction(t.numel), saved(p, p + t.numel);
            double norm = 0.0, analytic = 0.0;
            for (double& d : direction) {
                d = normal(rng);
                norm += d * d;
            }
            for (size_t i = 0; i < t.numel; i++) {
                direction[i] /= std::sqrt(norm);
                analytic += grad[i] * direction[i];
            }
            for (size_t i = 0; i < t.numel; i++) p[i] = saved[i] + h * direction[i];
            double loss_plus = model.forward(batch);
            for (size_t i = 0; i < t.numel; i++) p[i] = saved[i] - h * direction[i];
            double loss_minus = model.forward(batch);
            std::copy(saved.begin(), saved.end(), p);
            double numeric = (loss_plus - loss_minus) / (2 * h);
            double error = std::fabs(numeric - analytic) / (std::fabs(analytic) + 1e-8);
            worst = std::max(worst, error);
            CAPTURE(analytic);
            CAPTURE(numeric);
            CHECK(error < 1e-5);
        }
    }
    MESSAGE(std::string(config) << ": worst finite-difference relative error " << worst);
}

TEST_CASE("reference: block gradients match finite differences (padding, EOS on a boundary, padded block)") {
    check_gradients_by_finite_differences("tiny_block", block_test_batch(7));
}

TEST_CASE("reference: vanilla gradients match finite differences (with unscored targets)") {
    check_gradients_by_finite_differences("tiny_vanilla", vanilla_test_batch(8));
}

TEST_CASE("reference: the mask rules decide what is scored, never the id") {
    Reference<double> model(config_by_name("tiny_block"));
    randomize_params(model, 5);
    Batch batch = block_test_batch(3);
    double loss = model.forward(batch);
    // The last slot of the last block is a target only: with mask 0 its id cannot matter.
    batch.mask[63] = 0;
    double loss_unscored = model.forward(batch);
    batch.ids[63] = 17;
    CHECK(model.forward(batch) == loss_unscored);
    // An EOS (id 0) with mask 1 is scored, unlike a pad with the same id.
    CHECK(loss_unscored != loss);
    CHECK(batch.ids[11] == kEosId);
    batch.mask[11] = 0;
    CHECK(model.forward(batch) != loss_unscored);
}

TEST_CASE("reference: a vanilla model scores position t+1 from tokens 0..t only (causality)") {
    Reference<double> model(config_by_name("tiny_vanilla"));
    randomize_params(model, 6);
    Batch batch = vanilla_test_batch(4);
    model.forward(batch);
    std::vector<double> before = model.logits;
    batch.ids[10] = (batch.ids[10] + 1) % 96;   // sample 0, position 10
    model.forward(batch);
    const size_t V = 96;
    for (size_t t = 0; t < 16; t++) {
        double diff = 0.0;
        for (size_t v = 0; v < V; v++) diff += std::fabs(model.logits[t * V + v] - before[t * V + v]);
        if (t < 10) CHECK(diff == 0.0);
        else CHECK(diff > 0.0);
    }
}
