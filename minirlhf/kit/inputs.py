"""The kit's inputs: its tiny models and its batches kept off the clip kinks (NumPy only).

KIT_MODEL is the model every conformance check of a model runs on (conformance.py), FIXTURE_MODEL the one
every model fixture is written with (fixtures.py, smaller so the files stay small); exact.EXACT_MODEL is the
third, the model whose every response exact.py enumerates. Token ids 0-2 are PAD, BOS, EOS; the rest text.
"""
import numpy as np

from .. import transformer as tf

KIT_MODEL = tf.GPTConfig(vocab_size=7, n_ctx=6, n_layer=2, n_head=2, n_embd=8)
FIXTURE_MODEL = tf.GPTConfig(vocab_size=7, n_ctx=6, n_layer=1, n_head=2, n_embd=4)


def tiny_model(model_cfg=KIT_MODEL, seed=0, head=False, scale=0.3):
    """float64 parameters with a wide init (every path carries signal); head=True adds head.w, head.b."""
    rng = np.random.default_rng(seed)
    params = {k: v + scale * rng.standard_normal(v.shape)
              for k, v in tf.init_params(model_cfg, rng, np.float64).items()}
    if head:
        params["head.w"], params["head.b"] = rng.standard_normal(model_cfg.n_embd), np.asarray(0.3)
    return params


def off_kink_batch(seed, eps=0.2):
    """(mask, base, offset, signed) for the PPO losses: (B, T) arrays, row 1 ending in two padding tokens
    (finite garbage there), offsets (log-ratios, value changes) of 0.25 or 2.5 times eps: off the clip kinks."""
    r = np.random.default_rng(seed)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    offset = eps * r.choice([-2.5, -0.25, 0.25, 2.5], size=mask.shape)  # |.| < eps or > 2 eps
    sign = r.choice([-1.0, 1.0], size=mask.shape)
    base = r.standard_normal(mask.shape) - 1
    return mask, base, offset, sign * r.uniform(0.3, 1.5, mask.shape)
