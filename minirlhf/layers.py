"""The layers of a GPT, each a forward/backward pair with a hand-derived gradient.

Shape letters used throughout: B = batch, T = time (sequence length), C = channels (n_embd),
H = heads, D = C / H (head size), V = vocabulary size, N = number of rows (B*T flattened).

Every op follows cs231n's pattern:

    out, cache = op_forward(inputs...)      # cache holds only what backward needs
    dinputs... = op_backward(dout, cache)   # gradients in the order of the forward's inputs

where dX always means dLoss/dX and has X's shape. Backward never updates anything. Each backward comment
quotes the forward line it undoes. The ops and their gradients:

    embedding      out = W[idx]                        dW = onehot(idx)^T dout
    linear         out = x W + b                       dx = dout W^T, dW = x^T dout, db = sum dout
    layernorm      xhat = (x - mu) * rstd,             dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
                   out = g xhat + b                    with dxhat = g dout (biased variance)
    gelu (tanh)    out = 0.5 x (1 + tanh u),           dx = dout (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx)
                   u = sqrt(2/pi) (x + 0.044715 x^3)   du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    attention      S = Q K^T / sqrt(D) (masked -inf)   dV = P^T dO, dP = dO V^T,
                   P = softmax(S), O = P V             dS = P (dP - rowsum(dP P)),
                                                       dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D)
    cross-entropy  L = -sum_m log p[y] / N_valid       dz = (p - onehot(y)) m / N_valid
    token log-prob l = log softmax(z / tau)[y]         dz = (onehot(y) - p) / tau
    entropy        H = -sum_j p_j log p_j, p = softmax(z / tau)
                                                       dz_j = -p_j (log p_j + H) / tau

This file is the plain, readable form of each op. The transformer's training and sampling run the same ops
from fast.py, which computes them faster (fewer temporary arrays, BLAS for row sums, one thread per half
batch); tests/test_fast_paths.py checks that the two agree. The GPT-2 paper (Radford et al. 2019) and
karpathy/llm.c's train_gpt2.c lay out the same ops.
"""
import numpy as np

from . import validate as V

GELU_K = float(np.sqrt(2.0 / np.pi))  # sqrt(2/pi) of the tanh approximation


# ---------------------------------------------------------------- softmax (no gradients of their own)

def log_softmax(z, axis=-1):
    """log softmax, stable for any finite z: subtract the max before exp."""
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax(z, axis=-1):
    """softmax; a row of -inf apart from at least one finite entry is fine."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------- embedding

def embedding_forward(W, idx):
    """W: (V, C) table, idx: (...) int ids -> out (..., C). cache: idx, V."""
    return W[idx], (idx, W.shape[0])


def embedding_backward(dout, cache):
    """dW = onehot(idx)^T dout: rows of dout added into the rows they were read from."""
    idx, V = cache
    C = dout.shape[-1]
    onehot = (idx.reshape(-1, 1) == np.arange(V)).astype(dout.dtype)  # (N, V)
    return onehot.T @ dout.reshape(-1, C)  # (V, C)


# ---------------------------------------------------------------- linear

def linear_forward(x, W, b):
    """x: (..., Cin), W: (Cin, Cout), b: (Cout,) -> out (..., Cout). cache: x, W."""
    return x @ W + b, (x, W)


def linear_backward(dout, cache):
    """Undoes out = x @ W + b. Returns dx, dW, db."""
    x, W = cache
    Cin, Cout = W.shape
    dx = dout @ W.T
    dW = x.reshape(-1, Cin).T @ dout.reshape(-1, Cout)  # sum over every row of x^T dout
    db = dout.reshape(-1, Cout).sum(axis=0)
    return dx, dW, db


# ---------------------------------------------------------------- layernorm

def layernorm_forward(x, g, b, eps=1e-5):
    """Normalise the last axis with the biased variance, then scale and shift. cache: xhat, rstd, g."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # biased: divide by C, as PyTorch does
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * rstd
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward(dout, cache):
    """Undoes out = xhat * g + b, xhat = (x - mu) * rstd. Returns dx, dg, db."""
    xhat, rstd, g = cache
    C = g.shape[0]
    dg = (dout * xhat).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    dxhat = dout * g
    # mu and rstd depend on every x in the row, hence the two mean terms
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dg, db


# ---------------------------------------------------------------- gelu

def gelu_forward(x):
    """GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). cache: x, tanh(u)."""
    t = np.tanh(GELU_K * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dout, cache):
    """Undoes out = 0.5 x (1 + t), t = tanh(u(x)). Returns dx."""
    x, t = cache
    du = GELU_K * (1.0 + 3.0 * 0.044715 * x ** 2)  # du/dx
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t ** 2) * du)


# ---------------------------------------------------------------- causal self-attention

def attention_mask(key_mask):
    """allowed[b, 0, i, j]: query i may look at key j. (B, T) 0/1 key mask -> (B, 1, T, T) bool.

    Causal (j <= i) and j is a real token; the diagonal is always allowed, so a padding query (which no
    real token ever reads) still has one key and its softmax stays finite.
    """
    T = key_mask.shape[1]
    causal = np.tril(np.ones((T, T), dtype=bool))
    allowed = causal & (key_mask[:, None, None, :] > 0)
    return allowed | np.eye(T, dtype=bool)


def attend(q, k, v, allowed):
    """Scaled dot-product attention over heads. q: (B, H, Tq, D), k, v: (B, H, Tk, D),
    allowed: bool broadcastable to (B, H, Tq, Tk). Returns o (B, H, Tq, D) and p (B, H, Tq, Tk)."""
    s = q @ k.swapaxes(-1, -2) / float(np.sqrt(q.shape[-1]))  # (B, H, Tq, Tk); a Python float keeps float32
    p = softmax(np.where(allowed, s, -np.inf))  # -inf, not -1e9: exp(-inf) is exactly 0
    return p @ v, p


def attention_forward(qkv, n_head, allowed):
    """qkv: (B, T, 3C) fused projections, allowed: (B, 1, T, T) bool -> out (B, T, C).
    cache: q, k, v, p (needed for dq, dk, dv)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
    o, p = attend(q, k, v, allowed)
    out = o.transpose(0, 2, 1, 3).reshape(B, T, C)  # heads side by side again
    return out, (q, k, v, p)


def attention_backward(dout, cache):
    """Undoes o = softmax(q k^T / sqrt(D) + mask) v. Returns dqkv (B, T, 3C)."""
    q, k, v, p = cache
    B, H, T, D = q.shape
    do = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    dv = p.swapaxes(-1, -2) @ do  # o = p v
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # p = softmax(s); masked entries have p = 0
    dq = ds @ k / float(np.sqrt(D))  # s = q k^T / sqrt(D)
    dk = ds.swapaxes(-1, -2) @ q / float(np.sqrt(D))
    dqkv = np.stack([dq, dk, dv], axis=2)  # (B, H, 3, T, D): q | k | v, as the forward split them
    return dqkv.transpose(0, 3, 2, 1, 4).reshape(B, T, 3 * H * D)


# ---------------------------------------------------------------- losses and log-probs on logits

def check_targets(logits, targets):
    """ValueError unless targets is an integer array of the logits' leading shape with ids in [0, V)."""
    targets = np.asarray(targets)
    V = np.shape(logits)[-1]
    if targets.shape != np.shape(logits)[:-1] or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer ids of shape {np.shape(logits)[:-1]}, got {targets.dtype} "
                         f"{targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"target id {int(targets[(targets < 0) | (targets >= V)][0])} is outside [0, {V})")
    return targets


def check_temperature(owner, temperature):
    """tau as a Python float (float32 stays float32), or ValueError unless it is finite and > 0."""
    return V.number(owner, "temperature", temperature, low=0, low_open=True)


def cross_entropy_forward(logits, targets, mask):
    """Mean of -log softmax(logits)[target] over positions with mask 1.

    logits: (B, T, V), targets: (B, T) ints, mask: (B, T) 0/1 (weights >= 0 give the weighted mean, which
    the gradient checks use as a random upstream gradient). cache: p, targets, mask, N_valid.
    """
    targets = check_targets(logits, targets)
    mask = np.asarray(mask)
    if mask.shape != targets.shape or not (mask >= 0).all():  # NaN fails >= 0 too
        raise ValueError(f"cross_entropy: mask must be a 0/1 array (or weights >= 0) of the targets' shape "
                         f"{targets.shape}, got {mask.dtype} {mask.shape}")
    n_valid = float(mask.sum())
    if n_valid == 0:
        raise ValueError("cross_entropy: the mask has no valid position")
    logp = log_softmax(logits)
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
    loss = -(picked * mask.astype(logp.dtype)).sum() / logp.dtype.type(n_valid)
    if not np.isfinite(loss):  # one scalar test: a NaN or +inf logit anywhere, or a target of logit -inf
        raise ValueError("cross_entropy is not finite: logits hold a NaN or +inf, or a target's logit is -inf")
    return loss, (np.exp(logp), targets, mask, n_valid)


def cross_entropy_backward(dloss, cache):
    """Undoes L = -sum(mask * log p[y]) / N. Returns dlogits = (p - onehot(y)) * mask / N * dloss."""
    p, targets, mask, n_valid = cache
    dlogits = p.copy()  # the cache is read, never written: a second backward gives the same answer
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(p, targets[..., None], -1) - 1, -1)
    return dlogits * (mask[..., None] * (dloss / n_valid)).astype(p.dtype)


def token_logprobs_forward(logits, targets, temperature=1.0):
    """log softmax(logits / tau)[target] at every position: (B, T, V), (B, T) -> (B, T).

    The same tau is used when sampling, so scored and sampled distributions agree. cache: p, targets, tau.
    """
    targets = check_targets(logits, targets)
    temperature = check_temperature("token_logprobs_forward", temperature)
    logp = log_softmax(logits / temperature)
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, (np.exp(logp), targets, temperature)


def token_logprobs_backward(dlogp, cache):
    """Undoes l = log softmax(z / tau)[y]. Returns dlogits = dl * (onehot(y) - p) / tau."""
    p, targets, tau = cache
    dz = -p
    np.put_along_axis(dz, targets[..., None], np.take_along_axis(dz, targets[..., None], -1) + 1, -1)
    return dz * (dlogp[..., None] / tau).astype(p.dtype)


def entropy_forward(logits, temperature=1.0):
    """Entropy of softmax(logits / tau) at every position: (B, T, V) -> (B, T). cache: p, logp, H, tau.

    A logit of -inf (a token ruled out) has p = 0 and adds 0: 0 log 0 is taken as its limit, 0. A row with a
    NaN or +inf logit, or with every logit -inf, has no distribution: ValueError."""
    temperature = check_temperature("entropy_forward", temperature)
    with np.errstate(invalid="ignore"):  # a row with no distribution turns NaN here, and is refused below
        logp = log_softmax(logits / temperature)
    bad = np.isnan(logp[..., 0])  # such a row's logp is NaN throughout (its max is NaN or infinite)
    if bad.any():
        raise ValueError(f"entropy_forward: logits hold a NaN or +inf, or only -inf, at position "
                         f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
    p = np.exp(logp)
    plogp = np.where(p > 0, p * np.where(p > 0, logp, 0), 0)
    H = -plogp.sum(axis=-1)
    return H, (p, logp, H, temperature)


def entropy_backward(dH, cache):
    """Undoes H = -sum_j p_j log p_j. Returns dlogits = -p (log p + H) / tau * dH (0 where p = 0)."""
    p, logp, H, tau = cache
    return -p * (np.where(p > 0, logp, 0) + H[..., None]) * (dH[..., None] / tau).astype(p.dtype)
