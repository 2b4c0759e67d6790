"""One record per function of the porting surface: minirlhf's function, its reference implementation in the
kit's calling convention, its conformance check, the inputs of its golden fixture and the conventions the
fixture pins. The kit (conformance.py), the fixtures (fixtures.py) and the tests all read this table.

The calling convention (conformance.py): forward(**inputs) -> out and vjp(dout, **inputs) -> {input: grad};
`reference(name)` is minirlhf itself in it, the pair a port provides for the same name.

CONVENTIONS are the ids a fixture names and a failing comparison prints, each stated in one line;
minirlhf/CONVENTIONS.md says them in full, with what other libraries do (tests check every id is there).
"""
from dataclasses import dataclass, field

import numpy as np

from .. import dpo, kl, optim, ppo
from .. import layers as L
from .. import ppo_objective as po
from .. import reward
from .. import transformer as tf
from ..tokenizer import BOS, EOS
from .inputs import FIXTURE_MODEL, tiny_model

CONVENTIONS = {
    "w_in_out": "linear layers compute x @ W + b with W of shape (in, out); a PyTorch nn.Linear weight is W.T",
    "layernorm_biased": "LayerNorm over the last axis with the biased variance (divide by C), eps = 1e-5",
    "gelu_tanh": "GELU in its tanh form, not the erf form (PyTorch: approximate='tanh')",
    "attention_mask": "query i attends to keys j <= i that are real tokens; a padding query only to itself "
                      "(its output is unspecified and never compared)",
    "positions": "positions = cumsum(mask) - mask: left padding leaves every real token's logits unchanged",
    "tied_head": "logits = ln_f(h) @ wte.T; wte's gradient is the lookup's plus the LM head's",
    "no_dropout": "no dropout anywhere",
    "pad_not_eos": "token ids PAD = 0, BOS = 1, EOS = 2: PAD != EOS",
    "temperature": "log-probs, entropy and exact KL are of softmax(logits / tau), the tau used for sampling",
    "mean_over_valid": "losses are means over valid (mask 1) positions; padding may hold anything",
    "kl_estimators": "log r = logp_ref - logp; k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r",
    "k1_in_reward": "k1 goes in the reward: r_t = -kl_coef * (logp_t - logp_ref_t) on every response token",
    "score_on_eos": "the score is added on the EOS token (the last valid response token), not one after "
                    "(TRL puts it one position after EOS)",
    "gae": "GAE: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, V = 0 after the "
           "last valid token, returns = A + V; gamma = 1, lam = 0.95",
    "whiten_biased": "whitening over valid tokens with the biased variance (divide by N), eps = 1e-8 inside "
                     "the sqrt; one valid token gives 0, not NaN (TRL: unbiased variance)",
    "ppo_clip": "policy loss mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), eps = 0.2; where the two "
                "are equal the unclipped branch's gradient is used",
    "value_clip": "value loss vf_coef * 0.5 * mean max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2), "
                  "eps = 0.2, vf_coef = 0.1",
    "response_positions": "in prompt + response of prompt length P, the logits and value at position P - 1 + t "
                          "belong to response token t",
    "bt_loss": "Bradley-Terry: mean over pairs of -log sigmoid(r_chosen - r_rejected)",
    "k_way": "K-way ranking (column 0 best): mean over a prompt's valid pairs i < j, then over prompts",
    "score_at_eos_position": "the reward head reads the final hidden state of the EOS token (the last real one)",
    "value_every_position": "the value head reads the final hidden state at every position",
    "adamw_eps_outside": "AdamW as PyTorch: m_hat / (sqrt(v_hat) + eps), eps = 1e-8 outside the sqrt; "
                         "decoupled decay p -= lr wd p on parameters with ndim >= 2 only; global-norm "
                         "clipping by min(1, max_norm / (norm + 1e-6))",
    "dpo": "DPO: u = beta ((logp_w - ref_w) - (logp_l - ref_l)) of summed response log-probs, "
           "L = mean softplus(-u)",
}


@dataclass(frozen=True)
class Entry:
    function: str  # minirlhf's function, as minirlhf.<module>.<name>
    reference: object  # model_cfg -> (forward, vjp or None): minirlhf in the kit's calling convention
    inputs: object  # (rng, offsets) -> the inputs of the golden fixture (float64, tiny, off zero and off the kinks)
    conventions: tuple  # the CONVENTIONS ids the fixture pins
    check: str = None  # the name of its conformance check (conformance.py), None for a fixture only
    defined: object = None  # inputs -> bool mask of the outputs the conventions define (padding queries: no)
    grad_names: tuple = field(default=())  # the inputs the vjp differentiates


# ---------------------------------------------------------------- minirlhf in the kit's calling convention

def _pair(forward, backward, grad_names, pick=lambda out: out):
    """forward(**kw) -> (out, cache), backward(dout, cache) -> gradients in grad_names' order."""
    def fwd(**kw):
        return pick(forward(**kw)[0])

    def vjp(dout, **kw):
        g = backward(dout, forward(**kw)[1])
        return dict(zip(grad_names, g if isinstance(g, tuple) else (g,)))
    return fwd, vjp


def _model(fwd, bwd):
    return lambda model_cfg: _pair(lambda params, tokens, mask: fwd(params, model_cfg, tokens, mask), bwd,
                                   ["params"])


def adamw_steps(params, grads, lr, weight_decay, max_grad_norm):
    """params after len(grads[k]) steps of optim.adamw_step from a zero state; grads[k][s] is step s's."""
    params = {k: v.copy() for k, v in params.items()}
    state = optim.adamw_init(params)
    opt = optim.AdamWConfig(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    for s in range(len(next(iter(grads.values())))):
        optim.adamw_step(params, {k: g[s] for k, g in grads.items()}, state, opt)
    return params


def ppo_minibatch(model_cfg, policy, value, seq, seq_mask, P, tokens, mask, logp_old, values_old, advantages,
                  returns, temperature, clip_eps, vf_clip_eps, vf_coef):
    """ppo.ppo_loss_and_grads of one minibatch: both losses, and both networks' gradients of their sum
    (the vjp of this fixture ignores dout)."""
    ppo_cfg = ppo.PPOConfig(clip_eps=clip_eps, vf_clip_eps=vf_clip_eps, vf_coef=vf_coef)
    mb = {"seq": seq, "seq_mask": seq_mask, "P": int(P), "tokens": tokens, "mask": mask, "logp_old": logp_old,
          "values_old": values_old, "advantages": advantages, "returns": returns}
    pol = tf.Policy(policy, model_cfg, tf.Sampling(temperature=float(temperature)))
    pg, vg, stats = ppo.ppo_loss_and_grads(pol, value, mb, ppo_cfg)
    return ({"loss_policy": np.asarray(stats["loss/policy"]), "loss_value": np.asarray(stats["loss/value"])},
            {"policy": pg, "value": vg})


# ---------------------------------------------------------------- the fixtures' inputs

MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])  # a full row and a right-padded one
SCORED = (np.array([[BOS, 3, 4, 5, EOS], [BOS, 6, EOS, 4, 3], [0, BOS, 5, 3, EOS]]),  # BOS text EOS rows:
          np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]))  # junk after EOS, left padding


def _padded(r, shape, mask, garbage=np.nan, lo=-3.0, hi=0.0):
    """Uniform [lo, hi) entries at valid positions, garbage (NaN: never read) at padding."""
    return np.where(mask > 0, r.uniform(lo, hi, shape), garbage)


def offsets(r):
    """Log-ratios and value offsets of 0.05 or 0.5, far from the clip eps = 0.2: every fixture's random
    stream draws these first (fixtures.build), and the inputs(r, off) of an entry may use them."""
    return r.choice([-0.5, -0.05, 0.05, 0.5], size=MASK.shape)


def _logits(r, kind):
    z, y = r.standard_normal((2, 3, 5)) + 0.1, r.integers(0, 5, (2, 3))
    return {"cross_entropy": {"logits": z, "targets": y, "mask": np.array([[1, 1, 1], [1, 0, 0]])},
            "token_logprobs": {"logits": z, "targets": y, "temperature": 0.7},
            "entropy": {"logits": z, "temperature": 1.3}}[kind]


def _activations(r, kind):
    x = 2 * r.standard_normal((2, 3, 6)) + 0.1
    return {"linear": {"x": x, "W": r.standard_normal((6, 5)), "b": r.standard_normal(5)},
            "layernorm": {"x": x, "g": r.standard_normal(6) + 0.1, "b": r.standard_normal(6)},
            "gelu": {"x": x}}[kind]


def _policy_loss_inputs(r, off):
    logp = _padded(r, MASK.shape, MASK, garbage=0.7)  # finite garbage: losses have gradients
    adv = r.choice([-1.0, 1.0], MASK.shape) * r.uniform(0.3, 1.5, MASK.shape)
    return {"logp": logp, "logp_old": logp - off, "advantages": adv, "mask": MASK, "clip_eps": 0.2}


def _value_loss_inputs(r, off):
    v = _padded(r, MASK.shape, MASK, garbage=0.7, lo=-1, hi=1)
    return {"values": v, "values_old": v - off, "returns": r.uniform(-1.5, 1.5, MASK.shape), "mask": MASK,
            "clip_eps": 0.2, "vf_coef": 0.1}


def _token_reward_inputs(r, with_scores):
    kw = {"logp": _padded(r, MASK.shape, MASK), "logp_ref": _padded(r, MASK.shape, MASK), "mask": MASK}
    return {"scores": r.standard_normal(2), **kw, "kl_coef": 0.1} if with_scores else kw


def _exact_kl_inputs(r, off):
    m = np.array([[1, 1, 1], [1, 1, 0]])
    z, z_ref = (np.where(m[..., None] > 0, 2 * r.standard_normal((2, 3, 5)), np.nan) for _ in range(2))
    return {"logits": z, "logits_ref": z_ref, "temperature": 0.8, "mask": m}


def _gae_inputs(r, off):
    rewards, values = (_padded(r, MASK.shape, MASK, lo=-1, hi=1) for _ in range(2))
    return {"rewards": rewards, "values": values, "mask": MASK, "gamma": 1.0, "lam": 0.95}


def _adamw_inputs(r, off):
    scales = np.array([1e-9, 1e-3, 3.0])[:, None, None]  # near eps, plain, clipped by the global norm
    return {"params": {"w": r.standard_normal((3, 4)), "b": r.standard_normal(4)},
            "grads": {"w": scales * r.standard_normal((3, 3, 4)), "b": scales[:, 0] * r.standard_normal((3, 4))},
            "lr": 0.01, "weight_decay": 0.1, "max_grad_norm": 1.0}


def _ppo_minibatch_inputs(r, off):
    policy, value = tiny_model(FIXTURE_MODEL, 3), tiny_model(FIXTURE_MODEL, 4, head=True)
    P, seq = 2, r.integers(3, FIXTURE_MODEL.vocab_size, (2, 6))
    seq[:, 1], seq_mask = BOS, np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    seq[1, 3], seq[1, 4:] = EOS, 0
    tokens, m = seq[:, P:], seq_mask[:, P:]
    logits = ppo.response_part(tf.forward(policy, FIXTURE_MODEL, seq, seq_mask)[0], P, 4)
    logp = L.token_logprobs_forward(logits, tokens, 0.9)[0]
    values = ppo.response_part(ppo.value_forward(value, FIXTURE_MODEL, seq, seq_mask)[0], P, 4)
    return {"policy": policy, "value": value, "seq": seq, "seq_mask": seq_mask, "P": P, "tokens": tokens,
            "mask": m, "logp_old": logp - off, "values_old": values + off,
            "advantages": r.choice([-1.0, 1.0], m.shape) * r.uniform(0.3, 1.5, m.shape),
            "returns": values + r.uniform(-1.5, 1.5, m.shape), "temperature": 0.9, "clip_eps": 0.2,
            "vf_clip_eps": 0.2, "vf_coef": 0.1}


def _names4():
    return ("logp_chosen", "logp_rejected", "ref_chosen", "ref_rejected")


# ---------------------------------------------------------------- the table

def _plain(fn):
    return lambda model_cfg: (fn, None)


def _model_inputs(r, off):
    m = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # full, left- and right-padded rows
    return {"params": tiny_model(FIXTURE_MODEL, 1), "tokens": r.integers(0, FIXTURE_MODEL.vocab_size, m.shape),
            "mask": m}


FUNCTIONS = {
    "linear": Entry("layers.linear_forward", lambda c: _pair(L.linear_forward, L.linear_backward, ["x", "W", "b"]),
                    lambda r, off: _activations(r, "linear"), ("w_in_out",), "check_linear"),
    "layernorm": Entry("layers.layernorm_forward",
                       lambda c: _pair(L.layernorm_forward, L.layernorm_backward, ["x", "g", "b"]),
                       lambda r, off: _activations(r, "layernorm"), ("layernorm_biased",), "check_layernorm"),
    "gelu": Entry("layers.gelu_forward", lambda c: _pair(L.gelu_forward, L.gelu_backward, ["x"]),
                  lambda r, off: _activations(r, "gelu"), ("gelu_tanh",), "check_gelu"),
    "attention": Entry("layers.attention_forward",
                       lambda c: _pair(lambda qkv, key_mask, n_head: L.attention_forward(qkv, n_head,
                                                                                         L.attention_mask(key_mask)),
                                       L.attention_backward, ["qkv"]),
                       lambda r, off: {"qkv": r.standard_normal((2, 4, 12)), "key_mask": np.array([[1, 1, 1, 1],
                                                                                                [0, 0, 1, 1]]),
                                  "n_head": 2},
                       ("attention_mask",), "check_attention", defined=lambda kw: kw["key_mask"][..., None] > 0),
    "cross_entropy": Entry("layers.cross_entropy_forward",
                           lambda c: _pair(L.cross_entropy_forward, L.cross_entropy_backward, ["logits"]),
                           lambda r, off: _logits(r, "cross_entropy"), ("mean_over_valid",), "check_cross_entropy"),
    "token_logprobs": Entry("layers.token_logprobs_forward",
                            lambda c: _pair(L.token_logprobs_forward, L.token_logprobs_backward, ["logits"]),
                            lambda r, off: _logits(r, "token_logprobs"), ("temperature",), "check_token_logprobs"),
    "entropy": Entry("layers.entropy_forward", lambda c: _pair(L.entropy_forward, L.entropy_backward, ["logits"]),
                     lambda r, off: _logits(r, "entropy"), ("temperature",), "check_entropy"),
    "transformer": Entry("transformer.forward", _model(tf.forward, tf.backward), _model_inputs,
                         ("w_in_out", "layernorm_biased", "gelu_tanh", "attention_mask", "positions", "tied_head",
                          "no_dropout"), "check_transformer", defined=lambda kw: kw["mask"][..., None] > 0),
    "reward_model": Entry("reward.reward_forward", _model(reward.reward_forward, reward.reward_backward),
                          lambda r, off: {"params": tiny_model(FIXTURE_MODEL, 2, head=True), "tokens": SCORED[0],
                                         "mask": SCORED[1]},
                          ("score_at_eos_position", "positions", "pad_not_eos"), "check_reward_model"),
    "value_model": Entry("ppo.value_forward", _model(ppo.value_forward, ppo.value_backward), None,
                         ("value_every_position",), "check_value_model"),
    "kl_estimators": Entry("kl.kl_estimators",
                           _plain(lambda **kw: {k: v for k, v in kl.kl_estimators(**kw).items()
                                                if k in ("k1", "k2", "k3")}),
                           lambda r, off: _token_reward_inputs(r, False), ("kl_estimators", "mean_over_valid"),
                           "check_kl_estimators"),
    "exact_kl": Entry("kl.exact_kl", _plain(kl.exact_kl), _exact_kl_inputs, ("temperature",), "check_exact_kl"),
    "token_rewards": Entry("kl.token_rewards", _plain(lambda **kw: kl.token_rewards(**kw)[0]),
                           lambda r, off: _token_reward_inputs(r, True), ("k1_in_reward", "score_on_eos"),
                           "check_token_rewards"),
    "gae": Entry("ppo_objective.gae", _plain(lambda **kw: dict(zip(("advantages", "returns"), po.gae(**kw)))),
                 _gae_inputs, ("gae",), "check_gae"),
    "whiten": Entry("ppo_objective.whiten", _plain(po.whiten),
                    lambda r, off: {"x": _padded(r, MASK.shape, MASK, lo=-2, hi=2), "mask": MASK},
                    ("whiten_biased",), "check_whiten"),
    "policy_loss": Entry("ppo_objective.policy_loss_forward",
                         lambda c: _pair(po.policy_loss_forward, po.policy_loss_backward, ["logp"]),
                         _policy_loss_inputs, ("ppo_clip", "mean_over_valid"), "check_policy_loss"),
    "value_loss": Entry("ppo_objective.value_loss_forward",
                        lambda c: _pair(po.value_loss_forward, po.value_loss_backward, ["values"]),
                        _value_loss_inputs, ("value_clip", "mean_over_valid"), "check_value_loss"),
    "bt_loss": Entry("reward.bt_loss_forward",
                     lambda c: _pair(reward.bt_loss_forward, reward.bt_loss_backward, ["r_chosen", "r_rejected"]),
                     lambda r, off: {"r_chosen": r.standard_normal(5) + 0.1,
                                    "r_rejected": r.standard_normal(5) - 0.1}, ("bt_loss",), "check_bt_loss"),
    "ranking_loss": Entry("reward.ranking_loss_forward",
                          lambda c: _pair(reward.ranking_loss_forward, reward.ranking_loss_backward, ["rewards"]),
                          lambda r, off: {"rewards": r.standard_normal((3, 4)) + 0.1,
                                         "valid": np.array([[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 0, 0]], bool)},
                          ("k_way",), "check_ranking_loss"),
    "dpo_loss": Entry("dpo.dpo_loss_forward",
                      lambda c: _pair(dpo.dpo_loss_forward, dpo.dpo_loss_backward, list(_names4())),
                      lambda r, off: {**dict(zip(_names4(), -3 * r.random((4, 3)) - 0.1)), "beta": 0.1},
                      ("dpo",), "check_dpo_loss"),
    "adamw": Entry("optim.adamw_step", _plain(adamw_steps), _adamw_inputs, ("adamw_eps_outside",), "check_adamw"),
    "ppo_minibatch": Entry("ppo.ppo_loss_and_grads",
                           lambda c: (lambda **kw: ppo_minibatch(c, **kw)[0],
                                      lambda dout, **kw: ppo_minibatch(c, **kw)[1]),
                           _ppo_minibatch_inputs,
                           ("response_positions", "temperature", "ppo_clip", "value_clip", "value_every_position",
                            "positions")),
}


def reference(name, model_cfg=FIXTURE_MODEL):
    """(forward, vjp or None) of minirlhf's function `name` in the kit's calling convention."""
    return FUNCTIONS[name].reference(model_cfg)
