"""Exact KL and the exact policy gradient, by enumerating every response a tiny transformer can produce.

Responses to the prompt BOS are sequences y = y_1 .. y_n that stop at the first EOS or after H tokens;
with V token ids (EOS among them, PAD and BOS sampleable like any other id, as in transformer.generate)
there are S = sum_{n=1..H} (V-1)^(n-1) + (V-1)^H of them: 40 for V = 4, H = 3. The probabilities
pi(y) = prod_t softmax(logits_t / tau)[y_t] sum to 1 over these S, so every expectation over rollouts
is a finite sum, computed exactly:

    KL(pi || pi_ref) = sum_y pi(y) (log pi(y) - log pi_ref(y))                      sequence-level KL
    J(theta)         = sum_y pi(y) (R(y) - beta (log pi(y) - log pi_ref(y)))          the RLHF objective
    grad J           = sum_y pi(y) (R(y) - beta k1(y)) grad log pi(y),   k1(y) = log pi(y) - log pi_ref(y)

(grad pi = pi grad log pi; the KL's own term -beta sum_y pi grad log pi = -beta grad sum_y pi = 0.)
A Monte-Carlo estimator is a function f(y) of one rollout, averaged over N rollouts; its exact mean and
variance are sum_y pi(y) f(y) and sum_y pi(y) |f(y) - mean|^2. The estimators here:

  k1, k2, k3 summed over a rollout's tokens (kl.kl_estimators). sum k1 = log pi(y) - log pi_ref(y), so
    E[sum k1] = KL; E[sum k3] = KL as well, because E[r_t - 1 | y_<t] = sum_v pi_ref(v | y_<t) - 1 = 0 at
    every step; E[sum k2] != KL (biased).
  REINFORCE: f(y) = (R(y) - beta sum_t k1_t) grad log pi(y): unbiased by the formula for grad J. With k3
    in the reward instead, f = (R - beta sum k3) grad log pi(y) is biased (kl.py's docstring says why).
  PPO's first step (ratio exactly 1): the clipped loss's gradient is -(1/N_tok) sum_{b,t} A_bt grad log
    pi(y_bt | y_b,<t) with token rewards r_t = -beta k1_t + R(y) on EOS (kl.token_rewards) and GAE
    advantages (ppo_objective.gae). Undoing the token mean (times N_tok / N rollouts) gives
    f(y) = sum_t A_t grad log pi(y_t | y_<t). Its mean is grad J for any lambda when V is the true value
    V^pi(y_<t) = E[sum_{s >= t} r_s | y_<t] (then E[delta_t | y_<=t] is the true advantage), and for
    lambda = 1 with any V of the prefix alone (a baseline); V = 0 with lambda < 1 is biased. Whitening
    (a batch-dependent scale) makes it biased too and is left out.
"""
import argparse
import itertools
import json

import numpy as np
from scipy import stats

from . import layers as L
from . import transformer as tf
from .cli import existing_file, non_negative_int, output_file
from .kl import kl_estimators, token_rewards
from .ppo_objective import gae, policy_loss_backward, policy_loss_forward
from .tokenizer import BOS, EOS, PAD

V, H = 4, 3  # vocabulary (PAD, BOS, EOS, one text token) and the longest response
EXACT_MODEL = tf.GPTConfig(vocab_size=V, n_ctx=H + 1, n_layer=1, n_head=2, n_embd=8)  # BOS + H response tokens
KL_COEF = 0.1  # KL coefficient of the objective


def responses(vocab_size=V, horizon=H):
    """Every response to BOS: tokens (S, H) with PAD after the end, mask (S, H), ended (S,); by length."""
    others = [v for v in range(vocab_size) if v != EOS]
    rows = [list(body) + [EOS] for n in range(horizon) for body in itertools.product(others, repeat=n)]
    rows += [list(body) for body in itertools.product(others, repeat=horizon)]  # no EOS: cut at H
    tokens = np.full((len(rows), horizon), PAD, np.int64)
    mask = np.zeros((len(rows), horizon), np.int64)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    return tokens, mask, (tokens == EOS).any(axis=1)


def token_logprobs(params, model_cfg, tokens, mask, temperature=1.0):
    """log pi(y_t | BOS, y_<t) (S, H), 0 at padding, and the caches that `backprop` needs."""
    seq = np.hstack([np.full((len(tokens), 1), BOS), tokens])  # BOS y_1 .. y_H, right-padded
    seq_mask = np.hstack([np.ones((len(tokens), 1), np.int64), mask])
    logits, cache = tf.forward(params, model_cfg, seq, seq_mask)
    logp, lcache = L.token_logprobs_forward(logits[:, :-1], tokens, temperature)  # position t predicts y_t+1
    return logp * mask, (cache, lcache, mask)


def backprop(dlogp, caches):
    """Gradient of sum(dlogp * logp) with respect to the policy's parameters, dlogp (S, H) per token."""
    cache, lcache, mask = caches
    dz = L.token_logprobs_backward(dlogp * mask, lcache)  # (S, H, V)
    dlogits = np.zeros((dz.shape[0], dz.shape[1] + 1, dz.shape[2]))
    dlogits[:, :-1] = dz
    return tf.backward(dlogits, cache)


def default_reward(tokens, mask, ended):
    """R(y): +1 for each text token (id 3), +0.5 for stopping with EOS; a response with no EOS gets the
    fixed score -1 instead (reward.NO_EOS_SCORE)."""
    return np.where(ended, ((tokens == 3) & (mask > 0)).sum(axis=1) + 0.5, -1.0)


def enumerate_all(policy, reference, model_cfg=EXACT_MODEL, reward=default_reward, kl_coef=KL_COEF, temperature=1.0,
                  horizon=H):
    """Every response with its probability, log-probs, score and KL terms; the exact KL and objective."""
    tokens, mask, ended = responses(model_cfg.vocab_size, horizon)
    logp, caches = token_logprobs(policy, model_cfg, tokens, mask, temperature)
    logp_ref, _ = token_logprobs(reference, model_cfg, tokens, mask, temperature)
    p = np.exp(logp.sum(axis=1))  # (S,) pi(y)
    k1 = logp.sum(axis=1) - logp_ref.sum(axis=1)  # (S,) log pi(y) - log pi_ref(y)
    scores = reward(tokens, mask, ended)
    return {"tokens": tokens, "mask": mask, "ended": ended, "p": p, "logp": logp, "logp_ref": logp_ref,
            "scores": scores, "kl_coef": kl_coef, "caches": caches, "kl": float(p @ k1),
            "objective": float(p @ (scores - kl_coef * k1))}


def exact_gradient(world):
    """grad J = sum_y pi(y) (R(y) - beta k1(y)) grad log pi(y): REINFORCE's per-token weights under pi."""
    return backprop(reinforce_weights(world, world["p"]), world["caches"])


def reinforce_weights(world, w, kl_term="k1"):
    """Per-token dlogp of the REINFORCE estimate with row weights w (1/N per sample, or pi(y) for its mean):
    w_y (R(y) - beta sum_t k_t) at every valid token, k = k1 (the reward's) or k3 (biased)."""
    k = kl_estimators(world["logp"], world["logp_ref"], world["mask"])[kl_term + "_sum"]
    return (w * (world["scores"] - world["kl_coef"] * k))[:, None] * world["mask"]


def true_values(world):
    """V^pi(y_<t) = E[sum_{s >= t} r_s | y_<t] at each response position (S, H), r_s the token rewards."""
    r, _ = token_rewards(world["scores"], world["logp"], world["logp_ref"], world["mask"], world["kl_coef"])
    to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]  # (S, H) reward-to-go from position t
    num, den = {}, {}
    for s, t in zip(*np.nonzero(world["mask"])):
        prefix = tuple(world["tokens"][s, :t])
        num[prefix] = num.get(prefix, 0.0) + world["p"][s] * to_go[s, t]
        den[prefix] = den.get(prefix, 0.0) + world["p"][s]
    values = np.zeros(r.shape)
    for s, t in zip(*np.nonzero(world["mask"])):
        prefix = tuple(world["tokens"][s, :t])
        values[s, t] = num[prefix] / den[prefix]
    return values


def ppo_weights(world, w, values, lam):
    """Per-token dlogp of PPO's first-step estimate with row weights w: rewards, GAE (gamma 1), the clipped
    loss at ratio 1 and its backward, exactly as ppo.py runs them; the loss's token mean is undone."""
    mask = world["mask"]
    rewards, _ = token_rewards(world["scores"], world["logp"], world["logp_ref"], mask, world["kl_coef"])
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=lam)
    _, cache = policy_loss_forward(world["logp"], world["logp"], advantages, mask)  # logp_old = logp: ratio 1
    dlogp = policy_loss_backward(1.0, cache)  # -A / N_tok: the gradient of the loss we minimise
    return -dlogp * mask.sum() * w[:, None]


def flat(grads, order=None):
    """A parameter dict as one vector, in the order of its keys (or of the keys of `order`)."""
    return np.concatenate([np.asarray(grads[k]).ravel() for k in (order if order is not None else grads)])


def per_response(world, weights_fn):
    """F (S, P): row y is f(y), the estimator's value on a batch holding only response y."""
    dlogp = weights_fn(np.ones(len(world["p"])))  # weights are linear in w: one row at a time below
    return np.stack([flat(backprop(dlogp * (np.arange(len(dlogp)) == s)[:, None], world["caches"]))
                     for s in range(len(dlogp))])


def sample(policy, model_cfg, n, rng, temperature=1.0, horizon=H):
    """n rollouts from transformer.generate, as indices into responses(); the sampler itself, KV cache and all."""
    out = tf.generate(policy, model_cfg, np.full((n, 1), BOS), np.ones((n, 1), np.int64), horizon, rng, temperature)
    tokens = np.full((n, horizon), PAD, np.int64)
    tokens[:, :out["tokens"].shape[1]] = out["tokens"]
    mask = np.zeros((n, horizon), np.int64)
    mask[:, :out["mask"].shape[1]] = out["mask"]
    index = {tuple(t[m > 0]): i for i, (t, m) in enumerate(zip(*responses(model_cfg.vocab_size, horizon)[:2]))}
    return np.array([index[tuple(t[m > 0])] for t, m in zip(tokens, mask)])


def models(seed=0, gap=0.1):
    """A policy and a reference near it (the reference plus N(0, gap^2) noise), float64."""
    rng = np.random.default_rng(seed)
    reference = {k: v + 0.5 * rng.standard_normal(v.shape)  # a wide init: every path carries signal
                 for k, v in tf.init_params(EXACT_MODEL, rng, np.float64).items()}
    rng = np.random.default_rng(seed + 1)
    return {k: v + gap * rng.standard_normal(v.shape) for k, v in reference.items()}, reference


def report(seed=0, sizes=(100, 1000, 10000, 100000), temperature=1.0):
    """Exact KL and gradient, each estimator's exact mean and variance, and Monte-Carlo means from
    transformer.generate at each sample size (nested prefixes of one sample of max(sizes) rollouts)."""
    policy, reference = models(seed)
    world = enumerate_all(policy, reference, temperature=temperature)
    idx = sample(policy, EXACT_MODEL, max(sizes), np.random.default_rng(seed + 2), temperature)
    counts = np.bincount(idx, minlength=len(world["p"]))
    chi2 = stats.chisquare(counts, world["p"] * len(idx))
    out = {"S": len(world["p"]), "kl_exact": world["kl"], "objective": world["objective"],
           "sampler_chi2_pvalue": float(chi2.pvalue), "kl": {}, "gradient": {}}
    k = kl_estimators(world["logp"], world["logp_ref"], world["mask"])
    for name in ("k1", "k2", "k3"):
        f = k[name + "_sum"]
        mean, var = float(world["p"] @ f), float(world["p"] @ (f - world["p"] @ f) ** 2)
        out["kl"][name] = {"mean": mean, "bias": mean - world["kl"], "variance": var,
                           "mc_mean": {n: float(f[idx[:n]].mean()) for n in sizes},
                           "z": {n: float((f[idx[:n]].mean() - world["kl"]) / np.sqrt(var / n)) for n in sizes}}
    g = flat(exact_gradient(world))
    V_true = true_values(world)
    estimators = {"reinforce_k1": lambda w: reinforce_weights(world, w),
                  "reinforce_k3": lambda w: reinforce_weights(world, w, "k3"),
                  "ppo_true_values_lam0.95": lambda w: ppo_weights(world, w, V_true, 0.95),
                  "ppo_zero_values_lam1": lambda w: ppo_weights(world, w, np.zeros_like(V_true), 1.0),
                  "ppo_zero_values_lam0.95": lambda w: ppo_weights(world, w, np.zeros_like(V_true), 0.95)}
    for name, fn in estimators.items():
        F = per_response(world, fn)
        mean = world["p"] @ F
        trace_var = float(world["p"] @ ((F - mean) ** 2).sum(axis=1))
        u = g / np.linalg.norm(g)  # the exact gradient's direction: a scalar projection for a z-test
        proj_sd = np.sqrt(world["p"] @ (F @ u - mean @ u) ** 2)
        mc = {n: np.bincount(idx[:n], minlength=len(F)) @ F / n for n in sizes}
        out["gradient"][name] = {
            "relative_bias": float(np.linalg.norm(mean - g) / np.linalg.norm(g)), "trace_variance": trace_var,
            "relative_error": {n: float(np.linalg.norm(m - g) / np.linalg.norm(g)) for n, m in mc.items()},
            "predicted_error": {n: float(np.sqrt(trace_var / n) / np.linalg.norm(g)) for n in sizes},
            "z_along_gradient": {n: float((m @ u - g @ u) / (proj_sd / np.sqrt(n))) for n, m in mc.items()}}
    out["gradient_norm"] = float(np.linalg.norm(g))
    return out


# ---------------------------------------------------------------- a port's estimators against exact expectations

PORT_PROTOCOL = """A port provides any of these functions (a Python file that defines them, given to --port), on the
tiny model EXACT_MODEL (vocab 4: PAD, BOS, EOS and one text token; 1 layer, 2 heads, n_embd 8), parameters
by minirlhf's names (transformer.py), responses to the prompt BOS of at most H = 3 tokens, 0 / PAD after EOS:
  sample(params, n, seed, temperature) -> (tokens, mask)     n sampled responses, (n, H) each
  logprobs(params, tokens, mask, temperature) -> (S, H)      log pi(y_t | BOS, y_<t) at tau, 0 at padding
  kl_estimators(logp, logp_ref, mask) -> {"k1", "k2", "k3"}  per-token estimators, (S, H) each
  policy_gradient(params, reference, tokens, mask, scores, kl_coef, temperature) -> {name: gradient}
      the port's estimate of grad J (the ascent direction) from a batch of responses with their scores R(y):
      an average over the batch of one term per response, as REINFORCE with k1 in the reward is (a PPO port:
      its loss's gradient at ratio 1, negated and times the batch's tokens over its responses)."""


def check_port(port, seed=0, temperatures=(1.0, 0.7), n=20000, alpha=1e-6):
    """{check: result} of a port's functions (PORT_PROTOCOL) against exact expectations at each temperature:
    the sampler's law (chi-square at level alpha over every response), the log-probs of every response, the
    exact means of the summed KL estimators (k1 and k3 unbiased for the KL, k2 not), and the exact mean of
    the policy-gradient estimator against grad J. Each result: {"ok", what was measured}."""
    policy, reference = models(seed)
    results = {}
    for tau in temperatures:
        world = enumerate_all(policy, reference, temperature=tau)
        tokens, mask, p = world["tokens"], world["mask"], world["p"]
        if hasattr(port, "sample"):
            t, m = (np.asarray(x) for x in port.sample(policy, n, seed + 2, tau))
            index = {tuple(row[r > 0]): i for i, (row, r) in enumerate(zip(tokens, mask))}
            counts = np.bincount([index[tuple(row[r > 0])] for row, r in zip(t, m)], minlength=len(p))
            pvalue = chi_square_p(counts, p * n)
            results[f"sampler law, tau {tau}"] = {"ok": pvalue > alpha, "chi2_pvalue": pvalue}
        logp, logp_ref = world["logp"], world["logp_ref"]
        if hasattr(port, "logprobs"):
            theirs = np.asarray(port.logprobs(policy, tokens, mask, tau))
            err = float(np.abs(np.where(mask > 0, theirs - logp, 0)).max())
            results[f"log-probs, tau {tau}"] = {"ok": err < 1e-10, "max_abs_error": err}
        if hasattr(port, "kl_estimators"):
            ours = kl_estimators(logp, logp_ref, mask)
            k = port.kl_estimators(logp=logp, logp_ref=logp_ref, mask=mask)
            for name in ("k1", "k2", "k3"):
                mean = float(p @ np.where(mask > 0, np.asarray(k[name]), 0).sum(1))
                expected = float(p @ ours[name + "_sum"])  # k1, k3: the KL itself; k2: its known bias
                results[f"{name} mean, tau {tau}"] = {"ok": abs(mean - expected) < 1e-12, "exact_mean": mean,
                                                      "kl": world["kl"], "bias": mean - world["kl"]}
        if hasattr(port, "policy_gradient"):
            g = flat(exact_gradient(world))
            F = np.stack([flat(port.policy_gradient(policy, reference, tokens[s:s + 1], mask[s:s + 1],
                                                    world["scores"][s:s + 1], world["kl_coef"], tau), order=policy)
                          for s in range(len(p))])
            bias = float(np.linalg.norm(p @ F - g) / np.linalg.norm(g))
            results[f"policy gradient mean, tau {tau}"] = {"ok": bias < 1e-9, "relative_bias": bias}
    return results


def chi_square_p(observed, expected):
    """The chi-square test's p-value of counts against expected counts (same total), the cells expected to
    hold fewer than 5 draws pooled into one, and that pool into the next cell while it is still under 5: the
    test's chi-square approximation needs it (one draw of a response expected 0.01 times is not evidence)."""
    if np.shape(observed) != np.shape(expected) or np.ndim(expected) != 1:
        raise ValueError(f"observed {np.shape(observed)} and expected {np.shape(expected)} counts must be 1-D of one "
                         f"length, one per outcome")
    order = np.argsort(expected, kind="stable")
    expected, observed = np.asarray(expected, np.float64)[order], np.asarray(observed, np.float64)[order]
    k = int(np.searchsorted(np.cumsum(expected), 5.0, side="right")) + 1  # the smallest cells, pooled, reach 5
    k = max(k, int((expected < 5).sum()))
    expected = np.append(expected[:k].sum(), expected[k:])
    observed = np.append(observed[:k].sum(), observed[k:])
    return float(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


def minirlhf_port():
    """minirlhf itself in PORT_PROTOCOL, the reference a port is measured against (and a test of the check)."""
    from types import SimpleNamespace

    def sample_tokens(params, n, seed, temperature):
        idx = sample(params, EXACT_MODEL, n, np.random.default_rng(seed), temperature)
        tokens, mask, _ = responses()
        return tokens[idx], mask[idx]

    def policy_gradient(params, reference, tokens, mask, scores, kl_coef, temperature):
        logp, caches = token_logprobs(params, EXACT_MODEL, tokens, mask, temperature)
        logp_ref, _ = token_logprobs(reference, EXACT_MODEL, tokens, mask, temperature)
        k1 = kl_estimators(logp, logp_ref, mask)["k1_sum"]
        return backprop(((scores - kl_coef * k1) / len(tokens))[:, None] * mask, caches)
    return SimpleNamespace(sample=sample_tokens, policy_gradient=policy_gradient,
                           logprobs=lambda params, tokens, mask, temperature: token_logprobs(
                               params, EXACT_MODEL, tokens, mask, temperature)[0],
                           kl_estimators=lambda logp, logp_ref, mask: {k: v for k, v in kl_estimators(
                               logp, logp_ref, mask).items() if k in ("k1", "k2", "k3")})


def port_file(path):
    """--port's type: an existing Python file (importlib can load nothing else)."""
    existing_file(path)
    if not path.endswith(".py"):
        raise argparse.ArgumentTypeError(f"{path!r} is not a Python file (.py)")
    return path


def load_port(path):
    """The module a port's file defines (importlib), for check_port."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("minirlhf_port_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minirlhf.exact", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Exact KL and policy gradient by enumeration, and the estimators; "
                                             "with --port, a port's estimators against them.\n\n" + PORT_PROTOCOL)
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seed of the models and samples (default 0)")
    ap.add_argument("--json", type=output_file, help="write the results here")
    ap.add_argument("--port", type=port_file,
                    help="a Python file defining the port's functions (the protocol above)")
    args = ap.parse_args(argv)
    if args.port:
        results = check_port(load_port(args.port), args.seed)
        for name, r in results.items():
            print(f"{'ok    ' if r['ok'] else 'FAILED'} {name:36s} " + ", ".join(
                f"{k} {v:.3g}" for k, v in r.items() if k != "ok"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0 if all(r["ok"] for r in results.values()) else 1
    r = report(args.seed)
    print(f"{r['S']} responses | exact KL {r['kl_exact']:.6f} | objective {r['objective']:+.6f} | "
          f"sampler chi-square p {r['sampler_chi2_pvalue']:.3f}")
    sizes = ", ".join(map(str, r["kl"]["k1"]["mc_mean"]))
    print(f"estimator | exact mean | bias      | variance | MC mean at N = {sizes}")
    for name, e in r["kl"].items():
        print(f"{name:9s} | {e['mean']:.6f}   | {e['bias']:+.2e} | {e['variance']:.5f}  | "
              + ", ".join(f"{m:.5f}" for m in e["mc_mean"].values()))
    print(f"gradient |g| = {r['gradient_norm']:.5f}; relative error of the MC mean at N = {sizes}")
    for name, e in r["gradient"].items():
        print(f"{name:24s} | bias {e['relative_bias']:.2e} | tr var {e['trace_variance']:.4f} | "
              + ", ".join(f"{x:.4f}" for x in e["relative_error"].values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
