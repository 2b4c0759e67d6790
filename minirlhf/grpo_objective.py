"""The array math of critic-free RL: group advantages, the clipped token and sequence losses, the aggregators
that turn per-token losses into one number, the KL as a loss term, and DAPO's two filters.

Shapes: P prompts with G sampled completions each (a group), B = P G rows, T response tokens. Rewards are
(P, G), or (B,) with a (B,) array of group ids. Response arrays are (B, T) with a prefix mask, as in
ppo_objective.py; L_i is row i's number of valid tokens (EOS included), L_max the length cap.

Advantages: one number per completion, the same on each of its tokens (REINFORCE++'s differ per token).
    GRPO      A_i = (r_i - mean r) / (std r + eps)       Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300, eq. 3)
    Dr. GRPO  A_i = r_i - mean r                         Liu et al. 2025 (arXiv 2503.20783, sec. 3.1)
    RLOO      A_i = r_i - (1/(G-1)) sum_{j != i} r_j     Kool et al. 2019; Ahmadian et al. 2024 (arXiv 2402.14740)
              = G/(G-1) (r_i - mean r)                   so it needs G >= 2
    REINFORCE++  A_t = the reward-to-go sum_{s >= t} r_s, r_s = -kl_coef k1_s plus the score on EOS, z-scored
              over the valid tokens of the whole batch; "-baseline" subtracts the group mean of the scores
              first. Hu 2025 (arXiv 2501.03262).
The std is Bessel's (ddof 1) with eps = 1e-4 added outside the root, TRL's choice; verl uses ddof 1 and 1e-6,
OpenRLHF ddof 1 and 1e-9, several minimal repositories ddof 0 (for G = 2 that changes A by sqrt 2); both are
arguments. A group whose rewards are all equal gets A = 0 exactly (tested for equality: rounding would leave
1e-17 / (1e-17 + eps) otherwise), never NaN; so does a group of one (nothing to compare with), where verl
instead sets mean 0 and std 1 and so passes A = r on.

Policy losses (rho_it = exp(logp_it - logp_old_it), logp the only input with a gradient):
    token     l_it = max(-A_it rho_it, -A_it clip(rho_it, 1 - eps_low, 1 + eps_high))      PPO's clip; DAPO's
              clip-higher is eps_high > eps_low (Yu et al. 2025, arXiv 2503.14476, sec. 3.1)
              dl_it/dlogp_it = -A_it rho_it where the unclipped term is the max, 0 where the clip is active
    sequence  s_i = exp((1/L_i) sum_t (logp_it - logp_old_it)); l_i = max(-A_i s_i, -A_i clip(s_i, ...)),
              dl_i/dlogp_it = -A_i s_i / L_i unclipped: GSPO (Zheng et al. 2025, arXiv 2507.18071). With
              ratio="sum", s_i = exp(sum_t ...) and dl_i/dlogp_it = -A_i s_i: TRL's clipped RLOO.
    reinforce l_i = -A_i sum_t logp_it, dl_i/dlogp_it = -A_i: RLOO as Ahmadian et al. write it. At
              logp = logp_old it has the ratio forms' gradient, not their value.
The clip is active (its term strictly larger) exactly where rho > 1 + eps_high with A > 0 ("high") or
rho < 1 - eps_low with A < 0 ("low"): TRL's clip_ratio/high_mean and clip_ratio/low_mean. Sequence losses
are averaged over rows, L = (1/B) sum_i l_i; a row with no valid token contributes 0 and still counts in B.

Aggregators of per-token losses (the papers write one group, B = G; over P prompts the groups are averaged):
    name                  paper / TRL loss_type / verl loss_agg_mode        L                            c_it
    seq_mean_token_mean   GRPO / grpo / seq-mean-token-mean         (1/B) sum_i (1/L_i) sum_t l_it  1/(B L_i)
    token_mean            DAPO / bnpo, dapo / token-mean            sum_it l_it / sum_j L_j         1/sum_j L_j
    constant              Dr. GRPO / dr_grpo / -                    sum_it l_it / (B L_max)         1/(B L_max)
    seq_sum               RLOO / - / seq-mean-token-sum             (1/B) sum_i sum_t l_it          1/B
c_it = dL/dl_it is what `token_weights` returns: on policy (rho = 1), unclipped and without KL, the loss
gradient is -sum_it c_it A_it grad log pi(o_it), the number a port compares. GRPO's 1/L_i is Dr. GRPO's
length bias; verl's seq-mean-token-sum-norm divides the token sum by the padded width T, not by B L_max.
Micro-batches. Gradient accumulation gives the full batch's gradient only if each micro-batch's loss uses the
whole batch's normaliser: pass n_rows = B and n_tokens = sum_j L_j of the full batch and add the micro-batch
losses. Normalisers counted per micro-batch and averaged break token_mean whenever the micro-batches hold
different token counts, and the other three whenever they hold different row counts.

The KL as a loss term, per token, d = logp - logp_ref (x sampled from pi; Schulman 2020), and its gradient:
    k1 = d                                   dk1/dlogp = 1           E[grad] = 0: no regularisation
    k2 = d^2 / 2                             dk2/dlogp = d           the per-token reverse KL's gradient
    k3 = e^-d - 1 + d (expm1)                dk3/dlogp = -expm1(-d)  = 1 - pi_ref / pi: forward KL's gradient
    rho k3, rho = exp(logp - logp_old)       d(rho k3)/dlogp = rho d (logp_old held fixed; DeepSeek-V3.2,
                                             arXiv 2512.02556 sec. 3.1; TRL's use_bias_correction_kl)
exact_rl.py measures which of them gives the gradient of the sequence KL. k3 uses expm1: finite for
log-ratios of +-50 in float32; no clamp (OpenRLHF clamps the estimators to [-10, 10]).

DAPO's filters (sec. 3.2, 3.4): dynamic sampling drops groups whose rewards are all equal (their advantages
are 0 anyway); the soft overlong penalty is 0 up to L_max - L_cache tokens, then falls linearly to -1 at L_max.
"""
import numpy as np

from . import validate as V
from .kl import token_rewards, validate_masked
from .ppo_objective import whiten

AGGREGATORS = ("seq_mean_token_mean", "token_mean", "constant", "seq_sum")
KL_LOSSES = ("k1", "k2", "k3", "rho_k3")


# ---------------------------------------------------------------- groups and advantages

def _grouped(rewards, groups):
    """(flat rewards (B,) float, group index (B,) in 0..n-1, counts (n,), shape to restore); checks input."""
    r = np.asarray(rewards)
    if not np.issubdtype(r.dtype, np.floating):
        r = r.astype(np.float64)
    if groups is None:
        if r.ndim != 2 or r.size == 0:
            raise ValueError(f"rewards must be (P, G) without groups, got shape {r.shape}")
        ids = np.repeat(np.arange(r.shape[0]), r.shape[1])
    else:
        ids = np.asarray(groups)
        if r.ndim != 1 or ids.shape != r.shape or r.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"rewards (B,) need integer groups (B,), got shapes {r.shape} and {ids.shape}")
        ids = np.unique(ids, return_inverse=True)[1].reshape(-1)
    bad = np.flatnonzero(~np.isfinite(r.reshape(-1)))
    if bad.size:
        raise ValueError(f"rewards holds a NaN or inf at flat index {int(bad[0])}")
    return r.reshape(-1), ids, np.bincount(ids), r.shape


def _equal_groups(r, ids, n_groups):
    """(n,) bool: the group's rewards are all equal (max == min, exactly)."""
    hi, lo = np.full(n_groups, -np.inf), np.full(n_groups, np.inf)
    np.maximum.at(hi, ids, r)
    np.minimum.at(lo, ids, r)
    return hi == lo


def dr_grpo_advantages(rewards, groups=None):
    """r_i - mean of its group, the shape of rewards; 0 exactly for a group of equal rewards (or of one)."""
    r, ids, n, shape = _grouped(rewards, groups)
    mean = np.bincount(ids, r) / n  # (groups,) float64
    adv = (r - mean[ids].astype(r.dtype))
    return np.where(_equal_groups(r, ids, len(n))[ids], 0, adv).astype(r.dtype).reshape(shape)


def grpo_advantages(rewards, groups=None, ddof=1, eps=1e-4):
    """(r_i - mean) / (std + eps) per group, std with `ddof` (TRL: ddof 1, eps 1e-4); 0 for a group of equal
    rewards and for a group of one."""
    if ddof not in (0, 1) or not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"ddof must be 0 or 1 and eps finite and >= 0, got ddof={ddof}, eps={eps}")
    r, ids, n, shape = _grouped(rewards, groups)
    centred = r - (np.bincount(ids, r) / n)[ids].astype(r.dtype)
    var = np.bincount(ids, centred.astype(np.float64) ** 2) / np.maximum(n - ddof, 1)  # (groups,)
    flat = _equal_groups(r, ids, len(n)) | (n == 1)  # no spread: A = 0, never 0 / 0
    with np.errstate(invalid="ignore", divide="ignore"):  # a flat group at eps = 0 is 0 / 0, replaced by 0 below
        adv = centred / (np.sqrt(var).astype(r.dtype)[ids] + r.dtype.type(eps))
    return np.where(flat[ids], 0, adv).astype(r.dtype).reshape(shape)


def rloo_advantages(rewards, groups=None):
    """r_i minus the mean of the other rewards of its group; ValueError for a group of fewer than 2."""
    r, ids, n, shape = _grouped(rewards, groups)
    if n.min() < 2:
        raise ValueError(f"RLOO needs at least 2 completions per group; group {int(np.argmin(n))} has {n.min()}")
    total = np.bincount(ids, r)[ids]  # (B,) the group's sum
    adv = r - ((total - r) / (n[ids] - 1)).astype(r.dtype)
    return np.where(_equal_groups(r, ids, len(n))[ids], 0, adv).astype(r.dtype).reshape(shape)


def reinforce_pp_advantages(scores, logp, logp_ref, mask, kl_coef, groups=None, baseline=False):
    """REINFORCE++'s per-token advantages (B, T): k1 in the reward (kl.token_rewards, the score on EOS), the
    reward-to-go, whitened over the batch's valid tokens (ppo_objective.whiten: biased variance, eps 1e-8
    inside the root; verl whitens with the unbiased variance, OpenRLHF with the biased one clamped at 1e-8
    under the root). baseline=True subtracts each
    group's mean score first (groups: (B,) ids, needed then)."""
    scores = np.asarray(scores, np.float64)
    if baseline:
        if groups is None:
            raise ValueError("REINFORCE++-baseline needs the group ids of the rows")
        scores = dr_grpo_advantages(scores, groups)
    rewards, _ = token_rewards(scores, logp, logp_ref, mask, kl_coef)  # (B, T), 0 at padding
    to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]  # (B, T); prefix mask: 0 after the last valid token
    return whiten(to_go, mask)


def broadcast(advantages, mask):
    """One advantage per row (B,) on every valid token of its row: (B, T), 0 at padding."""
    a = np.asarray(advantages)
    if a.shape != np.shape(mask)[:1]:
        raise ValueError(f"advantages has shape {a.shape}, expected ({np.shape(mask)[0]},) for mask {np.shape(mask)}")
    V.finite_array("advantages", a)
    return np.where(validate_masked(mask), a[:, None], 0).astype(a.dtype)


def dynamic_sampling_keep(rewards, groups=None):
    """DAPO's dynamic sampling: True for the rows of groups whose rewards are not all equal (shape of rewards)."""
    r, ids, n, shape = _grouped(rewards, groups)
    return ~_equal_groups(r, ids, len(n))[ids].reshape(shape)


def overlong_penalty(lengths, max_len, cache_len):
    """DAPO's soft overlong punishment (eq. 13) of response lengths (B,): 0 up to max_len - cache_len tokens,
    then (max_len - cache_len - L) / cache_len, reaching -1 at max_len; -1 beyond. float64 (B,)."""
    V.number("overlong_penalty", "max_len", max_len), V.number("overlong_penalty", "cache_len", cache_len)
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    L = np.asarray(lengths, np.float64)
    if not np.all(np.isfinite(L) & (L >= 0)):  # a NaN length would come out as a NaN penalty
        raise ValueError(f"lengths must be finite and >= 0 (token counts), got {L[~(np.isfinite(L) & (L >= 0))][:4]}")
    return np.clip((max_len - cache_len - L) / cache_len, -1.0, 0.0)


# ---------------------------------------------------------------- policy losses

def _clip_branches(ratio, adv, eps_low, eps_high):
    """max(-A rho, -A clip(rho)) and where the clipped term is strictly larger (the clip is active)."""
    if not (eps_low > 0 and eps_high > 0):
        raise ValueError(f"eps_low and eps_high must be > 0, got {eps_low}, {eps_high}")
    unclipped = -adv * ratio
    clipped = -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high)
    return np.maximum(unclipped, clipped), clipped > unclipped


def _clip_stats(active, adv, valid, log_ratio, dtype):
    """TRL's clip_ratio/{low,high,region}_mean over valid entries, and PPO's policy/approxkl (k2 old vs new)."""
    n = dtype(max(valid.sum(), 1))
    return {"clip_ratio/low_mean": dtype((active & valid & (adv < 0)).sum()) / n,
            "clip_ratio/high_mean": dtype((active & valid & (adv > 0)).sum()) / n,
            "clip_ratio/region_mean": dtype((active & valid).sum()) / n,
            "policy/approxkl": (0.5 * np.where(valid, log_ratio, 0) ** 2).sum() / n}


def token_loss_forward(logp, logp_old, advantages, mask, eps_low=0.2, eps_high=0.2):
    """Per-token clipped losses l (B, T), 0 at padding, and the cache (ratio, advantages, clip_active, stats).
    advantages: (B, T) (`broadcast` a per-row one)."""
    valid = validate_masked(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    eps_low, eps_high = float(eps_low), float(eps_high)  # Python floats keep float32 float32
    log_ratio = np.where(valid, logp, 0) - np.where(valid, logp_old, 0)  # (B, T), 0 at padding
    ratio = np.exp(log_ratio)  # exactly 1 where logp == logp_old
    adv = np.where(valid, advantages, 0)
    loss, active = _clip_branches(ratio, adv, eps_low, eps_high)
    active &= valid
    stats = _clip_stats(active, adv, valid, log_ratio, ratio.dtype.type)
    return np.where(valid, loss, 0), {"ratio": ratio, "advantages": adv, "clip_active": active, "stats": stats}


def token_loss_backward(dloss, cache):
    """dlogp (B, T) from dloss (B, T): -A rho dloss where unclipped, 0 where the clip is active."""
    # l = max(-A rho, -A clip(rho)), rho = exp(logp - logp_old): d(-A rho)/dlogp = -A rho; the clipped
    # branch is flat in logp wherever it is strictly the larger. Padding has A = 0, so 0.
    return np.where(cache["clip_active"], 0, -cache["advantages"] * cache["ratio"] * dloss)


def sequence_loss_forward(logp, logp_old, advantages, mask, eps_low=3e-4, eps_high=4e-4, ratio="mean"):
    """Per-row clipped losses with one ratio per sequence (B,): ratio="mean" is GSPO's s_i (defaults: its
    clip range 3e-4 / 4e-4), "sum" the full sequence ratio of TRL's RLOO. advantages: (B,)."""
    if ratio not in ("mean", "sum"):
        raise ValueError(f"ratio must be 'mean' or 'sum', got {ratio!r}")
    valid = validate_masked(mask, logp=logp, logp_old=logp_old)
    adv = np.asarray(advantages)
    if adv.shape != valid.shape[:1] or not np.isfinite(adv).all():
        raise ValueError(f"advantages must be finite with shape ({valid.shape[0]},), got {adv.shape}")
    lengths = valid.sum(axis=1)  # (B,)
    scale = (1.0 / np.maximum(lengths, 1)) if ratio == "mean" else np.ones(len(lengths))
    scale = scale.astype(np.asarray(logp).dtype)  # (B,) d log s_i / d logp_it
    log_s = (np.where(valid, logp, 0) - np.where(valid, logp_old, 0)).sum(axis=1) * scale  # (B,)
    s = np.exp(log_s)
    loss, active = _clip_branches(s, adv, float(eps_low), float(eps_high))
    has = lengths > 0  # a row with no valid token adds 0
    stats = _clip_stats(active, adv, has, log_s, s.dtype.type)
    cache = {"ratio": s, "advantages": adv, "clip_active": active | ~has, "scale": scale, "valid": valid,
             "stats": stats}
    return np.where(has, loss, 0), cache


def sequence_loss_backward(dloss, cache):
    """dlogp (B, T) from dloss (B,): -A_i s_i d log s_i / d logp_it dloss_i where unclipped, else 0."""
    # l_i = max(-A s, -A clip(s)), s = exp(log s), log s = scale_i sum_t (logp_it - logp_old_it)
    per_row = np.where(cache["clip_active"], 0, -cache["advantages"] * cache["ratio"] * cache["scale"] * dloss)
    return np.where(cache["valid"], per_row[:, None], 0).astype(cache["ratio"].dtype)


def reinforce_loss_forward(logp, advantages, mask):
    """RLOO's REINFORCE: per-row losses -A_i sum_t logp_it (B,), and the cache (advantages, valid)."""
    valid = validate_masked(mask, logp=logp)
    adv = np.asarray(advantages)
    if adv.shape != valid.shape[:1] or not np.isfinite(adv).all():
        raise ValueError(f"advantages must be finite with shape ({valid.shape[0]},), got {adv.shape}")
    return -adv * np.where(valid, logp, 0).sum(axis=1), {"advantages": adv, "valid": valid}


def reinforce_loss_backward(dloss, cache):
    """dlogp (B, T): -A_i dloss_i on every valid token of row i."""
    return np.where(cache["valid"], (-cache["advantages"] * dloss)[:, None], 0).astype(cache["advantages"].dtype)


# ---------------------------------------------------------------- aggregators

def token_weights(mask, kind, max_len=None, n_rows=None, n_tokens=None, dtype=np.float64):
    """c_it = dL/dl_it (B, T) of an aggregator (module docstring), 0 at padding. n_rows / n_tokens: the
    normaliser's row and token counts, this batch's by default; pass the whole batch's for a micro-batch.
    max_len: L_max, needed by "constant"."""
    valid = validate_masked(mask)
    if valid.ndim != 2:
        raise ValueError(f"mask must be (B, T), got shape {valid.shape}")
    lengths = valid.sum(axis=1)
    # the whole batch's counts, of which this (micro-)batch is a part: never fewer than its own
    n_rows = V.count("token_weights", "n_rows", len(valid) if n_rows is None else n_rows, minimum=max(1, len(valid)))
    n_tokens = V.count("token_weights", "n_tokens", int(lengths.sum()) if n_tokens is None else n_tokens,
                       minimum=int(lengths.sum()))
    if max_len is not None:
        max_len = V.count("token_weights", "max_len", max_len)
    if kind == "seq_mean_token_mean":
        c = 1.0 / (n_rows * np.maximum(lengths, 1))[:, None]  # a row with no valid token counts in B (TRL)
    elif kind == "token_mean":
        if not n_tokens > 0:
            raise ValueError("token_mean needs at least one valid token")
        c = np.full(len(valid), 1.0 / n_tokens)[:, None]
    elif kind == "constant":
        if max_len is None or max_len < max(1, lengths.max(initial=0)):
            raise ValueError(f"constant needs max_len >= every row's length {lengths.max(initial=0)}, got {max_len}")
        c = np.full(len(valid), 1.0 / (n_rows * max_len))[:, None]
    elif kind == "seq_sum":
        c = np.full(len(valid), 1.0 / n_rows)[:, None]
    else:
        raise ValueError(f"unknown aggregator {kind!r}; expected one of {AGGREGATORS}")
    return np.where(valid, c, 0).astype(dtype)


def aggregate_forward(losses, mask, kind, max_len=None, n_rows=None, n_tokens=None):
    """sum_it c_it l_it: the scalar loss (dtype of losses) of per-token losses (B, T), and its cache (c)."""
    valid = validate_masked(mask, losses=losses)
    c = token_weights(mask, kind, max_len, n_rows, n_tokens, np.asarray(losses).dtype)
    return (c * np.where(valid, losses, 0)).sum(), c


def aggregate_backward(dloss, cache):
    """dlosses (B, T) = c dloss."""
    return cache * cache.dtype.type(dloss)


# ---------------------------------------------------------------- the KL as a loss term

def kl_loss_forward(logp, logp_ref, mask, kind, logp_old=None):
    """Per-token KL loss terms (B, T), 0 at padding, of an estimator in KL_LOSSES (module docstring), and the
    cache. logp_old (rho_k3 only): the sampling policy's log-probs, held fixed."""
    if kind not in KL_LOSSES:
        raise ValueError(f"unknown KL loss {kind!r}; expected one of {KL_LOSSES}")
    if kind == "rho_k3" and logp_old is None:
        raise ValueError("rho_k3 needs logp_old, the log-probs of the policy that sampled the tokens")
    arrays = {"logp": logp, "logp_ref": logp_ref, **({"logp_old": logp_old} if kind == "rho_k3" else {})}
    valid = validate_masked(mask, **arrays)
    d = np.where(valid, logp, 0) - np.where(valid, logp_ref, 0)  # (B, T) log pi - log pi_ref, 0 at padding
    k3 = np.expm1(-d) + d  # (r - 1) - log r with r = e^-d; expm1 keeps it >= 0 and exact near d = 0
    rho = np.exp(np.where(valid, logp, 0) - np.where(valid, logp_old, 0)) if kind == "rho_k3" else None
    value = {"k1": d, "k2": 0.5 * d ** 2, "k3": k3, "rho_k3": None if rho is None else rho * k3}[kind]
    return np.where(valid, value, 0), {"kind": kind, "d": d, "rho": rho, "valid": valid}


def kl_loss_backward(dloss, cache):
    """dlogp (B, T) of the KL loss terms, times dloss (B, T)."""
    d, kind = cache["d"], cache["kind"]
    if kind == "k1":
        g = np.ones_like(d)  # d k1 / d logp = 1
    elif kind == "k2":
        g = d  # d (d^2 / 2) / d logp = d
    elif kind == "k3":
        g = -np.expm1(-d)  # d (e^-d - 1 + d) / d logp = 1 - e^-d = 1 - pi_ref / pi
    else:
        g = cache["rho"] * d  # rho k3 + rho (1 - e^-d) = rho (e^-d - 1 + d + 1 - e^-d) = rho d
    return np.where(cache["valid"], g * dloss, 0)
