"""Naive oracles: the textbook formula written one element at a time, to check the vectorised code against
(attention, GAE, AdamW, the group advantages, REINFORCE++). Slow on purpose and obviously right."""
import numpy as np


def naive_attention(qkv, key_mask, n_head):
    """One query at a time: query i reads keys j <= i that are real tokens."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D, out = C // n_head, np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            q, k, v = (qkv[b, :, s * C + h * D:s * C + (h + 1) * D] for s in range(3))
            for i in range(T):
                js = [j for j in range(i + 1) if key_mask[b, j]]
                if js:
                    s = np.array([q[i] @ k[j] for j in js]) / np.sqrt(D)
                    w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                    out[b, i, h * D:(h + 1) * D] = w @ v[js]
    return out


def naive_gae(rewards, values, mask, gamma, lam):
    """A_t = sum_{k >= t} (gamma lam)^(k - t) delta_k over a row's valid prefix, V = 0 after it."""
    A = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        v = list(values[b, :n]) + [0.0]
        delta = [rewards[b, k] + gamma * v[k + 1] - v[k] for k in range(n)]
        for t in range(n):
            A[b, t] = sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, n))
    return A, np.where(mask > 0, A + np.nan_to_num(values), 0)


def naive_adamw(params, grads, lr, weight_decay, max_grad_norm, beta1=0.9, beta2=0.999, eps=1e-8):
    """PyTorch's AdamW step by step: grads[k][s] is step s's gradient; global-norm clip (torch's rule:
    scale by min(1, max / (norm + 1e-6))); decay on ndim >= 2; m_hat / (sqrt(v_hat) + eps), eps outside
    the square root."""
    p = {k: x.copy() for k, x in params.items()}
    m, v = ({k: np.zeros_like(x) for k, x in params.items()} for _ in range(2))
    for t in range(1, len(next(iter(grads.values()))) + 1):
        g = {k: grads[k][t - 1] for k in p}
        norm = np.sqrt(sum((x**2).sum() for x in g.values()))
        scale = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (norm + 1e-6))
        for k in p:
            p[k] = p[k] - lr * weight_decay * p[k] if p[k].ndim >= 2 else p[k]
            m[k] = beta1 * m[k] + (1 - beta1) * scale * g[k]
            v[k] = beta2 * v[k] + (1 - beta2) * (scale * g[k]) ** 2
            p[k] = p[k] - lr * (m[k] / (1 - beta1**t)) / (np.sqrt(v[k] / (1 - beta2**t)) + eps)
    return p


def naive_group_advantages(rewards, groups, kind, ddof=1, eps=1e-4):
    """One group at a time, by the papers' formulas: "grpo" (r - mean) / (std + eps) with the given ddof,
    "dr_grpo" r - mean, "rloo" r minus the mean of the others; exactly 0 for a group whose rewards are all
    equal and (grpo, dr_grpo) for a group of one. rewards, groups: (B,) arrays."""
    out = np.zeros(len(rewards))
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        r = rewards[rows].astype(np.float64)
        if len(r) == 1 or r.max() == r.min():
            continue
        if kind == "grpo":
            out[rows] = (r - r.mean()) / (r.std(ddof=ddof) + eps)
        elif kind == "dr_grpo":
            out[rows] = r - r.mean()
        else:
            out[rows] = [r[i] - np.delete(r, i).mean() for i in range(len(r))]
    return out


def naive_reinforce_pp(scores, logp, logp_ref, mask, kl_coef, groups, baseline):
    """REINFORCE++ token by token: (baseline: the score minus its group's mean, 0 for a group of one or of
    equal scores) on EOS, -kl_coef (logp - logp_ref) on every valid token, the reward-to-go, whitened over
    the batch's valid tokens with the biased variance, eps 1e-8 inside the root. Returns (advantages, the
    reward-to-go before whitening)."""
    s = naive_group_advantages(scores, groups, "dr_grpo") if baseline else np.asarray(scores, np.float64)
    to_go = np.zeros(mask.shape)
    for b in range(len(mask)):
        n = int(mask[b].sum())
        for t in range(n):
            to_go[b, t] = s[b] - kl_coef * sum(logp[b, u] - logp_ref[b, u] for u in range(t, n))
    v = to_go[mask > 0]
    return np.where(mask > 0, (to_go - v.mean()) / np.sqrt(v.var() + 1e-8), 0), to_go
