"""Hypothesis strategies for the properties the kit and the tests state (the only part needing hypothesis)."""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
