"""The scripts in demos/: each --quick run starts from a demo run (the session's tiny one) through main(argv)
and writes JSON whose numbers are all finite and a figure where matplotlib is installed; a flag typed with
--quick wins over the quick preset; a folder that is not one finished run is refused with a message; a
script given an empty folder makes its demo run first. This tests the plumbing, not the science."""
import importlib.util
import json
import math
import os
import sys

import pytest

from minirlhf import runs
from minirlhf.world import FAMILIES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos"))
import _common  # noqa: E402
import dpo_puzzle  # noqa: E402
import explain_ranking  # noqa: E402
import frontier  # noqa: E402
import kl_sweep  # noqa: E402
import labelling_cost  # noqa: E402
import length_bias  # noqa: E402
import reward_benchmark  # noqa: E402


def numbers(value):
    """Every number in a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def run_quick(module, tiny_run, tmp_path, *extra):
    """main(--quick) from the tiny run; returns the JSON it wrote, after checking every number is finite and
    that --plot either wrote a figure or found no matplotlib."""
    path, fig = tmp_path / "out.json", tmp_path / "fig.png"
    module.main(["--quick", "--run", str(tiny_run[0]), "--json", str(path), *plot_flags(fig), *extra])
    out = json.loads(path.read_text())
    assert out["args"]["quick"] is True and out["seconds"] > 0
    bad = [x for x in numbers(out) if not math.isfinite(x)]
    assert not bad, bad
    assert fig.exists() == HAVE_MATPLOTLIB
    return out


# matplotlib is optional (pip install -e ".[plot]"): with it the scripts' --plot must write the figure; without
# it --plot is a usage error (test_plot_without_matplotlib_is_a_usage_error), so the runs leave it out.
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def plot_flags(fig):
    return ["--plot", str(fig)] if HAVE_MATPLOTLIB else []


def test_plot_without_matplotlib_is_a_usage_error(tiny_run, tmp_path, monkeypatch, capsys):
    """With matplotlib missing (None in sys.modules makes its import fail), --plot stops at the parse: exit
    code 2, the install line in the message, no JSON written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "out.json"
    with pytest.raises(SystemExit) as e:
        kl_sweep.main(["--quick", "--run", str(tiny_run[0]), "--json", str(path), "--plot", str(tmp_path / "f.png")])
    assert e.value.code == 2 and 'pip install -e ".[plot]"' in capsys.readouterr().err
    assert not path.exists()


def test_kl_sweep(tiny_run, tmp_path):
    out = run_quick(kl_sweep, tiny_run, tmp_path)
    coefs = kl_sweep.QUICK["kl_coefs"]
    assert [r["name"] for r in out["final"]] == ["SFT"] + [f"kl_coef {b}" for b in coefs]
    for r in out["final"]:
        for key in ("proxy", "gold", "kl", "kl_exact", "length", "ended"):
            assert isinstance(r[key], float), (r["name"], key)
    assert out["final"][0]["kl_exact"] == 0.0  # the SFT model against itself
    for b in coefs:
        curve = out["training"][str(b)]
        assert len(curve["gold"]) == len(curve["proxy"]) == len(curve["kl"]) == kl_sweep.QUICK["ppo_updates"]
        assert 1 <= curve["peak_update"] <= kl_sweep.QUICK["ppo_updates"]
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


def test_frontier(tiny_run, tmp_path):
    out = run_quick(frontier, tiny_run, tmp_path)
    q = frontier.QUICK
    critic_free = {frontier.CF_NAMES[m] for m in q["cf_methods"]}
    assert {p["method"] for p in out["points"]} == {"PPO", "DPO", "BoN"} | critic_free
    n_cf = len(q["cf_methods"]) * len(q["cf_kl_coefs"]) * len(q["group_sizes"])
    assert len(out["points"]) == len(q["kl_coefs"]) + len(q["dpo_betas"]) + len(q["bon_ns"]) + n_cf
    for p in out["points"]:
        assert p["kl"] >= 0, p
        if p["method"] == "BoN":
            assert p["kl"] <= p["kl_bound"] + 1e-12
        if p["method"] in critic_free:
            assert p["group_size"] in q["group_sizes"] and p["kl_coef"] in q["cf_kl_coefs"]
    assert out["pairs"] > 0 and set(out["dpo_puzzle"]) == {str(b) for b in q["dpo_betas"]}
    assert set(out["gao_fits"]) == {"PPO", "DPO", "BoN"} | critic_free
    for fit in out["gao_fits"].values():  # None with fewer than 3 points, as --quick has
        assert fit is None or fit["form"] in ("bon", "rl")


def test_dpo_puzzle(tiny_run, tmp_path):
    out = run_quick(dpo_puzzle, tiny_run, tmp_path)
    assert out["pairs"] == dpo_puzzle.QUICK["pairs"] and 0 <= out["chosen_fell"] <= 1


def test_reward_benchmark(tmp_path):
    path = tmp_path / "out.json"
    reward_benchmark.main(["--quick", "--json", str(path), *plot_flags(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").exists() == HAVE_MATPLOTLIB
    out = json.loads(path.read_text())
    assert [r["seed"] for r in out["seeds"]] == reward_benchmark.QUICK["seeds"]
    assert [r["labels"] for r in out["labelling_cost"]] == reward_benchmark.QUICK["labels"]


def test_a_typed_flag_wins_over_quick(tiny_run, tmp_path):
    out = run_quick(kl_sweep, tiny_run, tmp_path, "--kl-coefs", "0.3", "--eval-prompts", "4")
    assert [r["name"] for r in out["final"]] == ["SFT", "kl_coef 0.3"] and out["eval_prompts"] == 4


def test_a_folder_that_is_not_one_finished_run_is_refused(tiny_run, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in os.listdir(tiny_run[0]):
        (mixed / name).write_bytes((tiny_run[0] / name).read_bytes())
    (mixed / "sft.npz").write_bytes((mixed / "policy.npz").read_bytes())  # another file in sft.npz's place
    with pytest.raises(ValueError, match="sft.npz changed since its run wrote it.*--force"):
        runs.load_run(mixed)
    with pytest.raises(SystemExit) as e:
        _common.main_guard(lambda: kl_sweep.main(["--quick", "--run", str(mixed)]))
    assert e.value.code == 2


def test_an_empty_folder_gets_its_demo_run_first(tiny_run, tmp_path, monkeypatch, capsys):
    """With no run in --run, the script runs the demo there first (here a stand-in that copies the tiny run)
    and says so."""
    made = []

    def demo_main(flags):
        made.append(flags)
        os.makedirs(flags[1])
        for name in os.listdir(tiny_run[0]):
            (tmp_path / "new" / name).write_bytes((tiny_run[0] / name).read_bytes())
    monkeypatch.setattr(_common.demo, "main", demo_main)
    args = _common.parse(_common.parser("", "x"), ["--quick", "--run", str(tmp_path / "new"), "--seed", "3"])
    start = _common.starting_point(args)
    assert made == [["--out", str(tmp_path / "new"), "--seed", "3", "--quick"]]
    assert "making one first" in capsys.readouterr().out and start["sft"].params


@pytest.mark.parametrize("module, argv", [(kl_sweep, ["--kl-coefs", "-0.1"]), (length_bias, ["--labels", "0"]),
                                          (labelling_cost, ["--labels", "0"]), (explain_ranking, ["--k", "1"]),
                                          (dpo_puzzle, ["--beta", "0"]), (dpo_puzzle, ["--steps", "0"]),
                                          (kl_sweep, ["--batch-size", "0"]), (frontier, ["--dpo-betas", "nan"]),
                                          (reward_benchmark, ["--quick", "--full"]), (kl_sweep, ["--json", ""])])
def test_bad_flags_give_usage_errors(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err
