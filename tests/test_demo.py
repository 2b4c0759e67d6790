"""The demo end to end: --quick learns, the same seed gives the same numbers, an interrupted run leaves no
corrupt checkpoint and can be re-run, and bad flags give argparse's usage error."""
import json
import os

import numpy as np
import pytest

from minirlhf import demo
from minirlhf.checkpoint import load_checkpoint

TINY_RUN = ["--sft-steps", "12", "--rm-steps", "3", "--ppo-updates", "2", "--labels", "40"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    summary = demo.main(["--quick", "--out", str(out)])
    return out, summary


def test_quick_run_writes_everything_and_improves_gold(quick):
    out, summary = quick
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("seed", "numpy", "seconds", "win_rate_vs_sft"):
        assert key in on_disk
    assert on_disk["sft"]["gold_score"] == summary["sft"]["gold_score"]
    for stage, key in [("sft", "gold_score"), ("ppo", "gold_score"), ("ppo", "reward_score"), ("ppo", "kl"),
                       ("reward_model", "val_accuracy"), ("reward_model", "ceiling_accuracy")]:
        assert np.isfinite(on_disk[stage][key]), (stage, key)
    w = on_disk["win_rate_vs_sft"]
    assert 0 <= w["low"] <= w["rate"] <= w["high"] <= 1
    assert on_disk["ppo"]["gold_score"] > on_disk["sft"]["gold_score"]
    for name in ("sft", "reward", "value", "policy"):
        load_checkpoint(out / f"{name}.npz")
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"sft", "reward_model", "ppo"}


def numbers(summary):
    """Everything but the timings."""
    s = dict(summary)
    s.pop("seconds")
    s.pop("args")
    return s


def test_same_seed_same_numbers(tmp_path):
    a = demo.main(TINY_RUN + ["--out", str(tmp_path / "a"), "--seed", "5"])
    b = demo.main(TINY_RUN + ["--out", str(tmp_path / "b"), "--seed", "5"])
    assert numbers(a) == numbers(b)
    pa, _, _ = load_checkpoint(tmp_path / "a" / "policy.npz")
    pb, _, _ = load_checkpoint(tmp_path / "b" / "policy.npz")
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])


def test_interrupted_run_leaves_no_corrupt_checkpoint_and_reruns(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "train_reward_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.main(TINY_RUN + ["--out", str(tmp_path)])
    load_checkpoint(tmp_path / "sft.npz")  # the stage before the interruption saved a whole checkpoint
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.undo()
    summary = demo.main(TINY_RUN + ["--out", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == summary["seed"]


@pytest.mark.parametrize("argv", [["--sft-steps", "-3"], ["--ppo-updates", "0"], ["--kl-coef", "-1"],
                                  ["--no-such-flag"], ["--kl-target", "0"], ["--quick", "--full-reward-model"]])
def test_bad_flags_give_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_full_reward_model_flag_sets_its_label_and_step_counts_unless_given():
    args = demo.parse_args(["--full-reward-model"])
    assert (args.labels, args.rm_steps) == (demo.FULL_REWARD_MODEL["labels"], demo.FULL_REWARD_MODEL["rm_steps"])
    assert args.sft_steps == demo.PRESETS["default"]["sft_steps"]
    assert demo.parse_args(["--full-reward-model", "--rm-steps", "7"]).rm_steps == 7
    assert demo.reward_config(1500, full=True).lr > demo.reward_config(1500).lr
