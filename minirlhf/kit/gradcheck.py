"""The gradient checker every gradient test and the conformance kit use: centred finite differences and
cs231n's relative error. NumPy only (no hypothesis), so a port can run it from any framework.

A hand-derived gradient g of a scalar function f is checked against the fourth-order centred difference

    g_num[i] = (8 (f(x + h e_i) - f(x - h e_i)) - (f(x + 2h e_i) - f(x - 2h e_i))) / (12 h)

whose truncation error is O(h^4) (the plain (f(x+h) - f(x-h)) / 2h is O(h^2)), plus rounding of order
eps |f| / h. With h = 1e-3 in float64 both terms are near 1e-13 absolute. The higher order matters for
the many tiny entries of a whole model's gradient (1e-7 next to a largest entry of 0.07): measured on a
2-layer test model, the plain centred difference at its best h (1e-4) leaves 1.3e-5 relative error on
such an entry; this stencil leaves 2.2e-7 on the worst entry of every parameter.

The error measure is cs231n's

    rel_error(a, b) = max_i |a_i - b_i| / max(1e-8, |a_i| + |b_i|)

Tests demand < 1e-7 for single ops (OP_TOL) and < 1e-5 for whole models (MODEL_TOL).

One checker, `gradient_errors(loss, arrays, grads)`: arrays maps names to the float64 arrays loss() reads
(or to dicts of them: a model's parameters), grads the analytic gradients with the same structure. An
entry whose true gradient is exactly 0 for a structural reason (`key_bias_zero`) is checked to be ~0 in
both gradients and left out of the relative error, which would only compare rounding noise there.
`vjp_errors` is the same check in the conformance kit's calling convention (forward and vjp callables).
"""
import numpy as np

OP_TOL, MODEL_TOL = 1e-7, 1e-5  # relative-error bounds: a single op, a whole model (every parameter)


def rel_error(a, b):
    """Largest elementwise relative error between two arrays of one shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def numerical_gradient(f, x, indices=None, h=1e-3):
    """Fourth-order centred-difference derivatives of the scalar f() with respect to the float64 array x,
    at the flat indices given (all of them by default; then shaped like x).

    x is perturbed in place, one element at a time, and restored; f takes no arguments and reads x.
    """
    if x.dtype != np.float64:
        raise ValueError(f"finite differences need float64, got {x.dtype}")
    flat = x.reshape(-1)  # a view into x
    if x.size and not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous: it is perturbed in place through a flat view")
    idx = np.arange(x.size) if indices is None else np.asarray(indices)
    out = np.zeros(len(idx))
    for n, i in enumerate(idx):
        old = flat[i]
        f_at = {}
        for step in (2, 1, -1, -2):
            flat[i] = old + step * h
            f_at[step] = float(f())
        flat[i] = old
        out[n] = (8 * (f_at[1] - f_at[-1]) - (f_at[2] - f_at[-2])) / (12 * h)
    return out.reshape(x.shape) if indices is None else out


def gradient_errors(loss, arrays, grads, zero=None, max_entries=None, seed=0):
    """{array name: relative error} of each analytic gradient against finite differences of loss().

    arrays: name -> float64 array, or name -> dict of arrays (a model's parameters, checked one by one under
    their own names); grads: the same structure. zero: {name: flat indices whose true gradient is exactly
    0}: those must be < 1e-10 analytically and < 1e-8 numerically, and are left out of the error.
    max_entries: check a random subset of each array (a slow framework's model). The caller asserts the bound.
    """
    rng, errors = np.random.default_rng(seed), {}
    for name, x in arrays.items():
        nested = isinstance(x, dict)
        if nested and set(grads[name]) != set(x):
            raise AssertionError(f"gradient names differ from parameter names: {sorted(set(grads[name]) ^ set(x))}")
        for key, xi in (x.items() if nested else [(name, x)]):
            analytic = np.asarray(grads[name][key] if nested else grads[name], np.float64)
            if analytic.shape != xi.shape:
                raise AssertionError(f"gradient of {key} has shape {analytic.shape}, the input {xi.shape}")
            analytic, idx = analytic.reshape(-1), np.arange(xi.size)
            if zero and key in zero:
                exact0 = np.asarray(zero[key])
                numeric0 = numerical_gradient(loss, xi, exact0)
                if not (np.abs(analytic[exact0]).max() < 1e-10 and np.abs(numeric0).max() < 1e-8):
                    raise AssertionError(f"gradient of {key}: entries {exact0.tolist()} must be exactly 0")
                idx = np.setdiff1d(idx, exact0)
            if max_entries is not None and idx.size > max_entries:
                idx = np.sort(rng.choice(idx, max_entries, replace=False))
            errors[key] = rel_error(analytic[idx], numerical_gradient(loss, xi, idx))
    return errors


def key_bias_zero(model_cfg):
    """{h{l}.attn.b_qkv: the key part's indices}: the key bias adds q . b_k to every score of a query's row,
    and softmax ignores a constant shift, so its true gradient is exactly 0 in every model."""
    C = model_cfg.n_embd
    return {f"h{l}.attn.b_qkv": np.arange(C, 2 * C) for l in range(model_cfg.n_layer)}


def vjp_errors(forward, vjp, inputs, wrt, tol, seed=0, where=None, max_entries=None, zero=None):
    """Worst relative error of vjp against finite differences of Loss = sum((forward(**inputs) * dout)[where]),
    dout a random upstream gradient (not ones). wrt: the input names to check (a dict input, a model's
    "params", is checked parameter by parameter). Asserts each error < tol and returns {array: error}, or
    {} when vjp is None (nothing to check)."""
    if vjp is None:
        return {}
    rng = np.random.default_rng(seed)
    out = np.asarray(forward(**inputs))
    keep = np.ones(out.shape, bool) if where is None else np.broadcast_to(where, out.shape)
    dout = np.where(keep, rng.standard_normal(out.shape), 0.0)
    loss = lambda: float(np.sum((np.asarray(forward(**inputs)) * dout)[keep]))  # noqa: E731
    grads = vjp(dout, **inputs)
    errors = gradient_errors(loss, {k: inputs[k] for k in wrt}, {k: grads[k] for k in wrt}, zero, max_entries,
                             seed)
    for key, err in errors.items():
        if not err < tol:
            raise AssertionError(f"gradient of {key}: relative error {err:.2e} >= {tol:g}")
    return errors


EPS64 = float(np.finfo(np.float64).eps)  # 2.2e-16: the rounding unit every tolerance below is a multiple of


def rounding_tol(n_terms, magnitude=1.0):
    """A bound on the rounding difference of two float64 computations of one quantity that sum n_terms
    terms of size up to magnitude in different orders or forms: 16 eps per term (well above the 1 eps
    a term's rounding and the sum's add, so two correct implementations never differ by more)."""
    return 16.0 * EPS64 * max(1, n_terms) * max(1.0, magnitude)


def worst(actual, expected):
    """(index, actual, expected, error) of the largest |a - e| / (1 + |e|), NaN and inf counting as infinite."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(a == e, 0.0, np.abs(a - e) / (1 + np.abs(e)))  # equal infinities agree; NaN never does
    err = np.where(np.isfinite(err), err, np.inf)
    if a.size == 0:
        return (), None, None, 0.0
    i = np.unravel_index(int(np.argmax(err)), err.shape)
    return tuple(int(k) for k in i), float(a[i]), float(e[i]), float(err[i])


def assert_close(actual, expected, tol, what):
    """|actual - expected| <= tol (1 + |expected|) everywhere and shapes equal; AssertionError naming the worst
    element (its index, both values, the error) and whether a NaN or inf was involved."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape}, expected {e.shape}")
    index, got, want, err = worst(a, e)
    if a.size and not err <= tol:
        nonfinite = "" if np.isfinite(got) and np.isfinite(want) else " (a NaN or inf is involved)"
        raise AssertionError(f"{what}: at index {index} got {got:.10g}, expected {want:.10g}; off by {err:.3g} "
                             f"relative to 1 + |expected|, tolerance {tol:g}{nonfinite}")
