// test_model.cpp: model.h, the named configs, the tensor table and the learning-rate schedule.
// Expected counts are SPEC section 2's published numbers, not values computed by model.h.
#include <cmath>
#include <set>
#include "model.h"
#include "test/test_util.h"

// Millions rounded to two decimals, as SPEC section 2 prints them.
static double millions(size_t n) { return std::round(n / 1e4) / 100.0; }

TEST_CASE("model: parameter counts of the block configs match SPEC 2.2") {
    struct Expected { const char* name; double non_embedding, used, stored; };
    for (Expected e : {Expected{"block_main_b4_5", 4.87, 33.85, 46.72}, Expected{"block_main_b4_19", 19.44, 77.39, 103.15},
                       Expected{"block_main_b4_85", 86.24, 173.16, 211.80}, Expected{"block_main_b4_300", 304.41, 420.31, 471.82},
                       Expected{"block_main_b4_800", 814.13, 1045.93, 1148.96}, Expected{"block_main_b4_1.2b", 1217.00, 1448.80, 1551.82}}) {
        CAPTURE(e.name);
        ParamCounts n = count_params(build_tensor_table(config_by_name(e.name)));
        CHECK(millions(n.non_embedding) == doctest::Approx(e.non_embedding));
        CHECK(millions(n.used) == doctest::Approx(e.used));
        CHECK(millions(n.stored) == doctest::Approx(e.stored));
    }
}

TEST_CASE("model: parameter counts of the vanilla configs match SPEC 2.4") {
    struct Expected { const char* name; double non_embedding, total; };
    for (Expected e : {Expected{"vanilla_31", 14.19, 39.95}, Expected{"vanilla_70", 18.92, 70.43},
                       Expected{"vanilla_160", 85.06, 162.32}, Expected{"vanilla_410", 302.31, 405.33}}) {
        CAPTURE(e.name);
        ParamCounts n = count_params(build_tensor_table(config_by_name(e.name)));
        CHECK(millions(n.non_embedding) == doctest::Approx(e.non_embedding));
        CHECK(millions(n.used) == doctest::Approx(e.total));
        CHECK(n.stored == n.used);
    }
}

TEST_CASE("model: block_main_b4_1.2b checkpoint has SPEC 6.1's 298 tensors and 1,551,822,848 values") {
    TensorTable table = build_tensor_table(config_by_name("block_main_b4_1.2b"));
    CHECK(table.tensors.size() == 298);
    CHECK(count_params(table).stored == 1551822848ull);
    CHECK(table.get("token_decoder.expansion_layer.weight").shape == std::vector<size_t>{4096, 2048, 1});
    CHECK(table.get("embedder.embeddings.weight").shape == std::vector<size_t>{50304, 512});
    CHECK(table.get("block_decoder.gpt_neox.layers.11.attention.query_key_value.weight").shape == std::vector<size_t>{6144, 2048});
    CHECK(table.get("token_decoder.gpt_neox.layers.3.mlp.dense_4h_to_h.weight").shape == std::vector<size_t>{2048, 8192});
    CHECK(table.find("block_decoder.embed_out.weight") == nullptr);   // the block decoder has no LM head
}

TEST_CASE("model: head counts follow the autofill rule of SPEC 2.1/2.2") {
    // (config, block-decoder heads, head size, rotary dims) from the SPEC 2.2 table.
    struct Expected { const char* name; int heads, HS, rot; };
    for (Expected e : {Expected{"block_main_b4_5", 8, 32, 8}, Expected{"block_main_b4_19", 8, 64, 16},
                       Expected{"block_main_b4_85", 12, 64, 16}, Expected{"block_main_b4_300", 16, 64, 16},
                       Expected{"block_main_b4_800", 16, 128, 32}, Expected{"block_main_b4_1.2b", 16, 128, 32}}) {
        CAPTURE(e.name);
        ModelConfig c = config_by_name(e.name);
        CHECK(c.block_decoder.NH == e.heads);
        CHECK(c.block_decoder.HS() == e.HS);
        CHECK(c.block_decoder.rotary_dims() == e.rot);
        CHECK(c.token_decoder.NH == e.heads);
        CHECK(c.block_decoder.I == 4 * c.block_decoder.C);
    }
    CHECK(config_by_name("vanilla_31").token_decoder.I == 4096);   // not autofilled (SPEC 2.4)
}

TEST_CASE("model: the tensor table lays out one buffer, aligned, in order, trainable tensors first") {
    for (const char* name : {"tiny_block", "tiny_vanilla", "block_main_b4_85", "vanilla_160"}) {
        CAPTURE(name);
        TensorTable table = build_tensor_table(config_by_name(name));
        size_t end_of_previous = 0;
        bool seen_frozen = false;
        std::set<std::string> names;
        for (const ParamTensor& t : table.tensors) {
            CHECK(t.offset % kTensorAlignment == 0);
            CHECK(t.offset >= end_of_previous);
            CHECK(t.offset < end_of_previous + kTensorAlignment);   // no gap larger than the alignment needs
            end_of_previous = t.offset + t.numel;
            CHECK(names.insert(t.name).second);                        // unique checkpoint keys
            if (!t.trainable) seen_frozen = true;
            else CHECK_FALSE(seen_frozen);                              // no trainable tensor after a frozen one
            CHECK(t.decay);                                             // SPEC 3.3: decay on every parameter
            CHECK(t.bf16_tolerance >= 1e-3f);
            CHECK(t.bf16_tolerance <= 1e-2f);
        }
        CHECK(end_of_previous == table.num_params);
    }
    TensorTable block = build_tensor_table(config_by_name("tiny_block"));
    const ParamTensor& unused = block.get("block_decoder.gpt_neox.embed_in.weight");
    CHECK_FALSE(unused.trainable);
    CHECK(block.tensors.back().name == unused.name);
    CHECK(block.num_trainable <= unused.offset);
    CHECK(block.num_params == unused.offset + 96 * 48);
}

TEST_CASE("model: config errors name the problem") {
    CHECK_THROWS_WITH_AS(config_by_name("block_main_b4_86"), doctest::Contains("unknown config 'block_main_b4_86'"), std::runtime_error);
    ModelConfig c = config_by_name("tiny_block");
    c.T = 30;
    CHECK_THROWS_WITH_AS(validate_config(c), doctest::Contains("not a multiple of the block length"), std::runtime_error);
    c = config_by_name("tiny_block");
    c.token_decoder.NH = 3;
    CHECK_THROWS_WITH_AS(validate_config(c), doctest::Contains("not divisible by 3 heads"), std::runtime_error);
    c = config_by_name("tiny_block");
    c.DE = 10;
    CHECK_THROWS_WITH_AS(validate_config(c), doctest::Contains("block length * embedder width"), std::runtime_error);
    // the GPU reads rows as 16-byte vectors: widths and head sizes are multiples of 8
    c = config_by_name("tiny_block");
    c.token_decoder.I = 100;
    CHECK_THROWS_WITH_AS(validate_config(c), doctest::Contains("MLP width 100 and head size 16 must be multiples of 8"), std::runtime_error);
    c = config_by_name("tiny_block");
    c.block_decoder.NH = 4;   // head size 48 / 4 = 12
    CHECK_THROWS_WITH_AS(validate_config(c), doctest::Contains("head size 12 must be multiples of 8"), std::runtime_error);
}

TEST_CASE("model: learning-rate schedule, warmup then cosine to 10% (SPEC 3.4)") {
    // peak 1e-3, 10 warmup updates, 110 updates in all: the cosine runs over 100 updates.
    CHECK(learning_rate(0, 1e-3f, 10, 110) == doctest::Approx(1e-4));
    CHECK(learning_rate(4, 1e-3f, 10, 110) == doctest::Approx(5e-4));
    CHECK(learning_rate(9, 1e-3f, 10, 110) == doctest::Approx(1e-3));
    CHECK(learning_rate(10, 1e-3f, 10, 110) == doctest::Approx(1e-3 * (0.1 + 0.45 * (1 + std::cos(M_PI / 100)))));
    CHECK(learning_rate(59, 1e-3f, 10, 110) == doctest::Approx(5.5e-4));   // halfway: 0.1 + 0.9 * 0.5
    CHECK(learning_rate(109, 1e-3f, 10, 110) == doctest::Approx(1e-4));    // last update at 10% of peak
    CHECK(learning_rate(500, 1e-3f, 10, 110) == doctest::Approx(1e-4));    // stays there past the end
}

TEST_CASE("model: training FLOPs count the real architecture") {
    // tiny_vanilla (C 32, I 96, 2 layers, T 16, V 96), by hand: per layer 2*16*(4*32*32 + 2*32*96) = 327680 matmul
    // and 4*32*16*17/2 = 17408 attention; head 15*2*32*96 = 92160; forward 2*(327680+17408) + 92160 = 782336.
    CHECK(training_flops_per_sequence(config_by_name("tiny_vanilla")) == 3.0 * 782336);
    // tiny_block: block decoder (C 48, I 192, 2 layers) over 7 blocks: 2*(2*7*(4*48*48 + 2*48*192) + 4*48*7*8/2)
    // = 2*(387072 + 5376) = 784896; expansion 7*2*48*2*32 = 43008; token decoder (C 32, I 128, 2 layers) over
    // 7 rows of 5 positions: 7*2*(2*5*(4*32*32 + 2*32*128) + 4*32*5*6/2) = 7*2*(122880 + 1920) = 1747200;
    // head 7*4*2*32*96 = 172032.
    CHECK(training_flops_per_sequence(config_by_name("tiny_block")) == 3.0 * (784896 + 43008 + 1747200 + 172032));
}

TEST_CASE("model: the decode phase's bytes and FLOPs (the roofline of ./infer --bench)") {
    // tiny_vanilla by hand: a layer holds qkv 3*32*32+96, dense 32*32+32, MLP 32*96+96 and 96*32+32, two LayerNorms
    // 4*32: 10624 values; 2 layers + final LayerNorm 64 + embed_out 96*32 = 24384 weights read per token.
    // One step (B 1, prompt 5: the new token at position 5 sees 6 keys): KV reads 2 layers x 2 x 32 x 6 and the new
    // k, v 2 x 2 x 32, bf16: 1792 bytes; FLOPs 2 x 24384 + attention 4 x 32 x 6 x 2 layers.
    const ModelConfig vanilla = config_by_name("tiny_vanilla");
    const PhaseCost v = decode_cost(vanilla, build_tensor_table(vanilla), 1, 5, 1, 2);
    CHECK(v.bytes == 24384 * 2 + 1792);
    CHECK(v.flops == 2 * 24384 + 4 * 32 * 6 * 2);
    // tiny_block by hand: block decoder layer 3*48*48+144 + 48*48+48 + 48*192+192 + 192*48+48 + 4*48 = 28272, two
    // plus final LayerNorm 96: 56640; token decoder (as tiny_vanilla's layer with I 128): 12704 x 2 + 64 = 25472;
    // embed_out 3072; expansion 48*64 + 64 = 3136. A step reads the expansion once, the token decoder and embed_out
    // LB = 4 times, the block decoder once: 173952 weights. KV (B 1, prompt 2 blocks): the token decoder's 4 calls see
    // P+j = 2, 3, 4, 5 keys and write one more each: 18 x 2 layers x 2 x 32; the block decoder sees 3 blocks, writes
    // one: 4 x 2 x 2 x 48.
    const ModelConfig block = config_by_name("tiny_block");
    const TensorTable table = build_tensor_table(block);
    const PhaseCost b = decode_cost(block, table, 1, 8, 1, 2);
    CHECK(b.bytes == 173952 * 2 + (18 * 2 * 2 * 32 + 4 * 2 * 2 * 48) * 2);
    CHECK(b.flops == 2 * 173952 + 4 * 32 * (2 + 3 + 4 + 5) * 2 + 4 * 48 * 3 * 2);
    // FLOPs grow with the batch, weight bytes do not; later steps see more of the cache
    const PhaseCost b2 = decode_cost(block, table, 2, 8, 1, 2);
    CHECK(b2.flops == 2 * b.flops);
    CHECK(b2.bytes - b.bytes == (18 * 2 * 2 * 32 + 4 * 2 * 2 * 48) * 2);
    const PhaseCost two_steps = decode_cost(block, table, 1, 8, 2, 2);
    CHECK(two_steps.bytes - b.bytes == b.bytes + 1 * 2 * 2 * 48 * 2);   // the second block-decoder step sees one more block
}

TEST_CASE("model: the prefill's bytes and FLOPs (the whole-run ceiling of ./infer --bench)") {
    // tiny_vanilla, B 1, prompt 5, by hand: per layer 2*5*(4*32*32 + 2*32*96) = 102400 matmul and 4*32*5*6/2 = 1920
    // attention, 2 layers; the LM head on the last position 2*32*96 = 6144. Bytes: the 2 layers, final LayerNorm and
    // embed_out (24384 weights, as above) and the keys and values of 5 positions, 2 layers x 2 x 32 x 5, in bf16.
    const ModelConfig vanilla = config_by_name("tiny_vanilla");
    const PhaseCost v = prefill_cost(vanilla, build_tensor_table(vanilla), 1, 5, 2);
    CHECK(v.flops == 2 * (102400 + 1920) + 6144);
    CHECK(v.bytes == (24384 + 2 * 2 * 32 * 5) * 2);
    // tiny_block, B 3, prompt 8 tokens = 2 blocks: block decoder only, per layer 2*2*(4*48*48 + 2*48*192) = 110592
    // matmul and 4*48*2*3/2 = 576 attention; bytes: its 56640 weights once and 3 x 2 layers x 2 x 48 x 2 cached values.
    const ModelConfig block = config_by_name("tiny_block");
    const PhaseCost b = prefill_cost(block, build_tensor_table(block), 3, 8, 2);
    CHECK(b.flops == 3 * 2 * (110592 + 576));
    CHECK(b.bytes == (56640 + 3 * 2 * 2 * 48 * 2) * 2);
    const PhaseCost sum = v + b;
    CHECK(sum.flops == v.flops + b.flops);
    CHECK(sum.bytes == v.bytes + b.bytes);
}

// The shapes a checkpoint of this config stores, as a list (what a safetensors header gives).
static std::vector<std::pair<std::string, std::vector<size_t>>> stored_shapes(const ModelConfig& c) {
    std::vector<std::pair<std::string, std::vector<size_t>>> shapes;
    for (const ParamTensor& t : build_tensor_table(c).tensors) shapes.push_back({t.name, t.shape});
    return shapes;
}

TEST_CASE("model: the shape of a config-less block checkpoint is inferred (SPEC 6.1)") {
    for (const char* name : {"block_main_b4_5", "block_main_b4_85", "block_main_b4_1.2b"}) {
        CAPTURE(name);
        ModelConfig named = config_by_name(name);
        ModelConfig inferred = infer_block_config(stored_shapes(named));
        CHECK(inferred.name == name);   // recognised as the released main model
        CHECK(inferred.DE == named.DE);
        CHECK(inferred.LB == 4);
        CHECK(inferred.P == 2);
        CHECK(inferred.block_decoder.NH == named.block_decoder.NH);
        CHECK(inferred.token_decoder.L == named.token_decoder.L);
        CHECK(build_tensor_table(inferred).num_params == build_tensor_table(named).num_params);
    }
    CHECK(infer_block_config(stored_shapes(config_by_name("tiny_block"))).block_decoder.NH == 3);   // named: its heads

    ModelConfig unnamed = config_by_name("block_main_b4_19");
    unnamed.token_decoder.L = 5;   // no named config has this shape: heads come from the autofill rule
    ModelConfig inferred = infer_block_config(stored_shapes(unnamed));
    CHECK(inferred.name == "imported_block");
    CHECK(inferred.token_decoder.L == 5);
    CHECK(inferred.token_decoder.NH == 8);   // width 512: head size 64
    CHECK(inferred.block_decoder.I == 2048);

    auto shapes = stored_shapes(unnamed);
    shapes.erase(shapes.begin());   // embedder.embeddings.weight
    CHECK_THROWS_WITH_AS(infer_block_config(shapes), doctest::Contains("tensor embedder.embeddings.weight is missing"), std::runtime_error);
}
