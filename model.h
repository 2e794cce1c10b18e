// model.h: what a blocktf model is, independent of where it runs.
// defines: StackConfig, ModelConfig, named configs (SPEC section 2), ParamTensor/TensorTable (the one table of
// parameter tensors), the optimizer constants (SPEC 3.3) and the learning-rate schedule (SPEC 3.4).
//
// Dimension names used in shape comments everywhere in blocktf:
//   B batch (sequences), T tokens per sequence, C hidden width, NH heads, HS head size, L layers, V vocab rows,
//   I MLP width; block models: LB block length, NB = T/LB blocks, P prefix vectors (expansion ratio R),
//   DE embedder width per token (block decoder width = LB*DE).
#pragma once
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

// ----------------------------------------------------------------------------------------------------------------
// Constants with the source of their value.

constexpr int kPythiaVocab = 50304;         // Pythia's embedding rows (tokenizer has 50277 ids, padded to 64*786)
constexpr int kTrainSeqLen = 2048;          // max_length of every config (SPEC 2.1)
constexpr float kLayerNormEps = 1e-5f;      // GPT-NeoX layer_norm_eps (SPEC 1.1)
constexpr float kRotaryBase = 10000.0f;     // rotary_emb_base (SPEC 1.1)
constexpr int kRotaryPctDenominator = 4;    // rotary_pct = 0.25: the first HS/4 dims of each head are rotated
constexpr int kEosId = 0;                   // <|endoftext|>; also BOS and the training PAD id (SPEC 3.5)

// AdamW as DeepSpeed ran it (SPEC 3.3): decoupled weight decay on every parameter, global-norm clipping.
constexpr float kAdamBeta1 = 0.9f;
constexpr float kAdamBeta2 = 0.95f;
constexpr float kAdamEps = 1e-8f;
constexpr float kWeightDecay = 0.1f;
constexpr float kGradClip = 1.0f;
constexpr float kClipEps = 1e-6f;           // clip coefficient = clip / (norm + 1e-6), as torch and DeepSpeed do
constexpr float kMinLrRatio = 0.1f;         // cosine decays to 10% of the peak (cos_min_ratio, SPEC 3.4)

// ----------------------------------------------------------------------------------------------------------------
// Configuration.

// One GPT-NeoX stack (SPEC 1.1): L layers of width C with NH heads and an MLP of width I.
struct StackConfig {
    int L = 0;    // layers
    int C = 0;    // hidden width
    int NH = 0;   // attention heads
    int I = 0;    // MLP width
    int HS() const { return C / NH; }                          // head size
    int rotary_dims() const { return HS() / kRotaryPctDenominator; }
};

// Head count for a block-model stack of width C when the config names none (util/config.py autofill, SPEC 2.1):
// head size 32 up to width 256, 64 up to 1536, 128 above. Also used to infer shapes of released checkpoints.
inline int autofill_heads(int C) {
    int head_size = C <= 256 ? 32 : C <= 1536 ? 64 : 128;
    return C / head_size;
}

// Training settings a named config carries (SPEC 2.2, 2.4); train.cu's flags override them.
struct TrainDefaults {
    float lr = 0;               // peak learning rate
    int warmup = 0;             // linear warmup updates
    int steps = 0;              // total optimizer updates (cosine length)
    int batch = 0;              // sequences per optimizer update
    int micro_batch = 0;        // sequences per forward/backward on one device
    bool pad_blocks = false;    // random first-block left pad + pad to block boundary (SPEC 3.5, 10.4)
};

struct ModelConfig {
    std::string name;
    bool is_block = false;      // Block Transformer, or vanilla GPT-NeoX
    int V = kPythiaVocab;       // vocab rows of every embedding table
    int T = kTrainSeqLen;       // training sequence length in tokens
    // Block Transformer only:
    int LB = 0;                 // block length L_B
    int P = 0;                  // prefix vectors from the expansion layer (expansion ratio R)
    int DE = 0;                 // embedder width per token; block decoder width = LB * DE
    StackConfig block_decoder;  // causal over blocks, C = LB * DE
    // The stack that predicts tokens: the token decoder of a block model, or the whole vanilla model.
    StackConfig token_decoder;
    TrainDefaults train;

    int NB() const { return T / LB; }            // blocks per training sequence
    int token_seq_len() const { return P + LB - 1; }  // token-decoder input: P prefix vectors + LB-1 tokens
};

// Throws a message naming the first thing that does not divide or is out of range.
inline void validate_config(const ModelConfig& c) {
    auto fail = [&](const std::string& what) { throw std::runtime_error("config '" + c.name + "': " + what); };
    auto check_stack = [&](const StackConfig& s, const char* which) {
        std::string w = which;
        if (s.L <= 0 || s.C <= 0 || s.NH <= 0 || s.I <= 0) fail(w + ": layers, width, heads and MLP width must be > 0");
        if (s.C % s.NH != 0) fail(w + ": width " + std::to_string(s.C) + " is not divisible by " + std::to_string(s.NH) + " heads");
        if (s.C % 8 != 0 || s.I % 8 != 0 || s.HS() % 8 != 0)
            fail(w + ": width " + std::to_string(s.C) + ", MLP width " + std::to_string(s.I) + " and head size " + std::to_string(s.HS()) +
                 " must be multiples of 8 (the GPU reads rows as 16-byte vectors)");
        if (s.rotary_dims() < 2 || s.rotary_dims() % 2 != 0) fail(w + ": head size " + std::to_string(s.HS()) + " gives an odd or empty rotary slice (HS/4)");
    };
    if (c.V <= 0 || c.V > 65536) fail("vocab rows must be in 1..65536 (token ids are stored as uint16)");
    if (c.T <= 1) fail("sequence length must be > 1");
    check_stack(c.token_decoder, c.is_block ? "token decoder" : "decoder");
    if (!c.is_block) return;
    check_stack(c.block_decoder, "block decoder");
    if (c.LB <= 0 || c.P <= 0 || c.DE <= 0) fail("block length, prefix length and embedder width must be > 0");
    if (c.block_decoder.C != c.LB * c.DE) fail("block decoder width must equal block length * embedder width");
    if (c.T % c.LB != 0) fail("sequence length " + std::to_string(c.T) + " is not a multiple of the block length " + std::to_string(c.LB));
    if (c.NB() < 2) fail("a training sequence needs at least 2 blocks (block 0 is never a target)");
}

// ----------------------------------------------------------------------------------------------------------------
// Named configs: SPEC section 2 plus two tiny ones for tests (the same numbers as dev/make_fixtures.py).

inline StackConfig autofilled_stack(int L, int C) { return StackConfig{L, C, autofill_heads(C), 4 * C}; }

inline ModelConfig block_main(const char* name, int DE, int L, int C, TrainDefaults train) {
    ModelConfig c;
    c.name = name;
    c.is_block = true;
    c.LB = 4;
    c.P = 2;
    c.DE = DE;
    c.block_decoder = autofilled_stack(L, C);
    c.token_decoder = autofilled_stack(L, C);
    c.train = train;
    return c;
}

inline ModelConfig vanilla(const char* name, StackConfig stack, TrainDefaults train) {
    ModelConfig c;
    c.name = name;
    c.token_decoder = stack;
    c.train = train;
    return c;
}

inline std::vector<ModelConfig> named_configs() {
    //                      lr     warmup  steps   batch micro pad
    TrainDefaults small_run{1e-3f, 3000, 572000, 256, 32, true};
    TrainDefaults b85_run{6e-4f, 3000, 572000, 256, 8, true};
    TrainDefaults b300_run{3e-4f, 3000, 572000, 256, 8, false};   // >= 300M trained without padding (SPEC 2.1)
    TrainDefaults b800_run{3e-4f, 1500, 286000, 512, 16, false};
    TrainDefaults b1200_run{2e-4f, 1500, 286000, 512, 16, false};

    std::vector<ModelConfig> configs = {
        block_main("block_main_b4_5", 64, 3, 256, small_run),
        block_main("block_main_b4_19", 128, 3, 512, small_run),
        block_main("block_main_b4_85", 192, 6, 768, b85_run),
        block_main("block_main_b4_300", 256, 12, 1024, b300_run),
        block_main("block_main_b4_800", 512, 8, 2048, b800_run),
        block_main("block_main_b4_1.2b", 512, 12, 2048, b1200_run),
        // Vanilla Pythia configs (SPEC 2.4); no autofill: vanilla_31 keeps pythia-410m's I = 4096 as the code did.
        vanilla("vanilla_31", StackConfig{6, 256, 8, 4096}, TrainDefaults{1e-3f, 3000, 572000, 256, 32, false}),
        vanilla("vanilla_70", StackConfig{6, 512, 8, 2048}, TrainDefaults{1e-3f, 3000, 572000, 256, 32, false}),
        vanilla("vanilla_160", StackConfig{12, 768, 12, 3072}, TrainDefaults{6e-4f, 3000, 572000, 256, 8, false}),
        vanilla("vanilla_410", StackConfig{24, 1024, 16, 4096}, TrainDefaults{3e-4f, 3000, 572000, 256, 8, false}),
    };

    // Tiny configs for tests: widths that differ between stacks and from 4*C, so a swapped dimension shows.
    TrainDefaults tiny_run{1e-3f, 10, 100, 4, 2, true};
    ModelConfig tiny_block;
    tiny_block.name = "tiny_block";
    tiny_block.is_block = true;
    tiny_block.V = 96;
    tiny_block.T = 32;
    tiny_block.LB = 4;
    tiny_block.P = 2;
    tiny_block.DE = 12;
    tiny_block.block_decoder = StackConfig{2, 48, 3, 192};
    tiny_block.token_decoder = StackConfig{2, 32, 2, 128};
    tiny_block.train = tiny_run;
    configs.push_back(tiny_block);

    ModelConfig tiny_vanilla = vanilla("tiny_vanilla", StackConfig{2, 32, 2, 96}, tiny_run);
    tiny_vanilla.V = 96;
    tiny_vanilla.T = 16;
    configs.push_back(tiny_vanilla);
    return configs;
}

inline ModelConfig config_by_name(const std::string& name) {
    std::string known;
    for (const ModelConfig& c : named_configs()) {
        if (c.name == name) {
            validate_config(c);
            return c;
        }
        known += (known.empty() ? "" : ", ") + c.name;
    }
    throw std::runtime_error("unknown config '" + name + "'; known configs: " + known);
}

// ----------------------------------------------------------------------------------------------------------------
// The one table of parameter tensors. Everything that lists parameters derives from it: buffer sizes and
// offsets, checkpoint names, shapes and order, weight-decay flags, parameter counts and test tolerances.

struct ParamTensor {
    std::string name;            // the original checkpoint key (SPEC 6.1 / 6.2)
    std::vector<size_t> shape;   // as stored in the checkpoint: Linear weights are [out, in]
    size_t numel = 0;
    size_t offset = 0;           // element offset in the one parameter buffer (and in grads, master, m, v),
                                 // a multiple of kTensorAlignment
    bool is_embedding = false;   // a [V, width] table: excluded from the "non-embedding" count
    bool trainable = true;       // false only for the block decoder's embed_in, saved but never used (SPEC 1.3)
    bool decay = true;           // weight decay applies: every parameter in the original (SPEC 3.3)
    float bf16_tolerance = 0;    // max norm-wise relative error of this tensor's gradient in the BF16 build
};

struct TensorTable {
    std::vector<ParamTensor> tensors;   // trainable tensors first, so gradient/optimizer buffers are a prefix
    size_t num_params = 0;              // buffer length in elements: every tensor, with alignment gaps
    size_t num_trainable = 0;           // the prefix of the buffer that has gradients and optimizer state

    const ParamTensor* find(const std::string& name) const {
        for (const ParamTensor& t : tensors) if (t.name == name) return &t;
        return nullptr;
    }
    const ParamTensor& get(const std::string& name) const {
        const ParamTensor* t = find(name);
        if (!t) throw std::runtime_error("no parameter tensor named '" + name + "'");
        return *t;
    }
};

// Every tensor starts at a multiple of 128 elements (256 bytes in bf16), the alignment cuBLASLt's fastest
// kernels want; the gaps are never read.
constexpr size_t kTensorAlignment = 128;

// Tolerances for the BF16 build: the norm-wise relative error allowed for a gradient of this kind of tensor when
// one GPU kernel is compared with the CPU reference on identical inputs (one bf16 rounding of the output is ~2^-9;
// sums over many rows, as for biases, LayerNorm parameters and embeddings, are held a little looser). The GPU
// tests hold the whole model, where bf16 roundings add up along the chain, to a documented multiple of these.
constexpr float kBf16TolMatrix = 5e-3f;
constexpr float kBf16TolVector = 1e-2f;
constexpr float kBf16TolEmbedding = 1e-2f;

inline void add_tensor(std::vector<ParamTensor>& list, std::string name, std::vector<size_t> shape,
                       bool is_embedding = false) {
    ParamTensor t;
    t.name = std::move(name);
    t.shape = std::move(shape);
    t.numel = 1;
    for (size_t d : t.shape) t.numel *= d;
    t.is_embedding = is_embedding;
    t.bf16_tolerance = is_embedding ? kBf16TolEmbedding : t.shape.size() == 1 ? kBf16TolVector : kBf16TolMatrix;
    list.push_back(std::move(t));
}

// The 12 tensors of one GPT-NeoX layer (SPEC 1.1), names relative to the stack prefix.
inline void add_layer_tensors(std::vector<ParamTensor>& list, const std::string& prefix, const StackConfig& s, int l) {
    const size_t C = s.C, I = s.I;
    std::string p = prefix + "layers." + std::to_string(l) + ".";
    add_tensor(list, p + "input_layernorm.weight", {C});
    add_tensor(list, p + "input_layernorm.bias", {C});
    add_tensor(list, p + "post_attention_layernorm.weight", {C});
    add_tensor(list, p + "post_attention_layernorm.bias", {C});
    add_tensor(list, p + "attention.query_key_value.weight", {3 * C, C});
    add_tensor(list, p + "attention.query_key_value.bias", {3 * C});
    add_tensor(list, p + "attention.dense.weight", {C, C});
    add_tensor(list, p + "attention.dense.bias", {C});
    add_tensor(list, p + "mlp.dense_h_to_4h.weight", {I, C});
    add_tensor(list, p + "mlp.dense_h_to_4h.bias", {I});
    add_tensor(list, p + "mlp.dense_4h_to_h.weight", {C, I});
    add_tensor(list, p + "mlp.dense_4h_to_h.bias", {C});
}

// A GPT-NeoX stack's layers and final LayerNorm (its embed_in is added by the caller).
inline void add_stack_tensors(std::vector<ParamTensor>& list, const std::string& prefix, const StackConfig& s) {
    for (int l = 0; l < s.L; l++) add_layer_tensors(list, prefix, s, l);
    add_tensor(list, prefix + "final_layer_norm.weight", {(size_t)s.C});
    add_tensor(list, prefix + "final_layer_norm.bias", {(size_t)s.C});
}

inline TensorTable build_tensor_table(const ModelConfig& c) {
    validate_config(c);
    std::vector<ParamTensor> list;
    const size_t V = c.V;
    if (c.is_block) {
        const size_t DB = c.block_decoder.C, HT = c.token_decoder.C;
        add_tensor(list, "embedder.embeddings.weight", {V, (size_t)c.DE}, true);
        add_stack_tensors(list, "block_decoder.gpt_neox.", c.block_decoder);
        add_tensor(list, "token_decoder.gpt_neox.embed_in.weight", {V, HT}, true);
        add_stack_tensors(list, "token_decoder.gpt_neox.", c.token_decoder);
        add_tensor(list, "token_decoder.embed_out.weight", {V, HT}, true);
        add_tensor(list, "token_decoder.expansion_layer.weight", {(size_t)c.P * HT, DB, 1});  // Conv1d, kernel 1
        add_tensor(list, "token_decoder.expansion_layer.bias", {(size_t)c.P * HT});
        add_tensor(list, "block_decoder.gpt_neox.embed_in.weight", {V, DB}, true);
        list.back().trainable = false;
    } else {
        const size_t C = c.token_decoder.C;
        add_tensor(list, "gpt_neox.embed_in.weight", {V, C}, true);
        add_stack_tensors(list, "gpt_neox.", c.token_decoder);
        add_tensor(list, "embed_out.weight", {V, C}, true);
    }
    TensorTable table;
    for (ParamTensor& t : list) {
        t.offset = (table.num_params + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
        table.num_params = t.offset + t.numel;
        if (t.trainable) table.num_trainable = table.num_params;
    }
    table.tensors = std::move(list);
    return table;
}

// Parameter counts as SPEC section 2 reports them.
struct ParamCounts {
    size_t non_embedding = 0;   // everything but the [V, width] tables
    size_t used = 0;            // every tensor the forward pass reads ("total" for vanilla models)
    size_t stored = 0;          // every tensor in a checkpoint (adds the unused block-decoder embed_in)
};

inline ParamCounts count_params(const TensorTable& table) {
    ParamCounts n;
    for (const ParamTensor& t : table.tensors) {
        n.stored += t.numel;
        if (t.trainable) n.used += t.numel;
        if (t.trainable && !t.is_embedding) n.non_embedding += t.numel;
    }
    return n;
}

// ----------------------------------------------------------------------------------------------------------------
// Learning-rate schedule (SPEC 3.4): linear warmup from 0, then cosine down to 10% of the peak.
// Update `step` (0-based) uses ratio (step+1)/W during warmup, so the first update already moves the weights;
// after warmup, cosine progress (step - W + 1) / (S - W) reaches 1 (lr = 10% of peak) at the last update.
// DeepSpeed's version is the same curve but starts with two updates at lr 0 (SPEC 10.6: not reproduced).
inline float learning_rate(int step, float peak_lr, int warmup, int total_steps) {
    if (step < warmup) return peak_lr * (float)(step + 1) / (float)warmup;
    double progress = total_steps > warmup ? (double)(step - warmup + 1) / (double)(total_steps - warmup) : 1.0;
    if (progress > 1.0) progress = 1.0;
    double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
    return (float)(peak_lr * (kMinLrRatio + (1.0 - kMinLrRatio) * cosine));
}

// ----------------------------------------------------------------------------------------------------------------
// Model FLOPs, counted for the real architecture (not 6N): what MFU is measured against.
// A GPT-NeoX layer of width C and MLP width I over S positions: the matmuls cost 2 S (3C·C + C·C + 2 C·I), and
// causal attention 4 C · S(S+1)/2 (q·k and probs·v over the visible keys of every query, all heads together).
inline double stack_forward_flops(const StackConfig& s, double sequences, double S) {
    double matmuls = 2.0 * S * (4.0 * s.C * s.C + 2.0 * s.C * s.I);
    double attention = 4.0 * s.C * S * (S + 1) / 2;
    return sequences * s.L * (matmuls + attention);
}

// One training sequence of T tokens: forward + backward = 3 x forward (the backward's recomputation of the
// attention scores is not counted). Block model: block decoder over NB-1 context blocks, expansion, token decoder
// over NB-1 rows of P+LB-1 positions, LM head on LB slots per row. Vanilla: the stack over T, the head on T-1.
inline double training_flops_per_sequence(const ModelConfig& c) {
    double forward;
    if (c.is_block) {
        const double rows = c.NB() - 1, HT = c.token_decoder.C;
        forward = stack_forward_flops(c.block_decoder, 1, rows) + rows * 2.0 * c.block_decoder.C * c.P * HT +
                  stack_forward_flops(c.token_decoder, rows, c.token_seq_len()) + rows * c.LB * 2.0 * HT * c.V;
    } else {
        forward = stack_forward_flops(c.token_decoder, 1, c.T) + (c.T - 1) * 2.0 * c.token_decoder.C * c.V;
    }
    return 3.0 * forward;
}

// ----------------------------------------------------------------------------------------------------------------
// A generation's bytes and FLOPs, counted for the ceilings that ./infer --bench reports: the decode phase (SPEC 5.5:
// everything after the prefill) against its roofline, and the whole run (prefill + decode, what tokens/s is measured
// over) against the best tokens/s any schedule could reach, max(bytes / bandwidth, flops / matmul rate).
//
// The decode phase. B rows; prompts padded to Tp tokens (block models: whole blocks); `steps` decode steps:
// block models one block each (the token decoder's LB local steps, then one block-decoder step), vanilla one token
// each. Per step, what cannot be avoided:
//   bytes: every weight matrix the step multiplies by, read once per launch whatever B is (a stack's layers and
//          final LayerNorm, the expansion layer, embed_out), in elem_bytes per value; the KV cache read by attention
//          (B x visible positions x 2 (k and v) x C per layer) and the new k, v written (B x 2 x C per layer);
//   flops: 2 x weights x B for the matmuls, 4 x C x visible positions x B per layer for attention.
// Embedding lookups read only B rows and are left out, as are activations, which stay in cache at decode sizes.
struct PhaseCost {
    double bytes = 0, flops = 0;
};
inline PhaseCost operator+(PhaseCost a, const PhaseCost& b) { return {a.bytes + b.bytes, a.flops + b.flops}; }

// Values of the tensors whose names start with prefix.
inline double table_elements(const TensorTable& table, const std::string& prefix) {
    double n = 0;
    for (const ParamTensor& t : table.tensors)
        if (t.name.rfind(prefix, 0) == 0) n += (double)t.numel;
    return n;
}
// A stack's layers and final LayerNorm (prefix: "gpt_neox.", "block_decoder.gpt_neox.", ...).
inline double stack_weights(const TensorTable& table, const std::string& prefix) {
    return table_elements(table, prefix + "layers.") + table_elements(table, prefix + "final_layer_norm.");
}

inline PhaseCost decode_cost(const ModelConfig& c, const TensorTable& table, int B, int Tp, int steps, int elem_bytes) {
    PhaseCost cost;
    // one new position through a cached stack whose keys 0..visible-1 are visible to it
    auto stack_step = [&](const std::string& prefix, const StackConfig& s, double visible) {
        const double weights = stack_weights(table, prefix);
        cost.bytes += weights * elem_bytes + (double)B * s.L * 2.0 * s.C * (visible + 1) * elem_bytes;
        cost.flops += 2.0 * weights * B + 4.0 * s.C * visible * B * s.L;
    };
    auto matmul = [&](const std::string& prefix) {
        const double weights = table_elements(table, prefix);
        cost.bytes += weights * elem_bytes;
        cost.flops += 2.0 * weights * B;
    };
    if (!c.is_block) {
        for (int step = 1; step <= steps; step++) {   // step s feeds token s-1 of the completion at position Tp+s-1
            stack_step("gpt_neox.", c.token_decoder, Tp + step);
            matmul("embed_out.");
        }
        return cost;
    }
    const int n0 = Tp / c.LB;
    for (int step = 0; step < steps; step++) {
        matmul("token_decoder.expansion_layer.");
        for (int j = 0; j < c.LB; j++) {   // the prefix (P positions), then tokens 0..LB-2; each ends in the LM head
            stack_step("token_decoder.gpt_neox.", c.token_decoder, c.P + j);
            matmul("token_decoder.embed_out.");
        }
        stack_step("block_decoder.gpt_neox.", c.block_decoder, n0 + step + 1);
    }
    return cost;
}

// The prefill: the main stack over the padded prompts of B rows (block models: their Tp / LB block embeddings;
// vanilla: Tp tokens, then its LM head on the last position, which chooses the first token). FLOPs as
// stack_forward_flops counts a forward; bytes: the weights read once, and the keys and values written to the cache.
inline PhaseCost prefill_cost(const ModelConfig& c, const TensorTable& table, int B, int Tp, int elem_bytes) {
    const std::string prefix = c.is_block ? "block_decoder.gpt_neox." : "gpt_neox.";
    const StackConfig& s = c.is_block ? c.block_decoder : c.token_decoder;
    const double positions = c.is_block ? Tp / c.LB : Tp;
    PhaseCost cost;
    cost.flops = stack_forward_flops(s, B, positions);
    cost.bytes = (stack_weights(table, prefix) + (double)B * s.L * 2.0 * s.C * positions) * elem_bytes;
    if (!c.is_block) {
        cost.flops += 2.0 * B * s.C * c.V;
        cost.bytes += table_elements(table, "embed_out.") * elem_bytes;
    }
    return cost;
}

// ----------------------------------------------------------------------------------------------------------------
// The shape of a released Block Transformer checkpoint, which has no config (SPEC 6.1 recipe): widths from the
// tables, layer counts from the highest layer index, MLP widths from dense_h_to_4h, prefix length from the
// expansion layer, heads from the autofill rule (not stored anywhere), block length = D_b / D_e.
// shapes: every tensor's name and shape. Throws naming the tensor that is missing or inconsistent.
inline ModelConfig infer_block_config(const std::vector<std::pair<std::string, std::vector<size_t>>>& shapes) {
    auto shape_of = [&](const std::string& name) -> const std::vector<size_t>& {
        for (const auto& entry : shapes) if (entry.first == name) return entry.second;
        throw std::runtime_error("cannot infer the model shape: tensor " + name + " is missing");
    };
    auto dim = [&](const std::string& name, size_t rank, size_t axis) {
        const std::vector<size_t>& s = shape_of(name);
        if (s.size() != rank) throw std::runtime_error("cannot infer the model shape: tensor " + name + " should have " + std::to_string(rank) + " dims");
        return (int)s[axis];
    };
    auto layers = [&](const std::string& prefix) {
        int count = 0;
        for (const auto& entry : shapes) {
            if (entry.first.rfind(prefix, 0) != 0) continue;
            count = std::max(count, std::atoi(entry.first.c_str() + prefix.size()) + 1);
        }
        if (count == 0) throw std::runtime_error("cannot infer the model shape: no tensors named " + prefix + "<i>.*");
        return count;
    };
    ModelConfig c;
    c.name = "imported_block";
    c.is_block = true;
    c.V = dim("embedder.embeddings.weight", 2, 0);
    c.DE = dim("embedder.embeddings.weight", 2, 1);
    const int DB = dim("block_decoder.gpt_neox.final_layer_norm.weight", 1, 0);
    const int HT = dim("token_decoder.embed_out.weight", 2, 1);
    if (c.DE <= 0 || DB % c.DE != 0) throw std::runtime_error("cannot infer the model shape: block decoder width is not a multiple of the embedder width");
    c.LB = DB / c.DE;
    const int expansion_rows = dim("token_decoder.expansion_layer.weight", 3, 0);
    if (expansion_rows % HT != 0) throw std::runtime_error("cannot infer the model shape: expansion rows are not a multiple of the token decoder width");
    c.P = expansion_rows / HT;
    const int block_layers = layers("block_decoder.gpt_neox.layers."), token_layers = layers("token_decoder.gpt_neox.layers.");
    c.block_decoder = StackConfig{block_layers, DB, autofill_heads(DB), dim("block_decoder.gpt_neox.layers.0.mlp.dense_h_to_4h.weight", 2, 0)};
    c.token_decoder = StackConfig{token_layers, HT, autofill_heads(HT), dim("token_decoder.gpt_neox.layers.0.mlp.dense_h_to_4h.weight", 2, 0)};
    for (const ModelConfig& named : named_configs())   // a known shape: take the named config (its heads, its training)
        if (named.is_block && named.DE == c.DE && named.LB == c.LB && named.P == c.P && named.block_decoder.L == c.block_decoder.L &&
            named.block_decoder.C == DB && named.token_decoder.L == c.token_decoder.L && named.token_decoder.C == HT &&
            named.V == c.V && named.block_decoder.I == c.block_decoder.I && named.token_decoder.I == c.token_decoder.I)
            return named;
    validate_config(c);
    return c;
}
