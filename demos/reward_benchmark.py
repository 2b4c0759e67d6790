"""Reward-model benchmark: the demo's reward model on several seeds, and the labelling-cost curve.

    python demos/reward_benchmark.py [--full] [--seeds 0 1 2 3 4] [--labels 100 300 1000 3000] [--json out.json]

Seeds. For each seed, the demo's stages 1-3 exactly as `python -m minirlhf.demo --seed S [--full-reward-model]`
runs them: prompt split, SFT, 750 prompts whose K = 8 SFT samples the annotator ranks (3000 with --full),
the reward model. Then the reward model's agreement with the annotator on held-out prompts: on the
annotator's sampled labels, in expectation over the annotator's randomness (reward.evaluate), and the
annotator's exact ceiling; and "sums", the fraction of held-out pairs of a right and a wrong answer to a sum
it orders right (reward.sums_checked). One seed is one demo, so the spread across seeds is what a user of
the demo should expect.

Labelling cost. On the first seed's SFT model: reward models trained with the demo's recipe on the first N
of one pool of pairwise labels (one prompt, two SFT samples, the annotator's choice: one human judgement
each), scored on that seed's held-out rankings.
"""
import argparse
import json
import time

import minirlhf  # noqa: F401  (first: one BLAS thread before NumPy loads)
import numpy as np

from minirlhf.annotator import sample_comparisons
from minirlhf.demo import (ANNOTATOR, FULL_REWARD_MODEL, MODEL, PRESETS, preference_data, run_reward_model,
                           run_sft)
from minirlhf.reward import evaluate, sums_checked
from minirlhf.sft import sample_responses
from minirlhf.world import FAMILIES, all_prompts, sample_prompts, split_prompts


def share(ev):
    """Expected accuracy as a share of the ceiling, overall and per family."""
    return {"all": ev["expected_accuracy"] / ev["ceiling"],
            **{f: v["expected_accuracy"] / v["ceiling"] for f, v in ev["by_family"].items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="demo seeds")
    ap.add_argument("--labels", type=int, nargs="*", default=[100, 300, 1000, 3000],
                    help="pairwise label counts for the labelling-cost curve (none: skip it)")
    ap.add_argument("--full", action="store_true", help="the demo's --full-reward-model recipe")
    ap.add_argument("--sft-steps", type=int, default=PRESETS["default"]["sft_steps"])
    ap.add_argument("--rm-steps", type=int, help="reward-model steps (default: the demo's, or --full's)")
    ap.add_argument("--rankings", type=int, help="ranked prompts (default: the demo's, or --full's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    defaults = FULL_REWARD_MODEL if args.full else PRESETS["default"]
    args.rm_steps = defaults["rm_steps"] if args.rm_steps is None else args.rm_steps
    args.rankings = defaults["labels"] if args.rankings is None else args.rankings
    if min(args.labels, default=1) < 1 or min(args.sft_steps, args.rm_steps, args.rankings) < 1:
        ap.error("--labels, --sft-steps, --rm-steps and --rankings must be positive")
    quiet = lambda line: None  # noqa: E731
    print(f"{'seed':>4} {'accuracy':>9} {'expected':>9} {'ceiling':>8} {'of ceiling':>10} {'sums':>5} "
          f"{'rm seconds':>10}   expected / ceiling per family")
    results = {"seeds": [], "labelling_cost": []}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        train_prompts, val_prompts = split_prompts(all_prompts(), 0.25, rng)
        policy, _ = run_sft(train_prompts, val_prompts, args.sft_steps, rng, log=quiet)
        train_cmp, val_cmp = preference_data(policy, train_prompts, val_prompts, args.rankings, rng)
        t = time.perf_counter()
        reward_model, _, _ = run_reward_model(policy, train_prompts, train_cmp, val_cmp, args.rm_steps, rng, log=quiet,
                                              full=args.full)
        seconds = time.perf_counter() - t
        ev = evaluate(reward_model, MODEL, val_cmp, ANNOTATOR)
        of, (sums, n_sums) = share(ev), sums_checked(reward_model, MODEL, val_cmp)
        results["seeds"].append({"seed": seed, "accuracy": ev["accuracy"], "expected_accuracy": ev["expected_accuracy"],
                                 "ceiling": ev["ceiling"], "of_ceiling": of, "sums_checked": sums,
                                 "sum_pairs": n_sums, "seconds": seconds,
                                 "by_family": ev["by_family"], "calibration": ev["calibration"]})
        per_family = "  ".join(f"{f} {of[f]:.2f}" for f in FAMILIES if f in of)
        print(f"{seed:4d} {ev['accuracy']:9.3f} {ev['expected_accuracy']:9.3f} {ev['ceiling']:8.3f} "
              f"{of['all']:10.1%} {sums if sums is not None else float('nan'):5.2f} {seconds:10.1f}   {per_family}",
              flush=True)
        if seed == args.seeds[0]:
            first = (policy, train_prompts, val_cmp, rng)
    shares = [r["of_ceiling"]["all"] for r in results["seeds"]]
    print(f"of ceiling over {len(shares)} seeds: mean {np.mean(shares):.1%}, min {min(shares):.1%}, "
          f"max {max(shares):.1%}; {sum(s >= 0.9 for s in shares)} of {len(shares)} at 90% or more")
    if args.labels:
        policy, train_prompts, val_cmp, rng = first
        sampler = lambda texts, r: sample_responses(policy, MODEL, texts, r)  # noqa: E731
        pool = sample_comparisons(sample_prompts(train_prompts, max(args.labels), rng), sampler, 2, ANNOTATOR, rng)
        recipe = "the --full reward-model recipe" if args.full else "the demo's reward-model recipe"
        print(f"\nlabelling cost (seed {args.seeds[0]}): pairwise labels, {recipe}")
        print(f"{'labels':>7} {'accuracy':>9} {'expected':>9} {'ceiling':>8} {'of ceiling':>10} {'seconds':>8}")
        for n in args.labels:
            r = np.random.default_rng([args.seeds[0], n])
            t = time.perf_counter()
            reward_model, _, _ = run_reward_model(policy, train_prompts, pool[:n], val_cmp, args.rm_steps, r, log=quiet,
                                                  full=args.full)
            seconds = time.perf_counter() - t
            ev = evaluate(reward_model, MODEL, val_cmp, ANNOTATOR)
            results["labelling_cost"].append({"labels": n, "accuracy": ev["accuracy"], "seconds": seconds,
                                              "expected_accuracy": ev["expected_accuracy"], "ceiling": ev["ceiling"],
                                              "of_ceiling": share(ev)})
            print(f"{n:7d} {ev['accuracy']:9.3f} {ev['expected_accuracy']:9.3f} {ev['ceiling']:8.3f} "
                  f"{ev['expected_accuracy'] / ev['ceiling']:10.1%} {seconds:8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
