"""What the lesson's experiments share (kl_sweep, length_bias, labelling_cost, explain_ranking in demos/):
their flags, the models they start from, PPO at a chosen setting, one policy's evaluation on unseen prompts,
and the three outputs: a fixed-column table, a JSON file and, when matplotlib is installed, a figure.

Starting point. `--from DIR` names a finished demo run (`python -m minirlhf.demo --out DIR`); its SFT model,
reward model and prompt split are loaded with `minirlhf.demo.load_run`. When DIR holds no run, the demo's
stages run here with the demo's step counts (about 40 s), or tiny ones with --quick (a few seconds: enough
to test the plumbing, far too little to learn anything), and nothing is written to DIR.

Proxy and gold. The proxy score of a response is what PPO was paid: the normalised reward-model score, or
the fixed no-EOS score (-1) for a response that never ended. The gold score is world.gold, which only a
simulation can know. Both are means over one sample per unseen prompt.
"""
import argparse
import os
import time

import minirlhf  # noqa: F401  (first: one BLAS thread before NumPy loads)
import numpy as np

from minirlhf.demo import (LABEL_FAMILY_WEIGHTS, MODEL, PRESETS, collect_preferences, load_run, policy_kl,
                           run_reward_model, run_sft, write_json)
from minirlhf.kl import KLControllerConfig
from minirlhf.ppo import PPOConfig, init_value_params, train_ppo
from minirlhf.reward import score
from minirlhf.sft import sample_responses
from minirlhf.world import all_prompts, gold, sample_prompts, split_prompts

# Stage lengths when --quick finds no demo run (CI, where runs/ is not committed).
TINY = {"sft_steps": 30, "rm_steps": 2, "labels": 16, "val_labels": 8}


def parser(doc):
    """The flags every experiment takes; the script adds its own. The description is the docstring."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="run_dir", default="runs/demo",
                    help="finished demo run to start from (default runs/demo); if missing, its stages run here")
    ap.add_argument("--seed", type=int, default=0, help="seed of every np.random.Generator (default 0)")
    ap.add_argument("--quick", action="store_true", help="tiny step counts: seconds, tests the plumbing only")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--plot", help="save a figure here (needs matplotlib: pip install minirlhf[plot])")
    return ap


def add_pipeline_args(ap):
    """The reward-model and PPO settings every experiment that retrains both shares (the demo's values)."""
    ap.add_argument("--val-labels", type=int, default=300, help="held-out ranked prompts for RM accuracy")
    ap.add_argument("--rm-steps", type=int, default=PRESETS["default"]["rm_steps"],
                    help="reward-model steps (default: the demo's)")
    ap.add_argument("--updates", type=int, default=40, help="PPO updates (the table in the README used 40)")
    ap.add_argument("--lr", type=float, default=2e-4, help="PPO learning rate (the demo's)")
    ap.add_argument("--beta", type=float, default=0.15, help="fixed KL coefficient (the demo's)")
    ap.add_argument("--batch-size", type=int, default=64, help="rollouts per PPO update")
    ap.add_argument("--eval-prompts", type=int, default=400, help="unseen prompts each policy answers")


def parse_args(ap, argv, quick):
    """Parse argv; with --quick, the flags in the dict quick take its values (tiny step counts)."""
    args = ap.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def starting_point(run_dir, quick, rng, need_reward_model=True, log=print):
    """{sft, reward_model, norm, train_prompts, val_prompts} of the demo run in run_dir, or of the demo's
    stages run here when run_dir holds none (tiny with quick; reward model only if need_reward_model)."""
    if all(os.path.exists(os.path.join(run_dir, f)) for f in ("sft.npz", "reward.npz", "split.json")):
        log(f"starting from the demo run in {run_dir}")
        return load_run(run_dir)
    steps = TINY if quick else PRESETS["default"]
    log(f"no demo run in {run_dir}: running the demo's stages here ({steps}); "
        f"`python -m minirlhf.demo --out {run_dir}` saves them for the next experiment")
    quiet = log if not quick else (lambda line: None)
    train, val = split_prompts(all_prompts(), 0.25, rng)
    sft, _ = run_sft(train, val, steps["sft_steps"], rng, log=quiet)
    start = {"sft": sft, "train_prompts": train, "val_prompts": val}
    if need_reward_model:
        train_cmp = collect_preferences(sft, train, steps["labels"], rng, family_weights=LABEL_FAMILY_WEIGHTS)
        val_cmp = collect_preferences(sft, val, steps.get("val_labels", max(50, steps["labels"] // 5)), rng)
        start["reward_model"], start["norm"], _ = run_reward_model(sft, train, train_cmp, val_cmp,
                                                                   steps["rm_steps"], rng, log=quiet)
    return start


def train_policy(start, reward_model, norm, rng, updates, lr, beta, batch_size=64, log=print):
    """PPO on a fresh copy of the SFT model (which stays the frozen reference) against reward_model, at a
    fixed KL coefficient beta. The value model starts from reward_model. Returns (policy, history)."""
    policy = {k: v.copy() for k, v in start["sft"].items()}
    value = init_value_params(reward_model, norm)
    cfg = PPOConfig(updates=updates, batch_size=batch_size, minibatch_size=min(16, batch_size), lr=lr,
                    kl=KLControllerConfig(beta=beta))
    history = train_ppo(policy, start["sft"], reward_model, value, MODEL, start["train_prompts"], cfg, norm, rng,
                        log=log)
    return policy, history


def proxy_scores(reward_model, norm, prompts, samples):
    """What PPO is paid for each (text, ended) sample: the normalised score, or the fixed no-EOS score."""
    out = np.full(len(samples), PPOConfig.no_eos_score)
    ended = [i for i, (_, e) in enumerate(samples) if e]
    if ended:
        out[ended] = score(reward_model, MODEL, [prompts[i].text for i in ended], [samples[i][0] for i in ended],
                           norm)
    return out


def evaluate_policy(policy, reference, reward_model, norm, prompts, rng):
    """One sample per prompt from policy: per-sample texts, gold, proxy and length; their means, the
    standard error of the gold mean, and the KL to reference per response (the k1 estimate and the exact
    KL along the samples, minirlhf.demo.policy_kl). With reward_model None, proxy_each and proxy are None."""
    texts = [p.text for p in prompts]
    samples = sample_responses(policy, MODEL, texts, rng)
    golds = np.array([gold(p, s, e) for p, (s, e) in zip(prompts, samples)])
    gold_se = golds.std(ddof=1) / np.sqrt(len(golds)) if len(golds) > 1 else 0.0
    proxies = None if reward_model is None else proxy_scores(reward_model, norm, prompts, samples)
    lengths = np.array([len(s) for s, _ in samples])
    kl, kl_exact = policy_kl(policy, reference, texts, samples)
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
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return out


def save_figure(path, draw):
    """draw(plt) -> figure, saved to path; without matplotlib, say so and carry on."""
    if not path:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install minirlhf[plot]): no figure written to {path}")
        return
    fig = draw(plt)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
