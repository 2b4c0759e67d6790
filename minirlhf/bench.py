"""Benchmark: how fast the hand-written transformer trains and samples on this machine.

    python -m minirlhf.bench [--steps 20] [--json out.json]

Prints, for the demo-sized model (vocab 46, n_ctx 64, 2 layers, 4 heads, n_embd 64, batch 32 x 64 tokens):
this machine's own float32 and float64 matmul throughput (1024 x 1024 products, best of several), then in
each dtype the forward+backward time per training step, tokens/s, the achieved GFLOP/s counted from the
model's matmuls, and that as a fraction of the machine's matmul GFLOP/s; if PyTorch is installed (optional,
never a dependency), the same step in PyTorch eager, timed alternately with minirlhf's; then KV-cache
generation tokens/s.

FLOPs of one step: every matmul of the forward counted as 2 m n k, the backward as twice the forward
(one product for the input's gradient, one for the weight's), so a step is 3x the forward. Element-wise
work (LayerNorm, GELU, softmax) is not counted: the figure is comparable to a matmul peak.

The machine's matmul throughput is the better of one product and two products at once on two threads:
the step may use both cores, so it is measured against both. (With BLAS at one thread a call, one product
uses one core; two at once, two.)

Threads: importing minirlhf sets BLAS to one thread a call unless the environment chose a count, and the
transformer runs the two halves of a batch on two threads of its own (fast.py). The second output line says
what was in force.

Timings are medians over --steps steps after warm-up; a 2-core machine's speed drifts by 30-50% within a
minute (fast.py), so compare figures from one run, not across runs.
"""
import argparse
import os
import platform
import threading
import time

import numpy as np

from . import fast
from . import layers as L
from . import transformer as tf
from .cli import output_file, positive_int
from .pipeline import DEMO_MODEL
from .runs import write_json
from .tokenizer import BOS


def step_flops(model_cfg, B, T):
    """Matmul FLOPs of one forward+backward step (3x the forward's)."""
    N, C, H, D = B * T, model_cfg.n_embd, model_cfg.n_head, model_cfg.n_embd // model_cfg.n_head
    per_layer = 2 * N * C * 3 * C + 2 * (2 * B * H * T * T * D) + 2 * N * C * C + 2 * (2 * N * C * 4 * C)
    return 3 * (model_cfg.n_layer * per_layer + 2 * N * C * model_cfg.vocab_size)


def matmul_gflops(dtype, n=1024, repeats=10, threads=1):
    """Best-of-repeats GFLOP/s of n x n x n products on this machine, one per thread, all at once."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    best = np.inf
    for _ in range(repeats):
        workers = [threading.Thread(target=np.matmul, args=(a, a)) for _ in range(threads - 1)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        a @ a
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    return threads * 2 * n ** 3 / best / 1e9


def median_ms(fn, steps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def train_step_fn(params, model_cfg, tokens):
    mask = np.ones(tokens.shape, np.int64)

    def step():
        logits, cache = tf.forward(params, model_cfg, tokens[:, :-1])
        _, ce = L.cross_entropy_forward(logits, tokens[:, 1:], mask[:, 1:])
        return tf.backward(L.cross_entropy_backward(1.0, ce), cache)
    return step


def torch_step_fn(model_cfg, tokens, dtype):
    """The same step in PyTorch eager (the same shapes, tied head, tanh GELU, a causal softmax written out),
    or None if torch is not installed: a yardstick, never a dependency. Runs on torch's own threads."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]
    C, H, V = model_cfg.n_embd, model_cfg.n_head, model_cfg.vocab_size
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (0.02 * torch.randn(*shape, generator=g, dtype=tdt)).requires_grad_()

    def zeros(n):
        return torch.zeros(n, dtype=tdt, requires_grad=True)

    def ones(n):
        return torch.ones(n, dtype=tdt, requires_grad=True)
    P = {"wte": w(V, C), "wpe": w(model_cfg.n_ctx, C), "lnf_g": ones(C), "lnf_b": zeros(C)}
    for i in range(model_cfg.n_layer):
        P.update({f"{i}.{k}": v for k, v in dict(
            ln1_g=ones(C), ln1_b=zeros(C), qkv=w(C, 3 * C), qkv_b=zeros(3 * C), proj=w(C, C), proj_b=zeros(C),
            ln2_g=ones(C), ln2_b=zeros(C), fc=w(C, 4 * C), fc_b=zeros(4 * C), fc2=w(4 * C, C),
            fc2_b=zeros(C)).items()})
    x_ids, y_ids = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])
    B, T = x_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def step():
        x = P["wte"][x_ids] + P["wpe"][:T]
        for i in range(model_cfg.n_layer):
            p = {k.split(".", 1)[1]: v for k, v in P.items() if k.startswith(f"{i}.")}
            h = F.layer_norm(x, (C,), p["ln1_g"], p["ln1_b"], 1e-5)
            q, k, v = (h @ p["qkv"] + p["qkv_b"]).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            att = ((q @ k.transpose(-1, -2)) / (C // H) ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
            x = x + ((att @ v).transpose(1, 2).reshape(B, T, C) @ p["proj"] + p["proj_b"])
            h = F.layer_norm(x, (C,), p["ln2_g"], p["ln2_b"], 1e-5)
            x = x + F.gelu(h @ p["fc"] + p["fc_b"], approximate="tanh") @ p["fc2"] + p["fc2_b"]
        logits = F.layer_norm(x, (C,), P["lnf_g"], P["lnf_b"], 1e-5) @ P["wte"].T
        loss = F.cross_entropy(logits.reshape(B * T, V), y_ids.reshape(-1))
        return torch.autograd.grad(loss, list(P.values()))
    step.threads = torch.get_num_threads()
    step.version = torch.__version__
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minirlhf.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=positive_int, default=20, help="timed steps per figure (median reported)")
    ap.add_argument("--batch", type=positive_int, default=32, help="sequences per training step")
    ap.add_argument("--json", type=output_file, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    try:
        tf.check_batch_fits("--batch", DEMO_MODEL, args.batch, np.float64)
    except ValueError as e:
        ap.error(str(e))
    fast.keep_freed_memory()  # an entry point: keep freed memory for reuse (fast.py)
    model_cfg, B, T = DEMO_MODEL, args.batch, DEMO_MODEL.n_ctx
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, model_cfg.vocab_size, (B, T + 1))
    flops = step_flops(model_cfg, B, T)
    res = {"machine": platform.processor() or platform.machine(), "numpy": np.__version__,
           "model": vars(model_cfg), "batch": B, "tokens_per_step": B * T, "gflop_per_step": flops / 1e9,
           "cores": fast.n_cores(), "blas_threads": fast.BLAS_THREADS,
           "fast_path": fast.ENABLED,
           "batch_halves_on_threads": fast.ENABLED and fast.PARALLEL and len(fast.batch_parts(B, T)) > 1,
           "freed_memory_kept": fast.MEMORY_KEPT, "load_average": os.getloadavg()[0]}
    print(f"numpy {np.__version__} on {res['machine']}; model {vars(model_cfg)}, batch {B} x {T} tokens, "
          f"{flops / 1e9:.2f} GFLOP per step")
    print(f"threads | fast path {'on' if fast.ENABLED else 'off (MINIRLHF_PLAIN=1)'}, {res['cores']} cores, "
          f"BLAS threads per call {res['blas_threads']}, batch halves "
          f"on two threads: {'yes' if res['batch_halves_on_threads'] else 'no'}, freed memory kept: "
          f"{'yes' if res['freed_memory_kept'] else 'no'}, load average {res['load_average']:.2f}")
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        params = tf.init_params(model_cfg, rng, dtype)
        # the machine's throughput is measured before and after the step, and the better kept: a busy
        # moment lowers it, which would flatter the fraction
        peak1, peak2 = matmul_gflops(dtype), matmul_gflops(dtype, threads=2)
        ms = median_ms(train_step_fn(params, model_cfg, tokens), args.steps)
        peak1, peak2 = max(peak1, matmul_gflops(dtype)), max(peak2, matmul_gflops(dtype, threads=2))
        peak = max(peak1, peak2)
        achieved = flops / (ms / 1000) / 1e9
        res[name] = {"matmul_gflops": peak, "matmul_gflops_one_product": peak1,
                     "matmul_gflops_two_at_once": peak2, "step_ms": ms, "tokens_per_s": B * T / (ms / 1000),
                     "gflops": achieved, "fraction_of_matmul_peak": achieved / peak}
        print(f"{name:8s} | matmul peak {peak:6.1f} GFLOP/s (one product {peak1:.0f}, two at once "
              f"{peak2:.0f}) | fwd+bwd {ms:7.1f} ms/step | {B * T / (ms / 1000):8.0f} tok/s | "
              f"{achieved:5.1f} GFLOP/s = {achieved / peak:5.1%} of peak")
        torch_step = torch_step_fn(model_cfg, tokens, dtype)
        if torch_step is not None:
            # alternated with minirlhf's step, so that both see the same moment of a drifting machine
            ours, theirs = [], []
            numpy_step = train_step_fn(params, model_cfg, tokens)
            for _ in range(3):
                ours.append(median_ms(numpy_step, max(3, args.steps // 3)))
                theirs.append(median_ms(torch_step, max(3, args.steps // 3)))
            ours_ms, torch_ms = float(np.median(ours)), float(np.median(theirs))
            res[name]["torch_eager"] = {"version": torch_step.version, "threads": torch_step.threads,
                                        "step_ms": torch_ms, "minirlhf_step_ms": ours_ms,
                                        "ratio": ours_ms / torch_ms}
            print(f"{'':8s} | PyTorch {torch_step.version} eager, {torch_step.threads} threads: fwd+bwd "
                  f"{torch_ms:7.1f} ms/step; minirlhf alternated with it {ours_ms:.1f} ms: "
                  f"{ours_ms / torch_ms:.2f}x PyTorch's time")
    params = tf.init_params(model_cfg, rng, np.float32)
    prompts = np.full((B, 8), BOS)
    prompts[:, 1:] = rng.integers(3, model_cfg.vocab_size, (B, 7))
    new = T - 8
    counted = []

    def sample():
        out = tf.generate(params, model_cfg, prompts, np.ones_like(prompts), new, np.random.default_rng(1))
        counted.append(out["mask"].sum())
    ms = median_ms(sample, max(3, args.steps // 4), warmup=1)
    tps = float(np.median(counted)) / (ms / 1000)
    res["generate"] = {"batch": B, "max_new_tokens": new, "ms": ms, "tokens_per_s": tps}
    print(f"generate | float32, batch {B}, up to {new} new tokens with the KV cache: {ms:.1f} ms, "
          f"{tps:.0f} sampled tok/s")
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
