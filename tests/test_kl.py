"""Tests of minirlhf.kl: the three estimators, the exact KL, the KL coefficient's controller and the token rewards."""
import dataclasses

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minirlhf.kl import KLControllerConfig, exact_kl, kl_estimators, token_rewards, update_kl_coef


@st.composite
def logp_batch(draw, lo=-20.0, hi=0.0):
    """(logp, logp_ref, mask): (B, T) log-probs, a right-padded mask, NaN at every padding position."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.float64)  # (B, T)
    floats = st.floats(lo, hi, allow_nan=False)
    logp = draw(hnp.arrays(np.float64, (B, T), elements=floats))
    logp_ref = draw(hnp.arrays(np.float64, (B, T), elements=floats))
    logp[mask == 0] = np.nan  # padding may hold anything; NaN shows any leak
    logp_ref[mask == 0] = np.nan
    return logp, logp_ref, mask


logits_arrays = hnp.arrays(np.float64, hnp.array_shapes(min_dims=3, max_dims=3, max_side=5),
                           elements=st.floats(-30, 30, allow_nan=False))


# ---- estimators ----------------------------------------------------------------------------------------

def test_estimators_known_values():
    # pi(x) = 1/2, pi_ref(x) = 1/4: log r = -log 2, r = 1/2.
    logp = np.log(np.array([[0.5, 0.5, 0.3]]))
    logp_ref = np.log(np.array([[0.25, 0.25, 0.9]]))
    mask = np.array([[1, 1, 0]])
    k = kl_estimators(logp, logp_ref, mask)
    l2 = np.log(2)
    np.testing.assert_allclose(k["k1"], [[l2, l2, 0]], rtol=1e-15)
    np.testing.assert_allclose(k["k2"], [[l2**2 / 2, l2**2 / 2, 0]], rtol=1e-15)
    np.testing.assert_allclose(k["k3"], [[l2 - 0.5, l2 - 0.5, 0]], rtol=1e-15)
    np.testing.assert_allclose(k["k1_sum"], [2 * l2], rtol=1e-15)
    np.testing.assert_allclose(k["k3_sum"], [2 * (l2 - 0.5)], rtol=1e-15)


@given(logp_batch())
def test_estimators_of_identical_policies_are_zero(batch):
    logp, _, mask = batch
    k = kl_estimators(logp, logp, mask)
    for name in ("k1", "k2", "k3", "k1_sum", "k2_sum", "k3_sum"):
        assert np.all(k[name] == 0), name


@given(logp_batch())
def test_estimators_signs_and_padding(batch):
    logp, logp_ref, mask = batch
    k = kl_estimators(logp, logp_ref, mask)
    assert np.all(k["k2"] >= 0) and np.all(k["k3"] >= 0)
    for name in ("k1", "k2", "k3"):
        assert np.all(np.isfinite(k[name])), name
        assert np.all(k[name][mask == 0] == 0), name
        np.testing.assert_allclose(k[name + "_sum"], k[name].sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(k["k1"][mask == 1], (logp - logp_ref)[mask == 1], rtol=1e-12)


def _sample_estimators(p, q, n, rng):
    """Per-sample k1, k2, k3 for n tokens x ~ p, scored by p (policy) and q (reference)."""
    x = rng.choice(len(p), size=n, p=p)
    logp, logp_ref = np.log(p)[x][None, :], np.log(q)[x][None, :]  # (1, n): one long "response"
    return kl_estimators(logp, logp_ref, np.ones_like(logp))


def _z(samples, expected):
    return (samples.mean() - expected) / (samples.std() / np.sqrt(samples.size))


def test_k1_and_k3_are_unbiased_k2_is_not():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
    q = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    kl = exact_kl(np.log(p)[None, None, :], np.log(q)[None, None, :])[0, 0]
    assert kl == pytest.approx(np.sum(p * np.log(p / q)), rel=1e-12)
    k = _sample_estimators(p, q, 200_000, rng)
    assert abs(_z(k["k1"], kl)) < 4
    assert abs(_z(k["k3"], kl)) < 4
    # k2 estimates E_p[(log q/p)^2 / 2], here far from the KL (0.785 vs 0.619).
    e_k2 = np.sum(p * 0.5 * np.log(q / p) ** 2)
    assert e_k2 - kl > 0.1
    assert abs(_z(k["k2"], e_k2)) < 4
    assert _z(k["k2"], kl) > 20


def test_k3_has_lower_variance_than_k1_when_policies_are_close():
    rng = np.random.default_rng(1)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    q = np.array([0.38, 0.31, 0.21, 0.10])
    k = _sample_estimators(p, q, 20_000, rng)
    assert np.mean(k["k1"] < 0) > 0.3  # k1 is negative for a good share of samples
    assert k["k3"].std() < 0.1 * k["k1"].std()


# ---- exact KL ------------------------------------------------------------------------------------------

@given(logits_arrays, st.data())
def test_exact_kl_matches_scipy_and_is_nonnegative(logits, data):
    logits_ref = data.draw(hnp.arrays(np.float64, logits.shape, elements=st.floats(-30, 30)))
    kl = exact_kl(logits, logits_ref)
    assert kl.shape == logits.shape[:2]
    assert np.all(kl >= 0)
    p, q = scipy.special.softmax(logits, axis=-1), scipy.special.softmax(logits_ref, axis=-1)
    np.testing.assert_allclose(kl, scipy.special.rel_entr(p, q).sum(axis=-1), rtol=1e-9, atol=1e-12)


@given(logits_arrays, st.floats(0.1, 10))
def test_exact_kl_of_identical_policies_is_zero(logits, temperature):
    assert np.all(exact_kl(logits, logits, temperature=temperature) == 0)


def test_exact_kl_applies_the_temperature():
    rng = np.random.default_rng(2)
    logits, logits_ref = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
    hot = exact_kl(logits, logits_ref, temperature=2.0)
    np.testing.assert_allclose(hot, exact_kl(logits / 2, logits_ref / 2), rtol=1e-12)
    assert np.all(np.abs(hot - exact_kl(logits, logits_ref)) > 1e-3)


def test_exact_kl_is_stable_and_shift_invariant():
    rng = np.random.default_rng(3)
    logits, logits_ref = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
    kl = exact_kl(logits, logits_ref)
    np.testing.assert_allclose(exact_kl(logits + 1000.0, logits_ref - 800.0), kl, rtol=1e-9)
    big = exact_kl(1e4 * logits, 1e4 * logits_ref)  # near-one-hot: p ~ 0 where q ~ 1 is common
    assert np.all(np.isfinite(big)) and np.all(big >= 0) and big.max() > 100


@pytest.mark.parametrize("dtype, scale", [(np.float64, 1e-9), (np.float32, 1e-4)])
def test_exact_kl_is_nonnegative_for_nearly_identical_policies(dtype, scale):
    # Here the textbook sum p (log p - log q) rounds below zero for about half the tokens (down to -3e-16
    # in float64, -2e-7 in float32); the k3 form of exact_kl has no negative term to round.
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, 5, 8))
    logits_ref = logits + scale * rng.normal(size=logits.shape)
    kl = exact_kl(logits.astype(dtype), logits_ref.astype(dtype))
    assert kl.dtype == dtype and np.all(kl >= 0)
    assert kl.max() < 100 * scale**2  # ~ sum p (dlogit)^2 / 2: tiny, not a rounding blow-up


def test_exact_kl_masks_padding_and_keeps_float32():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    logits_ref = rng.normal(size=(2, 3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    logits[mask == 0] = np.nan
    kl = exact_kl(logits, logits_ref, mask=mask)
    assert kl.dtype == np.float32
    assert np.all(kl[mask == 0] == 0) and np.all(kl[mask == 1] > 0)


def test_exact_kl_along_the_path_has_the_sequence_kl_as_expectation():
    # Two-token sequences y0 y1 over V = 3; the second token's distribution depends on the first.
    rng = np.random.default_rng(5)
    V = 3
    z0, z0_ref = rng.normal(size=V), rng.normal(size=V)  # logits for y0
    z1, z1_ref = rng.normal(size=(V, V)), rng.normal(size=(V, V))  # z1[y0] logits for y1
    p0, q0 = scipy.special.softmax(z0), scipy.special.softmax(z0_ref)
    p1, q1 = scipy.special.softmax(z1, axis=1), scipy.special.softmax(z1_ref, axis=1)
    P = p0[:, None] * p1  # (V, V) probability of the sequence y0 y1 under the policy
    Q = q0[:, None] * q1
    sequence_kl = np.sum(P * np.log(P / Q))
    # One "rollout" per y0: row y0 holds the contexts of both tokens, (V, 2, V) logits.
    logits = np.stack([np.broadcast_to(z0, (V, V)), z1], axis=1)
    logits_ref = np.stack([np.broadcast_to(z0_ref, (V, V)), z1_ref], axis=1)
    path_kl = exact_kl(logits, logits_ref).sum(axis=1)  # (V,) exact KL along the path starting y0
    assert np.sum(p0 * path_kl) == pytest.approx(sequence_kl, rel=1e-12)


# ---- controllers ---------------------------------------------------------------------------------------

def test_fixed_controller_keeps_beta():
    config = KLControllerConfig(kl_coef=0.05)
    assert update_kl_coef(0.05, kl=100.0, n_steps=64, config=config) == 0.05
    assert update_kl_coef(0.05, kl=-3.0, n_steps=64, config=config) == 0.05


def test_adaptive_controller_known_values():
    config = KLControllerConfig(kl_coef=0.1, adaptive=True, target=6.0, horizon=10000)
    # e = clip(7.2 / 6 - 1) = 0.2 (at the clip); e = 0.1; e = clip(-1) = -0.2.
    assert update_kl_coef(0.1, 7.2, 64, config) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000), rel=1e-14)
    assert update_kl_coef(0.1, 6.6, 64, config) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000), rel=1e-14)
    assert update_kl_coef(0.1, 0.0, 64, config) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000), rel=1e-14)
    assert update_kl_coef(0.1, 60.0, 64, config) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000), rel=1e-14)
    assert update_kl_coef(0.1, 6.0, 64, config) == 0.1


@given(beta=st.floats(1e-4, 10), kl=st.floats(-50, 50), target=st.floats(0.1, 20),
       n_steps=st.integers(1, 512), horizon=st.integers(1000, 20000))
def test_adaptive_controller_moves_toward_target_by_bounded_steps(beta, kl, target, n_steps, horizon):
    config = KLControllerConfig(kl_coef=beta, adaptive=True, target=target, horizon=horizon)
    new = update_kl_coef(beta, kl, n_steps, config)
    if kl > target:
        assert new > beta
    elif kl < target:
        assert new < beta
    else:
        assert new == beta
    bound = 0.2 * n_steps / horizon
    # new / beta - 1 carries the rounding of 1 + e n / h: a few float64 eps in absolute terms.
    assert abs(new / beta - 1) <= bound + 4 * np.finfo(np.float64).eps


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=0.0), "target"), (dict(target=-1.0), "target"), (dict(target=np.nan), "target"),
    (dict(horizon=0), "horizon"), (dict(horizon=-5), "horizon"),
    (dict(kl_coef=-0.1), "kl_coef"), (dict(kl_coef=np.inf), "kl_coef"),
])
def test_controller_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KLControllerConfig(adaptive=True, **kwargs)


def test_controller_bad_update_raises():
    config = KLControllerConfig(adaptive=True, target=6.0, horizon=100)
    with pytest.raises(ValueError, match="KL"):
        update_kl_coef(0.1, np.nan, 8, config)
    with pytest.raises(ValueError, match="KL"):
        update_kl_coef(0.1, np.inf, 8, config)
    with pytest.raises(ValueError, match="kl_coef"):
        update_kl_coef(-0.1, 1.0, 8, config)
    with pytest.raises(ValueError, match="n_steps"):
        update_kl_coef(0.1, 1.0, 0, config)
    with pytest.raises(ValueError, match="horizon"):
        update_kl_coef(0.1, 1.0, 500, config)  # 1 - 0.2 * 500 / 100 < 0 would flip beta's sign
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kl_coef = 1.0


# ---- token rewards -------------------------------------------------------------------------------------

def test_score_lands_on_eos():
    logp = np.full((3, 4), -1.0)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    scores = np.array([0.5, -1.0, 2.0])
    rewards, non_score = token_rewards(scores, logp, logp, mask, kl_coef=0.1)  # identical: k1 = 0
    expected = np.zeros((3, 4))
    expected[0, 2], expected[1, 0], expected[2, 3] = 0.5, -1.0, 2.0
    np.testing.assert_array_equal(rewards, expected)
    np.testing.assert_array_equal(non_score, np.zeros((3, 4)))


@given(logp_batch(), st.floats(0, 2), st.data())
def test_token_rewards_sum_to_score_minus_beta_kl(batch, beta, data):
    logp, logp_ref, mask = batch
    scores = data.draw(hnp.arrays(np.float64, (mask.shape[0],), elements=st.floats(-5, 5)))
    rewards, non_score = token_rewards(scores, logp, logp_ref, mask, beta)
    k1 = kl_estimators(logp, logp_ref, mask)["k1"]
    np.testing.assert_allclose(rewards.sum(axis=1), scores - beta * k1.sum(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(non_score, -beta * k1)
    assert np.all(rewards[mask == 0] == 0) and np.all(non_score[mask == 0] == 0)
    last = mask.sum(axis=1).astype(int) - 1  # right padding: the last valid index
    off_eos = mask.copy()
    off_eos[np.arange(mask.shape[0]), last] = 0
    np.testing.assert_array_equal(rewards[off_eos == 1], non_score[off_eos == 1])


def test_token_rewards_keep_float32():
    logp = np.array([[-1.0, -2.0, -0.5]], dtype=np.float32)
    rewards, non_score = token_rewards(np.array([1.0]), logp, logp - 0.1, np.array([[1, 1, 0]]),
                                       np.float64(0.1))
    assert rewards.dtype == np.float32 and non_score.dtype == np.float32


def test_token_rewards_bad_input():
    logp = np.zeros((2, 3))
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="no valid response token"):
        token_rewards(np.zeros(2), logp, logp, np.array([[1, 1, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match=r"scores has shape \(3,\)"):
        token_rewards(np.zeros(3), logp, logp, mask, 0.1)
    with pytest.raises(ValueError, match="scores"):
        token_rewards(np.array([0.0, np.nan]), logp, logp, mask, 0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        token_rewards(np.zeros(2), logp, logp, mask, -0.1)
    bad = logp.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"^logp is not finite at valid position \(1, 0\)"):
        token_rewards(np.zeros(2), bad, logp, mask, 0.1)
    with pytest.raises(ValueError, match=r"^logp_ref is not finite"):
        token_rewards(np.zeros(2), logp, bad, mask, 0.1)
    bad[1, 0], bad[1, 2] = 0.0, np.nan  # NaN at padding is ignored
    token_rewards(np.zeros(2), bad, logp, mask, 0.1)


def test_estimators_bad_input():
    with pytest.raises(ValueError, match=r"logp_ref has shape \(2, 4\) but mask has shape \(2, 3\)"):
        kl_estimators(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="0 and 1"):
        kl_estimators(np.zeros((2, 3)), np.zeros((2, 3)), np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="logits_ref has shape"):
        exact_kl(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="mask has shape"):
        exact_kl(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="^logits holds a NaN"):
        exact_kl(np.full((1, 1, 3), np.nan), np.zeros((1, 1, 3)))
    with pytest.raises(ValueError, match="temperature"):
        exact_kl(np.zeros((1, 1, 3)), np.zeros((1, 1, 3)), temperature=0.0)
