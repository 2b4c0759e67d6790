"""minirlhf in the kit's calling convention, and the inputs of the golden fixtures.

The calling convention (conformance.py): forward(**inputs) -> out (an array, or a dict of arrays) and
vjp(dout, **inputs) -> {input name: dLoss/dinput} with Loss = sum(out * dout); a model's "params" maps to
{parameter name: gradient}. `pair` turns minirlhf's forward/backward into that pair; the functions below
wrap the few that are not a forward/backward pair (an optimiser run, a schedule, a controller, the
assembly of a rollout, a PPO minibatch).

The fixtures' inputs are tiny and float64, off zero and off every kink, and each reaches the branches a
port most often gets wrong: both clip branches, the far tails of log-sigmoid and softplus, margins != 0,
tau != 1, left padding, a single valid token, a response without EOS. Every fixture's random stream draws
`offsets` first; its inputs(r, off) may use them.
"""
import numpy as np

from .. import dpo, optim, ppo
from .. import layers as L
from .. import transformer as tf
from ..kl import KLControllerConfig, update_kl_coef
from ..reward import RewardModel
from ..tokenizer import BOS, EOS, PAD
from .inputs import FIXTURE_MODEL, tiny_model

MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])  # a full row, a right-padded one, one valid token


def pair(forward, backward, grad_names, pick=lambda out: out):
    """forward(**kw) -> (out, cache), backward(dout, cache) -> gradients in grad_names' order."""
    def fwd(**kw):
        return pick(forward(**kw)[0])

    def vjp(dout, **kw):
        g = backward(dout, forward(**kw)[1])
        return dict(zip(grad_names, g if isinstance(g, tuple) else (g,)))
    return fwd, vjp


def model_pair(fwd, bwd):
    """(model_cfg -> (forward, vjp)) of a model entry point taking (params, model_cfg, tokens, mask)."""
    return lambda model_cfg: pair(lambda params, tokens, mask: fwd(params, model_cfg, tokens, mask), bwd,
                                  ["params"])


def adamw_steps(params, grads, lr, weight_decay, max_grad_norm):
    """params after len(grads[k]) steps of optim.adamw_step from a zero state; grads[k][s] is step s's."""
    params = {k: v.copy() for k, v in params.items()}
    state = optim.adamw_init(params)
    opt = optim.AdamWConfig(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    for s in range(len(next(iter(grads.values())))):
        optim.adamw_step(params, {k: g[s] for k, g in grads.items()}, state, opt)
    return params


def lr_steps(steps, total_steps, peak_lr, warmup_steps):
    """optim.lr_schedule at each of steps (an array of 0-based step numbers)."""
    return np.array([optim.lr_schedule(int(s), int(total_steps), peak_lr, int(warmup_steps)) for s in steps])


def kl_coef_steps(kl_coef, kl, n_steps, target, horizon, adaptive):
    """kl.update_kl_coef on each case (arrays of one length; adaptive 0/1)."""
    return np.array([update_kl_coef(float(c), float(k), int(n), KLControllerConfig(
        kl_coef=float(c), adaptive=bool(a), target=float(target), horizon=int(horizon)))
        for c, k, n, a in zip(kl_coef, kl, n_steps, adaptive)])


def ppo_minibatch(model_cfg, policy, value, seq, seq_mask, P, tokens, mask, logp_old, values_old, advantages,
                  returns, temperature, clip_eps, vf_clip_eps, vf_coef):
    """ppo.ppo_loss_and_grads of one minibatch: both losses, and both networks' gradients of their sum
    (the vjp of this entry ignores dout)."""
    ppo_cfg = ppo.PPOConfig(clip_eps=clip_eps, vf_clip_eps=vf_clip_eps, vf_coef=vf_coef)
    mb = {"seq": seq, "seq_mask": seq_mask, "P": int(P), "tokens": tokens, "mask": mask, "logp_old": logp_old,
          "values_old": values_old, "advantages": advantages, "returns": returns}
    pol = tf.Policy(policy, model_cfg, tf.Sampling(temperature=float(temperature)))
    pg, vg, stats = ppo.ppo_loss_and_grads(pol, value, mb, ppo_cfg)
    return ({"loss_policy": np.asarray(stats["loss/policy"]), "loss_value": np.asarray(stats["loss/value"])},
            {"policy": pg, "value": vg})


ROLLOUT_OUTPUTS = ("mask", "logp_old", "logp_ref", "values", "scores", "rewards", "advantages", "returns")


def rollout_assembly(model_cfg, policy, reference, reward, value, prompts, prompt_mask, tokens, kl_coef,
                     temperature, gain, bias):
    """ppo.assemble_rollout on sampled tokens, as a dict of ROLLOUT_OUTPUTS ("values": the old values,
    "advantages": whitened, the rest as the batch dict names them)."""
    pol = tf.Policy(policy, model_cfg, tf.Sampling(temperature=float(temperature)))
    rm = RewardModel(reward, model_cfg, gain=float(gain), bias=float(bias))
    batch, _ = ppo.assemble_rollout(pol, reference, rm, value, prompts, prompt_mask, tokens, float(kl_coef),
                                    ppo.PPOConfig())
    out = {k: batch["values_old" if k == "values" else k] for k in ROLLOUT_OUTPUTS}
    for k in ("logp_old", "logp_ref", "values"):  # 0 at padding, as every other output is
        out[k] = out[k] * out["mask"]
    return out


# ---------------------------------------------------------------- the fixtures' inputs

def offsets(r):
    """Log-ratios and value offsets of 0.05 or 0.5, far from the clip eps = 0.2."""
    return r.choice([-0.5, -0.05, 0.05, 0.5], size=MASK.shape)


def _padded(r, mask, garbage=np.nan, lo=-3.0, hi=0.0):
    """Uniform [lo, hi) entries at valid positions, garbage (NaN: never read) at padding."""
    return np.where(mask > 0, r.uniform(lo, hi, mask.shape), garbage)


def activations(kind):
    def inputs(r, off):
        x = 2 * r.standard_normal((2, 3, 6)) + 0.1
        x[0, 0, :2] = (6.0, -6.0)  # GELU's saturated tails
        return {"linear": {"x": x, "W": r.standard_normal((6, 5)), "b": r.standard_normal(5)},
                "layernorm": {"x": x, "g": r.standard_normal(6) + 0.1, "b": r.standard_normal(6)},
                "gelu": {"x": x}}[kind]
    return inputs


def attention_inputs(r, off):
    return {"qkv": r.standard_normal((3, 4, 12)), "key_mask": np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]),
            "n_head": 2}


def logits_inputs(kind):
    def inputs(r, off):
        z, y = r.standard_normal((2, 3, 5)) + 0.1, r.integers(0, 5, (2, 3))
        z[1, 2] = (30.0, -30.0, 25.0, 0.0, -12.0)  # a near-one-hot row: log-softmax far in its tails
        return {"cross_entropy": {"logits": z, "targets": y, "mask": np.array([[1, 1, 1], [1, 0, 0]])},
                "token_logprobs": {"logits": z, "targets": y, "temperature": 0.7},
                "entropy": {"logits": z, "temperature": 1.3}}[kind]
    return inputs


def transformer_inputs(r, off):
    m = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]])  # full, left, right, one
    return {"params": tiny_model(FIXTURE_MODEL, 1), "tokens": r.integers(0, FIXTURE_MODEL.vocab_size, m.shape),
            "mask": m}


# BOS text EOS rows (text ids 3..6): one right-padded with junk after EOS, one left-padded, one of BOS EOS only
SCORED = (np.array([[BOS, 3, 4, 5, EOS], [BOS, 6, EOS, 4, 3], [0, BOS, 5, 3, EOS], [PAD, PAD, PAD, BOS, EOS]]),
          np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]))


def scored_inputs(seed):
    def inputs(r, off):
        return {"params": tiny_model(FIXTURE_MODEL, seed, head=True), "tokens": SCORED[0], "mask": SCORED[1]}
    return inputs


def token_reward_inputs(with_scores):
    def inputs(r, off):
        kw = {"logp": _padded(r, MASK), "logp_ref": _padded(r, MASK), "mask": MASK}
        kw["logp"][0, 1], kw["logp_ref"][0, 2] = kw["logp_ref"][0, 1] + 12.0, kw["logp"][0, 2] + 12.0  # +-12
        return {"scores": r.standard_normal(len(MASK)), **kw, "kl_coef": 0.1} if with_scores else kw
    return inputs


def exact_kl_inputs(r, off):
    m = np.array([[1, 1, 1], [1, 0, 0]])
    z, z_ref = (np.where(m[..., None] > 0, 2 * r.standard_normal((2, 3, 5)), np.nan) for _ in range(2))
    return {"logits": z, "logits_ref": z_ref, "temperature": 0.8, "mask": m}


def gae_inputs(r, off):
    rewards, values = (_padded(r, MASK, lo=-1, hi=1) for _ in range(2))
    return {"rewards": rewards, "values": values, "mask": MASK, "gamma": 1.0, "lam": 0.95}


def whiten_inputs(r, off):
    return {"x": _padded(r, MASK, lo=-2, hi=2), "mask": MASK}


def policy_loss_inputs(r, off):
    logp = _padded(r, MASK, garbage=0.7)  # finite garbage: losses have gradients
    adv = r.choice([-1.0, 1.0], MASK.shape) * r.uniform(0.3, 1.5, MASK.shape)
    old = logp - off
    old[1, 1], adv[1, 1] = logp[1, 1] - 21.0, -1.0  # a log-ratio of 21 on the unclipped branch: no clamp
    return {"logp": logp, "logp_old": old, "advantages": adv, "mask": MASK, "clip_eps": 0.2}


def value_loss_inputs(r, off):
    v = _padded(r, MASK, garbage=0.7, lo=-1, hi=1)
    return {"values": v, "values_old": v - off, "returns": r.uniform(-1.5, 1.5, MASK.shape), "mask": MASK,
            "clip_eps": 0.2, "vf_coef": 0.1}


def bt_inputs(r, off):
    chosen, rejected = r.standard_normal(5) + 0.1, r.standard_normal(5) - 0.1
    # d = +32, -20.25 and -800 (the margin included): log-sigmoid's tails, one just past the threshold 20
    # beyond which torch's softplus returns its input (its gradient there is 1, against 1 - 1.6e-9), one where
    # sigmoid(d) underflows to 0 in float64 (as it does below -88 in float32) and log(sigmoid(d)) is -inf
    chosen[:3], rejected[:3] = (30.0, -19.75, -799.5), (-2.5, 0.0, 0.0)
    return {"r_chosen": chosen, "r_rejected": rejected, "margin": 0.5, "center_coef": 0.05}


def ranking_inputs(r, off):
    return {"rewards": r.standard_normal((3, 4)) + 0.1, "margin": 0.3, "center_coef": 0.02,
            "valid": np.array([[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 0, 0]], bool)}  # an unscored slot, no pair


PAIR_NAMES = ("logp_chosen", "logp_rejected", "ref_chosen", "ref_rejected")


def preference_inputs(beta):
    def inputs(r, off):
        x = dict(zip(PAIR_NAMES, -3 * r.random((4, 4)) - 0.1))
        x["logp_chosen"][0] -= 400.0  # a gap of 400 nats: beta h far in log-sigmoid's tail
        return {**x, "beta": beta}
    return inputs


def sequence_logprob_inputs(r, off):
    m = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])  # prompt targets 0; EOS the last 1
    return {"logits": r.standard_normal((3, 5, 6)) + 0.1, "targets": r.integers(0, 6, (3, 5)), "mask": m,
            "temperature": 0.9}


def response_mask_inputs(r, off):
    return {"tokens": np.array([[5, 4, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [3, 4, 5, 6, 3],
                                [4, EOS, 3, EOS, PAD]])}  # EOS mid, first, none, text after EOS


def kl_coef_inputs(r, off):
    kl_values = np.array([7.2, 6.6, 0.0, 60.0, 6.0, 3.0, 100.0])  # beyond the clip, inside it, on target
    return {"kl_coef": np.full(7, 0.1), "kl": kl_values, "n_steps": np.full(7, 64),
            "adaptive": np.array([1, 1, 1, 1, 1, 1, 0]), "target": 6.0, "horizon": 1000}


def lr_inputs(r, off):
    return {"steps": np.arange(12), "total_steps": 12, "peak_lr": 0.01, "warmup_steps": 3}


def adamw_inputs(r, off):
    scales = np.array([1e-9, 1e-3, 3.0])[:, None, None]  # near eps, plain, clipped by the global norm
    return {"params": {"w": r.standard_normal((3, 4)), "b": r.standard_normal(4)},
            "grads": {"w": scales * r.standard_normal((3, 3, 4)), "b": scales[:, 0] * r.standard_normal((3, 4))},
            "lr": 0.01, "weight_decay": 0.1, "max_grad_norm": 1.0}


def ppo_minibatch_inputs(r, off):
    off = off[:2]
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


def rollout_inputs(r, off):
    """Left-padded prompts; responses: one ending in EOS then PAD, one with no EOS, one that is EOS alone."""
    prompts = np.array([[BOS, 3, 4], [PAD, BOS, 5], [PAD, BOS, 6]])
    tokens = np.array([[4, EOS, PAD], [3, 6, 4], [EOS, PAD, PAD]])
    return {"policy": tiny_model(FIXTURE_MODEL, 5), "reference": tiny_model(FIXTURE_MODEL, 6),
            "reward": tiny_model(FIXTURE_MODEL, 7, head=True), "value": tiny_model(FIXTURE_MODEL, 8, head=True),
            "prompts": prompts, "prompt_mask": (prompts != PAD).astype(np.int64), "tokens": tokens,
            "kl_coef": 0.1, "temperature": 0.8, "gain": 1.7, "bias": -0.3}


def sequence_pair():
    return pair(dpo.sequence_logprob_forward, dpo.sequence_logprob_backward, ["logits"])


def generate_adapter(model_cfg):
    """minirlhf's sampler in the calling convention of conformance.check_generate."""
    def generate(params, prompts, prompt_mask, max_new_tokens, seed, temperature):
        return tf.generate(params, model_cfg, prompts, prompt_mask, max_new_tokens, np.random.default_rng(seed),
                           temperature)
    return generate


def logprobs_adapter(model_cfg):
    """minirlhf's log-probs of a rollout's tokens, in the calling convention of conformance_rl.check_rollout."""
    def logprobs(policy, seq, seq_mask, tokens, P, temperature):
        return ppo.response_logprobs(tf.Policy(policy, model_cfg), seq, seq_mask, tokens, P, temperature)[0]
    return logprobs
