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
"""
import numpy as np


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
    if x.dtype != np.float64:
        raise ValueError(f"finite differences need float64, got {x.dtype}")
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views into x and grad
    for i in range(flat.size):
        old = flat[i]
        f_at = {}
        for step in (2, 1, -1, -2):
            flat[i] = old + step * h
            f_at[step] = float(f())
        flat[i] = old
        gflat[i] = (8 * (f_at[1] - f_at[-1]) - (f_at[2] - f_at[-2])) / (12 * h)
    return grad


def check_gradients(f, arrays, analytic, h=1e-3):
    """Relative error of each analytic gradient against finite differences of f.

    arrays: dict name -> float64 array that f reads; analytic: dict name -> dL/d(array).
    Returns dict name -> relative error.
    """
    return {name: rel_error(analytic[name], numerical_gradient(f, arrays[name], h)) for name in arrays}
