"""AdamW as PyTorch defines it, global-norm gradient clipping, and a warm-up / linear-decay schedule.

With g the (clipped) gradient, t the step count from 1, lr the step's learning rate, lambda the weight
decay (Loshchilov & Hutter 2019, "Decoupled weight decay regularization"):

    p     <- p - lr * lambda * p                 decoupled decay, matrices only (see below)
    m     <- beta1 m + (1 - beta1) g
    v     <- beta2 v + (1 - beta2) g^2
    m_hat =  m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
    p     <- p - lr * m_hat / (sqrt(v_hat) + eps)

eps sits outside the square root, as torch.optim.AdamW; TensorFlow's Adam puts it inside an
un-bias-corrected denominator, which gives larger early steps (minirlhf/CONVENTIONS.md, "Optimiser").
Weight decay applies to parameters with two or more axes (weights, embeddings), not to biases or
LayerNorm gains, as nanoGPT does.

Clipping: with n = sqrt(sum of g^2 over every parameter), every gradient is scaled by
min(1, max_norm / (n + 1e-6)), as torch.nn.utils.clip_grad_norm_.

The state is a plain dict returned to the caller: no hidden state on objects. A gradient that is not
finite raises ValueError before anything is written, so a bad step never half-applies; `all_or_nothing`
does the same for an update of many steps (PPO's epochs of minibatches).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import validate as V


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 3e-4  # peak learning rate (the schedule scales it per step)
    beta1: float = 0.9  # decay of the first-moment (mean) estimate
    beta2: float = 0.999  # decay of the second-moment (uncentred variance) estimate
    eps: float = 1e-8  # added to sqrt(v_hat), outside the root (PyTorch placement)
    weight_decay: float = 0.0  # decoupled decay per unit lr, on parameters with ndim >= 2
    max_grad_norm: float = 1.0  # global-norm clip; None or inf disables it

    def __post_init__(self):
        V.number("AdamWConfig", "lr", self.lr, low=0)
        V.number("AdamWConfig", "beta1", self.beta1, low=0, high=1, high_open=True)
        V.number("AdamWConfig", "beta2", self.beta2, low=0, high=1, high_open=True)
        V.number("AdamWConfig", "eps", self.eps, low=0, low_open=True)
        V.number("AdamWConfig", "weight_decay", self.weight_decay, low=0)
        if self.max_grad_norm is not None and self.max_grad_norm != np.inf:
            V.number("AdamWConfig", "max_grad_norm", self.max_grad_norm, low=0, low_open=True)


def adamw_init(params):
    """Zero moments for every parameter; t counts the steps taken."""
    return {"t": 0, "m": {k: np.zeros_like(p) for k, p in params.items()},
            "v": {k: np.zeros_like(p) for k, p in params.items()}}


def global_norm(grads):
    """sqrt of the sum of squares of every gradient entry (accumulated in float64)."""
    return float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))


def clip_grads(grads, max_norm):
    """Scale every gradient by min(1, max_norm / (n + 1e-6)), n the global norm, as torch does (so a norm
    within 1e-6 below max_norm is scaled, by a factor a hair under 1). Returns (grads, n)."""
    if max_norm is not None and max_norm != np.inf:
        V.number("clip_grads", "max_norm", max_norm, low=0, low_open=True)
    norm = global_norm(grads)
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
    if scale == 1.0:
        return grads, norm
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}, norm


def adamw_step(params, grads, state, cfg, lr=None):
    """One AdamW step, in place on params and state. Returns the gradient norm before clipping.

    lr overrides cfg.lr for this step (the schedule's value). Raises ValueError, changing nothing, when
    grads do not match params or hold a NaN or inf.
    """
    if grads.keys() != params.keys():
        raise ValueError(f"gradient names differ from parameter names: "
                         f"{sorted(set(grads) ^ set(params))}")
    for k, g in grads.items():
        if g.shape != params[k].shape:
            raise ValueError(f"gradient {k} has shape {g.shape}, parameter has {params[k].shape}")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"gradient {k} is not finite; the step was not applied")
    lr = cfg.lr if lr is None else V.number("adamw_step", "lr", lr, low=0)
    grads, norm = clip_grads(grads, cfg.max_grad_norm)
    state["t"] += 1
    t = state["t"]
    bc1, bc2 = 1.0 - cfg.beta1 ** t, 1.0 - cfg.beta2 ** t
    for k, p in params.items():
        g = grads[k]
        m, v = state["m"][k], state["v"][k]
        if cfg.weight_decay and p.ndim >= 2:
            p -= lr * cfg.weight_decay * p
        m *= cfg.beta1
        m += (1 - cfg.beta1) * g
        v *= cfg.beta2
        v += (1 - cfg.beta2) * g * g
        p -= (lr / bc1) * m / (np.sqrt(v / bc2) + cfg.eps)
    return norm


def lr_schedule(step, total_steps, peak_lr, warmup_steps=0):
    """Learning rate for 0-based `step`: linear warm-up over warmup_steps to peak_lr, then linear decay
    to 0 at total_steps (the rate after the last step; a step past it is an error)."""
    if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    V.count("lr_schedule", "step", step, minimum=0)
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    V.number("lr_schedule", "peak_lr", peak_lr, low=0)
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * (total_steps - step) / (total_steps - warmup_steps)


def _copy(tree):
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    return tree.copy() if isinstance(tree, np.ndarray) else tree


def _restore(tree, saved):
    for k, v in saved.items():
        if isinstance(v, dict):
            _restore(tree[k], v)
        elif isinstance(v, np.ndarray):
            tree[k][...] = v
        else:
            tree[k] = v


@contextmanager
def all_or_nothing(*trees):
    """Run a block that updates the trees in place (dicts of arrays, AdamW states) as one transaction: if it
    raises (or is interrupted), every array and count is put back as it was before the block, then the
    exception goes on. The copies cost one pass over the arrays: nothing, beside the update they guard."""
    saved = [_copy(t) for t in trees]
    try:
        yield
    except BaseException:
        for tree, s in zip(trees, saved):
            _restore(tree, s)
        raise
