"""The conformance kit: each public function's documented properties and gradients, checked on any
implementation (NumPy, PyTorch, JAX) that takes and returns NumPy arrays. This part: the layers, the models
and generation; conformance_rl.py has the RL side.

A port hands the kit two callables per function; inputs are passed by minirlhf's argument names:

    out   = forward(**inputs)        NumPy in, NumPy out (a dict of arrays for kl_estimators and gae)
    grads = vjp(dout, **inputs)      {input name: dLoss/dinput} with Loss = sum(out * dout); for a model,
                                     "params" maps to {parameter name: gradient} (PyTorch: autograd.grad)

check_<name>(forward, vjp=None) asserts
  1. properties that state the math, on inputs hypothesis draws (strategies.py): an independent formula or
     naive loop (oracles.py), invariances (shift, causality, padding), identities, bounds;
  2. given vjp, the gradient against fourth-order centred differences of the port's own forward
     (gradcheck.py), float64, tiny shapes, inputs off zero and off the clip kinks, a random upstream
     gradient: relative error < 1e-7 for ops, < 1e-5 for models (MODEL_ENTRIES random entries of every
     parameter: a slow framework stays quick), and returns {input: worst relative error} ({} without vjp).
A failure is an AssertionError that names the check, minirlhf's function and the conventions it pins
(registry.py), what was compared, the worst element (its index, the port's value and minirlhf's) and
whether a NaN or inf was involved, and, when the port's output matches a known porting mistake
(mistakes.py), that mistake. Exact values are the job of the golden fixtures (fixtures.py). Models run on
inputs.KIT_MODEL unless a model_cfg is given.

Padding: masks mark valid tokens with 1. Forward-only functions get NaN at padding ("masked positions may
hold anything"); losses with a gradient get finite garbage (NaN would poison an autograd graph); outputs
at padding queries of attention and the models are unspecified: never compared, upstream gradient 0.
The conventions pinned are those of minirlhf/CONVENTIONS.md.
"""
import functools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import log_softmax

from .. import exact
from .. import transformer as tf
from ..tokenizer import BOS, EOS
from .gradcheck import MODEL_TOL, OP_TOL, assert_close, key_bias_zero, rounding_tol, vjp_errors
from .inputs import KIT_MODEL, tiny_model
from .mistakes import diagnose
from .oracles import naive_attention
from .registry import FUNCTIONS
from .strategies import SEEDS, logit_batches, prefix_masks

MODEL_ENTRIES = 12  # entries checked per parameter of a model


def hold(strategy, prop, max_examples):
    """Assert prop(example) on max_examples examples that hypothesis draws (other settings: the profile's)."""
    settings(deadline=None, max_examples=max_examples)(given(strategy)(prop))()
    return {}  # what a check without a gradient returns


def named(name):
    """A check of registry function `name`: its failures say the check, minirlhf's function and the
    conventions it pins, and keep hypothesis's falsifying example."""
    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs):
            try:
                return check(*args, **kwargs)
            except AssertionError as e:
                entry = FUNCTIONS[name]
                notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", [])
                                if n.startswith(("Falsifying", "Failing")))  # the example, not the explanation
                raise AssertionError(f"check_{name} (minirlhf.{entry.function}; pins "
                                     f"{', '.join(entry.conventions)}): {e}{notes}") from None
        return run
    return wrap


def compare(name, got, expected, tol, what, inputs=None, model_cfg=None, key=None):
    """assert_close of the port's output against minirlhf's (one entry `key` of dict outputs, or every entry);
    on a mismatch, with the inputs given, the known mistakes of `name` whose output the port's matches."""
    pairs = ([(key, got[key], expected[key])] if key is not None else
             [(k, got[k], expected[k]) for k in expected] if isinstance(expected, dict) else [(None, got, expected)])
    for k, a, e in pairs:
        try:
            assert_close(a, e, tol, what if k is None else f"{what}: {k}")
        except AssertionError as err:
            found = diagnose(name, inputs, got, model_cfg, correct=expected) if inputs is not None else []
            raise AssertionError(f"{err}" + (f"; the port's output matches a known mistake: {'; '.join(found)}"
                                             if found else "")) from None


# ---------------------------------------------------------------- layers

@named("linear")
def check_linear(forward, vjp=None, max_examples=10):
    """out = x W + b with W (in, out) -- a PyTorch nn.Linear weight is W.T."""
    def prop(seed):
        r = np.random.default_rng(seed)
        x, W, b = r.standard_normal((2, 3, 4)), r.standard_normal((4, 5)), r.standard_normal(5)
        assert_close(forward(x=x, W=W, b=b), np.einsum("bti,io->bto", x, W) + b, 1e-12, "linear")
    hold(SEEDS, prop, max_examples)
    r = np.random.default_rng(2)
    inputs = {"x": r.standard_normal((2, 3, 4)) + 0.1, "W": r.standard_normal((4, 5)) + 0.1, "b": r.standard_normal(5)}
    return vjp_errors(forward, vjp, inputs, ["x", "W", "b"], OP_TOL)


@named("layernorm")
def check_layernorm(forward, vjp=None, max_examples=20):
    """(x - mean) / sqrt(var + 1e-5) g + b over the last axis, biased variance; ignores a shift of x."""
    def prop(args):
        seed, shift = args
        r = np.random.default_rng(seed)
        x, g, b = 3 * r.standard_normal((2, 3, 6)), r.standard_normal(6), r.standard_normal(6)
        expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b  # ddof 0
        assert_close(forward(x=x, g=g, b=b), expected, 1e-10, "layernorm: biased variance, eps 1e-5")
        assert_close(forward(x=x + shift, g=g, b=b), expected, 1e-9, "layernorm of x + c")
    hold(st.tuples(SEEDS, st.floats(-100, 100)), prop, max_examples)
    r = np.random.default_rng(3)
    inputs = {"x": 2 * r.standard_normal((2, 3, 6)) + 0.1, "g": r.standard_normal(6) + 0.1, "b": r.standard_normal(6)}
    return vjp_errors(forward, vjp, inputs, ["x", "g", "b"], OP_TOL)


@named("gelu")
def check_gelu(forward, vjp=None, max_examples=20):
    """The tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), not the erf form (they differ by 1e-3)."""
    def prop(x):
        u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
        assert_close(forward(x=x), 0.5 * x * (1 + np.tanh(u)), 1e-12, "gelu (tanh form)")
    hold(hnp.arrays(np.float64, (3, 4), elements=st.floats(-10, 10)), prop, max_examples)
    x = 2 * np.random.default_rng(4).standard_normal((2, 3, 4)) + 0.1
    return vjp_errors(forward, vjp, {"x": x}, ["x"], OP_TOL)


@named("attention")
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
    hold(st.tuples(SEEDS, prefix_masks(2, 4)), prop, max_examples)
    r = np.random.default_rng(5)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    inputs = {"qkv": r.standard_normal((2, 4, 12)) + 0.1, "key_mask": mask, "n_head": n_head}
    return vjp_errors(forward, vjp, inputs, ["qkv"], OP_TOL, where=mask[..., None] > 0)


@named("cross_entropy")
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
    hold(st.tuples(logit_batches(), SEEDS), prop, max_examples)
    r = np.random.default_rng(6)
    inputs = {"logits": r.standard_normal((2, 3, 5)) + 0.1, "targets": r.integers(0, 5, (2, 3)),
              "mask": np.array([[1, 1, 1], [1, 0, 0]])}
    return vjp_errors(forward, vjp, inputs, ["logits"], OP_TOL)


@named("token_logprobs")
def check_token_logprobs(forward, vjp=None, max_examples=20):
    """log softmax(z / tau)[y]; exp of it sums to 1 over y; tau enters as z / tau."""
    def prop(args):
        z, tau, seed = args
        y = np.random.default_rng(seed).integers(0, z.shape[-1], z.shape[:2])
        lp = np.take_along_axis(log_softmax(z / tau, -1), y[..., None], -1)[..., 0]
        assert_close(forward(logits=z, targets=y, temperature=tau), lp, 1e-12, f"token log-probs, tau {tau}")
        every = [np.exp(forward(logits=z, targets=np.full(y.shape, v), temperature=tau)) for v in range(z.shape[-1])]
        assert_close(np.sum(every, 0), np.ones(y.shape), 1e-12, "sum over y of p(y)")
    hold(st.tuples(logit_batches(), st.floats(0.3, 3.0), SEEDS), prop, max_examples)
    r = np.random.default_rng(7)
    inputs = {"logits": r.standard_normal((2, 3, 5)) + 0.1, "targets": r.integers(0, 5, (2, 3)), "temperature": 0.7}
    return vjp_errors(forward, vjp, inputs, ["logits"], OP_TOL)


@named("entropy")
def check_entropy(forward, vjp=None, max_examples=20):
    """H = -sum p log p of softmax(z / tau), 0 <= H <= log V."""
    def prop(args):
        z, tau = args
        lp = log_softmax(z / tau, -1)
        H = forward(logits=z, temperature=tau)
        assert_close(H, -(np.exp(lp) * lp).sum(-1), 1e-10, f"entropy, tau {tau}")
        assert np.all(H >= -1e-12) and np.all(H <= np.log(z.shape[-1]) + 1e-12), "entropy outside [0, log V]"
    hold(st.tuples(logit_batches(), st.floats(0.3, 3.0)), prop, max_examples)
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
    hold(st.tuples(SEEDS, st.integers(1, 3), st.integers(0, model_cfg.vocab_size - 1)), prop, max_examples)


def _model_gradient(forward, vjp, model_cfg, tokens, mask, head, where=None):
    """Every parameter, MODEL_ENTRIES entries each. The key bias adds q . b_k to a whole row of scores, which
    softmax ignores: its gradient is exactly 0, so it is checked to be ~0 instead of by relative error."""
    inputs = {"params": tiny_model(model_cfg, 1, head=head), "tokens": tokens, "mask": mask}
    return vjp_errors(forward, vjp, inputs, ["params"], MODEL_TOL, where=where, max_entries=MODEL_ENTRIES,
                      zero=key_bias_zero(model_cfg))


@named("transformer")
def check_transformer(forward, vjp=None, max_examples=15, model_cfg=KIT_MODEL):
    """logits (B, T, V) of the GPT (params by minirlhf's names): causal, padding-invariant, gradient of
    every parameter (the tied wte gets the lookup's and the head's)."""
    _model_properties(forward, model_cfg, True, max_examples, scored=False)
    r = np.random.default_rng(9)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # left- and right-padded rows
    where = mask[..., None] > 0
    tokens = r.integers(0, model_cfg.vocab_size, mask.shape)
    return _model_gradient(forward, vjp, model_cfg, tokens, mask, False, where)


# BOS text EOS rows (text ids 3..6), one right-padded with junk after EOS, one left-padded
SCORED = (np.array([[BOS, 3, 4, 5, EOS], [BOS, 6, EOS, 4, 3], [0, BOS, 5, 3, EOS]]),
          np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]))


@named("reward_model")
def check_reward_model(forward, vjp=None, max_examples=10, model_cfg=KIT_MODEL):
    """r (B,) = h[EOS] . head.w + head.b: read at EOS, the last real token; padding changes nothing."""
    _model_properties(forward, model_cfg, False, max_examples, scored=True)
    return _model_gradient(forward, vjp, model_cfg, *SCORED, True)


@named("value_model")
def check_value_model(forward, vjp=None, max_examples=10, model_cfg=KIT_MODEL):
    """values (B, T) = h . head.w + head.b at every position: causal, padding-invariant."""
    _model_properties(forward, model_cfg, True, max_examples, scored=True)
    return _model_gradient(forward, vjp, model_cfg, *SCORED, True, SCORED[1] > 0)




# ---------------------------------------------------------------- generation

def _outcome_law(params, model_cfg, prompt, tau):
    """The exact law of the first two sampled tokens after `prompt` (a 1-D array of ids), at tau: {(t1,): p}
    for t1 = EOS and {(t1, t2): p} otherwise, from minirlhf's forward pass."""
    lp1 = log_softmax(tf.forward(params, model_cfg, prompt[None])[0][0, -1] / tau)
    law = {}
    for t1 in range(model_cfg.vocab_size):
        if t1 == EOS:
            law[(t1,)] = np.exp(lp1[t1])
            continue
        lp2 = log_softmax(tf.forward(params, model_cfg, np.append(prompt, t1)[None])[0][0, -1] / tau)
        for t2 in range(model_cfg.vocab_size):
            law[(t1, t2)] = np.exp(lp1[t1] + lp2[t2])
    return law


def _chi_square_p(counts, law, n):
    """The chi-square p-value of outcome counts against an exact law (exact.chi_square_p: rare cells pooled)."""
    cells = list(law)
    return exact.chi_square_p([counts.get(c, 0) for c in cells], [law[c] * n for c in cells])


@named("generate")
def check_generate(generate, model_cfg=KIT_MODEL, n=8000, temperature=0.7, alpha=1e-6):
    """generate(params, prompts, prompt_mask, max_new_tokens, seed, temperature) -> {"tokens", "mask",
    "logprobs"} (B, N) each, for left-padded prompts: the port's sampler, plugged in. Checked:
      - the law of the first two tokens, drawn n times after one prompt written unpadded and again written
        with two PADs on its left, against the exact law of minirlhf's forward pass at the temperature (a
        chi-square test at level alpha = 1e-6, so that a correct sampler fails once in a million runs):
        wrong positions under left padding, a missing temperature or top-k sampling fail it;
      - the log-probs it reports, against minirlhf's log softmax(logits / tau) of the sampled tokens;
      - the mask: 1 up to and including the first EOS, 0 after it."""
    params = tiny_model(model_cfg, 4, scale=0.5)
    prompt = np.array([BOS, 3])
    law = _outcome_law(params, model_cfg, prompt, temperature)
    for pads, seed in ((0, 1), (2, 2)):
        prompts = np.tile(np.concatenate([np.zeros(pads, np.int64), prompt]), (n, 1))
        prompt_mask = (np.arange(prompts.shape[1]) >= pads).astype(np.int64)[None].repeat(n, 0)
        out = generate(params=params, prompts=prompts, prompt_mask=prompt_mask, max_new_tokens=2, seed=seed,
                       temperature=temperature)
        tokens, mask, logp = (np.asarray(out[k]) for k in ("tokens", "mask", "logprobs"))
        where = f"after the prompt {prompt.tolist()} with {pads} PADs on its left"
        expected_mask = np.array([[1 if EOS not in row[:t] else 0 for t in range(len(row))] for row in tokens])
        assert np.array_equal(mask, expected_mask), (f"the mask {where}: 1 up to and including the first EOS, "
                                                     f"0 after [response_mask]")
        counts = {}
        for row, m in zip(tokens, mask):
            key = tuple(int(t) for t in row[m > 0][:2])
            counts[key] = counts.get(key, 0) + 1
        pvalue = _chi_square_p(counts, law, n)
        assert pvalue > alpha, (f"the sampled law of the first two tokens {where} is not softmax(logits / "
                                f"{temperature}) of the forward pass (chi-square p = {pvalue:.2g} < {alpha:g}): "
                                f"positions under left padding, the temperature, or top-k / top-p sampling? "
                                f"[positions, temperature]")
        seq = np.concatenate([prompts, tokens], 1)
        seq_mask = np.concatenate([prompt_mask, mask], 1)
        logits = tf.forward(params, model_cfg, seq, seq_mask)[0][:, prompts.shape[1] - 1:-1]
        lp = np.take_along_axis(log_softmax(logits / temperature, -1), tokens[..., None], -1)[..., 0]
        assert_close(np.where(mask > 0, logp, 0), np.where(mask > 0, lp, 0), rounding_tol(64, 30.0),
                     f"the log-probs the sampler reports {where}, against log softmax(logits / tau) of the sampled "
                     f"tokens [temperature, positions]")
    return {}
