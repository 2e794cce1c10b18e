#!/usr/bin/env python3
"""Golden test fixtures for blocktf, computed by an independent PyTorch implementation.

The two tiny models are built from HuggingFace transformers' own GPT-NeoX modules (GPTNeoXModel,
GPTNeoXForCausalLM), so the layer semantics are HuggingFace's, not blocktf's.  Everything is computed in
float64 from float32-representable weights; float results are stored as F32.

Writes, under --out (default test/fixtures):
  tiny_block.model.safetensors     initial parameters of the Block Transformer, original checkpoint keys
  tiny_block.golden.safetensors    inputs, logits, loss, grad.<key>, step_losses[10], grad_norms[10]
  tiny_vanilla.model.safetensors   initial parameters of a GPTNeoXForCausalLM, original checkpoint keys
  tiny_vanilla.golden.safetensors  the same for the vanilla model

Run: python dev/make_fixtures.py --out test/fixtures   (CPU only, deterministic)
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel

SEED = 1234
DT = torch.float64

# Optimizer settings of the 10-step fixture (SPEC 3.3, constant lr).
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0
N_STEPS = 10

V = 96
TINY_BLOCK = dict(V=V, L=4, R=2, D_e=12,
                  block=dict(layers=2, hidden=48, heads=3, inter=192),
                  token=dict(layers=2, hidden=32, heads=2, inter=128),
                  B=2, T=32)
TINY_VANILLA = dict(V=V, layers=2, hidden=32, heads=2, inter=96, B=2, T=16)


# ----------------------------------------------------------------------------------------------------------
# configs and modules
# ----------------------------------------------------------------------------------------------------------

def neox_config(hidden, layers, heads, inter, vocab=V, max_positions=64, attn="eager"):
    """The defaults are the fixtures'; dev/bench/pytorch_runner.py passes the benchmark's vocab, length, attention."""
    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        hidden_act="gelu",
        rotary_pct=0.25,           # transformers 5: folded into rope_parameters["partial_rotary_factor"]
        rotary_emb_base=10000,     # transformers 5: folded into rope_parameters["rope_theta"]
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_bias=True,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    cfg._attn_implementation = attn
    rp = cfg.rope_parameters
    assert rp["partial_rotary_factor"] == 0.25 and rp["rope_theta"] == 10000 and rp["rope_type"] == "default", rp
    assert cfg._attn_implementation == attn
    return cfg


def check_rotary(neox: GPTNeoXModel, cfg):
    """The rotary embedding must rotate exactly head_dim/4 dims of each head with base 10000."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    rot = hd // 4
    inv_freq = neox.rotary_emb.inv_freq
    assert inv_freq.numel() == hd // 8, (inv_freq.numel(), hd)
    want = 10000.0 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    assert torch.allclose(inv_freq.double(), want, rtol=1e-6, atol=0), (inv_freq, want)
    for layer in neox.layers:
        assert layer.attention.rotary_ndims == rot
        assert layer.attention.head_size == hd
    x = torch.zeros(1, 3, cfg.hidden_size, dtype=DT)
    cos, sin = neox.rotary_emb(x, torch.arange(3)[None])
    assert cos.shape[-1] == rot and sin.shape[-1] == rot, cos.shape


class TokenDecoder(nn.Module):
    """HF GPTNeoXForCausalLM (gpt_neox + head) plus the prefix expansion layer (Conv1d, kernel 1)."""

    def __init__(self, cfg, D_b, R):
        super().__init__()
        self.R, self.H_t = R, cfg.hidden_size
        self.lm = GPTNeoXForCausalLM(cfg)
        # Registered directly on this module; key remapping (orig_key) puts lm.* at token_decoder.*.
        self.expansion_layer = nn.Conv1d(D_b, R * cfg.hidden_size, kernel_size=1)


class BlockTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.V, self.L, self.R, self.D_e = c["V"], c["L"], c["R"], c["D_e"]
        b, t = c["block"], c["token"]
        assert b["hidden"] == self.L * self.D_e
        extra = dict(vocab=self.V, max_positions=c.get("max_positions", 64), attn=c.get("attn", "eager"))
        self.cfg_b = neox_config(b["hidden"], b["layers"], b["heads"], b["inter"], **extra)
        self.cfg_t = neox_config(t["hidden"], t["layers"], t["heads"], t["inter"], **extra)
        self.embedder = nn.Module()
        self.embedder.embeddings = nn.Embedding(self.V, self.D_e)
        self.block_decoder = nn.Module()
        self.block_decoder.gpt_neox = GPTNeoXModel(self.cfg_b)
        self.token_decoder = TokenDecoder(self.cfg_t, b["hidden"], self.R)
        check_rotary(self.block_decoder.gpt_neox, self.cfg_b)
        check_rotary(self.token_decoder.lm.gpt_neox, self.cfg_t)

    def forward(self, input_ids, attention_mask, block_attention_mask):
        """input_ids, attention_mask: [B, N, L] int; block_attention_mask: [B, N].  Returns logits [B, N-1, L, V]."""
        B, N, L = input_ids.shape
        R, H_t = self.R, self.token_decoder.H_t
        ids = input_ids.long()
        # Embedder: concat of the L slot embeddings (slot j at dims [j*D_e, (j+1)*D_e)); ignores the mask.
        e = self.embedder.embeddings(ids).reshape(B, N, L * self.D_e)
        # Block decoder: key-padding mask over blocks, default positions 0..N-1.
        g = self.block_decoder.gpt_neox(inputs_embeds=e, attention_mask=block_attention_mask.long()).last_hidden_state
        ctx = g[:, :-1]                                   # context of target block k is g[:, k-1]
        y = ids[:, 1:]                                     # [B, N-1, L]
        a = attention_mask[:, 1:].long()
        M = B * (N - 1)
        z = self.token_decoder.expansion_layer(ctx.reshape(M, -1, 1)).reshape(M, R, H_t)  # row-major [R, H_t]
        lm = self.token_decoder.lm
        tok = lm.gpt_neox.embed_in(y.reshape(M, L)[:, :L - 1])                        # [M, L-1, H_t]
        x = torch.cat([z, tok], dim=1)                                                 # [M, R+L-1, H_t]
        S = R + L - 1
        mask = torch.cat([torch.ones(M, R, dtype=torch.long, device=ids.device), a.reshape(M, L)[:, :L - 1]], dim=1)
        pos = torch.arange(S, device=ids.device).expand(M, S)
        out = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos)
        logits = out.logits[:, R - 1:R + L - 1]                                       # positions R-1 .. R+L-2
        return logits.reshape(B, N - 1, L, self.V)


def block_loss(logits, input_ids, attention_mask):
    """Mean CE over the target slots (blocks 1..N-1) with attention_mask == 1."""
    y = input_ids[:, 1:].long()
    keep = attention_mask[:, 1:].to(logits.dtype)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (nll * keep).sum() / keep.sum()


def vanilla_loss(logits, labels):
    """HF causal LM loss written out: mean CE of logits[:, :-1] vs labels[:, 1:] over labels != -100."""
    lg = logits[:, :-1]
    lb = labels[:, 1:].long()
    keep = lb != -100
    logp = torch.log_softmax(lg, dim=-1)
    nll = -logp.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * keep).sum() / keep.sum()


# ----------------------------------------------------------------------------------------------------------
# key names, init, parameter counts
# ----------------------------------------------------------------------------------------------------------

def orig_key(name):
    """Module parameter name -> original checkpoint key (SPEC 6.1 / 6.2).

    transformers 5 renamed GPTNeoXForCausalLM.embed_out to lm_head (its loader maps ^embed_out. -> lm_head.
    in conversion_mapping.py); the original checkpoints use embed_out.  The token decoder's HF model is held
    as TokenDecoder.lm, which is flattened into token_decoder.* here."""
    name = name.replace("token_decoder.lm.", "token_decoder.")
    if name == "lm_head.weight":
        return "embed_out.weight"
    return name.replace("token_decoder.lm_head.", "token_decoder.embed_out.")


def layer_keys(prefix):
    ks = []
    for m in ("input_layernorm", "post_attention_layernorm", "attention.query_key_value", "attention.dense",
              "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        ks += [f"{prefix}.{m}.weight", f"{prefix}.{m}.bias"]
    return ks


def expected_block_keys(c):
    ks = ["embedder.embeddings.weight", "block_decoder.gpt_neox.embed_in.weight"]
    for i in range(c["block"]["layers"]):
        ks += layer_keys(f"block_decoder.gpt_neox.layers.{i}")
    ks += ["block_decoder.gpt_neox.final_layer_norm.weight", "block_decoder.gpt_neox.final_layer_norm.bias",
           "token_decoder.gpt_neox.embed_in.weight"]
    for i in range(c["token"]["layers"]):
        ks += layer_keys(f"token_decoder.gpt_neox.layers.{i}")
    ks += ["token_decoder.gpt_neox.final_layer_norm.weight", "token_decoder.gpt_neox.final_layer_norm.bias",
           "token_decoder.embed_out.weight", "token_decoder.expansion_layer.weight",
           "token_decoder.expansion_layer.bias"]
    return ks


def expected_vanilla_keys(c):
    ks = ["gpt_neox.embed_in.weight"]
    for i in range(c["layers"]):
        ks += layer_keys(f"gpt_neox.layers.{i}")
    return ks + ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"]


def stack_params(H, I, layers, V):
    """Parameters of a GPTNeoXModel: embed_in + layers + final LN."""
    per_layer = 4 * H + (3 * H * H + 3 * H) + (H * H + H) + (I * H + I) + (H * I + H)
    if I == 4 * H:
        assert per_layer == 12 * H * H + 13 * H
    return V * H + layers * per_layer + 2 * H


def init_params(named, gen):
    """Deliberately non-tiny init so that every term matters.  The LM head (embed_out) is a Linear layer and is
    drawn like one, N(0, 1/fan_in): logits O(1), as in a trained model, so a bf16 engine can be compared too.  Values are rounded to float32 so that the F32
    model file holds exactly the weights the float64 computation used."""
    with torch.no_grad():
        for name, p in named:
            shape = p.shape
            if name.endswith(("embeddings.weight", "embed_in.weight")):
                v = torch.randn(shape, generator=gen, dtype=DT)
            elif "layernorm" in name or "layer_norm" in name:
                v = 0.1 * torch.randn(shape, generator=gen, dtype=DT)
                if name.endswith(".weight"):
                    v = v + 1.0
            elif name.endswith(".bias"):
                v = 0.1 * torch.randn(shape, generator=gen, dtype=DT)
            elif name.endswith(".weight"):
                fan_in = int(np.prod(shape[1:]))
                v = torch.randn(shape, generator=gen, dtype=DT) / math.sqrt(fan_in)
            else:
                raise ValueError(name)
            p.copy_(v.float().double())


def f32_named_params(model):
    return {orig_key(n): p.detach().float().contiguous() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------
# an independent float64 GPT-NeoX stack written from SPEC 1.1 (checks the HF modules against the spec)
# ----------------------------------------------------------------------------------------------------------

def spec_neox(p, x, key_mask, nh, pos):
    """p: dict of HF GPTNeoXModel params (names as in the module); x: [M, S, H]; key_mask [M, S]; pos [S]."""
    M, S, H = x.shape
    hd = H // nh
    rot = int(hd * 0.25)
    inv = 10000.0 ** (-torch.arange(0, rot, 2, dtype=DT) / rot)
    th = pos.to(DT)[:, None] * inv[None]
    cos = torch.cat([th.cos(), th.cos()], -1)
    sin = torch.cat([th.sin(), th.sin()], -1)

    def rope(u):
        r, keep = u[..., :rot], u[..., rot:]
        r1, r2 = r[..., :rot // 2], r[..., rot // 2:]
        return torch.cat([r * cos + torch.cat([-r2, r1], -1) * sin, keep], -1)

    def ln(h, pre):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * p[pre + ".weight"] + p[pre + ".bias"]

    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool))[None] & key_mask.bool()[:, None, :]  # [M, S, S]
    layers = sorted({int(k.split(".")[1]) for k in p if k.startswith("layers.")})
    for i in layers:
        q_ = f"layers.{i}."
        h1 = ln(x, q_ + "input_layernorm")
        qkv = h1 @ p[q_ + "attention.query_key_value.weight"].T + p[q_ + "attention.query_key_value.bias"]
        qkv = qkv.view(M, S, nh, 3, hd)                    # head-major split
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))
        q, k = rope(q), rope(k)
        sc = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        sc = sc.masked_fill(~allowed[:, None], float("-inf"))
        att = torch.softmax(sc, -1) @ v
        att = att.transpose(1, 2).reshape(M, S, H)
        att = att @ p[q_ + "attention.dense.weight"].T + p[q_ + "attention.dense.bias"]
        h2 = ln(x, q_ + "post_attention_layernorm")
        m = h2 @ p[q_ + "mlp.dense_h_to_4h.weight"].T + p[q_ + "mlp.dense_h_to_4h.bias"]
        m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2.0)))
        m = m @ p[q_ + "mlp.dense_4h_to_h.weight"].T + p[q_ + "mlp.dense_4h_to_h.bias"]
        x = x + att + m
    return ln(x, "final_layer_norm")


def spec_block_logits(model, input_ids, attention_mask, block_attention_mask):
    P = {orig_key(n): p.detach() for n, p in model.named_parameters()}
    sub = lambda pre: {k[len(pre):]: v for k, v in P.items() if k.startswith(pre)}  # noqa: E731
    B, N, L = input_ids.shape
    R, V_ = model.R, model.V
    ids = input_ids.long()
    e = P["embedder.embeddings.weight"][ids].reshape(B, N, -1)
    g = spec_neox(sub("block_decoder.gpt_neox."), e, block_attention_mask, model.cfg_b.num_attention_heads,
                  torch.arange(N))
    M = B * (N - 1)
    W, b = P["token_decoder.expansion_layer.weight"][:, :, 0], P["token_decoder.expansion_layer.bias"]
    z = (g[:, :-1].reshape(M, -1) @ W.T + b).reshape(M, R, -1)
    y = ids[:, 1:].reshape(M, L)
    x = torch.cat([z, P["token_decoder.gpt_neox.embed_in.weight"][y[:, :L - 1]]], 1)
    km = torch.cat([torch.ones(M, R, dtype=torch.long), attention_mask[:, 1:].reshape(M, L)[:, :L - 1].long()], 1)
    h = spec_neox(sub("token_decoder.gpt_neox."), x, km, model.cfg_t.num_attention_heads, torch.arange(R + L - 1))
    logits = h[:, R - 1:R + L - 1] @ P["token_decoder.embed_out.weight"].T
    return logits.reshape(B, N - 1, L, V_)


def spec_vanilla_logits(model, input_ids):
    P = {orig_key(n): p.detach() for n, p in model.named_parameters()}
    sub = {k[len("gpt_neox."):]: v for k, v in P.items() if k.startswith("gpt_neox.")}
    ids = input_ids.long()
    B, T = ids.shape
    h = spec_neox(sub, sub["embed_in.weight"][ids], torch.ones(B, T, dtype=torch.long),
                  model.config.num_attention_heads, torch.arange(T))
    return h @ P["embed_out.weight"].T


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------

def block_inputs(rng, c):
    B, T, L = c["B"], c["T"], c["L"]
    N = T // L
    assert B == 2 and N == 8 and L == 4
    tok = lambda n: list(rng.randint(2, V, size=n))  # noqa: E731  ordinary tokens avoid 0 (EOS/PAD) and 1
    PAD, EOS = (0, 0), (0, 1)
    # sample 0: padded-document layout (SPEC 3.5)
    s0 = [PAD] * 3 + [(t, 1) for t in tok(8)] + [EOS]               # doc A: lp 3, 8 tokens, EOS on slot 3 of block 2
    assert len(s0) == 12 and s0[11] == EOS
    s0 += [PAD] + [(t, 1) for t in tok(4)] + [EOS] + [PAD] * 2     # doc B: lp 1, 4 tokens, EOS mid block 4, rp 2
    assert len(s0) == 20 and s0[17] == EOS and s0[18] == PAD
    s0 += [(t, 1) for t in tok(T - len(s0))]                       # doc C fills blocks 5-7
    # sample 1: ordinary tokens, one EOS mid-sample (block 2 slot 1), block 5 all padding
    s1 = [(t, 1) for t in tok(T)]
    s1[2 * L + 1] = EOS
    for j in range(L):
        s1[5 * L + j] = PAD
    arr = np.array([s0, s1], dtype=np.int32)                        # [B, T, 2]
    input_ids = arr[:, :, 0].reshape(B, N, L)
    attention_mask = arr[:, :, 1].reshape(B, N, L)
    block_attention_mask = attention_mask.any(axis=2).astype(np.int32)
    assert block_attention_mask.sum() == B * N - 1 and block_attention_mask[1, 5] == 0
    return (torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(block_attention_mask))


def vanilla_inputs(rng, c):
    B, T = c["B"], c["T"]
    ids = rng.randint(0, V, size=(B, T)).astype(np.int32)
    ids[0, 7] = 0
    ids[1, 3] = 0
    labels = ids.copy()
    for b, t in ((0, 5), (1, 9), (1, 15)):
        labels[b, t] = -100
    return torch.from_numpy(ids), torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------------------------
# training loop
# ----------------------------------------------------------------------------------------------------------

def grads_of(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    for p in model.parameters():  # unused parameters get an explicit zero grad (DeepSpeed flat buffers: zero)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return loss


def train_steps(model, loss_fn):
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY)
    losses, norms = [], []
    for _ in range(N_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = grads_of(model, loss_fn)
        gn = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
        norms.append(gn.item())
    return losses, norms


def metadata(config):
    return {
        "config": config, "lr": repr(LR), "beta1": repr(BETA1), "beta2": repr(BETA2), "eps": repr(EPS),
        "weight_decay": repr(WEIGHT_DECAY), "grad_clip": repr(GRAD_CLIP), "steps": str(N_STEPS),
        "torch": torch.__version__, "transformers": transformers.__version__, "seed": str(SEED),
        "generator": "dev/make_fixtures.py",
    }


def f32(t):
    return t.detach().float().contiguous()


def save(tensors, path, meta):
    """safetensors.torch.save_file, then the metadata keys are put in sorted order (safetensors writes them in
    hash order, which differs between runs), so that reruns give byte-identical files.  The header keeps its
    length; the tensor data are untouched."""
    save_file(tensors, path, metadata=meta)
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
    with safe_open(path, "pt") as f:
        assert f.metadata() == meta and set(f.keys()) == set(tensors)
        for k in tensors:
            assert torch.equal(f.get_tensor(k), tensors[k]), k


# ----------------------------------------------------------------------------------------------------------
# the two fixtures
# ----------------------------------------------------------------------------------------------------------

def make_block(out, gen, rng):
    c = TINY_BLOCK
    model = BlockTransformer(c).to(DT)
    model.eval()  # dropouts are 0 anyway
    names = [n for n, _ in model.named_parameters()]
    keys = [orig_key(n) for n in names]
    assert keys == expected_block_keys(c), "\n".join(keys)
    assert model.token_decoder.lm.lm_head.weight is not model.token_decoder.lm.gpt_neox.embed_in.weight
    init_params(list(zip(keys, model.parameters())), gen)
    n_params = sum(p.numel() for p in model.parameters())
    b, t, R = c["block"], c["token"], c["R"]
    D_b, H_t = b["hidden"], t["hidden"]
    want = (V * c["D_e"] + stack_params(D_b, b["inter"], b["layers"], V)
            + stack_params(H_t, t["inter"], t["layers"], V) + V * H_t + (R * H_t * D_b + R * H_t))
    assert n_params == want, (n_params, want)
    print(f"tiny_block: {len(keys)} tensors, {n_params} parameters")
    for k, p in zip(keys, model.parameters()):
        print(f"  {k:62s} {list(p.shape)}")

    input_ids, attention_mask, bam = block_inputs(rng, c)
    init = f32_named_params(model)
    print("tiny_block inputs (per block: ids / attention_mask / block_attention_mask):")
    for s in range(input_ids.shape[0]):
        print(f"  sample {s}: " + "  ".join(
            f"{input_ids[s, i].tolist()}/{''.join(map(str, attention_mask[s, i].tolist()))}/{int(bam[s, i])}"
            for i in range(input_ids.shape[1])))

    logits = model(input_ids, attention_mask, bam)
    assert logits.dtype == DT and logits.shape == (c["B"], c["T"] // c["L"] - 1, c["L"], V)
    loss = block_loss(logits, input_ids, attention_mask)
    # independent recomputation via F.cross_entropy with ignore_index
    labels = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:].long(), torch.full_like(input_ids[:, 1:].long(), -100))
    loss2 = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - loss2.item()) <= 1e-12 * abs(loss2.item()), (loss.item(), loss2.item())
    n_kept = int(attention_mask[:, 1:].sum())
    # the spec-derived float64 stack agrees with the HF modules (HF's eager softmax and cos/sin run in fp32)
    logits_spec = spec_block_logits(model, input_ids, attention_mask, bam)
    e_spec = rel_err(logits.detach(), logits_spec)
    print(f"tiny_block: HF vs SPEC-1.1 float64 re-implementation, max rel err of logits = {e_spec:.2e}")
    assert e_spec < 1e-6, e_spec

    loss = grads_of(model, lambda: block_loss(model(input_ids, attention_mask, bam), input_ids, attention_mask))
    grads = {f"grad.{k}": f32(p.grad) for k, p in zip(keys, model.parameters())}
    assert float(grads["grad.block_decoder.gpt_neox.embed_in.weight"].abs().max()) == 0.0
    unused = [k for k, g in grads.items() if float(g.abs().max()) == 0.0]
    assert unused == ["grad.block_decoder.gpt_neox.embed_in.weight"], unused

    step_losses, grad_norms = train_steps(
        model, lambda: block_loss(model(input_ids, attention_mask, bam), input_ids, attention_mask))
    assert step_losses[0] == loss.item()

    golden = {"input_ids": input_ids.int().contiguous(), "attention_mask": attention_mask.int().contiguous(),
              "block_attention_mask": bam.int().contiguous(), "logits": f32(logits),
              "loss": torch.tensor([loss.item()], dtype=torch.float32),
              **grads,
              "step_losses": torch.tensor(step_losses, dtype=torch.float32),
              "grad_norms": torch.tensor(grad_norms, dtype=torch.float32)}
    save(init, os.path.join(out, "tiny_block.model.safetensors"), {"format": "pt"})
    meta = metadata("tiny_block")
    meta.update(V=str(V), L=str(c["L"]), R=str(R), D_e=str(c["D_e"]), kept_targets=str(n_kept))
    save(golden, os.path.join(out, "tiny_block.golden.safetensors"), meta)
    return loss.item(), step_losses, grad_norms, n_kept


def make_vanilla(out, gen, rng):
    c = TINY_VANILLA
    cfg = neox_config(c["hidden"], c["layers"], c["heads"], c["inter"])
    model = GPTNeoXForCausalLM(cfg).to(DT)
    model.eval()
    check_rotary(model.gpt_neox, cfg)
    assert model.lm_head.weight is not model.gpt_neox.embed_in.weight
    keys = [orig_key(n) for n, _ in model.named_parameters()]
    assert keys == expected_vanilla_keys(c), "\n".join(keys)
    init_params(list(zip(keys, model.parameters())), gen)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == stack_params(c["hidden"], c["inter"], c["layers"], V) + V * c["hidden"]
    print(f"tiny_vanilla: {len(keys)} tensors, {n_params} parameters")
    for k, p in zip(keys, model.parameters()):
        print(f"  {k:62s} {list(p.shape)}")
    init = f32_named_params(model)

    input_ids, labels = vanilla_inputs(rng, c)
    out_hf = model(input_ids=input_ids.long(), labels=labels.long())
    logits = out_hf.logits
    assert logits.dtype == DT
    loss = vanilla_loss(logits, labels)
    # HF's own loss casts the logits to float32 (loss_utils.ForCausalLMLoss: logits.float()), hence the tolerance
    assert abs(out_hf.loss.item() - loss.item()) <= 1e-6 * abs(loss.item()), (out_hf.loss.item(), loss.item())
    e_spec = rel_err(logits.detach(), spec_vanilla_logits(model, input_ids))
    print(f"tiny_vanilla: HF vs SPEC-1.1 float64 re-implementation, max rel err of logits = {e_spec:.2e}")
    assert e_spec < 1e-6, e_spec

    fn = lambda: vanilla_loss(model(input_ids=input_ids.long()).logits, labels)  # noqa: E731
    loss = grads_of(model, fn)
    grads = {f"grad.{k}": f32(p.grad) for k, p in zip(keys, model.parameters())}
    step_losses, grad_norms = train_steps(model, fn)
    assert step_losses[0] == loss.item()

    golden = {"input_ids": input_ids.int().contiguous(), "labels": labels.int().contiguous(), "logits": f32(logits),
              "loss": torch.tensor([loss.item()], dtype=torch.float32),
              **grads,
              "step_losses": torch.tensor(step_losses, dtype=torch.float32),
              "grad_norms": torch.tensor(grad_norms, dtype=torch.float32)}
    save(init, os.path.join(out, "tiny_vanilla.model.safetensors"), {"format": "pt"})
    save(golden, os.path.join(out, "tiny_vanilla.golden.safetensors"), metadata("tiny_vanilla"))
    return loss.item(), step_losses, grad_norms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="test/fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")

    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.RandomState(SEED)
    bl, bsteps, bnorms, kept = make_block(args.out, gen, rng)
    vl, vsteps, vnorms = make_vanilla(args.out, gen, rng)

    total = 0
    print("files:")
    for name in ("tiny_block.model", "tiny_block.golden", "tiny_vanilla.model", "tiny_vanilla.golden"):
        path = os.path.join(args.out, name + ".safetensors")
        size = os.path.getsize(path)
        total += size
        print(f"  {path:50s} {size:9d} bytes")
    print(f"  total {total} bytes")
    assert total < 2 * 1024 * 1024
    print(f"tiny_block   loss {bl:.9g} over {kept} target tokens")
    print("  step_losses " + " ".join(f"{x:.9g}" for x in bsteps))
    print("  grad_norms  " + " ".join(f"{x:.9g}" for x in bnorms))
    print(f"tiny_vanilla loss {vl:.9g}")
    print("  step_losses " + " ".join(f"{x:.9g}" for x in vsteps))
    print("  grad_norms  " + " ".join(f"{x:.9g}" for x in vnorms))


if __name__ == "__main__":
    main()
