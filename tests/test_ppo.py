"""PPO through both networks: the full loss's gradient for every parameter, exactness of the first step,
the temperature that samples is the one that scores, lr = 0 changes nothing, and a NaN anywhere stops the
update before anything is written."""
import numpy as np
import pytest

from minirlhf import layers as L
from minirlhf import ppo
from minirlhf import transformer as tf
from minirlhf.kit.gradcheck import MODEL_TOL, gradient_errors, key_bias_zero
from minirlhf.kit.inputs import tiny_model
from minirlhf.kl import KLControllerConfig
from minirlhf.reward import RewardModel, init_reward_params
from minirlhf.tokenizer import EOS, VOCAB_SIZE
from minirlhf.world import all_prompts

TINY = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=32, n_layer=1, n_head=2, n_embd=8)
GRAD = tf.GPTConfig(vocab_size=9, n_ctx=8, n_layer=1, n_head=2, n_embd=4)  # small: every entry checked
PROMPTS = [p for p in all_prompts() if len(p.text) <= 20]


def models(dtype=np.float64, seed=0, eos_bias=0.0, model_cfg=TINY, temperature=1.0, max_new_tokens=8):
    """policy (a Policy), reference (parameters), reward model, value model: tiny, random, a wide init."""
    params = {k: v.astype(dtype) for k, v in tiny_model(model_cfg, seed).items()}
    params["wte"][EOS] += eos_bias * params["ln_f.g"]  # eos_bias > 0 makes short responses likely
    policy = tf.Policy(params, model_cfg, tf.Sampling(temperature, max_new_tokens))
    reference = {k: v.copy() for k, v in params.items()}
    reward = RewardModel(init_reward_params(params, model_cfg, np.random.default_rng(seed + 1)), model_cfg)
    value = ppo.init_value_params(RewardModel(reward.params, model_cfg, gain=1.5, bias=0.2))
    return policy, reference, reward, value


def test_full_ppo_loss_gradient_through_both_networks():
    rng = np.random.default_rng(1)
    policy, _, _, value = models(model_cfg=GRAD, temperature=0.9)
    B, P, N = 3, 3, 4
    seq = rng.integers(3, GRAD.vocab_size, (B, P + N))
    seq_mask = np.ones((B, P + N), np.int64)
    seq_mask[0, 0] = 0  # a left-padded prompt
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    seq_mask[:, P:] = mask
    logp, _ = ppo.response_logprobs(policy, seq, seq_mask, seq[:, P:], P, 0.9)
    values = ppo.response_part(ppo.value_forward(value, GRAD, seq, seq_mask)[0], P, N)
    # Offsets keep every ratio and value away from the clip kinks (|log ratio| < 0.1 or > 0.35, eps = 0.2),
    # so both branches of each max are exercised and finite differences never cross a kink.
    offsets = np.array([[0.05, -0.4, 0.5, -0.08], [0.03, 0.45, 0, 0], [-0.5, 0.07, -0.06, 0]])
    mb = {"P": P, "seq": seq, "seq_mask": seq_mask, "tokens": seq[:, P:], "mask": mask,
          "logp_old": logp + offsets, "values_old": values - offsets,
          # signs chosen so that some ratios and values sit in the clipped branch and some do not
          "advantages": np.array([[0.7, 1.1, -0.9, 0.4], [-0.6, 0.8, 0, 0], [1.2, -0.5, 0.9, 0]]),
          "returns": values + np.array([[1.0, -1.0, 1.0, 0.6], [0.8, -1.2, 0, 0], [-0.7, 0.5, -0.9, 0]])}
    cfg = ppo.PPOConfig()

    def loss():
        pg_loss, vf_loss, _ = ppo.ppo_losses(policy, value, mb, cfg)
        return pg_loss + vf_loss

    pgrads, vgrads, stats = ppo.ppo_loss_and_grads(policy, value, mb, cfg)
    assert 0 < stats["policy/clipfrac"] < 1 and 0 < stats["val/clipfrac"] < 1  # both branches in play
    errors = gradient_errors(loss, {"policy": policy.params, "value": value}, {"policy": pgrads, "value": vgrads},
                             zero=key_bias_zero(GRAD))
    assert len(errors) == len(policy.params) + 2  # the value model shares the names, plus head.w and head.b
    for name, err in errors.items():
        assert err < MODEL_TOL, f"{name}: relative error {err:.2e}"


def run(updates=1, lr=1e-3, eos_bias=5.0, seed=0, dtype=np.float32, temperature=1.0, **kw):
    policy, reference, reward, value = models(dtype, eos_bias=eos_bias, temperature=temperature)
    cfg = ppo.PPOConfig(updates=updates, batch_size=8, minibatch_size=4, lr=lr, **kw)
    history = ppo.train_ppo(policy, reference, reward, value, PROMPTS, cfg, np.random.default_rng(seed),
                            log=lambda s: None)
    return policy, reference, value, history


def test_first_minibatch_ratio_is_exactly_one():
    _, _, _, history = run(updates=2)
    for h in history:
        assert h["first_minibatch/ratio_max_dev"] == 0.0
        assert h["first_minibatch/clipfrac"] == 0.0
    assert history[0]["rollout/ended"] > 0  # the reward model really scored something


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_policy_itself_as_reference_gives_zero_kl_at_first_update(temperature):
    """The reference is scored on the very arrays (and at the very temperature) the policy is."""
    _, _, _, history = run(temperature=temperature)
    assert history[0]["objective/kl"] == 0.0 and history[0]["objective/kl_exact"] == 0.0


def test_the_rollout_scores_at_the_temperature_it_sampled_at():
    """At tau = 0.5, the rollout's old and reference log-probs are log softmax(logits / 0.5) of the sampled
    tokens (checked against a forward pass here), the sampler's own log-probs agree, and scoring at tau = 1
    would not."""
    policy, _, reward, value = models(np.float64, eos_bias=1.0, temperature=0.5)
    reference = {k: v + 0.01 for k, v in policy.params.items()}  # a reference that is not the policy
    prompts = PROMPTS[:6]
    cfg = ppo.PPOConfig(batch_size=6, minibatch_size=3)
    batch, _ = ppo.rollout(policy, reference, reward, value, prompts, 0.1, cfg, np.random.default_rng(3),
                           [np.arange(3), np.arange(3, 6)])
    P, tokens, mask = batch["P"], batch["tokens"], batch["mask"] > 0
    for params, key in ((policy.params, "logp_old"), (reference, None)):
        logits = ppo.response_part(tf.forward(params, TINY, batch["seq"], batch["seq_mask"])[0], P, tokens.shape[1])
        at_tau = L.token_logprobs_forward(logits, tokens, 0.5)[0]
        at_one = L.token_logprobs_forward(logits, tokens, 1.0)[0]
        if key:
            np.testing.assert_allclose(batch[key][mask], at_tau[mask], rtol=1e-10, atol=1e-10)
        assert np.abs(at_tau - at_one)[mask].max() > 0.1  # tau really matters here
    gen = tf.generate(policy.params, TINY, batch["seq"][:, :P], batch["seq_mask"][:, :P], 8,
                      np.random.default_rng(3), 0.5)
    np.testing.assert_array_equal(gen["tokens"], tokens)  # the same draws: the rollout sampled at tau
    np.testing.assert_allclose(gen["logprobs"][mask], batch["logp_old"][mask], rtol=1e-10, atol=1e-10)


def test_lr_zero_changes_nothing():
    policy, reference, value, _ = run(updates=2, lr=0.0)
    _, _, _, value0 = models(np.float32, eos_bias=5.0)
    for k in policy.params:
        np.testing.assert_array_equal(policy.params[k], reference[k])
    for k in value:
        np.testing.assert_array_equal(value[k], value0[k])


def test_learning_changes_the_policy_and_is_deterministic():
    p1, ref, _, h1 = run(updates=2)
    p2, _, _, h2 = run(updates=2)
    assert any(not np.array_equal(p1.params[k], ref[k]) for k in ref)
    for k in ref:
        np.testing.assert_array_equal(p1.params[k], p2.params[k])
    assert [h["gold/score"] for h in h1] == [h["gold/score"] for h in h2]


@pytest.mark.parametrize("network, message", [("reward", "NaN"), ("value", "not finite")])
def test_nan_raises_and_leaves_parameters_untouched(network, message):
    """A NaN reward-model score or value stops the update before any parameter is written."""
    policy, reference, reward, value = models(np.float32, eos_bias=5.0)
    {"reward": reward.params, "value": value}[network]["head.b"] = np.asarray(np.nan, np.float32)
    before = {k: v.copy() for k, v in policy.params.items()}
    value_before = {k: v.copy() for k, v in value.items()}
    cfg = ppo.PPOConfig(updates=1, batch_size=8, minibatch_size=4, lr=1e-3)
    with pytest.raises(ValueError, match=message):
        ppo.train_ppo(policy, reference, reward, value, PROMPTS, cfg, np.random.default_rng(0), log=lambda s: None)
    for k in policy.params:
        np.testing.assert_array_equal(policy.params[k], before[k])
    for k in value:
        np.testing.assert_array_equal(value[k], value_before[k])


def test_a_nan_gradient_mid_update_undoes_the_whole_update(monkeypatch):
    """Update 2's third minibatch step (of 8: 4 epochs x 2) gets a NaN gradient after two of its steps were
    applied: the policy and value are left exactly as after update 1 (a run of one update), not half-moved."""
    after_one, _, value_after_one, _ = run(updates=1)
    calls, real = [], ppo.ppo_loss_and_grads

    def nan_on_the_eleventh(*args):
        pgrads, vgrads, s = real(*args)
        calls.append(1)
        return ({k: g * np.nan if len(calls) == 11 else g for k, g in pgrads.items()}, vgrads, s)
    monkeypatch.setattr(ppo, "ppo_loss_and_grads", nan_on_the_eleventh)
    policy, reference, reward, value = models(np.float32, eos_bias=5.0)
    cfg = ppo.PPOConfig(updates=2, batch_size=8, minibatch_size=4, lr=1e-3)
    with pytest.raises(ValueError, match="PPO update 2, epoch 2, minibatch 1: the gradient of .* not finite; the "
                                         "update was undone"):
        ppo.train_ppo(policy, reference, reward, value, PROMPTS, cfg, np.random.default_rng(0), log=lambda s: None)
    assert len(calls) == 11
    for k in policy.params:
        np.testing.assert_array_equal(policy.params[k], after_one.params[k])
    for k in value:
        np.testing.assert_array_equal(value[k], value_after_one[k])


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of minibatch_size"):
        ppo.PPOConfig(batch_size=10, minibatch_size=4)
    with pytest.raises(ValueError):
        ppo.PPOConfig(updates=0)
    with pytest.raises(ValueError):
        ppo.PPOConfig(kl=KLControllerConfig(kl_coef=-1.0))
