"""Checkpoints: a parameter dict and its config in one .npz, without pickle; atomic writes of any file.

File layout: one array per parameter, by name, plus `__meta__`, a 0-d string array holding JSON:

    {"config": {...GPTConfig fields...}, "extra_shapes": {name: shape}, "info": {...}}

`extra_shapes` lists parameters beyond the transformer's (a reward or value head); `info` is free JSON
(the stage, the run it belongs to, the reward normalisation, the sampling settings).

Loading reads with allow_pickle=False and checks everything before returning: that the file is a whole
zip archive of .npy members, that no member needs pickle, that every name and shape matches the config
(and the config the caller expects, if given), that parameters are floating point and finite. Every
failure is a ValueError that names the file and says what is wrong, so a damaged or foreign checkpoint
never loads as garbage.

Writing goes to a temporary file in the same folder, flushed to disk, that is then renamed over the target
(`atomic_write`): an interrupted save leaves the old file (or none), never half of one. The file gets the
permissions any new file gets (0644 under the usual umask 022), not the 0600 of a temporary file.
"""
import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

from .transformer import GPTConfig, param_shapes

META = "__meta__"
TMP_PREFIX = ".tmp-"  # temporary files of atomic_write; a crash can leave one behind (runs.py ignores them)


def atomic_write(path, write):
    """Write a file atomically: write(f) fills a temporary file in the same folder, which replaces path."""
    if str(path).strip() == "" or os.path.isdir(path):
        raise ValueError(f"cannot write {str(path)!r}: {'a folder' if str(path).strip() else 'an empty path'}, "
                         f"not a file")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.splitext(str(path))[1])
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a new file normally gets 0666 less the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, params, model_cfg, info=None):
    """Write params (trunk names of model_cfg plus any extra heads) and model_cfg to path atomically."""
    expected = param_shapes(model_cfg)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ValueError(f"cannot save {path}: parameters missing for this config: {missing}")
    for name, shape in expected.items():
        if np.shape(params[name]) != shape:
            raise ValueError(f"cannot save {path}: {name} has shape {np.shape(params[name])}, config says {shape}")
    for name, arr in params.items():
        if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"cannot save {path}: parameter {name} is {getattr(arr, 'dtype', type(arr).__name__)}, "
                             f"not a float array")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"cannot save {path}: parameter {name} is not finite")
    extra = {k: list(v.shape) for k, v in params.items() if k not in expected}
    try:
        meta = json.dumps({"config": vars(model_cfg), "extra_shapes": extra, "info": info or {}})
    except (TypeError, ValueError) as e:  # e.g. a NumPy scalar in info: JSON needs Python numbers
        raise ValueError(f"cannot save {path}: info is not JSON ({e})") from None
    atomic_write(path, lambda f: np.savez(f, **{META: np.array(meta)}, **params))


def load_checkpoint(path, expect_config=None, expect_extra=None):
    """Read a checkpoint -> (params, model_cfg, info), checked (module docstring); ValueError naming path.

    expect_config: the GPTConfig the caller needs (a checkpoint of another model is refused);
    expect_extra: the names of the extra parameters the caller needs (e.g. {"head.w", "head.b"}).
    """
    params, meta = read_npz(path)
    try:
        model_cfg = GPTConfig(**meta["config"])
        extra_shapes = {k: tuple(v) for k, v in meta.get("extra_shapes", {}).items()}
        info = dict(meta.get("info", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: its config is unreadable ({e})") from None
    if expect_config is not None and model_cfg != expect_config:
        raise ValueError(f"{path}: a checkpoint of another model ({vars(model_cfg)}); expected {vars(expect_config)}")
    expected = {**param_shapes(model_cfg), **extra_shapes}
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: parameters do not match its config: missing {missing}, unexpected {unexpected}")
    if expect_extra is not None and set(extra_shapes) != set(expect_extra):
        raise ValueError(f"{path}: has extra parameters {sorted(extra_shapes)}, expected {sorted(expect_extra)} "
                         f"(a checkpoint of another kind of model?)")
    for name, shape in expected.items():
        x = params[name]
        if x.shape != shape:
            raise ValueError(f"{path}: {name} has shape {x.shape}, its config says {shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{path}: parameter {name} has dtype {x.dtype}, not a float type")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{path}: parameter {name} holds NaN or inf")
    return params, model_cfg, info


def read_npz(path):
    """The arrays and the parsed __meta__ of an .npz, or a ValueError saying why the file is not one."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file" if not os.path.exists(path)
                         else f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty (an interrupted copy?)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz checkpoint (not a zip archive: truncated, or another kind of file)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if META not in f.files:
                raise ValueError(f"{path}: not a minirlhf checkpoint (no {META} entry)")
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise ValueError(f"{path}: holds pickled data, which minirlhf never writes and refuses to load") from None
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: a member is not a readable array ({e})") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{path}: the archive is damaged ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(str(arrays.pop(META)))
        if not isinstance(meta, dict):
            raise TypeError("not a JSON object")
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: its {META} entry is not readable JSON ({e})") from None
    return arrays, meta
