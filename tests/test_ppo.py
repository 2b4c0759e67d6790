"""PPO through both networks: the full loss's gradient for every parameter, exactness of the first step,
lr = 0 changes nothing, and a NaN anywhere stops the update before anything is written."""
import numpy as np
import pytest

from minirlhf import ppo
from minirlhf import transformer as tf
from minirlhf.kl import KLControllerConfig
from minirlhf.reward import init_reward_params
from minirlhf.testing import model_gradient_errors
from minirlhf.tokenizer import EOS, VOCAB_SIZE
from minirlhf.world import all_prompts

TINY = tf.Config(vocab_size=VOCAB_SIZE, n_ctx=48, n_layer=1, n_head=2, n_embd=8)
PROMPTS = [p for p in all_prompts() if len(p.text) <= 20]


def models(dtype=np.float64, seed=0, scale=0.3, eos_bias=0.0):
    """policy, reference, reward model, value model: tiny, random, with a wide init."""
    rng = np.random.default_rng(seed)
    policy = tf.init_params(TINY, rng, dtype)
    for k in policy:
        policy[k] = (policy[k] + scale * rng.standard_normal(policy[k].shape)).astype(dtype)
    policy["wte"][EOS] += eos_bias * policy["ln_f.g"]  # eos_bias > 0 makes short responses likely
    reference = {k: v.copy() for k, v in policy.items()}
    reward = init_reward_params(policy, TINY, rng)
    value = ppo.init_value_params(reward, (1.5, 0.2))
    return policy, reference, reward, value


def test_full_ppo_loss_gradient_through_both_networks():
    rng = np.random.default_rng(1)
    policy, _, _, value = models()
    B, P, N = 3, 3, 4
    seq = rng.integers(3, VOCAB_SIZE, (B, P + N))
    seq_mask = np.ones((B, P + N), np.int64)
    seq_mask[0, 0] = 0  # a left-padded prompt
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    seq_mask[:, P:] = mask
    cfg = ppo.PPOConfig(temperature=0.9)
    logits, _ = ppo.response_logits(policy, TINY, seq, seq_mask, P)
    from minirlhf.layers import token_logprobs_forward
    logp = token_logprobs_forward(logits, seq[:, P:], 0.9)[0]
    values = ppo.value_forward(value, TINY, seq, seq_mask)[0][:, P - 1:P - 1 + N]
    # Offsets keep every ratio and value away from the clip kinks (|log ratio| < 0.1 or > 0.35, eps = 0.2),
    # so both branches of each max are exercised and finite differences never cross a kink.
    offsets = np.array([[0.05, -0.4, 0.5, -0.08], [0.03, 0.45, 0, 0], [-0.5, 0.07, -0.06, 0]])
    mb = {"P": P, "seq": seq, "seq_mask": seq_mask, "tokens": seq[:, P:], "mask": mask,
          "logp_old": logp + offsets, "values_old": values - offsets,
          # signs chosen so that some ratios and values sit in the clipped branch and some do not
          "advantages": np.array([[0.7, 1.1, -0.9, 0.4], [-0.6, 0.8, 0, 0], [1.2, -0.5, 0.9, 0]]),
          "returns": values + np.array([[1.0, -1.0, 1.0, 0.6], [0.8, -1.2, 0, 0], [-0.7, 0.5, -0.9, 0]])}

    def loss():
        _, _, s = ppo.ppo_loss_and_grads(policy, value, TINY, mb, cfg)
        return s["loss/policy"] + s["loss/value"]

    pgrads, vgrads, stats = ppo.ppo_loss_and_grads(policy, value, TINY, mb, cfg)
    assert 0 < stats["policy/clipfrac"] < 1 and 0 < stats["val/clipfrac"] < 1  # both branches in play
    for net, grads in ((policy, pgrads), (value, vgrads)):
        for name, err in model_gradient_errors(loss, net, grads, TINY.n_embd).items():
            assert err < 1e-5, f"{name}: relative error {err:.2e}"


def run(updates=1, lr=1e-3, eos_bias=3.0, seed=0, dtype=np.float32, **kw):
    policy, reference, reward, value = models(dtype, eos_bias=eos_bias)
    cfg = ppo.PPOConfig(updates=updates, batch_size=8, minibatch_size=4, lr=lr, max_new_tokens=8, **kw)
    history = ppo.train_ppo(policy, reference, reward, value, TINY, PROMPTS, cfg, (1.0, 0.0),
                            np.random.default_rng(seed), log=lambda s: None)
    return policy, reference, value, history


def test_first_minibatch_ratio_is_exactly_one():
    _, _, _, history = run(updates=2)
    for h in history:
        assert h["first_minibatch/ratio_max_dev"] == 0.0
        assert h["first_minibatch/clipfrac"] == 0.0
    assert history[0]["rollout/ended"] > 0  # the reward model really scored something


def test_policy_itself_as_reference_gives_zero_kl_at_first_update():
    _, _, _, history = run()
    assert history[0]["objective/kl"] == 0.0 and history[0]["objective/kl_exact"] == 0.0


def test_lr_zero_changes_nothing():
    policy, reference, value, _ = run(updates=2, lr=0.0)
    _, _, _, value0 = models(np.float32, eos_bias=3.0)
    for k in policy:
        np.testing.assert_array_equal(policy[k], reference[k])
    for k in value:
        np.testing.assert_array_equal(value[k], value0[k])


def test_learning_changes_the_policy_and_is_deterministic():
    p1, ref, _, h1 = run(updates=2)
    p2, _, _, h2 = run(updates=2)
    assert any(not np.array_equal(p1[k], ref[k]) for k in p1)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    assert [h["gold/score"] for h in h1] == [h["gold/score"] for h in h2]


@pytest.mark.parametrize("network, message", [("reward", "NaN"), ("value", "not finite")])
def test_nan_raises_and_leaves_parameters_untouched(network, message):
    """A NaN reward-model score or value stops the update before any parameter is written."""
    policy, reference, reward, value = models(np.float32, eos_bias=3.0)
    {"reward": reward, "value": value}[network]["head.b"] = np.asarray(np.nan, np.float32)
    before = {k: v.copy() for k, v in policy.items()}
    value_before = {k: v.copy() for k, v in value.items()}
    cfg = ppo.PPOConfig(updates=1, batch_size=8, minibatch_size=4, lr=1e-3, max_new_tokens=8)
    with pytest.raises(ValueError, match=message):
        ppo.train_ppo(policy, reference, reward, value, TINY, PROMPTS, cfg, (1.0, 0.0),
                      np.random.default_rng(0), log=lambda s: None)
    for k in policy:
        np.testing.assert_array_equal(policy[k], before[k])
    for k in value:
        np.testing.assert_array_equal(value[k], value_before[k])


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of minibatch_size"):
        ppo.PPOConfig(batch_size=10, minibatch_size=4)
    with pytest.raises(ValueError):
        ppo.PPOConfig(updates=0)
    with pytest.raises(ValueError):
        ppo.PPOConfig(kl=KLControllerConfig(beta=-1.0))
