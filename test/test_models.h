// test_models.h: weights, batches and fixture loading shared by the CPU reference tests and the GPU tests.
// defines: randomize_params, block_test_batch, vanilla_test_batch, read_params_by_table, fixture_batch
#pragma once
#include <cmath>
#include <random>
#include <string>
#include <vector>
#include "loader.h"
#include "model.h"
#include "test/reference.h"
#include "test/test_util.h"

using ref::Batch;
using ref::Reference;

// Weights on the scale where every term matters (the same scheme as dev/make_fixtures.py): matrices N(0, 1/fan_in),
// input embedding tables N(0, 1), biases N(0, 0.1²), LayerNorm weights 1 + N(0, 0.1²). The LM head embed_out is
// a Linear layer and is drawn like one, so logits are O(1) as in a trained model.
template <typename Real>
inline void randomize_params(Reference<Real>& model, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (const ParamTensor& t : model.table.tensors) {
        Real* p = model.params.data() + t.offset;
        bool is_layernorm = t.name.find("layernorm") != std::string::npos || t.name.find("layer_norm") != std::string::npos;
        bool is_weight = t.name.size() > 6 && t.name.compare(t.name.size() - 6, 6, "weight") == 0;
        for (size_t i = 0; i < t.numel; i++) {
            double z = normal(rng);
            if (t.is_embedding && t.name.find("embed_out") == std::string::npos) p[i] = (Real)z;
            else if (is_layernorm && is_weight) p[i] = (Real)(1.0 + 0.1 * z);
            else if (t.shape.size() == 1) p[i] = (Real)(0.1 * z);
            else p[i] = (Real)(z / std::sqrt((double)t.shape[1]));
        }
    }
}

// A block batch (B = 2, T = 32, LB = 4) with every masking case of SPEC 3.5:
// sample 0: document with left pad 3, its EOS on the last slot of a block, then a document with left pad 1 whose
// EOS is followed by padding to the block boundary; sample 1: an EOS mid-sequence and a fully padded block 5.
inline Batch block_test_batch(uint64_t seed) {
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
inline Batch vanilla_test_batch(uint64_t seed) {
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

// Every tensor of the table, by its checkpoint key and shape, into one buffer laid out by the table.
inline std::vector<float> read_params_by_table(const SafetensorsFile& file, const TensorTable& table) {
    std::vector<float> params(table.num_params);
    for (const ParamTensor& t : table.tensors) {
        const SafeTensor& stored = file.get(t.name);
        std::vector<size_t> shape(stored.shape.begin(), stored.shape.end());
        REQUIRE_MESSAGE(shape == t.shape, t.name << " has the wrong shape");
        std::vector<float> values = file.read_f32(t.name);
        std::copy(values.begin(), values.end(), params.begin() + t.offset);
    }
    REQUIRE(file.tensors().size() == table.tensors.size());   // no tensor the table does not know
    return params;
}


// The batch of a golden fixture (dev/make_fixtures.py): block models store input_ids and attention_mask (B, NB, LB);
// vanilla models input_ids and HF labels (B, T), -100 = not scored, which become the mask.
inline Batch fixture_batch(const ModelConfig& config, const SafetensorsFile& golden) {
    const SafeTensor& ids = golden.get("input_ids");
    Batch batch;
    batch.B = (int)ids.shape[0];
    batch.ids = golden.read_i32("input_ids");
    batch.T = (int)(batch.ids.size() / batch.B);
    if (config.is_block) {
        batch.mask = golden.read_i32("attention_mask");
    } else {
        std::vector<int32_t> labels = golden.read_i32("labels");
        for (size_t i = 0; i < labels.size(); i++) {
            batch.mask.push_back(labels[i] != -100);
            REQUIRE((labels[i] == -100 || labels[i] == batch.ids[i]));   // HF labels are the ids themselves
        }
    }
    return batch;
}
