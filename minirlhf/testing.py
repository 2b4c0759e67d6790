"""Checking tools: centred finite differences and the relative error that every gradient test uses.

A hand-derived gradient g of a scalar function f is checked against the fourth-order centred difference

    g_num[i] = (8 (f(x + h e_i) - f(x - h e_i)) - (f(x + 2h e_i) - f(x - 2h e_i))) / (12 h)

whose truncation error is O(h^4) (the plain (f(x+h) - f(x-h)) / 2h is O(h^2)), plus rounding of order
eps |f| / h. With h = 1e-3 in float64 both terms are near 1e-13 absolute. The higher order matters for
the many tiny entries of a whole model's gradient (1e-7 next to a largest entry of 0.07): measured on the
2-layer test model, the plain centred difference at its best h (1e-4) leaves 1.3e-5 relative error on
such an entry; this stencil leaves 2.2e-7 on the worst entry of every parameter.

The error measure is cs231n's

    rel_error(a, b) = max_i |a_i - b_i| / max(1e-8, |a_i| + |b_i|)

Tests demand < 1e-7 for single ops and < 1e-5 for whole models. Both functions take any callable that
returns NumPy values, so a port (PyTorch, JAX) can be checked with the same code.

The rest is the toolbox that minirlhf's tests and the conformance kit (conformance.py) share:
hypothesis strategies and a tiny model; `gradient_errors`, which checks a vector-Jacobian product of any
framework against finite differences; `assert_close`; and naive loop oracles (attention, GAE, AdamW),
each the textbook formula written one element at a time.
"""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from . import transformer as tf

TINY = tf.Config(vocab_size=7, n_ctx=6, n_layer=2, n_head=2, n_embd=8)  # ids 0-2 PAD BOS EOS, 3-6 text


def rel_error(a, b):
    """Largest elementwise relative error between two arrays of one shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def numerical_gradient(f, x, h=1e-3):
    """Fourth-order centred-difference gradient of the scalar f() with respect to the float64 array x.

    x is perturbed in place, one element at a time, and restored; f takes no arguments and reads x.
    """
    grad = np.zeros_like(x)
    grad.reshape(-1)[:] = numerical_gradient_at(f, x, np.arange(x.size), h)
    return grad


def numerical_gradient_at(f, x, indices, h=1e-3):
    """The same stencil at chosen flat indices of x only: (len(indices),) derivatives.

    A whole model's check of every entry costs 4 forward passes per entry; the conformance kit checks a
    random subset of each parameter this way when the forward is slow (a port in another framework).
    """
    if x.dtype != np.float64:
        raise ValueError(f"finite differences need float64, got {x.dtype}")
    flat = x.reshape(-1)  # a view into x
    if x.size and not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous: it is perturbed in place through a flat view")
    out = np.zeros(len(indices))
    for n, i in enumerate(indices):
        old = flat[i]
        f_at = {}
        for step in (2, 1, -1, -2):
            flat[i] = old + step * h
            f_at[step] = float(f())
        flat[i] = old
        out[n] = (8 * (f_at[1] - f_at[-1]) - (f_at[2] - f_at[-2])) / (12 * h)
    return out


def check_gradients(f, arrays, analytic, h=1e-3):
    """Relative error of each analytic gradient against finite differences of f.

    arrays: dict name -> float64 array that f reads; analytic: dict name -> dL/d(array).
    Returns dict name -> relative error.
    """
    return {name: rel_error(analytic[name], numerical_gradient(f, arrays[name], h)) for name in arrays}


def model_gradient_errors(f, params, grads, n_embd, h=1e-3):
    """Relative error of every parameter's analytic gradient against finite differences of the loss f().

    One exception, checked separately: the key part of each attention bias, b_qkv[C:2C], adds q . b_k to
    every score of a query's row, and softmax ignores a constant shift, so its true gradient is exactly 0.
    A relative error there would only compare rounding noise; both gradients must be ~0 instead.
    Returns dict name -> relative error (the caller asserts its bound: < 1e-5 for whole models).
    """
    if grads.keys() != params.keys():
        raise AssertionError(f"gradient names differ from parameter names: {sorted(set(grads) ^ set(params))}")
    errors = {}
    for name in params:
        analytic, numeric = grads[name], numerical_gradient(f, params[name], h)
        if name.endswith("attn.b_qkv"):
            key = np.s_[n_embd:2 * n_embd]
            if not (np.abs(analytic[key]).max() < 1e-12 and np.abs(numeric[key]).max() < 1e-9):
                raise AssertionError(f"{name}: the key bias's gradient must be 0 (softmax shift invariance)")
            analytic, numeric = np.delete(analytic, key), np.delete(numeric, key)
        errors[name] = rel_error(analytic, numeric)
    return errors


# ---------------------------------------------------------------- hypothesis strategies and tiny models

SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def prefix_masks(draw, B, T):
    """(B, T) int64 0/1 masks whose rows are a valid prefix of length >= 1 (right padding)."""
    lengths = np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)


@st.composite
def logit_batches(draw, bound=30.0):
    """(B, T, V) float64 logits, B <= 3, T <= 4, 2 <= V <= 6, entries in [-bound, bound]."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6)))
    return draw(hnp.arrays(np.float64, shape, elements=st.floats(-bound, bound)))


@st.composite
def masked_pairs(draw, lo=-20.0, hi=0.0):
    """(a, b, mask): two (B, T) float64 arrays in [lo, hi], a prefix mask, NaN at every padding entry."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    mask = draw(prefix_masks(B, T))
    a, b = (draw(hnp.arrays(np.float64, (B, T), elements=st.floats(lo, hi))) for _ in range(2))
    a[mask == 0], b[mask == 0] = np.nan, np.nan
    return a, b, mask


def tiny_model(cfg=TINY, seed=0, head=False, scale=0.3):
    """float64 parameters with a wide init (every path carries signal); head=True adds head.w, head.b."""
    rng = np.random.default_rng(seed)
    params = {k: v + scale * rng.standard_normal(v.shape) for k, v in tf.init_params(cfg, rng, np.float64).items()}
    if head:
        params["head.w"], params["head.b"] = rng.standard_normal(cfg.n_embd), np.asarray(0.3)
    return params


def off_kink_batch(seed, eps=0.2):
    """(mask, base, offset, signed) for the PPO losses: (B, T) arrays, row 1 ending in two padding tokens
    (finite garbage there), offsets (log-ratios, value changes) of 0.25 or 2.5 times eps: off the clip kinks."""
    r = np.random.default_rng(seed)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    offset = eps * r.choice([-2.5, -0.25, 0.25, 2.5], size=mask.shape)  # |.| < eps or > 2 eps
    sign = r.choice([-1.0, 1.0], size=mask.shape)
    base = r.standard_normal(mask.shape) - 1
    return mask, base, offset, sign * r.uniform(0.3, 1.5, mask.shape)


# ---------------------------------------------------------------- checks on any implementation

def assert_close(actual, expected, tol, what):
    """|actual - expected| <= tol (1 + |expected|) everywhere, shapes equal, no NaN."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape}, expected {e.shape}")
    err = np.nan_to_num(np.abs(a - e) / (1 + np.abs(e)), nan=np.inf)
    if a.size and not err.max() <= tol:
        raise AssertionError(f"{what}: off by {err.max():.3g} (relative to 1 + |expected|), tolerance {tol:g}")


def gradient_errors(forward, vjp, inputs, wrt, tol, seed=0, where=None, max_entries=None, zero=None):
    """Worst relative error of vjp against finite differences of Loss = sum((forward(**inputs) * dout)[where]).

    wrt: input names to check; an input that is a dict (a model's "params") is checked parameter by
    parameter. max_entries: check a random subset per array. zero: {parameter: flat indices whose true
    gradient is exactly 0} (checked to be ~0, left out of the relative error). Asserts each error < tol;
    returns {array: error}, or {} when vjp is None (nothing to check).
    """
    if vjp is None:
        return {}
    rng = np.random.default_rng(seed)
    out = np.asarray(forward(**inputs))
    keep = np.ones(out.shape, bool) if where is None else np.broadcast_to(where, out.shape)
    dout = np.where(keep, rng.standard_normal(out.shape), 0.0)  # a random upstream gradient, not ones
    loss = lambda: float(np.sum((np.asarray(forward(**inputs)) * dout)[keep]))  # noqa: E731
    grads, errors = vjp(dout, **inputs), {}
    for name in wrt:
        nested = isinstance(inputs[name], dict)
        for key, x in (inputs[name].items() if nested else [(name, inputs[name])]):
            analytic = np.asarray(grads[name][key] if nested else grads[name], np.float64).reshape(-1)
            idx = np.arange(x.size)
            if zero and key in zero:
                if not np.abs(analytic[zero[key]]).max() < 1e-10:
                    raise AssertionError(f"gradient of {key}: entries {zero[key]} should be exactly 0")
                idx = np.setdiff1d(idx, zero[key])
            if max_entries is not None and idx.size > max_entries:
                idx = np.sort(rng.choice(idx, max_entries, replace=False))
            errors[key] = rel_error(analytic[idx], numerical_gradient_at(loss, x, idx))
            if not errors[key] < tol:
                raise AssertionError(f"gradient of {key}: relative error {errors[key]:.2e} >= {tol:g}")
    return errors


# ---------------------------------------------------------------- naive oracles (loops, one formula each)

def naive_attention(qkv, key_mask, n_head):
    """The textbook formula one query at a time: query i reads keys j <= i that are real tokens."""
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
    """PyTorch's AdamW step by step: grads[k][s] is step s's gradient; global-norm clip; decay on ndim >= 2;
    m_hat / (sqrt(v_hat) + eps), eps outside the square root."""
    p = {k: x.copy() for k, x in params.items()}
    m, v = ({k: np.zeros_like(x) for k, x in params.items()} for _ in range(2))
    for t in range(1, len(next(iter(grads.values()))) + 1):
        g = {k: grads[k][t - 1] for k in p}
        norm = np.sqrt(sum((x**2).sum() for x in g.values()))
        scale = max_grad_norm / (norm + 1e-6) if max_grad_norm is not None and norm > max_grad_norm else 1.0
        for k in p:
            p[k] = p[k] - lr * weight_decay * p[k] if p[k].ndim >= 2 else p[k]
            m[k] = beta1 * m[k] + (1 - beta1) * scale * g[k]
            v[k] = beta2 * v[k] + (1 - beta2) * (scale * g[k]) ** 2
            p[k] = p[k] - lr * (m[k] / (1 - beta1**t)) / (np.sqrt(v[k] / (1 - beta2**t)) + eps)
    return p
