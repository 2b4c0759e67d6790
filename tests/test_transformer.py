"""The whole GPT: every parameter's gradient against finite differences, causality, padding invariance,
the KV cache, dtypes, determinism, and that it can learn."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf import layers as L
from minirlhf import transformer as tf
from minirlhf.optim import AdamWConfig, adamw_init, adamw_step
from minirlhf.kit.gradcheck import MODEL_TOL, gradient_errors, key_bias_zero
from minirlhf.kit.inputs import tiny_model
from minirlhf.tokenizer import BOS, EOS, VOCAB_SIZE, encode_example, pad_batch

TINY = tf.GPTConfig(vocab_size=11, n_ctx=8, n_layer=2, n_head=2, n_embd=8)
GRAD = tf.GPTConfig(vocab_size=7, n_ctx=6, n_layer=2, n_head=2, n_embd=4)  # small: a check of every entry


def tiny_params(dtype=np.float64, seed=0, model_cfg=TINY):
    """Larger-than-GPT-2 init so every path carries signal in a gradient check."""
    return {k: v.astype(dtype) for k, v in tiny_model(model_cfg, seed).items()}


def test_whole_model_gradient_every_parameter():
    rng = np.random.default_rng(1)
    params = tiny_params(model_cfg=GRAD)
    tokens = rng.integers(0, GRAD.vocab_size, (3, 5))
    mask = np.ones((3, 5), np.int64)
    mask[2, :2] = 0  # a left-padded row
    targets = rng.integers(0, GRAD.vocab_size, (3, 5))
    weights = mask * rng.uniform(0.5, 1.5, (3, 5))  # a random upstream gradient, not ones

    def loss():
        logits, _ = tf.forward(params, GRAD, tokens, mask)
        return L.cross_entropy_forward(logits, targets, weights)[0]

    logits, cache = tf.forward(params, GRAD, tokens, mask)
    _, ce_cache = L.cross_entropy_forward(logits, targets, weights)
    grads = tf.backward(L.cross_entropy_backward(1.0, ce_cache), cache)
    errors = gradient_errors(loss, {"params": params}, {"params": grads}, zero=key_bias_zero(GRAD))
    assert set(errors) == set(tf.param_shapes(GRAD))
    for name, err in errors.items():
        assert err < MODEL_TOL, f"{name}: relative error {err:.2e}"


def test_trunk_gradient_for_a_scalar_head():
    """A head on hidden_forward (as the reward model uses it) gets correct trunk gradients."""
    rng = np.random.default_rng(2)
    params = tiny_params(model_cfg=GRAD)
    tokens = rng.integers(0, GRAD.vocab_size, (2, 4))
    dh = rng.standard_normal((2, 4, GRAD.n_embd))
    f = lambda: np.sum(tf.hidden_forward(params, GRAD, tokens)[0] * dh)
    grads = tf.hidden_backward(dh, tf.hidden_forward(params, GRAD, tokens)[1])
    names = ("wte", "h0.attn.w_qkv", "h1.mlp.w_fc", "ln_f.g")
    errors = gradient_errors(f, {n: params[n] for n in names}, grads)
    assert all(errors[n] < MODEL_TOL for n in names), errors


@given(st.integers(1, 6), st.integers(0, 10), st.integers(0, 1000))
def test_future_tokens_never_change_earlier_logits(t, new_token, seed):
    rng = np.random.default_rng(seed)
    params = tiny_params(seed=seed % 3)
    tokens = rng.integers(0, TINY.vocab_size, (2, 7))
    before, _ = tf.forward(params, TINY, tokens)
    tokens[:, t] = new_token
    after, _ = tf.forward(params, TINY, tokens)
    np.testing.assert_array_equal(before[:, :t], after[:, :t])


@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 1000))
def test_left_padding_leaves_real_logits_unchanged(length_pad, pad_token, seed):
    rng = np.random.default_rng(seed)
    params = tiny_params(seed=seed % 3)
    real = rng.integers(0, TINY.vocab_size, (1, TINY.n_ctx - length_pad))
    alone, _ = tf.forward(params, TINY, real)
    padded = np.concatenate([np.full((1, length_pad), pad_token), real], axis=1)
    mask = np.concatenate([np.zeros((1, length_pad), np.int64), np.ones_like(real)], axis=1)
    with_pad, _ = tf.forward(params, TINY, padded, mask)
    np.testing.assert_allclose(with_pad[:, length_pad:], alone, rtol=1e-12, atol=1e-12)


def test_kv_cache_logits_equal_full_forward():
    rng = np.random.default_rng(3)
    params = tiny_params()
    prompts = rng.integers(3, TINY.vocab_size, (3, 3))
    pmask = np.ones((3, 3), np.int64)
    pmask[1, 0] = 0  # row 1: a two-token prompt, left padded
    prompts[1, 0] = 0
    out = tf.generate(params, TINY, prompts, pmask, 5, rng, temperature=0.8, return_logits=True)
    N = out["tokens"].shape[1]
    full = np.concatenate([prompts, out["tokens"]], 1)
    fmask = np.concatenate([pmask, out["mask"]], 1)
    logits, _ = tf.forward(params, TINY, full, fmask)
    pred = logits[:, 2:2 + N]  # logits at position t predict token t + 1
    m = out["mask"].astype(bool)
    np.testing.assert_allclose(out["logits"][m], pred[m], rtol=1e-10, atol=1e-10)
    logp = L.token_logprobs_forward(pred, out["tokens"], 0.8)[0]
    np.testing.assert_allclose(out["logprobs"][m], logp[m], rtol=1e-10, atol=1e-10)


def test_generation_stops_at_eos_and_pads_after():
    params = tiny_params()
    params["wte"][EOS] *= 0  # make EOS likely: steer the head towards it
    params["wte"][EOS] += 5 * params["ln_f.g"]
    rng = np.random.default_rng(4)
    out = tf.generate(params, TINY, np.full((4, 1), BOS), np.ones((4, 1), np.int64), 7, rng)
    for row, mrow, ended in zip(out["tokens"], out["mask"], out["ended"]):
        n = mrow.sum()
        assert np.all(mrow[:n] == 1) and np.all(mrow[n:] == 0)
        assert np.all(row[n:] == 0)
        assert ended == (row[n - 1] == EOS)
        assert not np.any(row[:n - 1] == EOS)


def test_same_seed_same_params_and_samples():
    def run():
        cfg = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=16, n_layer=1, n_head=2, n_embd=8)
        params = tf.init_params(cfg, np.random.default_rng(7))
        out = tf.generate(params, cfg, np.full((3, 1), BOS), np.ones((3, 1), np.int64), 6,
                          np.random.default_rng(8))
        return params, out
    (p1, o1), (p2, o2) = run(), run()
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    for k in o1:
        np.testing.assert_array_equal(o1[k], o2[k])


def test_float32_in_float32_out():
    params = tiny_params(np.float32)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 5))
    logits, cache = tf.forward(params, TINY, tokens)
    assert logits.dtype == np.float32
    grads = tf.backward(logits, cache)
    assert all(g.dtype == np.float32 for g in grads.values())
    out = tf.generate(params, TINY, tokens[:, :2], np.ones((2, 2), np.int64), 3, np.random.default_rng(0))
    assert out["logprobs"].dtype == np.float32


@pytest.mark.parametrize("plain", [False, True])
@given(model=st.sampled_from([np.float32, np.float64]), other=st.sampled_from([np.float16, np.float32, np.float64]),
       lr=st.sampled_from([1e-3, np.float64(1e-3), np.float32(1e-3)]))
def test_the_model_float_type_survives_other_cotangents_and_scalars(plain, model, other, lr):
    """A model's float type is kept through the forward, every backward (transformer, reward model, value
    model) and AdamW's update, whatever float type the cotangent or the learning rate comes in: a float64
    cotangent does not turn a float32 model's gradients float64 (and float64 stays float64)."""
    from minirlhf import fast, ppo, reward
    fast_on = fast.ENABLED
    fast.ENABLED = not plain
    try:
        params = tiny_params(model)
        scored = {**params, "head.w": params["ln_f.g"].copy(), "head.b": np.asarray(0.1, model)}
        tokens = np.array([[1, 4, 5, 3, EOS], [1, 6, 7, 8, EOS]])
        logits, cache = tf.forward(params, TINY, tokens)
        grads = tf.backward(np.ones(logits.shape, other), cache)
        r, rcache = reward.reward_forward(scored, TINY, tokens, np.ones_like(tokens))
        v, vcache = ppo.value_forward(scored, TINY, tokens, np.ones_like(tokens))
        for g in (grads, reward.reward_backward(np.ones(r.shape, other), rcache),
                  ppo.value_backward(np.ones(v.shape, other), vcache)):
            assert {x.dtype for x in g.values()} == {np.dtype(model)}
        assert logits.dtype == r.dtype == v.dtype == model
        state = adamw_init(params)
        adamw_step(params, {k: g.astype(other) for k, g in grads.items()}, state, AdamWConfig(lr=1e-3), lr=lr)
        assert {x.dtype for x in (*params.values(), *state["m"].values(), *state["v"].values())} == {np.dtype(model)}
    finally:
        fast.ENABLED = fast_on


def test_loss_at_init_is_close_to_log_vocab():
    cfg = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=32, n_layer=2, n_head=4, n_embd=32)
    rng = np.random.default_rng(0)
    params = tf.init_params(cfg, rng)
    tokens = rng.integers(0, VOCAB_SIZE, (8, 32))
    logits, _ = tf.forward(params, cfg, tokens)
    loss, _ = L.cross_entropy_forward(logits[:, :-1], tokens[:, 1:], np.ones((8, 31)))
    assert abs(loss - np.log(VOCAB_SIZE)) < 0.05


def test_tiny_model_overfits_a_short_string():
    cfg = tf.GPTConfig(vocab_size=VOCAB_SIZE, n_ctx=32, n_layer=1, n_head=2, n_embd=32)
    params = tf.init_params(cfg, np.random.default_rng(0))
    tokens, mask = pad_batch([encode_example("hello there", "general kenobi")])
    opt, state = AdamWConfig(lr=1e-2), adamw_init(params)
    for _ in range(150):
        logits, cache = tf.forward(params, cfg, tokens[:, :-1])
        loss, ce = L.cross_entropy_forward(logits, tokens[:, 1:], mask[:, 1:])
        adamw_step(params, tf.backward(L.cross_entropy_backward(1.0, ce), cache), state, opt)
    assert loss < 0.05


def test_bad_input_raises_value_error():
    params = tiny_params()
    with pytest.raises(ValueError, match="out of range"):
        tf.forward(params, TINY, np.array([[1, 2, 11]]))
    with pytest.raises(ValueError, match="out of range"):
        tf.forward(params, TINY, np.array([[1, -1]]))
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        tf.forward(params, TINY, np.ones((1, 9), np.int64))
    with pytest.raises(ValueError, match="not divisible"):
        tf.GPTConfig(vocab_size=11, n_ctx=8, n_layer=1, n_head=3, n_embd=8)
    with pytest.raises(ValueError, match="mask shape"):
        tf.forward(params, TINY, np.ones((1, 4), np.int64), np.ones((1, 3)))
    with pytest.raises(ValueError, match="2-D integer"):
        tf.forward(params, TINY, np.ones((1, 4)))
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        tf.generate(params, TINY, np.ones((1, 4), np.int64), np.ones((1, 4)), 5, np.random.default_rng(0))


def test_the_model_gradient_check_catches_a_wrong_gradient():
    params = tiny_params(model_cfg=GRAD)
    tokens = np.random.default_rng(5).integers(0, GRAD.vocab_size, (2, 4))
    f = lambda: float(np.sum(tf.forward(params, GRAD, tokens)[0] ** 2))  # noqa: E731
    logits, cache = tf.forward(params, GRAD, tokens)
    grads = tf.backward(2 * logits, cache)
    wrong = {**grads, "h1.mlp.w_fc": grads["h1.mlp.w_fc"] * 1.001}  # a 0.1% error in one parameter's gradient
    checked = ("h1.mlp.w_fc", "wte")
    right = gradient_errors(f, {n: params[n] for n in checked}, grads)
    errors = gradient_errors(f, {n: params[n] for n in checked}, wrong)
    assert max(right.values()) < MODEL_TOL
    assert errors["h1.mlp.w_fc"] > MODEL_TOL and errors["wte"] < MODEL_TOL
    bias = key_bias_zero(GRAD)
    broken = {**grads, "h0.attn.b_qkv": grads["h0.attn.b_qkv"] + 1e-3}  # a key-bias gradient that is not 0
    with pytest.raises(AssertionError, match="exactly 0"):
        gradient_errors(f, {"params": {"h0.attn.b_qkv": params["h0.attn.b_qkv"]}},
                        {"params": {"h0.attn.b_qkv": broken["h0.attn.b_qkv"]}}, zero=bias)
