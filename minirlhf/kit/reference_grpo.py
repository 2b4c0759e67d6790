"""The critic-free methods and LoRA in the kit's calling convention (reference.py states it), and the inputs
of their golden fixtures.

Most functions are called as minirlhf's own forward/backward pairs (grpo_objective.py, lora.py). The few the
kit calls otherwise:
    token_weights  forward(mask, max_len, n_rows, n_tokens) -> {aggregator: c (B, T)}: every aggregator's
                   per-token gradient weight c_it on one batch, the number a porter compares
    lora_linear    forward(x, W0, b, A, B, alpha, rslora) -> y; vjp -> {x, b, A, B} (W0 is frozen: none)
    lora_merge     forward(W0, A, B, alpha, rslora) -> {"merged": W0 + s A B, "restored": unmerge(merged)}
    lora_model     forward(params, adapter, tokens, mask, alpha, rslora) -> logits (B, T, V); adapter maps
                   "h{l}.<layer>.lora_A" (d_in, r) and ".lora_B" (r, d_out) to arrays and names the layers
                   adapted; adapter None is the adapter switched off, the base itself (the reference of PPO
                   and DPO); vjp -> {"adapter": {name: gradient}}, the adapter's weights only
    lora_init      init(d_in, d_out, rank, seed) -> {"A": (d_in, r), "B": (r, d_out)}, a fresh adapter's
                   layer (a statistical check, no fixture)
LoRA's inputs carry alpha and the rsLoRA flag, not the scale: s = alpha / r, or alpha / sqrt(r), with r A's
second axis, is part of what a port must get right.

The fixtures reach the edges a port most often gets wrong: group ids in no order and of unequal sizes, a
group of one and groups of equal rewards whose mean rounds (so that only an exact-zero rule gives 0), G = 2
(where ddof moves A by sqrt 2), both clip branches with eps_low != eps_high and ratios between the two
bounds, a log-ratio of 21 (no clamp), KL log-ratios of +-50 (no clamp of k3), rows of different lengths and
one with no valid token (where the aggregators differ), a micro-batch normalised by its whole batch, L_max
above the padded width, square LoRA layers (where a transpose raises no shape error) and the rsLoRA scale.
"""
import numpy as np

from .. import grpo_objective as go
from .. import lora
from .. import transformer as tf
from .inputs import FIXTURE_MODEL, tiny_model

AGGREGATORS = go.AGGREGATORS


def token_weights_all(mask, max_len, n_rows, n_tokens):
    """{aggregator: grpo_objective.token_weights (B, T)} for every aggregator on one batch."""
    return {kind: go.token_weights(mask, kind, max_len, n_rows, n_tokens) for kind in AGGREGATORS}


# ---------------------------------------------------------------- LoRA

def lora_scale(alpha, rank, rslora):
    """s of an adapter of this rank: lora.LoRAConfig's scale (alpha / r, or alpha / sqrt(r))."""
    return lora.LoRAConfig(rank=int(rank), alpha=float(alpha), rslora=bool(rslora)).scale


def lora_linear_pair():
    def fwd(x, W0, b, A, B, alpha, rslora):
        return lora.lora_linear_forward(x, W0, b, A, B, lora_scale(alpha, A.shape[1], rslora))

    def forward(**kw):
        return fwd(**kw)[0]

    def vjp(dout, **kw):
        dx, db, dA, dB = lora.lora_linear_backward(np.asarray(dout), fwd(**kw)[1])
        return {"x": dx, "b": db, "A": dA, "B": dB}
    return forward, vjp


def lora_merge(W0, A, B, alpha, rslora):
    s = lora_scale(alpha, A.shape[1], rslora)
    merged = lora.merge(W0, A, B, s)
    return {"merged": merged, "restored": lora.unmerge(merged, A, B, s)}


def as_adapter(adapter, alpha, rslora):
    """The kit's adapter dict as a lora.Adapter: the rank from A's shape, the targets from the names."""
    names = [k[:-len(".lora_A")] for k in adapter if k.endswith(".lora_A")]
    rank = adapter[names[0] + ".lora_A"].shape[1]
    targets = tuple({name.split(".", 1)[1] for name in names})
    cfg = lora.LoRAConfig(rank=int(rank), alpha=float(alpha), targets=targets, rslora=bool(rslora))
    return lora.Adapter(dict(adapter), cfg, base="")


def lora_model_pair(model_cfg):
    """(forward, vjp) of a LoRA policy's logits through lora.adapted_forward / adapted_backward; adapter None:
    transformer.forward of the base parameters."""
    def run(params, adapter, tokens, mask, alpha, rslora):
        if adapter is None:  # the adapter switched off: the base model itself
            return tf.forward(params, model_cfg, tokens, mask)
        policy = tf.Policy(params, model_cfg, adapter=as_adapter(adapter, alpha, rslora))
        return lora.adapted_forward(policy, tokens, mask)

    def forward(**kw):
        return run(**kw)[0]

    def vjp(dout, **kw):
        return {"adapter": lora.adapted_backward(np.asarray(dout), run(**kw)[1])}
    return forward, vjp


def lora_init(d_in, d_out, rank, seed):
    """lora.init_adapter's A and B for a layer (d_in, d_out) (here the MLP's first layer of a model of width
    d_in, so d_out = 4 d_in), with rng = np.random.default_rng(seed)."""
    if d_out != 4 * d_in:
        raise ValueError(f"minirlhf's adapter of an MLP layer has d_out = 4 d_in, got {d_in}, {d_out}")
    cfg = tf.GPTConfig(vocab_size=3, n_ctx=1, n_layer=1, n_head=1, n_embd=int(d_in))
    base = tf.init_params(cfg, np.random.default_rng(0), np.float64)
    adapter = lora.init_adapter(base, cfg, lora.LoRAConfig(int(rank), targets=("mlp.w_fc",)),
                                np.random.default_rng(seed))
    return {"A": adapter.weights["h0.mlp.w_fc.lora_A"], "B": adapter.weights["h0.mlp.w_fc.lora_B"]}


def random_adapter(r, params, model_cfg, rank, targets=lora.TARGETS, b_scale=0.3):
    """{name: array} for every block's targets: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B ~ b_scale N(0, 1)
    (b_scale 0: a fresh adapter)."""
    out = {}
    for name, (d_in, d_out) in lora.adapted_layers(model_cfg, lora.LoRAConfig(rank, targets=targets)).items():
        out[f"{name}.lora_A"] = r.uniform(-1, 1, (d_in, rank)) / np.sqrt(d_in)
        out[f"{name}.lora_B"] = b_scale * r.standard_normal((rank, d_out))
    return out


# ---------------------------------------------------------------- the fixtures' inputs

def grouped_rewards(r, singleton=True):
    """(rewards (B,), group ids (B,)) in a shuffled order: id 7 seven equal rewards 1234.567 (their mean
    rounds: r - mean is 2.3e-13, not 0), id 11 three of 0.1 (np.std of them is 1.4e-17, not 0), id 2 a
    group of two (ddof moves A by sqrt 2), id 5 four spread rewards, and id 3 a group of one."""
    parts = [(7, np.full(7, 1234.567)), (11, np.full(3, 0.1)), (2, np.array([0.3, -1.2])),
             (5, r.uniform(-2, 2, 4))] + ([(3, np.array([0.8]))] if singleton else [])
    ids = np.concatenate([np.full(len(v), g) for g, v in parts])
    rewards = np.concatenate([v for _, v in parts])
    order = r.permutation(len(ids))
    return rewards[order], ids[order]


def advantage_inputs(kind):
    def inputs(r, off):
        rewards, groups = grouped_rewards(r, singleton=kind != "rloo")
        return {"rewards": rewards, "groups": groups, **({"ddof": 1, "eps": 1e-4} if kind == "grpo" else {})}
    return inputs


def overlong_inputs(r, off):
    return {"lengths": np.array([0, 12, 25, 26, 27, 29, 31, 32, 35]), "max_len": 32, "cache_len": 6}


RESPONSES = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])  # lengths 5, 3, 1, 4


def reinforce_pp_inputs(baseline):
    def inputs(r, off):
        mask = np.concatenate([RESPONSES, RESPONSES[1:3]])  # 6 rows
        logp, logp_ref = (np.where(mask > 0, r.uniform(-3, 0, mask.shape), np.nan) for _ in range(2))
        return {"scores": r.standard_normal(6), "logp": logp, "logp_ref": logp_ref, "mask": mask, "kl_coef": 0.1,
                "groups": np.array([4, 1, 4, 1, 4, 9]), "baseline": baseline}  # group 9: a group of one
    return inputs


def token_loss_inputs(r, off):
    """Ratios 1.6 and 1.24 with A > 0 (clipped above 1 + eps_high = 1.28; unclipped only with clip-higher),
    0.5 and 0.76 with A < 0 (clipped below 1 - eps_low = 0.8; 0.76 unclipped with eps_high on both sides),
    0.76 with A > 0 and 1.24 with A < 0 (unclipped), ratio 1, e^21 with A < 0 (no clamp) and e^-21."""
    ratios = np.array([[1.6, 1.24, 0.76, 1.0, 1.1], [0.5, 0.76, 1.24, 0, 0], [np.exp(21.0), 0, 0, 0, 0],
                       [np.exp(-21.0), 0.9, 1.24, 1.6, 0]])
    sign = np.array([[1, 1, 1, -1, 1], [-1, -1, -1, 1, 1], [-1, 1, 1, 1, 1], [1, -1, 1, -1, 1]])
    logp = np.where(RESPONSES > 0, r.uniform(-3, -0.5, RESPONSES.shape), 0.7)  # finite garbage at padding
    log_ratio = np.log(np.where(RESPONSES > 0, ratios, 1.0))
    return {"logp": logp, "logp_old": logp - log_ratio, "advantages": sign * r.uniform(0.3, 1.5, sign.shape),
            "mask": RESPONSES, "eps_low": 0.2, "eps_high": 0.28}


def sequence_loss_inputs(ratio):
    """Per-row log-ratios whose mean (GSPO, eps 3e-4 / 4e-4) or sum (eps 0.2 / 0.28) is set: inside the
    clip range between the two bounds with A > 0 (unclipped only with clip-higher), above it with A > 0,
    below it with A < 0, inside it, a row with no valid token, below it with A > 0 (unclipped); the
    tokens' own log-ratios spread by 0.05 around it (a token-level ratio is far off)."""
    def inputs(r, off):
        mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
        lengths = np.maximum(mask.sum(1), 1)
        eps = (3e-4, 4e-4) if ratio == "mean" else (0.2, 0.28)
        target = np.array([3.5e-4, 2e-3, -3.5e-4, 1e-4, 0.0, -2e-3]) if ratio == "mean" else \
            np.array([0.22, 0.5, -0.26, 0.05, 0.0, -0.5])
        adv = np.array([1.0, 0.8, -1.2, -0.6, 0.9, 1.1]) * r.uniform(0.7, 1.3, 6)
        noise = np.where(mask > 0, 0.05 * r.standard_normal(mask.shape), 0)
        noise -= mask * noise.sum(1, keepdims=True) / lengths[:, None]  # zero-sum over each row's tokens
        per_token = target if ratio == "mean" else target / lengths  # the mean, or the sum, is the target
        logp = np.where(mask > 0, r.uniform(-3, -0.5, mask.shape), 0.7)
        return {"logp": logp, "logp_old": logp - mask * (per_token[:, None] + noise), "advantages": adv,
                "mask": mask, "eps_low": eps[0], "eps_high": eps[1], "ratio": ratio}
    return inputs


def reinforce_loss_inputs(r, off):
    return {"logp": np.where(RESPONSES > 0, r.uniform(-3, -0.1, RESPONSES.shape), 0.7),
            "advantages": r.choice([-1.0, 1.0], 4) * r.uniform(0.3, 1.5, 4), "mask": RESPONSES}


# a micro-batch of 4 rows (lengths 5, 2, 0, 1: 8 tokens) of a batch of 8 rows and 19 tokens, L_max 6 > T = 5
MICRO = {"mask": np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]), "max_len": 6,
         "n_rows": 8, "n_tokens": 19}


def token_weights_inputs(r, off):
    return dict(MICRO)


def aggregate_inputs(r, off):
    losses = np.where(MICRO["mask"] > 0, r.standard_normal(MICRO["mask"].shape), 0.7)  # finite garbage
    return {"losses": losses, **MICRO, "kind": "seq_mean_token_mean"}


def kl_loss_inputs(kind):
    """d = logp - logp_ref of +-50 (no clamp, k3 = e^50 - 51 without overflow), +-12, 1e-3 and 0; for rho_k3
    logp_old off logp by 0.05, 0.5 and 3, and d within +-12: autograd's gradient of rho k3 is the difference
    rho k3 + rho (1 - e^-d) of two terms of size rho e^-d, so that beyond it two correct implementations
    differ by more than 1e-10 (at d = -50 autograd's is off by its whole value, rho d)."""
    def inputs(r, off):
        mask = RESPONSES[:3]
        d = np.array([[-50.0, -2.0, 0.0, 1e-3, 50.0], [0.7, -0.3, 12.0, 0, 0], [-12.0, 0, 0, 0, 0]])
        d = np.clip(d, -12, 12) if kind == "rho_k3" else d
        logp = np.where(mask > 0, r.uniform(-3, -0.5, mask.shape), 0.7)
        out = {"logp": logp, "logp_ref": np.where(mask > 0, logp - d, -0.4), "mask": mask, "kind": kind}
        if kind == "rho_k3":
            out["logp_old"] = logp - np.where(mask > 0, r.choice([-3, -0.5, -0.05, 0.05, 0.5, 3], mask.shape), 0)
        return out
    return inputs


def lora_linear_inputs(r, off):
    """d_in 4, d_out 6, rank 2, alpha 3 with rsLoRA: s = 3 / sqrt 2 (alpha / r would be 1.5)."""
    return {"x": r.standard_normal((2, 3, 4)) + 0.1, "W0": r.standard_normal((4, 6)), "b": r.standard_normal(6),
            "A": r.uniform(-0.5, 0.5, (4, 2)), "B": r.standard_normal((2, 6)), "alpha": 3.0, "rslora": True}


def lora_merge_inputs(r, off):
    """A square W0 (4, 4) (a transposed update raises no shape error), rank 3, alpha 2: s = 2 / 3."""
    return {"W0": r.standard_normal((4, 4)), "A": r.uniform(-0.5, 0.5, (4, 3)), "B": r.standard_normal((3, 4)),
            "alpha": 2.0, "rslora": False}


def lora_model_inputs(r, off):
    """Every linear layer of the fixture model adapted (attention's output projection is square), rank 2,
    alpha 4: s = 2; B != 0; a full, a left-padded and a right-padded row."""
    params = tiny_model(FIXTURE_MODEL, 9)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    return {"params": params, "adapter": random_adapter(r, params, FIXTURE_MODEL, 2), "mask": mask,
            "tokens": r.integers(0, FIXTURE_MODEL.vocab_size, mask.shape), "alpha": 4.0, "rslora": False}
