"""KL between the policy and the reference model: estimators, the exact value, the KL coefficient, token rewards.

Shapes: B = batch (rollouts), T = response tokens, V = vocabulary. Response arrays are (B, T) and come
with a (B, T) mask of 0/1 that marks the valid response tokens: EOS included, everything after EOS is 0.

Estimators (Schulman, "Approximating KL divergence", 2020). A token x is sampled from the policy pi, and

    log r = logp_ref - logp = log pi_ref(x) - log pi(x)

    k1 = -log r                 E[k1] = KL(pi || pi_ref)   unbiased, high variance, < 0 about half the time
    k2 = (log r)^2 / 2          E[k2] != KL                biased (little when pi_ref ~ pi), always >= 0
    k3 = (r - 1) - log r        E[k3] = KL                 unbiased (E[r] = 1), always >= 0 (e^u >= 1 + u)

k1 is the one that goes in the reward. Summed over a response it is exactly log pi(y) - log pi_ref(y),
so r_t = -kl_coef * k1_t splits the KL-regularised objective E[score] - kl_coef KL(pi || pi_ref) over tokens,
and the policy gradient of it is E[grad log pi(y) (log pi(y) - log pi_ref(y))] = grad KL. k3 as a reward
would add E[grad log pi(y) (r(y) - 1)] = sum_y pi_ref(y) grad log pi(y), which is not 0: a biased
gradient, although k3's value is unbiased. k2 and k3 are logged, not optimised.

The exact KL at one context is a sum over the whole vocabulary. Summed over the valid tokens of a rollout
it is the "exact KL along the sampled path"; by the chain rule of KL its expectation over rollouts is the
sequence-level KL, the same quantity whose unbiased one-sample estimate is the sum of k1.

The KL coefficient (beta in the papers, kl_coef here and in every flag and field) is fixed, or adapted
by Ziegler et al.'s (2019) proportional controller (minirlhf/CONVENTIONS.md, "PPO"):

    e = clip(KL / target - 1, -0.2, 0.2);  kl_coef <- kl_coef * (1 + e * n_steps / horizon)

with KL = batch mean of the per-rollout sum of k1 and n_steps = rollouts in the batch.
"""
from dataclasses import dataclass

import numpy as np

from . import validate as V
from .layers import log_softmax
from .tokenizer import last_real_index


def validate_masked(mask, **arrays):
    """Check (B, T) arrays against their mask and return the mask as a bool array.

    Raises ValueError naming the array whose shape differs from the mask's or that holds a NaN or inf at a
    valid position (masked positions may hold anything: they are never read). ppo_objective uses it too.
    """
    mask = np.asarray(mask)
    for name, x in arrays.items():
        if np.shape(x) != mask.shape:
            raise ValueError(f"{name} has shape {np.shape(x)} but mask has shape {mask.shape}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError("mask must hold only 0 and 1")
    valid = mask.astype(bool)
    for name, x in arrays.items():
        bad = valid & ~np.isfinite(x)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} is not finite at valid position {where}: {np.asarray(x)[where]}")
    return valid


def kl_estimators(logp, logp_ref, mask):
    """Per-token k1, k2, k3 (B, T), zero where mask is 0, and their per-rollout sums k1_sum... (B,).

    logp, logp_ref: (B, T) log-probs of the sampled tokens under the policy and the reference.
    """
    valid = validate_masked(mask, logp=logp, logp_ref=logp_ref)
    if valid.ndim != 2:
        raise ValueError(f"kl_estimators expects (B, T) arrays, got shape {valid.shape}")
    # Zero both inputs before subtracting, so padding (which may hold anything) never reaches exp.
    log_r = np.where(valid, logp_ref, 0) - np.where(valid, logp, 0)  # (B, T), 0 at padding
    out = {
        "k1": -log_r,
        "k2": 0.5 * log_r**2,
        "k3": np.expm1(log_r) - log_r,  # (r - 1) - log r; expm1 keeps it accurate (and >= 0) near r = 1
    }
    for k in ("k1", "k2", "k3"):
        out[k + "_sum"] = out[k].sum(axis=1)  # (B,)
    return out


def exact_kl(logits, logits_ref, temperature=1.0, mask=None):
    """Exact per-token KL(pi(.|context) || pi_ref(.|context)) over the vocabulary, (B, T).

    logits, logits_ref: (B, T, V), divided by temperature before the softmax (the same tau the rollouts
    were sampled with). mask: (B, T) or None for all valid; the result is 0 where mask is 0.
    The sum over a row's valid tokens is the exact KL along the sampled path (see module docstring).
    """
    logits, logits_ref = np.asarray(logits), np.asarray(logits_ref)
    if logits.shape != logits_ref.shape:
        raise ValueError(f"logits has shape {logits.shape} but logits_ref has shape {logits_ref.shape}")
    temperature = V.number("exact_kl", "temperature", temperature, low=0, low_open=True)  # a Python float
    if mask is None:
        mask = np.ones(logits.shape[:-1])
    mask = np.asarray(mask)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask has shape {mask.shape} but logits has shape {logits.shape}; "
                         f"expected mask shape {logits.shape[:-1]}")
    valid = validate_masked(mask)  # temperature is a Python float: float32 logits stay float32
    for name, z in (("logits", logits), ("logits_ref", logits_ref)):
        if not np.isfinite(z[valid]).all():
            raise ValueError(f"{name} holds a NaN or inf at a valid position")
    # Padding rows are zeroed before the softmax so garbage there cannot overflow.
    lp = log_softmax(np.where(valid[..., None], logits, 0) / temperature)  # (B, T, V) log pi
    lq = log_softmax(np.where(valid[..., None], logits_ref, 0) / temperature)  # (B, T, V) log pi_ref
    p, q = np.exp(lp), np.exp(lq)
    # KL = sum_v p (lp - lq) = sum_v p * k3(lq - lp): the extra terms sum to sum q - sum p = 0. Written
    # as k3, every term is >= 0, so the result is >= 0 (and exactly 0 for pi = pi_ref) in floating point.
    d = lq - lp  # (B, T, V) log(q / p)
    d_small = np.minimum(d, 1)  # where d > 1, expm1 could overflow; that branch uses the next line
    small = p * (np.expm1(d_small) - d_small)
    large = q - p - p * d  # = p (e^d - 1 - d) with q = p e^d; >= 0.26 q for d > 1, so no cancellation
    kl = np.where(d > 1, large, small).sum(axis=-1)  # (B, T)
    return np.where(valid, kl, 0)


@dataclass(frozen=True)
class KLControllerConfig:
    """How the KL coefficient evolves: fixed, or Ziegler's adaptive controller (applied by update_kl_coef)."""

    kl_coef: float = 0.2  # initial KL coefficient; stays fixed unless adaptive (Ziegler et al.'s code: 0.2)
    adaptive: bool = False  # False: fixed kl_coef; True: Ziegler's adaptive controller
    target: float = 6.0  # adaptive only: target KL per rollout in nats, the batch mean of summed k1 (TRL: 6)
    horizon: int = 10000  # adaptive only: rollouts over which a KL error is corrected (Ziegler: 10000)

    def __post_init__(self):
        V.number("KLControllerConfig", "kl_coef", self.kl_coef, low=0)
        V.boolean("KLControllerConfig", "adaptive", self.adaptive)
        V.number("KLControllerConfig", "target", self.target, low=0, low_open=True)
        V.count("KLControllerConfig", "horizon", self.horizon)
        if self.adaptive and self.kl_coef == 0:  # the controller multiplies kl_coef: from 0 it never moves
            raise ValueError("KLControllerConfig.kl_coef must be > 0 for the adaptive controller, which scales it "
                             "(from 0 it would stay 0)")


def update_kl_coef(kl_coef, kl, n_steps, config):
    """The KL coefficient to use for the next batch, given this batch's KL; pure (returns a new float).

    kl: batch mean of the per-rollout summed k1 (kl_estimators(...)["k1_sum"].mean()).
    n_steps: rollouts in the batch. A fixed controller returns kl_coef unchanged.
    """
    V.number("update_kl_coef", "kl_coef", kl_coef, low=0)
    if not np.isfinite(kl):
        raise ValueError(f"KL must be finite, got {kl}")
    V.count("update_kl_coef", "n_steps", n_steps)
    if not config.adaptive:
        return float(kl_coef)
    # With |e| <= 0.2, the factor 1 + e n / h stays > 0 only while n / h < 5.
    if 0.2 * n_steps >= config.horizon:
        raise ValueError(f"n_steps = {n_steps} >= 5 * horizon = {5 * config.horizon} could make kl_coef <= 0")
    e = float(np.clip(kl / config.target - 1, -0.2, 0.2))  # proportional error, clipped
    return float(kl_coef) * (1 + e * n_steps / config.horizon)


def token_rewards(scores, logp, logp_ref, mask, kl_coef):
    """Per-token PPO rewards: -kl_coef * k1 on every valid token plus the score on the last valid one (EOS).

    scores: (B,) one reward-model score per rollout (for a response with no EOS the caller passes the
    fixed penalty score; here it lands on the last valid token all the same).
    logp, logp_ref, mask: (B, T) as in kl_estimators.
    Returns rewards (B, T) and non_score_reward = -kl_coef * k1 (B, T), both 0 at padding.

    minirlhf puts the score on EOS, the last action taken. TRL puts it one position after EOS (and widens
    the value mask by one to cover it), so a TRL port's rewards are shifted right by one there; Ziegler
    et al.'s code adds it at the last column of its fixed-length responses.
    """
    scores = np.asarray(scores)
    if scores.shape != np.shape(mask)[:1]:
        raise ValueError(f"scores has shape {scores.shape} but mask has shape {np.shape(mask)}; "
                         f"expected ({np.shape(mask)[0]},)")
    if not np.isfinite(scores).all():
        raise ValueError("scores holds a NaN or inf")
    kl_coef = V.number("token_rewards", "kl_coef", kl_coef, low=0)  # a Python float keeps float32 float32
    valid = validate_masked(mask, logp=logp, logp_ref=logp_ref)
    empty = np.flatnonzero(~valid.any(axis=1))
    if empty.size:
        raise ValueError(f"rows {empty.tolist()} have no valid response token; a response has at least one")
    non_score_reward = -kl_coef * kl_estimators(logp, logp_ref, mask)["k1"]  # (B, T), 0 at padding
    rewards = non_score_reward.copy()
    last = last_real_index(valid)  # (B,) index of the last valid token: EOS
    rewards[np.arange(len(valid)), last] += scores.astype(rewards.dtype)
    return rewards, non_score_reward
