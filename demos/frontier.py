"""The reward-KL frontier: PPO, DPO, best-of-n and the critic-free methods from one SFT model.

    python demos/frontier.py [--run runs/demo] [--json frontier.json] [--plot frontier.png] [--quick]

Every method starts from the SFT model of a finished demo run (`python -m minirlhf.demo --out runs/demo`)
and is judged on the same unseen prompts by the gold score (which only the simulated world knows) against
KL(policy || SFT), the price paid in drift from the reference:

  PPO       pipeline.run_ppo with a fixed KL coefficient, several values, the demo's reward model. That reward
            model was trained by the demo on ITS OWN comparisons (same annotator, same SFT sampler, other
            draws), not on the set DPO sees here.
  DPO       minirlhf.dpo on the pairs of a preference set regenerated here with pipeline.collect_preferences
            from the SFT model (fixed seed: the same kind of data the reward model was fitted to), several
            betas, the SFT model as the frozen reference.
  best-of-n minirlhf.best_of_n: n SFT samples, the reward model's favourite kept; several n.
  GRPO, Dr. GRPO, DAPO, RLOO  minirlhf.grpo's presets against the same reward model (reward_model_source), at
            several KL coefficients and group sizes G, each with PPO's budget of samples: ppo_updates updates of
            PPO_BATCH completions (PPO_BATCH / G prompts of G each). A KL coefficient goes where the preset puts
            it (GRPO: k3 in the loss; RLOO: k1 in the reward); Dr. GRPO and DAPO, which have none in their
            papers, get GRPO's k3 in the loss when it is > 0. Samples are matched, not gradient steps: PPO
            takes 16 per update (4 epochs of 4 minibatches), the presets 4 (RLOO's REINFORCE 1).

Evaluation. PPO and DPO policies go through pipeline.compare_policies with one seed, so all of them answer
the same prompts and are compared with the same SFT samples; KL is pipeline.policy_kl's exact KL along the sampled
responses (its expectation is the sequence-level KL; the k1 estimate is in the JSON). For best-of-n, the
same prompts get max(n) SFT samples each: its gold is that of a real best-of-n draw (the first n samples),
its KL the plug-in measurement of minirlhf.best_of_n from the pooled samples of each distinct prompt, next
to the analytic log n - (n - 1)/n, an upper bound here. PPO's kl_coef multiplies a KL in nats against a score
in normalised reward units, DPO's beta against the reward model's raw (Bradley-Terry logit) units: the same
trade-off is DPO beta = PPO kl_coef / gain, gain the reward model's normalisation gain (printed).

Gao et al.'s functional forms (2022, arXiv 2210.10760) are fitted to each method's gold gain over SFT against
d = sqrt(KL) with scipy.optimize.curve_fit: R(d) = d (alpha - beta d) for best-of-n, peak at d = alpha / 2 beta,
and R(d) = d (alpha - beta log d) for the rest, peak at log d = alpha / beta - 1. With fewer than three points
(or no convergence) a method gets no fit; R^2 and the RMSE say how well each form fits. The paper publishes no
coefficients, so only shapes and peaks compare.

Best-of-n pays for its gold at inference time (n samples and n reward-model scores per prompt), PPO and
DPO once, in training; this script compares only gold against KL.

"Gold per nat": every method's frontier is the line from the SFT point (KL 0) through its points sorted by
KL; the table at the end reads each one at a few KL budgets, and names the method with the most gold there
and, averaged over the budgets all three reach, overall (with the standard error as a yardstick of noise).
The DPO note at the end reads the puzzle (chosen log-probs fall while the margin grows) off the logged
history; demos/dpo_puzzle.py explains it from the gradient.

Measured once (seed 0's default demo run, 26 minutes beside other jobs; demos/README.md has the tables and
the commit): averaged over the budgets every method reaches (0.25 and 0.5 nats) best-of-n leads, +0.30,
then DPO +0.10, RLOO +0.09, Dr. GRPO +0.02, PPO -0.01, GRPO -0.13, DAPO -0.16; best-of-n's lead over DPO
is larger than two standard errors of one mean gold. Every method peaks and then loses gold as the KL
grows (best-of-n at n = 8, PPO at kl_coef 0.15, DPO at beta 0.3; at beta 0.03 DPO ends far below the SFT
model with 23% of its answers broken). The measured best-of-n KL is below log n - (n-1)/n, 2.23 against
2.50 nats at n = 32: responses repeat.
"""
import time
import warnings
from dataclasses import replace

import _common as C
import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from minirlhf import grpo
from minirlhf import pipeline as P
from minirlhf.best_of_n import evaluate_best_of_n
from minirlhf.cli import non_negative_float, positive_float, positive_int
from minirlhf.dpo import DPOConfig, preference_pairs, train_dpo
from minirlhf.reward import score_samples
from minirlhf.transformer import copy_policy, sample_responses
from minirlhf.world import behaviour, gold, sample_prompts

# The full run's settings; --quick (a smoke test of a few seconds; its numbers mean nothing) fills the flags
# you leave unset from QUICK instead.
DEFAULTS = {"labels": P.STEPS["default"]["labels"], "kl_coefs": [0.5, 0.15, 0.05, 0.02], "ppo_updates": 40,
            "dpo_betas": [1.0, 0.3, 0.1, 0.03], "dpo_steps": 300, "dpo_batch": 16, "dpo_lr": 1e-4,
            "bon_ns": [1, 2, 4, 8, 16, 32], "eval_prompts": 400, "budgets": [0.25, 0.5, 1.0, 2.0, 4.0],
            "cf_methods": ["grpo", "dr_grpo", "dapo", "rloo"], "cf_kl_coefs": [0.0, 0.05, 0.2], "group_sizes": [4, 8]}
QUICK = {"labels": 24, "kl_coefs": [0.5, 0.05], "ppo_updates": 1, "dpo_betas": [1.0, 0.1], "dpo_steps": 3,
         "dpo_batch": 8, "bon_ns": [1, 2, 4, 8], "eval_prompts": 24, "budgets": [0.1, 1.0],
         "cf_methods": ["grpo", "dr_grpo", "dapo", "rloo"], "cf_kl_coefs": [0.05], "group_sizes": [4]}
CF_NAMES = {"grpo": "GRPO", "dr_grpo": "DrGRPO", "dapo": "DAPO", "rloo": "RLOO"}  # method labels of the points


BROKEN = ("empty", "gibberish", "no_eos")  # behaviour labels of a response that is not an answer at all


def every(k, log=print):
    """A log function that prints every k-th line it is given."""
    count = [0]

    def f(line):
        count[0] += 1
        if count[0] % k == 0:
            log(line)
    return f


def gold_stats(prompts, samples):
    """Mean gold, its standard error and the fraction of broken responses (empty, gibberish or no EOS)."""
    g = np.array([gold(p, s, e) for p, (s, e) in zip(prompts, samples)])
    broken = np.mean([behaviour(p, s, e) in BROKEN for p, (s, e) in zip(prompts, samples)])
    return {"gold": float(g.mean()), "gold_se": float(g.std() / np.sqrt(len(g))), "broken": float(broken)}


def evaluate_policy(policy, run, seed, n):
    """Gold, KL and the rest for one trained policy, on the evaluation prompts (the same for every call)."""
    c = P.compare_policies(policy, run["sft"], run["reward_model"], run["val_prompts"], np.random.default_rng(seed),
                           n=n)
    return {**gold_stats(c["prompts"], c["samples"]), "kl": c["kl_exact"], "kl_k1": c["kl"],
            "score": c["rm_after"], "win_rate": c["win_rate"]["rate"],
            "sft": gold_stats(c["prompts"], c["ref_samples"]),
            "preferred_rate": c["after"]["all"]["preferred_rate"]}


def frontier_at(points, sft_gold, budget):
    """Gold of a method's frontier at a KL budget: linear between (0, sft_gold) and its points sorted by KL,
    keeping the best gold reached at or below each KL; None beyond its largest KL."""
    pts = sorted((p["kl"], p["gold"]) for p in points)
    if not pts or budget > pts[-1][0]:
        return None
    xs, ys = [0.0], [sft_gold]
    for kl, g in pts:
        if kl > xs[-1]:
            xs.append(kl)
            ys.append(max(g, ys[-1]))  # a frontier never falls: spend less KL and keep the better point
    return float(np.interp(budget, xs, ys))


def dpo_puzzle(history, window=20):
    """Mean chosen / rejected log-prob and margin over the first and last `window` logged steps."""
    w = min(window, len(history))

    def mean(key, part):
        return float(np.mean([h[key] for h in part]))
    first, last = history[:w], history[-w:]
    return {k: {"first": mean(k, first), "last": mean(k, last)}
            for k in ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/chosen", "rewards/accuracies")}


def critic_free_config(method, group_size, kl_coef, updates):
    """A preset of minirlhf.grpo at PPO's budget: updates x PPO_BATCH completions, PPO_BATCH / G prompts of G."""
    cfg = grpo.ALGOS[method]
    placement = cfg.kl_placement if kl_coef > 0 else "none"
    if kl_coef > 0 and placement == "none":  # no KL in the paper: GRPO's k3 in the loss
        placement = "loss"
    return replace(cfg, updates=updates, group_size=group_size, prompts_per_update=max(1, P.PPO_BATCH // group_size),
                   lr=P.PPO_LR, kl_coef=kl_coef, kl_placement=placement, kl_loss="k3")


def gao_fit(points, sft_gold, form):
    """Gao et al.'s form fitted to (d = sqrt(KL), gold - SFT gold): alpha, beta, the peak (d, KL, gold), R^2 and
    RMSE; None where there are fewer than 3 points with KL > 0 or the fit fails."""
    pts = [(np.sqrt(p["kl"]), p["gold"] - sft_gold) for p in points if p["kl"] > 1e-6]
    if len(pts) < 3:
        return None
    d, y = np.array(pts).T
    f = (lambda x, a, b: x * (a - b * x)) if form == "bon" else (lambda x, a, b: x * (a - b * np.log(x)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", OptimizeWarning)
            (a, b), _ = curve_fit(f, d, y, p0=(1.0, 0.1), maxfev=10000)
    except (RuntimeError, ValueError, OptimizeWarning):
        return None
    resid, spread = y - f(d, a, b), ((y - y.mean()) ** 2).sum()
    peak = None  # beta <= 0: no peak; a peak at e^700 or beyond: none either
    if b > 0 and (form == "bon" or a / b - 1 < 700):
        peak = float(a / (2 * b)) if form == "bon" else float(np.exp(a / b - 1))
    return {"form": form, "alpha": float(a), "beta": float(b), "n": len(pts),
            "peak_d": peak, "peak_kl": None if peak is None else peak ** 2,
            "peak_gold_gain": None if peak is None else float(f(peak, a, b)),
            "r2": float(1 - (resid ** 2).sum() / spread) if spread > 0 else None,
            "rmse": float(np.sqrt((resid ** 2).mean()))}


def main(argv=None):
    ap = C.parser(__doc__, "python demos/frontier.py")
    ap.add_argument("--labels", type=positive_int, help="prompts of the regenerated preference set for DPO")
    ap.add_argument("--kl-coefs", type=non_negative_float, nargs="+", help="PPO's fixed KL coefficients")
    ap.add_argument("--ppo-updates", type=positive_int, help="PPO updates per run")
    ap.add_argument("--dpo-betas", type=positive_float, nargs="+", help="DPO's betas")
    ap.add_argument("--dpo-steps", type=positive_int, help="DPO steps per run")
    ap.add_argument("--dpo-batch", type=positive_int, help="DPO pairs per step")
    ap.add_argument("--dpo-lr", type=positive_float, help="DPO learning rate")
    ap.add_argument("--bon-ns", type=positive_int, nargs="+", help="best-of-n's n")
    ap.add_argument("--eval-prompts", type=positive_int, help="unseen prompts every method answers")
    ap.add_argument("--budgets", type=positive_float, nargs="+", help="KL budgets (nats) the frontiers are read at")
    ap.add_argument("--cf-methods", nargs="+", choices=sorted(CF_NAMES), help="critic-free presets (minirlhf.grpo)")
    ap.add_argument("--cf-kl-coefs", type=non_negative_float, nargs="+", help="their KL coefficients")
    ap.add_argument("--group-sizes", type=positive_int, nargs="+", help="their group sizes G (at most PPO's batch)")
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    if max(cfg["group_sizes"]) > P.PPO_BATCH or ("rloo" in cfg["cf_methods"] and min(cfg["group_sizes"]) < 2):
        ap.error(f"--group-sizes must lie in [2, {P.PPO_BATCH}] (RLOO needs 2; PPO's batch bounds G)")
    t0 = time.perf_counter()
    run = C.starting_point(args)
    sft, gain = run["sft"], run["reward_model"].gain
    seeds = {name: args.seed * 100 + i for i, name in enumerate(["preferences", "eval", "ppo", "dpo", "bon", "cf"])}

    cmp = P.collect_preferences(sft, run["train_prompts"], cfg["labels"], np.random.default_rng(seeds["preferences"]))
    pairs = preference_pairs(cmp)
    print(f"frontier from {args.run}: {len(run['train_prompts'])} train / {len(run['val_prompts'])} unseen "
          f"prompts; preference set regenerated (seed {seeds['preferences']}): {len(cmp)} prompts x {P.K} SFT "
          f"samples, {len(pairs)} pairs of different ended responses for DPO")
    print(f"the reward model (PPO, best-of-n) is the run's own, trained on the demo's comparisons; "
          f"normalisation gain {gain:.3f}, so PPO kl_coef b matches DPO beta b / {gain:.3f}")
    points, histories = [], {}

    def report(p):
        points.append(p)
        print(f"  -> {p['method']:<4} {p['setting']:<12} gold {p['gold']:+.3f} | kl {p['kl']:.3f} | "
              f"score {p['score']:+.3f} | {p['seconds']:.1f} s", flush=True)

    print("\n== PPO, fixed KL coefficient ==")
    for coef in cfg["kl_coefs"]:
        t = time.perf_counter()
        policy, _ = C.train_policy(run, run["reward_model"], np.random.default_rng(seeds["ppo"]), cfg["ppo_updates"],
                                   P.PPO_LR, coef, log=every(10))
        report({"method": "PPO", "setting": f"kl_coef={coef:g}", "kl_coef": coef,
                **evaluate_policy(policy, run, seeds["eval"], cfg["eval_prompts"]),
                "seconds": time.perf_counter() - t})

    print("\n== DPO on the regenerated preference pairs ==")
    for beta in cfg["dpo_betas"]:
        t = time.perf_counter()
        policy = copy_policy(sft)
        dcfg = DPOConfig(beta=beta, steps=cfg["dpo_steps"], batch_size=cfg["dpo_batch"], lr=cfg["dpo_lr"],
                         warmup_steps=min(10, cfg["dpo_steps"] - 1), log_every=max(1, cfg["dpo_steps"] // 3))
        histories[beta] = train_dpo(policy, sft.params, pairs, dcfg, np.random.default_rng(seeds["dpo"]))
        report({"method": "DPO", "setting": f"beta={beta:g}", "beta": beta,
                **evaluate_policy(policy, run, seeds["eval"], cfg["eval_prompts"]),
                "seconds": time.perf_counter() - t})

    print("\n== best-of-n from the SFT model ==")
    t = time.perf_counter()
    prompts = sample_prompts(run["val_prompts"], cfg["eval_prompts"], np.random.default_rng(seeds["eval"]))
    m = max(cfg["bon_ns"])
    texts = [p.text for p in prompts for _ in range(m)]
    samples = sample_responses(sft, texts, np.random.default_rng(seeds["bon"]))
    scores = score_samples(run["reward_model"], texts, samples).reshape(-1, m)
    golds = np.array([gold(x, s, e) for x, (s, e) in zip(texts, samples)]).reshape(-1, m)
    bon = evaluate_best_of_n(scores, golds, [p.text for p in prompts], cfg["bon_ns"])
    per_prompt = len(prompts) * m / len({p.text for p in prompts})
    print(f"{len(prompts)} prompts x {m} SFT samples; the KL is measured on the pooled samples of each distinct "
          f"prompt ({per_prompt:.0f} on average); {time.perf_counter() - t:.1f} s")
    for n, b in bon.items():
        kept = [samples[i * m + int(np.argmax(scores[i, :n]))] for i in range(len(prompts))]
        report({"method": "BoN", "setting": f"n={n}", "n": n, **gold_stats(prompts, kept),
                "gold_law": b["gold_law"], "kl": b["kl"], "kl_half": b["kl_half"], "kl_bound": b["kl_bound"],
                "score": b["score"], "seconds": 0.0})
        assert points[-1]["gold"] == b["gold"]  # the same draws as evaluate_best_of_n's

    print(f"\n== critic-free, PPO's budget ({cfg['ppo_updates']} updates of {P.PPO_BATCH} completions) ==")
    source = grpo.reward_model_source(run["reward_model"])
    for method in cfg["cf_methods"]:
        for G in cfg["group_sizes"]:
            for coef in cfg["cf_kl_coefs"]:
                t = time.perf_counter()
                policy = copy_policy(sft)
                ccfg = critic_free_config(method, G, coef, cfg["ppo_updates"])
                grpo.train_critic_free(policy, sft.params, source, run["train_prompts"], ccfg,
                                       np.random.default_rng(seeds["cf"]), log=every(10))
                report({"method": CF_NAMES[method], "setting": f"G={G},kl={coef:g}", "kl_coef": coef,
                        "group_size": G, **evaluate_policy(policy, run, seeds["eval"], cfg["eval_prompts"]),
                        "seconds": time.perf_counter() - t})

    sft_gold, se = points[0]["sft"]["gold"], float(np.median([p["gold_se"] for p in points]))
    print(f"\n== the frontier: gold against KL(policy || SFT) on {cfg['eval_prompts']} unseen prompts ==\n"
          f"SFT: gold {sft_gold:+.3f} +- {points[0]['sft']['gold_se']:.3f}, "
          f"broken {points[0]['sft']['broken']:.2f} "
          f"(+- one standard error; broken: empty, gibberish or no EOS)")
    print(f"{'method':<6} {'setting':<12} {'gold':>7} {'+-':>5} {'+gold':>7} {'KL':>6} {'+gold/KL':>8} "
          f"{'score':>6} {'broken':>6}  notes")
    for p in points:
        gain_gold = p["gold"] - sft_gold
        rate = f"{gain_gold / p['kl']:8.2f}" if p["kl"] > 1e-3 else f"{'-':>8}"
        notes = (f"KL bound {p['kl_bound']:.3f}, KL from half the samples {p['kl_half']:.3f}, "
                 f"gold of the law {p['gold_law']:+.3f}" if p["method"] == "BoN"
                 else f"k1 {p['kl_k1']:.3f}, win rate {p['win_rate']:.2f}")
        print(f"{p['method']:<6} {p['setting']:<12} {p['gold']:+7.3f} {p['gold_se']:5.3f} {gain_gold:+7.3f} "
              f"{p['kl']:6.3f} {rate} {p['score']:+6.3f} {p['broken']:6.2f}  {notes}")

    methods = ["PPO", "DPO", "BoN"] + [CF_NAMES[m] for m in cfg["cf_methods"]]
    at = {b: {mth: frontier_at([p for p in points if p["method"] == mth], sft_gold, b) for mth in methods}
          for b in cfg["budgets"]}
    print("\nbest gold reached with at most this much KL (each method's points joined by straight lines, from SFT "
          "at KL 0; '-' beyond its largest KL):")
    print(f"{'KL':>6} " + " ".join(f"{mth:>7}" for mth in methods) + "  most gold")
    for b, row in at.items():
        reached = {mth: g for mth, g in row.items() if g is not None}
        print(f"{b:6.2f} " + " ".join(f"{g:+7.3f}" if g is not None else f"{'-':>7}" for g in row.values())
              + f"  {max(reached, key=reached.get) if reached else '-'}")
    common = [b for b, row in at.items() if all(g is not None for g in row.values())]
    mean_at = {mth: float(np.mean([at[b][mth] for b in common])) for mth in methods} if common else {}
    ranking = sorted(mean_at, key=mean_at.get, reverse=True)
    per_nat = {mth: max((p["gold"] - sft_gold) / p["kl"] for p in points if p["method"] == mth and p["kl"] > 1e-3)
               for mth in methods if any(p["method"] == mth and p["kl"] > 1e-3 for p in points)}
    print("steepest single point, gold gained per nat: " + ", ".join(f"{m} {r:+.2f}" for m, r in per_nat.items())
          + " (every frontier is steepest near KL 0, so compare at equal KL, as above)")
    if common:
        lead = mean_at[ranking[0]] - mean_at[ranking[1]]
        answer = (f"{ranking[0]} buys the most gold per nat of KL here: averaged over the budgets all reach "
                  f"({', '.join(f'{b:g}' for b in common)} nats) the frontiers stand "
                  + " > ".join(f"{m} {mean_at[m]:+.3f}" for m in ranking)
                  + f"; its lead over {ranking[1]}, {lead:.3f}, is "
                  + ("larger" if lead > 2 * se else "smaller")
                  + f" than two standard errors of one mean gold ({2 * se:.3f}), a rough yardstick of the noise")
    else:
        answer = "no budget is reached by every method: see the table"
    print("answer: " + answer)

    fits = {mth: gao_fit([p for p in points if p["method"] == mth], sft_gold, "bon" if mth == "BoN" else "rl")
            for mth in methods}
    print("\nGao et al.'s forms fitted to gold gain against d = sqrt(KL) (BoN: d (alpha - beta d); the rest: "
          "d (alpha - beta log d)):")
    for mth, fit in fits.items():
        if fit is None:
            print(f"  {mth:<6} no fit (fewer than 3 points with KL > 0, or no convergence)")
            continue
        peak = ("no peak (beta <= 0)" if fit["peak_d"] is None else
                f"peak at KL {fit['peak_kl']:.3f} with gold gain {fit['peak_gold_gain']:+.3f}")
        r2 = "-" if fit["r2"] is None else f"{fit['r2']:.3f}"
        print(f"  {mth:<6} alpha {fit['alpha']:+.3f} beta {fit['beta']:+.3f} on {fit['n']} points; {peak}; "
              f"R^2 {r2}, RMSE {fit['rmse']:.3f}")

    puzzle = {beta: dpo_puzzle(h) for beta, h in histories.items()}
    print("\nDPO puzzle (mean over the first and last 20 logged steps): chosen log-prob, rejected log-prob, margin")
    for beta, pz in puzzle.items():
        c, r, mg = pz["logps/chosen"], pz["logps/rejected"], pz["rewards/margins"]
        verdict = "chosen FELL while the margin grew" if c["last"] < c["first"] and mg["last"] > mg["first"] else \
            "no fall of the chosen log-prob with a growing margin"
        print(f"  beta {beta:<5g} chosen {c['first']:8.3f} -> {c['last']:8.3f} | rejected {r['first']:8.3f} -> "
              f"{r['last']:8.3f} | margin {mg['first']:+.3f} -> {mg['last']:+.3f}  {verdict}")
    print("  why: the gradient, -beta sigmoid(-u) (grad log pi(y_w) - grad log pi(y_l)), sees only the\n"
          "  difference; a step moves a chosen log-prob by <g_w, sum over pairs of (g_w - g_l)>, negative when\n"
          "  the response resembles those rejected elsewhere, or when g_w and g_l align and the rejected one is\n"
          "  the larger (it grows as the rejected answers fall); the margin grows regardless. Measured in\n"
          "  python demos/dpo_puzzle.py; the derivation is in the docstring of minirlhf/dpo.py.")

    result = {"run": args.run, "settings": cfg, "sft_gold": sft_gold,
              "reward_norm_gain": gain, "pairs": len(pairs), "points": points, "frontier_at": at,
              "frontier_mean": mean_at, "answer": answer, "gao_fits": fits,
              "dpo_history": {str(b): h for b, h in histories.items()},
              "dpo_puzzle": {str(b): v for b, v in puzzle.items()}}
    C.save_figure(args.plot, lambda plt: draw(plt, points, sft_gold, methods))
    return C.finish(args, "frontier", result, t0)


def draw(plt, points, sft_gold, methods, kl_max=4.0):
    """Gold against KL, one line per method: PPO, DPO and best-of-n (each point labelled) on the left, the
    critic-free methods on the right; points beyond kl_max nats are left off the axes and said so."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    left = [m for m in methods if m in ("PPO", "DPO", "BoN")]
    for ax, group in ((axes[0], left), (axes[1], [m for m in methods if m not in left])):
        for mth, marker in zip(group, "os^vDPXh"):
            pts = sorted((p["kl"], p["gold"], p["setting"]) for p in points if p["method"] == mth)
            shown = [q for q in pts if q[0] <= kl_max]
            ax.plot([0] + [k for k, _, _ in shown], [sft_gold] + [g for _, g, _ in shown], marker=marker,
                    label=mth + (f" ({len(pts) - len(shown)} beyond {kl_max:g} nats)" if len(shown) < len(pts)
                                 else ""))
            if ax is axes[0]:
                for k, g, s in shown:
                    ax.annotate(s, (k, g), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(0, kl_max)
        ax.set_xlabel("KL(policy || SFT), nats per response")
        ax.legend(fontsize=8)
    bon = sorted((p["kl_bound"], p["gold"]) for p in points if p["method"] == "BoN")
    axes[0].plot([k for k, _ in bon], [g for _, g in bon], ls=":", color="grey", label="BoN at log n - (n-1)/n")
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("gold score, unseen prompts")
    axes[0].set_title("PPO, DPO, best-of-n")
    axes[1].set_title("critic-free (settings in the JSON)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    C.main_guard(main)
