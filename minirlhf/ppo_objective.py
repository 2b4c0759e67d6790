"""The array math of PPO for RLHF: GAE, whitening, the clipped policy and value losses and their gradients.

Shapes: B = batch (rollouts), T = response tokens. Every array is (B, T) over the response region, with a
(B, T) mask of 0/1. The valid tokens of a row form a prefix of it (right padding, e.g. 1 1 1 1 0 0): the
response tokens, EOS included; everything after EOS is 0. A row may be all valid (no padding).

GAE (Schulman et al. 2016), gamma = 1, lambda = 0.95, V = 0 after the last valid token:

    delta_t = r_t + gamma V_{t+1} - V_t
    A_t     = delta_t + gamma lambda A_{t+1}      (A = 0 after the last valid token)
    returns = A + V                                (the value-function targets)

Advantages are whitened over the valid tokens of the batch with the biased variance (divide by N):
(A - mean) / sqrt(var + 1e-8). OAI's lm-human-preferences and the N-implementation-details code use the
biased variance; TRL's masked_var is unbiased (N / (N - 1)), which is NaN for a single valid token.

Clipped surrogate (Schulman et al. 2017), mean over the N valid tokens:

    ratio = exp(logp - logp_old)
    L_pi  = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
    dL_pi/dlogp = -A ratio / N where the unclipped term is the max, 0 where the clip is active

Clipped value loss (as in OAI's and TRL's code), eps_v = 0.2, vf_coef = 0.1:

    v_clip = clip(v, v_old - eps_v, v_old + eps_v)
    L_v    = vf_coef * 0.5 * mean max((v - R)^2, (v_clip - R)^2)
    dL_v/dv = vf_coef (v - R) / N where the unclipped term is the max, 0 where the clip is active

"The clip is active" means the clipped term is strictly larger; at a tie the unclipped branch is used,
for the gradient and for the clipfrac statistics alike (as TRL logs them). The two loss forwards also put
their logging statistics, under TRL's names, in cache["stats"]; the backwards never read them.
"""
import numpy as np

from . import validate as V
from .kl import validate_masked


def _check_prefix(valid):
    """Raise unless each row's valid tokens form a prefix (1 1 1 0 0), as GAE assumes."""
    holes = valid[:, 1:] & ~valid[:, :-1]  # (B, T-1): a valid token after a padding one
    if holes.any():
        row = int(np.argwhere(holes)[0, 0])
        raise ValueError(f"mask row {row} is not a prefix of valid tokens (right padding): "
                         f"{valid[row].astype(int).tolist()}")


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimates and returns, (B, T) each, 0 at padding.

    rewards: (B, T) per-token rewards (kl.token_rewards); values: (B, T) V(s_t) from the value model.
    Vectorised over the batch; one backward loop over time.
    """
    valid = validate_masked(mask, rewards=rewards, values=values)
    if valid.ndim != 2:
        raise ValueError(f"gae expects (B, T) arrays, got shape {valid.shape}")
    _check_prefix(valid)
    gamma = V.number("gae", "gamma", gamma, low=0, high=1)  # Python floats keep float32 inputs float32
    lam = V.number("gae", "lam", lam, low=0, high=1)
    r = np.where(valid, rewards, 0)  # (B, T)
    v = np.where(valid, values, 0)  # (B, T); 0 at padding is "V = 0 after the last valid token"
    B, T = r.shape
    advantages = np.zeros_like(r)  # (B, T)
    next_value = np.zeros(B, dtype=r.dtype)  # (B,) V_{t+1}; 0 after the last column
    next_adv = np.zeros(B, dtype=r.dtype)  # (B,) A_{t+1}
    for t in reversed(range(T)):
        # At padding r = V = 0 and (prefix mask) everything later is padding too, so A stays 0 there
        # and the last valid token sees V_{t+1} = A_{t+1} = 0.
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        advantages[:, t] = delta + gamma * lam * next_adv
        next_value, next_adv = v[:, t], advantages[:, t]
    returns = advantages + v  # (B, T); both terms are 0 at padding
    return advantages, returns


def masked_mean(x, mask):
    """Mean of x over the valid entries (mask 1); ValueError if there are none."""
    valid = validate_masked(mask, x=x)
    n = valid.sum()
    if n == 0:
        raise ValueError("mask has no valid entries")
    x = np.asarray(x)
    return np.where(valid, x, 0).sum() / x.dtype.type(n)


def masked_var(x, mask):
    """Biased variance (divide by N) of x over the valid entries; 0 for a single valid entry."""
    valid = validate_masked(mask, x=x)
    centred = np.where(valid, np.asarray(x) - masked_mean(x, mask), 0)
    return masked_mean(centred**2, mask)


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the valid entries (biased var), 0 at padding.

    shift_mean=False adds the mean back (only the scale changes), as TRL's whiten does.
    A single valid entry gives 0 (var = 0, eps keeps the division finite), not NaN.
    """
    x = np.asarray(x)
    valid = validate_masked(mask, x=x)
    V.number("whiten", "eps", eps, low=0, low_open=True)  # eps = 0 would divide by a zero variance
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) / np.sqrt(var + x.dtype.type(eps))
    if not shift_mean:
        out = out + mean
    return np.where(valid, out, 0)


def _loss_inputs(mask, **arrays):
    """Shared checks of the two losses: shapes, finite valid entries, a valid token."""
    valid = validate_masked(mask, **arrays)
    if not valid.any():
        raise ValueError("mask has no valid entries")
    return valid, {name: np.where(valid, x, 0) for name, x in arrays.items()}


def policy_loss_forward(logp, logp_old, advantages, mask, clip_eps=0.2):
    """Clipped surrogate loss (a scalar of the input dtype) and its cache.

    logp: (B, T) log-probs of the sampled tokens under the current policy (the only input with a
    gradient); logp_old: (B, T) the same under the policy that sampled them; advantages: (B, T) whitened.
    cache: ratio, advantages, clip_active, n (what backward needs) and stats, a dict for logging:
      policy/clipfrac: fraction of valid tokens where the clip is active
      policy/approxkl: mean over valid tokens of 0.5 (logp - logp_old)^2 (k2 between old and new)
    """
    clip_eps = V.number("policy_loss_forward", "clip_eps", clip_eps, low=0, low_open=True)  # Python float
    valid, a = _loss_inputs(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    dtype = a["logp"].dtype.type
    n = dtype(valid.sum())
    log_ratio = a["logp"] - a["logp_old"]  # (B, T), 0 at padding
    ratio = np.exp(log_ratio)  # (B, T), exactly 1 where logp == logp_old
    adv = a["advantages"]  # (B, T), 0 at padding, so padding adds 0 to the loss
    unclipped = -adv * ratio
    clipped = -adv * np.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    clip_active = valid & (clipped > unclipped)  # (B, T) bool
    loss = np.maximum(unclipped, clipped).sum() / n
    stats = {"policy/clipfrac": dtype(clip_active.sum()) / n,
             "policy/approxkl": (0.5 * log_ratio**2).sum() / n}
    cache = {"ratio": ratio, "advantages": adv, "clip_active": clip_active, "n": n, "stats": stats}
    return loss, cache


def policy_loss_backward(dloss, cache):
    """dlogp (B, T): the gradient of the clipped surrogate with respect to logp, times dloss."""
    # loss = sum max(-A ratio, -A clip(ratio)) / N; d(-A ratio)/dlogp = -A ratio (ratio = exp(logp - old));
    # the clipped branch is flat in logp wherever it is strictly the max.
    ratio, adv = cache["ratio"], cache["advantages"]
    dlogp = np.where(cache["clip_active"], 0, -adv * ratio / cache["n"])  # padding: adv = 0, so 0
    return dlogp * dlogp.dtype.type(dloss)


def value_loss_forward(values, values_old, returns, mask, clip_eps=0.2, vf_coef=0.1):
    """Clipped value loss (a scalar of the input dtype) and its cache.

    values: (B, T) current value predictions (the only input with a gradient); values_old: (B, T) the
    predictions at rollout time; returns: (B, T) GAE returns.
    cache: values, returns, clip_active, n, vf_coef (what backward needs) and stats, for logging:
      val/clipfrac: fraction of valid tokens where the clip is active
    """
    clip_eps = V.number("value_loss_forward", "clip_eps", clip_eps, low=0, low_open=True)  # Python float
    valid, a = _loss_inputs(mask, values=values, values_old=values_old, returns=returns)
    V.number("value_loss_forward", "vf_coef", vf_coef, low=0)
    v, v_old, R = a["values"], a["values_old"], a["returns"]
    dtype = v.dtype.type
    n = dtype(valid.sum())
    v_clip = np.clip(v, v_old - clip_eps, v_old + clip_eps)  # (B, T)
    unclipped = (v - R) ** 2
    clipped = (v_clip - R) ** 2
    clip_active = valid & (clipped > unclipped)  # (B, T) bool
    loss = dtype(vf_coef) * dtype(0.5) * np.maximum(unclipped, clipped).sum() / n
    stats = {"val/clipfrac": dtype(clip_active.sum()) / n}
    cache = {"values": v, "returns": R, "clip_active": clip_active, "n": n, "vf_coef": dtype(vf_coef),
             "stats": stats}
    return loss, cache


def value_loss_backward(dloss, cache):
    """dvalues (B, T): the gradient of the clipped value loss with respect to values, times dloss."""
    # loss = vf_coef * 0.5 * sum max((v - R)^2, (v_clip - R)^2) / N. The clipped term can only be strictly
    # larger where v is outside [v_old - eps, v_old + eps] (inside, v_clip = v), where v_clip is flat in v.
    v, R = cache["values"], cache["returns"]
    dvalues = np.where(cache["clip_active"], 0, cache["vf_coef"] * (v - R) / cache["n"])  # padding: 0 - 0
    return dvalues * dvalues.dtype.type(dloss)


def explained_variance(values, returns, mask):
    """1 - var(R - V) / var(R) over the valid tokens (biased variances).

    1 is a perfect value function, 0 no better than a constant, < 0 worse. When var(R) = 0, i.e. all
    valid returns are equal, the ratio is undefined and the function returns nan (as Stable-Baselines3
    does). Equality is tested directly: the computed variance of equal numbers can round to a tiny
    nonzero value, and dividing by it would give a huge meaningless number.
    """
    valid = validate_masked(mask, values=values, returns=returns)
    values, returns = np.where(valid, values, 0), np.where(valid, returns, 0)
    if not valid.any():
        raise ValueError("mask has no valid entries")
    if returns[valid].min() == returns[valid].max():
        return returns.dtype.type(np.nan)
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask)
