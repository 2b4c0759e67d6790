"""Every speed trick agrees with the plain computation it replaces: the faster forms in layers.py, and
fast.py's batch split over threads, which must also be deterministic and leave no thread behind.
No test times anything; `python -m minirlhf.bench` shows the speed."""
import os
import platform
import signal
import sys
import time
import warnings

import numpy as np
import pytest

from minirlhf import fast
from minirlhf import layers as L
from minirlhf import transformer as tf
from minirlhf.testing import numerical_gradient, rel_error

TINY = tf.Config(vocab_size=11, n_ctx=8, n_layer=2, n_head=2, n_embd=8)


def tiny_params(dtype=np.float64, seed=0):
    """Larger-than-GPT-2 init so every path carries signal."""
    rng = np.random.default_rng(seed)
    params = tf.init_params(TINY, rng, dtype)
    return {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}


def a_batch(B, T, seed=1):
    """Tokens and a 0/1 mask with left padding in the second and the last row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = 0
    mask[-1, :1] = 0
    return tokens, mask


def plain_softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- layers.py: the faster forms of each op

def test_row_sum_is_the_sum_over_an_axis():
    a = np.random.default_rng(0).standard_normal((3, 4, 5, 6))
    np.testing.assert_allclose(L.row_sum(a), a.sum(axis=-1, keepdims=True), rtol=1e-13)
    np.testing.assert_array_equal(L.row_sum(a, axis=1), a.sum(axis=1, keepdims=True))
    assert L.row_sum(a.astype(np.float32)).dtype == np.float32


def test_linear_matches_the_plain_formula():
    rng = np.random.default_rng(0)
    x, W, b, dout = (rng.standard_normal(s) for s in ((3, 5, 4), (4, 6), (6,), (3, 5, 6)))
    out, cache = L.linear_forward(x, W, b)
    np.testing.assert_allclose(out, x @ W + b, rtol=1e-13)
    dx, dW, db = L.linear_backward(dout, cache)
    np.testing.assert_allclose(dx, dout @ W.T, rtol=1e-13)
    np.testing.assert_allclose(dW, np.einsum("btc,btd->cd", x, dout), rtol=1e-12)
    np.testing.assert_allclose(db, dout.sum(axis=(0, 1)), rtol=1e-13)


def test_layernorm_matches_the_plain_formula():
    rng = np.random.default_rng(0)
    x, g, b, dout = (rng.standard_normal(s) for s in ((3, 5, 8), (8,), (8,), (3, 5, 8)))
    rstd = 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    xhat = (x - x.mean(-1, keepdims=True)) * rstd
    out, cache = L.layernorm_forward(x, g, b)
    np.testing.assert_allclose(out, xhat * g + b, rtol=1e-12, atol=1e-12)
    dxhat = dout * g
    plain_dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    np.testing.assert_allclose(L.layernorm_backward(dout, cache)[0], plain_dx, rtol=1e-10, atol=1e-12)


def test_gelu_matches_the_textbook_formulas():
    x = np.linspace(-6, 6, 241)
    t = np.tanh(L.GELU_K * (x + 0.044715 * x ** 3))
    out, cache = L.gelu_forward(x)
    np.testing.assert_allclose(out, 0.5 * x * (1 + t), rtol=1e-13, atol=1e-15)
    textbook = 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * L.GELU_K * (1 + 3 * 0.044715 * x ** 2)
    np.testing.assert_allclose(L.gelu_backward(np.ones_like(x), cache), textbook, rtol=1e-12, atol=1e-15)
    assert cache[0] is x  # the forward must not have overwritten its input in place
    np.testing.assert_array_equal(x, np.linspace(-6, 6, 241))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_shifted_by_own_score_is_the_softmax(dtype):
    rng = np.random.default_rng(0)
    s = (3 * rng.standard_normal((2, 3, 6, 6))).astype(dtype)
    s = np.where(np.tril(np.ones((6, 6), bool)), s, -np.inf).astype(dtype)
    tol = 1e-13 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(L.softmax_shifted_by_own_score(s), plain_softmax(s), rtol=tol, atol=tol)
    # decoding: 2 new queries at key slots 4 and 5 of 6
    np.testing.assert_allclose(L.softmax_shifted_by_own_score(s[..., 4:, :]), plain_softmax(s[..., 4:, :]),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_shifted_by_own_score_falls_back_to_the_max(dtype):
    s = np.zeros((1, 3, 3), dtype)
    s[0, 2, 0] = 800.0  # exp(800 - 0) overflows in either dtype: the row max must take over
    p = L.softmax_shifted_by_own_score(s)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, plain_softmax(s), rtol=1e-6)
    s = np.array([[[0.0, -np.inf], [1.0, -np.inf]]], dtype)  # query 1 may not look at itself
    np.testing.assert_allclose(L.softmax_shifted_by_own_score(s), plain_softmax(s))


def test_softmax_shifted_by_own_score_row_sum_overflow_is_caught_silently():
    """Every exp(s - own) finite but their sum past float32's range (3.4e38): the fallback takes over,
    and no overflow warning escapes (it did from the row sum, seen in reward-model training at lr 4e-3)."""
    s = np.zeros((1, 4, 4), np.float32)
    s[0, 3, :3] = 88.5  # exp(88.5) = 2.7e38 each, three of them overflow the sum
    assert np.isfinite(np.exp(s[0, 3, :3])).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = L.softmax_shifted_by_own_score(s)
    np.testing.assert_allclose(p, plain_softmax(s), rtol=1e-6)


def test_attention_matches_the_plain_formulas():
    """Additive -inf bias, pre-scaled q, contiguous k^T and gradients written into one buffer, against
    np.where, the row max and np.stack."""
    rng = np.random.default_rng(0)
    B, T, H, D = 2, 5, 2, 3
    qkv, dout = rng.standard_normal((B, T, 3 * H * D)), rng.standard_normal((B, T, H * D))
    key_mask = np.ones((B, T), np.int64)
    key_mask[1, :2] = 0
    allowed = L.attention_mask(key_mask)
    q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)
    p = plain_softmax(np.where(allowed, q @ k.swapaxes(-1, -2) / np.sqrt(D), -np.inf))
    out, cache = L.attention_forward(qkv, H, allowed)
    np.testing.assert_allclose(out, (p @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D), rtol=1e-12)
    do = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    plain = np.stack([ds @ k / np.sqrt(D), ds.swapaxes(-1, -2) @ q / np.sqrt(D), p.swapaxes(-1, -2) @ do], 2)
    plain = plain.transpose(0, 3, 2, 1, 4).reshape(B, T, 3 * H * D)
    np.testing.assert_allclose(L.attention_backward(dout, cache), plain, rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------- fast.py: two halves on two threads

@pytest.fixture
def split_small_batches(monkeypatch):
    """Split every batch of two or more rows, and run the halves at the same time."""
    monkeypatch.setattr(fast, "SPLIT_MIN_TOKENS", 0)
    monkeypatch.setattr(fast, "PARALLEL", True)


def test_batch_parts_are_two_halves_covering_the_batch():
    assert fast.batch_parts(1, 10 ** 6) == [slice(0, 1)]
    assert fast.batch_parts(32, 2) == [slice(0, 32)]  # too few tokens to be worth a thread
    assert fast.batch_parts(5, fast.SPLIT_MIN_TOKENS) == [slice(0, 2), slice(2, 5)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("head", ["trunk", "lm"])
def test_split_batch_agrees_with_the_whole_batch(split_small_batches, dtype, head):
    params = tiny_params(dtype)
    tokens, mask = a_batch(5, 7)
    if head == "trunk":
        public_fwd, public_bwd, plain_fwd, plain_bwd = (tf.hidden_forward, tf.hidden_backward,
                                                        tf._trunk_forward, tf._trunk_backward)
    else:
        public_fwd, public_bwd, plain_fwd, plain_bwd = (tf.forward, tf.backward,
                                                        tf._lm_forward, tf._lm_backward)
    out, cache = public_fwd(params, TINY, tokens, mask)
    assert len(cache) == 2  # really split
    dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
    grads = public_bwd(dout, cache)
    out_plain, c_plain = plain_fwd(params, TINY, tokens, mask)  # the readable path on the whole batch
    grads_plain = plain_bwd(dout, c_plain)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    np.testing.assert_allclose(out, out_plain, rtol=tol, atol=tol)
    assert list(grads) == list(grads_plain)
    for name in grads:
        np.testing.assert_allclose(grads[name], grads_plain[name], rtol=tol, atol=tol, err_msg=name)


def test_split_is_bit_identical_with_or_without_threads(split_small_batches, monkeypatch):
    """The split depends on the batch shape only: running the halves at once changes no bit."""
    params = tiny_params(np.float32)
    tokens, mask = a_batch(6, 8)

    def step():
        logits, cache = tf.forward(params, TINY, tokens, mask)
        return logits, tf.backward(np.sin(logits), cache)
    runs = [step(), step()]
    monkeypatch.setattr(fast, "PARALLEL", False)
    runs.append(step())
    for logits, grads in runs[1:]:
        np.testing.assert_array_equal(logits, runs[0][0])
        for name in grads:
            np.testing.assert_array_equal(grads[name], runs[0][1][name], err_msg=name)


def test_split_gradient_matches_finite_differences(split_small_batches):
    params = tiny_params()
    tokens, mask = a_batch(3, 5)
    targets = np.random.default_rng(3).integers(0, TINY.vocab_size, (3, 5))

    def loss():
        return L.cross_entropy_forward(tf.forward(params, TINY, tokens, mask)[0], targets, mask)[0]
    logits, cache = tf.forward(params, TINY, tokens, mask)
    _, ce_cache = L.cross_entropy_forward(logits, targets, mask)
    grads = tf.backward(L.cross_entropy_backward(1.0, ce_cache), cache)
    for name in ("wte", "wpe", "h0.attn.w_qkv", "h1.mlp.w_fc", "ln_f.g"):
        assert rel_error(grads[name], numerical_gradient(loss, params[name])) < 1e-5, name


def test_run_parts_finishes_every_part_before_returning_or_raising(monkeypatch):
    monkeypatch.setattr(fast, "PARALLEL", True)
    assert fast.run_parts(lambda x: 2 * x, [1, 2, 3]) == [2, 4, 6]
    done = []

    def slow_worker_part(x):
        if x == 2:  # the worker's part: still busy when the first part fails
            time.sleep(0.05)
            done.append(x)
            raise RuntimeError("part 2 failed")
        raise RuntimeError("part 1 failed")
    with pytest.raises(RuntimeError, match="part 1 failed"):  # the first part's error first
        fast.run_parts(slow_worker_part, [1, 2])
    assert done == [2]  # ... and only once the worker's part had finished
    with pytest.raises(RuntimeError, match="part 2 failed"):
        fast.run_parts(lambda x: slow_worker_part(x) if x == 2 else x, [1, 2])


def test_a_forked_child_starts_its_own_worker(monkeypatch):
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(fast, "PARALLEL", True)
    fast.run_parts(lambda x: x, [1, 2])  # the parent's worker exists now
    pid = os.fork()
    if pid == 0:  # child: the parent's worker thread is gone; run_parts must still work, not hang
        code = 1
        try:
            signal.alarm(20)
            code = 0 if fast.run_parts(lambda x: x + 1, [1, 2]) == [2, 3] else 1
        finally:
            os._exit(code)  # never return into pytest from the child
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_freed_memory_is_kept_under_glibc_and_asking_again_is_harmless():
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert fast.MEMORY_KEPT
    assert fast.keep_freed_memory() == fast.MEMORY_KEPT
