"""Checkpoints: a parameter dict and its config in one .npz, without pickle.

File layout: one array per parameter, by name, plus `__meta__`, a 0-d string array holding JSON:

    {"config": {...transformer Config fields...}, "extra_shapes": {name: shape}, "info": {...}}

`extra_shapes` lists parameters beyond the transformer's (a reward or value head); `info` is free JSON
(step counts, reward normalisation). Loading uses allow_pickle=False and checks every name and shape
against the config, so a file from another model size fails loudly instead of loading garbage. Writing
goes to a temporary file in the same folder that is then renamed over the target: an interrupted save
leaves the old checkpoint (or none), never half of one.
"""
import json
import os
import tempfile

import numpy as np

from .transformer import Config, param_shapes

META = "__meta__"


def save_checkpoint(path, params, cfg, info=None):
    """Write params (trunk names of cfg plus any extra heads) and cfg to path atomically."""
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ValueError(f"cannot save: parameters missing for this config: {missing}")
    for name, shape in expected.items():
        if params[name].shape != shape:
            raise ValueError(f"cannot save: {name} has shape {params[name].shape}, config says {shape}")
    extra = {k: list(v.shape) for k, v in params.items() if k not in expected}
    meta = json.dumps({"config": vars(cfg), "extra_shapes": extra, "info": info or {}})
    for name, arr in params.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"cannot save: parameter {name} is not finite")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{META: np.array(meta)}, **params)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path):
    """Read a checkpoint -> (params, cfg, info). ValueError if names or shapes don't match the config."""
    with np.load(path, allow_pickle=False) as f:
        if META not in f.files:
            raise ValueError(f"{path}: not a minirlhf checkpoint (no {META} entry)")
        try:
            meta = json.loads(str(f[META]))
            cfg = Config(**meta["config"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable config: {e}") from None
        params = {k: f[k] for k in f.files if k != META}
    expected = dict(param_shapes(cfg))
    expected.update({k: tuple(v) for k, v in meta.get("extra_shapes", {}).items()})
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: parameters do not match its config: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, shape in expected.items():
        if params[name].shape != shape:
            raise ValueError(f"{path}: {name} has shape {params[name].shape}, its config says {shape}")
    return params, cfg, meta.get("info", {})
