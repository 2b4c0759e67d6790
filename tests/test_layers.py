"""Every layer's hand-derived backward against centred finite differences in float64, and the softmax
properties the rest of the code relies on."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from minirlhf import fast
from minirlhf import layers as L
from minirlhf.kit.gradcheck import gradient_errors
from minirlhf.kit.oracles import naive_attention

B, T, C, H, V = 2, 5, 8, 2, 7


def rng():
    return np.random.default_rng(0)


def shifted(r, *shape):
    """Random float64 inputs moved away from zero (no symmetric cancellations)."""
    return r.standard_normal(shape) + 0.1


def assert_grads(f, arrays, analytic, tol=1e-7):
    errors = gradient_errors(f, arrays, analytic)
    for name, err in errors.items():
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_embedding_gradient():
    r = rng()
    W, idx = shifted(r, V, C), r.integers(0, V, (B, T))
    idx[0, :2] = 3  # a repeated id: its rows must add
    dout = r.standard_normal((B, T, C))
    f = lambda: np.sum(L.embedding_forward(W, idx)[0] * dout)
    _, cache = L.embedding_forward(W, idx)
    assert_grads(f, {"W": W}, {"W": L.embedding_backward(dout, cache)})


def test_linear_gradient():
    r = rng()
    x, W, b = shifted(r, B, T, C), shifted(r, C, 3), shifted(r, 3)
    dout = r.standard_normal((B, T, 3))
    f = lambda: np.sum(L.linear_forward(x, W, b)[0] * dout)
    dx, dW, db = L.linear_backward(dout, L.linear_forward(x, W, b)[1])
    assert_grads(f, {"x": x, "W": W, "b": b}, {"x": dx, "W": dW, "b": db})


def test_layernorm_gradient():
    r = rng()
    x, g, b = shifted(r, B, T, C) * 2, shifted(r, C), shifted(r, C)
    dout = r.standard_normal((B, T, C))
    f = lambda: np.sum(L.layernorm_forward(x, g, b)[0] * dout)
    dx, dg, db = L.layernorm_backward(dout, L.layernorm_forward(x, g, b)[1])
    assert_grads(f, {"x": x, "g": g, "b": b}, {"x": dx, "g": dg, "b": db})


def test_gelu_gradient():
    r = rng()
    x = shifted(r, B, T, C) * 2
    dout = r.standard_normal((B, T, C))
    f = lambda: np.sum(L.gelu_forward(x)[0] * dout)
    assert_grads(f, {"x": x}, {"x": L.gelu_backward(dout, L.gelu_forward(x)[1])})


def test_gelu_matches_formula_and_erf_form():
    from scipy.special import erf
    x = np.linspace(-5, 5, 101)
    exact = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    assert np.max(np.abs(L.gelu_forward(x)[0] - exact)) < 1e-3  # the tanh form approximates erf GELU


def test_attention_gradient_with_padding():
    r = rng()
    qkv = shifted(r, B, T, 3 * C)
    key_mask = np.ones((B, T), np.int64)
    key_mask[1, :2] = 0  # left padding in row 1
    allowed = L.attention_mask(key_mask)
    dout = r.standard_normal((B, T, C))
    f = lambda: np.sum(L.attention_forward(qkv, H, allowed)[0] * dout)
    dqkv = L.attention_backward(dout, L.attention_forward(qkv, H, allowed)[1])
    assert_grads(f, {"qkv": qkv}, {"qkv": dqkv})


def test_attention_matches_naive_loops():
    r = rng()
    qkv = r.standard_normal((B, T, 3 * C))
    key_mask = np.ones((B, T), np.int64)
    key_mask[0, :1] = 0
    allowed = L.attention_mask(key_mask)
    real = key_mask > 0  # the output at a padding query is unspecified
    np.testing.assert_allclose(L.attention_forward(qkv, H, allowed)[0][real], naive_attention(qkv, key_mask, H)[real],
                               rtol=1e-12, atol=1e-12)


def test_cross_entropy_gradient():
    r = rng()
    z, y = shifted(r, B, T, V), r.integers(0, V, (B, T))
    mask = np.ones((B, T))
    mask[0, 3:] = 0
    dloss = 0.7
    f = lambda: dloss * L.cross_entropy_forward(z, y, mask)[0]
    dz = L.cross_entropy_backward(dloss, L.cross_entropy_forward(z, y, mask)[1])
    assert_grads(f, {"z": z}, {"z": dz})
    assert np.all(dz[0, 3:] == 0)


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_token_logprobs_gradient(tau):
    r = rng()
    z, y = shifted(r, B, T, V), r.integers(0, V, (B, T))
    dl = r.standard_normal((B, T))
    f = lambda: np.sum(L.token_logprobs_forward(z, y, tau)[0] * dl)
    dz = L.token_logprobs_backward(dl, L.token_logprobs_forward(z, y, tau)[1])
    assert_grads(f, {"z": z}, {"z": dz})


@pytest.mark.parametrize("tau", [1.0, 1.3])
def test_entropy_gradient(tau):
    r = rng()
    z = shifted(r, B, T, V)
    dH = r.standard_normal((B, T))
    f = lambda: np.sum(L.entropy_forward(z, tau)[0] * dH)
    dz = L.entropy_backward(dH, L.entropy_forward(z, tau)[1])
    assert_grads(f, {"z": z}, {"z": dz})


def test_entropy_bounds():
    z = np.zeros((1, 1, V))
    assert np.isclose(L.entropy_forward(z)[0][0, 0], np.log(V))  # uniform: log V
    z[..., 2] = 1e4
    assert L.entropy_forward(z)[0][0, 0] == pytest.approx(0.0, abs=1e-12)  # one-hot: 0


finite = st.floats(-50, 50, allow_nan=False, width=64)


@given(arrays(np.float64, (3, 6), elements=finite), st.floats(-1e3, 1e3))
def test_softmax_rows_sum_to_one_and_ignore_shift(z, c):
    p = L.softmax(z)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(L.softmax(z + c), p, rtol=1e-9, atol=1e-15)


@given(arrays(np.float64, (2, 5), elements=st.floats(-1e4, 1e4, allow_nan=False)))
def test_log_softmax_finite_for_large_logits(z):
    lp = L.log_softmax(z)
    assert np.all(np.isfinite(lp))
    assert np.all(lp <= 0)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("path", ["plain", "fast"])
@pytest.mark.parametrize("op", ["linear", "layernorm", "gelu", "attention", "logprobs", "entropy", "ce"])
def test_float32_in_float32_out(op, path):
    """Every op keeps float32 float32, in its plain form (layers.py) and its fast form (fast.py)."""
    if path == "fast" and op in ("logprobs", "entropy", "ce"):
        pytest.skip("the losses have no fast form")
    L = fast.OPS if path == "fast" else globals()["L"]
    r = rng()
    x = r.standard_normal((B, T, C)).astype(np.float32)
    z = r.standard_normal((B, T, V)).astype(np.float32)
    y = r.integers(0, V, (B, T))
    if op == "linear":
        out, c = L.linear_forward(x, np.ones((C, 3), np.float32), np.zeros(3, np.float32))
        grads = L.linear_backward(out, c)
    elif op == "layernorm":
        out, c = L.layernorm_forward(x, np.ones(C, np.float32), np.zeros(C, np.float32))
        grads = L.layernorm_backward(out, c)
    elif op == "gelu":
        out, c = L.gelu_forward(x)
        grads = (L.gelu_backward(out, c),)
    elif op == "attention":
        qkv = np.concatenate([x, x, x], -1)
        out, c = L.attention_forward(qkv, H, L.attention_mask(np.ones((B, T), np.int64)))
        grads = (L.attention_backward(out, c),)
    elif op == "logprobs":
        out, c = L.token_logprobs_forward(z, y, 0.9)
        grads = (L.token_logprobs_backward(out, c),)
    elif op == "entropy":
        out, c = L.entropy_forward(z, 0.9)
        grads = (L.entropy_backward(out, c),)
    else:
        out, c = L.cross_entropy_forward(z, y, np.ones((B, T)))
        grads = (L.cross_entropy_backward(1.0, c),)
    assert np.asarray(out).dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)


def test_cross_entropy_backward_reads_its_cache_and_never_writes_it():
    """A second backward from the same cache gives the same gradient (the mutant that wrote p - onehot into
    the cached softmax gave a different one the second time)."""
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((2, 3, 5)), rng.integers(0, 5, (2, 3))
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    _, cache = L.cross_entropy_forward(logits, targets, mask)
    first = L.cross_entropy_backward(1.0, cache)
    np.testing.assert_array_equal(L.cross_entropy_backward(1.0, cache), first)
