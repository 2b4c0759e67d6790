"""Golden fixtures: minirlhf's inputs, outputs and gradients in float64, for a port to match exactly.

    python -m minirlhf.fixtures --out DIR

writes DIR/<name>.npz for every public function below and DIR/index.json. In an .npz (read it with
np.load(path, allow_pickle=False)) the arrays are named
    in.<arg>            an input, by minirlhf's argument name (a scalar such as temperature: a 0-d array)
    in.<arg>:<key>      an entry of a dict input: a model's parameters (in.params:h0.attn.w_qkv) ...
    out, out.<key>      the output, or each entry of a dict output
    dout                the upstream gradient (random, not ones); the gradients are those of sum(out * dout)
    grad.<arg>[:<key>]  dLoss/d<arg>, shaped like the input
    where.out           (optional) the entries of out the conventions define (not padding queries)
index.json, per fixture: the file, minirlhf's function, the inputs (scalars by value), the outputs and
gradients, and the ids of the conventions it pins down; index["conventions"] says each in words, and
index["config"] is the tiny transformer every model fixture uses (CFG below).

Determinism: fixed seeds, float64, and zip entries written in sorted order with a fixed timestamp, so the
same machine writes the same bytes on every run; across machines BLAS may change the last bits, so
`compare` allows 1e-12 (tests/test_fixtures.py regenerates the committed set and compares).

REFERENCE(cfg) is minirlhf itself in the conformance kit's calling convention (conformance.py):
forward(**inputs) -> out and vjp(dout, **inputs) -> {input: gradient}; a port provides the same pair.
"""
import argparse
import io
import json
import os
import zipfile
import zlib

import numpy as np

from . import layers as L
from . import dpo, kl, optim, ppo, ppo_objective as po, reward
from . import transformer as tf
from .conformance import SCORED
from .testing import assert_close, tiny_model
from .tokenizer import BOS, EOS

CFG = tf.Config(vocab_size=7, n_ctx=6, n_layer=1, n_head=2, n_embd=4)  # every model fixture's (small files)

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
    "k1_in_reward": "k1 goes in the reward: r_t = -beta * (logp_t - logp_ref_t) on every response token",
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
                         "clipping by max_norm / (norm + 1e-6)",
    "dpo": "DPO: u = beta ((logp_w - ref_w) - (logp_l - ref_l)) of summed response log-probs, "
           "L = mean softplus(-u)",
}


# ---------------------------------------------------------------- minirlhf in the kit's calling convention

def _pair(forward, backward, grad_names, pick=lambda out: out):
    """forward(**kw) -> (out, cache), backward(dout, cache) -> gradients in grad_names' order."""
    def fwd(**kw):
        return pick(forward(**kw)[0])

    def vjp(dout, **kw):
        g = backward(dout, forward(**kw)[1])
        return dict(zip(grad_names, g if isinstance(g, tuple) else (g,)))
    return fwd, vjp


def REFERENCE(cfg=CFG):
    """{name: (forward, vjp)} of minirlhf; vjp is None for functions without a gradient."""
    with_cfg = lambda f: lambda params, tokens, mask: f(params, cfg, tokens, mask)  # noqa: E731
    table = {
        "linear": _pair(L.linear_forward, L.linear_backward, ["x", "W", "b"]),
        "layernorm": _pair(L.layernorm_forward, L.layernorm_backward, ["x", "g", "b"]),
        "gelu": _pair(L.gelu_forward, L.gelu_backward, ["x"]),
        "attention": _pair(lambda qkv, key_mask, n_head: L.attention_forward(qkv, n_head, L.attention_mask(key_mask)),
                           L.attention_backward, ["qkv"]),
        "cross_entropy": _pair(L.cross_entropy_forward, L.cross_entropy_backward, ["logits"]),
        "token_logprobs": _pair(L.token_logprobs_forward, L.token_logprobs_backward, ["logits"]),
        "entropy": _pair(L.entropy_forward, L.entropy_backward, ["logits"]),
        "transformer": _pair(with_cfg(tf.forward), tf.backward, ["params"]),
        "reward_model": _pair(with_cfg(reward.reward_forward), reward.reward_backward, ["params"]),
        "value_model": _pair(with_cfg(ppo.value_forward), ppo.value_backward, ["params"]),
        "kl_estimators": (lambda **kw: {k: v for k, v in kl.kl_estimators(**kw).items() if k in ("k1", "k2", "k3")},
                          None),
        "exact_kl": (kl.exact_kl, None),
        "token_rewards": (lambda **kw: kl.token_rewards(**kw)[0], None),
        "gae": (lambda **kw: dict(zip(("advantages", "returns"), po.gae(**kw))), None),
        "whiten": (po.whiten, None),
        "policy_loss": _pair(po.policy_loss_forward, po.policy_loss_backward, ["logp"]),
        "value_loss": _pair(po.value_loss_forward, po.value_loss_backward, ["values"]),
        "bt_loss": _pair(reward.bt_loss_forward, reward.bt_loss_backward, ["r_chosen", "r_rejected"]),
        "ranking_loss": _pair(reward.ranking_loss_forward, reward.ranking_loss_backward, ["rewards"]),
        "adamw": (adamw_steps, None),
        "ppo_minibatch": (lambda **kw: ppo_minibatch(cfg, **kw)[0], lambda dout, **kw: ppo_minibatch(cfg, **kw)[1]),
    }
    table["dpo_loss"] = _pair(dpo.dpo_loss_forward, dpo.dpo_loss_backward,
                              ["logp_chosen", "logp_rejected", "ref_chosen", "ref_rejected"])
    return table


def adamw_steps(params, grads, lr, weight_decay, max_grad_norm):
    """params after len(grads[k]) steps of optim.adamw_step from a zero state; grads[k][s] is step s's."""
    params = {k: v.copy() for k, v in params.items()}
    state = optim.adamw_init(params)
    cfg = optim.AdamWConfig(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    for s in range(len(next(iter(grads.values())))):
        optim.adamw_step(params, {k: g[s] for k, g in grads.items()}, state, cfg)
    return params


def ppo_minibatch(model_cfg, policy, value, seq, seq_mask, P, tokens, mask, logp_old, values_old, advantages,
                  returns, temperature, clip_eps, vf_clip_eps, vf_coef):
    """ppo.ppo_loss_and_grads of one minibatch: both losses, and both networks' gradients of their sum
    (the vjp of this fixture ignores dout)."""
    cfg = ppo.PPOConfig(temperature=temperature, clip_eps=clip_eps, vf_clip_eps=vf_clip_eps, vf_coef=vf_coef)
    mb = {"seq": seq, "seq_mask": seq_mask, "P": int(P), "tokens": tokens, "mask": mask, "logp_old": logp_old,
          "values_old": values_old, "advantages": advantages, "returns": returns}
    pg, vg, stats = ppo.ppo_loss_and_grads(policy, value, model_cfg, mb, cfg)
    return {"loss_policy": np.asarray(stats["loss/policy"]), "loss_value": np.asarray(stats["loss/value"])}, \
        {"policy": pg, "value": vg}


# ---------------------------------------------------------------- the fixtures' inputs

def _padded(r, shape, mask, garbage=np.nan, lo=-3.0, hi=0.0):
    """Uniform [lo, hi) entries at valid positions, garbage (NaN: never read) at padding."""
    return np.where(mask > 0, r.uniform(lo, hi, shape), garbage)


def _inputs(name, r):
    """The inputs of fixture `name`: tiny, float64, off zero and off the clip kinks."""
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    off = r.choice([-0.5, -0.05, 0.05, 0.5], size=mask.shape)  # log-ratios, value offsets: |.| far from 0.2
    if name in ("linear", "layernorm", "gelu"):
        x = 2 * r.standard_normal((2, 3, 6)) + 0.1
        return {"linear": {"x": x, "W": r.standard_normal((6, 5)), "b": r.standard_normal(5)},
                "layernorm": {"x": x, "g": r.standard_normal(6) + 0.1, "b": r.standard_normal(6)},
                "gelu": {"x": x}}[name]
    if name == "attention":
        return {"qkv": r.standard_normal((2, 4, 12)), "key_mask": np.array([[1, 1, 1, 1], [0, 0, 1, 1]]), "n_head": 2}
    if name in ("cross_entropy", "token_logprobs", "entropy"):
        z, y = r.standard_normal((2, 3, 5)) + 0.1, r.integers(0, 5, (2, 3))
        return {"cross_entropy": {"logits": z, "targets": y, "mask": np.array([[1, 1, 1], [1, 0, 0]])},
                "token_logprobs": {"logits": z, "targets": y, "temperature": 0.7},
                "entropy": {"logits": z, "temperature": 1.3}}[name]
    if name == "transformer":
        m = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
        return {"params": tiny_model(CFG, 1), "tokens": r.integers(0, CFG.vocab_size, m.shape), "mask": m}
    if name == "reward_model":
        return {"params": tiny_model(CFG, 2, head=True), "tokens": SCORED[0], "mask": SCORED[1]}
    if name in ("kl_estimators", "token_rewards"):
        kw = {"logp": _padded(r, mask.shape, mask), "logp_ref": _padded(r, mask.shape, mask), "mask": mask}
        return kw if name == "kl_estimators" else {"scores": r.standard_normal(2), **kw, "beta": 0.1}
    if name == "exact_kl":
        m = np.array([[1, 1, 1], [1, 1, 0]])
        z, z_ref = (np.where(m[..., None] > 0, 2 * r.standard_normal((2, 3, 5)), np.nan) for _ in range(2))
        return {"logits": z, "logits_ref": z_ref, "temperature": 0.8, "mask": m}
    if name == "gae":
        rewards, values = (_padded(r, mask.shape, mask, lo=-1, hi=1) for _ in range(2))
        return {"rewards": rewards, "values": values, "mask": mask, "gamma": 1.0, "lam": 0.95}
    if name == "whiten":
        return {"x": _padded(r, mask.shape, mask, lo=-2, hi=2), "mask": mask}
    if name == "policy_loss":
        logp = _padded(r, mask.shape, mask, garbage=0.7)  # finite garbage: losses have gradients
        adv = r.choice([-1.0, 1.0], mask.shape) * r.uniform(0.3, 1.5, mask.shape)
        return {"logp": logp, "logp_old": logp - off, "advantages": adv, "mask": mask, "clip_eps": 0.2}
    if name == "value_loss":
        v = _padded(r, mask.shape, mask, garbage=0.7, lo=-1, hi=1)
        return {"values": v, "values_old": v - off, "returns": r.uniform(-1.5, 1.5, mask.shape), "mask": mask,
                "clip_eps": 0.2, "vf_coef": 0.1}
    if name == "bt_loss":
        return {"r_chosen": r.standard_normal(5) + 0.1, "r_rejected": r.standard_normal(5) - 0.1}
    if name == "ranking_loss":
        valid = np.ones((3, 4), bool)
        valid[1, 2], valid[2, 1:] = False, False  # an unscored response; a prompt with no pair
        return {"rewards": r.standard_normal((3, 4)) + 0.1, "valid": valid}
    if name == "dpo_loss":
        names = ("logp_chosen", "logp_rejected", "ref_chosen", "ref_rejected")
        return {**dict(zip(names, -3 * r.random((4, 3)) - 0.1)), "beta": 0.1}
    if name == "adamw":
        scales = np.array([1e-9, 1e-3, 3.0])[:, None, None]  # near eps, plain, clipped by the global norm
        return {"params": {"w": r.standard_normal((3, 4)), "b": r.standard_normal(4)},
                "grads": {"w": scales * r.standard_normal((3, 3, 4)), "b": scales[:, 0] * r.standard_normal((3, 4))},
                "lr": 0.01, "weight_decay": 0.1, "max_grad_norm": 1.0}
    if name == "ppo_minibatch":
        policy, value = tiny_model(CFG, 3), tiny_model(CFG, 4, head=True)
        P, seq = 2, r.integers(3, CFG.vocab_size, (2, 6))
        seq[:, 1], seq_mask = BOS, np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
        seq[1, 3], seq[1, 4:] = EOS, 0
        tokens, m = seq[:, P:], seq_mask[:, P:]
        logits, _ = ppo.response_logits(policy, CFG, seq, seq_mask, P)
        logp = L.token_logprobs_forward(logits, tokens, 0.9)[0]
        values = ppo.value_forward(value, CFG, seq, seq_mask)[0][:, P - 1:P - 1 + 4]
        return {"policy": policy, "value": value, "seq": seq, "seq_mask": seq_mask, "P": P, "tokens": tokens,
                "mask": m, "logp_old": logp - off, "values_old": values + off,
                "advantages": r.choice([-1.0, 1.0], m.shape) * r.uniform(0.3, 1.5, m.shape),
                "returns": values + r.uniform(-1.5, 1.5, m.shape), "temperature": 0.9, "clip_eps": 0.2,
                "vf_clip_eps": 0.2, "vf_coef": 0.1}
    raise KeyError(name)


# name: (minirlhf function, conventions)
FIXTURES = {
    "linear": ("layers.linear_forward", ["w_in_out"]),
    "layernorm": ("layers.layernorm_forward", ["layernorm_biased"]),
    "gelu": ("layers.gelu_forward", ["gelu_tanh"]),
    "attention": ("layers.attention_forward", ["attention_mask"]),
    "cross_entropy": ("layers.cross_entropy_forward", ["mean_over_valid"]),
    "token_logprobs": ("layers.token_logprobs_forward", ["temperature"]),
    "entropy": ("layers.entropy_forward", ["temperature"]),
    "transformer": ("transformer.forward", ["w_in_out", "layernorm_biased", "gelu_tanh", "attention_mask",
                                            "positions", "tied_head", "no_dropout"]),
    "reward_model": ("reward.reward_forward", ["score_at_eos_position", "positions", "pad_not_eos"]),
    "kl_estimators": ("kl.kl_estimators", ["kl_estimators", "mean_over_valid"]),
    "exact_kl": ("kl.exact_kl", ["temperature"]),
    "token_rewards": ("kl.token_rewards", ["k1_in_reward", "score_on_eos"]),
    "gae": ("ppo_objective.gae", ["gae"]),
    "whiten": ("ppo_objective.whiten", ["whiten_biased"]),
    "policy_loss": ("ppo_objective.policy_loss_forward", ["ppo_clip", "mean_over_valid"]),
    "value_loss": ("ppo_objective.value_loss_forward", ["value_clip", "mean_over_valid"]),
    "bt_loss": ("reward.bt_loss_forward", ["bt_loss"]),
    "ranking_loss": ("reward.ranking_loss_forward", ["k_way"]),
    "dpo_loss": ("dpo.dpo_loss_forward", ["dpo"]),
    "adamw": ("optim.adamw_step", ["adamw_eps_outside"]),
    "ppo_minibatch": ("ppo.ppo_loss_and_grads", ["response_positions", "temperature", "ppo_clip", "value_clip",
                                                 "value_every_position", "positions"]),
}

# Outputs at padding queries are unspecified (attention_mask): only these entries are compared.
DEFINED = {"attention": lambda kw: kw["key_mask"][..., None] > 0, "transformer": lambda kw: kw["mask"][..., None] > 0}


# ---------------------------------------------------------------- writing, reading, comparing

def _flat(prefix, value):
    """{prefix: array} or, for a dict, {prefix:key: array} per entry."""
    if isinstance(value, dict):
        return {f"{prefix}:{k}": np.asarray(v) for k, v in value.items()}
    return {prefix: np.asarray(value)}


def save_npz(path, arrays):
    """np.savez with sorted entries and a fixed timestamp: the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name], order="C"), allow_pickle=False)  # keeps 0-d
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)


def build(name, table):
    """(arrays, index entry) of one fixture, from minirlhf's functions in `table` (REFERENCE())."""
    r = np.random.default_rng(zlib.crc32(name.encode()))  # a fixed seed per fixture, whatever the others
    inputs, arrays = _inputs(name, r), {}
    for arg, x in inputs.items():
        arrays.update(_flat(f"in.{arg}", x))
    forward, vjp = table[name]
    out, grads, where = forward(**inputs), {}, None
    if name == "ppo_minibatch":
        grads = vjp(None, **inputs)
    elif vjp is not None:
        dout = r.standard_normal(np.shape(out))  # a random upstream gradient, not ones
        if name in DEFINED:
            where = np.broadcast_to(DEFINED[name](inputs), np.shape(out))
            dout = np.where(where, dout, 0.0)
        arrays["dout"] = dout
        grads = vjp(dout, **inputs)
    for key, x in (out if isinstance(out, dict) else {None: out}).items():
        arrays.update(_flat("out" if key is None else f"out.{key}", x))
    for arg, x in grads.items():
        arrays.update(_flat(f"grad.{arg}", x))
    if where is not None:
        arrays["where.out"] = where
    function, conventions = FIXTURES[name]
    entry = {"file": f"{name}.npz", "function": f"minirlhf.{function}", "conventions": conventions,
             "scalars": {k: v for k, v in inputs.items() if np.ndim(v) == 0 and not isinstance(v, dict)},
             "inputs": sorted(inputs), "outputs": sorted(k for k in arrays if k.startswith("out")),
             "gradients": sorted({k.split(":")[0] for k in arrays if k.startswith("grad.")})}
    return arrays, entry


def write_fixtures(out_dir, names=None):
    """Write every fixture (or those in names) and index.json into out_dir. Returns the index."""
    table = REFERENCE(CFG)
    names = [n for n in FIXTURES if n in table and (names is None or n in names)]
    os.makedirs(out_dir, exist_ok=True)
    index = {"config": vars(CFG), "conventions": CONVENTIONS, "fixtures": {}}
    for name in names:
        arrays, index["fixtures"][name] = build(name, table)
        save_npz(os.path.join(out_dir, f"{name}.npz"), arrays)
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    return index


def load(path):
    """One fixture as (inputs, out, dout, grads, where): nested dicts rebuilt, 0-d inputs as Python scalars."""
    parts = {"in": {}, "out": {}, "grad": {}}
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key, x in arrays.items():
        kind, _, rest = key.partition(".")
        if kind not in parts:
            continue
        top, _, sub = rest.partition(":")
        if sub:
            parts[kind].setdefault(top, {})[sub] = x
        else:
            parts[kind][top] = x.item() if kind == "in" and x.ndim == 0 else x
    out = arrays.get("out", parts["out"])
    return parts["in"], out, arrays.get("dout"), parts["grad"], arrays.get("where.out")


def compare(path, forward, vjp=None, tol=1e-10):
    """Check a port against one fixture: output (and gradients, given vjp) within tol (1 + |expected|).

    Returns {"out": error, "grad.<arg>[:<key>]": error, ...} with error = max |a - b| / (1 + |b|).
    """
    inputs, out, dout, grads, where = load(path)
    errors, got = {}, forward(**inputs)
    pairs = [("out", got, out)] if not isinstance(out, dict) else [(f"out.{k}", got[k], out[k]) for k in out]
    if vjp is not None and grads:
        g = vjp(dout, **inputs)  # ppo_minibatch has no dout: its gradients are of loss_policy + loss_value
        for name, expected in grads.items():
            if isinstance(expected, dict):
                pairs += [(f"grad.{name}:{k}", g[name][k], e) for k, e in expected.items()]
            else:
                pairs.append((f"grad.{name}", g[name], expected))
    for label, a, e in pairs:
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if label == "out" and where is not None:
            a, e = a[where], e[where]
        assert_close(a, e, tol, f"{os.path.basename(path)} {label}")
        errors[label] = float(np.max(np.abs(a - e) / (1 + np.abs(e)), initial=0.0))
    return errors


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write minirlhf's golden fixtures (.npz and index.json).")
    ap.add_argument("--out", required=True, help="directory to write into")
    ap.add_argument("--only", nargs="+", choices=sorted(FIXTURES), help="write only these fixtures")
    args = ap.parse_args(argv)
    index = write_fixtures(args.out, args.only)
    size = sum(os.path.getsize(os.path.join(args.out, e["file"])) for e in index["fixtures"].values())
    print(f"wrote {len(index['fixtures'])} fixtures ({size / 1024:.1f} KB) and index.json to {args.out}")


if __name__ == "__main__":
    main()
