"""The PyTorch port (demos/port_torch.py) checked with the conformance kit and the fixtures where torch is
installed (skipped elsewhere), and a clean exit 0 where it is not: the transformer, the PPO and preference
losses, the critic-free methods and LoRA."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "demos", "port_torch.py")
CRITIC_FREE = {"grpo_advantages", "dr_grpo_advantages", "rloo_advantages", "reinforce_pp_advantages",
               "reinforce_pp_baseline", "token_loss", "sequence_loss", "sequence_loss_sum", "reinforce_loss",
               "token_weights", "aggregate", "kl_loss_k1", "kl_loss_k2", "kl_loss_k3", "kl_loss_rho_k3"}
LORA = {"lora_linear", "lora_merge", "lora_model"}  # and lora_init, a check without a fixture


def test_torch_port_agrees_with_minirlhf(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "h5_port_torch.json"
    run = subprocess.run([sys.executable, SCRIPT, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "all checks passed" in run.stdout, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert set(result["fixtures"]) == {"transformer", "value_model", "token_logprobs", "policy_loss", "value_loss",
                                       "bt_loss", "ppo_minibatch", *CRITIC_FREE, *LORA}
    assert set(result["kit"]) == set(result["fixtures"]) - {"ppo_minibatch"} | {"lora_init"}
    assert result["exact"] and all(r["ok"] for r in result["exact"].values())  # exact.py's protocol, plugged in
    assert max(result["fixtures"].values()) < 1e-10
    assert result["direct"]["logits_max_abs_diff"] < 1e-10 and result["direct"]["grads_max_diff_over_max_grad"] < 1e-10
    assert max(result["kit"].values()) < 1e-5


def test_without_torch_the_script_says_so_and_exits_0():
    code = (f"import runpy, sys; sys.modules['torch'] = None; sys.argv = [{SCRIPT!r}]; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torch is not installed" in run.stdout


def test_the_readmes_porting_example_runs_as_written(tmp_path, capsys):
    """The README's porting example (the python block after <!-- porting-example -->), run from a folder
    other than the checkout: both of its checks pass, and each prints its worst relative errors."""
    pytest.importorskip("torch")
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = readme.split("<!-- porting-example -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        exec(compile(block, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "r_chosen" in lines[0] and "grad.r_chosen" in lines[1]
