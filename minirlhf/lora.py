"""LoRA, the lesson after RLHF: fine-tune a frozen model through low-rank updates of its weights, and run
RLHF without a second copy of the model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv 2106.09685).

A linear layer written x W (minirlhf's (in, out) layout) keeps its weight W0 frozen and learns a rank-r
update A B beside it (d_in = in, d_out = out, N rows of x):

    y = x W0 + b + s (x A) B        A (d_in, r), B (r, d_out), s = alpha / r
                                    (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732: s = alpha / sqrt(r))

Gradients, with g = dL/dy (N, d_out) and h = x A (N, r). y reads B through s h B, so dB = s h^T g. It reads
h through the same product, dh = s g B^T, and h = x A gives dA = x^T dh; x feeds both branches, so its
gradient is the sum of the frozen layer's and the adapter's:

    dB = s (x A)^T g        dA = s x^T (g B^T)        dx = g W0^T + s (g B^T) A^T        db = sum_rows g

W0 gets no gradient: x^T g, one of the two big products of a linear layer's backward, is never computed.
The bias and the LayerNorms stay frozen too (PEFT's bias="none"), so the adapter keeps only dA and dB.

Init (PEFT's default, init_lora_weights=True): A kaiming-uniform with a = sqrt(5), the nn.Linear default:
gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound gain sqrt(3 / fan_in) = 1 / sqrt(d_in), so A ~ U(-1/sqrt(d_in),
1/sqrt(d_in)); B = 0. init="gaussian" draws A ~ N(0, 1/r^2), PEFT's reading of the paper's "random
Gaussian". With B = 0 the adapted model IS the base, bit for bit: its KL to the base is exactly 0, PPO's
first ratio exactly 1, and dL/dA = s x^T (g B^T) = 0 exactly, so the first step moves B alone.

Parameters. An adapted (d_in, d_out) layer trains r (d_in + d_out) numbers instead of d_in d_out; a block's
four linear layers (C = n_embd) train r (4C + 2C + 5C + 5C) = 16 r C.

Which layers. `targets` picks among the four linear layers of every block; all four by default, as "LoRA
Without Regret" (Schulman and Thinking Machines 2025) advises (adapting attention alone falls short, the
MLP matters). The token embedding is not adapted: minirlhf ties it to the LM head, so one update would
serve two roles (a row lookup and the output projection, its gradient the sum of both), it is a lookup
rather than a product x W, and at a vocabulary of 46 it holds few parameters. PEFT does not target
embeddings by default either.

Merge. W = W0 + s A B makes a plain model that costs nothing extra to run; unmerge subtracts s A B again.
The two are equal in exact arithmetic, not bit for bit: each cycle rounds W once on the way out and once
back. Measured (demos/lora_rank.py, 1000 cycles of h0.mlp.w_fc with the trained rank-16 adapter, weights up
to 0.76; demos/README.md has the commit): with the same adapter every cycle, W sits at a fixed point after
the first one, half an ulp from W0 (one ulp in float16); with an adapter that changes a little between
cycles (training between merges for generation) the roundings add up like a random walk: 23-37 ulps after
1000 cycles, 2.2e-6 in float32, 1.2e-2 in float16, 3.6e-15 in float64.

RLHF without a second model. The reference of PPO's KL penalty and of DPO is the base with the adapter
switched off, which is `policy.params` itself: no copy of the model, and the optimiser's state covers the
adapter alone. That is right only because the adapter starts at B = 0, where policy and base coincide;
an adapter that starts anywhere else (loaded to go on training, or initialised with B != 0) makes the
starting policy a different model from the base, and the KL would measure the distance from the wrong one.

How it plugs in. transformer.py runs its own math unchanged on a view: `wrap` turns each adapted weight
into a LoRAWeight (W0, A, B, s) and the ops' linear_forward / linear_backward into ones that know it.
`adapted_forward` / `adapted_backward` are what transformer.policy_forward / policy_backward call for a
policy with an adapter. An adapter file holds the adapter alone, with its config and a fingerprint of the
base it was made for; loading it onto any other base is refused.
"""
import hashlib
import json
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from . import fast
from . import layers
from . import transformer as tf
from . import validate as V
from .checkpoint import META, read_npz, atomic_write

TARGETS = ("attn.w_qkv", "attn.w_proj", "mlp.w_fc", "mlp.w_proj")  # the linear layers of a block
INITS = ("kaiming_uniform", "gaussian")  # A's init: PEFT's default, or N(0, 1/r^2)
KIND = "minirlhf.lora_adapter"  # the __meta__ "kind" of an adapter file


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8  # r of every update A B; 1 <= r <= min(d_in, d_out) of each adapted layer (PEFT's default 8)
    alpha: float = 8.0  # the update is scaled by s = alpha / r (PEFT's default 8, so s = 1 at r = 8)
    targets: tuple = TARGETS  # the linear layers of every block that get an adapter (kept in TARGETS order)
    rslora: bool = False  # True: s = alpha / sqrt(r), rank-stabilised LoRA
    init: str = "kaiming_uniform"  # A's init, one of INITS (B always starts at 0)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be an integer >= 1, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.integer, np.floating))
                or not (np.isfinite(self.alpha) and self.alpha > 0)):
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)) or not self.targets:
            raise ValueError(f"LoRAConfig.targets must be a non-empty tuple of layer names from {TARGETS}, "
                             f"got {self.targets!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"LoRAConfig.targets: {unknown} match no layer; a block's linear layers are {TARGETS}")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"LoRAConfig.rslora must be True or False, got {self.rslora!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scale(self):
        """s = alpha / r, or alpha / sqrt(r) with rslora, as a Python float (float32 stays float32)."""
        return self.alpha / (float(np.sqrt(self.rank)) if self.rslora else self.rank)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: the arrays that train, how they were made, and the base model they belong to."""
    weights: dict  # "h{l}.<target>.lora_A" (d_in, r) and "h{l}.<target>.lora_B" (r, d_out), trained in place
    config: LoRAConfig  # rank, alpha, targets, rslora, init
    base: str  # fingerprint(base parameters, model config) of the base it was made for


def adapted_layers(model_cfg, lora_cfg):
    """{"h{l}.<target>": (d_in, d_out)} of every adapted layer, in a fixed order. ValueError if the rank
    exceeds min(d_in, d_out) of one of them (a rank-r product of those shapes has rank <= that)."""
    shapes = tf.param_shapes(model_cfg)
    out = {f"h{l}.{t}": shapes[f"h{l}.{t}"] for l in range(model_cfg.n_layer) for t in lora_cfg.targets}
    for name, (d_in, d_out) in out.items():
        if lora_cfg.rank > min(d_in, d_out):
            raise ValueError(f"LoRAConfig.rank={lora_cfg.rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of "
                             f"{name} {(d_in, d_out)}")
    return out


def fingerprint(params, model_cfg):
    """sha256 of the model config and of every transformer parameter's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(vars(model_cfg), sort_keys=True).encode())
    for name, shape in tf.param_shapes(model_cfg).items():
        if name not in params or np.shape(params[name]) != shape:
            raise ValueError(f"base parameters do not fit the model config: {name} is "
                             f"{'missing' if name not in params else np.shape(params[name])}, expected {shape}")
        x = np.ascontiguousarray(params[name])  # the array itself when contiguous: hashed without a copy
        h.update(f"{name} {x.dtype.str} {x.shape}".encode())
        h.update(x)
    return "sha256:" + h.hexdigest()


def init_adapter(base_params, model_cfg, lora_cfg, rng):
    """A fresh adapter for a base model: A drawn as lora_cfg.init says, B = 0, in the base's dtype. Every
    argument is checked before the first draw, so a refused call leaves rng where it was."""
    if not isinstance(lora_cfg, LoRAConfig):
        raise ValueError(f"lora_cfg must be a LoRAConfig, got {type(lora_cfg).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    layer_shapes, base = adapted_layers(model_cfg, lora_cfg), fingerprint(base_params, model_cfg)
    dtype, r = base_params["wte"].dtype, lora_cfg.rank
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"base parameters must be floating point, got {dtype}")
    weights = {}
    for name, (d_in, d_out) in layer_shapes.items():
        if lora_cfg.init == "kaiming_uniform":
            bound = 1.0 / np.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)): sqrt(1/3) * sqrt(3 / d_in)
            A = rng.uniform(-bound, bound, (d_in, r))
        else:
            A = rng.standard_normal((d_in, r)) / r
        weights[f"{name}.lora_A"], weights[f"{name}.lora_B"] = A.astype(dtype), np.zeros((r, d_out), dtype)
    return Adapter(weights, lora_cfg, base)


def lora_policy(policy, lora_cfg, rng):
    """The policy with a fresh adapter attached: the same Policy otherwise, its params the very same dict
    (the frozen base, not copied), which is also the reference for PPO and DPO."""
    if policy.adapter is not None:
        raise ValueError("the policy already carries an adapter (merge it first: merge_adapter)")
    return replace(policy, adapter=init_adapter(policy.params, policy.model_cfg, lora_cfg, rng))


def n_trainable(adapter):
    """The number of numbers the adapter trains: sum over adapted layers of r (d_in + d_out)."""
    return sum(w.size for w in adapter.weights.values())


# ---------------------------------------------------------------- the adapted linear layer

class LoRACache(NamedTuple):
    """What lora_linear_backward needs: x, s (x A), W0, A, B and s."""
    x: np.ndarray
    sh: np.ndarray
    W0: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scale: float


def lora_linear_forward(x, W0, b, A, B, scale, L=layers):
    """y = x W0 + b + s (x A) B. x (..., d_in), W0 (d_in, d_out), b (d_out,), A (d_in, r), B (r, d_out),
    scale s a number. L: the ops that compute x W0 + b (layers.py, or fast.OPS). Returns y, LoRACache."""
    d_in, d_out = W0.shape
    if A.ndim != 2 or A.shape[0] != d_in or B.shape != (A.shape[1], d_out) or x.shape[-1] != d_in:
        raise ValueError(f"LoRA shapes do not fit: x {x.shape}, W0 {W0.shape}, A {A.shape}, B {B.shape}")
    scale = V.number("lora_linear_forward", "scale", scale)  # a Python float keeps float32 arrays float32
    y, _ = L.linear_forward(x, W0, b)  # the frozen layer, x W0 + b; its cache is not needed
    sh = (x.reshape(-1, d_in) @ A) * scale  # s h = s x A, (N, r)
    y += (sh @ B).reshape(y.shape)  # + s (x A) B
    return y, LoRACache(x, sh, W0, A, B, scale)


def lora_linear_backward(dy, cache):
    """Undoes y = x W0 + b + s (x A) B. Returns dx, db, dA, dB (W0 is frozen: no gradient)."""
    x, sh, W0, A, B, scale = cache
    d_in, d_out = W0.shape
    g = dy.reshape(-1, d_out)  # (N, d_out)
    sgB = (g @ B.T) * scale  # dh = s g B^T, (N, r); exactly 0 while B = 0
    dx = g @ W0.T + sgB @ A.T  # x feeds the frozen layer and the adapter: add both paths
    dA = x.reshape(-1, d_in).T @ sgB  # dA = x^T dh = s x^T (g B^T)
    dB = sh.T @ g  # dB = s h^T g
    return dx.reshape(x.shape), g.sum(axis=0), dA, dB


def _check_update(W, A, B, scale, owner):
    """s as a Python float, after checking that A (d_in, r) B (r, d_out) has W's shape (d_in, d_out): NumPy
    would broadcast a (d_in, 1) product over every column."""
    if np.ndim(W) != 2 or np.ndim(A) != 2 or np.shape(B) != (np.shape(A)[1], np.shape(W)[1]) \
            or np.shape(A)[0] != np.shape(W)[0]:
        raise ValueError(f"{owner}: A {np.shape(A)} B {np.shape(B)} is not the shape of the weight {np.shape(W)}")
    return V.number(owner, "scale", scale)


def merge(W0, A, B, scale):
    """W = W0 + s A B: the adapted layer as one plain weight (x W + b equals the op's y up to rounding)."""
    return W0 + (A @ B) * _check_update(W0, A, B, scale, "merge")


def unmerge(W, A, B, scale):
    """W0 = W - s A B: undoes merge (exactly in real arithmetic; in floating point to rounding)."""
    return W - (A @ B) * _check_update(W, A, B, scale, "unmerge")


# ---------------------------------------------------------------- the hooks transformer.py calls

@dataclass(frozen=True)
class LoRAWeight:
    """An adapted weight as the transformer's math sees it in wrap's view: W0 frozen, A, B and s."""
    W0: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scale: float


def check_fits(adapter, params):
    """ValueError unless the adapter has exactly the weights its config asks of these parameters, each of
    its layer's shape and dtype. (That params is the very base it was made for is checked where a base and
    an adapter meet from outside: load_adapter.)"""
    if not isinstance(adapter, Adapter):
        raise ValueError(f"adapter must be a lora.Adapter, got {type(adapter).__name__}")
    r = adapter.config.rank
    wanted = {}
    for name, W0 in params.items():
        if name[:1] == "h" and name.split(".", 1)[-1] in adapter.config.targets:
            wanted[f"{name}.lora_A"] = ((W0.shape[0], r), W0.dtype)
            wanted[f"{name}.lora_B"] = ((r, W0.shape[1]), W0.dtype)
    missing, extra = sorted(set(wanted) - set(adapter.weights)), sorted(set(adapter.weights) - set(wanted))
    if missing or extra:
        raise ValueError(f"the adapter does not fit these parameters: missing {missing}, extra {extra}")
    for name, (shape, dtype) in wanted.items():
        w = adapter.weights[name]
        if w.shape != shape or w.dtype != dtype:
            raise ValueError(f"adapter weight {name} is {w.shape} {w.dtype}, the base needs {shape} {dtype}")


def wrap(params, adapter, ops):
    """(params_view, ops_view): the base's parameters with each adapted weight as a LoRAWeight (every
    other entry the very same array, nothing copied), and `ops` with linear_forward / linear_backward that
    run the LoRA op on a LoRAWeight (its x W0 + b by ops.linear_forward) and ops' own on a plain array.

    On an adapted weight, ops_view.linear_backward returns the pair (dA, dB) in the weight's slot."""
    check_fits(adapter, params)
    view = dict(params)
    for key in adapter.weights:
        if key.endswith(".lora_A"):
            name = key[:-len(".lora_A")]
            view[name] = LoRAWeight(params[name], adapter.weights[key], adapter.weights[f"{name}.lora_B"],
                                    adapter.config.scale)

    def linear_forward(x, W, b):
        if isinstance(W, LoRAWeight):
            return lora_linear_forward(x, W.W0, b, W.A, W.B, W.scale, ops)
        return ops.linear_forward(x, W, b)

    def linear_backward(dy, cache):
        if isinstance(cache, LoRACache):
            dx, db, dA, dB = lora_linear_backward(dy, cache)
            return dx, (dA, dB), db  # the weight's slot holds the adapter's pair
        return ops.linear_backward(dy, cache)

    ops_view = SimpleNamespace(**{name: getattr(ops, name) for name in vars(fast.OPS)})  # every op the model calls
    ops_view.linear_forward, ops_view.linear_backward = linear_forward, linear_backward
    return view, ops_view


class AdaptedCache(NamedTuple):
    """adapted_forward's cache: the adapter and fast.run_forward's (rows, part cache) list. A tuple, not a
    list, so that transformer.policy_backward sends it here."""
    adapter: Adapter
    parts: list


def adapted_forward(policy, tokens, mask=None):
    """A LoRA policy's logits (B, T, V) and cache: transformer.forward's math on wrap's view of its params,
    through fast.run_forward (the fast ops and the batch halves when fast.ENABLED)."""
    tokens, mask = tf.check_tokens(policy.model_cfg, tokens, mask)
    check_fits(policy.adapter, policy.params)

    def lm(params, model_cfg, tokens, mask, L):
        view, ops_view = wrap(params, policy.adapter, L)
        return tf.lm_forward(view, model_cfg, tokens, mask, ops_view)
    logits, parts = fast.run_forward(lm, policy.params, policy.model_cfg, tokens, mask)
    return logits, AdaptedCache(policy.adapter, parts)


def adapted_backward(dlogits, cache):
    """Undoes adapted_forward: {adapter weight name: gradient}, the adapter's weights only (the base's
    gradients, which transformer.lm_backward also works out, are dropped). Parts summed in a fixed order."""
    adapter, parts = cache
    layer_names = [key[:-len(".lora_A")] for key in adapter.weights if key.endswith(".lora_A")]

    def part_grads(part):
        rows, part_cache = part
        g = tf.lm_backward(dlogits[rows], part_cache)
        out = {}
        for name in layer_names:
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = g[name]
        return out
    grads = fast.run_parts(part_grads, parts)
    total = grads[0]
    for g in grads[1:]:  # every part reads the same adapter: add the parts' gradients
        total = {k: total[k] + g[k] for k in total}
    return {k: total[k] for k in adapter.weights}


def merge_adapter(params, adapter):
    """A plain model of its own: a copy of params with every adapted weight merged, W0 + s A B."""
    check_fits(adapter, params)
    merged = {k: v.copy() for k, v in params.items()}
    for key in adapter.weights:
        if key.endswith(".lora_A"):
            name = key[:-len(".lora_A")]
            merged[name] = merge(params[name], adapter.weights[key], adapter.weights[f"{name}.lora_B"],
                                 adapter.config.scale)
    return merged


# ---------------------------------------------------------------- adapter files

def save_adapter(path, adapter):
    """Write the adapter alone (its weights, config and base fingerprint) to an .npz, atomically."""
    for name, w in adapter.weights.items():
        if not np.issubdtype(np.asarray(w).dtype, np.floating):
            raise ValueError(f"cannot save {path}: adapter weight {name} has dtype {np.asarray(w).dtype}, not float")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"cannot save {path}: adapter weight {name} holds NaN or inf")
    meta = json.dumps({"kind": KIND, "config": {**vars(adapter.config), "targets": list(adapter.config.targets)},
                       "base": adapter.base})
    atomic_write(path, lambda f: np.savez(f, **{META: np.array(meta)}, **adapter.weights))


def load_adapter(path, base_params, model_cfg, expect_config=None):
    """Read an adapter file for this base -> Adapter, every check made first; ValueError naming the file and
    the mismatch: another base, another config than expect_config (if given: rank, targets, alpha, ...),
    missing or extra weights, wrong shapes, non-float or non-finite weights, a dtype other than the base's."""
    arrays, meta = read_npz(path)
    if meta.get("kind") != KIND:
        raise ValueError(f"{path}: not a LoRA adapter file (its {META} has no kind {KIND!r}; a model checkpoint?)")
    try:
        cfg = LoRAConfig(**{**meta["config"], "targets": tuple(meta["config"]["targets"])})
        base = str(meta["base"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its LoRA config is unreadable ({e})") from None
    if expect_config is not None and cfg != expect_config:
        raise ValueError(f"{path}: an adapter of rank {cfg.rank} on {cfg.targets} ({cfg}); expected {expect_config}")
    if base != fingerprint(base_params, model_cfg):
        raise ValueError(f"{path}: made for another base model (fingerprint {base[:19]}...), not for these "
                         f"parameters ({fingerprint(base_params, model_cfg)[:19]}...)")
    try:
        layer_shapes = adapted_layers(model_cfg, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    r, dtype = cfg.rank, base_params["wte"].dtype
    expected = {}
    for name, (d_in, d_out) in layer_shapes.items():
        expected[f"{name}.lora_A"], expected[f"{name}.lora_B"] = (d_in, r), (r, d_out)
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: weights do not match its config: missing {missing}, extra {extra}")
    for name, shape in expected.items():
        w = arrays[name]
        if w.shape != shape:
            raise ValueError(f"{path}: {name} has shape {w.shape}, rank {r} needs {shape}")
        if not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"{path}: {name} has dtype {w.dtype}, not a float type")
        if w.dtype != dtype:
            raise ValueError(f"{path}: {name} is {w.dtype}, the base is {dtype}")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"{path}: {name} holds NaN or inf")
    return Adapter({name: arrays[name] for name in expected}, cfg, base)
