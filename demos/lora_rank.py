"""LoRA rank: PPO through a low-rank adapter against full fine-tuning, from one SFT model.

    python demos/lora_rank.py [--run runs/demo] [--ranks 1 2 4 8 16] [--grid-rank 8]
                              [--lr-multipliers 3 10 30] [--lr 2e-4] [--alpha 8] [--ppo-updates 40]
                              [--json lora_rank.json] [--plot lora_rank.png] [--quick]

Method. PPO (pipeline.run_ppo with pipeline.ppo_config, a fixed kl_coef) from the demo run's SFT model
against its reward model, the same number of updates for every arm and the same seed:
  full   a copy of every parameter trains, at --lr (the demo's PPO learning rate); the reference is the SFT
         model's own arrays.
  LoRA   minirlhf.lora on all four linear layers of each block, alpha fixed (s = alpha / r), at ranks --ranks;
         the reference is the base itself, policy.params, never copied.
Practice ("LoRA Without Regret", Schulman and Thinking Machines 2025) says LoRA wants about 10x the full
fine-tuning learning rate. This script measures it instead of assuming it: at --grid-rank, PPO at each
multiple of --lr in --lr-multipliers, and the multiple whose training rollouts earned the most gold over
the last third of the updates (training prompts, so the unseen ones stay unseen) is the one every rank runs
at. (With s = alpha / r one learning rate can serve every rank: Adam's first steps move each entry of B
by about lr, and the r terms of s (x A) B then move the layer's output by about alpha lr |x A| whatever r
is; "LoRA Without Regret" finds the best learning rate nearly independent of the rank.)

Measured per arm: gold and the exact KL to the SFT model on unseen prompts (one sample each,
_common.evaluate_policy); the trainable-parameter count; the size on disk of what the arm must store
(the adapter file of lora.save_adapter, or the whole model's checkpoint); the PPO stage's wall time; and
its peak memory, the tracemalloc peak of NumPy's allocations (which tracemalloc tracks), measured in a
separate run of the first update alone so that tracing does not slow the timed run (every update
allocates the same arrays, bar the response lengths). Last, the drift of merging and unmerging one
adapted layer (h0.mlp.w_fc, with the largest rank's trained adapter) over --drift-cycles cycles, W <-
unmerge(merge(W)): max |W - W0| after 1, 10, 100 and all the cycles, in float16, float32 and float64, for
the same adapter every cycle and for one that changes a little between cycles (as when training goes on
between merges for generation; then each cycle's rounding is new and the errors add up).

Reading the output. Table 1: the learning-rate grid; the chosen multiple is marked. Table 2: one row per
arm. LoRA "works" at a rank where its gold and KL match full fine-tuning's with a fraction of the trainable
parameters. At this model's size the peak memory is mostly activations (rollouts and minibatch passes),
which LoRA does not shrink (two updates of a demo-sized model peaked near 35 MB either way); what it saves
is the policy's copy of the base, the gradients and the optimiser's two moments of every base parameter
(0.4 MB each here, the bulk of memory for a large model). Table 3: the drift. The default run is eight
PPO runs of 40 updates; at about 1 s an update on a two-core machine, an estimated 6-7 minutes.
"""
import os
import tempfile
import time
import tracemalloc

import _common as C
import numpy as np

from minirlhf import lora, pipeline as P
from minirlhf.checkpoint import save_checkpoint
from minirlhf.cli import non_negative_float, positive_float, positive_int
from minirlhf.transformer import copy_policy, trainable

DEFAULTS = {"ranks": [1, 2, 4, 8, 16], "grid_rank": 8, "lr_multipliers": [3.0, 10.0, 30.0], "lr": P.PPO_LR,
            "alpha": 8.0, "ppo_updates": 40, "kl_coef": 0.15, "batch_size": P.PPO_BATCH, "eval_prompts": 400,
            "drift_cycles": 1000, "drift_dtypes": ["float16", "float32", "float64"]}
QUICK = {"ranks": [1, 2], "grid_rank": 1, "lr_multipliers": [3.0, 10.0], "ppo_updates": 1, "batch_size": 4,
         "eval_prompts": 8, "drift_dtypes": ["float32", "float64"]}
DRIFT_LAYER = "h0.mlp.w_fc"


def make_policy(start, rank, alpha, seed):
    """A fresh copy of the SFT policy (rank None: full fine-tuning) or the SFT policy with a new adapter."""
    if rank is None:
        return copy_policy(start["sft"])
    return lora.lora_policy(start["sft"], lora.LoRAConfig(rank, alpha), np.random.default_rng([seed, 3, rank]))


def run_arm(start, args, rank, lr, updates, trace=False):
    """PPO of one arm from the SFT model: (policy, history, seconds, tracemalloc peak in bytes or None)."""
    if trace:
        tracemalloc.start()
    t = time.perf_counter()
    policy = make_policy(start, rank, args.alpha, args.seed)
    _, history = P.run_ppo(policy, start["sft"].params, start["reward_model"], start["train_prompts"],
                           P.ppo_config(updates, P.fixed_kl(args.kl_coef), lr=lr, batch_size=args.batch_size),
                           np.random.default_rng(args.seed), log=(lambda s: None) if trace else print)
    seconds = time.perf_counter() - t
    peak = None
    if trace:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return policy, history, seconds, peak


def file_bytes(policy):
    """Bytes on disk of what the arm must keep: its adapter file, or the whole model's checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "arm.npz")
        if policy.adapter is None:
            save_checkpoint(path, policy.params, policy.model_cfg)
        else:
            lora.save_adapter(path, policy.adapter)
        return os.path.getsize(path)


def late_gold(history):
    """Mean gold of the training rollouts over the last third of the updates (at least one)."""
    return float(np.mean([h["gold/score"] for h in history[-max(1, len(history) // 3):]]))


def drift(W0, A, B, scale, cycles, dtypes, rng):
    """max |W - W0| after merge-unmerge cycles W <- unmerge(merge(W)), per dtype, for the same adapter every
    cycle ("fixed") and for one that changes between cycles ("changing": B scaled by 1 + 0.01 z, z ~ N(0, 1)
    drawn afresh each cycle, as when training goes on between merges for generation)."""
    z = [1.0 + 0.01 * rng.standard_normal(B.shape) for _ in range(cycles)]  # the same draws for every dtype
    out = {}
    for name in dtypes:
        dtype = np.dtype(name)
        w0, a, b = (x.astype(dtype) for x in (W0, A, B))
        ulp = float(np.spacing(np.abs(w0).max()))
        row = {"cycles": cycles, "max_W0": float(np.abs(w0).max()), "ulp_of_max_W0": ulp,
               "max_update": float(np.abs((a @ b).astype(np.float64) * scale).max())}
        for kind in ("fixed", "changing"):
            W, after = w0.copy(), {}
            for k in range(cycles):
                bk = b if kind == "fixed" else (b * z[k]).astype(dtype)
                W = lora.unmerge(lora.merge(W, a, bk, scale), a, bk, scale)
                if k + 1 in (1, 10, 100, cycles):
                    after[str(k + 1)] = float(np.abs(W.astype(np.float64) - w0).max())
            row[kind] = {"after": after, "max_abs": after[str(cycles)], "ulps": after[str(cycles)] / ulp}
        out[name] = row
    return out


def draw(plt, arms, grid):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm in arms:
        a.errorbar(np.sqrt(max(arm["kl_exact"], 0)), arm["gold"], yerr=arm["gold_se"], fmt="s" if arm["rank"] is None
                   else "o", label=arm["name"])
    a.set(xlabel="sqrt(KL to SFT), nats^1/2 (exact, unseen prompts)", ylabel="gold", title="final policies")
    a.legend(fontsize=8)
    lora_arms = [arm for arm in arms if arm["rank"] is not None]
    b.errorbar([arm["rank"] for arm in lora_arms], [arm["gold"] for arm in lora_arms],
               yerr=[arm["gold_se"] for arm in lora_arms], fmt="o-", label="LoRA")
    full = next(arm for arm in arms if arm["rank"] is None)
    b.axhline(full["gold"], color="grey", linestyle="--", label="full fine-tuning")
    b.set(xscale="log", xlabel="LoRA rank", ylabel="gold (unseen prompts)",
          title=f"gold against rank (lr multiple {next(g['multiplier'] for g in grid if g['chosen'])}x)")
    b.legend(fontsize=8)
    return fig


def main(argv=None):
    ap = C.parser(__doc__, "python demos/lora_rank.py")
    ap.add_argument("--ranks", type=positive_int, nargs="+", help=f"LoRA ranks (default {DEFAULTS['ranks']})")
    ap.add_argument("--grid-rank", type=positive_int, help="the rank of the learning-rate grid (default 8)")
    ap.add_argument("--lr-multipliers", type=positive_float, nargs="+",
                    help=f"LoRA learning rates as multiples of --lr (default {DEFAULTS['lr_multipliers']})")
    ap.add_argument("--lr", type=positive_float, help=f"full fine-tuning's PPO learning rate (default {P.PPO_LR})")
    ap.add_argument("--alpha", type=positive_float, help="LoRA alpha, s = alpha / rank (default 8, PEFT's)")
    ap.add_argument("--ppo-updates", type=positive_int, help="PPO updates of every arm (default 40)")
    ap.add_argument("--kl-coef", type=non_negative_float, help="fixed KL coefficient (default 0.15, the demo's)")
    ap.add_argument("--batch-size", type=positive_int, help=f"rollouts per PPO update (default {P.PPO_BATCH})")
    ap.add_argument("--eval-prompts", type=positive_int, help="unseen prompts each policy answers (default 400)")
    ap.add_argument("--drift-cycles", type=positive_int, help="merge/unmerge cycles of the drift (default 1000)")
    ap.add_argument("--drift-dtypes", nargs="+", choices=["float16", "float32", "float64"],
                    help="dtypes of the drift (default all three; float16 has no BLAS: 1 s per 1000 cycles)")
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    if max(args.ranks + [args.grid_rank]) > P.DEMO_MODEL.n_embd:
        ap.error(f"a rank must be <= n_embd = {P.DEMO_MODEL.n_embd}, the narrowest side of every adapted layer")
    t0 = time.perf_counter()
    start = C.starting_point(args)
    sft, rm = start["sft"], start["reward_model"]
    prompts = C.eval_prompts(start, args.eval_prompts, args.seed)
    runs = {}  # (rank, lr) -> (policy, history, seconds)

    def run(rank, lr):
        if (rank, lr) not in runs:
            name = "full fine-tuning" if rank is None else f"LoRA rank {rank}"
            print(f"\n== PPO, {name}, lr {lr:g} ({args.ppo_updates} updates) " + "=" * 30, flush=True)
            runs[rank, lr] = run_arm(start, args, rank, lr, args.ppo_updates)[:3]
        return runs[rank, lr]

    def evaluate(policy):
        return C.evaluate_policy(policy, sft, rm, prompts, np.random.default_rng([args.seed, 2]))

    grid = []
    for m in args.lr_multipliers:
        policy, history, _ = run(args.grid_rank, m * args.lr)
        ev = evaluate(policy)
        grid.append({"multiplier": m, "lr": m * args.lr, "train_gold": late_gold(history), "gold": ev["gold"],
                     "gold_se": ev["gold_se"], "kl_exact": ev["kl_exact"]})
    best = max(grid, key=lambda g: g["train_gold"])
    for g in grid:
        g["chosen"] = g is best

    arms = []
    for rank in [None] + list(args.ranks):
        lr = args.lr if rank is None else best["lr"]
        policy, history, seconds = run(rank, lr)
        ev = evaluate(policy)
        peak = run_arm(start, args, rank, lr, 1, trace=True)[3]  # the first update again, traced
        n = sum(w.size for w in trainable(policy).values())
        arms.append({"name": "full" if rank is None else f"LoRA r={rank}", "method": "full" if rank is None
                     else "LoRA", "rank": rank, "lr": lr, "trainable": int(n), "file_bytes": file_bytes(policy),
                     "seconds": seconds, "peak_mb": peak / 2 ** 20, "train_gold": late_gold(history),
                     **{k: ev[k] for k in ("gold", "gold_se", "kl", "kl_exact", "proxy", "ended")}})
    full = arms[0]
    widest = max(args.ranks)
    adapter = runs[widest, best["lr"]][0].adapter
    drifts = drift(sft.params[DRIFT_LAYER], adapter.weights[f"{DRIFT_LAYER}.lora_A"],
                   adapter.weights[f"{DRIFT_LAYER}.lora_B"], adapter.config.scale, args.drift_cycles,
                   args.drift_dtypes, np.random.default_rng([args.seed, 4]))

    print(f"\n1. learning-rate grid at rank {args.grid_rank} (full fine-tuning's lr {args.lr:g}); chosen by the "
          f"training rollouts' gold over the last third of the updates")
    print(C.table([("lr multiple", 11, "g"), ("lr", 8, ".1e"), ("train gold", 10, "+.3f"), ("gold", 7, "+.3f"),
                   ("+-se", 5, ".3f"), ("KL exact", 8, ".2f"), ("", 6, "")],
                  [(g["multiplier"], g["lr"], g["train_gold"], g["gold"], g["gold_se"], g["kl_exact"],
                    "chosen" if g["chosen"] else "") for g in grid]))
    print(f"\n2. every arm on {len(prompts)} unseen prompts (one sample each), {args.ppo_updates} PPO updates each")
    print(C.table([("arm", 10, ""), ("lr", 8, ".1e"), ("trainable", 9, "d"), ("% full", 6, ".2f"),
                   ("file KB", 8, ".1f"), ("gold", 7, "+.3f"), ("+-se", 5, ".3f"), ("KL exact", 8, ".2f"),
                   ("PPO s", 6, ".1f"), ("peak MB", 7, ".1f")],
                  [(a["name"], a["lr"], a["trainable"], 100 * a["trainable"] / full["trainable"],
                    a["file_bytes"] / 1024, a["gold"], a["gold_se"], a["kl_exact"], a["seconds"], a["peak_mb"])
                   for a in arms]))
    print(f"\n3. drift of {args.drift_cycles} merge/unmerge cycles of {DRIFT_LAYER} (rank {widest}'s adapter): "
          f"max |W - W0|")
    print(C.table([("dtype", 7, ""), ("adapter", 8, ""), ("1 cycle", 9, ".2e"), ("10", 9, ".2e"), ("100", 9, ".2e"),
                   (str(args.drift_cycles), 9, ".2e"), ("ulps", 6, ".1f"), ("max |W0|", 8, ".3f"),
                   ("max |sAB|", 9, ".3f")],
                  [(name, kind, *[d[kind]["after"].get(str(k), np.nan) for k in (1, 10, 100, args.drift_cycles)],
                    d[kind]["ulps"], d["max_W0"], d["max_update"]) for name, d in drifts.items()
                   for kind in ("fixed", "changing")]))

    C.save_figure(args.plot, lambda plt: draw(plt, arms, grid))
    return C.finish(args, "lora_rank", {"lr_grid": grid, "chosen_multiplier": best["multiplier"], "arms": arms,
                                        "drift": drifts, "eval_prompts": len(prompts)}, t0)


if __name__ == "__main__":
    C.main_guard(main)
