"""The speed tricks, kept apart from the math: layers.py and transformer.py read as the textbook, and this
module makes the same computation faster. Nothing here changes the math; tests/test_fast_paths.py checks
every trick against the plain form it replaces.

One switch, ENABLED (below): the transformer's entry points (transformer.forward, backward, hidden_forward,
hidden_backward and generate) run the plain ops of layers.py on the whole batch when it is False, and this
module's ops on two halves of the batch when it is True (the default; MINIRLHF_PLAIN=1 turns it off). The
two paths agree to rounding, not bit for bit; each is deterministic.

What the tricks buy, measured in the speed work's commits (before d82f556) for the demo model (vocab 46,
n_ctx 64, 2 layers, 4 heads, n_embd 64) at batch 32 x 64, float32, as ratios taken in one process (a 2-core
machine's speed drifts 30-50% within a minute, so only such ratios mean anything; `python -m minirlhf.bench`
prints the current figures):

1. Faster forms of the ops (OPS below). Row sums as a product with a column of ones (BLAS does the
   adding: 0.04 against 0.22 ms on attention's (32, 4, 64, 64) scores, LayerNorm's row means 6x faster);
   GELU and its gradient in place in one buffer (0.47 against 0.61 ms); the softmax of attention shifted
   by each query's own score instead of the row max (3% of a step); the causal mask added as a -inf bias
   (2x faster than np.where on the scores); q scaled before q k^T (1/4 of the work of scaling the scores);
   k^T and v^T copied contiguous before their products (1.6x faster than from strided views of qkv);
   linear layers as one (N, Cin) @ (Cin, Cout) product over all rows (numpy would otherwise make one call
   per sequence); attention's gradients written straight into one dqkv buffer.

2. Two halves of a big batch on two threads (`batch_parts`, `run_parts`). NumPy and BLAS release the GIL,
   so the forward on rows [0, B/2) runs on this thread while a worker thread does [B/2, B), and the same for
   backward; parameter gradients are the two halves' sums, added in a fixed order. The split depends only on
   the batch shape, never on the machine, so results are bit-identical with or without the second thread.
   It pays only when BLAS runs one thread per call (two halves each asking OpenBLAS for both cores fight
   over them: 1.4-2x slower), which minirlhf/__init__.py arranges, and only for batches of at least
   SPLIT_MIN_TOKENS tokens (below that, the two threads' contention for the GIL costs more than it buys).

3. Keeping freed memory (`keep_freed_memory`). glibc hands big arrays back to the kernel when they are freed,
   so every training step page-faults its ~32 MB of activations in afresh (about a third of a step's time).
   Telling glibc to keep freed memory took a step from 57 to 40 ms; without it the second thread's gain
   vanishes. It is a setting of the whole process (its cost: the process keeps its peak heap), so importing
   minirlhf never makes it: the entry points (the demo, the benchmark, the scripts in demos/) call it.

Measured on the machine the project first ran on (AVX-512 kernels), in the same commits: 59-66 ms a step
before these tricks, 18 ms after, about 40% of the two-core matmul throughput; PyTorch eager ran the same
step in 40-48 ms. README.md's "Figures measured" has the current commit's figures.
"""
import concurrent.futures
import ctypes
import os
import sys
import threading
from types import SimpleNamespace

import numpy as np

from . import layers as L

ENABLED = os.environ.get("MINIRLHF_PLAIN", "") != "1"  # the one switch: fast ops and batch halves, or plain


# ---------------------------------------------------------------- 1. the ops, faster

def row_sum(a):
    """a.sum(-1, keepdims=True) as a product with a column of ones: BLAS does the adding (the same sum in
    another rounding order)."""
    return a @ np.ones((a.shape[-1], 1), a.dtype)


def softmax(z):
    """layers.softmax over the last axis, with BLAS row sums, normalising in place."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    e /= row_sum(e)  # in place: e is a new array of our own
    return e


def linear_forward(x, W, b):
    """layers.linear_forward with x flattened to (N, Cin): one BLAS product over all rows, bias in place."""
    Cin, Cout = W.shape
    out = x.reshape(-1, Cin) @ W
    out += b
    return out.reshape(*x.shape[:-1], Cout), (x, W)


def linear_backward(dout, cache):
    """layers.linear_backward on flattened rows."""
    x, W = cache
    Cin, Cout = W.shape
    dout = dout.reshape(-1, Cout)  # (N, Cout)
    return (dout @ W.T).reshape(x.shape), x.reshape(-1, Cin).T @ dout, dout.sum(axis=0)


def layernorm_forward(x, g, b, eps=1e-5):
    """layers.layernorm_forward with BLAS row sums and in-place scale and shift."""
    C = x.shape[-1]
    xc = x - row_sum(x) / C
    rstd = 1.0 / np.sqrt(row_sum(xc * xc) / C + eps)  # biased variance
    xhat = xc * rstd
    out = xhat * g
    out += b
    return out, (xhat, rstd, g)


def layernorm_backward(dout, cache):
    """layers.layernorm_backward; the row sums of dxhat and dxhat * xhat are products with g (BLAS)."""
    xhat, rstd, g = cache
    C = g.shape[0]
    dout_xhat = dout * xhat
    dg = dout_xhat.reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    mean_dxhat = (dout.reshape(-1, C) @ g).reshape(rstd.shape) / C  # sum_c dout g = sum_c dxhat
    mean_dxhat_xhat = (dout_xhat.reshape(-1, C) @ g).reshape(rstd.shape) / C
    return rstd * (dout * g - mean_dxhat - xhat * mean_dxhat_xhat), dg, db


def gelu_forward(x):
    """layers.gelu_forward, u and tanh(u) worked out in one buffer, in place."""
    u = x * x
    u *= 0.044715
    u += 1.0
    u *= x
    u *= L.GELU_K  # u = sqrt(2/pi) (x + 0.044715 x^3)
    t = np.tanh(u, out=u)
    out = 1.0 + t
    out *= x
    out *= 0.5
    return out, (x, t)


def gelu_backward(dout, cache):
    """layers.gelu_backward as dout * 0.5 (1 + t) (1 + x (1 - t) du/dx) (1 - t^2 = (1 - t)(1 + t)), in place."""
    x, t = cache
    du = x * x
    du *= 3.0 * 0.044715
    du += 1.0
    du *= L.GELU_K  # du/dx
    dx = 1.0 - t
    dx *= x
    dx *= du
    dx += 1.0
    dx *= 1.0 + t
    dx *= 0.5
    dx *= dout
    return dx


def softmax_shifted_by_own_score(s):
    """softmax over the last axis of attention scores (Tq, Tk), each query's row shifted by its score for
    its own position, s[i, Tk - Tq + i], instead of by the row max.

    Any per-row shift gives the same softmax; the max only keeps exp from overflowing. A query may always
    look at its own position (attention_mask allows the diagonal, decoding the new slot), so exp(0) = 1 is
    in every row's sum, which cannot underflow to 0. If another score is more than ~88 above the own one
    (709 in float64), the sum overflows; that is caught and the row max used after all. Skipping the max,
    which NumPy reduces one short row at a time, saves 0.45 ms a call at (32, 4, 64, 64) float32.
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


def attend(q, k, v, allowed):
    """layers.attend with q scaled first, the mask added as a -inf bias and the own-score softmax."""
    s = (q * (1.0 / float(np.sqrt(q.shape[-1])))) @ k.swapaxes(-1, -2)  # (B, H, Tq, Tk)
    s += np.where(allowed, 0.0, -np.inf).astype(s.dtype)  # a (B, 1, Tq, Tk) bias
    p = softmax_shifted_by_own_score(s)
    return p @ v, p


def attention_forward(qkv, n_head, allowed):
    """layers.attention_forward with k^T made contiguous before q k^T."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)
    k = np.ascontiguousarray(k.swapaxes(-1, -2)).swapaxes(-1, -2)  # a view of a contiguous k^T
    o, p = attend(q, k, v, allowed)
    return o.transpose(0, 2, 1, 3).reshape(B, T, C), (q, k, v, p)


def attention_backward(dout, cache):
    """layers.attention_backward writing dq, dk, dv straight into their slots of dqkv (no stacking copy)."""
    q, k, v, p = cache
    B, H, T, D = q.shape
    scale = 1.0 / float(np.sqrt(D))
    do = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    dqkv = np.empty((B, T, 3, H, D), dout.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, D) views
    np.matmul(p.swapaxes(-1, -2), do, out=dv)
    dp = do @ np.ascontiguousarray(v.swapaxes(-1, -2))
    ds = p * (dp - row_sum(dp * p))
    np.matmul(ds, k * scale, out=dq)
    np.matmul(ds.swapaxes(-1, -2), q * scale, out=dk)
    return dqkv.reshape(B, T, 3 * H * D)


# The ops the transformer calls, in their fast forms (the embedding and the mask have no faster form).
OPS = SimpleNamespace(
    embedding_forward=L.embedding_forward, embedding_backward=L.embedding_backward,
    attention_mask=L.attention_mask, linear_forward=linear_forward, linear_backward=linear_backward,
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward, gelu_forward=gelu_forward,
    gelu_backward=gelu_backward, attend=attend, attention_forward=attention_forward,
    attention_backward=attention_backward)


# ---------------------------------------------------------------- 2. two halves of a batch on two threads

# Batches with fewer tokens than this run whole. Against the whole batch on one thread, halves took 1.5x the
# time at 128 tokens, 1.05x at 256, 0.95x at 512, 0.7x at 1024 and 0.6x at 2048 (float32, demo model).
SPLIT_MIN_TOKENS = 1024


def n_cores():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def blas_threads_from_env():
    """The BLAS thread count the environment asks for, or None if it is left to BLAS."""
    for var in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return None


def pin_blas_threads():
    """One BLAS thread per call, unless the environment chose a count: set once, at import (minirlhf's
    __init__ imports this module), through threadpoolctl, so it holds however NumPy was loaded before.

    This model's matrices are small (64 x 256 at demo size). OpenBLAS's default of every core made a
    training step about 2x slower than one thread (116 against 54 ms, float32) and many times slower when
    anything else was running; its threads also change the rounding of some products, so one count for
    every run is part of "same seed, same numbers". Switching counts back and forth stalls later calls,
    so it is set once. Returns the count in force (None if no BLAS library reports one).
    """
    from threadpoolctl import threadpool_info, threadpool_limits
    if blas_threads_from_env() is None:
        threadpool_limits(1, user_api="blas")
    counts = {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}
    return counts.pop() if len(counts) == 1 else None


BLAS_THREADS = pin_blas_threads()
# Run the parts of a batch at the same time only where that pays: two cores and one BLAS thread a call.
PARALLEL = n_cores() >= 2 and BLAS_THREADS == 1


def batch_parts(B, T):
    """The rows each part of a batch (B, T) takes: two halves, or the whole batch if it is small."""
    if B < 2 or B * T < SPLIT_MIN_TOKENS:
        return [slice(0, B)]
    return [slice(0, B // 2), slice(B // 2, B)]


def run_parts(fn, parts):
    """[fn(part) for part in parts]: the first part on this thread, the others on the worker thread.

    Every part has finished when this returns or raises (an exception from fn is raised here, the first
    part's first), so no work outlives the call. The parts run one after the other unless PARALLEL, and
    inside a part already running beside another (both cores are busy then, and the one worker is taken).
    """
    if len(parts) == 1 or not PARALLEL or getattr(_INSIDE, "part", False):
        return [fn(part) for part in parts]
    futures = [_worker().submit(_as_part, fn, part) for part in parts[1:]]
    try:
        first = _as_part(fn, parts[0])
    finally:
        concurrent.futures.wait(futures)
    return [first] + [f.result() for f in futures]


def run_concurrently(*jobs):
    """[job() for job in jobs], two at a time on two threads when ENABLED and PARALLEL: for independent
    work too small to split in halves, such as PPO's policy and value model on one minibatch. Each job
    computes exactly what it would alone, so the results are the same bits either way."""
    if not ENABLED:
        return [job() for job in jobs]
    return run_parts(lambda job: job(), list(jobs))


_INSIDE = threading.local()  # .part: this thread is running one of several parts at once


def _as_part(fn, part):
    _INSIDE.part = True
    try:
        return fn(part)
    finally:
        _INSIDE.part = False


_WORKER_LOCK = threading.Lock()
_worker_pool = None  # the one worker thread's executor, made on first use


def _worker():
    """The worker thread, started on first use and kept: starting one for every call cost 2.5% of a step.
    An idle worker holds no state, so it cannot change a result."""
    global _worker_pool
    with _WORKER_LOCK:
        if _worker_pool is None:
            _worker_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="minirlhf")
        return _worker_pool


def _forget_worker():
    """In a child made by fork: the worker thread did not come along (threads never do), so start anew."""
    global _worker_pool, _WORKER_LOCK
    _worker_pool, _WORKER_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_worker)


# ---------------------------------------------------------------- 3. what the transformer's entry points call

def run_forward(fn, params, cfg, tokens, mask):
    """out, cache of fn(params, cfg, tokens, mask, L) (transformer.lm_forward or trunk_forward).

    ENABLED: fn with OPS on each part of batch_parts, the outputs concatenated; else fn with layers.py on
    the whole batch. The cache lists (rows, the part's cache) either way.
    """
    if not ENABLED:
        out, cache = fn(params, cfg, tokens, mask, L)
        return out, [(slice(0, len(tokens)), cache)]
    parts = batch_parts(*tokens.shape)
    outs = run_parts(lambda rows: fn(params, cfg, tokens[rows], mask[rows], OPS), parts)
    out = outs[0][0] if len(parts) == 1 else np.concatenate([part_out for part_out, _ in outs])
    return out, [(rows, part_cache) for rows, (_, part_cache) in zip(parts, outs)]


def run_backward(fn, dout, cache):
    """Undoes run_forward: fn(dout[rows], part cache) -> grads on each part, summed in a fixed order."""
    grads = run_parts(lambda part: fn(dout[part[0]], part[1]), cache)
    total = grads[0]
    for g in grads[1:]:  # every part uses the same parameters: add the parts' gradients
        total = {name: total[name] + g[name] for name in total}
    return total


def decode_ops():
    """The ops generation decodes with: OPS, or layers.py when the fast path is off."""
    return OPS if ENABLED else L


# ---------------------------------------------------------------- 4. keeping freed memory (an explicit call)

def keep_freed_memory(keep_bytes=1 << 30):
    """Ask glibc malloc to keep up to keep_bytes of freed memory and to serve arrays up to 32 MB from it.

    By default glibc gives the top of its heap back to the kernel once more than a few MB are free, and
    serves big blocks with mmap, unmapped on free; either way the next step page-faults them in again.
    M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (mallopt(3)) turn both off for the whole process. Entry points
    call this once; importing minirlhf does not. A no-op on other C libraries. Returns True if applied.
    """
    global MEMORY_KEPT
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
        kept = libc.mallopt(M_TRIM_THRESHOLD, keep_bytes)
        MEMORY_KEPT = bool(kept and libc.mallopt(M_MMAP_THRESHOLD, 1 << 25))
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        return False
    return MEMORY_KEPT


MEMORY_KEPT = False  # whether keep_freed_memory has been applied in this process
