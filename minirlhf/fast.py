"""Speed tricks for the transformer, kept apart from the math so that layers.py and transformer.py read as
the textbook. Nothing here changes the math; tests/test_fast_paths.py checks each trick against the plain
path. Figures are for the demo model (PERFORMANCE_NOTES.md) at batch 32, float32, measured on the
project's 2-core machine, numpy 2.4 with OpenBLAS, as ratios taken in one process.

1. Keep freed memory (`keep_freed_memory`, run once when this module is imported). glibc hands big arrays
   back to the kernel when they are freed, so every training step page-faults its ~32 MB of activations
   in afresh (8000 faults a step, about a third of the step's time). Telling glibc to keep freed memory
   for reuse took a step from 57 to 40 ms. It is a setting of the whole process, and its cost is that the
   process keeps its peak heap.

2. Two halves of a big batch on two threads (`batch_parts`, `run_parts`). NumPy and BLAS release the GIL,
   so the forward on rows [0, B/2) runs on this thread while a worker thread does [B/2, B), and the same
   for backward; parameter gradients are then the two halves' sums, added in a fixed order. The split
   depends only on the batch shape, never on the machine (one core runs both halves in turn), so results
   are bit-identical on a busy or an idle machine, with or without threads. At batch 32 x 64 the step
   took 0.6x the time of the whole batch on one thread when the machine was otherwise idle; when other
   programs kept both cores busy it took about 1.1x. BLAS must run one thread per call (two halves each
   asking OpenBLAS for both cores fight over them: 1.4-2x slower), so the halves only run at once when
   the environment pins BLAS to one thread, which minirlhf/__init__.py does unless the user has chosen.
"""
import concurrent.futures
import ctypes
import os
import sys
import threading

# Batches with fewer tokens than this run whole. Two threads contend for the GIL on every NumPy call, which
# small arrays cannot pay for: against the whole batch on one thread, halves took 1.5x the time at 128
# tokens, 1.05x at 256, 0.95x at 512, 0.7x at 1024 and 0.6x at 2048 (float32, demo model).
SPLIT_MIN_TOKENS = 1024


def keep_freed_memory(keep_bytes=1 << 30):
    """Ask glibc malloc to keep up to keep_bytes of freed memory and to serve arrays up to 32 MB from it.

    By default, glibc gives the top of its heap back to the kernel once more than a few MB are free, and
    serves big blocks with mmap, which are unmapped on free; either way the next step page-faults them
    in again. M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (mallopt(3)) turn both off. A no-op on other C
    libraries and platforms. Returns True if the settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
        kept = libc.mallopt(M_TRIM_THRESHOLD, keep_bytes)
        return bool(kept and libc.mallopt(M_MMAP_THRESHOLD, 1 << 25))
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        return False


MEMORY_KEPT = keep_freed_memory()


def n_cores():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def blas_threads_from_env():
    """The BLAS thread count the environment asks for (OpenBLAS reads these variables in this order when
    NumPy loads it), or None if it is left to BLAS, which then uses every core."""
    for var in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return None


# Run the parts of a batch at the same time only where that pays: with two cores and one BLAS thread a call.
PARALLEL = n_cores() >= 2 and blas_threads_from_env() == 1


def batch_parts(B, T):
    """The rows each part of a batch (B, T) takes: two halves, or the whole batch if it is small."""
    if B < 2 or B * T < SPLIT_MIN_TOKENS:
        return [slice(0, B)]
    return [slice(0, B // 2), slice(B // 2, B)]


def run_parts(fn, parts):
    """[fn(part) for part in parts]: the first part on this thread, the others on the worker thread.

    Every part has finished when this returns or raises (an exception from fn is raised here, the first
    part's first), so no work outlives the call.
    """
    if len(parts) == 1 or not PARALLEL:
        return [fn(part) for part in parts]
    futures = [_worker().submit(fn, part) for part in parts[1:]]
    try:
        first = fn(parts[0])
    finally:
        concurrent.futures.wait(futures)
    return [first] + [f.result() for f in futures]


_WORKER_LOCK = threading.Lock()
_worker_pool = None  # the one worker thread's executor, made on first use


def _worker():
    """The worker thread, started on first use and kept: starting one for every call cost 2.5% of a step.

    An idle worker holds no state, so it cannot change a result; concurrent.futures joins it when the
    interpreter exits.
    """
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
