"""Direct preference optimisation (DPO) and IPO: learning from preference pairs without a reward model.

The KL-regularised RLHF objective, max_pi E[r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x)), has the closed-form
optimum pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x). Turned around, a policy defines an implicit
reward r = beta log(pi / pi_ref) + beta log Z(x), and in the Bradley-Terry probability of a preference,
sigmoid(r(y_w) - r(y_l)), the unknown log Z(x) cancels. So the policy itself can be fitted to the labels
(Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"):

    h = (logp_w - logp_ref_w) - (logp_l - logp_ref_l)      logp = log pi(y | x), summed over the response
    u = beta h                                               tokens, EOS included (CONVENTIONS.md)
    L_DPO = -log sigmoid(u) = softplus(-u)                   mean over pairs; logaddexp(0, -u): no overflow
    dL/dlogp_w = -beta sigmoid(-u),  dL/dlogp_l = +beta sigmoid(-u)        (per pair, before the mean)

IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences")
regresses h onto a fixed target instead, so a pair that is always won cannot push h to infinity:

    L_IPO = (h - 1 / (2 beta))^2                              dL/dh = 2 (h - 1 / (2 beta))

(TRL's IPO averages the log-probs over response tokens; here both losses use sums, as the reference says.)
The reference log-probs get the opposite gradients (returned for completeness; the reference is frozen).
Logged, with TRL's names: the implicit rewards beta (logp - logp_ref) of chosen and rejected, their margin
beta h, the accuracy (fraction of pairs with margin > 0) and the mean chosen and rejected log-probs.

Through the model. A pair's responses are laid out as `BOS prompt response EOS` (sft.make_batch); the
sequence log-prob is the sum of token log-probs over the response mask, so its gradient is
dlogp_seq * mask at each response token, then layers.token_logprobs_backward and transformer.backward.
Chosen and rejected share one forward pass (TRL's "concatenated forward"). The reference's log-probs are
computed per minibatch on the same arrays (TRL's default), so before the first update u is exactly 0,
the loss exactly ln 2 and the accuracy 0.

The puzzle: chosen log-probs fall while the margin grows. The gradient only ever sees the difference
log pi(y_w) - log pi(y_l); nothing in it holds the level of any log-prob up, and the probability taken from
the rejected responses goes to all other text, not to the chosen ones. With g = grad_theta log pi(y|x) and
D = sum_j sigmoid(-u_j) (g_w,j - g_l,j) (minus the loss gradient, up to a positive factor), one SGD step of
size eta over the pairs moves, to first order,

    d logp_w,i = eta beta / B <g_w,i, D>
               = eta beta / B [ sigmoid(-u_i) (|g_w,i|^2 - <g_w,i, g_l,i>)     the pair's own term
                                + sum_{j != i} sigmoid(-u_j) <g_w,i, g_w,j - g_l,j> ]   the other pairs'
    d h_i      = eta beta / B <g_w,i - g_l,i, D>          (own term sigmoid(-u_i) |g_w,i - g_l,i|^2 >= 0)

so a chosen log-prob falls when its response resembles the responses rejected in other pairs more than
those chosen there, or (own term) when g_w and g_l are aligned and the rejected one is the larger (one
softmax: d log p_y / dz = e_y - p, larger the smaller p_y), "likelihood displacement" (Razin et al. 2024).
Token by token, on a prefix the two answers share (same context, same token) the two pushes of one pair
cancel exactly, and at their first differing token the pair's own push raises the chosen token.
Measured on the demo's preferences (demos/dpo_puzzle.py, beta 0.1, 300 steps, seed 0's demo run; commit
in demos/README.md): the same texts recur, and 93% of the followed chosen responses are rejected in another
pair of the same prompt (a K = 8 ranking makes its middle answers winners and losers; annotator noise flips
pairs). At the SFT model a pair's own step would lower its chosen log-prob for none of the pairs (cos(g_w,
g_l) has median -0.13), the other pairs' steps for 36%. As the rejected answers fall (-3.2 -> -7.9 nats)
their gradients grow and align (at the end: |g_l| > |g_w| for 66%, cos +0.25): the own term lowers the
chosen for 20%, all terms for 81%, and the fall speeds up: logged chosen log-prob -2.62 -> -4.31 while the
margin grows +0.006 -> +0.31.
A larger beta ends it sooner: sigmoid(-u) is small once h ~ 1 / beta (at commit 7231f4d, beta 1: -2.39 ->
-2.63 only).
"""
import time
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from . import layers as L
from . import transformer as tf
from . import validate as V
from .annotator import to_pairs
from .optim import AdamWConfig, adamw_init, adamw_step, lr_schedule
from .sft import make_batch


# ---------------------------------------------------------------- the losses on sequence log-probs

def _log_ratio_gap(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta):
    """h = (logp_w - ref_w) - (logp_l - ref_l), (B,), after checking shapes, finiteness and beta."""
    arrays = {"logp_chosen": logp_chosen, "logp_rejected": logp_rejected, "ref_chosen": ref_chosen,
              "ref_rejected": ref_rejected}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    shapes = {np.shape(v) for v in arrays.values()}
    if len(shapes) != 1 or arrays["logp_chosen"].ndim != 1 or arrays["logp_chosen"].size == 0:
        raise ValueError(f"the four log-prob arrays must be 1-D of one non-zero size (one entry per pair), "
                         f"got shapes { {k: v.shape for k, v in arrays.items()} }")
    for name, x in arrays.items():
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} holds a NaN or inf")
    V.number("dpo loss", "beta", beta, low=0, low_open=True)
    # Each log-ratio first, then their difference: the order of the reference's formula.
    return (arrays["logp_chosen"] - arrays["ref_chosen"]) - (arrays["logp_rejected"] - arrays["ref_rejected"])


def dpo_loss_forward(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta=0.1):
    """Mean over pairs of -log sigmoid(beta h). Inputs (B,) summed sequence log-probs (TRL's argument
    order: policy chosen, policy rejected, reference chosen, reference rejected). cache: u, beta."""
    h = _log_ratio_gap(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta)
    u = h.dtype.type(beta) * h
    loss = np.mean(np.logaddexp(0.0, -u))  # softplus(-u) = -log sigmoid(u), stable for any u
    return float(loss), (u, float(beta))


def dpo_loss_backward(dloss, cache):
    """Undoes L = mean softplus(-u), u = beta h. Returns d(logp_chosen, logp_rejected, ref_chosen,
    ref_rejected): -beta sigmoid(-u) / B * dloss for the chosen, its negative for the rejected."""
    u, beta = cache
    dh = -beta * expit(-u) / u.size * dloss  # d softplus(-u) / du = -sigmoid(-u); du / dh = beta
    dh = dh.astype(u.dtype)
    return dh, -dh, -dh, dh  # h = (logp_w - ref_w) - (logp_l - ref_l)


def ipo_loss_forward(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta=0.1):
    """Mean over pairs of (h - 1 / (2 beta))^2 (Azar et al. 2023). cache: h - target."""
    h = _log_ratio_gap(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta)
    d = h - h.dtype.type(1.0 / (2.0 * beta))  # distance from the target gap
    return float(np.mean(d * d)), (d, float(beta))


def ipo_loss_backward(dloss, cache):
    """Undoes L = mean (h - target)^2. Returns the four gradients, dL/dh = 2 (h - target) / B."""
    d, _ = cache
    dh = (2.0 * d / d.size * dloss).astype(d.dtype)
    return dh, -dh, -dh, dh


LOSSES = {"dpo": (dpo_loss_forward, dpo_loss_backward), "ipo": (ipo_loss_forward, ipo_loss_backward)}


# ---------------------------------------------------------------- sequence log-probs

def sequence_logprob_forward(logits, targets, mask, temperature=1.0):
    """log pi(y) = sum_t mask_t log softmax(z_t / tau)[y_t]: the log-prob of each row's response, summed (not
    averaged) over its mask, the response tokens and EOS. (B, T, V), (B, T), (B, T) -> (B,), cache."""
    mask = np.asarray(mask)
    if mask.shape != np.shape(targets) or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"mask must be a 0/1 array of the targets' shape {np.shape(targets)}, got {mask.shape}")
    empty = np.flatnonzero(~mask.any(axis=1)) if mask.ndim == 2 else []
    if len(empty):  # its log-prob would be 0, as if the response had probability 1
        raise ValueError(f"mask rows {empty.tolist()} have no response token; a response has at least its EOS")
    token_logp, lcache = L.token_logprobs_forward(logits, targets, temperature)  # (B, T)
    mask = mask.astype(token_logp.dtype)
    return (token_logp * mask).sum(axis=1), (lcache, mask)


def sequence_logprob_backward(dlogp, cache):
    """Undoes logp = sum_t mask_t l_t: each response token's logits get dl_t = dlogp mask_t. Returns dlogits."""
    lcache, mask = cache
    return L.token_logprobs_backward(np.asarray(dlogp)[:, None].astype(mask.dtype) * mask, lcache)


def sequence_logprobs_forward(policy, prompts, responses):
    """log pi(response | prompt) summed over the response tokens and EOS, for text lists of one length B,
    pi = softmax(logits / tau) at the policy's sampling temperature (DPO fits what the policy will sample).

    Returns (logp (B,), cache); cache: the policy's forward cache and the sequence log-prob's.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response per prompt and at least one, got {len(prompts)} prompts and "
                         f"{len(responses)} responses")
    inputs, targets, mask, real = make_batch(list(zip(prompts, responses)))  # (B, T-1) each
    logits, tcache = tf.policy_forward(policy, inputs, real)  # (B, T-1, V)
    logp, scache = sequence_logprob_forward(logits, targets, mask, policy.temperature)
    return logp, (tcache, scache)


def sequence_logprobs_backward(dlogp, cache):
    """Undoes sequence_logprobs_forward. Returns the gradients of the policy's trainable arrays."""
    tcache, scache = cache
    return tf.policy_backward(sequence_logprob_backward(dlogp, scache), tcache)


# ---------------------------------------------------------------- one minibatch

def preference_pairs(comparisons):
    """(prompt, chosen, rejected) triples of annotator.to_pairs, without pairs of two identical texts
    (their h is 0 whatever the policy, so they add ln 2 to the loss and nothing to the gradient)."""
    return [(p, w, l) for p, w, l in to_pairs(comparisons) if w != l]


def dpo_loss_and_grads(policy, reference, pairs, beta=0.1, loss="dpo"):
    """The DPO (or IPO) loss of a minibatch of (prompt, chosen, rejected) pairs, the policy's gradients
    and the logged statistics. Chosen and rejected go through one forward pass, 2B sequences.

    policy: the Policy being fitted; reference: the frozen reference's parameters (for a LoRA policy its own
    base), scored at the policy's temperature."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)}")
    B = len(pairs)
    prompts = [p for p, _, _ in pairs] * 2
    responses = [w for _, w, _ in pairs] + [l for _, _, l in pairs]  # chosen rows, then rejected rows
    logp, cache = sequence_logprobs_forward(policy, prompts, responses)  # (2B,)
    frozen = tf.Policy(reference, policy.model_cfg, policy.sampling)  # the same arrays, no copy
    ref = sequence_logprobs_forward(frozen, prompts, responses)[0]  # frozen: no backward
    forward, backward = LOSSES[loss]
    value, lcache = forward(logp[:B], logp[B:], ref[:B], ref[B:], beta)
    if not np.isfinite(value):
        raise ValueError(f"{loss} loss is not finite ({value}); no update applied")
    d_chosen, d_rejected, _, _ = backward(1.0, lcache)
    grads = sequence_logprobs_backward(np.concatenate([d_chosen, d_rejected]), cache)
    lp, rf = logp.astype(np.float64), ref.astype(np.float64)
    r_chosen, r_rejected = beta * (lp[:B] - rf[:B]), beta * (lp[B:] - rf[B:])  # implicit rewards
    margin = r_chosen - r_rejected
    stats = {"loss": value, "rewards/chosen": float(r_chosen.mean()), "rewards/rejected": float(r_rejected.mean()),
             "rewards/margins": float(margin.mean()), "rewards/accuracies": float(np.mean(margin > 0)),
             "logps/chosen": float(lp[:B].mean()), "logps/rejected": float(lp[B:].mean())}
    return value, grads, stats


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # KL strength: the implicit reward is beta log(pi / pi_ref); larger stays closer
    loss: str = "dpo"  # "dpo" (Rafailov et al., sigmoid) or "ipo" (Azar et al., squared, target 1 / 2 beta)
    steps: int = 300  # optimiser steps
    batch_size: int = 16  # pairs per step (2 x batch_size sequences through the model)
    lr: float = 1e-4  # peak learning rate, warm-up then linear decay to 0 (at demo size 3e-4 drove the KL
    #                   to 23 nats in 300 steps, a third of the answers gibberish or without EOS)
    warmup_steps: int = 10  # warm-up steps
    weight_decay: float = 0.0  # AdamW decoupled decay on matrices (TRL's default: none)
    max_grad_norm: float = 1.0  # global-norm gradient clip
    log_every: int = 1  # steps between log lines (every step is recorded in the history)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"DPOConfig.loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        V.number("DPOConfig", "beta", self.beta, low=0, low_open=True)
        for name in ("steps", "batch_size", "log_every"):
            V.count("DPOConfig", name, getattr(self, name))
        V.count("DPOConfig", "warmup_steps", self.warmup_steps, minimum=0)
        if not self.warmup_steps < self.steps:
            raise ValueError(f"DPOConfig: need warmup_steps < steps, got {self.warmup_steps} and {self.steps}")
        V.number("DPOConfig", "lr", self.lr, low=0)
        V.number("DPOConfig", "weight_decay", self.weight_decay, low=0)
        V.number("DPOConfig", "max_grad_norm", self.max_grad_norm, low=0, low_open=True)


def train_dpo(policy, reference, pairs, dpo_cfg, rng, log=print):
    """Fit the policy's trainable arrays (in place) to (prompt, chosen, rejected) pairs with the reference's
    parameters frozen. Returns the history: one dict per step with the loss, the implicit rewards, margin, accuracy,
    mean log-probs, lr and grad norm.

    Minibatches walk through a fresh permutation of the pairs each epoch (a partial last batch is dropped).
    A non-finite loss or gradient raises ValueError before anything is written to policy.
    """
    if len(pairs) < dpo_cfg.batch_size:
        raise ValueError(f"{len(pairs)} pairs are fewer than one batch of {dpo_cfg.batch_size}")
    tf.check_batch_fits("train_dpo", policy.model_cfg, 2 * dpo_cfg.batch_size, policy.params["wte"].dtype)
    trained = tf.trainable(policy)
    if any(np.shares_memory(x, r) for x in trained.values() for r in reference.values()):
        raise ValueError("policy and reference share arrays: train a copy (the reference must stay frozen)")
    opt = AdamWConfig(lr=dpo_cfg.lr, weight_decay=dpo_cfg.weight_decay, max_grad_norm=dpo_cfg.max_grad_norm)
    state, history, t0 = adamw_init(trained), [], time.perf_counter()
    order, pos = rng.permutation(len(pairs)), 0
    for step in range(dpo_cfg.steps):
        t_step = time.perf_counter()
        if pos + dpo_cfg.batch_size > len(pairs):  # a new epoch
            order, pos = rng.permutation(len(pairs)), 0
        batch = [pairs[i] for i in order[pos:pos + dpo_cfg.batch_size]]
        pos += dpo_cfg.batch_size
        _, grads, stats = dpo_loss_and_grads(policy, reference, batch, dpo_cfg.beta, dpo_cfg.loss)
        lr = lr_schedule(step, dpo_cfg.steps, dpo_cfg.lr, dpo_cfg.warmup_steps)
        grad_norm = adamw_step(trained, grads, state, opt, lr=lr)  # raises, writing nothing, on NaN / inf
        rec = {"stage": "dpo", "step": step + 1, **stats, "lr": lr, "grad_norm": grad_norm,
               "ms": 1000 * (time.perf_counter() - t_step), "seconds": time.perf_counter() - t0}
        history.append(rec)
        if (step + 1) % dpo_cfg.log_every == 0 or step == dpo_cfg.steps - 1:
            log(f"{dpo_cfg.loss} step {step + 1:4d} | loss {rec['loss']:.4f} | "
                f"chosen {rec['rewards/chosen']:+.3f} | "
                f"rejected {rec['rewards/rejected']:+.3f} | margin {rec['rewards/margins']:+.3f} | "
                f"acc {rec['rewards/accuracies']:.2f} | logp chosen {rec['logps/chosen']:8.3f} | "
                f"rejected {rec['logps/rejected']:8.3f} | {rec['ms']:4.0f} ms")
    return history
