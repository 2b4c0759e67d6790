"""LoRA: the op's gradients and its equality with the merged layer, merge / unmerge rounding, the init, the
adapted model at B = 0 equal to the base bit for bit (KL 0, PPO ratio 1, dL/dA = 0), every adapter weight's
gradient through the whole model, the KV cache, float32, PPO and DPO training the adapter alone against the
untouched base, adapter files and every refusal, and demos/lora_rank.py --quick."""
import json
import math
import os
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf import dpo, fast, layers, lora, ppo
from minirlhf import transformer as tf
from minirlhf.checkpoint import save_checkpoint
from minirlhf.kit.gradcheck import MODEL_TOL, OP_TOL, gradient_errors
from minirlhf.kit.inputs import KIT_MODEL, tiny_model
from minirlhf.reward import RewardModel, init_reward_params
from minirlhf.tokenizer import EOS, VOCAB_SIZE
from minirlhf.world import all_prompts

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos"))
import lora_rank  # noqa: E402

GRAD = tf.GPTConfig(vocab_size=7, n_ctx=6, n_layer=2, n_head=2, n_embd=4)  # narrower than KIT_MODEL (C = 4)
TEXT = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=32, n_layer=1, n_head=2, n_embd=8)  # reads prompts
PROMPTS = [p for p in all_prompts() if len(p.text) <= 20]
PAIRS = [("hi!", "hello!", "go away."), ("2+1?", "3.", "it is 4."), ("x", "ab c", "ab")]


def policy_with_adapter(model_cfg=KIT_MODEL, dtype=np.float64, rank=2, seed=0, b_std=0.0, **lora_kw):
    """A Policy on tiny wide-init parameters with a fresh adapter; b_std > 0 draws B ~ N(0, b_std^2)."""
    params = {k: v.astype(dtype) for k, v in tiny_model(model_cfg, seed).items()}
    rng = np.random.default_rng(seed + 10)
    policy = lora.lora_policy(tf.Policy(params, model_cfg, tf.Sampling(1.0, 4)), lora.LoRAConfig(rank, **lora_kw),
                              rng)
    for name, w in policy.adapter.weights.items():
        if name.endswith(".lora_B") and b_std:
            w[...] = b_std * rng.standard_normal(w.shape)
    return policy


def snapshot(arrays):
    return {k: v.copy() for k, v in arrays.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------- the op

@given(st.integers(0, 10_000), st.integers(1, 3), st.booleans(), st.booleans())
def test_op_gradients_against_finite_differences(seed, r, rslora, use_fast):
    rng = np.random.default_rng(seed)
    x, W0, b = rng.standard_normal((2, 3, 4)) + 0.5, rng.standard_normal((4, 5)), rng.standard_normal(5)
    A, B = rng.standard_normal((4, r)), rng.standard_normal((r, 5))  # B != 0: every path carries signal
    s = lora.LoRAConfig(r, 2.0, rslora=rslora).scale
    ops = fast.OPS if use_fast else layers
    dy = rng.standard_normal((2, 3, 5))  # a random upstream gradient, not ones
    y, cache = lora.lora_linear_forward(x, W0, b, A, B, s, ops)
    dx, db, dA, dB = lora.lora_linear_backward(dy, cache)
    loss = lambda: np.sum(lora.lora_linear_forward(x, W0, b, A, B, s, ops)[0] * dy)
    errors = gradient_errors(loss, {"x": x, "b": b, "A": A, "B": B}, {"x": dx, "b": db, "A": dA, "B": dB})
    for name, err in errors.items():
        assert err < OP_TOL, (name, err)


@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from([np.float32, np.float64]),
       st.floats(0.1, 20.0))
def test_op_equals_the_merged_layer(seed, r, dtype, scale):
    """x W0 + b + s (x A) B = x (W0 + s A B) + b, up to the rounding of the two orders of summation."""
    rng = np.random.default_rng(seed)
    d_in, d_out = 6, 5
    x, W0, b, A, B = (rng.standard_normal(shape).astype(dtype)
                      for shape in [(3, d_in), (d_in, d_out), (d_out,), (d_in, r), (r, d_out)])
    y, _ = lora.lora_linear_forward(x, W0, b, A, B, scale)
    merged, _ = layers.linear_forward(x, lora.merge(W0, A, B, scale), b)
    assert y.dtype == merged.dtype == dtype
    # each entry is a sum of d_in + r + 2 rounded products and sums: |error| <= (d_in + r + 3) eps |terms|
    terms = np.abs(x) @ (np.abs(W0) + scale * np.abs(A) @ np.abs(B)) + np.abs(b)
    bound = (d_in + r + 3) * np.finfo(dtype).eps * terms
    assert np.all(np.abs(y.astype(np.float64) - merged) <= bound)


@given(st.integers(0, 10_000), st.sampled_from([np.float16, np.float32, np.float64]), st.floats(0.1, 20.0))
def test_unmerge_undoes_merge_to_one_rounding_each_way(seed, dtype, scale):
    """With d = fl(s A B), the same array both ways: fl(fl(W0 + d) - d) = W0 + (W0 + d) e1 then rounded, so
    |error| <= u (2 |W0| + |d|) + u^2 |W0 + d| <= eps (|W0| + |d|) (1 + eps), u = eps / 2."""
    rng = np.random.default_rng(seed)
    W0, A, B = (rng.standard_normal(s).astype(dtype) for s in [(6, 5), (6, 2), (2, 5)])
    W = lora.unmerge(lora.merge(W0, A, B, scale), A, B, scale)
    d = (A @ B) * scale
    eps = float(np.finfo(dtype).eps)
    assert W.dtype == dtype
    err = np.abs(W.astype(np.float64) - W0)
    assert np.all(err <= eps * (np.abs(W0).astype(np.float64) + np.abs(d)) * (1 + eps))


# ---------------------------------------------------------------- the adapter and its init

def test_init_follows_peft_and_the_paper():
    """kaiming-uniform: |A| <= 1/sqrt(d_in), variance 1/(3 d_in); gaussian: variance 1/r^2; B = 0; the
    pooled sample variance within 5 standard errors (uniform: sqrt(4/45) / sqrt(n) of 1/3; normal:
    sqrt(2/n) of 1)."""
    model_cfg = tf.GPTConfig(vocab_size=7, n_ctx=6, n_layer=2, n_head=2, n_embd=32)
    params = tf.init_params(model_cfg, np.random.default_rng(0))
    for init, var, se in (("kaiming_uniform", 1 / 3, math.sqrt(4 / 45)), ("gaussian", 1.0, math.sqrt(2))):
        cfg = lora.LoRAConfig(rank=8, init=init)
        adapter = lora.init_adapter(params, model_cfg, cfg, np.random.default_rng(1))
        unit = []
        for name, (d_in, d_out) in lora.adapted_layers(model_cfg, cfg).items():
            A, B = adapter.weights[f"{name}.lora_A"], adapter.weights[f"{name}.lora_B"]
            assert A.dtype == B.dtype == np.float32 and A.shape == (d_in, 8) and B.shape == (8, d_out)
            assert not B.any()
            if init == "kaiming_uniform":
                assert np.abs(A).max() <= np.float32(1 / np.sqrt(d_in))
                unit.append(A.ravel() * np.sqrt(d_in))
            else:
                unit.append(A.ravel() * 8)
        unit = np.concatenate(unit).astype(np.float64)
        assert abs(unit.var() - var) < 5 * se / math.sqrt(unit.size)
    again = lora.init_adapter(params, model_cfg, lora.LoRAConfig(8), np.random.default_rng(1))
    other = lora.init_adapter(params, model_cfg, lora.LoRAConfig(8), np.random.default_rng(2))
    first = lora.init_adapter(params, model_cfg, lora.LoRAConfig(8), np.random.default_rng(1))
    assert_same(first.weights, again.weights)  # same seed, same numbers bit for bit
    assert not np.array_equal(first.weights["h0.attn.w_qkv.lora_A"], other.weights["h0.attn.w_qkv.lora_A"])


@pytest.mark.parametrize("targets", [lora.TARGETS, ("mlp.w_fc",), ("attn.w_proj", "mlp.w_proj")])
@pytest.mark.parametrize("rank", [1, 3])
def test_trainable_count_is_r_times_d_in_plus_d_out(targets, rank):
    policy = policy_with_adapter(rank=rank, targets=targets)
    C, n_layer = KIT_MODEL.n_embd, KIT_MODEL.n_layer
    per_layer = {"attn.w_qkv": C + 3 * C, "attn.w_proj": 2 * C, "mlp.w_fc": 5 * C, "mlp.w_proj": 5 * C}
    expected = n_layer * rank * sum(per_layer[t] for t in targets)
    assert lora.n_trainable(policy.adapter) == expected == sum(w.size for w in tf.trainable(policy).values())
    assert tf.trainable(policy) is policy.adapter.weights
    assert len(policy.adapter.weights) == 2 * n_layer * len(targets)
    if targets == lora.TARGETS:
        assert expected == 16 * rank * C * n_layer


def test_lora_policy_keeps_the_very_base_arrays():
    params = tiny_model()
    base = tf.Policy(params, KIT_MODEL, tf.Sampling(0.7, 3))
    policy = lora.lora_policy(base, lora.LoRAConfig(2), np.random.default_rng(0))
    assert policy.params is params and policy.sampling == base.sampling and base.adapter is None
    assert policy.adapter.base == lora.fingerprint(params, KIT_MODEL)
    assert not any(np.shares_memory(w, p) for w in policy.adapter.weights.values() for p in params.values())


@pytest.mark.parametrize("ops", [layers, fast.OPS])
def test_wrap_copies_nothing_and_changes_only_the_linear_ops(ops):
    policy = policy_with_adapter(targets=("attn.w_proj", "mlp.w_fc"))
    view, ops_view = lora.wrap(policy.params, policy.adapter, ops)
    assert view.keys() == policy.params.keys()
    for name, x in view.items():
        if name.split(".", 1)[-1] in ("attn.w_proj", "mlp.w_fc"):
            assert isinstance(x, lora.LoRAWeight) and x.W0 is policy.params[name]
            assert x.A is policy.adapter.weights[f"{name}.lora_A"] and x.B is policy.adapter.weights[f"{name}.lora_B"]
            assert x.scale == policy.adapter.config.scale
        else:
            assert x is policy.params[name], name
    for name in vars(fast.OPS):
        assert (getattr(ops_view, name) is getattr(ops, name)) == (name not in ("linear_forward", "linear_backward"))
    x, W, b = np.ones((2, 3, 8)), policy.params["h0.attn.w_qkv"], policy.params["h0.attn.b_qkv"]
    y, cache = ops_view.linear_forward(x, W, b)  # a plain weight goes to ops' own linear layer
    np.testing.assert_array_equal(y, ops.linear_forward(x, W, b)[0])
    assert not isinstance(cache, lora.LoRACache) and len(ops_view.linear_backward(np.ones_like(y), cache)) == 3


# ---------------------------------------------------------------- B = 0: the base, exactly

@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [3, 200])  # 200 x 6 tokens: split into two halves on the fast path
def test_zero_B_gives_the_base_logits_bit_for_bit(monkeypatch, enabled, dtype, batch):
    monkeypatch.setattr(fast, "ENABLED", enabled)
    policy = policy_with_adapter(dtype=dtype)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, KIT_MODEL.vocab_size, (batch, 6))
    mask = np.ones_like(tokens)
    mask[0, :2] = 0  # a left-padded row
    logits, cache = tf.policy_forward(policy, tokens, mask)
    np.testing.assert_array_equal(logits, tf.forward(policy.params, KIT_MODEL, tokens, mask)[0])
    assert logits.dtype == dtype and len(cache.parts) == (2 if enabled and batch == 200 else 1)
    grads = tf.policy_backward(rng.standard_normal(logits.shape).astype(dtype), cache)
    assert set(grads) == set(policy.adapter.weights)
    for name, g in grads.items():
        assert g.dtype == dtype
        assert (not g.any()) if name.endswith(".lora_A") else g.any(), name  # dL/dA = 0 exactly at B = 0


def ppo_models(dtype=np.float32, seed=0):
    """A LoRA policy (B = 0) on a tiny text model that ends its responses early, a reward and a value model."""
    params = {k: v.astype(dtype) for k, v in tiny_model(TEXT, seed).items()}
    params["wte"][EOS] += 5.0 * params["ln_f.g"]  # EOS likely: short responses
    policy = lora.lora_policy(tf.Policy(params, TEXT, tf.Sampling(1.0, 8)), lora.LoRAConfig(2),
                              np.random.default_rng(seed))
    reward = RewardModel(init_reward_params(params, TEXT, np.random.default_rng(seed + 1)), TEXT)
    value = ppo.init_value_params(RewardModel(reward.params, TEXT, gain=1.5, bias=0.2))
    return policy, reward, value


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_zero_B_rollout_has_kl_exactly_0_and_ratio_exactly_1(temperature):
    policy, reward, value = ppo_models(np.float64)
    policy = tf.Policy(policy.params, TEXT, tf.Sampling(temperature, 8), policy.adapter)
    cfg = ppo.PPOConfig(batch_size=6, minibatch_size=3)
    split = [np.arange(3), np.arange(3, 6)]
    batch, stats = ppo.rollout(policy, policy.params, reward, value, PROMPTS[:6], 0.1, cfg,
                               np.random.default_rng(1), split)
    assert stats["objective/kl"] == stats["objective/k3"] == stats["objective/kl_exact"] == 0.0
    assert stats["rollout/length"] > 1
    pgrads, _, s = ppo.ppo_loss_and_grads(policy, value, ppo.minibatch(batch, split[0]), cfg)
    assert s["ratio_max_dev"] == 0.0 and s["policy/clipfrac"] == 0.0
    assert set(pgrads) == set(policy.adapter.weights)
    assert all(not g.any() for k, g in pgrads.items() if k.endswith(".lora_A"))  # the first step moves B alone
    assert any(g.any() for k, g in pgrads.items() if k.endswith(".lora_B"))


# ---------------------------------------------------------------- B != 0: merge, gradients, the KV cache

def test_merged_and_unmerged_forwards_agree():
    policy = policy_with_adapter(b_std=0.5)
    tokens = np.random.default_rng(4).integers(0, KIT_MODEL.vocab_size, (3, 6))
    before = snapshot(policy.params)
    merged = lora.merge_adapter(policy.params, policy.adapter)
    adapted = tf.policy_forward(policy, tokens)[0]
    np.testing.assert_allclose(tf.forward(merged, KIT_MODEL, tokens)[0], adapted, rtol=0, atol=1e-12)
    assert np.abs(adapted - tf.forward(policy.params, KIT_MODEL, tokens)[0]).max() > 0.1  # B matters here
    assert_same(policy.params, before)
    assert not any(np.shares_memory(merged[k], policy.params[k]) for k in merged)


ONE_LAYER = tf.GPTConfig(vocab_size=7, n_ctx=6, n_layer=1, n_head=2, n_embd=8)


@pytest.mark.parametrize("model_cfg, seed, rank, lora_kw", [
    (KIT_MODEL, 0, 2, {"alpha": 2.0}),
    (ONE_LAYER, 1, 3, {"targets": ("attn.w_qkv", "mlp.w_proj"), "rslora": True, "alpha": 1.7})])
def test_every_adapter_weight_through_the_whole_model(model_cfg, seed, rank, lora_kw):
    """s near 1 and B ~ N(0, 0.3^2) keep the update s A B the size of the weights (0.3), and C = 8 keeps every
    LayerNorm's input away from a near-zero variance, so the loss is smooth at the stencil's h = 1e-3. (At
    C = 4 some draws put a LayerNorm at rstd 20; there the stencil's own O(h^4) error reached 1e-5 on an
    entry, shrinking as h^4 with h while the analytic gradient stayed put.)"""
    policy = policy_with_adapter(model_cfg, rank=rank, seed=seed, b_std=0.3, **lora_kw)
    rng = np.random.default_rng(5)
    tokens, targets = rng.integers(0, 7, (3, 5)), rng.integers(0, 7, (3, 5))
    mask = np.ones((3, 5), np.int64)
    mask[2, :2] = 0
    weights = mask * rng.uniform(0.5, 1.5, (3, 5))  # a random upstream gradient, not ones

    def loss():
        return layers.cross_entropy_forward(tf.policy_forward(policy, tokens, mask)[0], targets, weights)[0]

    logits, cache = tf.policy_forward(policy, tokens, mask)
    dlogits = layers.cross_entropy_backward(1.0, layers.cross_entropy_forward(logits, targets, weights)[1])
    grads = tf.policy_backward(dlogits, cache)
    assert list(grads) == list(policy.adapter.weights)  # the adapter's weights and nothing of the base
    errors = gradient_errors(loss, {"adapter": policy.adapter.weights}, {"adapter": grads})
    assert set(errors) == set(policy.adapter.weights)
    for name, err in errors.items():
        assert err < MODEL_TOL, f"{name}: relative error {err:.2e}"


def test_a_split_batch_sums_the_halves_gradients(monkeypatch):
    """The fast path's two halves give the plain whole batch's adapter gradients, to rounding."""
    policy = policy_with_adapter(b_std=0.5)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, KIT_MODEL.vocab_size, (200, 6))
    dlogits = rng.standard_normal((200, 6, KIT_MODEL.vocab_size))
    monkeypatch.setattr(fast, "ENABLED", True)
    split_logits, split_cache = tf.policy_forward(policy, tokens)
    split = tf.policy_backward(dlogits, split_cache)
    monkeypatch.setattr(fast, "ENABLED", False)
    whole_logits, whole_cache = tf.policy_forward(policy, tokens)
    whole = tf.policy_backward(dlogits, whole_cache)
    assert len(split_cache.parts) == 2 and len(whole_cache.parts) == 1
    np.testing.assert_allclose(split_logits, whole_logits, rtol=1e-12, atol=1e-12)
    for k in whole:
        np.testing.assert_allclose(split[k], whole[k], rtol=1e-10, atol=1e-10 * np.abs(whole[k]).max())


@pytest.mark.parametrize("enabled", [True, False])
def test_generation_with_the_adapter_matches_the_full_forward(monkeypatch, enabled):
    monkeypatch.setattr(fast, "ENABLED", enabled)
    policy = policy_with_adapter(b_std=0.5)
    prompts, pmask = np.array([[0, 1, 3], [1, 4, 5]]), np.array([[0, 1, 1], [1, 1, 1]])  # one left-padded
    gen = tf.generate(policy.params, KIT_MODEL, prompts, pmask, 3, np.random.default_rng(7), return_logits=True,
                      adapter=policy.adapter)
    seq, seq_mask = np.concatenate([prompts, gen["tokens"]], 1), np.concatenate([pmask, gen["mask"]], 1)
    full = ppo.response_part(lora.adapted_forward(policy, seq, seq_mask)[0], 3, gen["tokens"].shape[1])
    valid = gen["mask"] > 0
    np.testing.assert_allclose(gen["logits"][valid], full[valid], rtol=1e-10, atol=1e-10)
    plain = tf.generate(policy.params, KIT_MODEL, prompts, pmask, 3, np.random.default_rng(7), return_logits=True)
    assert np.abs(plain["logits"][:, 0] - gen["logits"][:, 0]).max() > 0.1  # the adapter was used


def test_float32_stays_float32():
    policy = policy_with_adapter(dtype=np.float32, b_std=0.5)
    tokens = np.random.default_rng(8).integers(0, KIT_MODEL.vocab_size, (2, 5))
    logits, cache = lora.adapted_forward(policy, tokens)
    grads = lora.adapted_backward(np.ones_like(logits), cache)
    merged = lora.merge_adapter(policy.params, policy.adapter)
    gen = tf.generate(policy.params, KIT_MODEL, tokens[:, :2], None, 2, np.random.default_rng(0),
                      return_logits=True, adapter=policy.adapter)
    assert logits.dtype == gen["logits"].dtype == gen["logprobs"].dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values()) and all(m.dtype == np.float32 for m in merged.values())


# ---------------------------------------------------------------- training: PPO and DPO against the base

def train_ppo_lora(seed=0, lr=1e-2):
    policy, reward, value = ppo_models()
    base = snapshot(policy.params)
    start = snapshot(policy.adapter.weights)
    cfg = ppo.PPOConfig(updates=2, batch_size=8, minibatch_size=4, lr=lr)
    history = ppo.train_ppo(policy, policy.params, reward, value, PROMPTS, cfg, np.random.default_rng(seed),
                            log=lambda s: None)
    return policy, base, start, history


def test_ppo_trains_the_adapter_alone_and_leaves_the_base_untouched():
    policy, base, start, history = train_ppo_lora()
    assert_same(policy.params, base)  # the reference, bit for bit
    for name, w in policy.adapter.weights.items():
        assert w.dtype == np.float32 and not np.array_equal(w, start[name]), name
    assert history[0]["objective/kl"] == 0.0 and history[0]["first_minibatch/ratio_max_dev"] == 0.0
    assert history[1]["objective/kl_exact"] > 0  # the adapter moved the policy away from its base
    again, _, _, history2 = train_ppo_lora()
    assert_same(again.adapter.weights, policy.adapter.weights)  # same seed, same numbers
    assert [h["gold/score"] for h in history] == [h["gold/score"] for h in history2]


def test_dpo_trains_the_adapter_alone_and_starts_at_ln2():
    policy = policy_with_adapter(tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=16, n_layer=1, n_head=2, n_embd=4))
    base, start = snapshot(policy.params), snapshot(policy.adapter.weights)
    cfg = dpo.DPOConfig(steps=3, batch_size=2, warmup_steps=0, lr=1e-2)
    history = dpo.train_dpo(policy, policy.params, PAIRS, cfg, np.random.default_rng(0), log=lambda s: None)
    assert history[0]["loss"] == math.log(2) and history[0]["rewards/margins"] == 0.0
    assert history[-1]["rewards/margins"] != 0.0
    assert_same(policy.params, base)
    assert all(not np.array_equal(w, start[k]) for k, w in policy.adapter.weights.items())


def test_a_nan_in_the_adapter_stops_dpo_before_anything_is_written():
    policy = policy_with_adapter(tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=16, n_layer=1, n_head=2, n_embd=4))
    policy.adapter.weights["h0.mlp.w_fc.lora_B"][0, 0] = np.nan
    base, start = snapshot(policy.params), snapshot(policy.adapter.weights)
    with pytest.raises(ValueError, match="logp_chosen holds a NaN"):
        dpo.train_dpo(policy, policy.params, PAIRS, dpo.DPOConfig(steps=2, batch_size=2, warmup_steps=0),
                      np.random.default_rng(0), log=lambda s: None)
    assert_same(policy.params, base)
    for k, w in policy.adapter.weights.items():
        np.testing.assert_array_equal(w, start[k])  # NaN where it was, nothing else changed


# ---------------------------------------------------------------- adapter files

def test_adapter_file_round_trip(tmp_path):
    policy = policy_with_adapter(dtype=np.float32, b_std=0.5, rslora=True, init="gaussian", alpha=4.0)
    path = tmp_path / "adapter.npz"
    lora.save_adapter(path, policy.adapter)
    loaded = lora.load_adapter(path, policy.params, KIT_MODEL, expect_config=policy.adapter.config)
    assert loaded.config == policy.adapter.config and loaded.base == policy.adapter.base
    assert list(loaded.weights) == list(policy.adapter.weights)
    assert_same(loaded.weights, policy.adapter.weights)
    assert set(np.load(path).files) == set(policy.adapter.weights) | {"__meta__"}  # the adapter alone


def write_adapter(path, adapter, weights=None, meta=None):
    """An adapter file with its weights or meta replaced (what a damaged or foreign file holds)."""
    m = {"kind": lora.KIND, "config": {**vars(adapter.config), "targets": list(adapter.config.targets)},
         "base": adapter.base, **(meta or {})}
    np.savez(path, __meta__=np.array(json.dumps(m)), **(adapter.weights if weights is None else weights))


def test_loading_refuses_every_mismatch(tmp_path):
    policy = policy_with_adapter(dtype=np.float32, b_std=0.5)
    adapter, params = policy.adapter, policy.params
    w = dict(adapter.weights)
    name = "h1.mlp.w_fc.lora_B"
    other_base = {k: v.copy() for k, v in params.items()}
    other_base["h0.ln1.g"][0] += 1e-3
    cases = {
        "another base": (None, None, other_base, KIT_MODEL, None),
        "another model": (None, None, tiny_model(GRAD), GRAD, None),
        "another rank": (None, None, params, KIT_MODEL, lora.LoRAConfig(3)),
        "another target set": (None, None, params, KIT_MODEL, lora.LoRAConfig(2, targets=("mlp.w_fc",))),
        "NaN": ({**w, name: np.full_like(w[name], np.nan)}, None, params, KIT_MODEL, None),
        "inf": ({**w, name: np.full_like(w[name], np.inf)}, None, params, KIT_MODEL, None),
        "non-float": ({**w, name: w[name].astype(np.int32)}, None, params, KIT_MODEL, None),
        "float64 on a float32 base": ({**w, name: w[name].astype(np.float64)}, None, params, KIT_MODEL, None),
        "missing": ({k: v for k, v in w.items() if k != name}, None, params, KIT_MODEL, None),
        "extra": ({**w, "h0.ln1.g.lora_A": w[name]}, None, params, KIT_MODEL, None),
        "wrong shape": ({**w, name: w[name][:, :-1]}, None, params, KIT_MODEL, None),
        "rank in the file differs from its arrays": (None, {"config": {**vars(adapter.config), "rank": 1}},
                                                     params, KIT_MODEL, None),
        "unknown target": (None, {"config": {**vars(adapter.config), "targets": ["attn.w_k"]}}, params,
                           KIT_MODEL, None),
        "not an adapter": (None, {"kind": "checkpoint"}, params, KIT_MODEL, None),
    }
    messages = {"another base": "another base", "another model": "another base", "another rank": "rank 2",
                "another target set": "expected", "NaN": "NaN or inf", "inf": "NaN or inf", "non-float": "not a float",
                "float64 on a float32 base": "the base is float32", "missing": "missing .'h1.mlp.w_fc.lora_B'",
                "extra": "extra .'h0.ln1.g.lora_A'", "wrong shape": "has shape", "rank in the file differs from its "
                "arrays": "rank 1 needs", "unknown target": "match no layer", "not an adapter": "not a LoRA adapter"}
    for case, (weights, meta, base, model_cfg, expect) in cases.items():
        path = tmp_path / f"{case}.npz"
        write_adapter(path, adapter, weights, meta)
        with pytest.raises(ValueError, match=messages[case]) as e:
            lora.load_adapter(path, base, model_cfg, expect_config=expect)
        assert str(path) in str(e.value), case
    full = tmp_path / "model.npz"
    save_checkpoint(full, params, KIT_MODEL)
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        lora.load_adapter(full, params, KIT_MODEL)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not an .npz"):
        lora.load_adapter(tmp_path / "junk.npz", params, KIT_MODEL)


def test_saving_a_bad_adapter_writes_nothing(tmp_path):
    policy = policy_with_adapter()
    policy.adapter.weights["h0.attn.w_qkv.lora_A"][0, 0] = np.inf
    with pytest.raises(ValueError, match="h0.attn.w_qkv.lora_A holds NaN or inf"):
        lora.save_adapter(tmp_path / "a.npz", policy.adapter)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, field", [({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"rank": True}, "rank"),
                                       ({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"),
                                       ({"alpha": float("nan")}, "alpha"), ({"targets": ("attn.w_q",)}, "targets"),
                                       ({"targets": ()}, "targets"), ({"targets": "mlp.w_fc"}, "targets"),
                                       ({"rslora": 1}, "rslora"), ({"init": "pissa"}, "init")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"LoRAConfig.{field}"):
        lora.LoRAConfig(**kw)


def test_config_normalises_targets_and_scales():
    cfg = lora.LoRAConfig(4, 8, targets=["mlp.w_proj", "attn.w_qkv"])
    assert cfg.targets == ("attn.w_qkv", "mlp.w_proj") and cfg.scale == 2.0 and type(cfg.scale) is float
    assert lora.LoRAConfig(4, 8, rslora=True).scale == 4.0


def test_refused_adapters_change_nothing():
    params = tiny_model()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(ValueError, match="rank=9 exceeds min.d_in, d_out. = 8 of h0.attn.w_qkv"):
        lora.init_adapter(params, KIT_MODEL, lora.LoRAConfig(9), rng)
    with pytest.raises(ValueError, match="h0.attn.w_qkv is missing"):
        lora.init_adapter({k: v for k, v in params.items() if k != "h0.attn.w_qkv"}, KIT_MODEL,
                          lora.LoRAConfig(2), rng)
    with pytest.raises(ValueError, match="lora_cfg must be a LoRAConfig"):
        lora.init_adapter(params, KIT_MODEL, {"rank": 2}, rng)
    assert rng.bit_generator.state == state  # refused before the first draw
    lora.init_adapter(params, KIT_MODEL, lora.LoRAConfig(8), rng)  # rank = min(d_in, d_out) is allowed
    policy = policy_with_adapter()
    with pytest.raises(ValueError, match="already carries an adapter"):
        lora.lora_policy(policy, lora.LoRAConfig(2), rng)


def test_bad_input_to_the_adapted_model():
    policy = policy_with_adapter()
    with pytest.raises(ValueError, match="token id 7 is out of range"):  # transformer.check_tokens still applies
        tf.policy_forward(policy, np.array([[1, 7]]))
    with pytest.raises(ValueError, match="mask shape"):
        lora.adapted_forward(policy, np.array([[1, 2]]), np.array([[1]]))
    one_layer = policy_with_adapter(tf.GPTConfig(vocab_size=7, n_ctx=6, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="does not fit these parameters: missing .'h1.attn.w_proj.lora_A'"):
        tf.policy_forward(tf.Policy(policy.params, KIT_MODEL, adapter=one_layer.adapter), np.array([[1, 2]]))
    narrow = policy_with_adapter(GRAD)  # the same names, narrower layers
    with pytest.raises(ValueError, match="is .4, 2. float64, the base needs .8, 2. float64"):
        tf.policy_forward(tf.Policy(policy.params, KIT_MODEL, adapter=narrow.adapter), np.array([[1, 2]]))
    as32 = policy_with_adapter(dtype=np.float32)
    with pytest.raises(ValueError, match="lora_A is .* float32, the base needs .* float64"):
        tf.generate(policy.params, KIT_MODEL, np.array([[1]]), None, 2, np.random.default_rng(0),
                    adapter=as32.adapter)
    x, W0, b = np.ones((2, 4)), np.ones((4, 3)), np.zeros(3)
    with pytest.raises(ValueError, match="LoRA shapes do not fit"):
        lora.lora_linear_forward(x, W0, b, np.ones((3, 2)), np.ones((2, 3)), 1.0)


# ---------------------------------------------------------------- the experiment

def test_lora_rank_quick(tiny_run, tmp_path):
    """demos/lora_rank.py --quick from the session's tiny run: every number finite, every arm present."""
    from test_experiments import HAVE_MATPLOTLIB, plot_flags
    path, fig = tmp_path / "out.json", tmp_path / "f.png"
    lora_rank.main(["--quick", "--run", str(tiny_run[0]), "--json", str(path), *plot_flags(fig)])
    out = json.loads(path.read_text())
    assert fig.exists() == HAVE_MATPLOTLIB
    numbers = []

    def collect(v):
        if isinstance(v, dict):
            [collect(x) for x in v.values()]
        elif isinstance(v, list):
            [collect(x) for x in v]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers.append(v)
    collect(out)
    assert all(math.isfinite(x) for x in numbers)
    q = lora_rank.QUICK
    assert [a["rank"] for a in out["arms"] if a["method"] == "LoRA"] == q["ranks"]
    assert [g["multiplier"] for g in out["lr_grid"]] == q["lr_multipliers"]
    full = next(a for a in out["arms"] if a["method"] == "full")
    for arm in out["arms"]:
        if arm["method"] == "LoRA":
            assert arm["trainable"] == 16 * arm["rank"] * 64 * 2 < full["trainable"]  # the demo model
            assert arm["file_bytes"] < full["file_bytes"] and arm["peak_mb"] > 0
    d = out["drift"]["float32"]
    assert d["cycles"] == 1000 and set(out["drift"]) == set(q["drift_dtypes"])
    assert 0 < d["fixed"]["max_abs"] <= d["changing"]["max_abs"] < 1e-5


@pytest.mark.parametrize("argv", [["--ranks", "0"], ["--ranks", "65"], ["--grid-rank", "100"],
                                  ["--lr-multipliers", "nan"], ["--alpha", "0"], ["--drift-dtypes", "bfloat16"]])
def test_lora_rank_bad_flags_give_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        lora_rank.main(argv)
    assert e.value.code == 2 and "usage:" in capsys.readouterr().err


def test_a_lora_config_cannot_change_after_it_is_made():
    """LoRAConfig is frozen, like every config: an adapter's rank, alpha and targets are fixed with it, and
    its file's config is the one it was trained with."""
    import dataclasses
    cfg = lora.LoRAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4
