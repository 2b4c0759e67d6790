"""The conformance kit: each public function's documented properties and gradients, checked on any
implementation (NumPy, PyTorch, JAX) that takes and returns NumPy arrays.

A port hands the kit two callables per function; inputs are passed by minirlhf's argument names:

    out   = forward(**inputs)        NumPy in, NumPy out (a dict of arrays for kl_estimators and gae)
    grads = vjp(dout, **inputs)      {input name: dLoss/dinput} with Loss = sum(out * dout); for a model,
                                     "params" maps to {parameter name: gradient} (PyTorch: autograd.grad)

check_<name>(forward, vjp=None) asserts (AssertionError names the failing figure)
  1. properties that state the math, on inputs hypothesis draws (strategies.py): an independent formula or
     naive loop (oracles.py), invariances (shift, causality, padding), identities (k1 / k2 / k3), bounds;
  2. given vjp, the gradient against fourth-order centred differences of the port's own forward
     (gradcheck.py), float64, tiny shapes, inputs off zero and off the clip kinks, a random upstream
     gradient: relative error < 1e-7 for ops, < 1e-5 for models (MODEL_ENTRIES random entries of every
     parameter: a slow framework stays quick), and returns {input: worst relative error} ({} without vjp).
Exact values are the job of the golden fixtures (fixtures.py). Models run on inputs.KIT_MODEL.

Padding: masks mark valid tokens with 1. Forward-only functions get NaN at padding ("masked positions may
hold anything"); losses with a gradient get finite garbage (NaN would poison an autograd graph); outputs
at padding queries of attention and the models are unspecified: never compared, upstream gradient 0.
The conventions pinned are those of minirlhf/CONVENTIONS.md; registry.CONVENTIONS names them one by one.
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import expit, log_softmax

from ..tokenizer import BOS, EOS
from .gradcheck import MODEL_TOL, OP_TOL, assert_close, key_bias_zero, vjp_errors
from .inputs import KIT_MODEL, off_kink_batch, tiny_model
from .oracles import naive_adamw, naive_attention, naive_gae
from .strategies import SEEDS, logit_batches, masked_pairs, prefix_masks

MODEL_ENTRIES = 12  # entries checked per parameter of a model


def _hold(strategy, prop, max_examples):
    """Assert prop(example) on max_examples examples that hypothesis draws (other settings: the profile's)."""
    settings(deadline=None, max_examples=max_examples)(given(strategy)(prop))()
    return {}  # what a check without a gradient returns


# ---------------------------------------------------------------- layers

def check_linear(forward, vjp=None, max_examples=10):
    """out = x W + b with W (in, out) -- a PyTorch nn.Linear weight is W.T."""
    def prop(seed):
        r = np.random.default_rng(seed)
        x, W, b = r.standard_normal((2, 3, 4)), r.standard_normal((4, 5)), r.standard_normal(5)
        assert_close(forward(x=x, W=W, b=b), np.einsum("bti,io->bto", x, W) + b, 1e-12, "linear")
    _hold(SEEDS, prop, max_examples)
    r = np.random.default_rng(2)
    inputs = {"x": r.standard_normal((2, 3, 4)) + 0.1, "W": r.standard_normal((4, 5)) + 0.1, "b": r.standard_normal(5)}
    return vjp_errors(forward, vjp, inputs, ["x", "W", "b"], OP_TOL)


def check_layernorm(forward, vjp=None, max_examples=20):
    """(x - mean) / sqrt(var + 1e-5) g + b over the last axis, biased variance; ignores a shift of x."""
    def prop(args):
        seed, shift = args
        r = np.random.default_rng(seed)
        x, g, b = 3 * r.standard_normal((2, 3, 6)), r.standard_normal(6), r.standard_normal(6)
        expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b  # ddof 0
        assert_close(forward(x=x, g=g, b=b), expected, 1e-10, "layernorm: biased variance, eps 1e-5")
        assert_close(forward(x=x + shift, g=g, b=b), expected, 1e-9, "layernorm of x + c")
    _hold(st.tuples(SEEDS, st.floats(-100, 100)), prop, max_examples)
    r = np.random.default_rng(3)
    inputs = {"x": 2 * r.standard_normal((2, 3, 6)) + 0.1, "g": r.standard_normal(6) + 0.1, "b": r.standard_normal(6)}
    return vjp_errors(forward, vjp, inputs, ["x", "g", "b"], OP_TOL)


def check_gelu(forward, vjp=None, max_examples=20):
    """The tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), not the erf form (they differ by 1e-3)."""
    def prop(x):
        u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
        assert_close(forward(x=x), 0.5 * x * (1 + np.tanh(u)), 1e-12, "gelu (tanh form)")
    _hold(hnp.arrays(np.float64, (3, 4), elements=st.floats(-10, 10)), prop, max_examples)
    x = 2 * np.random.default_rng(4).standard_normal((2, 3, 4)) + 0.1
    return vjp_errors(forward, vjp, {"x": x}, ["x"], OP_TOL)


def check_attention(forward, vjp=None, max_examples=15, n_head=2):
    """Causal multi-head attention on fused (q | k | v): the naive loop at real queries, pads never read."""
    def prop(args):
        seed, mask = args
        r = np.random.default_rng(seed)
        mask = mask[:, ::-1].copy()  # left padding: real tokens at the end of each row
        qkv = r.standard_normal((mask.shape[0], 4, 12))
        real = mask.astype(bool)
        out = forward(qkv=qkv, key_mask=mask, n_head=n_head)
        assert_close(out[real], naive_attention(qkv, mask, n_head)[real], 1e-12, "attention vs naive loop")
        qkv[~real] = r.standard_normal(qkv[~real].shape)  # padding content must not reach a real query
        assert_close(forward(qkv=qkv, key_mask=mask, n_head=n_head)[real], out[real], 1e-12, "attention pads")
    _hold(st.tuples(SEEDS, prefix_masks(2, 4)), prop, max_examples)
    r = np.random.default_rng(5)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    inputs = {"qkv": r.standard_normal((2, 4, 12)) + 0.1, "key_mask": mask, "n_head": n_head}
    return vjp_errors(forward, vjp, inputs, ["qkv"], OP_TOL, where=mask[..., None] > 0)


def check_cross_entropy(forward, vjp=None, max_examples=20):
    """-sum(mask log softmax(z)[y]) / sum(mask); masked positions change nothing."""
    def prop(args):
        z, seed = args
        r = np.random.default_rng(seed)
        y, mask = r.integers(0, z.shape[-1], z.shape[:2]), r.integers(0, 2, z.shape[:2])
        mask[0, 0] = 1
        picked = np.take_along_axis(log_softmax(z, -1), y[..., None], -1)[..., 0]
        assert_close(forward(logits=z, targets=y, mask=mask), -(picked * mask).sum() / mask.sum(), 1e-12, "ce")
        z2 = np.where(mask[..., None] > 0, z, r.standard_normal(z.shape))
        assert_close(forward(logits=z2, targets=y, mask=mask), forward(logits=z, targets=y, mask=mask), 1e-12,
                     "cross-entropy with other logits at masked positions")
    _hold(st.tuples(logit_batches(), SEEDS), prop, max_examples)
    r = np.random.default_rng(6)
    inputs = {"logits": r.standard_normal((2, 3, 5)) + 0.1, "targets": r.integers(0, 5, (2, 3)),
              "mask": np.array([[1, 1, 1], [1, 0, 0]])}
    return vjp_errors(forward, vjp, inputs, ["logits"], OP_TOL)


def check_token_logprobs(forward, vjp=None, max_examples=20):
    """log softmax(z / tau)[y]; exp of it sums to 1 over y; tau enters as z / tau."""
    def prop(args):
        z, tau, seed = args
        y = np.random.default_rng(seed).integers(0, z.shape[-1], z.shape[:2])
        lp = np.take_along_axis(log_softmax(z / tau, -1), y[..., None], -1)[..., 0]
        assert_close(forward(logits=z, targets=y, temperature=tau), lp, 1e-12, f"token log-probs, tau {tau}")
        every = [np.exp(forward(logits=z, targets=np.full(y.shape, v), temperature=tau)) for v in range(z.shape[-1])]
        assert_close(np.sum(every, 0), np.ones(y.shape), 1e-12, "sum over y of p(y)")
    _hold(st.tuples(logit_batches(), st.floats(0.3, 3.0), SEEDS), prop, max_examples)
    r = np.random.default_rng(7)
    inputs = {"logits": r.standard_normal((2, 3, 5)) + 0.1, "targets": r.integers(0, 5, (2, 3)), "temperature": 0.7}
    return vjp_errors(forward, vjp, inputs, ["logits"], OP_TOL)


def check_entropy(forward, vjp=None, max_examples=20):
    """H = -sum p log p of softmax(z / tau), 0 <= H <= log V."""
    def prop(args):
        z, tau = args
        lp = log_softmax(z / tau, -1)
        H = forward(logits=z, temperature=tau)
        assert_close(H, -(np.exp(lp) * lp).sum(-1), 1e-10, f"entropy, tau {tau}")
        assert np.all(H >= -1e-12) and np.all(H <= np.log(z.shape[-1]) + 1e-12), "entropy outside [0, log V]"
    _hold(st.tuples(logit_batches(), st.floats(0.3, 3.0)), prop, max_examples)
    inputs = {"logits": np.random.default_rng(8).standard_normal((2, 3, 5)) + 0.1, "temperature": 1.3}
    return vjp_errors(forward, vjp, inputs, ["logits"], OP_TOL)


# ---------------------------------------------------------------- the transformer and the heads on it

def _model_properties(forward, model_cfg, per_position, max_examples, scored):
    """Causality (per-position outputs), left- and right-padding invariance, padding content ignored."""
    def prop(args):
        seed, n_pad, pad_id = args
        r = np.random.default_rng(seed)
        params = tiny_model(model_cfg, seed % 3, head=scored)
        T = model_cfg.n_ctx - n_pad
        tokens = r.integers(3, model_cfg.vocab_size, (2, T))
        if scored:  # BOS text EOS: a score is read at EOS
            tokens[:, 0], tokens[:, -1] = BOS, EOS
        alone = forward(params=params, tokens=tokens, mask=np.ones((2, T), np.int64))
        pad = np.full((2, n_pad), pad_id)
        for side, seq, m in (("left", np.hstack([pad, tokens]), np.hstack([0 * pad, 1 + 0 * tokens])),
                             ("right", np.hstack([tokens, pad]), np.hstack([1 + 0 * tokens, 0 * pad]))):
            out = forward(params=params, tokens=seq, mask=m)
            real = out[:, n_pad:] if side == "left" and per_position else out[:, :T] if per_position else out
            assert_close(real, alone, 1e-10, f"{side} padding with token {pad_id} (positions cumsum(mask) - mask)")
        if per_position and T > 1:
            t = int(r.integers(1, T))
            later = tokens.copy()
            later[:, t] = (later[:, t] - 2) % (model_cfg.vocab_size - 3) + 3  # another text token
            out = forward(params=params, tokens=later, mask=np.ones((2, T), np.int64))
            assert_close(out[:, :t], alone[:, :t], 1e-12, f"causality: token {t} changed earlier outputs")
    _hold(st.tuples(SEEDS, st.integers(1, 3), st.integers(0, model_cfg.vocab_size - 1)), prop, max_examples)


def _model_gradient(forward, vjp, model_cfg, tokens, mask, head, where=None):
    """Every parameter, MODEL_ENTRIES entries each. The key bias adds q . b_k to a whole row of scores, which
    softmax ignores: its gradient is exactly 0, so it is checked to be ~0 instead of by relative error."""
    inputs = {"params": tiny_model(model_cfg, 1, head=head), "tokens": tokens, "mask": mask}
    return vjp_errors(forward, vjp, inputs, ["params"], MODEL_TOL, where=where, max_entries=MODEL_ENTRIES,
                      zero=key_bias_zero(model_cfg))


def check_transformer(forward, vjp=None, max_examples=15, model_cfg=KIT_MODEL):
    """logits (B, T, V) of the GPT (params by minirlhf's names): causal, padding-invariant, gradient of
    every parameter (the tied wte gets the lookup's and the head's)."""
    _model_properties(forward, model_cfg, True, max_examples, scored=False)
    r = np.random.default_rng(9)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # left- and right-padded rows
    where = mask[..., None] > 0
    return _model_gradient(forward, vjp, model_cfg, r.integers(0, model_cfg.vocab_size, mask.shape), mask, False, where)


# BOS text EOS rows (text ids 3..6), one right-padded with junk after EOS, one left-padded
SCORED = (np.array([[BOS, 3, 4, 5, EOS], [BOS, 6, EOS, 4, 3], [0, BOS, 5, 3, EOS]]),
          np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]))


def check_reward_model(forward, vjp=None, max_examples=10, model_cfg=KIT_MODEL):
    """r (B,) = h[EOS] . head.w + head.b: read at EOS, the last real token; padding changes nothing."""
    _model_properties(forward, model_cfg, False, max_examples, scored=True)
    return _model_gradient(forward, vjp, model_cfg, *SCORED, True)


def check_value_model(forward, vjp=None, max_examples=10, model_cfg=KIT_MODEL):
    """values (B, T) = h . head.w + head.b at every position: causal, padding-invariant."""
    _model_properties(forward, model_cfg, True, max_examples, scored=True)
    return _model_gradient(forward, vjp, model_cfg, *SCORED, True, SCORED[1] > 0)


# ---------------------------------------------------------------- KL, rewards, advantages

def check_kl_estimators(forward, max_examples=30):
    """k1 = logp - logp_ref, k2 = k1^2 / 2, k3 = (r - 1) - log r with log r = -k1; k2, k3 >= 0; 0 at padding."""
    def prop(args):
        logp, logp_ref, mask = args
        k, v = forward(logp=logp, logp_ref=logp_ref, mask=mask), mask > 0
        k1 = np.where(v, logp - logp_ref, 0)
        for name, expected in (("k1", k1), ("k2", k1**2 / 2), ("k3", np.expm1(-k1) + k1)):
            assert_close(k[name], expected, 1e-12, f"{name} (0 at padding)")
        assert np.all(k["k2"] >= 0) and np.all(k["k3"] >= -1e-12), "k2 and k3 are >= 0"
        same = forward(logp=logp, logp_ref=logp, mask=mask)
        assert all(np.all(same[n] == 0) for n in ("k1", "k2", "k3")), "KL(p || p) estimators must be 0"
    return _hold(masked_pairs(), prop, max_examples)


def check_exact_kl(forward, max_examples=30):
    """sum_v p (log p - log q) of softmax(z / tau) at each valid position, >= 0, 0 for p = q and at padding."""
    def prop(args):
        z, tau, seed = args
        r = np.random.default_rng(seed)
        z_ref = z + 3 * r.standard_normal(z.shape)
        mask = r.integers(0, 2, z.shape[:2])
        lp, lq = log_softmax(z / tau, -1), log_softmax(z_ref / tau, -1)
        kl = forward(logits=z, logits_ref=z_ref, temperature=tau, mask=mask)
        assert_close(kl, mask * (np.exp(lp) * (lp - lq)).sum(-1), 1e-9, f"exact KL, tau {tau}")
        assert np.all(kl >= 0), "exact KL >= 0"
        assert np.all(forward(logits=z, logits_ref=z, temperature=tau, mask=mask) == 0), "KL(p || p) = 0"
    return _hold(st.tuples(logit_batches(), st.floats(0.3, 3.0), SEEDS), prop, max_examples)


def check_token_rewards(forward, max_examples=30):
    """r_t = -kl_coef (logp_t - logp_ref_t) on valid tokens, + the score on the last valid token (EOS, not one
    after); 0 at padding; so sum_t r_t = score - kl_coef * sum k1."""
    def prop(args):
        (logp, logp_ref, mask), seed = args
        r = np.random.default_rng(seed)
        scores, kl_coef = r.standard_normal(len(mask)), float(r.uniform(0, 1))
        expected = np.where(mask > 0, -kl_coef * (logp - logp_ref), 0)
        expected[np.arange(len(mask)), mask.sum(1) - 1] += scores
        out = forward(scores=scores, logp=logp, logp_ref=logp_ref, mask=mask, kl_coef=kl_coef)
        assert_close(out, expected, 1e-12, "token rewards: score on EOS, not one after")
    return _hold(st.tuples(masked_pairs(), SEEDS), prop, max_examples)


def check_gae(forward, max_examples=30):
    """advantages, returns = A + V against the closed-form sum; gamma = lam = 1 is reward-to-go minus value."""
    def prop(args):
        (rewards, values, mask), gamma, lam = args
        out = forward(rewards=rewards, values=values, mask=mask, gamma=gamma, lam=lam)
        A, R = naive_gae(rewards, values, mask, gamma, lam)
        assert_close(out["advantages"], A, 1e-10, f"GAE advantages, gamma {gamma}, lam {lam}")
        assert_close(out["returns"], R, 1e-10, "GAE returns")
        one = forward(rewards=rewards, values=values, mask=mask, gamma=1.0, lam=1.0)["advantages"]
        r, v = np.where(mask > 0, rewards, 0), np.where(mask > 0, values, 0)
        assert_close(one, np.where(mask > 0, np.cumsum(r[:, ::-1], 1)[:, ::-1] - v, 0), 1e-10, "GAE(1, 1)")
    gammas, lams = st.sampled_from([1.0, 0.9]), st.sampled_from([0.95, 1.0, 0.0])
    return _hold(st.tuples(masked_pairs(-3.0, 3.0), gammas, lams), prop, max_examples)


def check_whiten(forward, max_examples=30):
    """(x - mean) / sqrt(var + 1e-8) over valid entries, var biased (divide by N); one valid entry gives 0."""
    def prop(args):
        x, _, mask = args
        xv = x[mask > 0]
        expected = np.where(mask > 0, (x - xv.mean()) / np.sqrt(xv.var() + 1e-8), 0)  # np.var: ddof 0
        assert_close(forward(x=x, mask=mask), expected, 1e-9, "whitening: biased variance, eps 1e-8")
    _hold(masked_pairs(-5.0, 5.0), prop, max_examples)
    one = forward(x=np.array([[2.5, np.nan]]), mask=np.array([[1, 0]]))
    assert_close(one, np.zeros((1, 2)), 0, "whitening one valid token gives 0, not NaN")
    return {}


# ---------------------------------------------------------------- PPO losses

def check_policy_loss(forward, vjp=None, max_examples=30):
    """mean over valid of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)); at ratio = 1 it is -mean(A) with
    gradient -A / N; inside the clip range it is the unclipped loss; gradient 0 where the clip is active."""
    def prop(seed):
        mask, logp, offset, A = off_kink_batch(seed)
        v, eps, n = mask > 0, 0.2, mask.sum()
        ratio = np.exp(offset)
        expected = np.maximum(-A * ratio, -A * np.clip(ratio, 1 - eps, 1 + eps))[v].sum() / n
        args = {"logp_old": logp - offset, "advantages": A, "mask": mask, "clip_eps": eps}
        assert_close(forward(logp=logp, **args), expected, 1e-12, "clipped policy loss")
        args["logp_old"] = logp
        assert_close(forward(logp=logp, **args), -A[v].sum() / n, 1e-12, "policy loss at ratio 1")
        if vjp is not None:
            assert_close(vjp(1.0, logp=logp, **args)["logp"], np.where(v, -A / n, 0), 1e-12, "gradient at ratio 1")
    _hold(SEEDS, prop, max_examples)
    mask, logp, offset, A = off_kink_batch(11)
    inputs = {"logp": logp, "logp_old": logp - offset, "advantages": A, "mask": mask, "clip_eps": 0.2}
    return vjp_errors(forward, vjp, inputs, ["logp"], OP_TOL)


def check_value_loss(forward, vjp=None, max_examples=30):
    """vf_coef * 0.5 * mean max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2) over valid tokens."""
    def prop(seed):
        mask, v, offset, R = off_kink_batch(seed)
        valid, eps, coef = mask > 0, 0.2, 0.1
        v_old = v - offset
        clipped = (np.clip(v, v_old - eps, v_old + eps) - R) ** 2
        expected = coef * 0.5 * np.maximum((v - R) ** 2, clipped)[valid].mean()
        args = {"returns": R, "mask": mask, "clip_eps": eps, "vf_coef": coef}
        assert_close(forward(values=v, values_old=v_old, **args), expected, 1e-12, "clipped value loss")
        inside = coef * 0.5 * ((v - R) ** 2)[valid].mean()
        assert_close(forward(values=v, values_old=v - offset / 10, **args), inside, 1e-12, "value loss inside clip")
    _hold(SEEDS, prop, max_examples)
    mask, v, offset, R = off_kink_batch(12)
    inputs = {"values": v, "values_old": v - offset, "returns": R, "mask": mask, "clip_eps": 0.2, "vf_coef": 0.1}
    return vjp_errors(forward, vjp, inputs, ["values"], OP_TOL)


# ---------------------------------------------------------------- preference losses

def check_bt_loss(forward, vjp=None, max_examples=30):
    """mean softplus(-(r_chosen - r_rejected)); dL/dr_chosen = (sigmoid(d) - 1) / n; a shared shift is free."""
    def prop(args):
        c, r, shift = args
        d = c - r
        assert_close(forward(r_chosen=c, r_rejected=r), np.logaddexp(0, -d).mean(), 1e-12, "BT loss")
        assert_close(forward(r_chosen=c + shift, r_rejected=r + shift), np.logaddexp(0, -d).mean(), 1e-9, "shift")
        if vjp is not None:
            g = vjp(1.0, r_chosen=c, r_rejected=r)
            assert_close(g["r_chosen"], (expit(d) - 1) / d.size, 1e-12, "BT dL/dr_chosen")
            assert_close(g["r_rejected"], (1 - expit(d)) / d.size, 1e-12, "BT dL/dr_rejected")
    pair = hnp.arrays(np.float64, 4, elements=st.floats(-50, 50))
    _hold(st.tuples(pair, pair, st.floats(-100, 100)), prop, max_examples)
    r = np.random.default_rng(13)
    inputs = {"r_chosen": r.standard_normal(5) + 0.1, "r_rejected": r.standard_normal(5) - 0.1}
    return vjp_errors(forward, vjp, inputs, ["r_chosen", "r_rejected"], OP_TOL)


def check_ranking_loss(forward, vjp=None, max_examples=30):
    """K-way: per prompt the mean over its valid pairs i < j (column 0 best) of softplus(-(r_i - r_j)), then the
    mean over prompts with a pair."""
    def prop(seed):
        r = np.random.default_rng(seed)
        rewards, valid = r.standard_normal((3, 4)) * 3, r.random((3, 4)) < 0.8
        valid[0] = True
        rows = [[np.logaddexp(0, -(x[i] - x[j])) for i in range(4) for j in range(i + 1, 4) if ok[i] and ok[j]]
                for x, ok in zip(rewards, valid)]
        expected = np.mean([np.mean(row) for row in rows if row])
        assert_close(forward(rewards=rewards, valid=valid), expected, 1e-12, "K-way ranking loss")
    _hold(SEEDS, prop, max_examples)
    r = np.random.default_rng(14)
    valid = np.ones((3, 4), bool)
    valid[1, 2], valid[2, 1:] = False, False  # an unscored response; a row with no pair
    inputs = {"rewards": r.standard_normal((3, 4)) + 0.1, "valid": valid}
    return vjp_errors(forward, vjp, inputs, ["rewards"], OP_TOL)


def check_dpo_loss(forward, vjp=None, max_examples=30):
    """u = beta ((logp_w - ref_w) - (logp_l - ref_l)), L = mean softplus(-u), dL/dlogp_w = -beta sigmoid(-u) / B."""
    names = ("logp_chosen", "logp_rejected", "ref_chosen", "ref_rejected")

    def prop(seed):
        r = np.random.default_rng(seed)
        x, beta = dict(zip(names, -5 * r.random((4, 3)))), float(r.uniform(0.05, 1))
        u = beta * ((x["logp_chosen"] - x["ref_chosen"]) - (x["logp_rejected"] - x["ref_rejected"]))
        assert_close(forward(beta=beta, **x), np.logaddexp(0, -u).mean(), 1e-12, "DPO loss")
        if vjp is not None:
            assert_close(vjp(1.0, beta=beta, **x)["logp_chosen"], -beta * expit(-u) / 3, 1e-12, "DPO dL/dlogp_w")
    _hold(SEEDS, prop, max_examples)
    r = np.random.default_rng(15)
    inputs = {**dict(zip(names, -3 * r.random((4, 3)) - 0.1)), "beta": 0.5}
    return vjp_errors(forward, vjp, inputs, list(names), OP_TOL)


# ---------------------------------------------------------------- optimiser

def check_adamw(forward, max_examples=10):
    """forward(params, grads, lr, weight_decay, max_grad_norm) -> params after len(grads[k]) AdamW steps
    from a zero state. Gradients near eps (1e-9) tell eps placement apart: here the first step is
    lr g / (|g| + eps), about 0.09 lr; with eps inside the root it would be about 1e-5 lr."""
    def prop(seed):
        r = np.random.default_rng(seed)
        params = {"w": r.standard_normal((3, 4)), "b": r.standard_normal(4)}
        scales = np.array([1e-9, 1e-3, 3.0])[:, None, None]  # tiny steps, plain steps, a clipped step
        grads = {"w": scales * r.standard_normal((3, 3, 4)), "b": scales[:, 0] * r.standard_normal((3, 4))}
        args = {"lr": 0.01, "weight_decay": 0.1, "max_grad_norm": 1.0}
        out, expected = forward(params=params, grads=grads, **args), naive_adamw(params, grads, **args)
        for k in params:
            assert_close(out[k], expected[k], 1e-12, f"AdamW {k} after 3 steps (eps outside sqrt, decay on ndim >= 2)")
    return _hold(SEEDS, prop, max_examples)
