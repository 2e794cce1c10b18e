// reference.h: the CPU reference of blocktf's models, forward and backward, in plain loop nests.
// defines: ref::Batch, ref::Reference<Real> (Block Transformer and vanilla GPT-NeoX), ref::AdamW, and the layer
// functions they are built from, each X_forward beside its X_backward.
//
// This is the teaching version of the model and the yardstick for every GPU kernel: slow, obvious, and checked
// against PyTorch (test/fixtures, written by dev/make_fixtures.py) and against finite differences.
// Real is float (fp32 storage, double accumulation: the comparison target for GPU kernels) or double
// (for finite-difference gradient checks).
//
// Conventions: arrays are row-major, shapes in comments use the names of model.h. Backward functions take
// (outputs, inputs, weights, scratch, dims) like their forward; activation gradients are written (=),
// parameter gradients are accumulated (+=), so a caller zeroes parameter gradients once per step.
#pragma once
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>
#include "model.h"

namespace ref {

template <typename Real> using Vec = std::vector<Real>;

// ----------------------------------------------------------------------------------------------------------------
// LayerNorm over the last dim, eps 1e-5 (SPEC 1.1.2).
// inp, out: (N, C)   weight, bias: (C)   mean, rstd: (N), kept for the backward pass.

template <typename Real>
void layernorm_forward(Real* out, Real* mean, Real* rstd, const Real* inp, const Real* weight, const Real* bias,
                       size_t N, size_t C) {
    for (size_t n = 0; n < N; n++) {
        const Real* x = inp + n * C;
        double m = 0.0, var = 0.0;
        for (size_t c = 0; c < C; c++) m += x[c];
        m /= C;
        for (size_t c = 0; c < C; c++) var += (x[c] - m) * (x[c] - m);
        var /= C;
        double r = 1.0 / std::sqrt(var + kLayerNormEps);
        for (size_t c = 0; c < C; c++) out[n * C + c] = (Real)((x[c] - m) * r * weight[c] + bias[c]);
        mean[n] = (Real)m;
        rstd[n] = (Real)r;
    }
}

// With xhat = (x - mean) * rstd and g = dout * weight: dinp = rstd * (g - mean(g) - xhat * mean(g * xhat)).
template <typename Real>
void layernorm_backward(Real* dinp, Real* dweight, Real* dbias, const Real* dout, const Real* inp,
                        const Real* weight, const Real* mean, const Real* rstd, size_t N, size_t C) {
    for (size_t n = 0; n < N; n++) {
        const Real* x = inp + n * C;
        const Real* dy = dout + n * C;
        double g_mean = 0.0, gx_mean = 0.0;
        for (size_t c = 0; c < C; c++) {
            double xhat = (x[c] - (double)mean[n]) * rstd[n];
            double g = (double)dy[c] * weight[c];
            g_mean += g;
            gx_mean += g * xhat;
            dweight[c] += (Real)(dy[c] * xhat);
            dbias[c] += dy[c];
        }
        g_mean /= C;
        gx_mean /= C;
        for (size_t c = 0; c < C; c++) {
            double xhat = (x[c] - (double)mean[n]) * rstd[n];
            double g = (double)dy[c] * weight[c];
            dinp[n * C + c] = (Real)(rstd[n] * (g - g_mean - xhat * gx_mean));
        }
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Linear layer, PyTorch layout: out = inp · weight^T + bias.
// inp: (N, IC)   weight: (OC, IC)   bias: (OC) or null   out: (N, OC)

template <typename Real>
void matmul_forward(Real* out, const Real* inp, const Real* weight, const Real* bias, size_t N, size_t IC, size_t OC) {
    for (size_t n = 0; n < N; n++) {
        for (size_t o = 0; o < OC; o++) {
            double acc = bias ? (double)bias[o] : 0.0;
            for (size_t i = 0; i < IC; i++) acc += (double)inp[n * IC + i] * weight[o * IC + i];
            out[n * OC + o] = (Real)acc;
        }
    }
}

// dinp = dout · weight;  dweight += dout^T · inp;  dbias += column sums of dout (when bias exists).
template <typename Real>
void matmul_backward(Real* dinp, Real* dweight, Real* dbias, const Real* dout, const Real* inp, const Real* weight,
                     size_t N, size_t IC, size_t OC) {
    for (size_t n = 0; n < N; n++) {
        for (size_t i = 0; i < IC; i++) {
            double acc = 0.0;
            for (size_t o = 0; o < OC; o++) acc += (double)dout[n * OC + o] * weight[o * IC + i];
            dinp[n * IC + i] = (Real)acc;
        }
    }
    for (size_t o = 0; o < OC; o++) {
        for (size_t i = 0; i < IC; i++) {
            double acc = 0.0;
            for (size_t n = 0; n < N; n++) acc += (double)dout[n * OC + o] * inp[n * IC + i];
            dweight[o * IC + i] += (Real)acc;
        }
        if (dbias) {
            double acc = 0.0;
            for (size_t n = 0; n < N; n++) acc += dout[n * OC + o];
            dbias[o] += (Real)acc;
        }
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Fused QKV layout (SPEC 1.1.3): the 3C outputs are split per head first, [NH, 3, HS]:
// head h's query is at [3*HS*h, 3*HS*h + HS), its key next, then its value. Not [Q_all | K_all | V_all].
enum QkvPart { kQuery = 0, kKey = 1, kValue = 2 };
inline size_t qkv_index(int h, QkvPart part, int d, int HS) { return ((size_t)h * 3 + part) * HS + d; }

// ----------------------------------------------------------------------------------------------------------------
// Rotary embedding, GPT-NeoX "rotate half" over the first rot = HS/4 dims of each head's query and key
// (SPEC 1.1.4). Dim m pairs with m + rot/2:
//   u'_m       = u_m * cos(p θ_m) - u_{m+h} * sin(p θ_m)         θ_m = base^(-2m/rot), h = rot/2
//   u'_{m+h}   = u_{m+h} * cos(p θ_m) + u_m * sin(p θ_m)
// Backward is the transposed rotation, i.e. the rotation by -p θ_m. Position p = index within the sequence.
// qkv: (nseq, S, 3C), rotated in place.

template <typename Real>
void rope_rotate(Real* qkv, size_t nseq, size_t S, int NH, int HS, int rot, double direction) {
    const int half = rot / 2;
    for (size_t seq = 0; seq < nseq; seq++) {
        for (size_t p = 0; p < S; p++) {
            Real* row = qkv + (seq * S + p) * 3 * NH * HS;
            for (int h = 0; h < NH; h++) {
                for (QkvPart part : {kQuery, kKey}) {
                    Real* u = row + qkv_index(h, part, 0, HS);
                    for (int m = 0; m < half; m++) {
                        double theta = (double)p * std::pow((double)kRotaryBase, -2.0 * m / rot);
                        double c = std::cos(theta), s = direction * std::sin(theta);
                        double lo = u[m], hi = u[m + half];
                        u[m] = (Real)(lo * c - hi * s);
                        u[m + half] = (Real)(hi * c + lo * s);
                    }
                }
            }
        }
    }
}
template <typename Real>
void rope_forward(Real* qkv, size_t nseq, size_t S, int NH, int HS, int rot) { rope_rotate(qkv, nseq, S, NH, HS, rot, +1.0); }
template <typename Real>
void rope_backward(Real* dqkv, size_t nseq, size_t S, int NH, int HS, int rot) { rope_rotate(dqkv, nseq, S, NH, HS, rot, -1.0); }

// ----------------------------------------------------------------------------------------------------------------
// Causal self-attention with a key-padding mask (SPEC 1.1.5): query i attends to keys j <= i with key_mask[j] = 1,
// scores scaled by HS^-0.5. A query with no visible key outputs zeros (never happens in blocktf's inputs).
// qkv: (nseq, S, 3C) after RoPE   key_mask: (nseq, S)   probs: (nseq, NH, S, S)   out: (nseq, S, C) heads merged

template <typename Real>
void attention_forward(Real* out, Real* probs, const Real* qkv, const int* key_mask, size_t nseq, size_t S, int NH, int HS) {
    const size_t C = (size_t)NH * HS;
    const double scale = 1.0 / std::sqrt((double)HS);
    std::vector<double> score(S);
    for (size_t seq = 0; seq < nseq; seq++) {
        const Real* base = qkv + seq * S * 3 * C;
        for (int h = 0; h < NH; h++) {
            for (size_t i = 0; i < S; i++) {
                Real* p = probs + ((seq * NH + h) * S + i) * S;
                double max_score = -INFINITY;
                for (size_t j = 0; j <= i; j++) {
                    if (!key_mask[seq * S + j]) continue;
                    double dot = 0.0;
                    for (int d = 0; d < HS; d++)
                        dot += (double)base[i * 3 * C + qkv_index(h, kQuery, d, HS)] * base[j * 3 * C + qkv_index(h, kKey, d, HS)];
                    score[j] = dot * scale;
                    max_score = std::max(max_score, score[j]);
                }
                double sum = 0.0;
                for (size_t j = 0; j < S; j++) {
                    bool visible = j <= i && key_mask[seq * S + j];
                    double e = visible ? std::exp(score[j] - max_score) : 0.0;
                    score[j] = e;
                    sum += e;
                }
                for (size_t j = 0; j < S; j++) p[j] = (Real)(sum > 0.0 ? score[j] / sum : 0.0);
                for (int d = 0; d < HS; d++) {
                    double acc = 0.0;
                    for (size_t j = 0; j <= i; j++) acc += (double)p[j] * base[j * 3 * C + qkv_index(h, kValue, d, HS)];
                    out[(seq * S + i) * C + h * HS + d] = (Real)acc;
                }
            }
        }
    }
}

// dv_j = Σ_i p_ij dout_i;  dp_ij = dout_i · v_j;  ds_ij = p_ij (dp_ij - Σ_k p_ik dp_ik);
// dq_i = scale Σ_j ds_ij k_j;  dk_j = scale Σ_i ds_ij q_i.   dqkv: (nseq, S, 3C), written.
template <typename Real>
void attention_backward(Real* dqkv, const Real* dout, const Real* qkv, const Real* probs, size_t nseq, size_t S, int NH, int HS) {
    const size_t C = (size_t)NH * HS;
    const double scale = 1.0 / std::sqrt((double)HS);
    std::fill(dqkv, dqkv + nseq * S * 3 * C, (Real)0);
    std::vector<double> dp(S);
    for (size_t seq = 0; seq < nseq; seq++) {
        const Real* base = qkv + seq * S * 3 * C;
        Real* dbase = dqkv + seq * S * 3 * C;
        for (int h = 0; h < NH; h++) {
            for (size_t i = 0; i < S; i++) {
                const Real* p = probs + ((seq * NH + h) * S + i) * S;
                const Real* dy = dout + (seq * S + i) * C + h * HS;
                double p_dot_dp = 0.0;
                for (size_t j = 0; j <= i; j++) {
                    double acc = 0.0;
                    for (int d = 0; d < HS; d++) {
                        acc += (double)dy[d] * base[j * 3 * C + qkv_index(h, kValue, d, HS)];
                        dbase[j * 3 * C + qkv_index(h, kValue, d, HS)] += (Real)(p[j] * dy[d]);
                    }
                    dp[j] = acc;
                    p_dot_dp += p[j] * acc;
                }
                for (size_t j = 0; j <= i; j++) {
                    double ds = p[j] * (dp[j] - p_dot_dp) * scale;
                    for (int d = 0; d < HS; d++) {
                        dbase[i * 3 * C + qkv_index(h, kQuery, d, HS)] += (Real)(ds * base[j * 3 * C + qkv_index(h, kKey, d, HS)]);
                        dbase[j * 3 * C + qkv_index(h, kKey, d, HS)] += (Real)(ds * base[i * 3 * C + qkv_index(h, kQuery, d, HS)]);
                    }
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------------------------
// GELU, exact erf form (hidden_act "gelu", SPEC 1.1.6): gelu(z) = 0.5 z (1 + erf(z / √2)).   inp, out: (N)

template <typename Real>
void gelu_forward(Real* out, const Real* inp, size_t N) {
    for (size_t i = 0; i < N; i++) out[i] = (Real)(0.5 * inp[i] * (1.0 + std::erf(inp[i] / std::sqrt(2.0))));
}
// gelu'(z) = Φ(z) + z φ(z)
template <typename Real>
void gelu_backward(Real* dinp, const Real* dout, const Real* inp, size_t N) {
    for (size_t i = 0; i < N; i++) {
        double z = inp[i];
        double cdf = 0.5 * (1.0 + std::erf(z / std::sqrt(2.0)));
        double pdf = std::exp(-0.5 * z * z) / std::sqrt(2.0 * M_PI);
        dinp[i] = (Real)(dout[i] * (cdf + z * pdf));
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Softmax cross-entropy, mean over the valid rows (SPEC 1.5, 3.2). logits: (N, V)   target, valid: (N)
// Returns the mean loss (0 when no row is valid) and keeps nothing; the backward recomputes the softmax.

template <typename Real>
double cross_entropy_forward(const Real* logits, const int* target, const char* valid, size_t N, size_t V) {
    double sum = 0.0;
    size_t count = 0;
    for (size_t n = 0; n < N; n++) {
        if (!valid[n]) continue;
        const Real* z = logits + n * V;
        double max_z = *std::max_element(z, z + V);
        double denom = 0.0;
        for (size_t v = 0; v < V; v++) denom += std::exp(z[v] - max_z);
        sum += std::log(denom) + max_z - z[target[n]];
        count++;
    }
    return count ? sum / count : 0.0;
}

// dlogits = (softmax - onehot(target)) / count on valid rows, 0 elsewhere.
template <typename Real>
void cross_entropy_backward(Real* dlogits, const Real* logits, const int* target, const char* valid, size_t N, size_t V) {
    size_t count = std::count(valid, valid + N, 1);
    for (size_t n = 0; n < N; n++) {
        Real* dz = dlogits + n * V;
        if (!valid[n]) {
            std::fill(dz, dz + V, (Real)0);
            continue;
        }
        const Real* z = logits + n * V;
        double max_z = *std::max_element(z, z + V);
        double denom = 0.0;
        for (size_t v = 0; v < V; v++) denom += std::exp(z[v] - max_z);
        for (size_t v = 0; v < V; v++) {
            double p = std::exp(z[v] - max_z) / denom;
            dz[v] = (Real)((p - (v == (size_t)target[n] ? 1.0 : 0.0)) / count);
        }
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Embedding lookup. table: (V, C)   ids: (N)   out: (N, C). Backward scatter-adds rows (+=, parameter gradient).

template <typename Real>
void embedding_forward(Real* out, const int* ids, const Real* table, size_t N, size_t C) {
    for (size_t n = 0; n < N; n++) std::copy(table + (size_t)ids[n] * C, table + (size_t)ids[n] * C + C, out + n * C);
}
template <typename Real>
void embedding_backward(Real* dtable, const Real* dout, const int* ids, size_t N, size_t C) {
    for (size_t n = 0; n < N; n++)
        for (size_t c = 0; c < C; c++) dtable[(size_t)ids[n] * C + c] += dout[n * C + c];
}

// ----------------------------------------------------------------------------------------------------------------
// A GPT-NeoX stack (SPEC 1.1) over nseq independent sequences of S positions (positions 0..S-1 each).
// The block decoder (nseq = B, S = blocks), the token decoder (nseq = B*(NB-1), S = P+LB-1) and the vanilla
// model (nseq = B, S = T) are all this one function.

// Pointers to one layer's 12 tensors in a buffer laid out by the tensor table (parameters or gradients).
template <typename Real>
struct LayerTensors {
    Real *ln1_w, *ln1_b, *ln2_w, *ln2_b;   // (C)
    Real *qkv_w, *qkv_b;                   // (3C, C), (3C)
    Real *dense_w, *dense_b;               // (C, C), (C)
    Real *fc_w, *fc_b;                     // (I, C), (I)
    Real *proj_w, *proj_b;                 // (C, I), (C)
};

template <typename Real>
Real* tensor_in(Vec<Real>& buffer, const TensorTable& table, const std::string& name) {
    return buffer.data() + table.get(name).offset;
}

template <typename Real>
LayerTensors<Real> layer_tensors(Vec<Real>& buffer, const TensorTable& table, const std::string& stack_prefix, int l) {
    std::string p = stack_prefix + "layers." + std::to_string(l) + ".";
    auto t = [&](const char* name) { return tensor_in(buffer, table, p + name); };
    return {t("input_layernorm.weight"), t("input_layernorm.bias"), t("post_attention_layernorm.weight"),
            t("post_attention_layernorm.bias"), t("attention.query_key_value.weight"), t("attention.query_key_value.bias"),
            t("attention.dense.weight"), t("attention.dense.bias"), t("mlp.dense_h_to_4h.weight"),
            t("mlp.dense_h_to_4h.bias"), t("mlp.dense_4h_to_h.weight"), t("mlp.dense_4h_to_h.bias")};
}

// What one layer's forward keeps for its backward. n = nseq * S rows.
template <typename Real>
struct LayerActivations {
    Vec<Real> x;                        // (n, C) layer input, the residual stream
    Vec<Real> ln1, ln1_mean, ln1_rstd;  // (n, C), (n), (n)
    Vec<Real> qkv;                      // (n, 3C), query and key rotated
    Vec<Real> probs;                    // (nseq, NH, S, S)
    Vec<Real> att;                      // (n, C) attention output, heads merged, before the dense layer
    Vec<Real> ln2, ln2_mean, ln2_rstd;  // (n, C), (n), (n)
    Vec<Real> fc;                       // (n, I) before GELU
    Vec<Real> fc_gelu;                  // (n, I)
};

template <typename Real>
struct StackActivations {
    size_t nseq = 0, S = 0;
    std::vector<int> key_mask;          // (nseq, S)
    std::vector<LayerActivations<Real>> layers;
    Vec<Real> x_final, mean, rstd;      // (n, C), (n), (n): input of the final LayerNorm
    Vec<Real> out;                      // (n, C) the stack's output, after the final LayerNorm
};

// x_out = x + dense(attention(LN1(x))) + mlp(LN2(x)): parallel residual, both LayerNorms read x (SPEC 1.1.1).
template <typename Real>
void stack_forward(StackActivations<Real>& acts, const Vec<Real>& inp, const std::vector<int>& key_mask, size_t nseq,
                   size_t S, Vec<Real>& params, const TensorTable& table, const std::string& prefix, const StackConfig& cfg) {
    const size_t n = nseq * S, C = cfg.C, I = cfg.I;
    acts.nseq = nseq;
    acts.S = S;
    acts.key_mask = key_mask;
    acts.layers.assign(cfg.L, {});
    Vec<Real> x = inp, attn_out(n * C), mlp_out(n * C);
    for (int l = 0; l < cfg.L; l++) {
        LayerActivations<Real>& a = acts.layers[l];
        LayerTensors<Real> w = layer_tensors(params, table, prefix, l);
        a.x = x;
        a.ln1.resize(n * C); a.ln1_mean.resize(n); a.ln1_rstd.resize(n);
        a.qkv.resize(n * 3 * C); a.probs.resize(nseq * cfg.NH * S * S); a.att.resize(n * C);
        a.ln2.resize(n * C); a.ln2_mean.resize(n); a.ln2_rstd.resize(n);
        a.fc.resize(n * I); a.fc_gelu.resize(n * I);

        layernorm_forward(a.ln1.data(), a.ln1_mean.data(), a.ln1_rstd.data(), x.data(), w.ln1_w, w.ln1_b, n, C);
        matmul_forward(a.qkv.data(), a.ln1.data(), w.qkv_w, w.qkv_b, n, C, 3 * C);
        rope_forward(a.qkv.data(), nseq, S, cfg.NH, cfg.HS(), cfg.rotary_dims());
        attention_forward(a.att.data(), a.probs.data(), a.qkv.data(), key_mask.data(), nseq, S, cfg.NH, cfg.HS());
        matmul_forward(attn_out.data(), a.att.data(), w.dense_w, w.dense_b, n, C, C);

        layernorm_forward(a.ln2.data(), a.ln2_mean.data(), a.ln2_rstd.data(), x.data(), w.ln2_w, w.ln2_b, n, C);
        matmul_forward(a.fc.data(), a.ln2.data(), w.fc_w, w.fc_b, n, C, I);
        gelu_forward(a.fc_gelu.data(), a.fc.data(), n * I);
        matmul_forward(mlp_out.data(), a.fc_gelu.data(), w.proj_w, w.proj_b, n, I, C);

        for (size_t i = 0; i < n * C; i++) x[i] = a.x[i] + attn_out[i] + mlp_out[i];
    }
    acts.x_final = x;
    acts.mean.resize(n); acts.rstd.resize(n); acts.out.resize(n * C);
    layernorm_forward(acts.out.data(), acts.mean.data(), acts.rstd.data(), x.data(),
                      tensor_in(params, table, prefix + "final_layer_norm.weight"),
                      tensor_in(params, table, prefix + "final_layer_norm.bias"), n, C);
}

// dinp: (n, C) written; the stack's parameter gradients accumulate into grads.
template <typename Real>
void stack_backward(Vec<Real>& dinp, Vec<Real>& grads, const Vec<Real>& dout, const StackActivations<Real>& acts,
                    Vec<Real>& params, const TensorTable& table, const std::string& prefix, const StackConfig& cfg) {
    const size_t nseq = acts.nseq, S = acts.S, n = nseq * S, C = cfg.C, I = cfg.I;
    Vec<Real> dx(n * C), dln(n * C), dx_ln1(n * C), dx_ln2(n * C), datt(n * C), dqkv(n * 3 * C), dfc(n * I), dgelu(n * I);
    layernorm_backward(dx.data(), tensor_in(grads, table, prefix + "final_layer_norm.weight"),
                       tensor_in(grads, table, prefix + "final_layer_norm.bias"), dout.data(), acts.x_final.data(),
                       tensor_in(params, table, prefix + "final_layer_norm.weight"), acts.mean.data(), acts.rstd.data(), n, C);
    for (int l = cfg.L - 1; l >= 0; l--) {
        const LayerActivations<Real>& a = acts.layers[l];
        LayerTensors<Real> w = layer_tensors(params, table, prefix, l);
        LayerTensors<Real> g = layer_tensors(grads, table, prefix, l);
        // MLP branch: dx -> proj -> GELU -> fc -> LN2
        matmul_backward(dgelu.data(), g.proj_w, g.proj_b, dx.data(), a.fc_gelu.data(), w.proj_w, n, I, C);
        gelu_backward(dfc.data(), dgelu.data(), a.fc.data(), n * I);
        matmul_backward(dln.data(), g.fc_w, g.fc_b, dfc.data(), a.ln2.data(), w.fc_w, n, C, I);
        layernorm_backward(dx_ln2.data(), g.ln2_w, g.ln2_b, dln.data(), a.x.data(), w.ln2_w, a.ln2_mean.data(), a.ln2_rstd.data(), n, C);
        // attention branch: dx -> dense -> attention -> RoPE -> QKV -> LN1
        matmul_backward(datt.data(), g.dense_w, g.dense_b, dx.data(), a.att.data(), w.dense_w, n, C, C);
        attention_backward(dqkv.data(), datt.data(), a.qkv.data(), a.probs.data(), nseq, S, cfg.NH, cfg.HS());
        rope_backward(dqkv.data(), nseq, S, cfg.NH, cfg.HS(), cfg.rotary_dims());
        matmul_backward(dln.data(), g.qkv_w, g.qkv_b, dqkv.data(), a.ln1.data(), w.qkv_w, n, C, 3 * C);
        layernorm_backward(dx_ln1.data(), g.ln1_w, g.ln1_b, dln.data(), a.x.data(), w.ln1_w, a.ln1_mean.data(), a.ln1_rstd.data(), n, C);
        // the residual carries dx through unchanged; both branches add theirs
        for (size_t i = 0; i < n * C; i++) dx[i] += dx_ln1[i] + dx_ln2[i];
    }
    dinp = dx;
}

// ----------------------------------------------------------------------------------------------------------------
// A batch of token sequences. ids, mask: (B, T).
//   Block model: mask is the attention mask of SPEC 1.5/3.5 (1 = real token incl. EOS, 0 = padding slot); padding
//   slots are not attended by the token decoder and not scored. T must be a multiple of LB.
//   Vanilla model: the vanilla stream has no padding (every token is attended); mask only marks which tokens are
//   scored as targets (HF labels = -100 where mask = 0).
struct Batch {
    int B = 0, T = 0;
    std::vector<int> ids, mask;
};

inline void validate_batch(const Batch& batch, const ModelConfig& cfg) {
    auto fail = [](const std::string& what) { throw std::runtime_error("batch: " + what); };
    if (batch.B <= 0 || batch.T <= 1) fail("needs B >= 1 and T >= 2");
    if (batch.ids.size() != (size_t)batch.B * batch.T || batch.mask.size() != batch.ids.size()) fail("ids and mask must be (B, T)");
    if (cfg.is_block && (batch.T % cfg.LB != 0 || batch.T / cfg.LB < 2)) fail("T must be a multiple of the block length, >= 2 blocks");
    for (size_t i = 0; i < batch.ids.size(); i++) {
        if (batch.ids[i] < 0 || batch.ids[i] >= cfg.V) fail("token id " + std::to_string(batch.ids[i]) + " out of range");
        if (batch.mask[i] != 0 && batch.mask[i] != 1) fail("mask values must be 0 or 1");
    }
}

// ----------------------------------------------------------------------------------------------------------------
// The whole model. params and grads are laid out by the tensor table (one buffer each, as on the GPU).

template <typename Real>
struct Reference {
    ModelConfig cfg;
    TensorTable table;
    Vec<Real> params, grads;   // (num_params)
    Vec<Real> logits;          // block: (B, NB-1, LB, V), the logits of every slot of target blocks 1..NB-1
                               // vanilla: (B, T, V)

    explicit Reference(const ModelConfig& config)
        : cfg(config), table(build_tensor_table(config)), params(table.num_params), grads(table.num_params) {}

    void zero_grad() { std::fill(grads.begin(), grads.end(), (Real)0); }
    Real* param(const std::string& name) { return tensor_in(params, table, name); }
    Real* grad(const std::string& name) { return tensor_in(grads, table, name); }

    // Mean cross-entropy over the scored positions; keeps what backward() needs.
    double forward(const Batch& batch) {
        validate_batch(batch, cfg);
        batch_ = batch;
        return cfg.is_block ? forward_block() : forward_vanilla();
    }
    // grads += d(loss)/d(params) for the last forward.
    void backward() { cfg.is_block ? backward_block() : backward_vanilla(); }

private:
    Batch batch_;
    std::vector<int> target_;      // (rows of logits) token each logits row predicts
    std::vector<char> valid_;      // (rows of logits) 1 = scored
    // block model
    Vec<Real> block_embeddings_;   // (B, NB-1, DB): blocks 0..NB-2, each the concat of its LB token embeddings
    StackActivations<Real> block_acts_, token_acts_;
    Vec<Real> token_input_;        // (B*(NB-1), S, HT): P prefix vectors, then tokens y_0..y_{LB-2}
    Vec<Real> head_input_;         // (rows of logits, HT): token-decoder outputs at positions P-1 .. P+LB-2
    // vanilla model
    StackActivations<Real> vanilla_acts_;

    // Token id of slot j of block i of sample b, and its mask.
    int id_at(int b, int i, int j) const { return batch_.ids[(size_t)b * batch_.T + i * cfg.LB + j]; }
    int mask_at(int b, int i, int j) const { return batch_.mask[(size_t)b * batch_.T + i * cfg.LB + j]; }

    // SPEC 1.0: embed blocks 0..NB-2 (the last block is only ever a target, so its context is never needed:
    // with causal attention this equals running all NB blocks and dropping the last output, SPEC 1.4),
    // run the block decoder; block i's output conditions target block i+1 through the token decoder.
    double forward_block() {
        const int B = batch_.B, NB = batch_.T / cfg.LB, LB = cfg.LB, DE = cfg.DE, P = cfg.P, V = cfg.V;
        const size_t DB = cfg.block_decoder.C, HT = cfg.token_decoder.C, S = cfg.token_seq_len();
        const size_t rows = (size_t)B * (NB - 1);   // one token-decoder sequence per target block

        // Embedder (SPEC 1.2): slot j of a block fills dims [j*DE, (j+1)*DE); the mask is ignored (pads embed as id 0).
        std::vector<int> context_ids(rows * LB), block_mask(rows);
        for (int b = 0; b < B; b++)
            for (int i = 0; i < NB - 1; i++) {
                int any_real = 0;
                for (int j = 0; j < LB; j++) {
                    context_ids[((size_t)b * (NB - 1) + i) * LB + j] = id_at(b, i, j);
                    any_real |= mask_at(b, i, j);
                }
                block_mask[(size_t)b * (NB - 1) + i] = any_real;   // block_attention_mask (SPEC 3.5)
            }
        block_embeddings_.resize(rows * DB);
        embedding_forward(block_embeddings_.data(), context_ids.data(), param("embedder.embeddings.weight"), rows * LB, DE);

        // Block decoder (SPEC 1.3): causal over blocks, fully padded blocks masked as keys.
        stack_forward(block_acts_, block_embeddings_, block_mask, B, NB - 1, params, table, "block_decoder.gpt_neox.", cfg.block_decoder);

        // Expansion (SPEC 1.5): prefix (rows, P, HT) = W g + b, reshaped row-major: prefix r = z[r*HT, (r+1)*HT).
        Vec<Real> prefix(rows * P * HT);
        matmul_forward(prefix.data(), block_acts_.out.data(), param("token_decoder.expansion_layer.weight"),
                       param("token_decoder.expansion_layer.bias"), rows, DB, P * HT);

        // Token decoder input: [P_0 .. P_{P-1}, E(y_0) .. E(y_{LB-2})], key mask [1 x P, a_0 .. a_{LB-2}].
        token_input_.assign(rows * S * HT, (Real)0);
        std::vector<int> token_mask(rows * S);
        const Real* embed_in = param("token_decoder.gpt_neox.embed_in.weight");
        for (size_t r = 0; r < rows; r++) {
            int b = r / (NB - 1), k = r % (NB - 1) + 1;   // target block k
            Real* x = token_input_.data() + r * S * HT;
            std::copy(prefix.data() + r * P * HT, prefix.data() + (r + 1) * P * HT, x);
            for (int s = 0; s < P; s++) token_mask[r * S + s] = 1;
            for (int j = 0; j < LB - 1; j++) {
                embedding_forward(x + (P + j) * HT, &batch_.ids[(size_t)b * batch_.T + k * LB + j], embed_in, 1, HT);
                token_mask[r * S + P + j] = mask_at(b, k, j);
            }
        }
        stack_forward(token_acts_, token_input_, token_mask, rows, S, params, table, "token_decoder.gpt_neox.", cfg.token_decoder);

        // LM head on positions P-1 .. P+LB-2, which predict y_0 .. y_{LB-1}; score the slots with mask 1.
        head_input_.resize(rows * LB * HT);
        target_.resize(rows * LB);
        valid_.resize(rows * LB);
        for (size_t r = 0; r < rows; r++) {
            int b = r / (NB - 1), k = r % (NB - 1) + 1;
            for (int j = 0; j < LB; j++) {
                const Real* h = token_acts_.out.data() + (r * S + P - 1 + j) * HT;
                std::copy(h, h + HT, head_input_.data() + (r * LB + j) * HT);
                target_[r * LB + j] = id_at(b, k, j);
                valid_[r * LB + j] = (char)mask_at(b, k, j);
            }
        }
        logits.resize(rows * LB * V);
        matmul_forward(logits.data(), head_input_.data(), param("token_decoder.embed_out.weight"), (const Real*)nullptr, rows * LB, HT, V);
        return cross_entropy_forward(logits.data(), target_.data(), valid_.data(), rows * LB, V);
    }

    void backward_block() {
        const int B = batch_.B, NB = batch_.T / cfg.LB, LB = cfg.LB, DE = cfg.DE, P = cfg.P, V = cfg.V;
        const size_t DB = cfg.block_decoder.C, HT = cfg.token_decoder.C, S = cfg.token_seq_len();
        const size_t rows = (size_t)B * (NB - 1);

        Vec<Real> dlogits(rows * LB * V), dhead(rows * LB * HT);
        cross_entropy_backward(dlogits.data(), logits.data(), target_.data(), valid_.data(), rows * LB, V);
        matmul_backward(dhead.data(), grad("token_decoder.embed_out.weight"), (Real*)nullptr, dlogits.data(),
                        head_input_.data(), param("token_decoder.embed_out.weight"), rows * LB, HT, V);

        // Only positions P-1 .. P+LB-2 of the token decoder feed the head; the first P-1 outputs are discarded.
        Vec<Real> dtoken_out(rows * S * HT, (Real)0), dtoken_in;
        for (size_t r = 0; r < rows; r++)
            for (int j = 0; j < LB; j++)
                std::copy(dhead.data() + (r * LB + j) * HT, dhead.data() + (r * LB + j + 1) * HT,
                          dtoken_out.data() + (r * S + P - 1 + j) * HT);
        stack_backward(dtoken_in, grads, dtoken_out, token_acts_, params, table, "token_decoder.gpt_neox.", cfg.token_decoder);

        // Split the token-decoder input gradient into the prefix part and the token embeddings.
        Vec<Real> dprefix(rows * P * HT);
        for (size_t r = 0; r < rows; r++) {
            int b = r / (NB - 1), k = r % (NB - 1) + 1;
            const Real* dx = dtoken_in.data() + r * S * HT;
            std::copy(dx, dx + P * HT, dprefix.data() + r * P * HT);
            embedding_backward(grad("token_decoder.gpt_neox.embed_in.weight"), dx + P * HT,
                               &batch_.ids[(size_t)b * batch_.T + k * LB], LB - 1, HT);
        }
        Vec<Real> dcontext(rows * DB), dembeddings;
        matmul_backward(dcontext.data(), grad("token_decoder.expansion_layer.weight"), grad("token_decoder.expansion_layer.bias"),
                        dprefix.data(), block_acts_.out.data(), param("token_decoder.expansion_layer.weight"), rows, DB, P * HT);
        stack_backward(dembeddings, grads, dcontext, block_acts_, params, table, "block_decoder.gpt_neox.", cfg.block_decoder);

        std::vector<int> context_ids(rows * LB);
        for (size_t r = 0; r < rows; r++)
            for (int j = 0; j < LB; j++) context_ids[r * LB + j] = id_at(r / (NB - 1), r % (NB - 1), j);
        embedding_backward(grad("embedder.embeddings.weight"), dembeddings.data(), context_ids.data(), rows * LB, DE);
    }

    // Vanilla GPT-NeoX: position t predicts token t+1 (HF causal-LM loss, SPEC 3.2).
    double forward_vanilla() {
        const int B = batch_.B, T = batch_.T, V = cfg.V;
        const size_t C = cfg.token_decoder.C, n = (size_t)B * T;
        Vec<Real> x(n * C);
        embedding_forward(x.data(), batch_.ids.data(), param("gpt_neox.embed_in.weight"), n, C);
        stack_forward(vanilla_acts_, x, std::vector<int>(n, 1), B, T, params, table, "gpt_neox.", cfg.token_decoder);
        logits.resize(n * V);
        matmul_forward(logits.data(), vanilla_acts_.out.data(), param("embed_out.weight"), (const Real*)nullptr, n, C, V);
        target_.assign(n, 0);
        valid_.assign(n, 0);
        for (int b = 0; b < B; b++)
            for (int t = 0; t + 1 < T; t++) {
                target_[(size_t)b * T + t] = batch_.ids[(size_t)b * T + t + 1];
                valid_[(size_t)b * T + t] = (char)batch_.mask[(size_t)b * T + t + 1];
            }
        return cross_entropy_forward(logits.data(), target_.data(), valid_.data(), n, V);
    }

    void backward_vanilla() {
        const size_t C = cfg.token_decoder.C, n = (size_t)batch_.B * batch_.T, V = cfg.V;
        Vec<Real> dlogits(n * V), dout(n * C), dx;
        cross_entropy_backward(dlogits.data(), logits.data(), target_.data(), valid_.data(), n, V);
        matmul_backward(dout.data(), grad("embed_out.weight"), (Real*)nullptr, dlogits.data(), vanilla_acts_.out.data(),
                        param("embed_out.weight"), n, C, V);
        stack_backward(dx, grads, dout, vanilla_acts_, params, table, "gpt_neox.", cfg.token_decoder);
        embedding_backward(grad("gpt_neox.embed_in.weight"), dx.data(), batch_.ids.data(), n, C);
    }
};

// ----------------------------------------------------------------------------------------------------------------
// AdamW with global-norm clipping (SPEC 3.3), over the trainable tensors of the table. Per element:
//   g = grad * clip_coef   m = β1 m + (1-β1) g   v = β2 v + (1-β2) g²
//   p -= lr * ( (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + eps) + wd * p )      wd = 0.1 where the table says decay
// with clip_coef = min(1, clip / (||grad|| + 1e-6)), the norm taken over every trainable gradient.
template <typename Real>
struct AdamW {
    Vec<Real> m, v;   // (num_trainable): trainable tensors are a prefix of the parameter buffer
    int t = 0;        // updates done

    explicit AdamW(const TensorTable& table) : m(table.num_trainable), v(table.num_trainable) {}

    // Returns ||grad|| before clipping.
    double step(Vec<Real>& params, const Vec<Real>& grads, const TensorTable& table, float lr) {
        double sum_sq = 0.0;
        for (size_t i = 0; i < table.num_trainable; i++) sum_sq += (double)grads[i] * grads[i];
        double norm = std::sqrt(sum_sq);
        double clip_coef = std::min(1.0, (double)kGradClip / (norm + kClipEps));
        t++;
        double bias1 = 1.0 - std::pow((double)kAdamBeta1, t), bias2 = 1.0 - std::pow((double)kAdamBeta2, t);
        for (const ParamTensor& tensor : table.tensors) {
            if (!tensor.trainable) continue;
            double wd = tensor.decay ? kWeightDecay : 0.0;
            for (size_t i = tensor.offset; i < tensor.offset + tensor.numel; i++) {
                double g = grads[i] * clip_coef;
                m[i] = (Real)(kAdamBeta1 * (double)m[i] + (1.0 - kAdamBeta1) * g);
                v[i] = (Real)(kAdamBeta2 * (double)v[i] + (1.0 - kAdamBeta2) * g * g);
                double update = (m[i] / bias1) / (std::sqrt(v[i] / bias2) + kAdamEps) + wd * (double)params[i];
                params[i] = (Real)(params[i] - lr * update);
            }
        }
        return norm;
    }
};

}  // namespace ref
