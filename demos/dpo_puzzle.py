"""The DPO puzzle, measured: the chosen responses' log-probs fall during training while the margin grows.

    python demos/dpo_puzzle.py [--run runs/demo] [--beta 0.1] [--pairs 128] [--json puzzle.json] [--quick]

DPO as demos/frontier.py trains it (the same regenerated preference set and settings), then three looks:

1. The logged history: mean chosen and rejected log-prob and margin, first and last 20 steps.
2. A fixed set of training pairs before and after: how many chosen log-probs fell, and where along the
   response: the tokens the chosen answer shares with the rejected one before they first differ (same
   context, same token: the two pushes cancel exactly, dpo.py), the first differing token (same context,
   different token: this pair's own push raises the chosen token), and the tokens after it.
3. The gradient, at the SFT model and at the end of training (the explanation in dpo.py). With
   g = grad log pi(y | x) over every parameter and D = sum_j sigmoid(-u_j) (g_w,j - g_l,j) (minus the loss
   gradient, up to a positive factor), an SGD step on all the pairs changes pair i's chosen log-prob by
   c <g_w,i, D>, c > 0: its own term sigmoid(-u_i) (|g_w,i|^2 - <g_w,i, g_l,i>) plus the other pairs'
   terms. Adam's first step moves every parameter by lr along sign(D) instead. Printed: how often each
   says "falls", and how often the prediction at the SFT model agrees with what training did.
"""
import time

import _common as C
import numpy as np
from scipy.special import expit

from minirlhf import layers as L
from minirlhf import pipeline as P
from minirlhf import transformer as tf
from minirlhf.cli import positive_float, positive_int
from minirlhf.dpo import (DPOConfig, preference_pairs, sequence_logprobs_backward, sequence_logprobs_forward,
                          train_dpo)
from minirlhf.sft import make_batch

DEFAULTS = {"beta": 0.1, "steps": 300, "pairs": 128, "labels": P.STEPS["default"]["labels"]}
QUICK = {"steps": 3, "pairs": 6, "labels": 24}


def token_logprobs(params, cfg, prompts, responses):
    """Per-token log-probs of each response (EOS last), as a list of 1-D arrays."""
    inputs, targets, mask, real = make_batch(list(zip(prompts, responses)))
    logp, _ = L.token_logprobs_forward(tf.forward(params, cfg, inputs, real)[0], targets)
    return [row[m > 0].astype(np.float64) for row, m in zip(logp, mask)]


def first_difference(a, b):
    """Index of the first token where response texts a and b differ (EOS counts as a token)."""
    a, b = a + "\0", b + "\0"
    return next(i for i in range(min(len(a), len(b))) if a[i] != b[i])


def flat_grad(params, cfg, prompt, response):
    """grad log pi(response | prompt) over every parameter, one float64 vector."""
    _, cache = sequence_logprobs_forward(tf.Policy(params, cfg), [prompt], [response])
    grads = sequence_logprobs_backward(np.ones(1, np.float32), cache)
    return np.concatenate([grads[k].ravel() for k in sorted(grads)]).astype(np.float64)


def first_order(policy, reference, cfg, prompts, ws, ls, beta):
    """The first-order change of each pair's chosen log-prob under one step on all the pairs (module docstring).

    D = sum_j sigmoid(-u_j) (g_w,j - g_l,j) is minus the loss gradient up to a positive factor; the chosen
    log-prob of pair i moves by <g_w,i, D> (SGD): its own term sigmoid(-u_i) (|g_w,i|^2 - <g_w,i, g_l,i>)
    plus the other pairs' terms. Adam's first step follows sign(D) instead.
    """
    gw = np.stack([flat_grad(policy, cfg, p, w) for p, w in zip(prompts, ws)])  # (P, n_params)
    gl = np.stack([flat_grad(policy, cfg, p, l) for p, l in zip(prompts, ls)])
    logp = sequence_logprobs_forward(tf.Policy(policy, cfg), prompts * 2, ws + ls)[0].astype(np.float64)
    ref = sequence_logprobs_forward(tf.Policy(reference, cfg), prompts * 2, ws + ls)[0].astype(np.float64)
    P = len(prompts)
    s = expit(-beta * ((logp[:P] - ref[:P]) - (logp[P:] - ref[P:])))  # sigmoid(-u), (P,)
    D = (s[:, None] * (gw - gl)).sum(axis=0)
    own = s * (np.einsum("ij,ij->i", gw, gw) - np.einsum("ij,ij->i", gw, gl))
    sgd = gw @ D
    norm_w, norm_l = np.linalg.norm(gw, axis=1), np.linalg.norm(gl, axis=1)
    return {"cos_median": float(np.median(np.einsum("ij,ij->i", gw, gl) / norm_w / norm_l)),
            "rejected_grad_larger": float(np.mean(norm_l > norm_w)), "pair_alone": float(np.mean(own < 0)),
            "other_pairs": float(np.mean(sgd - own < 0)), "sgd": float(np.mean(sgd < 0)),
            "adam_first_step": float(np.mean(gw @ np.sign(D) < 0)), "sgd_raw": sgd}


def main(argv=None):
    ap = C.parser(__doc__, "python demos/dpo_puzzle.py")
    ap.add_argument("--beta", type=positive_float, help="DPO beta (default 0.1)")
    ap.add_argument("--steps", type=positive_int, help="DPO steps (default 300, as demos/frontier.py)")
    ap.add_argument("--pairs", type=positive_int, help="training pairs followed before and after (default 128)")
    ap.add_argument("--labels", type=positive_int, help="prompts in the regenerated preference set (the demo's)")
    args = C.parse(ap, argv, QUICK, DEFAULTS)
    t0 = time.perf_counter()
    run = C.starting_point(args)
    policy_sft = run["sft"]
    sft, cfg = policy_sft.params, policy_sft.model_cfg
    # the seeds of demos/frontier.py: the same preference set and the same DPO minibatches
    pairs = preference_pairs(P.collect_preferences(policy_sft, run["train_prompts"], args.labels,
                                                   np.random.default_rng(args.seed * 100)))
    if len(pairs) < max(args.pairs, 16):
        raise ValueError(f"the regenerated preference set has {len(pairs)} pairs, fewer than --pairs {args.pairs} "
                         f"or one DPO batch of 16: raise --labels")
    chosen_idx = np.random.default_rng(args.seed * 100 + 5).choice(len(pairs), args.pairs, replace=False)
    fixed = [pairs[i] for i in chosen_idx]
    prompts, ws, ls = [p for p, _, _ in fixed], [w for _, w, _ in fixed], [l for _, _, l in fixed]

    # 3. the gradient at the SFT model, before any training
    at_sft = first_order(sft, sft, cfg, prompts, ws, ls, args.beta)
    rejected_elsewhere = np.mean([any(q == p and l == w for q, _, l in pairs) for p, w, _ in fixed])

    # 1. train, as demos/frontier.py does
    policy = tf.copy_policy(policy_sft)
    dcfg = DPOConfig(beta=args.beta, steps=args.steps, batch_size=16, lr=1e-4, warmup_steps=min(10, args.steps - 1),
                     log_every=max(1, args.steps // 6))
    history = train_dpo(policy, sft, pairs, dcfg, np.random.default_rng(args.seed * 100 + 3))
    policy = policy.params
    w = min(20, len(history))
    trend = {k: (float(np.mean([h[k] for h in history[:w]])), float(np.mean([h[k] for h in history[-w:]])))
             for k in ("logps/chosen", "logps/rejected", "rewards/margins")}

    # 2. the fixed pairs before and after, token by token
    before_w, after_w = token_logprobs(sft, cfg, prompts, ws), token_logprobs(policy, cfg, prompts, ws)
    before_l, after_l = token_logprobs(sft, cfg, prompts, ls), token_logprobs(policy, cfg, prompts, ls)
    d_chosen = np.array([a.sum() - b.sum() for a, b in zip(after_w, before_w)])
    d_rejected = np.array([a.sum() - b.sum() for a, b in zip(after_l, before_l)])
    parts = np.zeros((len(fixed), 3))  # change in the shared prefix, the first differing token, the rest
    for i, (a, b) in enumerate(zip(after_w, before_w)):
        k = first_difference(ws[i], ls[i])
        d = a - b
        parts[i] = d[:k].sum(), d[k], d[k + 1:].sum()
    fell = d_chosen < 0
    at_end = first_order(policy, sft, cfg, prompts, ws, ls, args.beta)

    print(f"\n== 1. the logged history (beta {args.beta}, mean over the first and last {w} steps) ==")
    for k, (a, b) in trend.items():
        print(f"  {k:<16} {a:+9.3f} -> {b:+9.3f}")
    print(f"\n== 2. {len(fixed)} fixed training pairs, before -> after ==")
    print(f"  chosen log-prob   {np.mean([b.sum() for b in before_w]):+8.3f} -> "
          f"{np.mean([a.sum() for a in after_w]):+8.3f}"
          f"   (fell for {fell.mean():.0%} of the pairs)")
    print(f"  rejected log-prob {np.mean([b.sum() for b in before_l]):+8.3f} -> "
          f"{np.mean([a.sum() for a in after_l]):+8.3f}"
          f"   (fell for {np.mean(d_rejected < 0):.0%})")
    print(f"  log-ratio margin h grew for {np.mean(d_chosen - d_rejected > 0):.0%} of the pairs, by "
          f"{np.mean(d_chosen - d_rejected):+.3f} nats on average")
    print(f"  where the chosen log-prob changed (mean over pairs): shared prefix {parts[:, 0].mean():+.3f}, first "
          f"differing token {parts[:, 1].mean():+.3f}, after it {parts[:, 2].mean():+.3f}")
    print("\n== 3. the gradient, to first order: which chosen log-probs would one more step lower? ==")
    print(f"  {len(fixed)} pairs; their chosen response is the rejected one of another training pair "
          f"(same prompt) for {rejected_elsewhere:.0%}")
    print(f"  {'at':<14} {'cos(g_w,g_l)':>12} {'|g_l|>|g_w|':>11} {'pair alone':>10} {'other pairs':>11} "
          f"{'all (SGD)':>9} {'sign step':>11}")
    for name, fo in (("the SFT model", at_sft), ("the end", at_end)):
        print(f"  {name:<14} {fo['cos_median']:12.2f} {fo['rejected_grad_larger']:11.0%} {fo['pair_alone']:10.0%} "
              f"{fo['other_pairs']:11.0%} {fo['sgd']:9.0%} {fo['adam_first_step']:11.0%}")
    print("  (cos: median; the last four: fraction of pairs whose chosen log-prob the step lowers, from the\n"
          "  pair's own term, from the other pairs' terms, from both, and along sign(D), Adam's first step)")
    print(f"  agreement of the SGD prediction at the SFT model with what training did: "
          f"{np.mean((at_sft['sgd_raw'] < 0) == fell):.0%}")
    result = {"beta": args.beta, "steps": args.steps, "pairs": len(fixed), "history_trend": trend,
              "chosen_fell": float(fell.mean()), "rejected_fell": float(np.mean(d_rejected < 0)),
              "d_chosen": float(d_chosen.mean()), "d_rejected": float(d_rejected.mean()),
              "d_chosen_parts": dict(zip(["shared_prefix", "first_difference", "after"], parts.mean(0).tolist())),
              "chosen_rejected_elsewhere": float(rejected_elsewhere),
              "first_order": {name: {k: v for k, v in fo.items() if k != "sgd_raw"}
                              for name, fo in (("sft", at_sft), ("end", at_end))}}
    C.save_figure(args.plot, lambda plt: draw(plt, history, args.beta))
    return C.finish(args, "dpo_puzzle", result, t0)


def draw(plt, history, beta):
    """The logged chosen and rejected log-probs (left) and the margin (right) over DPO's steps."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [h["step"] for h in history]
    a.plot(steps, [h["logps/chosen"] for h in history], label="chosen")
    a.plot(steps, [h["logps/rejected"] for h in history], label="rejected")
    a.set(xlabel="DPO step", ylabel="mean log-prob of the batch's responses", title=f"log-probs (beta {beta:g})")
    a.legend()
    b.plot(steps, [h["rewards/margins"] for h in history], color="C2")
    b.set(xlabel="DPO step", ylabel="beta h, mean over the batch", title="the margin grows")
    return fig


if __name__ == "__main__":
    C.main_guard(main)
