"""The demo end to end: --quick through a rank-4 LoRA adapter learns, the same seed gives the same numbers,
the critic-free methods and the verifier run in stage 4, a run at a temperature samples, scores and
evaluates at it, an interrupted run leaves no corrupt checkpoint and a folder that consumers refuse until it
is re-made with --force, and bad flags give argparse's usage error."""
import json
import os

import numpy as np
import pytest

from conftest import TINY_RUN
from minirlhf import demo, kl, layers, lora, pipeline, runs
from minirlhf import transformer as tf
from minirlhf.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "run"
    summary = demo.main(["--quick", "--lora", "4", "--out", str(out)])
    return out, summary


def test_quick_lora_run_writes_everything_and_improves_gold(quick):
    """`demo --quick --lora 4`: the SFT model is the reference, untouched; the adapter alone is kept."""
    out, summary = quick
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("seed", "numpy", "seconds", "win_rate_vs_sft", "run_id"):
        assert key in on_disk
    assert on_disk["sft"]["gold_score"] == summary["sft"]["gold_score"]
    for stage, key in [("sft", "gold_score"), ("rl", "gold_score"), ("rl", "reward_score"), ("rl", "kl"),
                       ("reward_model", "val_accuracy"), ("reward_model", "ceiling_accuracy"),
                       ("lora", "peak_mb"), ("lora", "full_peak_mb")]:
        assert np.isfinite(on_disk[stage][key]), (stage, key)
    w = on_disk["win_rate_vs_sft"]
    assert 0 <= w["low"] <= w["rate"] <= w["high"] <= 1
    assert on_disk["rl"]["gold_score"] > on_disk["sft"]["gold_score"]
    manifest = runs.open_run(out)  # one finished run: every file listed, every hash right
    assert manifest["status"] == "finished" and manifest["stages"] == ["sft", "reward_model", "ppo", "evaluation"]
    assert set(manifest["files"]) == {"split.json", "sft.npz", "reward.npz", "adapter.npz", "value.npz",
                                      "metrics.jsonl", "summary.json"}
    for name in ("sft", "reward", "value"):
        _, _, info = load_checkpoint(out / f"{name}.npz", pipeline.DEMO_MODEL)
        assert info["run_id"] == manifest["run_id"] and info["seed"] == 0
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"sft", "reward_model", "ppo"}
    sft, cfg, _ = load_checkpoint(out / "sft.npz", pipeline.DEMO_MODEL)
    adapter = lora.load_adapter(out / "adapter.npz", sft, cfg)
    part = on_disk["lora"]
    assert part["trainable_parameters"] == lora.n_trainable(adapter) == 16 * 4 * cfg.n_embd * cfg.n_layer
    assert part["full_trainable_parameters"] == sum(w.size for w in sft.values())
    assert part["adapter_bytes"] == os.path.getsize(out / "adapter.npz") < part["full_checkpoint_bytes"]
    assert any(np.abs(w).max() > 0 for k, w in adapter.weights.items() if k.endswith("lora_B"))  # it trained
    assert oct(os.stat(out / "adapter.npz").st_mode & 0o777) == oct(0o666 & ~current_umask())


@pytest.mark.parametrize("argv, algo", [(["--algo", "grpo", "--reward", "verifier"], "grpo"),
                                        (["--algo", "rloo"], "rloo")])
def test_a_critic_free_method_runs_in_stage_4(argv, algo, tmp_path):
    """No value model is kept; the RL stage's metrics are the method's, under TRL's names; the verifier
    trains on arithmetic prompts alone."""
    out = tmp_path / "run"
    summary = demo.main(TINY_RUN + argv + ["--out", str(out)])
    assert summary["rl"]["algo"] == algo and np.isfinite(summary["rl"]["gold_score"])
    manifest = runs.open_run(out)
    assert manifest["stages"] == ["sft", "reward_model", algo, "evaluation"]
    assert "value.npz" not in manifest["files"] and "policy.npz" in manifest["files"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["stage"] == algo]
    assert len(rl) == 2 and all({"reward", "reward_std", "frac_reward_zero_std", "objective/kl"} <= set(r) for r in rl)
    assert summary["rl"]["kl_exact"] > 0  # the policy moved (the exact KL along the samples; k1 may be < 0)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def numbers(summary):
    """Everything but the timings and the run's id."""
    return {k: v for k, v in summary.items() if k not in ("seconds", "args", "run_id")}


def test_same_seed_same_numbers(tiny_run, tmp_path):
    out, first = tiny_run
    again = demo.main(TINY_RUN + ["--out", str(tmp_path / "b")])
    assert numbers(first) == numbers(again)
    pa, _, _ = load_checkpoint(out / "policy.npz")
    pb, _, _ = load_checkpoint(tmp_path / "b" / "policy.npz")
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])


def test_a_run_at_a_temperature_samples_scores_and_evaluates_at_it(tmp_path, monkeypatch):
    """--temperature 0.7: every sampling call and every log-prob, entropy and exact KL of the samples, in
    training (PPO's rollouts and losses) and evaluation, uses tau = 0.7; SFT and the reward model use none."""
    seen = []

    def spy(module, name, position):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            tau = kwargs["temperature"] if "temperature" in kwargs else (
                args[position] if len(args) > position else "the default")
            seen.append((name, tau))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
    spy(tf, "generate", 6)
    spy(layers, "token_logprobs_forward", 2)
    spy(layers, "entropy_forward", 1)
    spy(kl, "exact_kl", 2)
    monkeypatch.setattr(pipeline, "token_logprobs_forward", layers.token_logprobs_forward)  # imported by name
    monkeypatch.setattr(pipeline, "exact_kl", kl.exact_kl)
    import minirlhf.ppo as ppo_module
    monkeypatch.setattr(ppo_module, "exact_kl", kl.exact_kl)
    summary = demo.main(TINY_RUN + ["--temperature", "0.7", "--out", str(tmp_path / "run")])
    assert summary["temperature"] == 0.7
    assert {name for name, _ in seen} == {"generate", "token_logprobs_forward", "entropy_forward", "exact_kl"}
    assert {tau for _, tau in seen} == {0.7}, sorted(set(seen))
    _, _, info = load_checkpoint(tmp_path / "run" / "policy.npz")
    assert info["sampling"]["temperature"] == 0.7


def test_interrupted_run_is_refused_by_consumers_and_re_made_with_force(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "train_reward_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.main(TINY_RUN + ["--out", str(out)])
    load_checkpoint(out / "sft.npz")  # the stage before the interruption saved a whole checkpoint
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    assert not (out / "summary.json").exists()
    with pytest.raises(ValueError, match="did not finish.*--force"):
        runs.load_run(out)
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:  # a re-run into it must say --force
        demo.parse_args(TINY_RUN + ["--out", str(out)])
    assert e.value.code == 2
    summary = demo.main(TINY_RUN + ["--out", str(out), "--force"])
    assert runs.load_run(out)["manifest"]["run_id"] == summary["run_id"]


@pytest.mark.parametrize("argv", [["--sft-steps", "-3"], ["--ppo-updates", "0"], ["--kl-coef", "-1"],
                                  ["--kl-coef", "inf"], ["--kl-target", "nan"], ["--no-such-flag"],
                                  ["--kl-target", "0"], ["--quick", "--full-reward-model"], ["--seed", "-1"],
                                  ["--temperature", "0"], ["--out", ""], ["--kl-horizon", "100"],
                                  ["--reward", "verifier"], ["--algo", "ppo2"], ["--algo", "grpo", "--kl-target", "1"],
                                  ["--algo", "dr_grpo", "--kl-coef", "0.1"], ["--lora", "0"], ["--lora", "65"],
                                  ["--lora-alpha", "8"], ["--lora", "4", "--lora-alpha", "0"],
                                  ["--lora", "4", "--lora-targets", "attn.w_q"], ["--lora-targets", "mlp.w_fc"]])
def test_bad_flags_give_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_full_reward_model_flag_sets_its_label_and_step_counts_unless_given():
    args = demo.parse_args(["--full-reward-model"])
    full = pipeline.FULL_REWARD_MODEL
    assert (args.labels, args.rm_steps) == (full["labels"], full["rm_steps"])
    assert args.sft_steps == pipeline.STEPS["default"]["sft_steps"]
    assert demo.parse_args(["--full-reward-model", "--rm-steps", "7"]).rm_steps == 7
    assert demo.parse_args(["--quick", "--sft-steps", "7"]).sft_steps == 7  # a typed flag wins over --quick
    assert pipeline.reward_config(1500, full=True).lr > pipeline.reward_config(1500).lr
