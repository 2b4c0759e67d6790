"""Length bias: "human bias in feedback". An annotator who likes long answers teaches the reward model to
like them, and PPO then lengthens answers while the gold score, which penalises rambling, suffers.

    python demos/length_bias.py [--run runs/demo] [--length-bias 0.1 0.25 0.5] [--labels 750]
                                [--json length_bias.json] [--plot length_bias.png] [--quick]

Method. Arms from the same SFT model, the same prompts and the same seeds, differing only in the
annotator: the demo's (temperature 0.5, no bias) and the same annotator with a length bias b, whose utility
is gold + b * len(response) (annotator.py). Each arm ranks the demo's K SFT samples for each of --labels prompts
(the demo's stage 2, arithmetic three times as often; the same random stream in every arm, so the same
responses are ranked), trains a reward model on its rankings (the demo's stage 3) and runs PPO with the
demo's settings against it. Gold penalises length,
-0.1 per character beyond 24 (world.CONCISE_CHARS), so with b above 0.1 a biased annotator prefers a
longer answer even where gold prefers the shorter one; with b = 0.5 two characters outweigh a gold point.

Reading the output. Table 1, what each reward model learnt, on one SFT sample per unseen prompt: the
correlation of its score with the response length, next to its annotator's utility's (and, in the title,
the gold score's) on the same samples, pooled and within family (lengths and scores centred per prompt
family first, so "greetings are longer than sums" does not count). A reward model that learnt the bias
correlates with length like its annotator, not like gold. Its accuracy is against its own annotator's
labels on held-out rankings. Table 2, the policies after PPO on unseen prompts: mean length, the share of
answers over 24 characters, the mean gold length penalty (concise), the share of rambling greetings,
proxy, gold and KL. Table 3, each policy's gold by prompt family: where the gold went (a biased annotator
also prefers a long wrong sum, "the answer is 8.", to a short right one, "7."). The claim holds if
answers grow longer and gold falls as the bias grows.
"""
import time
from dataclasses import replace

import _common as C
import numpy as np

from minirlhf import pipeline as P
from minirlhf.annotator import utility
from minirlhf.cli import positive_float, positive_int
from minirlhf.reward import evaluate, score_samples
from minirlhf.transformer import sample_responses
from minirlhf.world import CONCISE_CHARS, FAMILIES, behaviour_metrics, gold, gold_breakdown

DEFAULTS = {"length_bias": [0.1, 0.25, 0.5], "labels": P.STEPS["default"]["labels"], **C.PIPELINE_DEFAULTS}
QUICK = {"length_bias": [0.25], "labels": 16, "val_labels": 8, "rm_steps": 2, "ppo_updates": 2, "batch_size": 8,
         "eval_prompts": 16}


def correlations(x, y, families):
    """Pearson correlation of x and y, pooled and within family (each family's mean removed first)."""
    x, y, families = np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(families)
    xc, yc = x.copy(), y.copy()
    for f in FAMILIES:
        m = families == f
        if m.any():
            xc[m] -= x[m].mean()
            yc[m] -= y[m].mean()

    def r(a, b):
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    return {"pooled": r(x, y), "within_family": r(xc, yc)}


def main(argv=None):
    ap = C.parser(__doc__, "python demos/length_bias.py")
    ap.add_argument("--length-bias", type=positive_float, nargs="+",
                    help="biased annotators' utility per character (an unbiased arm is always added; "
                         "default 0.1 0.25 0.5)")
    ap.add_argument("--labels", type=positive_int,
                    help=f"prompts ranked by each annotator (K = {P.K} each; default: the demo's)")
    C.add_pipeline_args(ap)
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    t0 = time.perf_counter()
    start = C.starting_point(args)
    sft = start["sft"]
    prompts = C.eval_prompts(start, args.eval_prompts, args.seed)
    biases = [0.0] + sorted(set(args.length_bias))

    # One SFT sample per unseen prompt: where the reward models' and the annotators' tastes are compared.
    samples = sample_responses(sft, [p.text for p in prompts], np.random.default_rng([args.seed, 2]))
    ended = [i for i, (_, e) in enumerate(samples) if e]
    ended_prompts, ended_samples = [prompts[i] for i in ended], [samples[i] for i in ended]
    lengths, families = [len(s) for s, _ in ended_samples], [p.family for p in ended_prompts]
    gold_corr = correlations([gold(p, s) for p, (s, _) in zip(ended_prompts, ended_samples)], lengths, families)

    arms, policies, reward_models = {}, {"SFT": sft}, {}
    for b in biases:
        annotator = replace(P.ANNOTATOR, length_bias=b)
        print(f"\n== annotator with length bias {b} " + "=" * 40, flush=True)
        rng = np.random.default_rng(args.seed)  # the same stream in every arm: the same responses get ranked
        train_cmp = P.collect_preferences(sft, start["train_prompts"], args.labels, rng, annotator,
                                          family_weights=P.LABEL_FAMILY_WEIGHTS)
        val_cmp = P.collect_preferences(sft, start["val_prompts"], args.val_labels, rng, annotator)
        rm, _ = P.run_reward_model(sft, start["train_prompts"], train_cmp, val_cmp, args.rm_steps, rng, annotator)
        ev_rm = evaluate(rm, val_cmp, annotator)
        reward_models[b] = rm
        policies[b], _ = C.train_policy(start, rm, np.random.default_rng([args.seed, 3]), args.ppo_updates,
                                        args.lr, args.kl_coef, args.batch_size)
        arms[b] = {"annotator_length_corr": correlations(
                       [utility(p, s, annotator) for p, (s, _) in zip(ended_prompts, ended_samples)], lengths,
                       families),
                   "rm_length_corr": correlations(score_samples(rm, [p.text for p in ended_prompts], ended_samples),
                                                  lengths, families),
                   "rm_accuracy": ev_rm["accuracy"], "ceiling": ev_rm["ceiling"]}

    reward_models["SFT"] = reward_models[0.0]  # the SFT model's proxy: the unbiased reward model's score
    print(f"\n1. correlation with response length on {len(ended)} SFT samples for unseen prompts "
          f"(gold: pooled {gold_corr['pooled']:+.3f}, within family {gold_corr['within_family']:+.3f})")
    print(C.table([("length bias", 11, ".2f"), ("annotator", 9, "+.3f"), ("within", 7, "+.3f"),
                   ("reward model", 12, "+.3f"), ("within", 7, "+.3f"), ("RM acc", 6, ".3f"), ("ceiling", 7, ".3f")],
                  [(b, a["annotator_length_corr"]["pooled"], a["annotator_length_corr"]["within_family"],
                    a["rm_length_corr"]["pooled"], a["rm_length_corr"]["within_family"], a["rm_accuracy"],
                    a["ceiling"]) for b, a in arms.items()]))

    results, lengths_each = {}, {}
    for name, policy in policies.items():
        ev = C.evaluate_policy(policy, sft, reward_models[name], prompts, np.random.default_rng([args.seed, 4]))
        behaviour = behaviour_metrics([p.text for p in prompts], [s for s, _ in ev["samples"]],
                                      [e for _, e in ev["samples"]])
        lengths_each[name] = ev["length_each"]
        results[name] = {
            "length": ev["length"], "over_concise": float(np.mean(ev["length_each"] > CONCISE_CHARS)),
            "concise": float(np.mean([gold_breakdown(p, s, e)["concise"]
                                      for p, (s, e) in zip(prompts, ev["samples"])])),
            "rambling": behaviour["greeting"]["rates"]["rambling"] if "greeting" in behaviour else 0.0,
            "proxy": ev["proxy"], "gold": ev["gold"], "gold_se": ev["gold_se"], "kl": ev["kl"], "ended": ev["ended"],
            "gold_by_family": {f: m["mean_gold"] for f, m in behaviour.items() if f != "all"}}
    print(f"\n2. policies on {len(prompts)} unseen prompts (proxy: the arm's own reward model; SFT: the unbiased one)")
    print(C.table([("policy", 15, ""), ("length", 6, ".1f"), (f">{CONCISE_CHARS} chars", 9, ".2f"),
                   ("concise", 7, "+.3f"), ("rambling", 8, ".2f"), ("proxy", 7, "+.3f"), ("gold", 7, "+.3f"),
                   ("+-se", 5, ".3f"), ("KL", 6, ".2f"), ("ended", 5, ".2f")],
                  [(name if name == "SFT" else f"PPO, bias {name}", *list(r.values())[:-1])
                   for name, r in results.items()]))
    print("\n3. where the gold went: mean gold by prompt family")
    print(C.table([("policy", 15, "")] + [(f, 10, "+.3f") for f in FAMILIES],
                  [(name if name == "SFT" else f"PPO, bias {name}", *(r["gold_by_family"].get(f, "") for f in FAMILIES))
                   for name, r in results.items()]))  # "": no prompt of that family was drawn

    C.save_figure(args.plot, lambda plt: draw(plt, lengths_each, results))
    return C.finish(args, "length_bias", {"gold_length_corr": gold_corr, "arms": {str(b): a for b, a in arms.items()},
                                          "policies": {str(n): r for n, r in results.items()},
                                          "eval_prompts": len(prompts), "sft_samples_scored": len(ended)}, t0)


def draw(plt, lengths_each, results):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    bins = np.arange(0, 44, 2) + 0.5  # a bin edge at 24.5: the penalty starts at 25 characters
    for name, lengths in lengths_each.items():
        label = name if name == "SFT" else f"PPO, length bias {name}"
        a.hist(lengths, bins=bins, histtype="step", linewidth=1.5, label=f"{label}: gold {results[name]['gold']:+.2f}")
    a.axvline(CONCISE_CHARS + 0.5, color="grey", linestyle=":", label=f"gold's length penalty beyond {CONCISE_CHARS}")
    a.set(xlabel="response length (characters)", ylabel="responses (unseen prompts)", title="answer length")
    a.legend(fontsize=8)
    biases = [name for name in results if name != "SFT"]
    b.errorbar(biases, [results[k]["gold"] for k in biases], yerr=[results[k]["gold_se"] for k in biases], fmt="o-",
               label="gold after PPO (+- se)")
    b.axhline(results["SFT"]["gold"], color="C0", linestyle=":", label="gold of SFT")
    b.plot(biases, [results[k]["over_concise"] for k in biases], "s--", color="C1",
           label=f"share of answers over {CONCISE_CHARS} characters")
    b.set(xlabel="annotator's length bias (utility per character)", title="what the bias costs")
    b.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    C.main_guard(main)
