"""Every speed trick agrees with the plain computation it replaces: fast.py's forms of the ops against
layers.py's, and the batch split over threads, which must also be deterministic and leave no thread behind.
No test times anything; `python -m minirlhf.bench` shows the speed."""
import os
import platform
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from minirlhf import fast
from minirlhf import layers as L
from minirlhf import transformer as tf
from minirlhf.kit.gradcheck import MODEL_TOL, gradient_errors
from minirlhf.kit.inputs import tiny_model

TINY = tf.GPTConfig(vocab_size=11, n_ctx=8, n_layer=2, n_head=2, n_embd=8)


def tiny_params(dtype=np.float64, seed=0):
    """Larger-than-GPT-2 init so every path carries signal."""
    return {k: v.astype(dtype) for k, v in tiny_model(TINY, seed).items()}


def a_batch(B, T, seed=1):
    """Tokens and a 0/1 mask with left padding in the second and the last row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = 0
    mask[-1, :1] = 0
    return tokens, mask


# ---------------------------------------------------------------- fast.py's forms of each op

def test_fast_ops_cover_every_op_the_transformer_calls():
    """transformer.py calls the ops through its argument L: fast.OPS must offer each, and every entry that
    differs from layers.py's must be fast.py's own."""
    import inspect
    source = inspect.getsource(tf)
    used = {name for name in dir(L) if f"L.{name}(" in source}
    assert used and used <= set(vars(fast.OPS))
    for name, fn in vars(fast.OPS).items():
        assert fn is getattr(L, name) or fn is getattr(fast, name), name


def test_row_sum_is_the_sum_over_the_last_axis():
    a = np.random.default_rng(0).standard_normal((3, 4, 5, 6))
    np.testing.assert_allclose(fast.row_sum(a), a.sum(axis=-1, keepdims=True), rtol=1e-13)
    assert fast.row_sum(a.astype(np.float32)).dtype == np.float32


def test_linear_matches_the_plain_formula():
    rng = np.random.default_rng(0)
    x, W, b, dout = (rng.standard_normal(s) for s in ((3, 5, 4), (4, 6), (6,), (3, 5, 6)))
    out, cache = fast.linear_forward(x, W, b)
    np.testing.assert_allclose(out, L.linear_forward(x, W, b)[0], rtol=1e-13)
    for got, plain in zip(fast.linear_backward(dout, cache), L.linear_backward(dout, L.linear_forward(x, W, b)[1])):
        np.testing.assert_allclose(got, plain, rtol=1e-12)


def test_layernorm_matches_the_plain_formula():
    rng = np.random.default_rng(0)
    x, g, b, dout = (rng.standard_normal(s) for s in ((3, 5, 8), (8,), (8,), (3, 5, 8)))
    out, cache = fast.layernorm_forward(x, g, b)
    plain_out, plain_cache = L.layernorm_forward(x, g, b)
    np.testing.assert_allclose(out, plain_out, rtol=1e-12, atol=1e-12)
    for got, plain in zip(fast.layernorm_backward(dout, cache), L.layernorm_backward(dout, plain_cache)):
        np.testing.assert_allclose(got, plain, rtol=1e-10, atol=1e-12)


def test_gelu_matches_the_textbook_formulas():
    x = np.linspace(-6, 6, 241)
    out, cache = fast.gelu_forward(x)
    plain_out, plain_cache = L.gelu_forward(x)
    np.testing.assert_allclose(out, plain_out, rtol=1e-13, atol=1e-15)
    dout = np.cos(x)
    np.testing.assert_allclose(fast.gelu_backward(dout, cache), L.gelu_backward(dout, plain_cache), rtol=1e-12,
                               atol=1e-15)
    assert cache[0] is x  # the forward must not have overwritten its input in place
    np.testing.assert_array_equal(x, np.linspace(-6, 6, 241))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_shifted_by_own_score_is_the_softmax(dtype):
    rng = np.random.default_rng(0)
    s = (3 * rng.standard_normal((2, 3, 6, 6))).astype(dtype)
    s = np.where(np.tril(np.ones((6, 6), bool)), s, -np.inf).astype(dtype)
    tol = 1e-13 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(fast.softmax_shifted_by_own_score(s), L.softmax(s), rtol=tol, atol=tol)
    # decoding: 2 new queries at key slots 4 and 5 of 6
    np.testing.assert_allclose(fast.softmax_shifted_by_own_score(s[..., 4:, :]), L.softmax(s[..., 4:, :]),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_shifted_by_own_score_falls_back_to_the_max(dtype):
    s = np.zeros((1, 3, 3), dtype)
    s[0, 2, 0] = 800.0  # exp(800 - 0) overflows in either dtype: the row max must take over
    p = fast.softmax_shifted_by_own_score(s)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, L.softmax(s), rtol=1e-6)
    s = np.array([[[0.0, -np.inf], [1.0, -np.inf]]], dtype)  # query 1 may not look at itself
    np.testing.assert_allclose(fast.softmax_shifted_by_own_score(s), L.softmax(s))


def test_softmax_shifted_by_own_score_row_sum_overflow_is_caught_silently():
    """Every exp(s - own) finite but their sum past float32's range (3.4e38): the fallback takes over,
    and no overflow warning escapes (it did from the row sum, seen in reward-model training at lr 4e-3)."""
    s = np.zeros((1, 4, 4), np.float32)
    s[0, 3, :3] = 88.5  # exp(88.5) = 2.7e38 each, three of them overflow the sum
    assert np.isfinite(np.exp(s[0, 3, :3])).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = fast.softmax_shifted_by_own_score(s)
    np.testing.assert_allclose(p, L.softmax(s), rtol=1e-6)


def test_attention_matches_the_plain_formulas():
    """Additive -inf bias, pre-scaled q, contiguous k^T, the own-score softmax and gradients written into one
    buffer (fast.py), against layers.py's np.where, row max and np.stack, with padding."""
    rng = np.random.default_rng(0)
    B, T, H, D = 2, 5, 2, 3
    qkv, dout = rng.standard_normal((B, T, 3 * H * D)), rng.standard_normal((B, T, H * D))
    key_mask = np.ones((B, T), np.int64)
    key_mask[1, :2] = 0
    allowed = L.attention_mask(key_mask)
    out, cache = fast.attention_forward(qkv, H, allowed)
    plain_out, plain_cache = L.attention_forward(qkv, H, allowed)
    np.testing.assert_allclose(out, plain_out, rtol=1e-12)
    np.testing.assert_allclose(fast.attention_backward(dout, cache), L.attention_backward(dout, plain_cache),
                               rtol=1e-11, atol=1e-13)


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
                                                        tf.trunk_forward, tf.trunk_backward)
    else:
        public_fwd, public_bwd, plain_fwd, plain_bwd = (tf.forward, tf.backward, tf.lm_forward, tf.lm_backward)
    out, cache = public_fwd(params, TINY, tokens, mask)
    assert len(cache) == 2  # really split
    dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
    grads = public_bwd(dout, cache)
    out_plain, c_plain = plain_fwd(params, TINY, tokens, mask)  # the readable path (layers.py), whole batch
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


def test_concurrent_jobs_give_the_bits_of_running_them_in_turn_and_nest_without_deadlock(split_small_batches,
                                                                                         monkeypatch):
    """fast.run_concurrently runs two jobs on two threads; each job's own batch split (every batch splits
    here) then runs its halves in turn on its thread (the one worker is busy), and the bits are those of
    the jobs run one after the other."""
    a, b = tiny_params(np.float32, seed=0), tiny_params(np.float32, seed=1)
    tokens, mask = a_batch(6, 8)

    def step(params):
        logits, cache = tf.forward(params, TINY, tokens, mask)
        return logits, tf.backward(np.sin(logits), cache)
    together = fast.run_concurrently(lambda: step(a), lambda: step(b))
    monkeypatch.setattr(fast, "PARALLEL", False)
    in_turn = [step(a), step(b)]
    for (logits, grads), (logits_ref, grads_ref) in zip(together, in_turn):
        np.testing.assert_array_equal(logits, logits_ref)
        for name in grads:
            np.testing.assert_array_equal(grads[name], grads_ref[name], err_msg=name)
    assert not getattr(fast._INSIDE, "part", False)  # the flag is cleared after the jobs


def test_split_gradient_matches_finite_differences(split_small_batches):
    params = tiny_params()
    tokens, mask = a_batch(3, 5)
    targets = np.random.default_rng(3).integers(0, TINY.vocab_size, (3, 5))

    def loss():
        return L.cross_entropy_forward(tf.forward(params, TINY, tokens, mask)[0], targets, mask)[0]
    logits, cache = tf.forward(params, TINY, tokens, mask)
    _, ce_cache = L.cross_entropy_forward(logits, targets, mask)
    grads = tf.backward(L.cross_entropy_backward(1.0, ce_cache), cache)
    names = ("wte", "wpe", "h0.attn.w_qkv", "h1.mlp.w_fc", "ln_f.g")
    errors = gradient_errors(loss, {n: params[n] for n in names}, grads)
    assert all(errors[n] < MODEL_TOL for n in names), errors


def test_the_switch_off_runs_the_plain_math_exactly(monkeypatch):
    """fast.ENABLED = False: the entry points are the plain functions of transformer.py on layers.py, to the
    bit, and generation decodes with layers.py too."""
    params = tiny_params(np.float32)
    tokens, mask = a_batch(6, 8)
    monkeypatch.setattr(fast, "ENABLED", False)
    logits, cache = tf.forward(params, TINY, tokens, mask)
    plain, plain_cache = tf.lm_forward(params, TINY, tokens, mask)
    np.testing.assert_array_equal(logits, plain)
    grads, plain_grads = tf.backward(np.sin(logits), cache), tf.lm_backward(np.sin(plain), plain_cache)
    for name in grads:
        np.testing.assert_array_equal(grads[name], plain_grads[name], err_msg=name)
    assert fast.decode_ops() is L


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


def test_freed_memory_is_kept_only_when_an_entry_point_asks():
    """Importing minirlhf leaves the allocator alone; keep_freed_memory (which the demo, the benchmark and
    the scripts call) applies under glibc, and asking again is harmless."""
    code = "import minirlhf.demo, minirlhf.fast as f; print(f.MEMORY_KEPT, f.keep_freed_memory(), f.MEMORY_KEPT)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out == ["False", str(glibc), str(glibc)]


def test_numbers_do_not_depend_on_importing_numpy_first():
    """BLAS is set to one thread at run time (threadpoolctl), so a script that imports NumPy before minirlhf
    gets the same threads and the same bits."""
    code = ("{first}; import numpy as np; from minirlhf import fast, transformer as tf; "
            "from minirlhf.pipeline import DEMO_MODEL; p = tf.init_params(DEMO_MODEL, np.random.default_rng(0)); "
            "t = np.random.default_rng(1).integers(3, 46, (32, 64)); "
            "import hashlib; print(fast.BLAS_THREADS, fast.PARALLEL, "
            "hashlib.sha256(tf.forward(p, DEMO_MODEL, t)[0].tobytes()).hexdigest())")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                            "GOTO_NUM_THREADS", "MKL_NUM_THREADS")}
    runs = [subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True, text=True,
                           timeout=120, env=env) for first in ("import numpy", "import minirlhf")]
    assert runs[0].returncode == 0 and runs[1].returncode == 0, runs[0].stderr + runs[1].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("1 ")
