"""The conformance kit run on minirlhf itself, so the kit is exercised on every run; and run on wrong
implementations, one convention broken at a time, to show each check can fail."""
import numpy as np
import pytest
from hypothesis import Phase, settings

from minirlhf import layers as L
from minirlhf import optim
from minirlhf import ppo_objective as po
from minirlhf import transformer as tf
from minirlhf.kit import conformance as K
from minirlhf.kit.gradcheck import MODEL_TOL, OP_TOL
from minirlhf.kit.inputs import KIT_MODEL
from minirlhf.kit.registry import FUNCTIONS, reference

REF = {name: reference(name, KIT_MODEL) for name in FUNCTIONS}
CHECKS = {name: getattr(K, entry.check) for name, entry in FUNCTIONS.items() if entry.check}


def test_every_function_of_the_registry_has_a_check_or_a_fixture():
    assert set(CHECKS) == set(FUNCTIONS) - {"ppo_minibatch"}  # ppo_minibatch: a fixture, no properties


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_minirlhf_passes_its_own_kit(name):
    forward, vjp = REF[name]
    errors = CHECKS[name](forward, vjp) if vjp is not None else CHECKS[name](forward)
    assert (vjp is None) == (not errors)  # a function with a gradient had it checked
    tol = MODEL_TOL if name in ("transformer", "reward_model", "value_model") else OP_TOL
    assert all(e < tol for e in errors.values()), errors


# ---------------------------------------------------------------- each broken convention is caught

def _unbiased_layernorm(x, g, b):
    xc = x - x.mean(-1, keepdims=True)
    return xc / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-5) * g + b


def _erf_gelu(x):
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _score_one_after_eos(scores, logp, logp_ref, mask, kl_coef):  # TRL's placement, inside the array
    r = np.where(mask > 0, -kl_coef * (logp - logp_ref), 0)
    last = mask.sum(1)
    inside = last < mask.shape[1]
    r[np.arange(len(r))[inside], last[inside]] += scores[inside]
    return r


def _unbiased_whiten(x, mask):
    v = x[mask > 0]
    return np.where(mask > 0, (x - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8), 0)


def _ungated_policy_vjp(dout, logp, logp_old, advantages, mask, clip_eps):  # forgets the clip in backward
    n = mask.sum()
    return {"logp": np.where(mask > 0, -advantages * np.exp(logp - logp_old) / n, 0) * dout}


def _adamw_eps_inside(params, grads, lr, weight_decay, max_grad_norm):  # TF-style denominator
    p, m, v = dict(params), {k: 0.0 for k in params}, {k: 0.0 for k in params}
    for t in range(1, len(grads["w"]) + 1):
        g, _ = optim.clip_grads({k: grads[k][t - 1] for k in p}, max_grad_norm)
        for k in p:
            p[k] = p[k] - lr * weight_decay * p[k] if p[k].ndim >= 2 else p[k]
            m[k], v[k] = 0.9 * m[k] + 0.1 * g[k], 0.999 * v[k] + 0.001 * g[k] ** 2
            p[k] = p[k] - lr * (m[k] / (1 - 0.9**t)) / np.sqrt(v[k] / (1 - 0.999**t) + 1e-8)
    return p


def _mask_ignored(params, tokens, mask):  # pads attended to, positions 0 .. T-1
    return tf.forward(params, KIT_MODEL, tokens)[0]


def _k3_wrong_sign(logp, logp_ref, mask):
    k = REF["kl_estimators"][0](logp=logp, logp_ref=logp_ref, mask=mask)
    log_r = np.where(mask > 0, logp - logp_ref, 0)  # the wrong way round
    return {**k, "k3": np.expm1(log_r) - log_r}


BROKEN = {
    "layernorm with the unbiased variance": (K.check_layernorm, _unbiased_layernorm, None),
    "GELU in its erf form": (K.check_gelu, _erf_gelu, None),
    "score one position after EOS": (K.check_token_rewards, _score_one_after_eos, None),
    "whitening with the unbiased variance": (K.check_whiten, _unbiased_whiten, None),
    "policy gradient ignoring the clip": (K.check_policy_loss, REF["policy_loss"][0], _ungated_policy_vjp),
    "AdamW with eps inside the sqrt": (K.check_adamw, _adamw_eps_inside, None),
    "transformer ignoring the mask": (K.check_transformer, _mask_ignored, None),
    "k3 with log r the wrong way round": (K.check_kl_estimators, _k3_wrong_sign, None),
    "GAE with lambda ignored": (K.check_gae, lambda **kw: dict(zip(("advantages", "returns"),
                                                                  po.gae(**{**kw, "lam": 1.0}))), None),
    "entropy without the temperature": (K.check_entropy, lambda logits, temperature: L.entropy_forward(logits)[0],
                                        None),
}


@pytest.fixture
def no_shrinking():
    """The current profile without the shrink phase: a failure is all these tests need to see."""
    before = settings.get_current_profile_name()
    settings.register_profile("no_shrinking", parent=settings.get_profile(before), phases=[Phase.generate])
    settings.load_profile("no_shrinking")
    yield
    settings.load_profile(before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the unbiased variance of one token is NaN
@pytest.mark.parametrize("what", sorted(BROKEN))
def test_kit_catches(what, no_shrinking):
    check, forward, vjp = BROKEN[what]
    with pytest.raises(AssertionError):
        check(forward, vjp) if vjp is not None else check(forward)
