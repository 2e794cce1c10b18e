// test_reference.cpp: the CPU reference model checked by finite differences (every trainable tensor, block and
// vanilla, with padding) and against the PyTorch golden fixtures of dev/make_fixtures.py.
#include <cmath>
#include <cstdio>
#include <random>
#include "loader.h"
#include "test/reference.h"
#include "test/test_models.h"
#include "test/test_util.h"

using ref::Batch;
using ref::Reference;

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

// ----------------------------------------------------------------------------------------------------------------
// PyTorch golden fixtures (dev/make_fixtures.py: HF transformers GPT-NeoX modules in float64, stored as F32).
// Tolerances of issue 2: logits, loss and the 10 AdamW-step losses to 1e-5 relative, gradients to 1e-4.

static double relative_error_scalar(double out, double ref) { return std::fabs(out - ref) / std::fabs(ref); }

// Loads the fixture's weights and batch, then checks logits, loss, every gradient and 10 AdamW steps.
static void check_against_fixture(const char* config_name, const Batch& batch, const SafetensorsFile& golden) {
    Reference<float> model(config_by_name(config_name));
    SafetensorsFile weights = SafetensorsFile::open(fixture_path(std::string(config_name) + ".model.safetensors"));
    model.params = read_params_by_table(weights, model.table);

    const std::map<std::string, std::string>& meta = golden.metadata();
    CHECK(std::stod(meta.at("beta1")) == doctest::Approx(kAdamBeta1));
    CHECK(std::stod(meta.at("beta2")) == doctest::Approx(kAdamBeta2));
    CHECK(std::stod(meta.at("eps")) == doctest::Approx(kAdamEps));
    CHECK(std::stod(meta.at("weight_decay")) == doctest::Approx(kWeightDecay));
    CHECK(std::stod(meta.at("grad_clip")) == doctest::Approx(kGradClip));
    const float lr = std::stof(meta.at("lr"));

    model.zero_grad();
    double loss = model.forward(batch);
    model.backward();
    std::vector<float> ref_logits = golden.read_f32("logits");
    REQUIRE(ref_logits.size() == model.logits.size());
    double logits_error = relative_error(model.logits.data(), ref_logits.data(), ref_logits.size());
    double loss_error = relative_error_scalar(loss, golden.read_f32("loss")[0]);
    CHECK(logits_error < 1e-5);
    CHECK(loss_error < 1e-5);

    double worst_grad_error = 0.0;
    for (const ParamTensor& t : model.table.tensors) {
        CAPTURE(t.name);
        std::vector<float> ref_grad = golden.read_f32("grad." + t.name);
        REQUIRE(ref_grad.size() == t.numel);
        double error = relative_error(model.grads.data() + t.offset, ref_grad.data(), t.numel);
        if (!t.trainable) {   // never read by the forward pass: both gradients are exactly zero
            CHECK(error == 0.0);
            continue;
        }
        worst_grad_error = std::max(worst_grad_error, error);
        CHECK(error < 1e-4);
    }

    std::vector<float> ref_step_losses = golden.read_f32("step_losses"), ref_norms = golden.read_f32("grad_norms");
    REQUIRE(ref_step_losses.size() == 10);
    ref::AdamW<float> adamw(model.table);
    double worst_step_error = 0.0;
    for (int step = 0; step < 10; step++) {
        CAPTURE(step);
        model.zero_grad();
        double step_loss = model.forward(batch);
        model.backward();
        double norm = adamw.step(model.params, model.grads, model.table, lr);
        double error = std::max(relative_error_scalar(step_loss, ref_step_losses[step]), relative_error_scalar(norm, ref_norms[step]));
        worst_step_error = std::max(worst_step_error, error);
        CHECK(error < 1e-5);
    }
    MESSAGE(std::string(config_name) << " vs PyTorch: logits " << logits_error << ", loss " << loss_error << ", worst gradient "
                        << worst_grad_error << ", worst of 10 AdamW step losses and norms " << worst_step_error);
}

TEST_CASE("reference: tiny_block matches the PyTorch fixture (logits, loss, gradients, 10 AdamW steps)") {
    SafetensorsFile golden = SafetensorsFile::open(fixture_path("tiny_block.golden.safetensors"));
    Batch batch = fixture_batch(config_by_name("tiny_block"), golden);
    // The block mask is derived, never stored: check the derivation rule (SPEC 3.5) against the fixture's.
    std::vector<int32_t> block_mask = golden.read_i32("block_attention_mask");
    for (size_t i = 0; i < block_mask.size(); i++)
        CHECK(block_mask[i] == (batch.mask[4 * i] | batch.mask[4 * i + 1] | batch.mask[4 * i + 2] | batch.mask[4 * i + 3]));
    check_against_fixture("tiny_block", batch, golden);
}

TEST_CASE("reference: tiny_vanilla matches the PyTorch fixture (logits, loss, gradients, 10 AdamW steps)") {
    SafetensorsFile golden = SafetensorsFile::open(fixture_path("tiny_vanilla.golden.safetensors"));
    check_against_fixture("tiny_vanilla", fixture_batch(config_by_name("tiny_vanilla"), golden), golden);
}
