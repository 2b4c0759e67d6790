"""Labelling cost: "high labelling cost". How much PPO improves the gold score, against the number of
preference labels the reward model learnt from.

    python demos/labelling_cost.py [--run runs/demo] [--labels 10 25 50 150 500 1500] [--seeds 3]
                                   [--json labelling_cost.json] [--plot labelling_cost.png] [--quick]

The unit. One label is one ranked prompt: the annotator orders the demo's K (8) SFT samples of one prompt
(InstructGPT's unit of annotator work; the README's table was made when the demo ranked 4); as in the demo,
about half the labelled prompts are arithmetic (the reward model's hardest family). A ranking holds
C(K, 2) pairwise comparisons (28 for K = 8), fewer when a response never emitted EOS (the reward model skips
those); the table counts those pairs too.

Method. Per seed, one pool of ranked prompts from the SFT model and the demo's annotator, and budgets
taken as its first n rankings, so each budget holds the smaller ones. Per budget: a fresh reward model from
the SFT trunk (the demo's stage 3, the same number of steps for every budget, so budgets differ in data,
not in compute), its accuracy against the annotator's labels on the same held-out rankings, then PPO with
the demo's settings against it. Each final policy and the SFT model answer the same unseen prompts; the
gold gain is the policy's mean gold minus the SFT model's. Repeated with --seeds seeds (different pools,
reward-model batches and PPO rollouts).

Reading the output. One row per budget: pairs used, reward-model accuracy and the annotator's ceiling
(the best any model of these labels can do), the proxy and gold scores of the PPO policy and the gold gain,
means over seeds with the per-seed gains. The claim is that quality costs labels: the gain should grow
with the budget. Where a reward model of few labels misleads PPO, the proxy rises while the gold gain
stays small or negative.
"""
import time

import _common as C
import numpy as np

from minirlhf import pipeline as P
from minirlhf.annotator import scored_pairs
from minirlhf.cli import positive_int
from minirlhf.reward import evaluate

K = P.K
DEFAULTS = {"labels": [10, 25, 50, 150, 500, 1500], "seeds": 3, **C.PIPELINE_DEFAULTS}
QUICK = {"labels": [8, 16], "seeds": 1, "val_labels": 8, "rm_steps": 2, "ppo_updates": 2, "batch_size": 8,
         "eval_prompts": 16}


def main(argv=None):
    ap = C.parser(__doc__, "python demos/labelling_cost.py")
    ap.add_argument("--labels", type=positive_int, nargs="+",
                    help=f"budgets: ranked prompts (K = {K} responses each; default {DEFAULTS['labels']})")
    ap.add_argument("--seeds", type=positive_int, help="repetitions with different pools and PPO runs (default 3)")
    C.add_pipeline_args(ap)
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    args.labels = sorted(set(args.labels))
    t0 = time.perf_counter()
    start = C.starting_point(args)
    sft, train_prompts = start["sft"], start["train_prompts"]
    prompts = C.eval_prompts(start, args.eval_prompts, args.seed)
    eval_seed = [args.seed, 4]  # every policy answers with the same random stream
    sft_eval = C.evaluate_policy(sft, sft, None, prompts, np.random.default_rng(eval_seed))
    sft_gold = sft_eval["gold"]

    runs = {n: [] for n in args.labels}
    for s in range(args.seeds):
        rng = np.random.default_rng([args.seed, s])
        pool = P.collect_preferences(sft, train_prompts, max(args.labels), rng, family_weights=P.LABEL_FAMILY_WEIGHTS)
        val_cmp = P.collect_preferences(sft, start["val_prompts"], args.val_labels, rng)
        for n in args.labels:
            print(f"\n== seed {s}: {n} ranked prompts " + "=" * 50, flush=True)
            rng_n = np.random.default_rng([args.seed, s, n])
            rm, _ = P.run_reward_model(sft, train_prompts, pool[:n], val_cmp, args.rm_steps, rng_n)
            ev_rm = evaluate(rm, val_cmp, P.ANNOTATOR)
            policy, _ = C.train_policy(start, rm, rng_n, args.ppo_updates, args.lr, args.kl_coef, args.batch_size)
            ev = C.evaluate_policy(policy, sft, rm, prompts, np.random.default_rng(eval_seed))
            runs[n].append({"seed": s, "pairs": sum(len(scored_pairs(c)) for c in pool[:n]),
                            "rm_accuracy": ev_rm["accuracy"], "ceiling": ev_rm["ceiling"],
                            "proxy": ev["proxy"], "gold": ev["gold"], "gold_se": ev["gold_se"], "kl": ev["kl"]})

    rows = []
    for n, rs in runs.items():
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("pairs", "rm_accuracy", "ceiling", "proxy",
                                                                 "gold", "kl")}
        gains = [r["gold"] - sft_gold for r in rs]
        rows.append({"labels": n, **mean, "gold_gain": float(np.mean(gains)),
                     "gold_gain_each": gains, "runs": rs})
    print(f"\nSFT gold on {len(prompts)} unseen prompts: {sft_gold:+.3f} (+- {sft_eval['gold_se']:.3f}); "
          f"one label = one prompt's ranking of K = {K} responses; means over {args.seeds} seed(s)")
    print(C.table([("labels", 6, "d"), ("pairs", 7, ".0f"), ("RM acc", 6, ".3f"), ("ceiling", 7, ".3f"),
                   ("proxy", 7, "+.3f"), ("gold", 7, "+.3f"), ("gain", 7, "+.3f"), ("KL", 6, ".2f"),
                   ("gain per seed", 24, "")],
                  [(r["labels"], r["pairs"], r["rm_accuracy"], r["ceiling"], r["proxy"], r["gold"], r["gold_gain"],
                    r["kl"], " ".join(f"{g:+.2f}" for g in r["gold_gain_each"])) for r in rows]))

    C.save_figure(args.plot, lambda plt: draw(plt, rows))
    return C.finish(args, "labelling_cost", {"sft_gold": sft_gold, "sft_gold_se": sft_eval["gold_se"],
                                             "budgets": rows, "eval_prompts": len(prompts)}, t0)


def draw(plt, rows):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["labels"] for r in rows]
    for r in rows:
        a.plot([r["labels"]] * len(r["gold_gain_each"]), r["gold_gain_each"], "o", color="C0", alpha=0.4)
    a.plot(n, [r["gold_gain"] for r in rows], "-", color="C0", label="mean over seeds")
    a.axhline(0, color="grey", linewidth=0.8)
    a.set(xscale="log", xlabel=f"labels (ranked prompts, K = {K})", ylabel="gold gain over SFT",
          title="what PPO gains, by labelling budget")
    a.legend()
    b.plot(n, [r["rm_accuracy"] for r in rows], "o-", label="reward model")
    b.plot(n, [r["ceiling"] for r in rows], "--", label="annotator ceiling")
    b.set(xscale="log", xlabel=f"labels (ranked prompts, K = {K})", ylabel="pairwise accuracy (held out)",
          title="reward-model accuracy")
    b.legend()
    return fig


if __name__ == "__main__":
    C.main_guard(main)
