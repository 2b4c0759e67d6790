"""KL sweep: "without constraints, the model may exploit the reward function; KL regularisation keeps
language natural."

    python demos/kl_sweep.py [--run runs/demo] [--kl-coefs 0 0.02 0.05 0.1 0.2 0.5] [--ppo-updates 100]
                             [--lr 1e-4] [--json kl_sweep.json] [--plot kl_sweep.png] [--quick]

Method. PPO from the same SFT model against the same reward model (the demo run's), once per fixed KL
coefficient kl_coef (beta in the papers), 0 included; each run starts from the same seed, so the arms
differ only in kl_coef. Each
final policy answers the same unseen prompts once; for each we measure the proxy score (the normalised
reward-model score PPO was paid, -1 for a response with no EOS), the gold score (world.gold, which the
reward model only approximates) and the KL to the SFT model per response (the k1 estimate and the exact
KL along the samples). Gao et al. (2022, "Scaling laws for reward model overoptimization") plot both
scores against sqrt(KL): the proxy keeps rising while the gold rises, peaks and falls. The PPO history
gives the same curve over training (objective/scores, gold/score and objective/kl of each update's
rollouts, on training prompts), smoothed over a few updates.

Reading the output. Table 1, one row per kl_coef (and the SFT model): proxy, gold, KL. Reward hacking is a
row whose proxy is high and whose gold is below the SFT model's; KL regularisation works if some
kl_coef > 0 keeps gold above the SFT model's. Table 2, the gold criteria behind each row's gold (means):
where gold was lost. Table 3, the training curve of each kl_coef: the best smoothed gold, when and at what
KL it came, and the gold and proxy at the end; "over-optimised" marks a gold that fell from its peak while
the proxy did not. Last, the kl_coef = 0 policy's highest-proxy samples per family with their gold
criteria: what exploiting the reward model looks like. The figure (--plot) shows the final points and the
training curves against sqrt(KL).
"""
import time

import _common as C
import numpy as np

from minirlhf.cli import non_negative_float, positive_float, positive_int
from minirlhf.world import CRITERIA, FAMILIES, behaviour, gold_breakdown

DEFAULTS = {"kl_coefs": [0.0, 0.02, 0.05, 0.1, 0.2, 0.5], "ppo_updates": 100, "lr": 1e-4, "batch_size": 64,
            "eval_prompts": 400}
QUICK = {"kl_coefs": [0.0, 0.1], "ppo_updates": 2, "batch_size": 8, "eval_prompts": 8}
SMOOTH = 5  # updates in the moving average of the training curves
FELL = 0.25  # gold units: a fall from the training peak larger than this counts as over-optimisation


def smooth(x, w):
    """Trailing moving average over w points (fewer at the start), same length as x."""
    c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
    i = np.arange(1, len(x) + 1)
    return (c[i] - c[np.maximum(i - w, 0)]) / np.minimum(i, w)


def training_curve(history, w):
    """Smoothed per-update kl, proxy and gold of one PPO run, its gold peak, and the over-optimisation
    verdict: gold fell more than FELL from its peak while the proxy ended at least as high as there."""
    kl, proxy, gold = (smooth([h[k] for h in history], w) for k in ("objective/kl", "objective/scores", "gold/score"))
    peak = int(np.argmax(gold))
    return {"update": [h["update"] for h in history], "kl": kl.tolist(), "proxy": proxy.tolist(),
            "gold": gold.tolist(), "peak_update": peak + 1, "peak_gold": float(gold[peak]),
            "peak_kl": float(kl[peak]), "peak_proxy": float(proxy[peak]), "last_gold": float(gold[-1]),
            "last_proxy": float(proxy[-1]), "last_kl": float(kl[-1]),
            "over_optimised": bool(gold[peak] - gold[-1] > FELL and proxy[-1] >= proxy[peak])}


def hacking_samples(prompts, ev, per_family=2):
    """The highest-proxy samples of each family (different texts), with their gold criteria."""
    rows = []
    for family in FAMILIES:
        idx = [i for i, p in enumerate(prompts) if p.family == family]
        picked = {}  # response text -> sample index, best proxy first
        for i in sorted(idx, key=lambda i: -ev["proxy_each"][i]):
            if len(picked) < per_family:
                picked.setdefault(ev["samples"][i][0], i)
        for i in picked.values():
            text, ended = ev["samples"][i]
            rows.append({"prompt": prompts[i].text, "response": text, "ended": ended,
                         "proxy": float(ev["proxy_each"][i]), "gold": float(ev["gold_each"][i]),
                         "behaviour": behaviour(prompts[i], text, ended),
                         "criteria": gold_breakdown(prompts[i], text, ended)})
    return rows


def draw(plt, rows, curves, w):
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.2))
    rows = sorted(rows, key=lambda r: r["kl_exact"])
    x = [np.sqrt(max(r["kl_exact"], 0)) for r in rows]
    a.errorbar(x, [r["gold"] for r in rows], yerr=[r["gold_se"] for r in rows], fmt="o-", label="gold")
    a.plot(x, [r["proxy"] for r in rows], "s--", label="proxy (reward model)")
    for xi, r in zip(x, rows):
        a.annotate(r["name"], (xi, r["gold"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    a.set(xlabel="sqrt(KL to SFT), nats^1/2 (exact, unseen prompts)", ylabel="score",
          title="final policies on unseen prompts")
    a.legend()
    for k, (beta, curve) in enumerate(curves.items()):
        xs = np.sqrt(np.maximum(curve["kl"], 0))
        b.plot(xs, curve["gold"], "-", color=f"C{k}", label=f"kl_coef {beta}")
        b.plot(xs, curve["proxy"], "--", color=f"C{k}")
    b.set(xlabel="sqrt(KL to SFT), nats^1/2 (k1, training rollouts)", ylabel="score",
          title=f"over training, {w}-update average: gold solid, proxy dashed")
    b.legend(fontsize=8)
    beta = min(curves)
    curve = curves[beta]
    c.plot(curve["update"], curve["gold"], "-", label="gold")
    c.plot(curve["update"], curve["proxy"], "--", label="proxy (reward model)")
    c.axvline(curve["peak_update"], color="grey", linestyle=":", label="gold's peak")
    c.set(xlabel="PPO update", ylabel="score", title=f"kl_coef = {beta} over training ({w}-update average)")
    c.legend(fontsize=8)
    return fig


def main(argv=None):
    ap = C.parser(__doc__, "python demos/kl_sweep.py")
    ap.add_argument("--kl-coefs", type=non_negative_float, nargs="+",
                    help=f"fixed KL coefficients, one PPO run each (default {DEFAULTS['kl_coefs']})")
    ap.add_argument("--ppo-updates", type=positive_int, help="PPO updates per run (default 100)")
    ap.add_argument("--lr", type=positive_float, help="PPO learning rate, decays linearly to 0 (default 1e-4)")
    ap.add_argument("--batch-size", type=positive_int, help="rollouts per PPO update (default 64)")
    ap.add_argument("--eval-prompts", type=positive_int, help="unseen prompts each policy answers (default 400)")
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    w = 1 if args.quick else SMOOTH
    t0 = time.perf_counter()
    start = C.starting_point(args)
    rm, sft = start["reward_model"], start["sft"]
    prompts = C.eval_prompts(start, args.eval_prompts, args.seed)

    policies, curves = {"SFT": (None, sft)}, {}  # name -> (kl_coef, policy)
    for kl_coef in args.kl_coefs:
        print(f"\n== PPO with kl_coef = {kl_coef} ({args.ppo_updates} updates, lr {args.lr}) " + "=" * 30, flush=True)
        t = time.perf_counter()
        policy, history = C.train_policy(start, rm, np.random.default_rng(args.seed), args.ppo_updates, args.lr,
                                         kl_coef, args.batch_size)
        policies[f"kl_coef {kl_coef}"] = (kl_coef, policy)
        curves[kl_coef] = training_curve(history, w)
        curves[kl_coef]["seconds"] = time.perf_counter() - t

    rows, evals = [], {}
    for name, (kl_coef, policy) in policies.items():
        ev = evals[name] = C.evaluate_policy(policy, sft, rm, prompts, np.random.default_rng([args.seed, 2]))
        crit = {c: float(np.mean([gold_breakdown(p, s, e)[c] for p, (s, e) in zip(prompts, ev["samples"])]))
                for c in CRITERIA}
        rows.append({"name": name, "kl_coef": kl_coef,
                     **{k: ev[k] for k in ("proxy", "gold", "gold_se", "kl", "kl_exact", "length", "ended")},
                     "criteria": crit})

    print(f"\n1. final policies on {len(prompts)} unseen prompts (one sample each)")
    print(C.table([("policy", 12, ""), ("proxy", 7, "+.3f"), ("gold", 7, "+.3f"), ("+-se", 5, ".3f"),
                   ("KL k1", 7, ".2f"), ("KL exact", 8, ".2f"), ("sqrt KL", 7, ".2f"), ("length", 6, ".1f"),
                   ("ended", 6, ".2f")],
                  [(r["name"], r["proxy"], r["gold"], r["gold_se"], r["kl"], r["kl_exact"],
                    np.sqrt(max(r["kl_exact"], 0)), r["length"], r["ended"]) for r in rows]))
    print("\n2. the gold criteria behind each gold score (means)")
    print(C.table([("policy", 12, "")] + [(c, 10, "+.3f") for c in CRITERIA],
                  [(r["name"], *r["criteria"].values()) for r in rows]))
    print(f"\n3. over training ({w}-update average of each update's rollouts, training prompts)")
    print(C.table([("kl_coef", 7, ""), ("peak gold", 9, "+.3f"), ("at update", 9, "d"), ("KL there", 8, ".2f"),
                   ("last gold", 9, "+.3f"), ("last proxy", 10, "+.3f"), ("last KL", 7, ".2f"),
                   ("over-optimised", 14, "")],
                  [(b, c["peak_gold"], c["peak_update"], c["peak_kl"], c["last_gold"], c["last_proxy"],
                    c["last_kl"], "yes" if c["over_optimised"] else "no") for b, c in curves.items()]))
    hack = min(args.kl_coefs)
    samples = hacking_samples(prompts, evals[f"kl_coef {hack}"])
    print(f"\n4. what the kl_coef = {hack} policy writes: its highest-proxy samples per family")
    for s in samples:
        lost = ", ".join(f"{c} {v:+.1f}" for c, v in s["criteria"].items() if v)
        print(f"  {s['prompt'][:26]:<26} -> {s['response'] + ('' if s['ended'] else '...')!r:<34} "
              f"proxy {s['proxy']:+.2f} gold {s['gold']:+.2f} ({s['behaviour']}: {lost})")

    C.save_figure(args.plot, lambda plt: draw(plt, rows, curves, w))
    return C.finish(args, "kl_sweep", {"final": rows, "training": {str(b): c for b, c in curves.items()},
                                       "hacking_samples": samples, "eval_prompts": len(prompts)}, t0)


if __name__ == "__main__":
    C.main_guard(main)
