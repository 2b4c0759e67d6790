"""The lesson's experiments (demos/kl_sweep.py, length_bias.py, labelling_cost.py, explain_ranking.py):
each --quick mode runs through main(argv) and writes JSON whose fields hold finite numbers. This tests the
plumbing, not the science: a tiny SFT and reward model, built by the experiments' own fallback for a
missing demo run (as on CI, where runs/ is not committed), stand in for the demo's."""
import json
import math
import os
import sys

import numpy as np
import pytest

from minirlhf.checkpoint import save_checkpoint
from minirlhf.demo import MODEL, write_json
from minirlhf.world import FAMILIES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos"))
import _common  # noqa: E402
import explain_ranking  # noqa: E402
import kl_sweep  # noqa: E402
import labelling_cost  # noqa: E402
import length_bias  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A demo-run directory (what load_run reads) holding the tiny stages a quick experiment builds when
    its --from directory is missing; built once, then every experiment starts from it."""
    out = tmp_path_factory.mktemp("tiny_run")
    start = _common.starting_point(str(out / "missing"), True, np.random.default_rng(0), log=lambda line: None)
    save_checkpoint(str(out / "sft.npz"), start["sft"], MODEL, info={"stage": "sft"})
    save_checkpoint(str(out / "reward.npz"), start["reward_model"], MODEL,
                    info={"stage": "reward_model", "gain": float(start["norm"][0]), "bias": float(start["norm"][1])})
    write_json(str(out / "split.json"), {"train": [p.text for p in start["train_prompts"]],
                                         "val": [p.text for p in start["val_prompts"]]})
    return out


def numbers(value):
    """Every number in a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def run_quick(module, tiny_run, tmp_path):
    """main(--quick) from the tiny run; returns the JSON it wrote, after checking every number is finite and
    that --plot either wrote a figure or found no matplotlib."""
    path, fig = tmp_path / "out.json", tmp_path / "fig.png"
    module.main(["--quick", "--from", str(tiny_run), "--json", str(path), "--plot", str(fig)])
    out = json.loads(path.read_text())
    assert out["args"]["quick"] is True and out["seconds"] > 0
    bad = [x for x in numbers(out) if not math.isfinite(x)]
    assert not bad, bad
    try:
        import matplotlib  # noqa: F401
        assert fig.exists()
    except ImportError:
        assert not fig.exists()
    return out


def test_kl_sweep(tiny_run, tmp_path):
    out = run_quick(kl_sweep, tiny_run, tmp_path)
    betas = kl_sweep.QUICK["betas"]
    assert [r["name"] for r in out["final"]] == ["SFT"] + [f"beta {b}" for b in betas]
    for r in out["final"]:
        for key in ("proxy", "gold", "kl", "kl_exact", "length", "ended"):
            assert isinstance(r[key], float), (r["name"], key)
    assert out["final"][0]["kl_exact"] == 0.0  # the SFT model against itself
    for b in betas:
        curve = out["training"][str(b)]
        assert len(curve["gold"]) == len(curve["proxy"]) == len(curve["kl"]) == kl_sweep.QUICK["updates"]
        assert 1 <= curve["peak_update"] <= kl_sweep.QUICK["updates"]
    assert out["hacking_samples"] and all(set(s["criteria"]) and "gold" in s for s in out["hacking_samples"])


def test_length_bias(tiny_run, tmp_path):
    out = run_quick(length_bias, tiny_run, tmp_path)
    biases = ["0.0"] + [str(b) for b in length_bias.QUICK["length_bias"]]
    assert list(out["arms"]) == biases and list(out["policies"]) == ["SFT"] + biases
    for corr in [out["gold_length_corr"]] + [a[k] for a in out["arms"].values()
                                             for k in ("annotator_length_corr", "rm_length_corr")]:
        assert -1 <= corr["pooled"] <= 1 and -1 <= corr["within_family"] <= 1
    for arm in out["arms"].values():
        assert 0 <= arm["rm_accuracy"] <= 1 and 0.5 <= arm["ceiling"] <= 1
    for policy in out["policies"].values():
        for key in ("length", "over_concise", "concise", "rambling", "proxy", "gold", "kl"):
            assert isinstance(policy[key], float), key


def test_labelling_cost(tiny_run, tmp_path):
    out = run_quick(labelling_cost, tiny_run, tmp_path)
    assert [r["labels"] for r in out["budgets"]] == labelling_cost.QUICK["labels"]
    for r in out["budgets"]:
        assert 0 < r["pairs"] <= math.comb(labelling_cost.K, 2) * r["labels"]  # C(K, 2) per ranked prompt
        assert len(r["gold_gain_each"]) == labelling_cost.QUICK["seeds"]
        assert r["gold_gain"] == pytest.approx(r["gold"] - out["sft_gold"])


def test_explain_ranking(tiny_run, tmp_path):
    out = run_quick(explain_ranking, tiny_run, tmp_path)
    assert [p["family"] for p in out["prompts"]] == list(FAMILIES)
    for p in out["prompts"]:
        assert sorted(p["ranking"]) == list(range(len(p["responses"])))
        assert len(p["neighbour_pairs"]) == len(p["responses"]) - 1
        assert all(0 <= pair["p_annotator"] <= 1 for pair in p["neighbour_pairs"])
    assert 0 <= out["rm_agreement"]["agree"] <= out["rm_agreement"]["pairs"]


@pytest.mark.parametrize("module, argv", [(kl_sweep, ["--betas", "-0.1"]), (length_bias, ["--labels", "0"]),
                                          (labelling_cost, ["--labels", "0"]), (explain_ranking, ["--k", "1"])])
def test_bad_flags_give_usage_errors(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err
