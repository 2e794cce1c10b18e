#!/usr/bin/env python3
"""PyTorch baseline for issue 8: the independent Block Transformer of dev/make_fixtures.py (HF GPT-NeoX modules),
timed the way blocktf's `./train --bench` and `./infer --bench` time themselves.

  --mode train      forward + backward + clip_grad_norm_(1.0) + AdamW (0.9, 0.95, eps 1e-8, wd 0.1; fused on CUDA)
                    on random token ids, micro-batch B x T; fp32 master weights, bf16 autocast (--dtype bf16)
  --mode generate   SPEC 5.5: random weights (bf16 with --dtype bf16), random prompt ids, greedy, no EOS stop;
                    1 warm-up then --runs timed generations (prefill + decode); tokens/s = batch x decode / time.
                    vanilla: HF generate with its KV cache.  block: the loop of SPEC 5.1 below, positions as
                    SPEC 10.3 (block decoder: block index; token decoder: prefix 0..R-1, token j at R+j), the block
                    decoder's KV cache kept across blocks, the token decoder's cache new for every block.
  --check           on tiny_block / tiny_vanilla (fp32): the cached generation loops give exactly the greedy tokens
                    of loops that recompute the full forward at every step, and the training forward used here gives
                    the logits of make_fixtures.BlockTransformer.forward.

Each mode prints one markdown row:
  | pytorch[-compile] | config | mode | shape | ms | tokens/s | peak GPU memory |
shape: "B x T" (train), "P<prefill> D<decode> B<batch>" (generate); ms: median step (train), mean generation.

Run: python3 dev/bench/pytorch_runner.py --config block_main_b4_85 --mode train --micro-batch 8 [--compile]
     python3 dev/bench/pytorch_runner.py --config vanilla_160 --mode generate --prefill 2048 --decode 128 --batch 256
     /tmp/fixenv/bin/python dev/bench/pytorch_runner.py --check --device cpu --dtype fp32
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import make_fixtures as mf  # noqa: E402  the model-building code of the fixtures (HF GPT-NeoX modules)
from transformers import GPTNeoXForCausalLM  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Named configs: the numbers of model.h's named_configs() (SPEC 2.2, 2.4), replicated here; keep in sync.
# Block stacks: block_main(name, DE, layers, C) -> both decoders `layers` x C, heads autofill_heads(C), I = 4C,
# L = 4, R = 2.  V = 50304 (kPythiaVocab), T = 2048 (kTrainSeqLen) unless the config says otherwise.
# ----------------------------------------------------------------------------------------------------------

PYTHIA_V, TRAIN_T = 50304, 2048


def autofill_heads(C):
    return C // (32 if C <= 256 else 64 if C <= 1536 else 128)


def block_main(DE, layers, C):
    stack = dict(layers=layers, hidden=C, heads=autofill_heads(C), inter=4 * C)
    return dict(kind="block", V=PYTHIA_V, T=TRAIN_T, L=4, R=2, D_e=DE, block=dict(stack), token=dict(stack))


def vanilla(layers, hidden, heads, inter, V=PYTHIA_V, T=TRAIN_T):
    return dict(kind="vanilla", V=V, T=T, layers=layers, hidden=hidden, heads=heads, inter=inter)


CONFIGS = {
    "block_main_b4_5": block_main(64, 3, 256),
    "block_main_b4_19": block_main(128, 3, 512),
    "block_main_b4_85": block_main(192, 6, 768),
    "block_main_b4_300": block_main(256, 12, 1024),
    "block_main_b4_800": block_main(512, 8, 2048),
    "block_main_b4_1.2b": block_main(512, 12, 2048),
    "vanilla_31": vanilla(6, 256, 8, 4096),
    "vanilla_70": vanilla(6, 512, 8, 2048),
    "vanilla_160": vanilla(12, 768, 12, 3072),
    "vanilla_410": vanilla(24, 1024, 16, 4096),
    "tiny_block": dict(kind="block", V=96, T=32, L=4, R=2, D_e=12,
                       block=dict(layers=2, hidden=48, heads=3, inter=192),
                       token=dict(layers=2, hidden=32, heads=2, inter=128)),
    "tiny_vanilla": vanilla(2, 32, 2, 96, V=96, T=16),
}


def build(name, max_positions, attn, device):
    """Random-weight model (HF's init; fp32) on `device`, built by make_fixtures' code."""
    c = CONFIGS[name]
    with torch.device(device):
        if c["kind"] == "block":
            model = mf.BlockTransformer(dict(c, max_positions=max_positions, attn=attn))
        else:
            cfg = mf.neox_config(c["hidden"], c["layers"], c["heads"], c["inter"], vocab=c["V"],
                                 max_positions=max_positions, attn=attn)
            model = GPTNeoXForCausalLM(cfg)
            mf.check_rotary(model.gpt_neox, cfg)
            model.generation_config.eos_token_id = None   # SPEC 5.5: no EOS stop
            model.generation_config.pad_token_id = 0
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# training forward
# ----------------------------------------------------------------------------------------------------------

def block_train_logits(model, ids):
    """ids [B, N, L] (all real tokens) -> logits [B*(N-1), L, V] for target blocks 1..N-1, targets [B*(N-1), L].
    The computation of make_fixtures.BlockTransformer.forward (SPEC 1.6) without masks (no padding in the benchmark)
    and with the LM head applied to the L predicting positions only."""
    B, N, L = ids.shape
    R, H_t = model.R, model.token_decoder.H_t
    e = model.embedder.embeddings(ids).reshape(B, N, L * model.D_e)
    g = model.block_decoder.gpt_neox(inputs_embeds=e).last_hidden_state
    M = B * (N - 1)
    exp = model.token_decoder.expansion_layer
    z = F.linear(g[:, :-1].reshape(M, -1), exp.weight.squeeze(-1), exp.bias).reshape(M, R, H_t)
    y = ids[:, 1:].reshape(M, L)
    lm = model.token_decoder.lm
    x = torch.cat([z, lm.gpt_neox.embed_in(y[:, :L - 1])], dim=1)              # [M, R+L-1, H_t]
    pos = torch.arange(R + L - 1, device=ids.device)[None].expand(M, -1)
    h = lm.gpt_neox(inputs_embeds=x, position_ids=pos).last_hidden_state[:, R - 1:]
    return lm.lm_head(h), y


def train_loss_fn(model, kind):
    if kind == "block":
        def loss(ids):
            logits, y = block_train_logits(model, ids)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    else:
        def loss(ids):
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss


# ----------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------

def pad_prompt_to_blocks(prompt, L):
    """SPEC 5.1 step 1: left-pad with id 0 to a multiple of L.  The block mask (any over the slots) stays all ones and
    the embedder ignores the slot mask, so no masks are needed afterwards."""
    pad = (-prompt.shape[1]) % L
    return torch.cat([prompt.new_zeros(prompt.shape[0], pad), prompt], dim=1)


def token_decoder_block(model, g, k):
    """Greedy local generation of k tokens from block-decoder outputs g [B, D_b], with a new KV cache."""
    R, H_t = model.R, model.token_decoder.H_t
    exp = model.token_decoder.expansion_layer
    lm = model.token_decoder.lm
    stack = lm.gpt_neox
    z = F.linear(g, exp.weight.squeeze(-1), exp.bias).reshape(g.shape[0], R, H_t)
    out = stack(inputs_embeds=z, position_ids=torch.arange(R, device=g.device)[None], use_cache=True)
    cache = out.past_key_values
    tok = lm.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
    toks = [tok]
    for j in range(1, k):   # the input token y_{j-1} sits at position R + j - 1
        pos = torch.full((1, 1), R + j - 1, device=g.device, dtype=torch.long)
        out = stack(inputs_embeds=stack.embed_in(tok)[:, None], position_ids=pos, past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        tok = lm.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        toks.append(tok)
    return torch.stack(toks, dim=1)


@torch.inference_mode()
def block_generate(model, prompt, decode):
    """SPEC 5.1 with a block-decoder KV cache (HF DynamicCache); returns the decode new tokens [B, decode]."""
    B = prompt.shape[0]
    L = model.L
    ids = pad_prompt_to_blocks(prompt, L).reshape(B, -1, L)
    e = model.embedder.embeddings(ids).reshape(B, ids.shape[1], -1)          # all prompt blocks: the prefill
    block_stack = model.block_decoder.gpt_neox
    cache, pieces, done = None, [], 0
    while True:
        out = block_stack(inputs_embeds=e, past_key_values=cache, use_cache=True)   # positions continue the cache
        cache = out.past_key_values
        k = min(L, decode - done)
        block = token_decoder_block(model, out.last_hidden_state[:, -1], k)
        pieces.append(block)
        done += k
        if done >= decode:          # the last block is never fed back
            return torch.cat(pieces, dim=1)
        e = model.embedder.embeddings(block).reshape(B, 1, -1)


@torch.inference_mode()
def block_generate_nocache(model, prompt, decode):
    """Reference: every new token from a full forward (make_fixtures.BlockTransformer.forward) over all blocks so
    far, the current block's unknown slots filled with 0 (causally invisible to the slot being predicted)."""
    B, L = prompt.shape[0], model.L
    seq = pad_prompt_to_blocks(prompt, L)
    n_prompt = seq.shape[1]
    for _ in range(decode):
        j = (seq.shape[1] - n_prompt) % L
        ids = torch.cat([seq, seq.new_zeros(B, L - j)], dim=1).reshape(B, -1, L)
        ones = torch.ones_like(ids)
        logits = model(ids, ones, ones[:, :, 0])                   # [B, N-1, L, V]
        seq = torch.cat([seq, logits[:, -1, j].argmax(-1)[:, None]], dim=1)
    return seq[:, n_prompt:]


@torch.inference_mode()
def vanilla_generate(model, prompt, decode):
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=decode, min_new_tokens=decode, eos_token_id=None, pad_token_id=0,
                         use_cache=True)
    return out[:, prompt.shape[1]:]


@torch.inference_mode()
def vanilla_generate_nocache(model, prompt, decode):
    seq = prompt
    for _ in range(decode):
        logits = model(input_ids=seq, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1)[:, None]], dim=1)
    return seq[:, prompt.shape[1]:]


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------

class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        """Milliseconds of one call of fn: CUDA events on the GPU, perf_counter + synchronize otherwise."""
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def peak_memory(device):
    if device.type != "cuda":
        return "n/a (cpu)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def row(impl, config, mode, shape, ms, tokens_per_s, mem):
    print("| impl | config | mode | shape | ms | tokens/s | peak GPU memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {impl} | {config} | {mode} | {shape} | {ms:.2f} | {tokens_per_s:.0f} | {mem} |", flush=True)


def run_train(args, device):
    c = CONFIGS[args.config]
    T, V = c["T"], c["V"]
    B = args.micro_batch
    model = build(args.config, T, args.attn, device).train()        # fp32 master weights
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=device.type == "cuda")
    loss_fn = train_loss_fn(model, c["kind"])
    if args.compile:
        loss_fn = torch.compile(loss_fn)
    gen = torch.Generator(device="cpu").manual_seed(2)
    shape = (B, T // c["L"], c["L"]) if c["kind"] == "block" else (B, T)
    batches = [torch.randint(2, V, shape, generator=gen).to(device) for _ in range(4)]   # rotated inputs
    amp = args.dtype == "bf16"
    losses = []

    def step(i):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = Timer(device)
    for i in range(args.warmup):
        step(i)
    times = sorted(timer(lambda i=i: step(i)) for i in range(args.steps))
    ms = statistics.median(times)
    first, last = float(losses[0]), float(losses[-1])
    print(f"# {args.config} train: loss {first:.4f} -> {last:.4f} over {len(losses)} steps; step ms min "
          f"{times[0]:.2f} median {ms:.2f} max {times[-1]:.2f}", file=sys.stderr)
    assert torch.isfinite(torch.tensor(last)), "non-finite loss"
    impl = "pytorch-compile" if args.compile else "pytorch"
    row(impl, args.config, "train", f"{B} x {T}", ms, B * T / (ms / 1e3), peak_memory(device))


def run_generate(args, device):
    if args.compile:
        sys.exit("pytorch_runner: --compile is for --mode train only (the generation baseline is eager, issue 8)")
    c = CONFIGS[args.config]
    P, D, B = args.prefill, args.decode, args.batch
    max_positions = max(c["T"], P + D + 8)
    model = build(args.config, max_positions, args.attn, device)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    gen = torch.Generator(device="cpu").manual_seed(2)
    prompt = torch.randint(0, c["V"], (B, P), generator=gen).to(device)
    fn = block_generate if c["kind"] == "block" else vanilla_generate
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = Timer(device)
    out = fn(model, prompt, D)   # warm-up
    assert out.shape == (B, D), out.shape
    times = [timer(lambda: fn(model, prompt, D)) for _ in range(args.runs)]
    ms = statistics.mean(times)
    print(f"# {args.config} generate P{P} D{D} B{B}: ms per generation " + " ".join(f"{t:.1f}" for t in times),
          file=sys.stderr)
    row("pytorch", args.config, "generate", f"P{P} D{D} B{B}", ms, B * D / (ms / 1e3), peak_memory(device))


# ----------------------------------------------------------------------------------------------------------
# --check
# ----------------------------------------------------------------------------------------------------------

def fixture_init(model, seed):
    """make_fixtures' non-tiny init (logits O(1)), so greedy choices are not near-ties."""
    gen = torch.Generator().manual_seed(seed)
    named = [(mf.orig_key(n), p) for n, p in model.named_parameters()]
    mf.init_params(named, gen)


def min_margin(logits):
    top = logits.float().topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def run_check(args, device):
    if args.dtype != "fp32":
        print("# --check compares exact greedy tokens; it runs in fp32 whatever --dtype says", file=sys.stderr)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False   # exact fp32 comparisons (on the H200 the checks saw 3e-4 with it)
    torch.backends.cudnn.allow_tf32 = False
    failures = 0

    def report(name, ok, detail):
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")

    # 1. the benchmark's training forward = make_fixtures' forward
    for attn in ("eager", "sdpa"):
        model = build("tiny_block", 64, attn, device)
        fixture_init(model, 1)
        c = CONFIGS["tiny_block"]
        ids = torch.randint(2, c["V"], (3, c["T"] // c["L"], c["L"]), generator=torch.Generator().manual_seed(3))
        ids = ids.to(device)
        with torch.no_grad():
            got, _ = block_train_logits(model, ids)
            ones = torch.ones_like(ids)
            want = model(ids, ones, ones[:, :, 0]).reshape(got.shape)
        err = float((got - want).abs().max() / want.abs().max())
        report(f"tiny_block train forward ({attn}) vs make_fixtures forward", err < 1e-5, f"max rel err {err:.2e}")

    # 2. cached generation loops vs no-cache loops, several prompt lengths (padding) and decode lengths
    cases = [(1, 7, 3), (5, 11, 3), (8, 9, 2), (13, 16, 4)]   # (prefill, decode, batch)
    for attn in ("sdpa", "eager"):
        for name, fn, ref in (("tiny_block", block_generate, block_generate_nocache),
                              ("tiny_vanilla", vanilla_generate, vanilla_generate_nocache)):
            model = build(name, 64, attn, device)
            fixture_init(model, 7)
            V = CONFIGS[name]["V"]
            for P, D, B in cases:
                prompt = torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(P * 100 + D)).to(device)
                got, want = fn(model, prompt, D), ref(model, prompt, D)
                same = got.shape == want.shape and bool((got == want).all())
                detail = f"P{P} D{D} B{B}: {'identical' if same else 'DIFFER'} tokens"
                if not same:
                    detail += f"\n  cached   {got.tolist()}\n  no-cache {want.tolist()}"
                report(f"{name} ({attn}) cached vs no-cache greedy", same, detail)
            # greedy margins of the reference at the first case, to show the comparison is not fragile
            if name == "tiny_vanilla":
                with torch.no_grad():
                    lg = model(input_ids=torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(5))
                               .to(device)).logits
                print(f"     tiny_vanilla ({attn}) smallest top-1/top-2 logit margin over 64 positions: "
                      f"{min_margin(lg):.3g}")
    # 3. a generation that does use the cache over many blocks: 30 blocks after a 3-block prompt
    model = build("tiny_block", 256, "sdpa", device)
    fixture_init(model, 11)
    prompt = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(9)).to(device)
    same = bool((block_generate(model, prompt, 120) == block_generate_nocache(model, prompt, 120)).all())
    report("tiny_block (sdpa) cached vs no-cache greedy", same, "P12 D120 B2 (33 blocks)")
    print("check: " + ("all passed" if failures == 0 else f"{failures} FAILED"))
    return failures == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_block", choices=sorted(CONFIGS))
    ap.add_argument("--mode", choices=("train", "generate"))
    ap.add_argument("--compile", action="store_true", help="torch.compile the training loss function (train)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5, help="timed generations after 1 warm-up (mean)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--attn", default="sdpa", help="HF attention implementation (sdpa, eager)")
    ap.add_argument("--check", action="store_true", help="correctness checks on the tiny configs, then exit")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:   # "cuda" means the current GPU; set_device and the memory counters want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}", file=sys.stderr)
    if args.check:
        sys.exit(0 if run_check(args, device) else 1)
    if args.mode is None:
        ap.error("--mode train|generate (or --check)")
    (run_train if args.mode == "train" else run_generate)(args, device)


if __name__ == "__main__":
    main()
