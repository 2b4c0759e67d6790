"""What every script in demos/ shares: its flags, the demo run it starts from, PPO at a chosen setting, one
policy's evaluation on unseen prompts, and the three outputs: a fixed-column table, a JSON file and, when
matplotlib is installed, a figure.

Starting point. `--run DIR` names a finished demo run (`python -m minirlhf.demo --out DIR`); its SFT policy,
reward model and prompt split are loaded with minirlhf.runs.load_run, which refuses a folder whose run did
not finish or holds another run's files. When DIR holds no run at all, the script makes one there first
(the demo itself: about a minute, or `python -m minirlhf.demo --quick` under --quick) and says so. Under
--quick the default folder is runs/demo-quick, so a quick run never stands in for a full one.

--quick. Each script's QUICK settings (tiny step counts: seconds, enough to test the plumbing, far too
little to learn anything) fill every flag left at its default; a flag you type wins.

Proxy and gold. The proxy score of a response is what PPO was paid: the normalised reward-model score, or
reward.NO_EOS_SCORE for a response that never ended. The gold score is world.gold, which only a simulation
can know. Both are means over one sample per unseen prompt.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import numpy as np  # noqa: E402

from minirlhf import demo, fast, pipeline as P, runs  # noqa: E402
from minirlhf.cli import (apply_preset, non_negative_float, non_negative_int, positive_float,  # noqa: E402
                          positive_int, run_folder, writable_file)
from minirlhf.reward import score_samples  # noqa: E402
from minirlhf.transformer import copy_policy, sample_responses  # noqa: E402
from minirlhf.world import gold, sample_prompts  # noqa: E402


def parser(doc, prog, starts_from_a_run=True):
    """The flags every script takes; the script adds its own (defaults None where --quick may fill them)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if starts_from_a_run:
        ap.add_argument("--run", type=run_folder, default=None,
                        help="finished demo run to start from (default runs/demo, runs/demo-quick with --quick); "
                             "if the folder holds no run, the demo makes one there first")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seed of every np.random.Generator (default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny step counts: seconds, tests the plumbing only (a flag you type still wins)")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--plot", help="save a figure to this PNG file (needs matplotlib: pip install -e \".[plot]\")")
    return ap


# The reward-model and PPO settings of the scripts that retrain both: the demo's, with 40 PPO updates.
PIPELINE_DEFAULTS = {"val_labels": 300, "rm_steps": P.STEPS["default"]["rm_steps"], "ppo_updates": 40,
                     "lr": P.PPO_LR, "kl_coef": 0.15, "batch_size": P.PPO_BATCH, "eval_prompts": 400}


def add_pipeline_args(ap):
    """The flags of PIPELINE_DEFAULTS (default None, so --quick and the defaults can fill them)."""
    d = PIPELINE_DEFAULTS
    ap.add_argument("--val-labels", type=positive_int,
                    help=f"held-out ranked prompts for RM accuracy ({d['val_labels']})")
    ap.add_argument("--rm-steps", type=positive_int, help=f"reward-model steps (the demo's, {d['rm_steps']})")
    ap.add_argument("--ppo-updates", type=positive_int, help=f"PPO updates ({d['ppo_updates']})")
    ap.add_argument("--lr", type=positive_float, help=f"PPO learning rate (the demo's, {d['lr']:g})")
    ap.add_argument("--kl-coef", type=non_negative_float, help=f"fixed KL coefficient (the demo's, {d['kl_coef']})")
    ap.add_argument("--batch-size", type=positive_int, help=f"rollouts per PPO update ({d['batch_size']})")
    ap.add_argument("--eval-prompts", type=positive_int,
                    help=f"unseen prompts each policy answers ({d['eval_prompts']})")


def parse(ap, argv, quick=None, defaults=None):
    """Parse argv; fill flags left unset (None) from quick under --quick, else from defaults."""
    args = ap.parse_args(argv)
    apply_preset(args, (quick or {}) if args.quick else {})
    apply_preset(args, defaults or {})
    if "run" in vars(args) and args.run is None:
        args.run = "runs/demo-quick" if args.quick else "runs/demo"
    for flag in ("json", "plot"):
        if getattr(args, flag) is not None:
            try:
                writable_file(getattr(args, flag))
            except ValueError as e:
                ap.error(f"--{flag}: {e}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error('--plot needs matplotlib: pip install -e ".[plot]"')
    return args


def starting_point(args, log=print):
    """The loaded demo run in args.run (runs.load_run), made there first if the folder holds no run."""
    if runs.read_manifest(args.run) is None and not (os.path.isdir(args.run) and os.listdir(args.run)):
        flags = ["--out", args.run, "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
        log(f"no demo run in {args.run}: making one first with python -m minirlhf.demo {' '.join(flags)}")
        demo.main(flags)
    start = runs.load_run(args.run, P.DEMO_MODEL)
    log(f"starting from the demo run in {args.run} (seed {start['manifest']['seed']}, "
        f"{'quick' if start['manifest']['settings'].get('quick') else 'default length'})")
    return start


def main_guard(main):
    """Run a script's main: keep freed memory (an entry point, fast.py), and turn a ValueError about its
    inputs (a run folder that is not one run, a bad checkpoint) into a message and exit code 2."""
    fast.keep_freed_memory()
    try:
        return main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def train_policy(start, reward_model, rng, updates, lr, kl_coef, batch_size=P.PPO_BATCH, log=print):
    """PPO (pipeline.run_ppo, the demo's recipe) on a fresh copy of the SFT policy, which stays the frozen
    reference, against reward_model at a fixed KL coefficient. Returns (policy, history)."""
    policy = copy_policy(start["sft"])
    _, history = P.run_ppo(policy, start["sft"].params, reward_model, start["train_prompts"],
                           P.ppo_config(updates, P.fixed_kl(kl_coef), lr=lr, batch_size=batch_size), rng, log=log)
    return policy, history


def evaluate_policy(policy, reference, reward_model, prompts, rng):
    """One sample per prompt from policy: per-sample texts, gold, proxy and length; their means, the
    standard error of the gold mean, and the KL to reference per response (the k1 estimate and the exact
    KL along the samples, pipeline.policy_kl). With reward_model None, proxy_each and proxy are None."""
    texts = [p.text for p in prompts]
    samples = sample_responses(policy, texts, rng)
    golds = np.array([gold(p, s, e) for p, (s, e) in zip(prompts, samples)])
    gold_se = golds.std(ddof=1) / np.sqrt(len(golds)) if len(golds) > 1 else 0.0
    proxies = None if reward_model is None else score_samples(reward_model, texts, samples)
    lengths = np.array([len(s) for s, _ in samples])
    kl, kl_exact = P.policy_kl(policy, reference.params, texts, samples)
    return {"samples": samples, "gold_each": golds, "proxy_each": proxies, "length_each": lengths,
            "gold": float(golds.mean()), "gold_se": float(gold_se),
            "proxy": None if proxies is None else float(proxies.mean()), "kl": kl, "kl_exact": kl_exact,
            "length": float(lengths.mean()), "ended": float(np.mean([e for _, e in samples]))}


def eval_prompts(start, n, seed):
    """n unseen prompts (families equally often), the same for every arm of an experiment."""
    return sample_prompts(start["val_prompts"], n, np.random.default_rng([seed, 1]))


# ---------------------------------------------------------------- outputs

def table(columns, rows):
    """A fixed-column text table. columns: (header, width, format) triples; rows: tuples of values, a
    string printed as it is (a label, or "" for an empty cell)."""
    def cell(v, w, f):
        return f"{v if isinstance(v, str) else format(v, f):>{w}}"
    return "\n".join([" ".join(f"{h:>{w}}" for h, w, _ in columns)]
                     + [" ".join(cell(v, w, f) for v, (_, w, f) in zip(row, columns)) for row in rows])


def finish(args, name, results, t0):
    """Print the runtime and write the JSON (if --json): the experiment, its flags, seconds and results."""
    out = {"experiment": name, "args": vars(args), "seconds": time.perf_counter() - t0, **results}
    print(f"{name}: {out['seconds']:.1f} s")
    if args.json:
        runs.write_json(args.json, out)
        print(f"wrote {args.json}")
    return out


def save_figure(path, draw):
    """draw(plt) -> figure, saved to path (PNG unless path ends in another format matplotlib writes)."""
    if not path:
        return
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig = draw(plt)
    ext = os.path.splitext(path)[1][1:].lower()
    # savefig would add ".png" to a path without a known extension, and the file would not be where we say
    fig.savefig(path, dpi=120, bbox_inches="tight", **({} if ext in fig.canvas.get_supported_filetypes()
                                                        else {"format": "png"}))
    plt.close(fig)
    print(f"wrote {path}")
