"""Benchmark: how fast the hand-written transformer trains and samples on this machine.

    python -m minirlhf.bench [--steps 20] [--json out.json]

Prints, for the demo-sized model (vocab 46, n_ctx 64, 2 layers, 4 heads, n_embd 64, batch 32 x 64 tokens):
this machine's own float32 and float64 matmul throughput (a 1024 x 1024 product, best of several), then in
each dtype the forward+backward time per training step, tokens/s, the achieved GFLOP/s counted from the
model's matmuls, and that as a fraction of the machine's matmul GFLOP/s; then KV-cache generation tokens/s.

FLOPs of one step: every matmul of the forward counted as 2 m n k, the backward as twice the forward
(one product for the input's gradient, one for the weight's), so a step is 3x the forward. Element-wise
work (LayerNorm, GELU, softmax) is not counted: the figure is comparable to a matmul peak.

Timings are medians over --steps steps after warm-up; a 2-core machine's speed drifts by 30-50% within a
minute (PERFORMANCE_NOTES.md), so compare figures from one run, not across runs.
"""
import argparse
import json
import platform
import time

import numpy as np

from . import layers as L
from . import transformer as tf
from .tokenizer import BOS, VOCAB_SIZE

DEMO = tf.Config(vocab_size=VOCAB_SIZE, n_ctx=64, n_layer=2, n_head=4, n_embd=64)


def step_flops(cfg, B, T):
    """Matmul FLOPs of one forward+backward step (3x the forward's)."""
    N, C, H, D = B * T, cfg.n_embd, cfg.n_head, cfg.n_embd // cfg.n_head
    per_layer = 2 * N * C * 3 * C + 2 * (2 * B * H * T * T * D) + 2 * N * C * C + 2 * (2 * N * C * 4 * C)
    return 3 * (cfg.n_layer * per_layer + 2 * N * C * cfg.vocab_size)


def matmul_gflops(dtype, n=1024, repeats=10):
    """Best-of-repeats GFLOP/s of one n x n x n product on this machine."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def median_ms(fn, steps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def train_step_fn(params, cfg, tokens):
    mask = np.ones(tokens.shape, np.int64)

    def step():
        logits, cache = tf.forward(params, cfg, tokens[:, :-1])
        _, ce = L.cross_entropy_forward(logits, tokens[:, 1:], mask[:, 1:])
        return tf.backward(L.cross_entropy_backward(1.0, ce), cache)
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per figure (median reported)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per training step")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        ap.error("--steps and --batch must be >= 1")
    cfg, B, T = DEMO, args.batch, DEMO.n_ctx
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (B, T + 1))
    flops = step_flops(cfg, B, T)
    res = {"machine": platform.processor() or platform.machine(), "numpy": np.__version__,
           "model": vars(cfg), "batch": B, "tokens_per_step": B * T, "gflop_per_step": flops / 1e9}
    print(f"numpy {np.__version__} on {res['machine']}; model {vars(cfg)}, batch {B} x {T} tokens, "
          f"{flops / 1e9:.2f} GFLOP per step")
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        peak = matmul_gflops(dtype)
        params = tf.init_params(cfg, rng, dtype)
        ms = median_ms(train_step_fn(params, cfg, tokens), args.steps)
        achieved = flops / (ms / 1000) / 1e9
        res[name] = {"matmul_gflops": peak, "step_ms": ms, "tokens_per_s": B * T / (ms / 1000),
                     "gflops": achieved, "fraction_of_matmul_peak": achieved / peak}
        print(f"{name:8s} | matmul peak {peak:6.1f} GFLOP/s | fwd+bwd {ms:7.1f} ms/step | "
              f"{B * T / (ms / 1000):8.0f} tok/s | {achieved:5.1f} GFLOP/s = {achieved / peak:5.1%} of peak")
    params = tf.init_params(cfg, rng, np.float32)
    prompts = np.full((B, 8), BOS)
    prompts[:, 1:] = rng.integers(3, cfg.vocab_size, (B, 7))
    new = T - 8
    counted = []

    def sample():
        out = tf.generate(params, cfg, prompts, np.ones_like(prompts), new, np.random.default_rng(1))
        counted.append(out["mask"].sum())
    ms = median_ms(sample, max(3, args.steps // 4), warmup=1)
    tps = float(np.median(counted)) / (ms / 1000)
    res["generate"] = {"batch": B, "max_new_tokens": new, "ms": ms, "tokens_per_s": tps}
    print(f"generate | float32, batch {B}, up to {new} new tokens with the KV cache: {ms:.1f} ms, "
          f"{tps:.0f} sampled tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
