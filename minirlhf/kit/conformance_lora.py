"""The conformance kit, part 4: LoRA (lora.py). The adapted linear layer and its gradients, merge and unmerge,
a fresh adapter's init, and the adapted model's identities: at B = 0 the adapted logits ARE the base's, bit
for bit, and dL/dA = 0 exactly; the adapter switched off gives the base itself (the reference of PPO and DPO,
no copy), however the adapter was used before; the port adapts exactly the layers the adapter names. The
calling convention (reference_grpo.py states LoRA's), the padding rules and what a failure says:
conformance.py.

The scale is the port's own to work out: the inputs carry alpha and the rsLoRA flag, and the rank is A's
second axis. The checks use square layers too (d_in = d_out, as attention's output projection), where a
transposed update raises no shape error.
"""
import numpy as np
from hypothesis import strategies as st
from scipy.stats import kstest

from .conformance import compare, hold, named
from .gradcheck import EPS64, MODEL_TOL, OP_TOL, rounding_tol, vjp_errors
from .inputs import KIT_MODEL, tiny_model
from .reference_grpo import random_adapter
from .registry import reference

MODEL_ENTRIES = 4  # entries checked per adapter weight (16 weights in the kit's model: 256 forward passes)


def _layer(r, rank, square, b_scale=1.0):
    d_in, d_out = 4, 4 if square else 6
    return {"x": r.standard_normal((2, 3, d_in)) + 0.1, "W0": r.standard_normal((d_in, d_out)),
            "b": r.standard_normal(d_out), "A": r.uniform(-1, 1, (d_in, rank)) / 2,
            "B": b_scale * r.standard_normal((rank, d_out))}


def _frozen_base(grads, what):
    """The vjp returns no gradient for the frozen weights, or only zeros."""
    for key in ("W0", "params"):
        g = grads.get(key)
        if g is None:
            continue
        values = g.values() if isinstance(g, dict) else [g]
        assert not any(np.any(np.asarray(v)) for v in values if v is not None), (
            f"{what}: the vjp returns a non-zero gradient for {key}; the base is frozen, only the adapter trains "
            f"[lora_frozen_base]")


@named("lora_linear")
def check_lora_linear(forward, vjp=None, max_examples=20):
    """y = x W0 + b + s (x A) B, s = alpha / r (rsLoRA: alpha / sqrt(r)), on square and non-square layers; at
    B = 0 dA = 0 exactly and dB != 0; no gradient for W0; every gradient against finite differences."""
    def prop(args):
        seed, rank, rslora, square = args
        r = np.random.default_rng(seed)
        alpha = float(r.uniform(0.5, 8.0))
        inputs = {**_layer(r, rank, square), "alpha": alpha, "rslora": rslora}
        x, W0, b, A, B = (inputs[k] for k in ("x", "W0", "b", "A", "B"))
        s = alpha / (np.sqrt(rank) if rslora else rank)
        expected = x @ W0 + b + s * (x @ A) @ B
        magnitude = np.abs(x).max() * (np.abs(W0).sum(0).max() + s * (np.abs(A) @ np.abs(B)).sum(0).max()) + 2
        compare("lora_linear", forward(**inputs), expected, rounding_tol(W0.shape[0] + rank + 2, magnitude),
                f"x W0 + b + s (x A) B at rank {rank}, alpha {alpha:.3g}{', rsLoRA' if rslora else ''}: s = {s:.4g}, "
                f"{'square' if square else '(4, 6)'} layer [lora_scale, lora_layout]", inputs)
    hold(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 3), st.booleans(), st.booleans()), prop, max_examples)
    if vjp is None:
        return {}
    r = np.random.default_rng(22)
    fresh = {**_layer(r, 2, False, b_scale=0.0), "alpha": 4.0, "rslora": False}
    g = vjp(r.standard_normal((2, 3, 6)), **fresh)
    _frozen_base(g, "the adapted layer")
    assert np.all(np.asarray(g["A"]) == 0) and np.any(np.asarray(g["B"])), (
        "at B = 0, dL/dA = s x^T (g B^T) is exactly 0 and dL/dB is not: the first step moves B alone "
        "[lora_reference_is_base]")
    inputs = {**_layer(r, 2, True), "alpha": 3.0, "rslora": True}
    return vjp_errors(forward, vjp, inputs, ["x", "b", "A", "B"], OP_TOL)


@named("lora_merge")
def check_lora_merge(forward, max_examples=20):
    """forward(W0, A, B, alpha, rslora) -> {merged: W0 + s A B, restored: the port's unmerge of it}: the
    restored weight is W0 up to one rounding each way (both ways computing s A B, perhaps in another order),
    and at B = 0 both are W0 bit for bit."""
    def prop(args):
        seed, rank, rslora, square = args
        r = np.random.default_rng(seed)
        alpha = float(r.uniform(0.5, 8.0))
        layer = _layer(r, rank, square)
        inputs = {"W0": layer["W0"], "A": layer["A"], "B": layer["B"], "alpha": alpha, "rslora": rslora}
        s = alpha / (np.sqrt(rank) if rslora else rank)
        delta = s * layer["A"] @ layer["B"]
        size = np.abs(layer["W0"]) + s * np.abs(layer["A"]) @ np.abs(layer["B"])  # the terms' sizes
        out = forward(**inputs)
        compare("lora_merge", out, {"merged": layer["W0"] + delta}, rounding_tol(rank + 2, size.max()),
                f"W0 + s A B at rank {rank}, alpha {alpha:.3g}{', rsLoRA' if rslora else ''} [lora_scale, "
                f"lora_layout, lora_merge]", inputs, key="merged")
        err = np.abs(np.asarray(out["restored"], np.float64) - layer["W0"])
        assert np.all(err <= 2 * (rank + 2) * EPS64 * size), (
            f"unmerge(merge(W0)) is W0 up to rounding: off by {err.max():.3g} (s A B subtracted with another "
            f"scale, or another update?) [lora_merge]")
        zero = {**inputs, "B": np.zeros_like(layer["B"])}
        again = forward(**zero)
        assert all(np.array_equal(again[k], layer["W0"]) for k in ("merged", "restored")), (
            "at B = 0, merge and unmerge give W0 bit for bit [lora_merge]")
    return hold(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 3), st.booleans(), st.booleans()), prop,
                max_examples)


SCORED = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # full, left-padded, right-padded rows


@named("lora_model")
def check_lora_model(forward, vjp=None, model_cfg=KIT_MODEL, max_examples=None):
    """forward(params, adapter, tokens, mask, alpha, rslora) -> logits, adapter None: the adapter switched off.
    Checked: the adapted logits against minirlhf's (every layer, and two layers only; alpha / r and rsLoRA);
    the adapter off gives the base; at B = 0 the adapted logits equal the port's base bit for bit; using the
    adapter leaves the base's parameters and the reference bit for bit as they were; given vjp, the
    gradients are the adapter's only, dL/dA = 0 exactly at B = 0, and every adapter weight's gradient
    against finite differences."""
    r = np.random.default_rng(23)
    params = tiny_model(model_cfg, 2)
    before = {k: v.copy() for k, v in params.items()}
    mask, real = SCORED, SCORED > 0
    tokens = r.integers(0, model_cfg.vocab_size, mask.shape)
    ref = reference("lora_model", model_cfg)[0]
    run = {"params": params, "tokens": tokens, "mask": mask}

    def logits(adapter, alpha=3.0, rslora=False):
        return np.asarray(forward(**run, adapter=adapter, alpha=alpha, rslora=rslora), np.float64)

    base = logits(None)
    compare("lora_model", np.where(real[..., None], base, 0), np.where(real[..., None], ref(**run, adapter=None,
            alpha=3.0, rslora=False), 0), 1e-10, "the adapter switched off gives the base model's logits "
            "[lora_reference_is_base]")
    for targets, rank, alpha, rslora in (((), 2, 3.0, False), (("attn.w_proj", "mlp.w_fc"), 3, 2.0, True)):
        adapter = random_adapter(r, params, model_cfg, rank, **({"targets": targets} if targets else {}))
        inputs = {**run, "adapter": adapter, "alpha": alpha, "rslora": rslora}
        compare("lora_model", np.where(real[..., None], logits(adapter, alpha, rslora), 0),
                np.where(real[..., None], ref(**inputs), 0), 1e-10, f"the adapted logits, rank {rank}, alpha "
                f"{alpha:g}{', rsLoRA' if rslora else ''}, {'every linear layer' if not targets else targets} "
                f"adapted [lora_scale, lora_layout]", inputs, model_cfg)
    fresh = {k: (v if k.endswith("lora_A") else np.zeros_like(v)) for k, v in adapter.items()}
    assert np.array_equal(logits(fresh, 2.0, True)[real], base[real]), (
        "at B = 0 the adapted logits must equal the base's bit for bit (y = x W0 + b, nothing added): the "
        "starting policy IS the reference [lora_reference_is_base]")
    assert all(np.array_equal(params[k], before[k]) for k in params) and np.array_equal(logits(None)[real],
                                                                                     base[real]), (
        "using the adapter changed the base's parameters or the logits with the adapter off (merged in place "
        "and unmerged?): the reference must stay the base bit for bit [lora_reference_is_base]")
    if vjp is None:
        return {}
    dout = np.where(real[..., None], r.standard_normal(base.shape), 0)
    g = vjp(dout, **run, adapter=fresh, alpha=2.0, rslora=True)
    _frozen_base(g, "the adapted model")
    assert set(g["adapter"]) == set(fresh), f"gradients for {sorted(g['adapter'])}, expected {sorted(fresh)}"
    assert all(not np.any(g["adapter"][k]) for k in fresh if k.endswith("lora_A")) and any(
        np.any(g["adapter"][k]) for k in fresh if k.endswith("lora_B")), (
        "at B = 0, dL/dA is exactly 0 for every adapted layer and dL/dB is not [lora_reference_is_base]")
    adapter = random_adapter(r, params, model_cfg, 2)
    inputs = {**run, "adapter": adapter, "alpha": 3.0, "rslora": False}
    return vjp_errors(forward, vjp, inputs, ["adapter"], MODEL_TOL, where=real[..., None],
                      max_entries=MODEL_ENTRIES)


@named("lora_init")
def check_lora_init(init, d_in=48, rank=8, n_seeds=16, alpha=1e-6, max_examples=None):
    """init(d_in, d_out, rank, seed) -> {"A": (d_in, r), "B": (r, d_out)}: B = 0 exactly (so the adapted model
    starts as the base); A drawn from U(-1/sqrt(d_in), 1/sqrt(d_in)), kaiming-uniform with a = sqrt 5 of PEFT's
    lora_A.weight (r, d_in), whose fan-in is d_in: every |A| within the bound, and the pooled draws of n_seeds
    seeds against the uniform law by a Kolmogorov-Smirnov test at level alpha; the same seed gives the same A,
    another seed another."""
    d_out, bound = 4 * d_in, 1 / np.sqrt(d_in)
    draws = [init(d_in=d_in, d_out=d_out, rank=rank, seed=seed) for seed in range(n_seeds)]
    for w in draws:
        A, B = np.asarray(w["A"], np.float64), np.asarray(w["B"])
        assert A.shape == (d_in, rank) and B.shape == (rank, d_out), (
            f"A {A.shape}, B {B.shape}: expected A (d_in, r) = {(d_in, rank)}, B (r, d_out) = {(rank, d_out)} "
            f"(PEFT's lora_A.weight is A.T) [lora_layout]")
        assert not np.any(B), "B must start at 0: then the adapted model is the base and KL 0 [lora_init]"
        assert np.abs(A).max() <= bound * (1 + 4 * EPS64), (
            f"|A| up to {np.abs(A).max():.4g}, beyond 1/sqrt(d_in) = {bound:.4g}: kaiming-uniform with a = sqrt 5 "
            f"of fan-in d_in (torch's fan-in of a (d_in, r) tensor is r: initialise A.T) [lora_init]")
    again = np.asarray(init(d_in=d_in, d_out=d_out, rank=rank, seed=0)["A"])
    assert np.array_equal(again, draws[0]["A"]) and not np.array_equal(draws[0]["A"], draws[1]["A"]), (
        "the same seed must give the same A bit for bit, another seed another A")
    pooled = np.concatenate([np.asarray(w["A"], np.float64).ravel() for w in draws]) / bound
    pvalue = kstest(pooled, "uniform", args=(-1, 2)).pvalue
    assert pvalue > alpha, (f"A * sqrt(d_in) is not U(-1, 1) (Kolmogorov-Smirnov p = {pvalue:.2g} < {alpha:g}): "
                            f"PEFT's default init is kaiming-uniform with a = sqrt 5 [lora_init]")
    return {}

