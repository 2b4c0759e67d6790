"""GRPO's length bias: do wrong answers grow longer under GRPO's aggregator than under Dr. GRPO's?

    python demos/length_bias_grpo.py [--run runs/demo] [--seeds 0 1 2] [--updates 40] [--kl-coef 0]
                                     [--json length_bias_grpo.json] [--plot length_bias_grpo.png] [--quick]

Claim (Liu et al. 2025, "Understanding R1-Zero-like training", arXiv 2503.20783, sec. 3.1). GRPO averages each
completion's token losses, 1/L_i: a right answer's tokens are pushed up harder the shorter it is, a wrong
answer's pushed down less the longer it is, so wrong answers lengthen. Dr. GRPO divides by a constant (and
drops the std), which removes it. minirlhf/exact_rl.py measures the bias exactly on a tiny model: along
GRPO's expected update the mean length of wrong answers grows where the true gradient shrinks it.

Method. From the SFT model of a finished demo run, both presets of minirlhf.grpo (ALGOS["grpo"] and
ALGOS["dr_grpo"], with the same --kl-coef: 0 by default, so they differ only in the std and the aggregator)
train on the run's arithmetic training prompts with world.verify as the reward (1 for a right sum, else 0),
once per seed, each arm from the same seed. Each policy then answers --eval-prompts unseen arithmetic
prompts once (the same prompts for every arm). Measured: mean length in characters, the share of right sums,
the mean length and mean gold of the wrong answers, over training the mean completion length.

Reading the output. Table 1, per arm and seed, then the mean over seeds (with the SFT model for reference).
The claim holds here if wrong answers end longer under GRPO than under Dr. GRPO on most seeds; the spread
across seeds says how much of any gap is noise. This world's answers are short (a few tokens), so its length
bias is small next to the paper's long reasoning chains.
"""
import time
from dataclasses import replace

import _common as C
import numpy as np
from frontier import every  # a log that prints every k-th line

from minirlhf import grpo
from minirlhf import pipeline as P
from minirlhf.cli import group_size, non_negative_float, non_negative_int, positive_int
from minirlhf.transformer import copy_policy, sample_responses
from minirlhf.world import gold, sample_prompts, verify

DEFAULTS = {"seeds": [0, 1, 2], "updates": 40, "group_size": 8, "prompts_per_update": 8, "kl_coef": 0.0,
            "eval_prompts": 400}
QUICK = {"seeds": [0], "updates": 1, "group_size": 4, "prompts_per_update": 2, "eval_prompts": 16}
ARMS = ("grpo", "dr_grpo")


def arm_config(name, args):
    """The preset with this run's scale and KL coefficient (k3 in the loss when > 0, as GRPO's)."""
    return replace(grpo.ALGOS[name], updates=args.updates, group_size=args.group_size,
                   prompts_per_update=args.prompts_per_update, lr=P.PPO_LR, kl_coef=args.kl_coef,
                   kl_placement="loss" if args.kl_coef > 0 else "none", kl_loss="k3")


def measure(policy, prompts, rng):
    """One answer per prompt: mean length, right rate, and the wrong answers' mean length and gold."""
    samples = sample_responses(policy, [p.text for p in prompts], rng)
    right = np.array([verify(p, s, e) for p, (s, e) in zip(prompts, samples)]) == 1.0
    lengths = np.array([len(s) for s, _ in samples], np.float64)
    golds = np.array([gold(p, s, e) for p, (s, e) in zip(prompts, samples)])
    wrong = ~right
    return {"length": float(lengths.mean()), "right_rate": float(right.mean()),
            "wrong_length": float(lengths[wrong].mean()) if wrong.any() else 0.0,
            "wrong_gold": float(golds[wrong].mean()) if wrong.any() else 0.0, "gold": float(golds.mean()),
            "wrong_count": int(wrong.sum())}


def main(argv=None):
    ap = C.parser(__doc__, "python demos/length_bias_grpo.py")
    ap.add_argument("--seeds", type=non_negative_int, nargs="+", help="training seeds, one run per arm each")
    ap.add_argument("--updates", type=positive_int, help="updates per run")
    ap.add_argument("--group-size", type=group_size, help="completions per prompt, G (at least 2)")
    ap.add_argument("--prompts-per-update", type=positive_int, help="prompts per update")
    ap.add_argument("--kl-coef", type=non_negative_float, help="KL coefficient of both arms (k3 in the loss)")
    ap.add_argument("--eval-prompts", type=positive_int, help="unseen arithmetic prompts each policy answers")
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    t0 = time.perf_counter()
    start = C.starting_point(args)
    sft = start["sft"]
    train = [p for p in start["train_prompts"] if p.family == "arithmetic"]
    unseen = [p for p in start["val_prompts"] if p.family == "arithmetic"]
    prompts = sample_prompts(unseen, args.eval_prompts, np.random.default_rng([args.seed, 1]))
    sft_row = measure(sft, prompts, np.random.default_rng([args.seed, 2]))
    arms = {}
    for name in ARMS:
        cfg, rows, curves = arm_config(name, args), [], []
        for seed in args.seeds:
            print(f"\n== {name}, seed {seed}: {cfg.updates} updates of {cfg.prompts_per_update} x {cfg.group_size}",
                  flush=True)
            policy = copy_policy(sft)
            hist = grpo.train_critic_free(policy, sft.params, grpo.verifier_source(), train, cfg,
                                          np.random.default_rng(seed), log=every(10))
            rows.append({"seed": seed, **measure(policy, prompts, np.random.default_rng([args.seed, 2]))})
            curves.append([h["completions/mean_length"] for h in hist])
        keys = ("length", "right_rate", "wrong_length", "wrong_gold", "gold")
        arms[name] = {"seeds": rows, "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
                      "length_curve": np.mean(curves, axis=0).tolist()}

    print(f"\n1. {len(prompts)} unseen arithmetic prompts, one answer each (lengths in characters)")
    cols = [("policy", 14, ""), ("seed", 4, ""), ("length", 6, ".2f"), ("right", 6, ".3f"), ("wrong len", 9, ".2f"),
            ("wrong gold", 10, "+.3f"), ("gold", 7, "+.3f")]
    table = [("SFT", "", sft_row["length"], sft_row["right_rate"], sft_row["wrong_length"], sft_row["wrong_gold"],
              sft_row["gold"])]
    for name, a in arms.items():
        table += [(name, str(r["seed"]), r["length"], r["right_rate"], r["wrong_length"], r["wrong_gold"], r["gold"])
                  for r in a["seeds"]]
        m = a["mean"]
        table.append((f"{name} mean", "", m["length"], m["right_rate"], m["wrong_length"], m["wrong_gold"], m["gold"]))
    print(C.table(cols, table))
    longer = sum(g["wrong_length"] > d["wrong_length"] for g, d in zip(arms["grpo"]["seeds"], arms["dr_grpo"]["seeds"]))
    gap = arms["grpo"]["mean"]["wrong_length"] - arms["dr_grpo"]["mean"]["wrong_length"]
    answer = (f"wrong answers are {gap:+.2f} characters longer under GRPO than under Dr. GRPO on average; longer on "
              f"{longer} of {len(args.seeds)} seeds")
    print("answer: " + answer)
    C.save_figure(args.plot, lambda plt: draw(plt, arms))
    return C.finish(args, "length_bias_grpo", {"arms": arms, "sft": sft_row, "answer": answer,
                                               "eval_prompts": len(prompts), "train_prompts": len(train)}, t0)


def draw(plt, arms):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, arm in arms.items():
        a.plot(np.arange(1, len(arm["length_curve"]) + 1), arm["length_curve"], label=name)
    a.set(xlabel="update", ylabel="mean completion length (tokens)", title="over training (mean over seeds)")
    a.legend()
    names = list(arms)
    for k, key in enumerate(("length", "wrong_length")):
        b.bar(np.arange(len(names)) + 0.4 * k, [arms[n]["mean"][key] for n in names], width=0.4, label=key)
    b.set_xticks(np.arange(len(names)) + 0.2, names)
    b.set(ylabel="characters", title="unseen arithmetic prompts")
    b.legend()
    return fig


if __name__ == "__main__":
    C.main_guard(main)
