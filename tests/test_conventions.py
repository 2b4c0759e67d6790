"""Where frameworks differ, minirlhf's choice pinned by the numbers minirlhf/CONVENTIONS.md quotes: no clamp
of the KL estimators or the PPO log-ratio (OpenRLHF clamps), whitening's eps inside the square root (OpenRLHF
clamps the variance), the warm-up one step ahead of transformers', torch's clipping rule."""
import numpy as np
import pytest

from minirlhf import kl, optim, ppo_objective as po


def test_the_kl_estimators_are_not_clamped():
    one = np.ones((1, 1), np.int64)
    k = kl.kl_estimators(np.array([[12.0]]), np.array([[0.0]]), one)  # logp - logp_ref = 12
    assert k["k1"][0, 0] == 12.0  # OpenRLHF: 10
    k = kl.kl_estimators(np.array([[0.0]]), np.array([[12.0]]), one)  # -12
    assert k["k3"][0, 0] == pytest.approx(np.exp(12.0) - 13.0, rel=1e-15)  # 162741.79; OpenRLHF: 10
    assert round(float(k["k3"][0, 0]), 2) == 162741.79


def test_the_ppo_log_ratio_is_not_clamped():
    """At a log-ratio of 21 with advantage -1 (the unclipped branch), 2 valid tokens: the gradient is
    e^21 / 2 = 6.59e8 (OpenRLHF clamps the log-ratio at 20: 0 beyond it)."""
    logp, old = np.array([[21.0, 0.0]]), np.zeros((1, 2))
    loss, cache = po.policy_loss_forward(logp, old, np.array([[-1.0, 1.0]]), np.ones((1, 2)))
    dlogp = po.policy_loss_backward(1.0, cache)
    assert dlogp[0, 0] == pytest.approx(np.exp(21.0) / 2, rel=1e-15) and round(dlogp[0, 0] / 1e8, 2) == 6.59


def test_whitening_adds_eps_to_the_variance_inside_the_square_root():
    """(x - mean) / sqrt(var + 1e-8); OpenRLHF's rsqrt(clamp(var, 1e-8)) differs once var is near 1e-8."""
    x = np.array([[1.0, 1.0 + 2e-5]])  # var = 1e-10
    out = po.whiten(x, np.ones((1, 2)))
    var = x.var()
    np.testing.assert_allclose(out, (x - x.mean()) / np.sqrt(var + 1e-8), rtol=1e-12)
    assert not np.allclose(out, (x - x.mean()) / np.sqrt(max(var, 1e-8)), rtol=1e-3)


def test_the_warm_up_runs_one_step_ahead_of_transformers():
    """Step s of W warm-up steps: peak (s + 1) / W (transformers' get_linear_schedule_with_warmup: s / W, so
    its first step has learning rate 0)."""
    assert [optim.lr_schedule(s, 10, 1.0, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert optim.lr_schedule(9, 10, 1.0, 4) == pytest.approx(1 / 6)


def test_clipping_scales_as_torch_does_just_below_the_bound():
    """torch.nn.utils.clip_grad_norm_ multiplies by min(1, max / (norm + 1e-6)): a norm 5e-7 below max is
    scaled (by a hair under 1); a norm well below it is untouched."""
    g = {"w": np.array([1.0 - 5e-7])}
    clipped, norm = optim.clip_grads(g, 1.0)
    assert clipped["w"][0] == pytest.approx((1.0 - 5e-7) / (1.0 - 5e-7 + 1e-6), rel=1e-15)
    assert clipped["w"][0] < g["w"][0]
    small = {"w": np.array([0.5])}
    assert optim.clip_grads(small, 1.0)[0] is small


def test_the_defaults_that_are_conventions():
    """Ziegler et al.'s controller (kl_coef 0.2, horizon 10000; TRL's target 6), PPO's clip 0.2 for policy and
    value, gamma 1 and lambda 0.95, the value loss's coefficient 0.1, the no-EOS score -1 in normalised reward
    units: CONVENTIONS.md states each, and a port compares against these numbers."""
    from minirlhf import reward
    from minirlhf.kl import KLControllerConfig
    from minirlhf.ppo import PPOConfig
    c = KLControllerConfig()
    assert (c.kl_coef, c.adaptive, c.target, c.horizon) == (0.2, False, 6.0, 10000)
    p = PPOConfig()
    assert (p.clip_eps, p.vf_clip_eps, p.gamma, p.lam, p.vf_coef, p.max_grad_norm) == (0.2, 0.2, 1.0, 0.95, 0.1, 1.0)
    assert reward.NO_EOS_SCORE == -1.0
    # DPO: beta 0.1 (TRL's DPOConfig default, and dpo_loss_forward's), the global-norm clip at 1.0 like every
    # trainer here (Hugging Face Trainer's max_grad_norm)
    import inspect
    from minirlhf import dpo
    d = dpo.DPOConfig()
    assert (d.beta, d.max_grad_norm) == (0.1, 1.0)
    assert inspect.signature(dpo.dpo_loss_forward).parameters["beta"].default == 0.1
    # the losses' own defaults are PPOConfig's: clip 0.2 for the policy and the value, the value coefficient 0.1
    from minirlhf import ppo_objective as po

    def defaults(fn):
        return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not v.empty}
    assert defaults(po.policy_loss_forward) == {"clip_eps": 0.2}
    assert defaults(po.value_loss_forward) == {"clip_eps": 0.2, "vf_coef": 0.1}
