#!/usr/bin/env python3
"""blocktf <-> PyTorch parity on a checkpoint (issue 7): export, scoring logits and greedy generation.

The PyTorch side is the independent implementation of dev/make_fixtures.py (HuggingFace transformers' own
GPT-NeoX modules), loaded from the checkpoint with a strict state-dict load and run in float32 (the reference,
bf16 weights upcast) and in bf16 (the yardstick: what PyTorch's own bf16 gets against its fp32).

  python3 dev/parity.py write-random --config NAME --out DIR [--seed N] [--device auto|cpu|cuda]
      A random checkpoint as the original authors' code writes one. Block configs: DIR/model.safetensors, bf16,
      the original key names (SPEC 6.1, the unused block_decoder.gpt_neox.embed_in.weight included, the
      expansion layer as a Conv1d weight [R*H_t, D_b, 1]) and no config.json (blocktf must infer the shape).
      Vanilla configs: GPTNeoXForCausalLM.save_pretrained in bf16 (config.json + model.safetensors, SPEC 6.2).
      HF's own init, except the two non-HF parts of a block model, which get the original code's init
      (embedder N(0, 0.02), expansion N(0, D_b^-0.5) with bias 0, SPEC 1.2 / 1.5).

  python3 dev/parity.py compare --checkpoint DIR [--infer ./infer] --text FILE [--text FILE ...]
          [--score-length N] [--prompts FILE] [--max-new-tokens M] [--tokenizer PATH] [--report OUT.md]
          [--device auto|cpu|cuda] [--dump FILE] [--ids FILE]
      1. strict load of DIR into the PyTorch model (shape from blocktf's config.json, an HF config.json, or the
         tensor shapes; DIR may be a training output directory: its newest checkpoint-<step>/ is used);
      2. `INFER --score ... --dump-logits` and the same scored logits from PyTorch fp32 / bf16, compared;
      3. with --prompts: `INFER --prompt-file ... --no-stop --ids` against PyTorch's greedy generation (fp32,
         no cache, blocktf's positions and left padding);
      4. a markdown report on stdout (and in --report); exit status 0 when the checks pass, 1 otherwise.
      --dump FILE / --ids FILE read a dump / an --ids output made earlier instead of running INFER.

  python3 dev/parity.py self-test
      The whole comparison path on the CPU without blocktf: tiny models, fake dumps and fake --ids output made by
      PyTorch itself (must pass) and corrupted ones (must fail), write-random read back, the test fixtures loaded.

Pass criteria (BF16 dump / FP32 dump): strict load; a well-formed dump; norm-wise logits error of blocktf vs
PyTorch fp32 <= max(3 x PyTorch bf16's, 2e-2) / <= 1e-4; relative difference of the mean loss <= 1e-2 / 1e-5;
greedy: at a first divergence, PyTorch's logit of its own token minus its logit of blocktf's token <= 0.5 / 1e-3
(a near tie; that gap equals the top-2 margin when blocktf took PyTorch's second choice).

Python for this tool: /tmp/fixenv/bin/python on the dev machine (torch, transformers, safetensors, numpy,
tokenizers); python3 on the GPU machine.
"""

import argparse
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DEV = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, DEV)
sys.path.insert(0, os.path.join(DEV, "bench"))
import make_fixtures as mf  # noqa: E402  the independent model (HF GPT-NeoX modules) and the key mapping
import pytorch_runner as pr  # noqa: E402  CONFIGS (model.h's named configs), autofill_heads, the no-cache loops
import transformers  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

EOS = 0                      # <|endoftext|>: also the pad id of the windows and of generation (SPEC 5.1)
DEFAULT_T = 2048             # context of a checkpoint whose shape is inferred (blocktf's kTrainSeqLen)
# Buffers that 2023 Pythia checkpoints saved beside the weights (SPEC 6.2): ignored by the strict load.
PYTHIA_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
TOLERANCES = {
    "BF16": dict(logits_factor=3.0, logits_floor=2e-2, loss=1e-2, greedy_gap=0.5),
    "FP32": dict(logits_factor=0.0, logits_floor=1e-4, loss=1e-5, greedy_gap=1e-3),
}


class ParityError(Exception):
    """Something this tool cannot work with (a missing file, an unreadable checkpoint, INFER failing)."""


# ==========================================================================================================
# Model shapes. A config is a dict in pytorch_runner.CONFIGS' format plus "name":
#   block:   kind, V, T, L, R, D_e, block{layers, hidden, heads, inter}, token{...}
#   vanilla: kind, V, T, layers, hidden, heads, inter
# ==========================================================================================================

def named_config(name):
    if name not in pr.CONFIGS:
        raise ParityError(f"unknown config '{name}' (known: {', '.join(sorted(pr.CONFIGS))})")
    return dict(copy.deepcopy(pr.CONFIGS[name]), name=name)


def same_shape_ignoring_heads(a, b):
    """True when a and b have the same tensors (heads and context length are not visible in the weights)."""
    if a["kind"] != b["kind"] or a["V"] != b["V"]:
        return False
    if a["kind"] == "block":
        stack = lambda s: (s["layers"], s["hidden"], s["inter"])  # noqa: E731
        return ((a["L"], a["R"], a["D_e"], stack(a["block"]), stack(a["token"]))
                == (b["L"], b["R"], b["D_e"], stack(b["block"]), stack(b["token"])))
    return (a["layers"], a["hidden"], a["inter"]) == (b["layers"], b["hidden"], b["inter"])


def named_match(c, compare_heads):
    """The named config with c's shape (blocktf does the same: a known shape keeps its name, heads and T)."""
    for name in pr.CONFIGS:
        named = named_config(name)
        if not same_shape_ignoring_heads(named, c):
            continue
        if compare_heads and c["kind"] == "vanilla" and named["heads"] != c["heads"]:
            continue
        return named
    return None


def config_from_blocktf_json(j):
    """blocktf's config.json (config_to_json in blocktf.cu)."""
    stack = lambda s: dict(layers=s["layers"], hidden=s["hidden"], heads=s["heads"], inter=s["intermediate"])  # noqa
    name = j.get("blocktf_config", "checkpoint")
    if j["model_type"] == "block_transformer":
        return dict(name=name, kind="block", V=j["vocab_size"], T=j["seq_len"], L=j["block_length"],
                    R=j["prefix_length"], D_e=j["embedder_width"], block=stack(j["block_decoder"]),
                    token=stack(j["token_decoder"]))
    if j["model_type"] == "gpt_neox":
        return dict(name=name, kind="vanilla", V=j["vocab_size"], T=j["seq_len"], **stack(j["token_decoder"]))
    raise ParityError(f"config.json: model_type {j['model_type']!r} is neither block_transformer nor gpt_neox")


def config_from_hf_json(j):
    """A HuggingFace GPT-NeoX config.json (a Pythia model saved with save_pretrained). Only the variant that the
    PyTorch model here builds (make_fixtures.neox_config) is accepted."""
    rope = j.get("rope_parameters") or {}
    wrong = []
    if j.get("rotary_pct", 0.25) != 0.25 or rope.get("partial_rotary_factor", 0.25) != 0.25:
        wrong.append("rotary fraction 0.25")
    if j.get("rotary_emb_base", 10000) != 10000 or rope.get("rope_theta", 10000) != 10000:
        wrong.append("rotary base 10000")
    if not j.get("use_parallel_residual", True):
        wrong.append("use_parallel_residual true")
    if j.get("hidden_act", "gelu") != "gelu":
        wrong.append("hidden_act gelu")
    if j.get("tie_word_embeddings", False):
        wrong.append("untied embeddings")
    if j.get("layer_norm_eps", 1e-5) != 1e-5:
        wrong.append("layer_norm_eps 1e-5")
    if wrong:
        raise ParityError("config.json: unsupported GPT-NeoX variant, expected " + ", ".join(wrong))
    c = dict(name="imported_gpt_neox", kind="vanilla", V=j["vocab_size"],
             T=min(j.get("max_position_embeddings", DEFAULT_T), DEFAULT_T), layers=j["num_hidden_layers"],
             hidden=j["hidden_size"], heads=j["num_attention_heads"], inter=j["intermediate_size"])
    return named_match(c, compare_heads=True) or c


def config_from_shapes(shapes):
    """SPEC 6.1 recipe for a released block checkpoint without config: widths from the tables, layer counts from
    the highest layer index, I from dense_h_to_4h, R from the expansion layer, L = D_b / D_e, heads from the
    head-dim rule of SPEC 2.1 (not stored anywhere) unless the shape is a named config's."""
    if "gpt_neox.embed_in.weight" in shapes:
        raise ParityError("a vanilla GPT-NeoX checkpoint without config.json: its head count is not stored in the "
                          "weights; put the model's HuggingFace config.json beside it")

    def dim(key, rank, axis):
        if key not in shapes:
            raise ParityError(f"cannot infer the model shape: tensor {key} is missing")
        if len(shapes[key]) != rank:
            raise ParityError(f"cannot infer the model shape: {key} should have {rank} dims, has {shapes[key]}")
        return shapes[key][axis]

    def layers(prefix):
        found = [int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
        if not found:
            raise ParityError(f"cannot infer the model shape: no tensors named {prefix}<i>.*")
        return max(found) + 1

    def stack(prefix, width):
        return dict(layers=layers(prefix + "layers."), hidden=width, heads=pr.autofill_heads(width),
                    inter=dim(prefix + "layers.0.mlp.dense_h_to_4h.weight", 2, 0))

    V, D_e = dim("embedder.embeddings.weight", 2, 0), dim("embedder.embeddings.weight", 2, 1)
    D_b = dim("block_decoder.gpt_neox.final_layer_norm.weight", 1, 0)
    H_t = dim("token_decoder.embed_out.weight", 2, 1)
    rows = dim("token_decoder.expansion_layer.weight", 3, 0)
    if D_b % D_e or rows % H_t:
        raise ParityError(f"cannot infer the model shape: D_b {D_b} / D_e {D_e}, expansion rows {rows} / H_t {H_t}")
    c = dict(name="imported_block", kind="block", V=V, T=DEFAULT_T, L=D_b // D_e, R=rows // H_t, D_e=D_e,
             block=stack("block_decoder.gpt_neox.", D_b), token=stack("token_decoder.gpt_neox.", H_t))
    return named_match(c, compare_heads=False) or c


def blocktf_config_json(c):
    """The config.json blocktf writes beside a checkpoint (config_to_json in blocktf.cu)."""
    stack = lambda s: dict(layers=s["layers"], hidden=s["hidden"], heads=s["heads"], intermediate=s["inter"])  # noqa
    j = {"blocktf_config": c["name"], "model_type": "block_transformer" if c["kind"] == "block" else "gpt_neox",
         "vocab_size": c["V"], "seq_len": c["T"]}
    if c["kind"] == "block":
        j.update(block_length=c["L"], prefix_length=c["R"], embedder_width=c["D_e"], block_decoder=stack(c["block"]),
                 token_decoder=stack(c["token"]))
    else:
        j["token_decoder"] = stack(c)
    return json.dumps(j, indent=2) + "\n"


def describe(c):
    s = lambda s: f"{s['layers']} x {s['hidden']} ({s['heads']} heads, I {s['inter']})"  # noqa: E731
    if c["kind"] == "block":
        return (f"{c['name']}: block model, V {c['V']}, T {c['T']}, L_B {c['L']}, R {c['R']}, D_e {c['D_e']}, "
                f"block decoder {s(c['block'])}, token decoder {s(c['token'])}")
    return f"{c['name']}: vanilla GPT-NeoX, V {c['V']}, T {c['T']}, {s(c)}"


# ==========================================================================================================
# PyTorch models and checkpoints
# ==========================================================================================================

def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_model(c, device):
    """The make_fixtures model for config c on `device`, fp32, HF's init, eager attention (finite for the fully
    masked query rows of left-padded generation, unlike some sdpa paths)."""
    with torch.device(device):
        if c["kind"] == "block":
            model = mf.BlockTransformer(dict(c, max_positions=c["T"], attn="eager"))
        else:
            cfg = mf.neox_config(c["hidden"], c["layers"], c["heads"], c["inter"], vocab=c["V"],
                                 max_positions=c["T"], attn="eager")
            model = GPTNeoXForCausalLM(cfg)
            mf.check_rotary(model.gpt_neox, cfg)
    return model.eval()


def original_keys(model):
    """Original checkpoint key (SPEC 6.1 / 6.2) -> (module parameter name, parameter)."""
    return {mf.orig_key(n): (n, p) for n, p in model.named_parameters()}


@dataclass
class Checkpoint:
    path: str                 # the resolved checkpoint: a directory holding model.safetensors, or the file
    weights: str              # its model.safetensors
    config: dict
    config_source: str
    tensors: dict             # original key -> tensor as stored (CPU)
    metadata: dict


def resolve_checkpoint(path):
    """A checkpoint directory (model.safetensors [+ config.json]), the .safetensors file itself, or a training
    output directory, whose newest checkpoint-<step>/ holding model.safetensors is taken."""
    if os.path.isfile(path):
        return path, path
    if not os.path.isdir(path):
        raise ParityError(f"checkpoint '{path}' does not exist")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path, os.path.join(path, "model.safetensors")
    steps = [(int(m.group(1)), d) for d in os.listdir(path) if (m := re.fullmatch(r"checkpoint-(\d+)", d))
             and os.path.isfile(os.path.join(path, d, "model.safetensors"))]
    if not steps:
        raise ParityError(f"no checkpoint in '{path}': neither model.safetensors nor checkpoint-<step>/")
    newest = os.path.join(path, max(steps)[1])
    return newest, os.path.join(newest, "model.safetensors")


def read_checkpoint(path):
    resolved, weights = resolve_checkpoint(path)
    tensors = load_file(weights)
    with safe_open(weights, "pt") as f:
        metadata = f.metadata() or {}
    config_path = os.path.join(os.path.dirname(weights), "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            j = json.load(f)
        if "blocktf_config" in j:
            config, source = config_from_blocktf_json(j), "config.json (blocktf)"
        elif "hidden_size" in j or "architectures" in j:
            config, source = config_from_hf_json(j), "config.json (HuggingFace GPT-NeoX)"
        else:
            raise ParityError(f"{config_path}: neither blocktf's config nor a HuggingFace GPT-NeoX config")
    else:
        config = config_from_shapes({k: list(t.shape) for k, t in tensors.items()})
        source = "inferred from the tensor shapes (no config.json)"
    return Checkpoint(resolved, weights, config, source, tensors, metadata)


@dataclass
class LoadResult:
    missing: list
    unexpected: list
    wrong_shape: list
    ignored: list
    error: str = ""

    @property
    def ok(self):
        return not (self.missing or self.unexpected or self.wrong_shape or self.error)

    def detail(self):
        if self.ok:
            return "every parameter loaded, no extra key" + (f" ({len(self.ignored)} Pythia buffers ignored)"
                                                            if self.ignored else "")
        parts = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for what, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                                    ("wrong shape", self.wrong_shape)) if keys]
        return "; ".join(parts + ([self.error] if self.error else []))


def strict_load(model, tensors):
    """The export check of issue 7.2: the checkpoint's keys are exactly the model's parameters under their original
    names, with the model's shapes; then load_state_dict(strict=True) (bf16 values upcast to the model's dtype)."""
    want = original_keys(model)
    ignored = sorted(k for k in tensors if k not in want and k.endswith(PYTHIA_BUFFERS))
    result = LoadResult(missing=sorted(set(want) - set(tensors)),
                        unexpected=sorted(set(tensors) - set(want) - set(ignored)),
                        wrong_shape=sorted(f"{k} {list(tensors[k].shape)} (model {list(p.shape)})"
                                           for k, (_, p) in want.items()
                                           if k in tensors and tensors[k].shape != p.shape),
                        ignored=ignored)
    if result.ok:
        try:
            model.load_state_dict({name: tensors[k] for k, (name, _) in want.items()}, strict=True)
        except RuntimeError as e:
            result.error = str(e).splitlines()[0]
    return result


def load_models(ckpt, device):
    """(fp32 reference, bf16 copy, LoadResult). The bf16 copy of bf16-stored weights is exact."""
    model32 = build_model(ckpt.config, device)
    load = strict_load(model32, ckpt.tensors)
    model16 = copy.deepcopy(model32).to(torch.bfloat16) if load.ok else None
    return model32, model16, load


# ==========================================================================================================
# write-random
# ==========================================================================================================

def original_init(model):
    """The init the original code gives the two parts HF does not own (SPEC 1.2, 1.5)."""
    with torch.no_grad():
        model.embedder.embeddings.weight.normal_(0.0, 0.02)
        exp = model.token_decoder.expansion_layer
        exp.weight.normal_(0.0, exp.weight.shape[1] ** -0.5)
        exp.bias.zero_()


def write_random(name, out, seed, device):
    c = named_config(name)
    torch.manual_seed(seed)
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(out, exist_ok=True)
    model = build_model(c, device)                          # fp32, HF's init
    if c["kind"] == "block":
        original_init(model)
        keys = list(original_keys(model))
        assert keys == mf.expected_block_keys(c), keys
        # one bf16 CPU copy per tensor: peak memory = fp32 model + bf16 copy
        tensors = {k: p.detach().to(torch.bfloat16).cpu().contiguous() for k, (_, p) in original_keys(model).items()}
        del model
        path = os.path.join(out, "model.safetensors")
        save_file(tensors, path, metadata={"format": "pt"})
        stale = os.path.join(out, "config.json")
        if os.path.exists(stale):
            os.remove(stale)                                # released block checkpoints have none
            print(f"removed {stale} (a released block checkpoint has no config.json)")
    else:
        model.generation_config.eos_token_id = None
        model.to(torch.bfloat16).save_pretrained(out)       # safetensors + config.json, original key names
        path = os.path.join(out, "model.safetensors")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        dtypes = sorted({f.get_slice(k).get_dtype() for k in keys})
        values = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    print(f"wrote {path}: {describe(c)}; {len(keys)} tensors, {values:,} values, dtypes {'/'.join(dtypes)}, "
          f"{os.path.getsize(path):,} bytes" + ("" if c["kind"] == "block" else " (+ config.json)"))
    return path


# ==========================================================================================================
# The logits dump of `INFER --score --dump-logits` and the scoring windows
# ==========================================================================================================

@dataclass
class Dump:
    input_ids: np.ndarray        # (W, N) int64: the scoring windows
    attention_mask: np.ndarray   # (W, N): 1 real token (document or its EOS), 0 right padding
    window: np.ndarray           # (S,) window of each scored token
    position: np.ndarray         # (S,) its position in the window
    targets: np.ndarray          # (S,) its id
    losses: np.ndarray           # (S,) blocktf's cross-entropy
    vocab: int
    metadata: dict
    _file: object = field(repr=False, default=None)
    _logits: torch.Tensor = field(repr=False, default=None)

    def logits(self, rows):
        """blocktf's fp32 logits of the given dump rows, [len(rows), V], read slice by slice (a 1.2b dump of a long
        text does not fit comfortably in memory at once)."""
        rows = np.asarray(rows)
        if self._logits is not None:
            return self._logits[torch.from_numpy(rows)].float()
        sl = self._file.get_slice("logits")
        breaks = np.nonzero(np.diff(rows) != 1)[0] + 1    # contiguous runs of rows: one slice each
        return torch.cat([sl[int(run[0]):int(run[-1]) + 1] for run in np.split(rows, breaks)]).float()


def read_dump(path):
    f = safe_open(path, "pt")
    names = set(f.keys())
    need = {"input_ids", "attention_mask", "scored_window", "scored_position", "targets", "logits", "losses"}
    if need - names:
        raise ParityError(f"{path}: not a blocktf logits dump, missing {sorted(need - names)}")
    get = lambda k: f.get_tensor(k).numpy().astype(np.int64)  # noqa: E731
    shape = f.get_slice("logits").get_shape()
    if len(shape) != 2 or f.get_slice("logits").get_dtype() != "F32":
        raise ParityError(f"{path}: logits should be F32 (S, V), are {f.get_slice('logits').get_dtype()} {shape}")
    return Dump(get("input_ids"), get("attention_mask"), get("scored_window"), get("scored_position"), get("targets"),
                f.get_tensor("losses").float().numpy(), shape[1], f.metadata() or {}, _file=f)


def write_dump(path, input_ids, attention_mask, window, position, targets, logits, losses, metadata):
    """The dump format of `INFER --dump-logits` (used by the self-test to make fake dumps)."""
    i32 = lambda a: torch.as_tensor(np.asarray(a)).to(torch.int32).contiguous()  # noqa: E731
    save_file({"input_ids": i32(input_ids), "attention_mask": i32(attention_mask), "scored_window": i32(window),
               "scored_position": i32(position), "targets": i32(targets),
               "logits": logits.detach().float().cpu().contiguous(),
               "losses": torch.as_tensor(losses).float().contiguous()}, path, metadata=metadata)


def first_scored(c):
    """Position of the first scored token of a window: vanilla 1 (position 0 has no context); block models L_B (the
    window's first block is context only: block k >= 1 is predicted from the block decoder's output for k-1)."""
    return c["L"] if c["kind"] == "block" else 1


def scored_rows(attention_mask, first):
    """(window, position) of every scored token: the real ones at positions >= first, window by window."""
    w, p = np.nonzero(attention_mask)
    keep = p >= first
    return w[keep], p[keep]


def document_windows(documents, N):
    """Each document: its ids then one EOS, cut into consecutive windows of N, the last right-padded with id 0."""
    ids, mask = [], []
    for doc in documents:
        tokens = list(doc) + [EOS]
        for start in range(0, len(tokens), N):
            real = tokens[start:start + N]
            ids.append(real + [EOS] * (N - len(real)))
            mask.append([1] * len(real) + [0] * (N - len(real)))
    return np.array(ids, dtype=np.int64).reshape(-1, N), np.array(mask, dtype=np.int64).reshape(-1, N)


def dump_problems(dump, c):
    """(problems, fatal): what is wrong with the dump's format for this model (empty: well formed); fatal when the
    logits cannot even be compared."""
    W, N = dump.input_ids.shape
    S = len(dump.window)
    fatal = None
    if dump.attention_mask.shape != (W, N) or not (len(dump.position) == len(dump.targets) == len(dump.losses) == S):
        fatal = "inconsistent tensor shapes"
    elif dump.vocab != c["V"]:
        fatal = f"logits have {dump.vocab} columns, the model's vocabulary is {c['V']}"
    elif S == 0:
        fatal = "no scored token"
    elif (dump.window < 0).any() or (dump.window >= W).any() or (dump.position < 0).any() or (dump.position >= N).any():
        fatal = "scored (window, position) out of range"
    elif c["kind"] == "block" and N % c["L"]:
        fatal = f"window length {N} is not a multiple of L_B {c['L']}"
    if fatal:
        return [fatal], True
    problems = []
    w, p = scored_rows(dump.attention_mask, first_scored(c))
    want = set(zip(w.tolist(), p.tolist()))
    got = list(zip(dump.window.tolist(), dump.position.tolist()))
    if len(set(got)) != len(got):
        problems.append("a scored (window, position) appears twice")
    if set(got) != want:
        problems.append(f"scored positions: {len(set(got) - want)} unexpected, {len(want - set(got))} missing "
                        f"(expected every real token at positions >= {first_scored(c)})")
    if (dump.targets != dump.input_ids[dump.window, dump.position]).any():
        problems.append("targets differ from input_ids at the scored positions")
    if (dump.input_ids[dump.attention_mask == 0] != EOS).any():
        problems.append("padding that is not id 0")
    if not all(np.all(row[:row.sum()] == 1) for row in dump.attention_mask):
        problems.append("attention_mask is not 1...1 0...0 in every window")
    if not np.isfinite(dump.losses).all():
        problems.append("non-finite losses")
    return problems, False


# ==========================================================================================================
# PyTorch logits at the scored positions
# ==========================================================================================================

@torch.inference_mode()
def reference_rows(model, c, ids, mask, pos):
    """Logits [len(pos), V] that predict the tokens at positions `pos` of one window (ids, mask: [N] long tensors)."""
    if c["kind"] == "block":
        L = c["L"]
        x, m = ids.view(1, -1, L), mask.view(1, -1, L)
        logits = model(x, m, m.any(-1).long())[0]       # [N/L - 1, L, V]: target block k = 1.. at index k - 1
        return logits[pos // L - 1, pos % L]             # position p is slot p % L of block p // L
    logits = model(input_ids=ids[None], attention_mask=mask[None], use_cache=False).logits[0]
    return logits[pos - 1]                               # position t - 1 predicts the token at t


class ErrorStats:
    """Errors of logits `a` against reference logits `b`, accumulated window by window."""

    def __init__(self):
        self.diff2 = self.ref2 = 0.0
        self.row_err, self.agree, self.ce_a, self.ce_b = [], 0, [], []

    def add(self, a, b, targets):
        d2 = (a.double() - b.double()).pow(2).sum(-1)
        b2 = b.double().pow(2).sum(-1)
        self.diff2 += float(d2.sum())
        self.ref2 += float(b2.sum())
        self.row_err.append((d2 / b2.clamp(min=1e-300)).sqrt().cpu())
        self.agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        self.ce_a.append(F.cross_entropy(a.double(), targets, reduction="none").cpu())
        self.ce_b.append(F.cross_entropy(b.double(), targets, reduction="none").cpu())
        return self.ce_a[-1].numpy(), self.ce_b[-1].numpy()      # per-token CE of a and of b

    def summary(self):
        rows = torch.cat(self.row_err)
        ce_a, ce_b = torch.cat(self.ce_a), torch.cat(self.ce_b)
        return dict(norm=math.sqrt(self.diff2 / self.ref2), row_max=float(rows.max()), row_mean=float(rows.mean()),
                    loss_a=float(ce_a.mean()), loss_b=float(ce_b.mean()),
                    loss_rel=abs(float(ce_a.mean()) - float(ce_b.mean())) / abs(float(ce_b.mean())),
                    agree=self.agree / len(rows))


def compare_scores(dump, model32, model16, c):
    """blocktf's dumped logits and PyTorch bf16's against PyTorch fp32, window by window, at the scored rows only."""
    device = next(model32.parameters()).device
    bt, bf = ErrorStats(), ErrorStats()
    ce_bt_logits = np.zeros(len(dump.window))     # CE of blocktf's own logits, in dump row order
    ce_ref = np.zeros(len(dump.window))           # PyTorch fp32 CE
    for w in np.unique(dump.window):
        rows = np.nonzero(dump.window == w)[0]
        ids = torch.from_numpy(dump.input_ids[w]).to(device)
        mask = torch.from_numpy(dump.attention_mask[w]).to(device)
        pos = torch.from_numpy(dump.position[rows]).to(device)
        targets = torch.from_numpy(dump.targets[rows]).to(device)
        ref = reference_rows(model32, c, ids, mask, pos).float()
        half = reference_rows(model16, c, ids, mask, pos).float()
        ours = dump.logits(rows).to(device)
        ce_bt_logits[rows], ce_ref[rows] = bt.add(ours, ref, targets)
        bf.add(half, ref, targets)
    losses = dump.losses.astype(np.float64)
    consistency = dict(
        own_logits=(float(np.abs(losses - ce_bt_logits).max()), float(np.abs(losses - ce_bt_logits).mean())),
        reference=(float(np.abs(losses - ce_ref).max()), float(np.abs(losses - ce_ref).mean())))
    s = bt.summary()
    s["loss_a"] = float(losses.mean())            # the loss blocktf reports is the mean of its own `losses`
    s["loss_rel"] = abs(s["loss_a"] - s["loss_b"]) / abs(s["loss_b"])
    meta_loss = dump.metadata.get("loss")
    consistency["metadata"] = abs(float(meta_loss) - s["loss_a"]) if meta_loss is not None else None
    return dict(blocktf=s, bf16=bf.summary(), consistency=consistency)


# ==========================================================================================================
# Greedy generation, fp32, no cache
# ==========================================================================================================

def step_record(logits, follow, step):
    """PyTorch's choice at one step, its top-2 margin, and its logit gap to blocktf's choice (when there is one)."""
    top = logits.topk(2)
    choice = int(top.indices[0])
    gap = None
    if step < len(follow):   # an id outside the vocabulary is infinitely far from a tie
        gap = float(logits[choice] - logits[follow[step]]) if 0 <= follow[step] < len(logits) else math.inf
    return choice, float(top.values[0] - top.values[1]), gap


@torch.inference_mode()
def greedy_block(model, prompt, padded_length, M, follow=()):
    """SPEC 5.1 with blocktf's choices (SPEC 10.3). The prompt is left-padded with id 0 to padded_length (blocktf
    pads every prompt of a batch to one common block boundary); a block is a key of the block decoder when any of
    its slots is real (block_attention_mask = any(mask)), so whole pad blocks are masked and a partially padded first
    block is kept, its pads embedded as id 0. Block decoder positions: block index, pad blocks included. For each
    new block: the whole block decoder over all blocks so far, its last output -> expansion -> R prefix vectors;
    token j comes from the token decoder over [prefix, tokens 0..j-1 of this block] at positions 0..R+j-1 (prefix at
    0..R-1, token i at R+i, as in training). The finished block is appended. Returns [(token, margin, gap)] x M."""
    L, R, H_t = model.L, model.R, model.token_decoder.H_t
    device = next(model.parameters()).device
    pad = padded_length - len(prompt)
    assert pad >= 0 and padded_length % L == 0
    ids = torch.tensor([EOS] * pad + list(prompt), device=device).view(1, -1, L)
    block_mask = torch.tensor([0] * pad + [1] * len(prompt), device=device).view(1, -1, L).any(-1).long()
    lm = model.token_decoder.lm
    out = []
    while len(out) < M:
        e = model.embedder.embeddings(ids).reshape(1, ids.shape[1], -1)
        g = model.block_decoder.gpt_neox(inputs_embeds=e, attention_mask=block_mask).last_hidden_state[:, -1]
        prefix = model.token_decoder.expansion_layer(g[:, :, None]).reshape(1, R, H_t)
        block = []
        for j in range(L):
            x = torch.cat([prefix, lm.gpt_neox.embed_in(torch.tensor([block], device=device, dtype=torch.long))], 1)
            pos = torch.arange(R + j, device=device)[None]
            logits = lm(inputs_embeds=x, attention_mask=torch.ones_like(pos), position_ids=pos).logits[0, -1]
            out.append(step_record(logits.float(), follow, len(out)))
            block.append(out[-1][0])
        ids = torch.cat([ids, torch.tensor(block, device=device).view(1, 1, L)], 1)
        block_mask = torch.cat([block_mask, torch.ones_like(block_mask[:, :1])], 1)
    return out[:M]


@torch.inference_mode()
def greedy_vanilla(model, prompt, M, follow=()):
    """A full forward over prompt + generated tokens at every step (one prompt: no padding; blocktf left-pads a
    batch with masked keys and shifted positions, which must give the same logits)."""
    device = next(model.parameters()).device
    seq = torch.tensor([list(prompt)], device=device)
    out = []
    for step in range(M):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits[0, -1]
        out.append(step_record(logits.float(), follow, step))
        seq = torch.cat([seq, torch.tensor([[out[-1][0]]], device=device)], 1)
    return out


def padded_prompt_length(c, prompts):
    """blocktf's common left-padded length of a batch: the longest prompt rounded up to whole blocks."""
    L = c["L"] if c["kind"] == "block" else 1
    return -(-max(len(p) for p in prompts) // L) * L


@dataclass
class GreedyRow:
    prompt_tokens: int
    wanted: int               # M
    compared: int             # min(M, tokens blocktf returned)
    agreed: int               # common prefix
    divergence: tuple = None  # (step, PyTorch token, blocktf token, top-2 margin, gap)
    ok: bool = True
    note: str = ""


def compare_greedy(model32, c, prompts, blocktf_ids, M, gap_tolerance):
    rows = []
    padded = padded_prompt_length(c, prompts)
    for prompt, theirs in zip(prompts, blocktf_ids):
        theirs = list(theirs[:M])
        if c["kind"] == "block":
            steps = greedy_block(model32, prompt, padded, M, follow=theirs)
        else:
            steps = greedy_vanilla(model32, prompt, M, follow=theirs)
        ours = [s[0] for s in steps]
        agreed = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        row = GreedyRow(len(prompt), M, len(theirs), agreed)
        if agreed < len(theirs):
            token, margin, gap = steps[agreed]
            row.divergence = (agreed, token, theirs[agreed], margin, gap)
            row.ok = gap <= gap_tolerance
            row.note = "near tie" if row.ok else "not a near tie"
        elif len(theirs) < M:
            row.ok, row.note = False, f"blocktf returned {len(theirs)} tokens, {M} asked for"
        rows.append(row)
    return rows


# ==========================================================================================================
# Verdict and report
# ==========================================================================================================

@dataclass
class Outcome:
    checks: list = field(default_factory=list)     # (name, ok: bool or None = information, detail)
    scores: dict = None
    greedy: list = None
    precision: str = "BF16 (assumed: no dump)"

    @property
    def passed(self):
        return all(ok is not False for _, ok, _ in self.checks)


def evaluate(load, dump=None, model32=None, model16=None, c=None, greedy_data=None, windows_check=None):
    """The comparison core: everything is data (the dump, blocktf's greedy ids); nothing runs INFER."""
    out = Outcome()
    out.checks.append(("strict load of the checkpoint", load.ok, load.detail()))
    if dump is not None:
        out.precision = dump.metadata.get("precision", "").upper()
        if out.precision not in TOLERANCES:
            out.checks.append(("dump precision", False, f"metadata precision {out.precision!r}, not BF16 or FP32"))
            out.precision = "BF16 (assumed)"
    tol = TOLERANCES[out.precision.split()[0]]
    if not load.ok:
        return out
    if dump is not None:
        problems, fatal = dump_problems(dump, c)
        out.checks.append(("dump format", not problems, "; ".join(problems) or
                           f"{dump.input_ids.shape[0]} windows x {dump.input_ids.shape[1]} tokens, "
                           f"{len(dump.window)} scored"))
        if not fatal:
            out.scores = compare_scores(dump, model32, model16, c)
            ours, yard = out.scores["blocktf"], out.scores["bf16"]
            limit = max(tol["logits_factor"] * yard["norm"], tol["logits_floor"])
            out.checks.append(("logits: blocktf vs PyTorch fp32", ours["norm"] <= limit,
                               f"norm-wise rel err {ours['norm']:.3g} <= {limit:.3g}"))
            out.checks.append(("mean loss: blocktf vs PyTorch fp32", ours["loss_rel"] <= tol["loss"],
                               f"rel diff {ours['loss_rel']:.3g} <= {tol['loss']:.3g}"))
    if windows_check is not None:
        out.checks.append(("windows = HF tokenization of the texts (information)", None, windows_check))
    if greedy_data is not None:
        prompts, theirs, M = greedy_data
        if len(theirs) != len(prompts):
            out.checks.append(("greedy generation", False, f"{len(theirs)} output lines for {len(prompts)} prompts"))
        else:
            out.greedy = compare_greedy(model32, c, prompts, theirs, M, tol["greedy_gap"])
            bad = sum(not r.ok for r in out.greedy)
            same = sum(r.agreed == M for r in out.greedy)
            out.checks.append(("greedy generation", bad == 0,
                               f"{same}/{len(prompts)} identical, {bad} divergence(s) beyond a near tie "
                               f"(gap > {tol['greedy_gap']:g})"))
    return out


def render_report(ckpt, outcome, header_extra=()):
    c = ckpt.config
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in ckpt.tensors.values()})
    lines = ["# blocktf vs PyTorch parity", "",
             "| item | value |", "| --- | --- |",
             f"| checkpoint | `{ckpt.path}` |",
             f"| config | {describe(c)} |",
             f"| shape from | {ckpt.config_source} |",
             f"| weights | {len(ckpt.tensors)} tensors, {'/'.join(dtypes)}, metadata {json.dumps(ckpt.metadata)} |",
             f"| precision (dump) | {outcome.precision} |"]
    lines += [f"| {k} | {v} |" for k, v in header_extra]
    if outcome.scores:
        s, h, k = outcome.scores["blocktf"], outcome.scores["bf16"], outcome.scores["consistency"]
        lines += ["", "## Logits and loss at the scored tokens (reference: PyTorch fp32)", "",
                  "| comparison | ‖a−b‖/‖b‖ | max row rel err | mean row rel err | mean loss a | mean loss b "
                  "| loss rel diff | argmax agrees |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in (("blocktf vs PyTorch fp32", s), ("PyTorch bf16 vs PyTorch fp32", h)):
            lines.append(f"| {name} | {r['norm']:.3e} | {r['row_max']:.3e} | {r['row_mean']:.3e} | {r['loss_a']:.6f} "
                         f"| {r['loss_b']:.6f} | {r['loss_rel']:.3e} | {100 * r['agree']:.2f}% |")
        lines += ["", "| blocktf's per-token `losses` against | max abs diff | mean abs diff |",
                  "| --- | ---: | ---: |",
                  f"| CE of blocktf's own dumped logits | {k['own_logits'][0]:.3e} | {k['own_logits'][1]:.3e} |",
                  f"| PyTorch fp32 CE | {k['reference'][0]:.3e} | {k['reference'][1]:.3e} |"]
        if k["metadata"] is not None:
            lines.append(f"| (metadata \"loss\" vs mean of `losses`) | {k['metadata']:.3e} | |")
    if outcome.greedy is not None:
        rows = outcome.greedy
        lines += ["", "## Greedy generation (PyTorch fp32, no cache)", "",
                  "| prompt | prompt tokens | compared | agreed prefix | first divergence: step, PyTorch / blocktf "
                  "token, PyTorch top-2 margin, gap to blocktf's token | verdict |",
                  "| ---: | ---: | ---: | ---: | --- | --- |"]
        for i, r in enumerate(rows):
            div = "-" if r.divergence is None else (f"step {r.divergence[0]}: {r.divergence[1]} / {r.divergence[2]}, "
                                                    f"margin {r.divergence[3]:.3g}, gap {r.divergence[4]:.3g}")
            lines.append(f"| {i + 1} | {r.prompt_tokens} | {r.compared} | {r.agreed} | {div} | "
                         f"{'ok' if r.ok else 'FAIL'}{' (' + r.note + ')' if r.note else ''} |")
        same = sum(r.agreed == r.wanted for r in rows)
        mean = sum(r.agreed / r.wanted for r in rows) / max(len(rows), 1)
        lines += ["", f"Fully identical: {same}/{len(rows)} prompts; mean agreed prefix {100 * mean:.1f}%."]
    lines += ["", "## Checks", "", "| check | result | detail |", "| --- | --- | --- |"]
    for name, ok, detail in outcome.checks:
        lines.append(f"| {name} | {'info' if ok is None else 'PASS' if ok else 'FAIL'} | {detail} |")
    lines += ["", f"**{'PASS' if outcome.passed else 'FAIL'}**", ""]
    return "\n".join(lines)


# ==========================================================================================================
# INFER (thin subprocess wrappers) and the inputs of the comparison
# ==========================================================================================================

def run_infer(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ParityError(f"cannot run {cmd[0]}: {e}")
    if p.returncode != 0:
        raise ParityError(f"{cmd[0]} exited with status {p.returncode}; its stderr:\n{p.stderr.strip()}")
    return p.stdout, p.stderr


def infer_score(infer, checkpoint, tokenizer, texts, score_length, dump_path):
    cmd = [infer, "--checkpoint", checkpoint, "--tokenizer", tokenizer]
    for t in texts:
        cmd += ["--score", t]
    if score_length:
        cmd += ["--score-length", str(score_length)]
    _, err = run_infer(cmd + ["--dump-logits", dump_path])
    return err


def infer_ids(infer, checkpoint, tokenizer, prompt_file, M):
    out, _ = run_infer([infer, "--checkpoint", checkpoint, "--tokenizer", tokenizer, "--prompt-file", prompt_file,
                        "--max-new-tokens", str(M), "--no-stop", "--ids"])
    return out


def parse_ids_output(text):
    """`INFER --ids` stdout: one line per prompt, the generated ids separated by single spaces."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    try:
        return [[int(t) for t in line.split()] for line in lines]
    except ValueError:
        raise ParityError("--ids output is not lines of space-separated integers:\n" + text[:500])


def read_prompts(path):
    with open(path, encoding="utf-8", newline="") as f:      # newline="": the bytes as they are, \r kept
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def load_tokenizer(path):
    from tokenizers import Tokenizer
    if not os.path.isfile(path):
        raise ParityError(f"tokenizer '{path}' not found (--tokenizer PATH)")
    tok = Tokenizer.from_file(path)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def windows_match_texts(dump, texts, encode):
    """Whether the dump's windows are the texts' HF tokenization, each file one document (+ EOS), cut into windows."""
    docs = []
    for t in texts:
        with open(t, encoding="utf-8", newline="") as f:
            docs.append(encode(f.read()))
    ids, mask = document_windows(docs, dump.input_ids.shape[1])
    if ids.shape == dump.input_ids.shape and (ids == dump.input_ids).all() and (mask == dump.attention_mask).all():
        return f"yes ({sum(len(d) for d in docs)} tokens in {len(docs)} documents)"
    if ids.shape != dump.input_ids.shape:
        return f"NO: HF gives {ids.shape[0]} windows, the dump has {dump.input_ids.shape[0]}"
    w = int(np.nonzero(((ids != dump.input_ids) | (mask != dump.attention_mask)).any(1))[0][0])
    return f"NO: first difference in window {w}"


def default_tokenizer():
    return os.path.join(os.environ.get("BLOCKTF_DATA_DIR", "../shared/data"), "tokenizer", "pythia-tokenizer.json")


def cmd_compare(args):
    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False       # the reference is true fp32
    torch.backends.cudnn.allow_tf32 = False
    tokenizer = args.tokenizer or default_tokenizer()
    if not args.text and not args.dump and not args.prompts:
        raise ParityError("nothing to compare: give --text FILE (scoring) and/or --prompts FILE (generation)")
    ckpt = read_checkpoint(args.checkpoint)
    print(f"checkpoint {ckpt.path}: {describe(ckpt.config)} ({ckpt.config_source})", file=sys.stderr)
    model32, model16, load = load_models(ckpt, device)
    if not load.ok:                                      # nothing else is meaningful
        args.text, args.dump, args.prompts = [], None, None
    extra = [("device", f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
              + f", torch {torch.__version__}, transformers {transformers.__version__}")]
    with tempfile.TemporaryDirectory() as tmp:
        dump = windows = greedy = None
        if args.dump or args.text:
            dump_path = args.dump or os.path.join(tmp, "dump.safetensors")
            if not args.dump:
                err = infer_score(args.infer, ckpt.path, tokenizer, args.text, args.score_length, dump_path)
                extra.append(("blocktf --score said", " / ".join(err.strip().splitlines()[-3:]) or "-"))
            dump = read_dump(dump_path)
            W, N = dump.input_ids.shape
            extra.append(("scored", f"{W} windows x {N} tokens, {len(dump.window)} scored tokens "
                                    f"(config in dump: {dump.metadata.get('config')})"))
            if args.text and os.path.isfile(tokenizer):
                windows = windows_match_texts(dump, args.text, load_tokenizer(tokenizer))
        if args.prompts:
            encode = load_tokenizer(tokenizer)
            prompts = [encode(line) for line in read_prompts(args.prompts)]
            if args.ids:
                with open(args.ids) as f:
                    text = f.read()
            else:
                text = infer_ids(args.infer, ckpt.path, tokenizer, args.prompts, args.max_new_tokens)
            greedy = (prompts, parse_ids_output(text), args.max_new_tokens)
        outcome = evaluate(load, dump, model32, model16, ckpt.config, greedy, windows)
    report = render_report(ckpt, outcome, extra)
    print(report)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report)
    return 0 if outcome.passed else 1


# ==========================================================================================================
# self-test (CPU, no blocktf)
# ==========================================================================================================

def bf16_round(model):
    """Round the weights through bf16, so that the fp32 model holds exactly what a bf16 checkpoint stores."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def write_blocktf_checkpoint(model, c, out):
    """The layout blocktf's save_checkpoint writes: model.safetensors (original keys, bf16) + config.json."""
    os.makedirs(out, exist_ok=True)
    tensors = {k: p.detach().to(torch.bfloat16).contiguous() for k, (_, p) in original_keys(model).items()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(blocktf_config_json(c))


def fake_dump(model, c, documents, N, path, precision, corrupt_window=None):
    """What `INFER --score --dump-logits` would write if blocktf computed exactly like `model`. corrupt_window: in
    that window every scored row gets the logits of the next position (an off-by-one in the row mapping)."""
    ids, mask = document_windows(documents, N)
    w, p = scored_rows(mask, first_scored(c))
    logits = torch.cat([reference_rows(model, c, torch.from_numpy(ids[k]), torch.from_numpy(mask[k]),
                                       torch.from_numpy(p[w == k])).float() for k in np.unique(w)])
    if corrupt_window is not None:
        rows = np.nonzero(w == corrupt_window)[0]
        logits[rows[:-1]] = logits[rows[1:]].clone()
    targets = torch.from_numpy(ids[w, p])
    losses = F.cross_entropy(logits, targets, reduction="none")
    write_dump(path, ids, mask, w, p, targets, logits, losses,
               {"config": c["name"], "precision": precision, "loss": repr(float(losses.mean()))})


class SelfTest:
    def __init__(self):
        self.failures = 0

    def check(self, name, ok, detail=""):
        self.failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def self_test_config(t, name, tmp):
    """Export / strict load, scoring and greedy on one tiny config with the fixtures' non-tiny init (logits O(1))."""
    c = named_config(name)
    gen = np.random.RandomState(5)
    model = build_model(c, "cpu")
    mf.init_params([(mf.orig_key(n), p) for n, p in model.named_parameters()], torch.Generator().manual_seed(3))
    bf16_round(model)
    d = os.path.join(tmp, name)
    write_blocktf_checkpoint(model, c, os.path.join(d, "out", "checkpoint-20"))
    write_blocktf_checkpoint(model, c, os.path.join(d, "out", "checkpoint-100"))   # newest step: 100, not 20
    ckpt = read_checkpoint(os.path.join(d, "out"))
    t.check(f"{name}: newest checkpoint-<step> chosen", ckpt.path.endswith("checkpoint-100"), ckpt.path)
    t.check(f"{name}: blocktf config.json read back", ckpt.config == c, describe(ckpt.config))
    model32, model16, load = load_models(ckpt, "cpu")
    t.check(f"{name}: strict load", load.ok, load.detail())
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model32.parameters()))
    t.check(f"{name}: loaded weights = written weights", same)

    N = 16
    documents = [gen.randint(1, c["V"], size=n).tolist() for n in (37, 5, 20, 2)]
    dump_path = os.path.join(d, "dump.safetensors")
    # a dump from PyTorch bf16: exactly the yardstick, so it must pass
    fake_dump(model16, c, documents, N, dump_path, "BF16")
    dump = read_dump(dump_path)
    ids, mask = document_windows(documents, N)
    t.check(f"{name}: dump round trip", (dump.input_ids == ids).all() and (dump.attention_mask == mask).all()
            and dump.metadata["precision"] == "BF16" and not dump_problems(dump, c)[0],
            f"{ids.shape[0]} windows, {len(dump.window)} scored tokens")
    outcome = evaluate(load, dump, model32, model16, c)
    print(render_report(ckpt, outcome))
    s = outcome.scores["blocktf"]
    t.check(f"{name}: bf16 dump passes", outcome.passed and s["norm"] == outcome.scores["bf16"]["norm"],
            f"norm err {s['norm']:.3g}, loss rel diff {s['loss_rel']:.3g}")
    t.check(f"{name}: losses consistent with the dumped logits", outcome.scores["consistency"]["own_logits"][0] < 1e-5)
    # an fp32 dump from the fp32 model: error 0 against 1e-4
    fake_dump(model32, c, documents, N, dump_path, "FP32")
    outcome = evaluate(load, read_dump(dump_path), model32, model16, c)
    t.check(f"{name}: fp32 dump passes the FP32 limits", outcome.passed, f"{outcome.scores['blocktf']['norm']:.3g}")
    # off by one position in one window: must fail
    fake_dump(model16, c, documents, N, dump_path, "BF16", corrupt_window=0)
    outcome = evaluate(load, read_dump(dump_path), model32, model16, c)
    failed = [n for n, ok, _ in outcome.checks if ok is False]
    t.check(f"{name}: logits of position p+1 at p (window 0) fail", not outcome.passed, f"failed: {failed}, "
            f"norm err {outcome.scores['blocktf']['norm']:.3g}, worst row {outcome.scores['blocktf']['row_max']:.3g}")
    # a dump that leaves out a scored token or scores block 0: a format failure
    dump = read_dump(dump_path)
    dump.window, dump.position = dump.window[1:], dump.position[1:]
    dump.targets, dump.losses = dump.targets[1:], dump.losses[1:]
    problems, _ = dump_problems(dump, c)
    t.check(f"{name}: a missing scored token is a format problem", bool(problems), "; ".join(problems))

    # greedy: prompts of lengths that need partial and whole pad blocks in a batch
    prompts = [gen.randint(0, c["V"], size=n).tolist() for n in (9, 1, 5, 3)]
    M = 12 if c["kind"] == "block" else 6
    ours = [[s[0] for s in (greedy_block(model32, p, padded_prompt_length(c, prompts), M) if c["kind"] == "block"
                            else greedy_vanilla(model32, p, M))] for p in prompts]
    # against pytorch_runner's no-cache loops (each prompt padded alone, full model forward per token)
    ref = pr.block_generate_nocache if c["kind"] == "block" else pr.vanilla_generate_nocache
    alone = [ref(model32, torch.tensor([p]), M)[0].tolist() for p in prompts]
    t.check(f"{name}: greedy (batch padding, masks) = pytorch_runner's no-cache greedy", ours == alone)
    ids_text = "\n".join(" ".join(map(str, x)) for x in ours) + "\n"
    outcome = evaluate(load, None, model32, model16, c, (prompts, parse_ids_output(ids_text), M))
    print(render_report(ckpt, outcome))
    t.check(f"{name}: greedy against itself passes", outcome.passed and all(r.agreed == M for r in outcome.greedy))
    # blocktf choosing a clearly worse token at step 3 of prompt 2: must fail; its margin is reported
    wrong = [list(x) for x in ours]
    steps = greedy_vanilla(model32, prompts[1], M) if c["kind"] == "vanilla" else \
        greedy_block(model32, prompts[1], padded_prompt_length(c, prompts), M)
    wrong[1][3] = (steps[3][0] + 1) % c["V"]
    outcome = evaluate(load, None, model32, model16, c, (prompts, wrong, M))
    r = outcome.greedy[1]
    step, token, theirs, margin, gap = r.divergence
    t.check(f"{name}: a wrong greedy token fails", not outcome.passed and r.agreed == 3 and not r.ok,
            f"step {step}: PyTorch {token}, 'blocktf' {theirs}, margin {margin:.3g}, gap {gap:.3g}")
    outcome = evaluate(load, None, model32, model16, c, (prompts[:2], [ours[0], ours[1][:M - 2]], M))
    t.check(f"{name}: too few blocktf tokens fail", not outcome.passed, outcome.greedy[1].note)


def self_test_write_random(t, tmp):
    d = os.path.join(tmp, "random_block")
    write_random("tiny_block", d, seed=1, device="cpu")
    ckpt = read_checkpoint(d)
    keys = set(ckpt.tensors)
    t.check("write-random tiny_block: no config.json, shape inferred as tiny_block",
            not os.path.exists(os.path.join(d, "config.json")) and ckpt.config == named_config("tiny_block")
            and ckpt.config_source.startswith("inferred"), describe(ckpt.config))
    t.check("write-random tiny_block: original keys incl. block_decoder.gpt_neox.embed_in.weight, all bf16",
            keys == set(mf.expected_block_keys(named_config("tiny_block")))
            and "block_decoder.gpt_neox.embed_in.weight" in keys
            and all(v.dtype == torch.bfloat16 for v in ckpt.tensors.values())
            and list(ckpt.tensors["token_decoder.expansion_layer.weight"].shape) == [64, 48, 1]
            and ckpt.metadata == {"format": "pt"}, f"{len(keys)} tensors")
    _, _, load = load_models(ckpt, "cpu")
    t.check("write-random tiny_block: strict load", load.ok, load.detail())
    # a shape no named config has: heads from the head-dim rule
    shapes = {k: list(v.shape) for k, v in ckpt.tensors.items()}
    shapes["token_decoder.gpt_neox.layers.2.input_layernorm.weight"] = [32]
    inferred = config_from_shapes(shapes)
    t.check("unnamed inferred shape: heads by the head-dim rule, T 2048",
            inferred["name"] == "imported_block" and inferred["token"]["layers"] == 3
            and inferred["block"]["heads"] == 1 and inferred["T"] == DEFAULT_T, describe(inferred))

    d = os.path.join(tmp, "random_vanilla")
    write_random("tiny_vanilla", d, seed=1, device="cpu")
    ckpt = read_checkpoint(d)
    _, _, load = load_models(ckpt, "cpu")
    t.check("write-random tiny_vanilla: HF config.json read, strict load",
            load.ok and ckpt.config["name"] == "tiny_vanilla" and "embed_out.weight" in ckpt.tensors
            and ckpt.config_source.startswith("config.json (HuggingFace"), f"{describe(ckpt.config)}; {load.detail()}")
    # an export with an extra and a missing key must fail the strict load
    tensors = dict(ckpt.tensors)
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    model = build_model(ckpt.config, "cpu")
    bad = strict_load(model, tensors)
    t.check("strict load rejects lm_head.weight for embed_out.weight", not bad.ok, bad.detail())


def self_test_fixtures(t, tmp):
    """test/fixtures/*.model.safetensors (F32, original keys) load strictly and reproduce the golden logits."""
    fixtures = os.path.join(DEV, "..", "test", "fixtures")
    for name in ("tiny_block", "tiny_vanilla"):
        d = os.path.join(tmp, "fixture_" + name)
        os.makedirs(d)
        shutil.copy(os.path.join(fixtures, name + ".model.safetensors"), os.path.join(d, "model.safetensors"))
        if name == "tiny_vanilla":
            try:
                read_checkpoint(d)
                t.check("vanilla weights without config.json are refused", False)
            except ParityError as e:
                t.check("vanilla weights without config.json are refused", "config.json" in str(e), str(e)[:60])
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(blocktf_config_json(named_config(name)))
        ckpt = read_checkpoint(d)
        model32, _, load = load_models(ckpt, "cpu")
        golden = load_file(os.path.join(fixtures, name + ".golden.safetensors"))
        with torch.inference_mode():
            if name == "tiny_block":
                got = model32(golden["input_ids"], golden["attention_mask"], golden["block_attention_mask"])
            else:
                got = model32(input_ids=golden["input_ids"].long()).logits
        err = float((got - golden["logits"]).abs().max() / golden["logits"].abs().max())
        t.check(f"fixture {name}: strict load ({ckpt.config_source}), golden logits", load.ok and err < 1e-5,
                f"{load.detail()}; max rel err {err:.2e}")


def cmd_self_test(_args):
    torch.manual_seed(0)
    t = SelfTest()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tiny_block", "tiny_vanilla"):
            self_test_config(t, name, tmp)
        self_test_write_random(t, tmp)
        self_test_fixtures(t, tmp)
    print("self-test: " + ("all passed" if t.failures == 0 else f"{t.failures} FAILED"))
    return 0 if t.failures == 0 else 1


# ==========================================================================================================

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-random", help="a random checkpoint in the original authors' layout")
    w.add_argument("--config", required=True, choices=sorted(pr.CONFIGS))
    w.add_argument("--out", required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c = sub.add_parser("compare", help="blocktf vs PyTorch on a checkpoint")
    c.add_argument("--checkpoint", required=True, help="a checkpoint directory, its .safetensors file, or a "
                                                         "training output directory (newest checkpoint-<step>/)")
    c.add_argument("--infer", default="./infer", help="blocktf's infer program (default ./infer)")
    c.add_argument("--text", action="append", default=[], help="a document to score (repeatable)")
    c.add_argument("--score-length", type=int, help="tokens per scoring window (INFER's default when absent)")
    c.add_argument("--prompts", help="prompts, one per line, for the greedy comparison")
    c.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    c.add_argument("--tokenizer", help="tokenizer.json (default $BLOCKTF_DATA_DIR/tokenizer/pythia-tokenizer.json, "
                                       "BLOCKTF_DATA_DIR defaulting to ../shared/data)")
    c.add_argument("--report", help="also write the markdown report here")
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.add_argument("--dump", help="an existing --dump-logits file, read instead of running INFER --score")
    c.add_argument("--ids", help="an existing INFER --ids output, read instead of running INFER --prompt-file")
    sub.add_parser("self-test", help="the comparison path on the CPU, without blocktf")
    args = ap.parse_args()
    try:
        if args.command == "write-random":
            write_random(args.config, args.out, args.seed, pick_device(args.device))
            return 0
        return cmd_compare(args) if args.command == "compare" else cmd_self_test(args)
    except (ParityError, OSError) as e:
        print(f"parity: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
