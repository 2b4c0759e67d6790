"""Tests of minirlhf.ppo_objective: GAE, whitening, the clipped losses and their gradients."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minirlhf.ppo_objective import (explained_variance, gae, masked_mean, masked_var, policy_loss_backward,
                                    policy_loss_forward, value_loss_backward, value_loss_forward, whiten)
from minirlhf.kit.gradcheck import gradient_errors

EPS = 0.2  # clip_eps of both losses in these tests


@st.composite
def masked_arrays(draw, n, lo=-5.0, hi=5.0):
    """(mask, [n arrays]): (B, T) float64 arrays, a right-padded mask, NaN at every padding position.

    Magnitudes below 1e-6 are snapped to 0, so no product underflows to a subnormal number, where
    relative comparisons mean nothing.
    """
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.float64)  # (B, T)
    elements = st.floats(lo, hi, allow_nan=False).map(lambda x: x if abs(x) >= 1e-6 else 0.0)
    arrays = []
    for _ in range(n):
        x = draw(hnp.arrays(np.float64, (B, T), elements=elements))
        x[mask == 0] = np.nan  # padding may hold anything; NaN shows any leak
        arrays.append(x)
    return mask, arrays


def right_padded_mask(lengths, T):
    return (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.float64)


# ---- GAE -----------------------------------------------------------------------------------------------

def naive_gae(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, one row and one t at a time, V = 0 after the last token."""
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        v = list(values[b, :n]) + [0.0]
        delta = [rewards[b, s] + gamma * v[s + 1] - v[s] for s in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
    return advantages


@given(masked_arrays(2), st.floats(0, 1), st.floats(0, 1))
def test_gae_matches_naive_double_loop(batch, gamma, lam):
    mask, (rewards, values) = batch
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = naive_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(returns, np.where(mask == 1, expected + values, 0), rtol=1e-12, atol=1e-12)
    assert np.all(advantages[mask == 0] == 0) and np.all(returns[mask == 0] == 0)


@given(masked_arrays(2))
def test_gae_with_gamma_lambda_one_is_reward_to_go(batch):
    mask, (rewards, values) = batch
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = np.where(mask == 1, rewards, 0)
    reward_to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]  # sum_{s >= t} r_s
    np.testing.assert_allclose(returns, np.where(mask == 1, reward_to_go, 0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(advantages, np.where(mask == 1, reward_to_go - values, 0), rtol=1e-12,
                               atol=1e-12)


def test_gae_default_is_gamma_one_lambda_095_by_hand():
    # delta = [0 + 0.5 - 0.5, 0 + 0.5 - 0.5, 1 + 0 - 0.5] = [0, 0, 0.5]; A_t = 0.95 A_{t+1} + delta_t.
    rewards = np.array([[0.0, 0.0, 1.0, 0.0]])
    values = np.array([[0.5, 0.5, 0.5, 9.0]])
    advantages, returns = gae(rewards, values, np.array([[1, 1, 1, 0]]))
    np.testing.assert_allclose(advantages, [[0.95**2 * 0.5, 0.95 * 0.5, 0.5, 0]], rtol=1e-15)
    np.testing.assert_allclose(returns, [[0.95**2 * 0.5 + 0.5, 0.95 * 0.5 + 0.5, 1.0, 0]], rtol=1e-15)


def test_gae_keeps_float32():
    rewards = np.array([[0.1, -0.2, 1.0]], dtype=np.float32)
    advantages, returns = gae(rewards, rewards * 2, np.ones((1, 3)))
    assert advantages.dtype == np.float32 and returns.dtype == np.float32


def test_gae_bad_input():
    r, m = np.zeros((2, 3)), np.array([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"values has shape \(2, 4\) but mask has shape \(2, 3\)"):
        gae(r, np.zeros((2, 4)), m)
    bad = r.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^rewards is not finite at valid position \(1, 2\)"):
        gae(bad, r, m)
    with pytest.raises(ValueError, match=r"^values is not finite"):
        gae(r, bad, m)
    with pytest.raises(ValueError, match="prefix"):
        gae(r, r, np.array([[1, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, m, gamma=1.5)


# ---- whitening -----------------------------------------------------------------------------------------

@given(masked_arrays(1))
def test_whiten_matches_numpy_on_the_valid_tokens(batch):
    mask, (x,) = batch
    w = whiten(x, mask)
    xv = x[mask == 1]
    np.testing.assert_allclose(w[mask == 1], (xv - xv.mean()) / np.sqrt(xv.var() + 1e-8), rtol=1e-10,
                               atol=1e-10)
    assert np.all(w[mask == 0] == 0)
    assert masked_mean(w, mask) == pytest.approx(0, abs=1e-10)
    # var(w) = var / (var + eps): 1 up to eps whenever the valid values are spread out.
    assert masked_var(w, mask) == pytest.approx(xv.var() / (xv.var() + 1e-8), rel=1e-9, abs=1e-12)
    if xv.var() > 1e-2:
        assert masked_var(w, mask) == pytest.approx(1, rel=1e-6)
    unshifted = whiten(x, mask, shift_mean=False)
    assert masked_mean(unshifted, mask) == pytest.approx(xv.mean(), abs=1e-9)


@given(masked_arrays(1), st.floats(-1e6, 1e6))
def test_whiten_ignores_padding(batch, fill):
    mask, (x,) = batch
    other = np.where(mask == 1, x, fill)
    np.testing.assert_array_equal(whiten(x, mask), whiten(other, mask))


def test_whiten_uses_the_biased_variance():
    # Two valid values: biased std = 1 -> +-1; TRL's unbiased std = sqrt(2) would give +-0.707.
    w = whiten(np.array([[1.0, 3.0, 7.0]]), np.array([[1, 1, 0]]))
    np.testing.assert_allclose(w, [[-1, 1, 0]], rtol=1e-8)


def test_whiten_single_valid_token_is_zero_not_nan():
    for dtype in (np.float32, np.float64):
        w = whiten(np.array([[2.5, 0.0, 0.0]], dtype=dtype), np.array([[1, 0, 0]]))
        assert w.dtype == dtype
        np.testing.assert_array_equal(w, [[0, 0, 0]])
    assert masked_var(np.array([[2.5, np.nan]]), np.array([[1, 0]])) == 0


def test_masked_stats_bad_input():
    with pytest.raises(ValueError, match="no valid entries"):
        masked_mean(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"^x is not finite"):
        whiten(np.array([[np.nan, 1.0]]), np.ones((1, 2)))


# ---- clipped surrogate ---------------------------------------------------------------------------------

def off_kink_log_ratios(rng, shape):
    """log ratios whose ratios lie in [0.5, 0.7], [0.85, 1.15] or [1.3, 1.6]: 0.05 or more off 1 +- EPS."""
    bands = np.array([[0.5, 0.7], [0.85, 1.15], [1.3, 1.6]])
    band = bands[rng.integers(0, 3, size=shape)]  # (B, T, 2)
    return np.log(rng.uniform(band[..., 0], band[..., 1]))


def test_policy_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    mask = right_padded_mask([5, 3], 5)
    logp_old = rng.uniform(-3, -0.5, size=(2, 5))
    logp = logp_old + off_kink_log_ratios(rng, (2, 5))
    advantages = rng.choice([-1, 1], size=(2, 5)) * rng.uniform(0.5, 2, size=(2, 5))  # away from 0
    dloss = rng.uniform(0.5, 2)

    loss, cache = policy_loss_forward(logp, logp_old, advantages, mask, EPS)
    clipfrac = cache["stats"]["policy/clipfrac"]
    assert 0 < clipfrac < 1  # both branches are exercised
    dlogp = policy_loss_backward(dloss, cache)
    f = lambda: dloss * policy_loss_forward(logp, logp_old, advantages, mask, EPS)[0]
    errors = gradient_errors(f, {"logp": logp}, {"logp": dlogp})
    assert errors["logp"] < 1e-7


def test_policy_loss_by_hand():
    logp_old = np.zeros((1, 2))
    mask = np.ones((1, 2))
    adv = np.array([[1.0, -1.0]])
    # ratios 1.5 and 0.5: max(-1.5, -1.2) = -1.2 and max(0.5, 0.8) = 0.8, both clipped.
    loss, cache = policy_loss_forward(np.log([[1.5, 0.5]]), logp_old, adv, mask, EPS)
    assert loss == pytest.approx(-0.2, rel=1e-14)
    assert cache["stats"]["policy/clipfrac"] == 1
    np.testing.assert_array_equal(policy_loss_backward(1.0, cache), [[0, 0]])
    # ratios 0.5 and 1.5: max(-0.5, -0.8) = -0.5 and max(1.5, 1.2) = 1.5, both unclipped.
    loss, cache = policy_loss_forward(np.log([[0.5, 1.5]]), logp_old, adv, mask, EPS)
    assert loss == pytest.approx(0.5, rel=1e-14)
    assert cache["stats"]["policy/clipfrac"] == 0
    approxkl = (0.5 * np.log(0.5) ** 2 + 0.5 * np.log(1.5) ** 2) / 2  # mean of 0.5 (log ratio)^2
    assert cache["stats"]["policy/approxkl"] == pytest.approx(approxkl, rel=1e-14)
    np.testing.assert_allclose(policy_loss_backward(1.0, cache), [[-0.25, 0.75]], rtol=1e-14)


@given(masked_arrays(2), st.data())
def test_policy_loss_inside_clip_range_is_unclipped(batch, data):
    mask, (logp_old, advantages) = batch
    ratio = data.draw(hnp.arrays(np.float64, mask.shape, elements=st.floats(1 - EPS, 1 + EPS)))
    logp = logp_old + np.log(ratio)
    loss, cache = policy_loss_forward(logp, logp_old, advantages, mask, EPS)
    valid = mask == 1
    ratio = np.exp(logp - logp_old)
    r = ratio[valid]
    assert loss == pytest.approx(-np.mean(advantages[valid] * r), rel=1e-9, abs=1e-12)
    # A ratio drawn at 1 +- EPS may round to just past the kink: check the gradient where it is in range.
    inside = valid & (ratio >= 1 - EPS) & (ratio <= 1 + EPS)
    expected = -advantages[inside] * ratio[inside] / valid.sum()
    np.testing.assert_allclose(policy_loss_backward(1.0, cache)[inside], expected, rtol=1e-9, atol=1e-12)


@given(masked_arrays(3, lo=-2, hi=2), st.floats(0.1, 3))
def test_policy_gradient_is_zero_exactly_where_the_clip_is_active(batch, dloss):
    mask, (logp, logp_old, advantages) = batch
    loss, cache = policy_loss_forward(logp, logp_old, advantages, mask, EPS)
    valid = mask == 1
    ratio = np.exp(logp - logp_old)
    # Independent definition: the pessimistic bound picks the clipped term when the ratio has moved past
    # the clip in the direction the advantage rewards.
    active = valid & (((advantages > 0) & (ratio > 1 + EPS)) | ((advantages < 0) & (ratio < 1 - EPS)))
    np.testing.assert_array_equal(cache["clip_active"], active)
    assert cache["stats"]["policy/clipfrac"] == pytest.approx(active.sum() / valid.sum(), rel=1e-15)
    dlogp = policy_loss_backward(dloss, cache)
    assert np.all(dlogp[active] == 0) and np.all(dlogp[~valid] == 0)
    nonzero = valid & ~active & (advantages != 0)
    np.testing.assert_allclose(dlogp[nonzero], -dloss * advantages[nonzero] * ratio[nonzero] / valid.sum(),
                               rtol=1e-12)


@given(masked_arrays(2))
def test_ratio_is_exactly_one_before_any_update(batch):
    mask, (logp, advantages) = batch
    loss, cache = policy_loss_forward(logp, logp.copy(), advantages, mask, EPS)
    assert np.all(cache["ratio"] == 1)
    assert cache["stats"]["policy/clipfrac"] == 0 and cache["stats"]["policy/approxkl"] == 0
    assert loss == pytest.approx(-masked_mean(advantages, mask), rel=1e-12, abs=1e-12)


def test_policy_loss_keeps_float32():
    logp = np.array([[-1.0, -2.0, -0.5]], dtype=np.float32)
    adv = np.array([[1.0, -0.5, 2.0]], dtype=np.float32)
    loss, cache = policy_loss_forward(logp, logp + 0.3, adv, np.array([[1, 1, 0]]), np.float64(EPS))
    assert loss.dtype == np.float32 and policy_loss_backward(np.float64(0.7), cache).dtype == np.float32


def test_policy_loss_bad_input():
    z, m = np.zeros((2, 3)), np.ones((2, 3))
    with pytest.raises(ValueError, match=r"advantages has shape \(3, 2\) but mask has shape \(2, 3\)"):
        policy_loss_forward(z, z, np.zeros((3, 2)), m)
    bad = z.copy()
    bad[0, 1] = np.inf
    with pytest.raises(ValueError, match=r"^logp is not finite at valid position \(0, 1\)"):
        policy_loss_forward(bad, z, z, m)
    with pytest.raises(ValueError, match=r"^logp_old is not finite"):
        policy_loss_forward(z, bad, z, m)
    with pytest.raises(ValueError, match=r"^advantages is not finite"):
        policy_loss_forward(z, z, bad * np.nan, m)
    with pytest.raises(ValueError, match="no valid entries"):
        policy_loss_forward(z, z, z, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss_forward(z, z, z, m, clip_eps=0.0)


# ---- clipped value loss --------------------------------------------------------------------------------

def off_kink_values(rng, shape, margin=0.05):
    """(values, values_old, returns) at least `margin` away from both kinks of the clipped value loss:
    |v - v_old| = EPS (the clip's edge) and |v - R| = |v_clip - R| (the max switching branch)."""
    values_old = rng.uniform(-1, 1, size=shape)
    d = rng.choice([-1, 1], size=shape) * np.where(rng.random(shape) < 0.5, rng.uniform(0, 0.15, shape),
                                                   rng.uniform(0.25, 0.6, shape))
    values = values_old + d
    v_clip = np.clip(values, values_old - EPS, values_old + EPS)
    returns = rng.uniform(-1.5, 1.5, size=shape)
    for _ in range(1000):  # resample the returns that sit near the switch between the two branches
        near = (np.abs(np.abs(values - returns) - np.abs(v_clip - returns)) < margin) & (values != v_clip)
        if not near.any():
            return values, values_old, returns
        returns[near] = rng.uniform(-1.5, 1.5, size=near.sum())
    raise RuntimeError("could not place the returns off the kink")


def test_value_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    mask = right_padded_mask([4, 5, 2], 5)
    values, values_old, returns = off_kink_values(rng, (3, 5))
    dloss = rng.uniform(0.5, 2)
    loss, cache = value_loss_forward(values, values_old, returns, mask, EPS, vf_coef=0.1)
    assert 0 < cache["stats"]["val/clipfrac"] < 1  # both branches are exercised
    dvalues = value_loss_backward(dloss, cache)
    f = lambda: dloss * value_loss_forward(values, values_old, returns, mask, EPS, vf_coef=0.1)[0]
    errors = gradient_errors(f, {"values": values}, {"values": dvalues})
    assert errors["values"] < 1e-7


def test_value_loss_by_hand():
    values_old = np.zeros((1, 2))
    values = np.ones((1, 2))  # v_clip = 0.2 on both tokens
    returns = np.array([[0.0, 2.0]])
    # token 0: max(1, 0.04) = 1 unclipped; token 1: max(1, 3.24) = 3.24, clip active.
    loss, cache = value_loss_forward(values, values_old, returns, np.ones((1, 2)), EPS, vf_coef=0.1)
    assert loss == pytest.approx(0.1 * 0.5 * (1 + 3.24) / 2, rel=1e-14)
    assert cache["stats"]["val/clipfrac"] == 0.5
    np.testing.assert_allclose(value_loss_backward(1.0, cache), [[0.1 * 1 / 2, 0]], rtol=1e-14)


@given(masked_arrays(2), st.data(), st.floats(0, 1))
def test_value_loss_inside_clip_range_is_unclipped(batch, data, vf_coef):
    mask, (values_old, returns) = batch
    d = data.draw(hnp.arrays(np.float64, mask.shape, elements=st.floats(-EPS, EPS)))
    values = values_old + d
    loss, cache = value_loss_forward(values, values_old, returns, mask, EPS, vf_coef)
    valid = mask == 1
    err = (values - returns)[valid]
    assert loss == pytest.approx(vf_coef * 0.5 * np.mean(err**2), rel=1e-9, abs=1e-12)
    # values_old + d with |d| = EPS may round to just outside the range, past the kink: check where in range.
    inside = valid & (values >= values_old - EPS) & (values <= values_old + EPS)
    expected = vf_coef * (values - returns)[inside] / valid.sum()
    np.testing.assert_allclose(value_loss_backward(1.0, cache)[inside], expected, rtol=1e-9, atol=1e-12)


@given(masked_arrays(3, lo=-2, hi=2), st.floats(0.1, 3))
def test_value_gradient_is_zero_exactly_where_the_clip_is_active(batch, dloss):
    mask, (values, values_old, returns) = batch
    loss, cache = value_loss_forward(values, values_old, returns, mask, EPS, vf_coef=0.1)
    valid = mask == 1
    v_clip = np.clip(values, values_old - EPS, values_old + EPS)
    active = valid & ((v_clip - returns) ** 2 > (values - returns) ** 2)
    np.testing.assert_array_equal(cache["clip_active"], active)
    assert np.all(values[active] != v_clip[active])  # the clip only wins where it moved v
    dvalues = value_loss_backward(dloss, cache)
    assert np.all(dvalues[active] == 0) and np.all(dvalues[~valid] == 0)
    rest = valid & ~active
    expected = dloss * 0.1 * (values - returns)[rest] / valid.sum()
    np.testing.assert_allclose(dvalues[rest], expected, rtol=1e-12)


def test_value_loss_keeps_float32_and_rejects_bad_input():
    v = np.array([[0.5, -0.2, 1.0]], dtype=np.float32)
    loss, cache = value_loss_forward(v, v + 0.5, v * 0, np.array([[1, 1, 0]]), np.float64(EPS))
    assert loss.dtype == np.float32 and value_loss_backward(1.0, cache).dtype == np.float32
    z, m = np.zeros((2, 3)), np.ones((2, 3))
    bad = z.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"^returns is not finite at valid position \(1, 1\)"):
        value_loss_forward(z, z, bad, m)
    with pytest.raises(ValueError, match=r"^values is not finite"):
        value_loss_forward(bad, z, z, m)
    with pytest.raises(ValueError, match=r"^values_old is not finite"):
        value_loss_forward(z, bad, z, m)
    with pytest.raises(ValueError, match=r"values_old has shape \(2, 2\)"):
        value_loss_forward(z, np.zeros((2, 2)), z, m)
    with pytest.raises(ValueError, match="vf_coef"):
        value_loss_forward(z, z, z, m, vf_coef=-1.0)


# ---- explained variance --------------------------------------------------------------------------------

@given(masked_arrays(2))
def test_explained_variance_matches_its_definition(batch):
    mask, (values, returns) = batch
    ev = explained_variance(values, returns, mask)
    R, V = returns[mask == 1], values[mask == 1]
    if R.min() == R.max():
        assert np.isnan(ev)
    elif R.var() > 1e-6:  # below that, both variances are mostly rounding and may differ
        assert ev == pytest.approx(1 - (R - V).var() / R.var(), rel=1e-9, abs=1e-9)


def test_explained_variance_by_hand():
    returns = np.array([[1.0, 2.0, 3.0, np.nan]])
    mask = np.array([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == 1  # perfect values
    assert explained_variance(np.full((1, 4), 5.0), returns, mask) == pytest.approx(0, abs=1e-15)  # constant
    assert explained_variance(-returns, returns, mask) == pytest.approx(-3, rel=1e-14)  # var(2R) = 4 var(R)
    assert np.isnan(explained_variance(returns, np.ones((1, 4)), mask))  # var(R) = 0
    # 0.1 + 0.1 + 0.1 rounds, so the computed variance of these equal returns is ~2e-34, not 0.
    assert np.isnan(explained_variance(returns, np.full((1, 4), 0.1), mask))
