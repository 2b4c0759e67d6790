"""AdamW against a two-step example worked by hand, clipping, the schedule, and refusing bad gradients."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf.optim import AdamWConfig, adamw_init, adamw_step, all_or_nothing, clip_grads, global_norm, lr_schedule


def test_adamw_two_steps_by_hand():
    cfg = AdamWConfig(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, max_grad_norm=None)
    params = {"w": np.array([[1.0]]), "b": np.array([1.0])}  # w decays (a matrix), b does not
    state = adamw_init(params)
    adamw_step(params, {"w": np.array([[0.5]]), "b": np.array([0.5])}, state, cfg)
    # step 1, g = 0.5: m = 0.1 * 0.5 = 0.05, v = 0.001 * 0.25 = 0.00025,
    # m_hat = 0.05 / 0.1 = 0.5, v_hat = 0.00025 / 0.001 = 0.25, update = 0.1 * 0.5 / (0.5 + 1e-8)
    w1 = 1.0 - 0.1 * 0.1 * 1.0 - 0.1 * 0.5 / (0.5 + 1e-8)
    b1 = 1.0 - 0.1 * 0.5 / (0.5 + 1e-8)
    assert params["w"][0, 0] == pytest.approx(w1, rel=1e-15)
    assert params["b"][0] == pytest.approx(b1, rel=1e-15)
    adamw_step(params, {"w": np.array([[-1.0]]), "b": np.array([-1.0])}, state, cfg)
    # step 2, g = -1: m = 0.9 * 0.05 - 0.1 = -0.055, v = 0.999 * 0.00025 + 0.001 = 0.00124975,
    # m_hat = -0.055 / (1 - 0.81), v_hat = 0.00124975 / (1 - 0.998001)
    step2 = 0.1 * (-0.055 / 0.19) / (np.sqrt(0.00124975 / 0.001999) + 1e-8)
    assert params["w"][0, 0] == pytest.approx(w1 - 0.1 * 0.1 * w1 - step2, rel=1e-12)
    assert params["b"][0] == pytest.approx(b1 - step2, rel=1e-12)
    assert state["t"] == 2


def test_eps_outside_the_square_root():
    """PyTorch places eps after sqrt(v_hat): with a tiny gradient the first step is still lr * sign."""
    cfg = AdamWConfig(lr=1.0, eps=1e-8, max_grad_norm=None)
    params = {"b": np.array([0.0])}
    adamw_step(params, {"b": np.array([1e-6])}, adamw_init(params), cfg)
    assert params["b"][0] == pytest.approx(-1e-6 / (1e-6 + 1e-8), rel=1e-12)


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=6), st.floats(0.1, 10))
def test_clipping_caps_the_global_norm_and_keeps_direction(values, max_norm):
    grads = {"a": np.array(values), "b": np.array(values[::-1]) * 2}
    clipped, norm = clip_grads(grads, max_norm)
    assert norm == pytest.approx(np.sqrt(sum((g ** 2).sum() for g in grads.values())))
    new_norm = global_norm(clipped)
    if norm <= max_norm:
        assert clipped is grads
    else:
        assert new_norm == pytest.approx(max_norm, rel=1e-5)
        for k in grads:  # same direction: a positive multiple
            np.testing.assert_allclose(clipped[k] * norm, grads[k] * new_norm, rtol=1e-9, atol=1e-9)


def test_nan_gradient_changes_nothing():
    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    state = adamw_init(params)
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(ValueError, match="gradient b is not finite"):
        adamw_step(params, {"w": np.ones((2, 2)), "b": np.array([1.0, np.nan])}, state, AdamWConfig())
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        assert not state["m"][k].any() and not state["v"][k].any()
    assert state["t"] == 0


def test_mismatched_gradients_raise():
    params = {"w": np.ones((2, 2))}
    with pytest.raises(ValueError, match="shape"):
        adamw_step(params, {"w": np.ones(2)}, adamw_init(params), AdamWConfig())
    with pytest.raises(ValueError, match="names differ"):
        adamw_step(params, {"v": np.ones((2, 2))}, adamw_init(params), AdamWConfig())
    with pytest.raises(ValueError):
        AdamWConfig(lr=-1.0)


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_schedule(s, 10, 1.0, warmup_steps=2) for s in range(11)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert np.all(np.diff(lrs[2:]) < 0)
    assert lrs[10] == 0.0
    assert lr_schedule(0, 4, 1.0) == 1.0 and lr_schedule(3, 4, 1.0) == 0.25
    for bad in ({"step": 0, "total_steps": 5, "warmup_steps": 5}, {"step": 11, "total_steps": 10},
                {"step": -1, "total_steps": 10}, {"step": 0, "total_steps": 0}):
        with pytest.raises(ValueError, match="step"):
            lr_schedule(peak_lr=1.0, **bad)
    for peak in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="peak_lr"):
            lr_schedule(0, 10, peak)


def test_all_or_nothing_puts_every_array_and_count_back_when_the_block_raises():
    params = {"w": np.ones((2, 2)), "b": np.zeros(2)}
    state = adamw_init(params)
    cfg = AdamWConfig(lr=0.1)
    adamw_step(params, {"w": np.ones((2, 2)), "b": np.ones(2)}, state, cfg)
    before = ({k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in state["m"].items()},
              {k: v.copy() for k, v in state["v"].items()}, state["t"])
    arrays = {"w": params["w"], "b": params["b"], "m_w": state["m"]["w"]}  # the caller's very arrays
    with pytest.raises(KeyboardInterrupt):
        with all_or_nothing(params, state):
            adamw_step(params, {"w": np.full((2, 2), 3.0), "b": np.ones(2)}, state, cfg)
            adamw_step(params, {"w": np.full((2, 2), -1.0), "b": np.ones(2)}, state, cfg)
            raise KeyboardInterrupt  # an interrupt counts too
    assert state["t"] == before[3]
    for k in params:
        np.testing.assert_array_equal(params[k], before[0][k])
        np.testing.assert_array_equal(state["m"][k], before[1][k])
        np.testing.assert_array_equal(state["v"][k], before[2][k])
    assert params["w"] is arrays["w"] and state["m"]["w"] is arrays["m_w"]  # restored in place, not rebound
    with all_or_nothing(params, state):  # no exception: the block's changes stay
        adamw_step(params, {"w": np.ones((2, 2)), "b": np.ones(2)}, state, cfg)
    assert state["t"] == before[3] + 1 and not np.array_equal(params["w"], before[0]["w"])


def test_the_global_norm_of_huge_float32_gradients_is_finite_and_clipping_keeps_their_direction():
    """Squares of float32 gradients of 5e19 overflow float32 (max 3.4e38); the norm is accumulated in float64
    (the mutant without it gave an infinite norm, and clipping then zeroed every gradient)."""
    g = {"w": np.full(4, 5e19, np.float32), "b": np.full(1, -5e19, np.float32)}
    assert global_norm(g) == pytest.approx(5e19 * np.sqrt(5), rel=1e-6)
    clipped, norm = clip_grads(g, 1.0)
    assert np.isfinite(norm) and all(x.dtype == np.float32 for x in clipped.values())
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["w"], 1 / np.sqrt(5), rtol=1e-5)


def test_defaults_that_are_conventions():
    """The defaults CONVENTIONS.md states: PyTorch's AdamW betas and eps, clipping at norm 1."""
    cfg = AdamWConfig()
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.max_grad_norm, cfg.weight_decay) == (0.9, 0.999, 1e-8, 1.0, 0.0)


def test_a_one_step_schedule_is_the_peak_rate_then_zero():
    """total_steps = 1 without warm-up is a valid schedule: the one step at peak_lr, 0 after it."""
    assert lr_schedule(0, 1, 0.5) == 0.5 and lr_schedule(1, 1, 0.5) == 0.0
