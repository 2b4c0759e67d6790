"""Reward-model benchmark: training time, accuracy against the annotator's exact ceiling, and the
labelling-cost curve (validation accuracy against the number of preference labels).

    python demos/reward_benchmark.py [--sft runs/demo/sft.npz] [--labels 100 300 1000 3000] [--json out.json]

Starts from an SFT checkpoint (the demo writes one; without --sft, a fresh SFT run of the demo's default
length is trained first). Labels are pairwise: each label is one prompt, two SFT samples and the annotator's
choice (K = 2), so "1000 labels" means 1000 human judgements. Every point trains a fresh reward model from
the same SFT trunk for the same number of steps and is scored on the same held-out prompts.
"""
import argparse
import json
import time

import minirlhf  # noqa: F401  (first: one BLAS thread before NumPy loads)
import numpy as np

from minirlhf.annotator import AnnotatorConfig, sample_comparisons
from minirlhf.checkpoint import load_checkpoint
from minirlhf.demo import MODEL
from minirlhf.reward import RewardConfig, evaluate, init_reward_params, train_reward_model
from minirlhf.sft import SFTConfig, sample_responses, train_sft
from minirlhf.transformer import init_params
from minirlhf.world import all_prompts, sample_prompts, sft_corpus, split_prompts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", help="SFT checkpoint to start from (default: train one)")
    ap.add_argument("--labels", type=int, nargs="+", default=[100, 300, 1000, 3000], help="label counts")
    ap.add_argument("--steps", type=int, default=300, help="reward-model steps per point")
    ap.add_argument("--val", type=int, default=400, help="held-out prompts (K = 4 responses each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if min(args.labels) < 1 or args.steps < 1 or args.val < 1:
        ap.error("--labels, --steps and --val must be positive")
    rng = np.random.default_rng(args.seed)
    train_prompts, val_prompts = split_prompts(all_prompts(), 0.25, rng)
    annotator = AnnotatorConfig(temperature=0.5)
    if args.sft:
        policy, cfg, _ = load_checkpoint(args.sft)
    else:
        cfg, policy = MODEL, init_params(MODEL, rng)
        train_sft(policy, cfg, sft_corpus(train_prompts, 6000, rng), sft_corpus(val_prompts, 300, rng),
                  SFTConfig(steps=600, lr=1e-2, warmup_steps=30, eval_every=200), rng)
    sampler = lambda texts, r: sample_responses(policy, cfg, texts, r)  # noqa: E731
    val = sample_comparisons(sample_prompts(val_prompts, args.val, rng), sampler, 4, annotator, rng)
    pool = sample_comparisons(sample_prompts(train_prompts, max(args.labels), rng), sampler, 2, annotator, rng)
    print(f"{'labels':>7} {'accuracy':>9} {'ceiling':>8} {'of ceiling':>10} {'seconds':>8}   per family")
    results = []
    for n in args.labels:
        r = np.random.default_rng(args.seed + n)
        params = init_reward_params(policy, cfg, r)
        t = time.perf_counter()
        train_reward_model(params, cfg, pool[:n], val, RewardConfig(steps=args.steps, batch_size=16, lr=1e-3,
                                                                     eval_every=args.steps), annotator, r,
                           log=lambda s: None)
        seconds = time.perf_counter() - t
        ev = evaluate(params, cfg, val, annotator)
        fam = {f: round(v["accuracy"], 3) for f, v in ev["by_family"].items()}
        results.append({"labels": n, "accuracy": ev["accuracy"], "ceiling": ev["ceiling"], "seconds": seconds,
                        "by_family": ev["by_family"], "calibration": ev["calibration"]})
        print(f"{n:7d} {ev['accuracy']:9.3f} {ev['ceiling']:8.3f} {ev['accuracy'] / ev['ceiling']:10.1%} "
              f"{seconds:8.1f}   {fam}", flush=True)
    print("calibration of the last model (predicted P(a > b) vs the annotator's, by bin):")
    for b in results[-1]["calibration"]:
        if b["count"]:
            print(f"  [{b['bin'][0]:.1f}, {b['bin'][1]:.1f}) n={b['count']:4d} predicted {b['predicted']:.3f} "
                  f"annotator {b['annotator']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
