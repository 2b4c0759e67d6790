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

The GPT-2 paper (Radford et al. 2019) and karpathy/llm.c's train_gpt2.c lay out the same ops.
"""
import numpy as np

GELU_K = float(np.sqrt(2.0 / np.pi))  # sqrt(2/pi) of the tanh approximation


# ---------------------------------------------------------------- row sums and softmax (no gradients)

def row_sum(a, axis=-1):
    """a.sum(axis, keepdims=True). Over the last axis, as a product with a column of ones.

    The product makes BLAS do the adding: on attention's (32, 4, 64, 64) float32 scores it takes 0.04 ms
    against 0.22 ms for a.sum(-1, keepdims=True), and LayerNorm's row means get 6x faster the same way
    (measured on the 2-core machine, PERFORMANCE_NOTES.md). The same sum, in another rounding order.
    """
    if axis not in (-1, a.ndim - 1):
        return a.sum(axis=axis, keepdims=True)
    return a @ np.ones((a.shape[-1], 1), a.dtype)


def log_softmax(z, axis=-1):
    """log softmax, stable for any finite z: subtract the max before exp."""
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(row_sum(np.exp(z), axis))


def softmax(z, axis=-1):
    """softmax; a row of -inf apart from at least one finite entry is fine."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    e /= row_sum(e, axis)  # in place: e is a new array of our own
    return e


# ---------------------------------------------------------------- embedding

def embedding_forward(W, idx):
    """W: (V, C) table, idx: (...) int ids -> out (..., C). cache: idx, V."""
    return W[idx], (idx, W.shape[0])


def embedding_backward(dout, cache):
    """dW = onehot(idx)^T dout: rows of dout added into the rows they were read from.

    A one-hot matmul rather than np.add.at: 0.4 ms against 2.5 ms at demo size (PERFORMANCE_NOTES.md).
    """
    idx, V = cache
    C = dout.shape[-1]
    onehot = (idx.reshape(-1, 1) == np.arange(V)).astype(dout.dtype)  # (N, V)
    return onehot.T @ dout.reshape(-1, C)  # (V, C)


# ---------------------------------------------------------------- linear

def linear_forward(x, W, b):
    """x: (..., Cin), W: (Cin, Cout), b: (Cout,) -> out (..., Cout). cache: x, W.

    x is flattened to (N, Cin) so that BLAS gets one product over all rows: NumPy would otherwise make
    one call per sequence. (0.67 against 0.74 ms forward, 0.68 against 0.91 ms for dx, at (32, 64, 64)
    @ (64, 256) float32.)
    """
    Cin, Cout = W.shape
    out = x.reshape(-1, Cin) @ W
    out += b  # in place: one buffer fewer than x @ W + b
    return out.reshape(*x.shape[:-1], Cout), (x, W)


def linear_backward(dout, cache):
    """Undoes out = x @ W + b. Returns dx, dW, db."""
    x, W = cache
    Cin, Cout = W.shape
    dout = dout.reshape(-1, Cout)  # (N, Cout), as in the forward
    dx = (dout @ W.T).reshape(x.shape)
    dW = x.reshape(-1, Cin).T @ dout
    db = dout.sum(axis=0)
    return dx, dW, db


# ---------------------------------------------------------------- layernorm

def layernorm_forward(x, g, b, eps=1e-5):
    """Normalise the last axis with the biased variance, then scale and shift. cache: xhat, rstd, g."""
    C = x.shape[-1]
    mu = row_sum(x) / C
    xc = x - mu
    var = row_sum(xc * xc) / C  # biased: divide by C, as PyTorch does
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    out = xhat * g
    out += b  # in place, as in linear_forward
    return out, (xhat, rstd, g)


def layernorm_backward(dout, cache):
    """Undoes out = xhat * g + b, xhat = (x - mu) * rstd. Returns dx, dg, db."""
    xhat, rstd, g = cache
    C = g.shape[0]
    dout_xhat = dout * xhat
    dg = dout_xhat.reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    dxhat = dout * g
    # mu and rstd depend on every x in the row, hence the two mean terms. Their row sums are products with
    # g, which BLAS does (see row_sum): sum_c dxhat = dout . g and sum_c dxhat xhat = (dout xhat) . g
    mean_dxhat = (dout.reshape(-1, C) @ g).reshape(rstd.shape) / C
    mean_dxhat_xhat = (dout_xhat.reshape(-1, C) @ g).reshape(rstd.shape) / C
    dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
    return dx, dg, db


# ---------------------------------------------------------------- gelu

def gelu_forward(x):
    """GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). cache: x, tanh(u)."""
    # u and t are worked out in one buffer, in place: 0.47 against 0.61 ms at (32, 64, 256) float32
    u = x * x
    u *= 0.044715
    u += 1.0
    u *= x
    u *= GELU_K  # u = sqrt(2/pi) (x + 0.044715 x^3)
    t = np.tanh(u, out=u)
    out = 1.0 + t
    out *= x
    out *= 0.5
    return out, (x, t)


def gelu_backward(dout, cache):
    """Undoes out = 0.5 x (1 + t), t = tanh(u(x)). Returns dx.

    dout * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx), with 1 - t^2 = (1 - t)(1 + t) taken out as a factor:
    dout * 0.5 (1 + t) * (1 + x (1 - t) du/dx), evaluated in place (0.46 against 0.65 ms, as above).
    """
    x, t = cache
    du = x * x
    du *= 3.0 * 0.044715
    du += 1.0
    du *= GELU_K  # du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    dx = 1.0 - t
    dx *= x
    dx *= du
    dx += 1.0  # 1 + x (1 - t) du/dx
    dx *= 1.0 + t
    dx *= 0.5
    dx *= dout
    return dx


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
    scale = 1.0 / float(np.sqrt(q.shape[-1]))
    s = (q * scale) @ k.swapaxes(-1, -2)  # (B, H, Tq, Tk); scaling q is 1/4 the work of scaling s
    # -inf, not -1e9: exp(-inf) is exactly 0. Added as a (B, 1, Tq, Tk) bias: 2x faster than np.where on s
    s += np.where(allowed, 0.0, -np.inf).astype(s.dtype)
    p = softmax_shifted_by_own_score(s)
    return p @ v, p


def softmax_shifted_by_own_score(s):
    """softmax over the last axis of attention scores (Tq, Tk), shifting each query's row by its score
    for its own position, s[i, Tk - Tq + i], instead of by the row max.

    Any per-row shift gives the same softmax; the max only keeps exp from overflowing. A query may always
    look at its own position (attention_mask allows the diagonal, decoding the new slot), so exp(0) = 1
    is in every row's sum, which therefore cannot underflow to 0. If another score is more than ~88
    above the own one (709 in float64), the sum overflows; that is caught and the row max used after
    all. Skipping the max, which NumPy reduces one short row at a time, saves 0.45 ms a call at
    (32, 4, 64, 64) float32: 3% of a training step.
    """
    Tq, Tk = s.shape[-2:]
    own = np.diagonal(s, offset=Tk - Tq, axis1=-2, axis2=-1)[..., None]  # (..., Tq, 1)
    with np.errstate(over="ignore", invalid="ignore"):  # both are caught just below
        e = np.exp(s - own)
        total = row_sum(e)  # finite terms can still sum past the float range
    if not np.isfinite(total).all():  # an overflow, or a query barred from its own position
        return softmax(s)
    e /= total
    return e


def attention_forward(qkv, n_head, allowed):
    """qkv: (B, T, 3C) fused projections, allowed: (B, 1, T, T) bool -> out (B, T, C).
    cache: q, k, v, p (needed for dq, dk, dv)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    # (B, T, 3, H, D) -> (3, B, H, T, D): strided views, no copy
    q, k, v = qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)
    # k becomes a view of a contiguous copy of k^T: BLAS then computes q k^T 1.6x faster than from the
    # strided view of qkv (inner size D = 16), 1.2x with the copy
    k = np.ascontiguousarray(k.swapaxes(-1, -2)).swapaxes(-1, -2)
    o, p = attend(q, k, v, allowed)
    out = o.transpose(0, 2, 1, 3).reshape(B, T, C)  # heads side by side again
    return out, (q, k, v, p)


def attention_backward(dout, cache):
    """Undoes o = softmax(q k^T / sqrt(D) + mask) v. Returns dqkv (B, T, 3C)."""
    q, k, v, p = cache
    B, H, T, D = q.shape
    scale = 1.0 / float(np.sqrt(D))
    do = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    # dq, dk, dv are written straight into their slots of dqkv (B, T, 3, H, D): no stacking copy
    dqkv = np.empty((B, T, 3, H, D), dout.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, D) views
    np.matmul(p.swapaxes(-1, -2), do, out=dv)  # o = p v: dv = p^T do
    dp = do @ np.ascontiguousarray(v.swapaxes(-1, -2))  # contiguous v^T: faster, as k^T in the forward
    # p = softmax(s): ds = p (dp - rowsum(dp p)); masked entries have p = 0, so ds = 0 there
    ds = p * (dp - row_sum(dp * p))
    np.matmul(ds, k * scale, out=dq)  # s = q k^T * scale
    np.matmul(ds.swapaxes(-1, -2), q * scale, out=dk)
    return dqkv.reshape(B, T, 3 * H * D)


# ---------------------------------------------------------------- losses and log-probs on logits

def cross_entropy_forward(logits, targets, mask):
    """Mean of -log softmax(logits)[target] over positions with mask 1.

    logits: (B, T, V), targets: (B, T) ints, mask: (B, T) 0/1. cache: p, targets, mask, N_valid.
    """
    n_valid = float(mask.sum())
    if n_valid == 0:
        raise ValueError("cross_entropy: the mask has no valid position")
    logp = log_softmax(logits)
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
    loss = -(picked * mask.astype(logp.dtype)).sum() / logp.dtype.type(n_valid)
    return loss, (np.exp(logp), targets, mask, n_valid)


def cross_entropy_backward(dloss, cache):
    """Undoes L = -sum(mask * log p[y]) / N. Returns dlogits = (p - onehot(y)) * mask / N * dloss."""
    p, targets, mask, n_valid = cache
    dlogits = p.copy()
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(p, targets[..., None], -1) - 1, -1)
    return dlogits * (mask[..., None] * (dloss / n_valid)).astype(p.dtype)


def token_logprobs_forward(logits, targets, temperature=1.0):
    """log softmax(logits / tau)[target] at every position: (B, T, V), (B, T) -> (B, T).

    The same tau is used when sampling, so scored and sampled distributions agree. cache: p, targets, tau.
    """
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
    """Entropy of softmax(logits / tau) at every position: (B, T, V) -> (B, T). cache: p, logp, H, tau."""
    logp = log_softmax(logits / temperature)
    p = np.exp(logp)
    H = -(p * logp).sum(axis=-1)
    return H, (p, logp, H, temperature)


def entropy_backward(dH, cache):
    """Undoes H = -sum_j p_j log p_j. Returns dlogits = -p (log p + H) / tau * dH."""
    p, logp, H, tau = cache
    return -p * (logp + H[..., None]) * (dH[..., None] / tau).astype(p.dtype)
