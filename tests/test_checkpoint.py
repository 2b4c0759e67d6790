"""Checkpoints round-trip bit for bit, refuse files that don't match their config, and never half-write."""
import json
import os

import numpy as np
import pytest

from minirlhf import transformer as tf
from minirlhf.checkpoint import load_checkpoint, save_checkpoint

CFG = tf.GPTConfig(vocab_size=11, n_ctx=8, n_layer=1, n_head=2, n_embd=8)


def test_round_trip_with_extra_head(tmp_path):
    params = tf.init_params(CFG, np.random.default_rng(0))
    params["head.w"] = np.arange(8, dtype=np.float32)
    path = tmp_path / "m.npz"
    save_checkpoint(path, params, CFG, info={"step": 3})
    loaded, cfg, info = load_checkpoint(path)
    assert cfg == CFG and info == {"step": 3}
    assert loaded.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(loaded[k], params[k])
        assert loaded[k].dtype == params[k].dtype
    assert [f for f in os.listdir(tmp_path)] == ["m.npz"]  # no temporary file left behind


def write_raw(path, params, config):
    meta = json.dumps({"config": config, "extra_shapes": {}, "info": {}})
    np.savez(path, __meta__=np.array(meta), **params)


def test_mismatched_shape_names_the_parameter(tmp_path):
    params = tf.init_params(CFG, np.random.default_rng(0))
    params["h0.mlp.w_fc"] = np.zeros((8, 16), np.float32)
    write_raw(tmp_path / "bad.npz", params, vars(CFG))
    with pytest.raises(ValueError, match=r"h0.mlp.w_fc has shape \(8, 16\).*\(8, 32\)"):
        load_checkpoint(tmp_path / "bad.npz")


def test_missing_and_unexpected_names(tmp_path):
    params = tf.init_params(CFG, np.random.default_rng(0))
    del params["ln_f.b"]
    params["stray"] = np.zeros(2)
    write_raw(tmp_path / "bad.npz", params, vars(CFG))
    with pytest.raises(ValueError, match=r"missing \['ln_f.b'\], unexpected \['stray'\]"):
        load_checkpoint(tmp_path / "bad.npz")


def test_config_of_another_size_is_refused(tmp_path):
    params = tf.init_params(CFG, np.random.default_rng(0))
    write_raw(tmp_path / "bad.npz", params, {**vars(CFG), "n_layer": 2})
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(tmp_path / "bad.npz")


def test_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a minirlhf checkpoint"):
        load_checkpoint(tmp_path / "x.npz")


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.npz"
    params = tf.init_params(CFG, np.random.default_rng(0))
    save_checkpoint(path, params, CFG)
    before = path.read_bytes()
    bad = dict(params)
    bad["wte"] = params["wte"].copy()
    bad["wte"][0, 0] = np.nan
    with pytest.raises(ValueError, match="wte is not finite"):
        save_checkpoint(path, bad, CFG)
    with pytest.raises(ValueError, match="missing"):
        save_checkpoint(path, {"wte": params["wte"]}, CFG)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]
