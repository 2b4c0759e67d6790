"""Seed sweep: the default demo on ten seeds, each in its own process, against the bars it must clear.

    python demos/seed_sweep.py [--seeds 0 1 2 3 4 5 6 7 8 9] [--out runs/sweep] [--json sweep.json]
                               [--plot sweep.png] [--quick] [-- extra demo flags]

Each seed runs `python -m minirlhf.demo --seed S --out OUT/seed-S --force` (plus any flags after `--`) as a
fresh process, one after the other, so each is timed as a user would time it, with nothing warm. From its
summary.json the sweep reads: the whole demo's seconds; the reward model's expected agreement with the
annotator as a share of the annotator's exact ceiling, and the fraction of held-out (right sum, wrong sum)
pairs it orders right-first; the annotator's win rate of RLHF over SFT on unseen prompts; the gold gain;
and the rate of each family's preferred behaviour before and after RLHF.

The bars the default demo aims at, checked for every seed:
    seconds <= 60, reward model >= 90% of the ceiling, sums >= 0.9, win rate >= 0.70, gold gain >= +0.8,
    and every headline behaviour's rate higher after RLHF than before.
The table prints one row per seed, then the mean and the worst value of each column, and the bars each seed
misses. The seeds a recipe was tuned on must not be the only ones reported: the default is all ten.
"""
import json
import os
import subprocess
import sys
import time

import _common as C
import numpy as np

from minirlhf import runs
from minirlhf.cli import non_negative_int
from minirlhf.world import FAMILIES, HEADLINE

BARS = {"seconds": 60.0, "rm_of_ceiling": 0.90, "sums": 0.90, "win_rate": 0.70, "gold_gain": 0.8}
DEFAULTS = {"seeds": list(range(10)), "out": "runs/sweep"}
QUICK = {"seeds": [0, 1], "out": "runs/sweep-quick"}


def row_of(seed, summary):
    """The sweep's figures of one seed's summary.json."""
    rm, sft, rl = summary["reward_model"], summary["sft"], summary["rl"]
    return {"seed": seed, "seconds": summary["seconds"]["total"],
            "rm_of_ceiling": rm["val_expected_accuracy"] / rm["ceiling_accuracy"],
            "sums": np.nan if rm["sums_checked"] is None else rm["sums_checked"], "sum_pairs": rm["sum_pairs"],
            "win_rate": summary["win_rate_vs_sft"]["rate"], "gold_sft": sft["gold_score"],
            "gold_rlhf": rl["gold_score"], "gold_gain": rl["gold_score"] - sft["gold_score"],
            "kl": rl["kl_exact"], "stage_seconds": summary["seconds"],
            "behaviour": {f: [sft["behaviour"][f]["preferred_rate"], rl["behaviour"][f]["preferred_rate"]]
                          for f in FAMILIES}}


def missed(row):
    """The bars a seed misses, as short labels."""
    out = [f"{k} {row[k]:.3g}" for k in ("rm_of_ceiling", "sums", "win_rate", "gold_gain")
           if not row[k] >= BARS[k]]
    if row["seconds"] > BARS["seconds"]:
        out.append(f"seconds {row['seconds']:.1f}")
    out += [f"{f} {a:.2f}->{b:.2f}" for f, (a, b) in row["behaviour"].items() if not b > a]
    return out


def draw(plt, rows):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    seeds = [r["seed"] for r in rows]
    for ax, key, label in zip(axes, ("gold_gain", "win_rate", "rm_of_ceiling"),
                              ("gold gain over SFT", "annotator win rate vs SFT", "reward model / ceiling")):
        ax.bar(seeds, [r[key] for r in rows])
        ax.axhline(BARS[key], color="red", linestyle="--", label=f"bar {BARS[key]:g}")
        ax.set(xlabel="seed", title=label)
        ax.legend(fontsize=8)
    return fig


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = C.parser(__doc__, "python demos/seed_sweep.py", starts_from_a_run=False)
    ap.add_argument("--seeds", type=non_negative_int, nargs="+", help="seeds (default 0-9; --quick: 0 1)")
    ap.add_argument("--out", help="folder of the runs, one subfolder a seed (default runs/sweep)")
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    if len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds: a seed is given twice")
    try:
        runs.check_folder(args.out)
    except ValueError as e:
        ap.error(f"--out: {e}")
    demo_flags = (["--quick"] if args.quick else []) + extra
    t0 = time.perf_counter()
    rows = []
    for seed in args.seeds:
        folder = os.path.join(args.out, f"seed-{seed}")
        cmd = [sys.executable, "-m", "minirlhf.demo", "--seed", str(seed), "--out", folder, "--force", *demo_flags]
        print(f"== seed {seed}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"seed {seed}: the demo failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        with open(os.path.join(folder, "summary.json")) as f:
            row = row_of(seed, json.load(f))
        row["process_seconds"] = time.perf_counter() - t
        rows.append(row)
        print(f"   {row['seconds']:.1f} s: rm {row['rm_of_ceiling']:.1%} of ceiling, sums {row['sums']:.2f}, win "
              f"{row['win_rate']:.3f}, gold {row['gold_sft']:+.3f} -> {row['gold_rlhf']:+.3f}", flush=True)

    columns = [("seed", 5, ""), ("s", 5, ".1f"), ("RM/ceil", 7, ".1%"), ("sums", 5, ".2f"), ("win", 6, ".3f"),
               ("gold gain", 9, "+.3f"), ("KL", 5, ".2f")] + [(HEADLINE[f][:14], 14, "") for f in FAMILIES]

    def cells(r):
        return [r["seconds"], r["rm_of_ceiling"], r["sums"], r["win_rate"], r["gold_gain"], r["kl"]] + [
            f"{a:.2f}->{b:.2f}" for a, b in r["behaviour"].values()]
    body = [(str(r["seed"]), *cells(r)) for r in rows]
    keys = ("seconds", "rm_of_ceiling", "sums", "win_rate", "gold_gain", "kl")
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    worst = {k: (max if k == "seconds" else min)(r[k] for r in rows) for k in keys}
    worst["kl"] = max(r["kl"] for r in rows)
    lifts = {f: (float(np.mean([r["behaviour"][f][0] for r in rows])), float(np.mean([r["behaviour"][f][1]
                                                                                       for r in rows])))
             for f in FAMILIES}
    body.append(("mean", *[mean[k] for k in keys], *[f"{a:.2f}->{b:.2f}" for a, b in lifts.values()]))
    body.append(("worst", *[worst[k] for k in keys], *[""] * len(FAMILIES)))
    print(f"\nthe default demo on {len(rows)} seeds{' (' + ' '.join(demo_flags) + ')' if demo_flags else ''}; "
          f"worst: the slowest, the lowest, the largest KL")
    print(C.table(columns, body))
    misses = {r["seed"]: missed(r) for r in rows}
    print("\nbars: " + ", ".join(f"{k} {'<=' if k == 'seconds' else '>='} {v:g}" for k, v in BARS.items())
          + ", every headline up")
    for seed, m in misses.items():
        print(f"  seed {seed}: " + ("every bar met" if not m else "misses " + "; ".join(m)))
    C.save_figure(args.plot, lambda plt: draw(plt, rows))
    return C.finish(args, "seed_sweep", {"rows": rows, "mean": mean, "worst": worst, "bars": BARS,
                                        "misses": misses, "demo_flags": demo_flags}, t0)


if __name__ == "__main__":
    C.main_guard(main)
