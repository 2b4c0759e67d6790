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
import time

import _common as C
import numpy as np

from minirlhf import pipeline as P
from minirlhf.annotator import sample_comparisons
from minirlhf.cli import non_negative_int, positive_int
from minirlhf.reward import evaluate, sums_checked
from minirlhf.transformer import sample_responses
from minirlhf.world import FAMILIES, sample_prompts

DEFAULTS = {"seeds": [0, 1, 2, 3, 4], "labels": [100, 300, 1000, 3000], "sft_steps": P.STEPS["default"]["sft_steps"]}
QUICK = {"seeds": [0], "labels": [8], "sft_steps": 20, "rm_steps": 2, "rankings": 16}


def share(ev):
    """Expected accuracy as a share of the ceiling, overall and per family."""
    return {"all": ev["expected_accuracy"] / ev["ceiling"],
            **{f: v["expected_accuracy"] / v["ceiling"] for f, v in ev["by_family"].items()}}


def main(argv=None):
    ap = C.parser(__doc__, "python demos/reward_benchmark.py", starts_from_a_run=False)
    ap.add_argument("--seeds", type=non_negative_int, nargs="+", help="demo seeds (default 0 1 2 3 4)")
    ap.add_argument("--labels", type=positive_int, nargs="+",
                    help="pairwise label counts for the labelling-cost curve (default 100 300 1000 3000)")
    ap.add_argument("--no-labelling-cost", action="store_true", help="skip the labelling-cost curve")
    ap.add_argument("--full", action="store_true", help="the demo's --full-reward-model recipe")
    ap.add_argument("--sft-steps", type=positive_int, help="SFT steps (default: the demo's)")
    ap.add_argument("--rm-steps", type=positive_int, help="reward-model steps (default: the demo's, or --full's)")
    ap.add_argument("--rankings", type=positive_int, help="ranked prompts (default: the demo's, or --full's)")
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    if args.quick and args.full:
        ap.error("--quick and --full do not go together")
    recipe = P.FULL_REWARD_MODEL if args.full else P.STEPS["default"]
    C.apply_preset(args, {"rm_steps": recipe["rm_steps"], "rankings": recipe["labels"]})
    t0 = time.perf_counter()
    quiet = lambda line: None  # noqa: E731
    print(f"{'seed':>4} {'accuracy':>9} {'expected':>9} {'ceiling':>8} {'of ceiling':>10} {'sums':>5} "
          f"{'rm seconds':>10}   expected / ceiling per family")
    results = {"seeds": [], "labelling_cost": []}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        train_prompts, val_prompts = P.split(rng)
        policy, _ = P.run_sft(train_prompts, val_prompts, args.sft_steps, rng, log=quiet)
        train_cmp, val_cmp = P.preference_data(policy, train_prompts, val_prompts, args.rankings, rng)
        t = time.perf_counter()
        reward_model, _ = P.run_reward_model(policy, train_prompts, train_cmp, val_cmp, args.rm_steps, rng, log=quiet,
                                             full=args.full)
        seconds = time.perf_counter() - t
        ev = evaluate(reward_model, val_cmp, P.ANNOTATOR)
        of, (sums, n_sums) = share(ev), sums_checked(reward_model, val_cmp)
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
    if not args.no_labelling_cost:
        policy, train_prompts, val_cmp, rng = first
        sampler = lambda texts, r: sample_responses(policy, texts, r)  # noqa: E731
        pool = sample_comparisons(sample_prompts(train_prompts, max(args.labels), rng), sampler, 2, P.ANNOTATOR, rng)
        print(f"\nlabelling cost (seed {args.seeds[0]}): pairwise labels, "
              f"{'the --full reward-model recipe' if args.full else 'the demo reward-model recipe'}")
        print(f"{'labels':>7} {'accuracy':>9} {'expected':>9} {'ceiling':>8} {'of ceiling':>10} {'seconds':>8}")
        for n in sorted(set(args.labels)):
            r = np.random.default_rng([args.seeds[0], n])
            t = time.perf_counter()
            reward_model, _ = P.run_reward_model(policy, train_prompts, pool[:n], val_cmp, args.rm_steps, r,
                                                 log=quiet, full=args.full)
            seconds = time.perf_counter() - t
            ev = evaluate(reward_model, val_cmp, P.ANNOTATOR)
            results["labelling_cost"].append({"labels": n, "accuracy": ev["accuracy"], "seconds": seconds,
                                              "expected_accuracy": ev["expected_accuracy"], "ceiling": ev["ceiling"],
                                              "of_ceiling": share(ev)})
            print(f"{n:7d} {ev['accuracy']:9.3f} {ev['expected_accuracy']:9.3f} {ev['ceiling']:8.3f} "
                  f"{ev['expected_accuracy'] / ev['ceiling']:10.1%} {seconds:8.1f}", flush=True)
    C.save_figure(args.plot, lambda plt: draw(plt, results))
    return C.finish(args, "reward_benchmark", results, t0)


def draw(plt, results):
    """Share of the ceiling per seed (left) and against the number of pairwise labels (right)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    seeds = results["seeds"]
    a.bar([str(r["seed"]) for r in seeds], [r["of_ceiling"]["all"] for r in seeds], color="C0")
    a.axhline(0.9, color="grey", linestyle=":", label="90% of the ceiling")
    a.set(xlabel="seed", ylabel="expected agreement / ceiling", ylim=(0.5, 1.0), title="reward model, held out")
    a.legend()
    cost = results["labelling_cost"]
    if cost:
        b.plot([r["labels"] for r in cost], [r["of_ceiling"]["all"] for r in cost], "o-")
        b.set(xscale="log", xlabel="pairwise labels", ylabel="expected agreement / ceiling",
              title="labelling cost")
    return fig


if __name__ == "__main__":
    C.main_guard(main)
