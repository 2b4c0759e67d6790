"""Exact expectations of the critic-free estimators, by enumerating every response of exact.py's tiny model.

exact.py lists all S = 40 responses y of its model (V = 4, up to H = 3 tokens) with their probabilities
pi(y); any expectation over rollouts is then a finite sum, and E_y[sum_t w_t(y) grad log pi(y_t | y_<t)] is
one backward pass with per-token weights pi(y) w_t(y) (`expected_gradient`). Two questions, both as numbers.

1. Where the KL goes. The target is the gradient of the sequence reverse KL (Tang and Munos 2025,
   arXiv 2506.09477):  grad KL(pi || pi_ref) = E[sum_t grad log pi(y_t) sum_{s >= t} delta_s],
   delta_s = log pi(y_s) - log pi_ref(y_s). What each placement's expected gradient is (grpo_objective.py's
   backward of each estimator, samples held fixed; exact values, not Monte Carlo):
     k1 in the loss             E[sum_t grad log pi_t] = 0: no regularisation at all
     k2, rho k3 in the loss     E[sum_t delta_t grad log pi_t]: each context's own reverse-KL gradient, the
                                contexts held fixed ("the per-token part"), missing the future deltas
     k3 in the loss             E[sum_t (1 - pi_ref / pi)_t grad log pi_t] = sum over contexts of the
                                gradient of the per-context forward KL(pi_ref || pi), contexts from pi
     k1 in the reward           to-go (REINFORCE++) or summed per sequence (RLOO): the true gradient
   The per-context references are computed independently, from the logits (for p = softmax(z / tau) at one
   context: d KL(p || q) / dz = p (log p - log q - KL) / tau, d KL(q || p) / dz = (p - q) / tau).

2. Aggregators at group size G. A group is G independent responses of the same prompt; the expected update
   of a method is E[sum_i c_i A_i grad log pi(y_i)] (the negative loss gradient on policy, grpo_objective.py;
   c_i is the same on every token of y_i for all four aggregators). By symmetry it is
   G sum_y pi(y) E[c_1 A_1 | y_1 = y] grad log pi(y), and c_1 A_1 depends on the group only through the
   rewards and lengths, so the other G - 1 members are enumerated as multisets of (reward, length) atoms
   with their multinomial probabilities: an exact expectation, not a sample (`group_weights`; a test checks
   it against enumerating all S^G ordered groups for G = 2). The true gradient of expected reward is
   sum_y pi(y) R(y) grad log pi(y). Reported per method: the cosine to the true gradient; the relative bias
   left after the best rescaling (0 means "unbiased up to a constant"); and the rates of change of E[L], of
   E[L | wrong] and of E[R] along a unit step in the method's direction: the length bias (GRPO's 1/L_i) as
   a number. Dr. GRPO's expectation is (1 - 1/G) / L_max times the true gradient and RLOO's exactly it.
   The std normalisation's difficulty bias: binary tasks of success probability p (the same model, each
   task its own group) each get their gradient scaled by E[1 / std]-like factors, about 1 / sqrt(p (1-p));
   the table gives the measured scale of each task against the unnormalised advantage's.
   Within one prompt and a binary reward the std changes only the scale: E[A_1 | y_1] takes two values h(1),
   h(0) with p h(1) + (1 - p) h(0) = 0 for any advantage that sums to 0 over the group, so the update is
   (h(1) - h(0)) times the same vector; GRPO's bias there is its 1/L_i alone, whatever G.

Measured (seed 0; reward 1 for a right answer, p = 0.073): along a unit step of GRPO's expected update the
mean length of wrong answers grows by 0.85 where the true gradient's shrinks it by 1.16 (cosine 0.869 to the
true gradient, at every G); the token mean is in between and nears the truth as G grows (cosine 0.987,
0.996, 0.999 at G = 2, 4, 8); Dr. GRPO and RLOO agree with the truth to 1e-15. The std weights a task of
p = 0.005 by 2.81 and one of p = 0.38 by 2.03 at G = 8 (3.92 and 2.05 at G = 16). KL: the per-token part
(k2, rho k3) is 0.170 away from the true gradient, k3's forward-KL gradient 0.201, relative.

`python -m minirlhf.exact_rl` prints both tables.
"""
import argparse
import itertools
from math import factorial

import numpy as np

from . import exact as E
from . import grpo_objective as go
from . import layers as L
from . import transformer as tf
from .kl import kl_estimators, token_rewards

GROUP_METHODS = {  # name: (advantage, aggregator)
    "grpo": ("grpo", "seq_mean_token_mean"), "dr_grpo": ("dr_grpo", "constant"), "dapo": ("grpo", "token_mean"),
    "rloo": ("rloo", "seq_sum"), "grpo_no_std": ("dr_grpo", "seq_mean_token_mean"),
    "grpo_constant_norm": ("grpo", "constant")}
ADVANTAGE = {"grpo": go.grpo_advantages, "dr_grpo": go.dr_grpo_advantages, "rloo": go.rloo_advantages}


def expected_gradient(world, dlogp):
    """E_y[sum_t dlogp[y, t] grad log pi(y_t | y_<t)] as one vector; dlogp (S, H) per-token weights."""
    return E.flat(E.backprop(world["p"][:, None] * dlogp * world["mask"], world["caches"]))


def answer_reward(tokens, mask, ended):
    """1.0 for a response that ended and whose first token is the text token (id 3): a right answer of
    length 2 or 3; 0.0 otherwise (wrong answers of length 1 to 3, and every response without EOS)."""
    return (ended & (tokens[:, 0] == 3)).astype(np.float64)


def rel(a, b):
    """||a - b|| / ||b||."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- 1. where the KL goes

def _context_gradients(policy, reference, world, temperature):
    """The per-context reverse and forward KL gradients, from the logits, summed over pi's contexts."""
    tokens, mask = world["tokens"], world["mask"]
    seq = np.hstack([np.full((len(tokens), 1), E.BOS), tokens])
    seq_mask = np.hstack([np.ones((len(tokens), 1), np.int64), mask])
    logits, cache = tf.forward(policy, E.EXACT_MODEL, seq, seq_mask)
    logits_ref, _ = tf.forward(reference, E.EXACT_MODEL, seq, seq_mask)
    lp = L.log_softmax(logits[:, :-1] / temperature)  # (S, H, V): position t predicts y_t
    lq = L.log_softmax(logits_ref[:, :-1] / temperature)
    p, q = np.exp(lp), np.exp(lq)
    kl = (p * (lp - lq)).sum(-1, keepdims=True)
    weight = (world["p"][:, None] * mask)[..., None] / temperature  # P(context) at each valid position
    out = {}
    for name, dz in (("reverse_per_context", p * (lp - lq - kl)), ("forward_per_context", p - q)):
        dlogits = np.zeros(logits.shape)
        dlogits[:, :-1] = weight * dz
        out[name] = E.flat(tf.backward(dlogits, cache))
    return out


def kl_placements(seed=0, temperature=1.0):
    """{name: expected gradient vector} of each KL placement and of the exact references, on exact.models."""
    policy, reference = E.models(seed)
    world = E.enumerate_all(policy, reference, temperature=temperature)
    logp, logp_ref, mask = world["logp"], world["logp_ref"], world["mask"]
    k1_seq = kl_estimators(logp, logp_ref, mask)["k1_sum"]  # (S,) log pi(y) - log pi_ref(y)
    p_ref = np.exp(logp_ref.sum(1))  # (S,) pi_ref(y)
    g = {"true_reverse_kl": expected_gradient(world, k1_seq[:, None]),
         "sequence_forward_kl": E.flat(E.backprop(-p_ref[:, None] * mask, world["caches"])),
         **_context_gradients(policy, reference, world, temperature)}
    for kind in go.KL_LOSSES:  # the loss's gradient on fixed samples, on policy (logp_old = logp: rho = 1)
        _, cache = go.kl_loss_forward(logp, logp_ref, mask, kind, logp_old=logp)
        g[f"{kind}_loss"] = expected_gradient(world, go.kl_loss_backward(np.ones(mask.shape), cache))
    r, _ = token_rewards(np.zeros(len(mask)), logp, logp_ref, mask, 1.0)  # r_t = -k1_t (beta = 1, no score)
    to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]
    g["k1_reward_to_go"] = expected_gradient(world, -to_go)  # REINFORCE on -beta k1: the loss gradient is -A
    g["k1_reward_sequence"] = expected_gradient(world, np.broadcast_to(k1_seq[:, None], mask.shape))
    return g, world


def kl_table(g):
    """Relative distance of each placement to the true gradient and to the three other references."""
    refs = ("true_reverse_kl", "reverse_per_context", "forward_per_context", "sequence_forward_kl")
    return {name: {"norm_ratio": float(np.linalg.norm(v) / np.linalg.norm(g["true_reverse_kl"])),
                   **{f"to_{r}": rel(v, g[r]) for r in refs}}
            for name, v in g.items() if name.endswith(("_loss", "_reward_to_go", "_reward_sequence"))}


# ---------------------------------------------------------------- 2. aggregators at group size G

def atoms(world, reward):
    """Distinct (reward, length) pairs, their probabilities, and each response's atom."""
    keys = list(zip(reward, world["mask"].sum(1)))
    uniq = sorted(set(keys))
    index = np.array([uniq.index(k) for k in keys])
    return uniq, np.bincount(index, world["p"], minlength=len(uniq)), index


def group_weights(world, reward, method, G):
    """w[a] = E[c_1 A_1 | member 1 has atom a], exact over the other G - 1 members (multisets of atoms)."""
    adv_kind, agg = GROUP_METHODS[method]
    uniq, q, _ = atoms(world, reward)
    K, H = len(uniq), world["mask"].shape[1]
    w, weights = np.zeros(K), {}
    for others in itertools.combinations_with_replacement(range(K), G - 1):
        counts = np.bincount(others, minlength=K)
        prob = factorial(G - 1) / np.prod([factorial(c) for c in counts]) * np.prod(q ** counts)
        members = np.array([[a, *others] for a in range(K)])  # (K, G): member 1 first
        rewards = np.array([[uniq[m][0] for m in row] for row in members])
        adv = ADVANTAGE[adv_kind](rewards)[:, 0]  # (K,) A_1 of each group
        for a, row in enumerate(members):
            lengths = tuple(int(uniq[m][1]) for m in row)
            if (agg, lengths) not in weights:
                mask = (np.arange(H)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
                weights[agg, lengths] = go.token_weights(mask, agg, max_len=H)[0, 0]
            w[a] += prob * weights[agg, lengths] * adv[a]
    return w


def method_gradient(world, reward, method, G):
    """The method's expected update direction, G sum_y pi(y) w[atom(y)] grad log pi(y)."""
    _, _, index = atoms(world, reward)
    w = group_weights(world, reward, method, G)
    return expected_gradient(world, np.broadcast_to((G * w[index])[:, None], world["mask"].shape))


def aggregator_table(G=4, seed=0, reward=answer_reward):
    """Per method: cosine and rescaled bias to the true gradient of E[R]; rates of change of E[R], E[L] and
    E[L | wrong] along a unit step (the true gradient's in the row "true")."""
    policy, reference = E.models(seed)
    world = E.enumerate_all(policy, reference, reward=reward, kl_coef=0.0)
    R, lengths = world["scores"], world["mask"].sum(1).astype(np.float64)
    wrong = (R < R.max()).astype(np.float64)
    true = expected_gradient(world, np.broadcast_to(R[:, None], world["mask"].shape))
    grad_len = expected_gradient(world, np.broadcast_to(lengths[:, None], world["mask"].shape))
    grad_wl = expected_gradient(world, np.broadcast_to((lengths * wrong)[:, None], world["mask"].shape))
    grad_w = expected_gradient(world, np.broadcast_to(wrong[:, None], world["mask"].shape))
    p_w, len_w = world["p"] @ wrong, world["p"] @ (lengths * wrong) / (world["p"] @ wrong)
    grad_len_wrong = (grad_wl - len_w * grad_w) / p_w  # d E[L | wrong] = (d E[L 1w] - E[L | w] d P(w)) / P(w)
    rows = {"true": true}
    rows.update({m: method_gradient(world, R, m, G) for m in GROUP_METHODS})
    out = {}
    for name, g in rows.items():
        u = g / np.linalg.norm(g)
        scale = float(g @ true / (g @ g))
        out[name] = {"cosine": float(u @ true / np.linalg.norm(true)), "rescaled_bias": rel(scale * g, true),
                     "scale": float(g @ true / (true @ true)), "dE[R]": float(u @ true), "dE[L]": float(u @ grad_len),
                     "dE[L|wrong]": float(u @ grad_len_wrong)}
    return {"G": G, "p_right": float(world["p"] @ R), "mean_length": float(world["p"] @ lengths), "rows": out}


TASKS = {  # binary tasks of different difficulty on the same model: 1.0 when the response ...
    "two_text_tokens": lambda t, m, e: e & (t[:, 0] == 3) & (t[:, 1] == 3),  # is "3 3 EOS"
    "starts_with_text": lambda t, m, e: e & (t[:, 0] == 3),  # ended and started with the text token
    "no_eos": lambda t, m, e: ~e,  # never stopped
    "stops_at_once": lambda t, m, e: e & (m.sum(1) == 1),  # is EOS alone
    "ended": lambda t, m, e: e}


def difficulty_table(G=4, seed=0):
    """Per binary task: its success probability p, the std-normalised advantage's scale along the task's true
    gradient relative to the unnormalised one's (both with the constant normaliser), and 1 / sqrt(p (1-p));
    and the cosine of each summed update with the sum of the tasks' true gradients."""
    policy, reference = E.models(seed)
    rows, sums = {}, {"true": 0, "grpo_constant_norm": 0, "dr_grpo": 0}
    for name, f in TASKS.items():
        world = E.enumerate_all(policy, reference, reward=lambda t, m, e: f(t, m, e).astype(np.float64), kl_coef=0.0)
        R = world["scores"]
        true = expected_gradient(world, np.broadcast_to(R[:, None], world["mask"].shape))
        g = {m: method_gradient(world, R, m, G) for m in ("grpo_constant_norm", "dr_grpo")}
        p = float(world["p"] @ R)
        rows[name] = {"p": p, "std_scale": float((g["grpo_constant_norm"] @ true) / (g["dr_grpo"] @ true)),
                      "1/sqrt(p(1-p))": float(1 / np.sqrt(p * (1 - p)))}
        for k, v in (("true", true), *g.items()):
            sums[k] = sums[k] + v
    cos = {k: float(v @ sums["true"] / np.linalg.norm(v) / np.linalg.norm(sums["true"])) for k, v in sums.items()}
    return {"G": G, "tasks": rows, "cosine_of_summed_update": cos}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Exact expected gradients of the critic-free estimators.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 4, 8], help="group sizes G")
    args = ap.parse_args(argv)
    g, world = kl_placements(args.seed)
    print(f"1. where the KL goes: expected gradient of each placement, {len(world['p'])} responses, exact "
          f"KL {world['kl']:.4f}; relative distance ||g - ref|| / ||ref|| to each reference")
    print(f"{'placement':<20} {'|g|/|true|':>10} {'true':>9} {'rev/ctx':>9} {'fwd/ctx':>9} {'fwd seq':>9}")
    for name, r in kl_table(g).items():
        print(f"{name:<20} {r['norm_ratio']:10.4f} " + " ".join(f"{r[k]:9.2e}" for k in (
            "to_true_reverse_kl", "to_reverse_per_context", "to_forward_per_context", "to_sequence_forward_kl")))
    for G in args.groups:
        t = aggregator_table(G, args.seed)
        print(f"\n2. aggregators, G = {G}: reward 1 for a right answer (p = {t['p_right']:.3f}), mean length "
              f"{t['mean_length']:.2f}; rates along a unit step")
        print(f"{'method':<20} {'cosine':>8} {'bias':>9} {'dE[R]':>9} {'dE[L]':>9} {'dE[L|wrong]':>11}")
        for name, r in t["rows"].items():
            print(f"{name:<20} {r['cosine']:8.5f} {r['rescaled_bias']:9.2e} {r['dE[R]']:9.5f} {r['dE[L]']:+9.5f} "
                  f"{r['dE[L|wrong]']:+11.5f}")
        d = difficulty_table(G, args.seed)
        print(f"   difficulty (std normalisation), G = {G}: task, p, scale against no std, 1/sqrt(p(1-p))")
        for name, r in d["tasks"].items():
            print(f"   {name:<18} p {r['p']:.3f}  scale {r['std_scale']:7.3f}  {r['1/sqrt(p(1-p))']:7.3f}")
        print("   cosine of the summed update with the tasks' summed true gradient: " + ", ".join(
            f"{k} {v:.4f}" for k, v in d["cosine_of_summed_update"].items()))


if __name__ == "__main__":
    main()
