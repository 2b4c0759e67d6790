"""Bad input, probe by probe. Every command line, the checkpoint loaders, the public functions at
the boundary and the run folders are given what they cannot take. Each must refuse with the exception its
table row names, in a message matching the row's regex, which names the culprit (the flag, the argument, the
field or the file), and must change nothing: a library call leaves its arrays, parameter dicts and Generator
states bit for bit as they were; a command line exits 2 with argparse's usage error and no traceback, and
leaves the folders it was pointed at (a listing with the mode and sha256 of every file) as they were.

The run folders are also tested the hard way: a real `python -m minirlhf.demo --quick --force` run into a
copy of a finished one, stopped by SIGINT during SFT and by SIGKILL at a seeded random moment of its first
1.5 seconds; then every consumer is pointed at what is left, and a --force re-run must work.

One table per surface; a row is (the call, the exception, the regex).
"""
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import TINY_RUN
from minirlhf import annotator as A
from minirlhf import bench, demo, dpo, exact, fast, grpo, lora, optim, pipeline, ppo, runs, sft
from minirlhf import best_of_n as bon
from minirlhf import grpo_objective as go
from minirlhf import kl as K
from minirlhf import layers as L
from minirlhf import ppo_objective as po
from minirlhf import reward as R
from minirlhf import tokenizer as T
from minirlhf import transformer as tf
from minirlhf import world as W
from minirlhf.checkpoint import TMP_PREFIX, atomic_write, load_checkpoint, save_checkpoint
from minirlhf.kit import fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "demos"))
import _common as C  # noqa: E402
import dpo_puzzle  # noqa: E402
import explain_ranking  # noqa: E402
import frontier  # noqa: E402
import kl_sweep  # noqa: E402
import labelling_cost  # noqa: E402
import length_bias  # noqa: E402
import length_bias_grpo  # noqa: E402
import lora_rank  # noqa: E402
import reward_benchmark  # noqa: E402
import verifier  # noqa: E402


def _parser_only_port_torch():
    """demos/port_torch.py loaded under a name of its own with torch hidden (its flags need no torch, and
    importing torch costs seconds); the real module, if a test imports it, is untouched."""
    saved = sys.modules.get("torch", False)
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        spec = importlib.util.spec_from_file_location("port_torch_flags", os.path.join(REPO, "demos", "port_torch.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is False:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = saved
    return module


port_torch = _parser_only_port_torch()
SCRIPTS = {m.__name__: m for m in (dpo_puzzle, explain_ranking, frontier, kl_sweep, labelling_cost, length_bias,
                                   length_bias_grpo, lora_rank, reward_benchmark, verifier)}
PROGRAMS = {"demo": demo.parse_args, "bench": bench.main, "exact": exact.main, "fixtures": fixtures.main,
            "port_torch": port_torch.main, **{name: m.main for name, m in SCRIPTS.items()}}


# ---------------------------------------------------------------- what "changed nothing" means

def snapshot(x):
    """A picture of x to compare bit for bit: arrays by dtype, shape and bytes, Generators by their state,
    containers and dataclasses entry by entry, anything else by repr (so NaN equals NaN)."""
    if isinstance(x, np.ndarray):
        return ("array", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, np.random.Generator):
        return ("rng", repr(x.bit_generator.state))
    if isinstance(x, dict):
        return ("dict", tuple((repr(k), snapshot(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(snapshot(v) for v in x))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, tuple((f.name, snapshot(getattr(x, f.name))) for f in dataclasses.fields(x)))
    return ("value", repr(x))


def tree(folder):
    """Every file and folder under folder: its mode, and a file's sha256."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel, mode = os.path.relpath(path, folder), os.lstat(path).st_mode
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[rel] = (mode, hashlib.sha256(f.read()).hexdigest())
            else:
                out[rel] = (mode, None)
    return out


# ================================================================ 1. command lines

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The folders the command lines are pointed at: a file, a read-only folder, a finished run, a run that
    did not finish, a finished run with a stranger's file in it, a folder of files that are no run's."""
    d = tmp_path_factory.mktemp("cli")
    (d / "afile").write_text("not a folder\n")
    (d / "port.txt").write_text("x = 1\n")
    (d / "ro").mkdir()
    for name in ("finished", "unfinished", "foreign"):
        manifest = runs.start_run(str(d / name), {"probe": True}, seed=0)
        if name != "unfinished":
            runs.finish_run(str(d / name), manifest)
    (d / "foreign" / "notes.txt").write_text("mine\n")
    (d / "stranger").mkdir()
    (d / "stranger" / "data.csv").write_text("1,2\n")
    os.chmod(d / "ro", 0o555)
    yield d
    os.chmod(d / "ro", 0o755)


@pytest.fixture
def guard(monkeypatch, env):
    """Each program's first piece of work replaced by a failure (a probe that parses must not start a run),
    os.access as for a user who may not write in env/ro (the tests may run as root), and env as the working
    folder (so a default path lands where the listing sees it)."""
    def accepted(*args, **kwargs):
        raise AssertionError("the command line was accepted and its work began")
    for owner, name in ((C, "starting_point"), (pipeline, "run_sft"), (fast, "keep_freed_memory"),
                        (exact, "report"), (exact, "check_port"), (fixtures, "write_fixtures"),
                        (port_torch, "kit_ports")):
        monkeypatch.setattr(owner, name, accepted)
    real, read_only = os.access, str(env / "ro")

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(path).startswith(read_only):
            return False
        return real(path, mode, *args, **kwargs)
    monkeypatch.setattr(os, "access", access)
    monkeypatch.chdir(env)


def cli(prog, argv, match, xfail=None):
    """A command-line probe: prog's argv ({env} the folder above) must exit 2 with `match` on stderr."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(prog, argv, match, id=f"{prog} {' '.join(argv)}".replace("{env}", "ENV"), marks=marks)


def numeric(prog, flag, kind, extra=(), pick=None):
    """Probes of one numeric flag with what its type refuses (the values at the indices `pick`, or all): kind
    "count" (an integer >= 1), "seed" (>= 0), "positive" (a finite number > 0), "non_negative" (>= 0)."""
    f = re.escape(flag)
    bad = {"count": [("0", ">= 1"), ("-1", ">= 1"), ("1.5", "not an integer"), ("nan", "not an integer"),
                     ("abc", "not an integer")],
           "seed": [("-1", ">= 0"), ("1.5", "not an integer"), ("nan", "not an integer"), ("inf", "not an integer"),
                    ("abc", "not an integer")],
           "positive": [("0", "> 0"), ("-1", "> 0"), ("nan", "finite"), ("inf", "finite"), ("abc", "not a number")],
           "non_negative": [("-1", ">= 0"), ("nan", "finite"), ("inf", "finite"), ("abc", "not a number"),
                            ("-inf", "expected one argument")]}[kind]
    return [cli(prog, [*extra, flag, value], rf"argument (\S+/)?{f}(/\S+)?: .*{re.escape(says)}")
            for i, (value, says) in enumerate(bad) if pick is None or i in pick]


OUT = ["--out", "{env}/run"]
DEMO = [
    *numeric("demo", "--seed", "seed", OUT), *numeric("demo", "--kl-coef", "non_negative", OUT),
    *numeric("demo", "--kl-target", "positive", OUT), *numeric("demo", "--temperature", "positive", OUT),
    *numeric("demo", "--kl-horizon", "count", ["--kl-target", "1", *OUT], pick=(0, 3)),
    *numeric("demo", "--sft-steps", "count", OUT),
    *[p for flag in ("--rm-steps", "--updates", "--ppo-updates", "--labels", "--lora")
      for p in numeric("demo", flag, "count", OUT, pick=(0, 4))],
    *numeric("demo", "--lora-alpha", "positive", ["--lora", "4", *OUT]),
    cli("demo", ["--out", "{env}/afile"], r"--out: .*afile is a file, not a folder"),
    cli("demo", ["--out", "/dev/null"], r"--out: /dev/null is a file, not a folder"),
    cli("demo", ["--out", ""], r"--out: the run folder is an empty path"),
    cli("demo", ["--out", " "], r"--out: the run folder is an empty path"),
    cli("demo", ["--out"], r"argument --out: expected one argument"),
    cli("demo", ["--out", "{env}/ro"], r"--out: .*ro: the folder is not writable"),
    cli("demo", ["--out", "{env}/ro/new"], r"--out: .*ro/new: .*ro is not writable"),
    cli("demo", ["--out", "{env}/afile/new"], r"--out: .*afile/new: .*afile is a file, not a folder"),
    cli("demo", ["--out", "{env}/finished"], r"--out: .*finished holds another run \(finished, seed 0.*--force"),
    cli("demo", ["--out", "{env}/unfinished"], r"--out: .*unfinished holds another run \(running.*--force"),
    cli("demo", ["--out", "{env}/foreign", "--force"], r"--out: .*notes.txt belong to no run.*move them"),
    cli("demo", ["--out", "{env}/stranger", "--force"], r"--out: .*stranger is not empty and holds no run"),
    cli("demo", ["--algo", "grpo", "--kl-target", "1", *OUT], r"--kl-target is PPO's adaptive controller"),
    cli("demo", ["--reward", "verifier", *OUT], r"--reward verifier needs a critic-free --algo"),
    cli("demo", ["--algo", "dr_grpo", "--kl-coef", "0.1", *OUT], r"--kl-coef: --algo dr_grpo has no KL term"),
    cli("demo", ["--kl-horizon", "100", *OUT], r"--kl-horizon needs --kl-target"),
    cli("demo", ["--kl-target", "1", "--kl-horizon", "5", *OUT], r"--kl-horizon must exceed 12.8"),
    cli("demo", ["--lora-alpha", "8", *OUT], r"--lora-alpha and --lora-targets need --lora"),
    cli("demo", ["--lora-targets", "mlp.w_fc", *OUT], r"--lora-alpha and --lora-targets need --lora"),
    cli("demo", ["--lora", "65", *OUT], r"--lora: LoRAConfig.rank=65 exceeds min\(d_in, d_out\) = 64"),
    cli("demo", ["--lora", "4", "--lora-targets", "attn.w_q", *OUT], r"argument --lora-targets: invalid choice"),
    cli("demo", ["--quick", "--full-reward-model", *OUT], r"--quick and --full-reward-model do not go together"),
    cli("demo", ["--algo", "ppo2", *OUT], r"argument --algo: invalid choice: 'ppo2'"),
    cli("demo", ["--reward", "human", *OUT], r"argument --reward: invalid choice: 'human'"),
    cli("demo", ["--no-such-flag", *OUT], r"unrecognized arguments: --no-such-flag"),
    cli("demo", ["--kl-coef", "0", "--kl-target", "1", *OUT], r"--kl-target.*--kl-coef"),
]

BENCH = [
    *numeric("bench", "--steps", "count"), *numeric("bench", "--batch", "count"),
    cli("bench", ["--batch", "100000000"], r"--batch: .*100000000 sequences .* GiB of memory, more than"),
    cli("bench", ["--json", "{env}"], r"argument --json: .* must name a file, not a folder"),
    cli("bench", ["--json", ""], r"argument --json: '' must name a file, not nothing"),
    cli("bench", ["--json", "{env}/nope/b.json"], r"argument --json: .*the folder .*nope does not exist"),
    cli("bench", ["--json", "{env}/afile/b.json"], r"argument --json: .*afile is a file, not a folder"),
]

EXACT = [
    *numeric("exact", "--seed", "seed"),
    cli("exact", ["--json", "{env}"], r"argument --json: .* must name a file, not a folder"),
    cli("exact", ["--json", ""], r"argument --json: '' must name a file"),
    cli("exact", ["--json", "{env}/nope/e.json"], r"argument --json: .*does not exist"),
    cli("exact", ["--port", "{env}/nope.py"], r"argument --port: .*nope.py' is no such file"),
    cli("exact", ["--port", "{env}"], r"argument --port: .* is a folder"),
    cli("exact", ["--port", "{env}/port.txt"], r"argument --port: .*port.txt' is not a Python file"),
]

FIXTURES = [
    cli("fixtures", [], r"the following arguments are required: --out"),
    cli("fixtures", ["--out"], r"argument --out: expected one argument"),
    cli("fixtures", ["--out", "{env}/fx", "--only", "nope"], r"argument --only: invalid choice: 'nope'"),
    cli("fixtures", ["--out", "{env}/afile"], r"argument --out: .*afile"),
    cli("fixtures", ["--out", "/dev/null"], r"argument --out: /dev/null"),
    cli("fixtures", ["--out", ""], r"argument --out: "),
]


def common(prog, starts_from_a_run=True):
    """The probes of the flags every script in demos/ has (demos/_common.py)."""
    run = ["--run", "{env}/nope"] if starts_from_a_run else []
    probes = [*numeric(prog, "--seed", "seed", run, pick=(0,)),
              cli(prog, ["--json", "{env}", *run], r"--json: .* must name a file, not a folder"),
              cli(prog, ["--json", "", *run], r"--json: '' must name a file, not nothing"),
              cli(prog, ["--plot", "{env}", *run], r"--plot: .* must name a file, not a folder")]
    if starts_from_a_run:
        probes += [cli(prog, ["--quick", "--run", ""], r"argument --run: the run folder is an empty path"),
                   cli(prog, ["--quick", "--run", "{env}/afile"], r"argument --run: .*afile is a file, not a run")]
    return probes


R_ = ["--run", "{env}/nope"]
SCRIPT_FLAGS = [
    *common("dpo_puzzle"), *numeric("dpo_puzzle", "--beta", "positive", R_)[:4],
    *numeric("dpo_puzzle", "--steps", "count", R_)[:2], *numeric("dpo_puzzle", "--pairs", "count", R_)[:2],
    cli("dpo_puzzle", ["--quick", "--labels", "0", *R_], r"argument --labels: must be an integer >= 1"),
    *common("explain_ranking"),
    cli("explain_ranking", ["--k", "1", *R_], r"--k must be >= 2"),
    cli("explain_ranking", ["--k", "0", *R_], r"argument --k: must be an integer >= 1"),
    cli("explain_ranking", ["--k", "nan", *R_], r"argument --k: not an integer"),
    *common("frontier"),
    cli("frontier", ["--dpo-betas", "nan", *R_], r"argument --dpo-betas: must be a finite number"),
    cli("frontier", ["--kl-coefs", "0.1", "-0.1", *R_], r"argument --kl-coefs: must be a finite number >= 0"),
    cli("frontier", ["--group-sizes", "1", *R_], r"--group-sizes must lie in \[2, 64\]"),
    cli("frontier", ["--group-sizes", "65", *R_], r"--group-sizes must lie in \[2, 64\]"),
    cli("frontier", ["--budgets", "0", *R_], r"argument --budgets: must be a finite number > 0"),
    cli("frontier", ["--bon-ns", "0", *R_], r"argument --bon-ns: must be an integer >= 1"),
    cli("frontier", ["--quick", "--eval-prompts", "0", *R_], r"argument --eval-prompts: must be an integer >= 1"),
    cli("frontier", ["--cf-methods", "ppo", *R_], r"argument --cf-methods: invalid choice: 'ppo'"),
    *common("kl_sweep"),
    cli("kl_sweep", ["--json", "{env}/afile/x.json", *R_], r"--json: .*afile is a file, not a folder"),
    cli("kl_sweep", ["--plot", "{env}/nope/x.png", *R_], r"--plot: .*the folder .*nope does not exist"),
    cli("kl_sweep", ["--quick", "--run", "/dev/null"], r"argument --run: /dev/null is a file, not a run folder"),
    cli("kl_sweep", ["--kl-coefs", "-0.1", *R_], r"argument --kl-coefs: must be a finite number >= 0"),
    cli("kl_sweep", ["--quick", "--kl-coefs", "-1", *R_], r"argument --kl-coefs: must be a finite number >= 0"),
    *numeric("kl_sweep", "--batch-size", "count", R_)[:2], *numeric("kl_sweep", "--lr", "positive", R_)[:3],
    cli("kl_sweep", ["--ppo-updates", "nan", *R_], r"argument --ppo-updates: not an integer"),
    cli("kl_sweep", ["--eval-prompts", "-1", *R_], r"argument --eval-prompts: must be an integer >= 1"),
    *common("labelling_cost"),
    cli("labelling_cost", ["--labels", "8", "0", *R_], r"argument --labels: must be an integer >= 1"),
    cli("labelling_cost", ["--quick", "--labels", "0", *R_], r"argument --labels: must be an integer >= 1"),
    cli("labelling_cost", ["--seeds", "0", *R_], r"argument --seeds: must be an integer >= 1"),
    cli("labelling_cost", ["--val-labels", "nan", *R_], r"argument --val-labels: not an integer"),
    cli("labelling_cost", ["--kl-coef", "inf", *R_], r"argument --kl-coef: must be a finite number"),
    *common("length_bias"),
    cli("length_bias", ["--length-bias", "0", *R_], r"argument --length-bias: must be a finite number > 0"),
    cli("length_bias", ["--quick", "--length-bias", "-1", *R_], r"argument --length-bias: .*> 0"),
    cli("length_bias", ["--labels", "0", *R_], r"argument --labels: must be an integer >= 1"),
    cli("length_bias", ["--batch-size", "0", *R_], r"argument --batch-size: must be an integer >= 1"),
    *common("length_bias_grpo"),
    cli("length_bias_grpo", ["--group-size", "1", *R_], r"argument --group-size: must be an integer >= 2"),
    cli("length_bias_grpo", ["--quick", "--group-size", "1", *R_], r"argument --group-size: .*>= 2"),
    cli("length_bias_grpo", ["--seeds", "0", "-1", *R_], r"argument --seeds: must be an integer >= 0"),
    cli("length_bias_grpo", ["--updates", "0", *R_], r"argument --updates: must be an integer >= 1"),
    cli("length_bias_grpo", ["--kl-coef", "-1", *R_], r"argument --kl-coef: must be a finite number >= 0"),
    *common("lora_rank"),
    cli("lora_rank", ["--ranks", "1", "65", *R_], r"a rank must be <= n_embd = 64"),
    cli("lora_rank", ["--quick", "--grid-rank", "65", *R_], r"a rank must be <= n_embd = 64"),
    cli("lora_rank", ["--ranks", "0", *R_], r"argument --ranks: must be an integer >= 1"),
    cli("lora_rank", ["--alpha", "0", *R_], r"argument --alpha: must be a finite number > 0"),
    cli("lora_rank", ["--lr-multipliers", "inf", *R_], r"argument --lr-multipliers: must be a finite number"),
    cli("lora_rank", ["--drift-dtypes", "float8", *R_], r"argument --drift-dtypes: invalid choice: 'float8'"),
    cli("lora_rank", ["--drift-cycles", "0", *R_], r"argument --drift-cycles: must be an integer >= 1"),
    *common("reward_benchmark", starts_from_a_run=False),
    cli("reward_benchmark", ["--quick", "--full"], r"--quick and --full do not go together"),
    cli("reward_benchmark", ["--seeds", "-1"], r"argument --seeds: must be an integer >= 0"),
    cli("reward_benchmark", ["--labels", "0"], r"argument --labels: must be an integer >= 1"),
    cli("reward_benchmark", ["--rankings", "0"], r"argument --rankings: must be an integer >= 1"),
    cli("reward_benchmark", ["--quick", "--sft-steps", "-5"], r"argument --sft-steps: must be an integer >= 1"),
    *common("verifier"),
    cli("verifier", ["--group-size", "1", *R_], r"argument --group-size: must be an integer >= 2"),
    cli("verifier", ["--arms", "nope", *R_], r"argument --arms: invalid choice: 'nope'"),
    cli("verifier", ["--kl-coef", "nan", *R_], r"argument --kl-coef: must be a finite number"),
    cli("verifier", ["--quick", "--updates", "0", *R_], r"argument --updates: must be an integer >= 1"),
    cli("port_torch", ["--json", "{env}"], r"argument --json: .* must name a file, not a folder"),
    cli("port_torch", ["--json", ""], r"argument --json: '' must name a file"),
    cli("port_torch", ["--quick", "--json", "{env}/nope/p.json"], r"argument --json: .*does not exist"),
    cli("port_torch", ["--fixtures", "{env}/nope"], r"argument --fixtures: .*nope' is not a folder of fixtures"),
    cli("port_torch", ["--fixtures", "{env}/afile"], r"argument --fixtures: .*afile' is not a folder of fixtures"),
]

CLI = DEMO + BENCH + EXACT + FIXTURES + SCRIPT_FLAGS


@pytest.mark.parametrize("prog, argv, match", CLI)
def test_a_bad_command_line_is_a_usage_error_and_changes_nothing(prog, argv, match, env, guard, capsys):
    argv = [a.format(env=env) for a in argv]
    before = tree(env)
    with pytest.raises(SystemExit) as e:
        PROGRAMS[prog](argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert ("usage:" in err or "error:" in err) and "Traceback" not in err, err
    assert re.search(match, err), err
    assert tree(env) == before


# Under --quick, a flag the user typed wins over the quick preset; the preset fills the rest.
QUICK_WINS = [("demo", ["--quick", "--sft-steps", "7"], {"sft_steps": 7}),
              ("demo", ["--quick", "--labels", "9", "--updates", "2"], {"labels": 9, "ppo_updates": 2}),
              ("dpo_puzzle", ["--quick", "--steps", "7"], {"steps": 7}),
              ("frontier", ["--quick", "--kl-coefs", "0.3", "--dpo-steps", "5"], {"kl_coefs": [0.3],
                                                                                   "dpo_steps": 5}),
              ("kl_sweep", ["--quick", "--kl-coefs", "0.3", "--ppo-updates", "5"], {"kl_coefs": [0.3],
                                                                                    "ppo_updates": 5}),
              ("labelling_cost", ["--quick", "--labels", "3", "--seeds", "2"], {"labels": [3], "seeds": 2}),
              ("length_bias", ["--quick", "--length-bias", "0.5", "--labels", "20"], {"length_bias": [0.5],
                                                                                       "labels": 20}),
              ("length_bias_grpo", ["--quick", "--group-size", "3"], {"group_size": 3}),
              ("lora_rank", ["--quick", "--ranks", "3", "--alpha", "2"], {"ranks": [3], "alpha": 2.0}),
              ("reward_benchmark", ["--quick", "--rankings", "12"], {"rankings": 12}),
              ("verifier", ["--quick", "--updates", "3", "--group-size", "2"], {"updates": 3, "group_size": 2})]


@pytest.mark.parametrize("prog, argv, typed", QUICK_WINS, ids=[f"{p} {' '.join(a)}" for p, a, _ in QUICK_WINS])
def test_under_quick_a_typed_flag_wins(prog, argv, typed, env, guard, monkeypatch):
    if prog == "demo":
        args, preset = demo.parse_args(argv + ["--out", str(env / "run")]), pipeline.STEPS["quick"]
    else:
        seen, real_parse = [], C.parse
        monkeypatch.setattr(C, "parse", lambda *a, **k: seen.append(real_parse(*a, **k)) or seen[-1])
        with pytest.raises(AssertionError, match="its work began"):  # parsed, and stopped at its first work
            PROGRAMS[prog](argv + (["--run", str(env / "nope")] if prog != "reward_benchmark" else []))
        args, preset = seen[0], SCRIPTS[prog].QUICK
    for key, value in {**preset, **typed}.items():
        assert getattr(args, key) == value, key


# ================================================================ 2. the checkpoint loaders

CK = tf.GPTConfig(vocab_size=11, n_ctx=8, n_layer=1, n_head=2, n_embd=8)


def npz(arrays, meta=None):
    buf = io.BytesIO()  # (np.savez has an allow_pickle argument from numpy 2.1 on; before, it names an array)
    np.savez(buf, **({} if meta is None else {"__meta__": np.array(json.dumps(meta))}), **arrays)
    return buf.getvalue()


def flip_member(raw, member):
    """raw with one bit flipped in the middle of a member's data (the zip's CRC-32 must catch it)."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = z.getinfo(member)
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    out = bytearray(raw)
    out[start + info.file_size // 2] ^= 0x10
    return bytes(out)


def zip_of(name, text):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, text)
    return buf.getvalue()


def a_model(params, cfg, info=None):
    """The parts of a minirlhf checkpoint, to edit: (arrays, meta)."""
    return dict(params), {"config": vars(cfg), "extra_shapes": {}, "info": info or {}}


def edited(params, cfg, change, info=None):
    arrays, meta = a_model(params, cfg, info)
    change(arrays, meta)
    return npz(arrays, meta)


def _set(d, key, value):
    d[key] = value


def _wrong_config(meta, **fields):
    meta["config"] = {**meta["config"], **fields}


def _deeper(meta):
    _wrong_config(meta, n_layer=meta["config"]["n_layer"] + 1)


# Damage done to a model checkpoint: name -> (bytes of the damaged file from (raw, params, cfg), regex).
DAMAGE = {
    "truncated": (lambda raw, p, c: raw[:len(raw) // 2], r"not an \.npz checkpoint \(not a zip archive: truncated"),
    "tail cut": (lambda raw, p, c: raw[:-64], r"not an \.npz checkpoint \(not a zip archive"),
    "empty": (lambda raw, p, c: b"", r"the file is empty"),
    "bit flipped": (lambda raw, p, c: flip_member(raw, "h0.mlp.w_fc.npy"),
                    r"the archive is damaged \(BadZipFile: Bad CRC-32 for file 'h0.mlp.w_fc.npy'"),
    "random bytes": (lambda raw, p, c: np.random.default_rng(1).bytes(4000), r"not an \.npz checkpoint"),
    "pickled": (lambda raw, p, c: npz({"wte": np.array([{"a": 1}], dtype=object)}, a_model(p, c)[1]),
                r"holds pickled data, which minirlhf never writes and refuses to load"),
    "a zip of text": (lambda raw, p, c: zip_of("readme.txt", "hello"), r"not a minirlhf checkpoint \(no __meta__"),
    "an npz without meta": (lambda raw, p, c: npz(p), r"not a minirlhf checkpoint \(no __meta__ entry\)"),
    "meta not json": (lambda raw, p, c: zip_of("__meta__.npy", "{{"), r"its __meta__ entry is not readable JSON"),
    "config unreadable": (lambda raw, p, c: edited(p, c, lambda a, m: _wrong_config(m, vocab_size="x")),
                          r"its config is unreadable"),
    "missing parameter": (lambda raw, p, c: edited(p, c, lambda a, m: a.pop("ln_f.b")), r"missing \['ln_f.b'\]"),
    "extra parameter": (lambda raw, p, c: edited(p, c, lambda a, m: _set(a, "stray", np.zeros(2))),
                        r"unexpected \['stray'\]"),
    "wrong shape": (lambda raw, p, c: edited(p, c, lambda a, m: _set(a, "h0.mlp.w_fc", np.zeros((c.n_embd, 3),
                                                                                              np.float32))),
                    r"h0.mlp.w_fc has shape \(\d+, 3\), its config says"),
    "another config": (lambda raw, p, c: edited(p, c, lambda a, m: _deeper(m)),
                       r"missing \['h1\."),
    "int dtype": (lambda raw, p, c: edited(p, c, lambda a, m: _set(a, "wte", a["wte"].astype(np.int32))),
                  r"parameter wte has dtype int32, not a float type"),
    "string dtype": (lambda raw, p, c: edited(p, c, lambda a, m: _set(a, "wte", a["wte"].astype(str))),
                     r"parameter wte has dtype <U\d+, not a float type"),
    "nan": (lambda raw, p, c: edited(p, c, lambda a, m: _set(a, "wte", np.full_like(a["wte"], np.nan))),
            r"parameter wte holds NaN or inf"),
    "inf": (lambda raw, p, c: edited(p, c, lambda a, m: _set(a, "ln_f.g", np.full_like(a["ln_f.g"], np.inf))),
            r"parameter ln_f.g holds NaN or inf"),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A good checkpoint of CK and a good rank-2 adapter for it, as bytes, with their arrays."""
    d = tmp_path_factory.mktemp("good")
    params = tf.init_params(CK, np.random.default_rng(0))
    save_checkpoint(str(d / "m.npz"), params, CK, info={"stage": "sft"})
    adapter = lora.init_adapter(params, CK, lora.LoRAConfig(2), np.random.default_rng(1))
    lora.save_adapter(str(d / "a.npz"), adapter)
    return SimpleNamespace(params=params, raw=(d / "m.npz").read_bytes(), adapter=adapter,
                           adapter_raw=(d / "a.npz").read_bytes())


def names_the_file(path, match, message):
    """The message opens with the file's path and says what is wrong with it."""
    assert message.startswith(str(path)) and re.search(match, message), message


def loader_probe(tmp_path, content, load):
    """Write content (bytes) to a file, or make a folder (content "a folder"), or nothing ("missing"); load it;
    return (path, the exception) after checking that the load changed nothing on disk."""
    path = tmp_path / "ck.npz"
    if content == "a folder":
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    before = tree(tmp_path)
    with pytest.raises(ValueError) as e:
        load(str(path))
    assert tree(tmp_path) == before
    return path, e.value


@pytest.mark.parametrize("kind", list(DAMAGE) + ["a folder", "missing"])
def test_load_checkpoint_refuses_naming_the_file(kind, ckpt, tmp_path):
    content = kind if kind in ("a folder", "missing") else DAMAGE[kind][0](ckpt.raw, ckpt.params, CK)
    match = {"a folder": r"not a file", "missing": r"no such checkpoint file"}.get(kind) or DAMAGE[kind][1]
    path, e = loader_probe(tmp_path, content, load_checkpoint)
    names_the_file(path, match, str(e))


@pytest.mark.parametrize("expect, match", [
    ({"expect_config": tf.GPTConfig(11, 8, 1, 2, 16)}, r"a checkpoint of another model \(.*'n_embd': 8.*'n_embd': 16"),
    ({"expect_extra": {"head.w", "head.b"}}, r"has extra parameters \[\], expected \['head.b', 'head.w'\]")])
def test_load_checkpoint_refuses_a_checkpoint_of_another_model(expect, match, ckpt, tmp_path):
    path, e = loader_probe(tmp_path, ckpt.raw, lambda p: load_checkpoint(p, **expect))
    names_the_file(path, match, str(e))


def adapter_parts(ckpt):
    return dict(ckpt.adapter.weights), {"kind": lora.KIND, "config": {**vars(ckpt.adapter.config),
                                                                        "targets": list(ckpt.adapter.config.targets)},
                                        "base": ckpt.adapter.base}


def adapter_edit(change):
    def content(ckpt):
        arrays, meta = adapter_parts(ckpt)
        change(arrays, meta)
        return npz(arrays, meta)
    return content


A0 = "h0.attn.w_qkv.lora_A"
ADAPTER_DAMAGE = {
    "truncated": (lambda k: k.adapter_raw[:len(k.adapter_raw) // 2], r"not an \.npz checkpoint"),
    "empty": (lambda k: b"", r"the file is empty"),
    "bit flipped": (lambda k: flip_member(k.adapter_raw, A0 + ".npy"), r"the archive is damaged \(BadZipFile"),
    "random bytes": (lambda k: np.random.default_rng(2).bytes(3000), r"not an \.npz checkpoint"),
    "pickled": (lambda k: npz({A0: np.array([None], dtype=object)}, adapter_parts(k)[1]), r"holds pickled data"),
    "a zip of text": (lambda k: zip_of("readme.txt", "hi"), r"not a minirlhf checkpoint \(no __meta__"),
    "a model checkpoint": (lambda k: k.raw, r"not a LoRA adapter file"),
    "config unreadable": (adapter_edit(lambda a, m: m["config"].update(rank=0)), r"its LoRA config is unreadable"),
    "another base": (adapter_edit(lambda a, m: _set(m, "base", "sha256:" + "0" * 64)),
                     r"made for another base model"),
    "missing weight": (adapter_edit(lambda a, m: a.pop(A0)), r"weights do not match its config: missing \['h0.attn"),
    "extra weight": (adapter_edit(lambda a, m: _set(a, "stray.lora_A", np.zeros((2, 2), np.float32))),
                     r"extra \['stray.lora_A'\]"),
    "wrong shape": (adapter_edit(lambda a, m: _set(a, A0, np.zeros((8, 3), np.float32))),
                    r"h0.attn.w_qkv.lora_A has shape \(8, 3\), rank 2 needs \(8, 2\)"),
    "int dtype": (adapter_edit(lambda a, m: _set(a, A0, a[A0].astype(np.int32))), r"lora_A has dtype int32, not a"),
    "float64 weight": (adapter_edit(lambda a, m: _set(a, A0, a[A0].astype(np.float64))),
                       r"lora_A is float64, the base is float32"),
    "nan": (adapter_edit(lambda a, m: _set(a, A0, np.full_like(a[A0], np.nan))), r"lora_A holds NaN or inf"),
}


@pytest.mark.parametrize("kind", list(ADAPTER_DAMAGE) + ["a folder", "missing"])
def test_load_adapter_refuses_naming_the_file(kind, ckpt, tmp_path):
    content = kind if kind in ("a folder", "missing") else ADAPTER_DAMAGE[kind][0](ckpt)
    match = {"a folder": r"not a file", "missing": r"no such checkpoint file"}.get(kind) or ADAPTER_DAMAGE[kind][1]
    before = snapshot(ckpt.params)
    path, e = loader_probe(tmp_path, content, lambda p: lora.load_adapter(p, ckpt.params, CK))
    names_the_file(path, match, str(e))
    assert snapshot(ckpt.params) == before


def test_load_adapter_refuses_another_base_and_another_config(ckpt, tmp_path):
    other = {k: v + 1 for k, v in ckpt.params.items()}  # the same shapes, another model
    for load, match in ((lambda p: lora.load_adapter(p, other, CK), r"made for another base model"),
                        (lambda p: lora.load_adapter(p, ckpt.params, CK, expect_config=lora.LoRAConfig(4)),
                         r"an adapter of rank 2 .* expected LoRAConfig\(rank=4")):
        path, e = loader_probe(tmp_path, ckpt.adapter_raw, load)
        names_the_file(path, match, str(e))
        path.unlink()


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the session's finished tiny demo run, to damage."""
    folder = tmp_path / "run"
    shutil.copytree(tiny_run[0], folder)
    return folder


def rehash(folder, name):
    """Record name's present bytes in the manifest, as if the run had written them: the checkpoint's own
    checks must then catch what the manifest no longer can."""
    manifest = runs.read_manifest(str(folder))
    manifest["files"][name] = runs.sha256(str(folder / name))
    (folder / runs.MANIFEST).write_text(json.dumps(manifest))


RUN_DAMAGE = ["truncated", "empty", "bit flipped", "random bytes", "pickled", "a zip of text", "missing parameter",
              "another config", "int dtype", "nan"]


@pytest.mark.parametrize("recorded", [False, True], ids=["after the run", "recorded in the manifest"])
@pytest.mark.parametrize("kind", RUN_DAMAGE)
def test_load_run_refuses_a_damaged_checkpoint_naming_it(kind, recorded, run_copy):
    path = run_copy / "sft.npz"
    params, cfg, info = load_checkpoint(str(path))
    path.write_bytes(DAMAGE[kind][0](path.read_bytes(), params, cfg))
    if recorded:
        rehash(run_copy, "sft.npz")
    match = DAMAGE[kind][1] if recorded else r"changed since its run wrote it .*re-make the run with .*--force"
    if recorded and kind == "another config":
        match = r"a checkpoint of another model"  # the demos ask for the demo's model: load_run(folder, DEMO_MODEL)
    before = tree(run_copy)
    with pytest.raises(ValueError) as e:
        runs.load_run(str(run_copy), pipeline.DEMO_MODEL)
    names_the_file(path, match, str(e.value))
    assert tree(run_copy) == before


# ================================================================ 3. public functions at the boundary

CFG = tf.GPTConfig(vocab_size=T.VOCAB_SIZE, n_ctx=16, n_layer=1, n_head=2, n_embd=8)


@pytest.fixture(scope="module")
def w():
    """A tiny world: a model on the real vocabulary, a reward model from it, a policy that samples 4 tokens."""
    rng = np.random.default_rng(0)
    params = tf.init_params(CFG, rng)
    rm = R.RewardModel(R.init_reward_params(params, CFG, rng), CFG)
    return SimpleNamespace(params=params, rm=rm, policy=tf.Policy(params, CFG, tf.Sampling(1.0, 4)),
                           cmp=A.Comparison("hi!", ("hello.", "hi."), (True, True), (0, 1)), V=T.VOCAB_SIZE)


def call(fn, *args, **kwargs):
    return fn, args, kwargs


def lib(name, build, match, exc=ValueError, xfail=None):
    """A library probe: build(w) -> call(fn, *args) must raise exc matching `match`, changing no input."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(build, exc, match, id=name, marks=marks)


def z(*shape, value=0.0):
    return np.full(shape, value)


def ones(*shape):
    return np.ones(shape, np.int64)


def holes(*shape, at=(0, 0), value=np.nan):
    x = np.zeros(shape)
    x[at] = value
    return x


def logits(B=2, T_=3, V=5, seed=0):
    return np.random.default_rng(seed).standard_normal((B, T_, V))


def masked(rows):
    """A (B, T) mask from rows of 0/1 (or anything else)."""
    return np.array(rows)


TARGETS = np.array([[0, 1, 2], [3, 4, 0]])
RNG = np.random.default_rng  # a fresh Generator per probe: its state must not move

LENGTHS = [  # lengths that zip (or broadcasting) would silently pair up
    lib("reward.score 2 prompts 1 response", lambda w: call(R.score, w.rm, ["hi!", "hi."], ["hello."]),
        r"2 prompts but 1 responses"),
    lib("reward.score_samples 2 prompts 1 sample", lambda w: call(R.score_samples, w.rm, ["hi!", "hi."],
                                                                   [("hello.", True)]), r"2 prompts but 1 samples"),
    lib("reward.encode_responses", lambda w: call(R.encode_responses, ["hi!"], ["a", "b"]), r"1 prompts but 2"),
    lib("reward.sequence_scores ended too short", lambda w: call(R.sequence_scores, w.rm, ones(2, 3), ones(2, 3),
                                                                 np.array([True])),
        r"ended must be a bool array of shape \(2,\)"),
    lib("reward.sequence_scores ended as ints", lambda w: call(R.sequence_scores, w.rm, ones(2, 3), ones(2, 3),
                                                               np.array([1, 0])), r"ended must be a bool array"),
    lib("reward.expected_agreement", lambda w: call(R.expected_agreement, np.zeros(2), np.zeros(1), np.ones(2) / 2),
        r"r_a, r_b and p_a must have one shape"),
    lib("reward.bt_loss_forward", lambda w: call(R.bt_loss_forward, np.zeros(2), np.zeros(1)),
        r"chosen and rejected rewards must be 1-D of one non-zero size"),
    lib("dpo.dpo_loss_forward", lambda w: call(dpo.dpo_loss_forward, z(2), z(2), z(1), z(2)),
        r"four log-prob arrays must be 1-D of one non-zero size"),
    lib("dpo.sequence_logprobs_forward", lambda w: call(dpo.sequence_logprobs_forward, w.policy, ["hi!", "hi."],
                                                        ["a"]), r"one response per prompt.*2 prompts and 1"),
    lib("world.behaviour_metrics", lambda w: call(W.behaviour_metrics, ["hi!"], ["a", "b"]),
        r"lengths differ: 1 prompts, 2 responses"),
    lib("kl.token_rewards scores", lambda w: call(K.token_rewards, z(3), z(2, 2), z(2, 2), ones(2, 2), 0.1),
        r"scores has shape \(3,\) but mask has shape \(2, 2\)"),
    lib("kl.kl_estimators", lambda w: call(K.kl_estimators, z(1, 2), z(1, 3), ones(1, 2)),
        r"logp_ref has shape \(1, 3\) but mask has shape \(1, 2\)"),
    lib("kl.exact_kl", lambda w: call(K.exact_kl, logits(), logits()[:, :2]), r"logits has shape .* but logits_ref"),
    lib("grpo_objective.broadcast", lambda w: call(go.broadcast, z(3), ones(2, 2)), r"advantages has shape \(3,\)"),
    lib("grpo_objective.grpo_advantages groups", lambda w: call(go.grpo_advantages, z(4), np.array([0, 0, 1])),
        r"rewards \(B,\) need integer groups \(B,\)"),
    lib("grpo_objective.sequence_loss_forward", lambda w: call(go.sequence_loss_forward, z(2, 2), z(2, 2), z(3),
                                                               ones(2, 2)), r"advantages must be finite with shape"),
    lib("best_of_n.evaluate_best_of_n groups", lambda w: call(bon.evaluate_best_of_n, z(2, 3), z(2, 3), [0], [1]),
        r"must be \(P, m\) with P groups"),
    lib("best_of_n.empirical_bon", lambda w: call(bon.empirical_bon, z(3), z(2), 2), r"scores and values must be 1-D"),
    lib("best_of_n.bon_ratio", lambda w: call(bon.bon_ratio, np.ones(2) / 2, z(3), 2), r"p_ref and rewards must be"),
    lib("annotator.sample_comparisons", lambda w: call(A.sample_comparisons, ["hi!", "hi."], lambda t, r: [("a", 1)],
                                                       2, A.AnnotatorConfig(), RNG(0)),
        r"sample_fn returned 1 responses for 4 prompts"),
    lib("exact.chi_square_p", lambda w: call(exact.chi_square_p, [1, 2, 3], [1, 2]),
        r"observed \(3,\) and expected \(2,\) counts"),
    lib("lora.merge (4, 1) update", lambda w: call(lora.merge, z(4, 4), z(4, 1), z(1, 1), 1.0),
        r"merge: A \(4, 1\) B \(1, 1\) is not the shape of the weight \(4, 4\)"),
    lib("lora.unmerge", lambda w: call(lora.unmerge, z(4, 4), z(4, 2), z(2, 3), 1.0), r"unmerge: A \(4, 2\) B"),
    lib("lora.lora_linear_forward", lambda w: call(lora.lora_linear_forward, z(1, 4), z(4, 4), z(4), z(4, 1),
                                                   z(2, 4), 1.0), r"LoRA shapes do not fit"),
    lib("ppo_objective.gae", lambda w: call(po.gae, z(1, 3), z(1, 2), ones(1, 3)), r"values has shape \(1, 2\)"),
    lib("ppo_objective.explained_variance", lambda w: call(po.explained_variance, z(1, 3), z(2, 3), ones(1, 3)),
        r"returns has shape \(2, 3\)"),
    lib("tokenizer.pad_batch length", lambda w: call(T.pad_batch, [[1, 2, 3]], length=2),
        r"a sequence of length 3 does not fit in length=2"),
    lib("layers.cross_entropy_forward mask", lambda w: call(L.cross_entropy_forward, logits(), TARGETS, ones(2, 2)),
        r"cross_entropy: mask must be .* of the targets' shape \(2, 3\)"),
    lib("layers.token_logprobs_forward targets", lambda w: call(L.token_logprobs_forward, logits(), TARGETS[:, :2]),
        r"targets must be integer ids of shape \(2, 3\)"),
]

IDS = [  # negative or out-of-vocabulary token ids
    lib("layers.token_logprobs_forward target -1", lambda w: call(L.token_logprobs_forward, logits(),
                                                                  np.array([[0, -1, 2], [3, 4, 0]])),
        r"target id -1 is outside \[0, 5\)"),
    lib("layers.cross_entropy_forward target 5", lambda w: call(L.cross_entropy_forward, logits(),
                                                                np.array([[0, 5, 2], [3, 4, 0]]), ones(2, 3)),
        r"target id 5 is outside \[0, 5\)"),
    lib("dpo.sequence_logprob_forward target -1", lambda w: call(dpo.sequence_logprob_forward, logits(),
                                                                 -ones(2, 3), ones(2, 3)), r"target id -1"),
    lib("transformer.forward token -1", lambda w: call(tf.forward, w.params, CFG, np.array([[1, -1]])),
        r"token id -1 is out of range \[0, 46\)"),
    lib("transformer.forward token 46", lambda w: call(tf.forward, w.params, CFG, np.array([[1, 46]])),
        r"token id 46 is out of range"),
    lib("transformer.hidden_forward token -1", lambda w: call(tf.hidden_forward, w.params, CFG, np.array([[-1]])),
        r"token id -1"),
    lib("transformer.forward float tokens", lambda w: call(tf.forward, w.params, CFG, np.array([[1.0, 3.0]])),
        r"tokens must be a 2-D integer array"),
    lib("transformer.forward longer than n_ctx", lambda w: call(tf.forward, w.params, CFG, ones(1, 17)),
        r"sequence length 17 exceeds n_ctx=16"),
    lib("transformer.generate prompt id 46", lambda w: call(tf.generate, w.params, CFG, np.array([[1, 46]]),
                                                            ones(1, 2), 2, RNG(0)), r"token id 46"),
    lib("reward.reward_forward token -1", lambda w: call(R.reward_forward, w.rm.params, CFG, np.array([[1, -1, 2]]),
                                                         ones(1, 3)), r"token id -1"),
    lib("tokenizer.decode -1", lambda w: call(T.decode, [3, -1]), r"token id -1 is outside the vocabulary"),
    lib("tokenizer.decode 46", lambda w: call(T.decode, [46]), r"token id 46 is outside the vocabulary"),
    lib("tokenizer.pad_batch -1", lambda w: call(T.pad_batch, [[1, 2], [1, -1]]),
        r"sequence 1 must hold integer ids >= 0"),
    lib("tokenizer.pad_batch float ids", lambda w: call(T.pad_batch, [[1.5, 2.0]]), r"sequence 0 must hold integer"),
    lib("tokenizer.encode unknown character", lambda w: call(T.encode, "HELLO"), r"character 'H' at position 0"),
    lib("tokenizer.encode None", lambda w: call(T.encode, None), r"text must be a str, got NoneType"),
    lib("tokenizer.response_mask floats", lambda w: call(T.response_mask, z(1, 2)),
        r"tokens must be a 2-D integer array"),
]

TWOS = masked([[1, 2, 1]])
MASKS = [  # masks that are not 0/1
    lib("transformer.forward mask of 2s", lambda w: call(tf.forward, w.params, CFG, ones(1, 3), TWOS),
        r"mask must hold only 0 and 1"),
    lib("reward.reward_forward mask of 2s", lambda w: call(R.reward_forward, w.rm.params, CFG, np.array([[1, 3, 2]]),
                                                           TWOS), r"mask must hold only 0 and 1"),
    lib("kl.kl_estimators mask of 2s", lambda w: call(K.kl_estimators, z(1, 3), z(1, 3), TWOS),
        r"mask must hold only 0 and 1"),
    lib("kl.exact_kl mask of 2s", lambda w: call(K.exact_kl, logits(1), logits(1), mask=TWOS),
        r"mask must hold only 0 and 1"),
    lib("kl.token_rewards mask of 2s", lambda w: call(K.token_rewards, z(1), z(1, 3), z(1, 3), TWOS, 0.1),
        r"mask must hold only 0 and 1"),
    lib("ppo_objective.gae mask of 2s", lambda w: call(po.gae, z(1, 3), z(1, 3), TWOS), r"mask must hold only 0"),
    lib("ppo_objective.whiten mask of 2s", lambda w: call(po.whiten, z(1, 3), TWOS), r"mask must hold only 0"),
    lib("ppo_objective.policy_loss_forward mask of 2s", lambda w: call(po.policy_loss_forward, z(1, 3), z(1, 3),
                                                                       z(1, 3), TWOS), r"mask must hold only 0"),
    lib("grpo_objective.token_weights mask of 2s", lambda w: call(go.token_weights, TWOS, "token_mean"),
        r"mask must hold only 0"),
    lib("grpo_objective.token_loss_forward mask of 2s", lambda w: call(go.token_loss_forward, z(1, 3), z(1, 3),
                                                                       z(1, 3), TWOS), r"mask must hold only 0"),
    lib("tokenizer.last_real_index mask of 2s", lambda w: call(T.last_real_index, TWOS),
        r"mask must hold only 0 and 1"),
    lib("reward.ranking_loss_forward valid of 2s", lambda w: call(R.ranking_loss_forward, z(1, 3), TWOS),
        r"valid must be a 0/1 or bool array"),
    lib("dpo.sequence_logprob_forward mask of 2s", lambda w: call(dpo.sequence_logprob_forward, logits(1),
                                                                  TARGETS[:1], TWOS), r"mask must be a 0/1 array"),
    lib("layers.cross_entropy_forward mask -1", lambda w: call(L.cross_entropy_forward, logits(1), TARGETS[:1],
                                                               masked([[1, -1, 1]])), r"weights >= 0"),
    lib("layers.cross_entropy_forward mask NaN", lambda w: call(L.cross_entropy_forward, logits(1), TARGETS[:1],
                                                                masked([[1, np.nan, 1]])), r"weights >= 0"),
]

EMPTY = masked([[1, 1, 0], [0, 0, 0]])  # row 1 has no valid token
ALL_MASKED = [
    lib("kl.token_rewards empty row", lambda w: call(K.token_rewards, z(2), z(2, 3), z(2, 3), EMPTY, 0.1),
        r"rows \[1\] have no valid response token"),
    lib("grpo_objective.reinforce_pp_advantages empty row", lambda w: call(go.reinforce_pp_advantages, z(2), z(2, 3),
                                                                           z(2, 3), EMPTY, 0.1),
        r"rows \[1\] have no valid response token"),
    lib("layers.cross_entropy_forward nothing valid", lambda w: call(L.cross_entropy_forward, logits(), TARGETS,
                                                                     z(2, 3)), r"the mask has no valid position"),
    lib("ppo_objective.masked_mean nothing valid", lambda w: call(po.masked_mean, z(2, 3), z(2, 3)),
        r"mask has no valid entries"),
    lib("ppo_objective.whiten nothing valid", lambda w: call(po.whiten, z(2, 3), z(2, 3)), r"no valid entries"),
    lib("ppo_objective.policy_loss_forward nothing valid", lambda w: call(po.policy_loss_forward, z(2, 3), z(2, 3),
                                                                          z(2, 3), z(2, 3)), r"no valid entries"),
    lib("ppo_objective.value_loss_forward nothing valid", lambda w: call(po.value_loss_forward, z(2, 3), z(2, 3),
                                                                         z(2, 3), z(2, 3)), r"no valid entries"),
    lib("ppo_objective.explained_variance nothing valid", lambda w: call(po.explained_variance, z(2, 3), z(2, 3),
                                                                         z(2, 3)), r"no valid entries"),
    lib("grpo_objective.token_weights token_mean nothing valid", lambda w: call(go.token_weights, z(2, 3),
                                                                                "token_mean"),
        r"token_mean needs at least one valid token"),
    lib("tokenizer.last_real_index empty row", lambda w: call(T.last_real_index, EMPTY), r"rows \[1\] have none"),
    lib("reward.reward_forward empty row", lambda w: call(R.reward_forward, w.rm.params, CFG, ones(2, 3), EMPTY),
        r"rows \[1\] have none"),
    lib("reward.ranking_loss_forward no pair", lambda w: call(R.ranking_loss_forward, z(2, 3), EMPTY * 0 + [1, 0, 0]),
        r"no row has two valid responses"),
    lib("dpo.sequence_logprob_forward empty row", lambda w: call(dpo.sequence_logprob_forward, logits(), TARGETS,
                                                                 EMPTY), r"mask rows \[1\] have no response token"),
]

M2 = ones(2, 3)
NANS = [
    lib("reward.bt_loss_forward r_chosen NaN", lambda w: call(R.bt_loss_forward, np.array([0.0, np.nan]), z(2)),
        r"r_chosen holds a NaN or inf \(at \(1,\)\)"),
    lib("reward.bt_loss_forward r_rejected inf", lambda w: call(R.bt_loss_forward, z(2), np.array([np.inf, 0.0])),
        r"r_rejected holds a NaN or inf"),
    lib("reward.bt_loss_forward margin NaN", lambda w: call(R.bt_loss_forward, z(2), z(2), margin=np.nan),
        r"bt_loss.margin must be a finite number"),
    lib("reward.ranking_loss_forward NaN", lambda w: call(R.ranking_loss_forward, holes(2, 3)),
        r"rewards at valid slots holds a NaN or inf \(at \(0, 0\)\)"),
    lib("reward.ranking_loss_forward center_coef -1", lambda w: call(R.ranking_loss_forward, z(2, 3), center_coef=-1),
        r"ranking_loss.center_coef must be >= 0"),
    lib("kl.kl_estimators logp NaN", lambda w: call(K.kl_estimators, holes(2, 3), z(2, 3), M2),
        r"logp is not finite at valid position \(0, 0\)"),
    lib("kl.kl_estimators logp_ref inf", lambda w: call(K.kl_estimators, z(2, 3), holes(2, 3, value=np.inf), M2),
        r"logp_ref is not finite at valid position"),
    lib("kl.kl_estimators 1-D", lambda w: call(K.kl_estimators, z(3), z(3), ones(3)), r"expects \(B, T\) arrays"),
    lib("kl.exact_kl logits NaN", lambda w: call(K.exact_kl, np.full((1, 1, 3), np.nan), z(1, 1, 3)),
        r"logits holds a NaN or inf at a valid position"),
    lib("kl.exact_kl temperature NaN", lambda w: call(K.exact_kl, logits(), logits(), temperature=np.nan),
        r"exact_kl.temperature must be a finite number"),
    lib("kl.exact_kl temperature inf", lambda w: call(K.exact_kl, logits(), logits(), temperature=np.inf),
        r"exact_kl.temperature must be a finite number"),
    lib("kl.exact_kl temperature '1'", lambda w: call(K.exact_kl, logits(), logits(), temperature="1"),
        r"exact_kl.temperature must be a finite number"),
    lib("kl.update_kl_coef KL NaN", lambda w: call(K.update_kl_coef, 0.1, np.nan, 8, K.KLControllerConfig()),
        r"KL must be finite"),
    lib("kl.update_kl_coef kl_coef NaN", lambda w: call(K.update_kl_coef, np.nan, 1.0, 8, K.KLControllerConfig()),
        r"update_kl_coef.kl_coef must be a finite number"),
    lib("kl.update_kl_coef n_steps 0.5", lambda w: call(K.update_kl_coef, 0.1, 1.0, 0.5, K.KLControllerConfig()),
        r"update_kl_coef.n_steps must be an integer >= 1"),
    lib("kl.update_kl_coef n_steps past the horizon", lambda w: call(
        K.update_kl_coef, 0.1, 1.0, 100, K.KLControllerConfig(adaptive=True, horizon=20)), r"could make kl_coef <= 0"),
    lib("kl.token_rewards scores NaN", lambda w: call(K.token_rewards, np.array([np.nan, 0]), z(2, 3), z(2, 3), M2,
                                                      0.1), r"scores holds a NaN or inf"),
    lib("kl.token_rewards kl_coef '0.1'", lambda w: call(K.token_rewards, z(2), z(2, 3), z(2, 3), M2, "0.1"),
        r"token_rewards.kl_coef must be a finite number"),
    lib("kl.token_rewards kl_coef -1", lambda w: call(K.token_rewards, z(2), z(2, 3), z(2, 3), M2, -1.0),
        r"token_rewards.kl_coef must be >= 0"),
    lib("ppo_objective.gae rewards NaN", lambda w: call(po.gae, holes(2, 3), z(2, 3), M2),
        r"rewards is not finite at valid position \(0, 0\)"),
    lib("ppo_objective.gae values inf", lambda w: call(po.gae, z(2, 3), holes(2, 3, value=np.inf), M2),
        r"values is not finite"),
    lib("ppo_objective.gae lam NaN", lambda w: call(po.gae, z(2, 3), z(2, 3), M2, lam=np.nan),
        r"gae.lam must be a finite number"),
    lib("ppo_objective.gae gamma 2", lambda w: call(po.gae, z(2, 3), z(2, 3), M2, gamma=2.0),
        r"gae.gamma must be >= 0 and <= 1"),
    lib("ppo_objective.gae gamma '1'", lambda w: call(po.gae, z(2, 3), z(2, 3), M2, gamma="1"),
        r"gae.gamma must be a finite number"),
    lib("ppo_objective.whiten x NaN", lambda w: call(po.whiten, holes(2, 3), M2), r"x is not finite at valid"),
    lib("ppo_objective.whiten eps NaN", lambda w: call(po.whiten, z(2, 3), M2, eps=np.nan),
        r"whiten.eps must be a finite number"),
    lib("ppo_objective.whiten eps 0", lambda w: call(po.whiten, z(2, 3), M2, eps=0.0), r"whiten.eps must be > 0"),
    lib("ppo_objective.whiten eps -1", lambda w: call(po.whiten, z(2, 3), M2, eps=-1.0), r"whiten.eps must be > 0"),
    lib("ppo_objective.policy_loss_forward advantages NaN", lambda w: call(po.policy_loss_forward, z(2, 3), z(2, 3),
                                                                           holes(2, 3), M2),
        r"advantages is not finite at valid position"),
    lib("ppo_objective.policy_loss_forward clip_eps NaN", lambda w: call(po.policy_loss_forward, z(2, 3), z(2, 3),
                                                                         z(2, 3), M2, clip_eps=np.nan),
        r"policy_loss_forward.clip_eps must be a finite number"),
    lib("ppo_objective.value_loss_forward returns NaN", lambda w: call(po.value_loss_forward, z(2, 3), z(2, 3),
                                                                       holes(2, 3), M2), r"returns is not finite"),
    lib("ppo_objective.value_loss_forward vf_coef inf", lambda w: call(po.value_loss_forward, z(2, 3), z(2, 3),
                                                                       z(2, 3), M2, vf_coef=np.inf),
        r"value_loss_forward.vf_coef must be a finite number"),
    lib("dpo.dpo_loss_forward logp_chosen NaN", lambda w: call(dpo.dpo_loss_forward, np.array([np.nan]), z(1), z(1),
                                                               z(1)), r"logp_chosen holds a NaN or inf"),
    lib("dpo.dpo_loss_forward ref_rejected inf", lambda w: call(dpo.dpo_loss_forward, z(1), z(1), z(1),
                                                                np.array([np.inf])), r"ref_rejected holds a NaN"),
    lib("dpo.dpo_loss_forward beta '0.1'", lambda w: call(dpo.dpo_loss_forward, z(1), z(1), z(1), z(1), beta="0.1"),
        r"dpo loss.beta must be a finite number"),
    lib("dpo.dpo_loss_forward beta True", lambda w: call(dpo.dpo_loss_forward, z(1), z(1), z(1), z(1), beta=True),
        r"dpo loss.beta must be a finite number, got True"),
    lib("dpo.dpo_loss_forward beta 0", lambda w: call(dpo.dpo_loss_forward, z(1), z(1), z(1), z(1), beta=0.0),
        r"dpo loss.beta must be > 0"),
    lib("dpo.ipo_loss_forward NaN", lambda w: call(dpo.ipo_loss_forward, z(2), z(2), np.array([0, np.nan]), z(2)),
        r"ref_chosen holds a NaN or inf"),
    lib("grpo_objective.grpo_advantages NaN", lambda w: call(go.grpo_advantages, np.array([[1.0, np.nan]])),
        r"rewards holds a NaN or inf at flat index 1"),
    lib("grpo_objective.dr_grpo_advantages inf", lambda w: call(go.dr_grpo_advantages, np.array([[np.inf, 1.0]])),
        r"rewards holds a NaN or inf at flat index 0"),
    lib("grpo_objective.rloo_advantages NaN", lambda w: call(go.rloo_advantages, np.array([[1.0, np.nan]])),
        r"rewards holds a NaN or inf"),
    lib("grpo_objective.grpo_advantages eps NaN", lambda w: call(go.grpo_advantages, z(2, 2), eps=np.nan),
        r"eps finite and >= 0"),
    lib("grpo_objective.token_loss_forward advantages NaN", lambda w: call(go.token_loss_forward, z(2, 3), z(2, 3),
                                                                           holes(2, 3), M2),
        r"advantages is not finite at valid position"),
    lib("grpo_objective.token_loss_forward eps_low NaN", lambda w: call(go.token_loss_forward, z(2, 3), z(2, 3),
                                                                        z(2, 3), M2, eps_low=np.nan),
        r"eps_low and eps_high must be > 0"),
    lib("grpo_objective.sequence_loss_forward advantages NaN", lambda w: call(go.sequence_loss_forward, z(2, 3),
                                                                              z(2, 3), np.array([np.nan, 0]), M2),
        r"advantages must be finite"),
    lib("grpo_objective.reinforce_loss_forward advantages inf", lambda w: call(go.reinforce_loss_forward, z(2, 3),
                                                                               np.array([np.inf, 0]), M2),
        r"advantages must be finite"),
    lib("grpo_objective.aggregate_forward losses NaN", lambda w: call(go.aggregate_forward, holes(2, 3), M2,
                                                                      "token_mean"), r"losses is not finite"),
    lib("grpo_objective.kl_loss_forward logp NaN", lambda w: call(go.kl_loss_forward, holes(2, 3), z(2, 3), M2, "k3"),
        r"logp is not finite"),
    lib("grpo_objective.broadcast NaN", lambda w: call(go.broadcast, np.array([np.nan, 0]), M2),
        r"advantages holds a NaN or inf"),
    lib("grpo_objective.overlong_penalty lengths NaN", lambda w: call(go.overlong_penalty, np.array([3, np.nan]), 32,
                                                                      6), r"lengths must be finite and >= 0"),
    lib("grpo_objective.overlong_penalty lengths -1", lambda w: call(go.overlong_penalty, np.array([-1]), 32, 6),
        r"lengths must be finite and >= 0"),
    lib("grpo_objective.overlong_penalty max_len NaN", lambda w: call(go.overlong_penalty, np.array([3]), np.nan, 6),
        r"overlong_penalty.max_len must be a finite number"),
    lib("grpo_objective.token_weights max_len NaN", lambda w: call(go.token_weights, M2, "constant", max_len=np.nan),
        r"token_weights.max_len must be an integer"),
    lib("grpo_objective.token_weights n_tokens below the batch's", lambda w: call(go.token_weights, M2, "token_mean",
                                                                                  n_tokens=2),
        r"token_weights.n_tokens must be an integer >= 6"),
    lib("grpo_objective.token_weights n_rows below the batch's", lambda w: call(go.token_weights, M2, "seq_sum",
                                                                                n_rows=1),
        r"token_weights.n_rows must be an integer >= 2"),
    lib("layers.entropy_forward NaN logits", lambda w: call(L.entropy_forward, np.full((1, 2, 3), np.nan)),
        r"entropy_forward: logits hold a NaN"),
    lib("layers.entropy_forward only -inf", lambda w: call(L.entropy_forward, np.full((1, 2, 3), -np.inf)),
        r"or only -inf, at position \(0, 0\)"),
    lib("layers.entropy_forward temperature -1", lambda w: call(L.entropy_forward, logits(), -1.0),
        r"entropy_forward.temperature must be > 0"),
    lib("layers.token_logprobs_forward temperature 0", lambda w: call(L.token_logprobs_forward, logits(), TARGETS,
                                                                      0.0),
        r"token_logprobs_forward.temperature must be > 0"),
    lib("layers.token_logprobs_forward temperature -1", lambda w: call(L.token_logprobs_forward, logits(), TARGETS,
                                                                       -1.0), r"temperature must be > 0"),
    lib("layers.token_logprobs_forward temperature NaN", lambda w: call(L.token_logprobs_forward, logits(), TARGETS,
                                                                        np.nan), r"temperature must be a finite"),
    lib("layers.cross_entropy_forward NaN logits", lambda w: call(L.cross_entropy_forward, holes(2, 3, 5), TARGETS,
                                                                  M2), r"cross_entropy is not finite"),
    lib("exact.enumerate_all temperature -1", lambda w: call(exact.enumerate_all, *exact.models(), temperature=-1.0),
        r"temperature must be > 0"),
    lib("best_of_n.evaluate_best_of_n golds NaN", lambda w: call(bon.evaluate_best_of_n, z(2, 3), holes(2, 3),
                                                                 [0, 1], [1]), r"golds holds a NaN or inf"),
    lib("best_of_n.empirical_bon values NaN", lambda w: call(bon.empirical_bon, z(3), holes(3, at=1), 2),
        r"values holds a NaN or inf"),
    lib("best_of_n.bon_ratio rewards NaN", lambda w: call(bon.bon_ratio, np.ones(2) / 2, np.array([0, np.nan]), 2),
        r"rewards finite"),
    lib("lora.merge scale NaN", lambda w: call(lora.merge, z(4, 4), z(4, 2), z(2, 4), np.nan),
        r"merge.scale must be a finite number"),
    lib("lora.lora_linear_forward scale inf", lambda w: call(lora.lora_linear_forward, z(1, 4), z(4, 4), z(4),
                                                             z(4, 1), z(1, 4), np.inf),
        r"lora_linear_forward.scale must be a finite number"),
]

ZERO_VARIANCE = [
    lib("reward.fit_normalisation identical responses", lambda w: call(R.fit_normalisation, w.rm.params, CFG,
                                                                       ["hi!"] * 4, ["hello."] * 4),
        r"cannot normalise over 4 scores that are all equal"),
    lib("reward.fit_normalisation one response", lambda w: call(R.fit_normalisation, w.rm.params, CFG, ["hi!"],
                                                                ["hello."]), r"cannot normalise over 1 scores"),
    lib("reward.RewardModel gain 0", lambda w: call(R.RewardModel, w.rm.params, CFG, gain=0.0),
        r"RewardModel needs a finite gain > 0"),
    lib("reward.RewardModel gain NaN", lambda w: call(R.RewardModel, w.rm.params, CFG, gain=np.nan),
        r"RewardModel needs a finite gain > 0"),
    lib("reward.RewardModel bias inf", lambda w: call(R.RewardModel, w.rm.params, CFG, bias=np.inf),
        r"finite bias, got gain 1.0, bias inf"),
    lib("reward.RewardModel gain 'x'", lambda w: call(R.RewardModel, w.rm.params, CFG, gain="x"),
        r"RewardModel.gain and .bias must be numbers"),
]


def config(cls, field=None, match=None, xfail=None, **kwargs):
    """A config probe: cls(**kwargs) must refuse, naming field (the first keyword by default)."""
    field = field or next(iter(kwargs))
    return lib(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})",
               lambda w: call(cls, **kwargs), match or rf"{cls.__name__}\.{field}")


def counts(cls, *names):
    return [config(cls, **{n: v}) for n in names for v in (0, True)]


def reals(cls, *names, low_open=False):
    return [config(cls, **{n: v}) for n in names for v in ((np.nan, -1.0, "x") + ((0.0,) if low_open else ()))]


CONFIGS = [
    *counts(sft.SFTConfig, "steps", "batch_size", "eval_every"), *reals(sft.SFTConfig, "lr", "weight_decay"),
    *reals(sft.SFTConfig, "max_grad_norm", low_open=True),
    config(sft.SFTConfig, warmup_steps=-1),
    config(sft.SFTConfig, "warmup_steps", r"SFTConfig: need warmup_steps < steps", steps=5, warmup_steps=5),
    *counts(R.RewardConfig, "steps", "batch_size", "eval_every"), *reals(R.RewardConfig, "lr", "weight_decay"),
    *reals(R.RewardConfig, "max_grad_norm", low_open=True), config(R.RewardConfig, margin=np.nan),
    config(R.RewardConfig, center_coef=-1.0),
    config(R.RewardConfig, "warmup_steps", r"RewardConfig: need warmup_steps < steps", steps=5, warmup_steps=9),
    *reals(A.AnnotatorConfig, "temperature", low_open=True), config(A.AnnotatorConfig, length_bias=np.inf),
    config(A.AnnotatorConfig, length_bias=np.nan),
    config(optim.AdamWConfig, lr=-1.0), config(optim.AdamWConfig, lr=np.nan), config(optim.AdamWConfig, beta1=1.0),
    config(optim.AdamWConfig, beta2=-0.1), config(optim.AdamWConfig, eps=0.0), config(optim.AdamWConfig, eps=np.inf),
    config(optim.AdamWConfig, weight_decay=np.nan), config(optim.AdamWConfig, max_grad_norm=0.0),
    config(optim.AdamWConfig, max_grad_norm=-np.inf),
    *counts(ppo.PPOConfig, "updates", "epochs"), config(ppo.PPOConfig, batch_size=0),
    config(ppo.PPOConfig, "minibatch_size", r"PPOConfig: batch_size 64 is not a multiple of minibatch_size 3",
           minibatch_size=3),
    config(ppo.PPOConfig, lr=np.nan), config(ppo.PPOConfig, clip_eps=0.0), config(ppo.PPOConfig, vf_clip_eps=-1.0),
    config(ppo.PPOConfig, vf_coef=np.inf), config(ppo.PPOConfig, gamma=2.0), config(ppo.PPOConfig, lam=-0.1),
    config(ppo.PPOConfig, max_grad_norm=0.0), config(ppo.PPOConfig, kl=None), config(ppo.PPOConfig, kl=0.1),
    config(K.KLControllerConfig, kl_coef=-1.0), config(K.KLControllerConfig, kl_coef=np.inf),
    config(K.KLControllerConfig, target=0.0), config(K.KLControllerConfig, target=np.nan),
    config(K.KLControllerConfig, horizon=0), config(K.KLControllerConfig, horizon=1.5),
    config(K.KLControllerConfig, adaptive="yes"), config(K.KLControllerConfig, adaptive=1),
    config(K.KLControllerConfig, "kl_coef", r"KLControllerConfig.kl_coef must be > 0 for the adaptive controller",
           kl_coef=0.0, adaptive=True),
    config(dpo.DPOConfig, beta=0.0), config(dpo.DPOConfig, beta=-0.1), config(dpo.DPOConfig, beta="0.1"),
    config(dpo.DPOConfig, beta=True), config(dpo.DPOConfig, beta=None), config(dpo.DPOConfig, beta=np.inf),
    config(dpo.DPOConfig, loss="kto"), *counts(dpo.DPOConfig, "steps", "batch_size", "log_every"),
    config(dpo.DPOConfig, lr=np.nan), config(dpo.DPOConfig, weight_decay=-1.0),
    config(dpo.DPOConfig, max_grad_norm=0.0),
    config(dpo.DPOConfig, "warmup_steps", r"DPOConfig: need warmup_steps < steps", steps=3, warmup_steps=3),
    *[config(grpo.CriticFreeConfig, **{n: 0}) for n in ("group_size", "prompts_per_update", "updates", "epochs",
                                                        "minibatches", "max_sampling_rounds", "overlong_cache")],
    *[config(grpo.CriticFreeConfig, **{n: "x"}) for n in ("advantage", "loss", "aggregator", "kl_placement",
                                                          "kl_loss", "overlong")],
    config(grpo.CriticFreeConfig, lr=np.nan), config(grpo.CriticFreeConfig, kl_coef=-1.0),
    config(grpo.CriticFreeConfig, std_ddof=2),
    config(grpo.CriticFreeConfig, "eps_low", r"CriticFreeConfig.eps_low must be > 0", eps_low=0.0),
    config(grpo.CriticFreeConfig, "group_size", r"CriticFreeConfig.group_size must be >= 2 for rloo", advantage="rloo",
           group_size=1),
    config(grpo.CriticFreeConfig, "advantage", r"CriticFreeConfig.advantage reinforce_pp has per-token",
           advantage="reinforce_pp", loss="sequence", kl_placement="reward"),
    config(grpo.CriticFreeConfig, "loss", r"CriticFreeConfig.loss 'reinforce' is on-policy only", loss="reinforce",
           minibatches=2),
    config(grpo.CriticFreeConfig, "minibatches", r"CriticFreeConfig.minibatches 9 exceeds the batch of 8",
           minibatches=9, group_size=2, prompts_per_update=4),
    config(grpo.CriticFreeConfig, lr=True),
    config(lora.LoRAConfig, rank=0), config(lora.LoRAConfig, rank=True), config(lora.LoRAConfig, rank=1.5),
    config(lora.LoRAConfig, alpha=0.0), config(lora.LoRAConfig, alpha=np.nan), config(lora.LoRAConfig, alpha="8"),
    config(lora.LoRAConfig, targets="attn.w_qkv"), config(lora.LoRAConfig, targets=()),
    config(lora.LoRAConfig, "targets", r"LoRAConfig.targets: \['attn.w_q'\] match no layer", targets=("attn.w_q",)),
    config(lora.LoRAConfig, rslora=1), config(lora.LoRAConfig, init="xavier"),
    config(tf.GPTConfig, vocab_size=0, n_ctx=8, n_layer=1, n_head=2, n_embd=8),
    config(tf.GPTConfig, "n_ctx", vocab_size=4, n_ctx=1.5, n_layer=1, n_head=2, n_embd=8),
    config(tf.GPTConfig, "n_layer", vocab_size=4, n_ctx=8, n_layer=True, n_head=2, n_embd=8),
    config(tf.GPTConfig, "n_head", r"GPTConfig: n_embd=8 is not divisible by n_head=3", vocab_size=4, n_ctx=8,
           n_layer=1, n_head=3, n_embd=8),
    config(tf.GPTConfig, "n_embd", vocab_size=4, n_ctx=8, n_layer=1, n_head=2, n_embd=-8),
    config(tf.Sampling, temperature=0.0), config(tf.Sampling, temperature=np.nan),
    config(tf.Sampling, temperature=np.inf), config(tf.Sampling, temperature="1"),
    config(tf.Sampling, max_new_tokens=0), config(tf.Sampling, max_new_tokens=1.5),
    config(tf.Sampling, temperature=True),
]

DOMAIN = [  # the rest of each public function's domain
    lib("transformer.sample_responses prompt fills n_ctx", lambda w: call(tf.sample_responses, w.policy, ["a" * 15],
                                                                          RNG(0)),
        r"a prompt of length 16 fills n_ctx=16: no room for a response"),
    lib("transformer.sample_responses prompt + max_new_tokens", lambda w: call(tf.sample_responses, w.policy,
                                                                               ["a" * 13], RNG(0)),
        r"prompt length 14 \+ max_new_tokens 4 exceeds n_ctx=16"),
    lib("transformer.sample_responses prompt longer than n_ctx", lambda w: call(tf.sample_responses, w.policy,
                                                                                ["a" * 20], RNG(0)),
        r"prompt of length 21 .*n_ctx=16"),
    lib("transformer.sample_responses batch_size 0", lambda w: call(tf.sample_responses, w.policy, ["hi!"], RNG(0),
                                                                    batch_size=0), r"batch_size"),
    lib("transformer.generate rng None", lambda w: call(tf.generate, w.params, CFG, ones(1, 1), ones(1, 1), 2, None),
        r"rng"),
    lib("transformer.forward missing parameter", lambda w: call(tf.forward, {k: v for k, v in w.params.items()
                                                                             if k != "wpe"}, CFG, ones(1, 2)),
        r"wpe"),
    lib("transformer.generate max_new_tokens 0", lambda w: call(tf.generate, w.params, CFG, ones(1, 1), ones(1, 1), 0,
                                                                RNG(0)), r"max_new_tokens must be an integer >= 1"),
    lib("transformer.generate temperature 0", lambda w: call(tf.generate, w.params, CFG, ones(1, 1), ones(1, 1), 2,
                                                             RNG(0), temperature=0.0),
        r"generate.temperature must be > 0"),
    lib("world.verify a greeting", lambda w: call(W.verify, "hi!", "hello."),
        r"verify cannot check the 'greeting' family"),
    lib("grpo.verifier_source a greeting", lambda w: call(grpo.verifier_source(), ["hi!"], [("hello.", True)]),
        r"verify cannot check the 'greeting' family"),
    lib("grpo.train_critic_free verifier on greetings", lambda w: call(
        grpo.train_critic_free, tf.copy_policy(w.policy), w.params, grpo.verifier_source(), [W.get_prompt("hi!")],
        grpo.ALGOS["grpo"], RNG(0)), r"the reward source 'verifier' cannot score the 'greeting' family"),
    lib("grpo_objective.rloo_advantages G 1", lambda w: call(go.rloo_advantages, z(3, 1)),
        r"RLOO needs at least 2 completions per group; group 0 has 1"),
    lib("grpo_objective.rloo_advantages a group of 1", lambda w: call(go.rloo_advantages, z(3),
                                                                      groups=np.array([0, 0, 1])),
        r"RLOO needs at least 2 completions per group; group 1 has 1"),
    lib("lora.adapted_layers rank 9 > n_embd 8", lambda w: call(lora.adapted_layers, CFG, lora.LoRAConfig(9)),
        r"LoRAConfig.rank=9 exceeds min\(d_in, d_out\) = 8 of h0.attn.w_qkv"),
    lib("lora.init_adapter rank 9", lambda w: call(lora.init_adapter, w.params, CFG, lora.LoRAConfig(9), RNG(0)),
        r"LoRAConfig.rank=9 exceeds"),
    lib("lora.lora_policy rank 9", lambda w: call(lora.lora_policy, w.policy, lora.LoRAConfig(9), RNG(0)),
        r"LoRAConfig.rank=9 exceeds"),
    lib("lora.lora_policy twice", lambda w: call(lora.lora_policy, lora.lora_policy(w.policy, lora.LoRAConfig(2),
                                                                                    RNG(0)), lora.LoRAConfig(2),
                                                 RNG(1)), r"already carries an adapter"),
    lib("lora.merge_adapter onto another config", lambda w: call(
        lora.merge_adapter, tf.init_params(tf.GPTConfig(T.VOCAB_SIZE, 16, 1, 2, 4), RNG(0)),
        lora.init_adapter(w.params, CFG, lora.LoRAConfig(2), RNG(0))), r"adapter weight h0.attn.w_qkv.lora_A is"),
    lib("lora.init_adapter rng None", lambda w: call(lora.init_adapter, w.params, CFG, lora.LoRAConfig(2), None),
        r"rng must be a numpy.random.Generator"),
    lib("sft.train_sft batch beyond memory", lambda w: call(
        sft.train_sft, w.params, CFG, [("hi!", "hello.")], [("hi!", "hello.")],
        sft.SFTConfig(steps=2, batch_size=10 ** 9, warmup_steps=0), RNG(0)),
        r"train_sft: a forward and backward pass over 1000000000 sequences .* GiB"),
    lib("reward.train_reward_model batch beyond memory", lambda w: call(
        R.train_reward_model, w.rm.params, CFG, [w.cmp], [w.cmp], R.RewardConfig(batch_size=10 ** 8),
        A.AnnotatorConfig(), RNG(0)), r"train_reward_model: .* 200000000 sequences .* GiB"),
    lib("reward.train_reward_model nothing to learn", lambda w: call(
        R.train_reward_model, w.rm.params, CFG, [], [w.cmp], R.RewardConfig(), A.AnnotatorConfig(), RNG(0)),
        r"needs comparisons with at least one scored pair"),
    lib("dpo.train_dpo fewer pairs than a batch", lambda w: call(
        dpo.train_dpo, tf.copy_policy(w.policy), w.params, [("hi!", "hello.", "go away.")], dpo.DPOConfig(), RNG(0)),
        r"1 pairs are fewer than one batch of 16"),
    lib("dpo.train_dpo policy is its own reference", lambda w: call(
        dpo.train_dpo, w.policy, w.params, [("hi!", "a", "b")] * 2, dpo.DPOConfig(batch_size=2, steps=2,
                                                                                 warmup_steps=0), RNG(0)),
        r"policy and reference share arrays"),
    lib("dpo.dpo_loss_and_grads loss 'kto'", lambda w: call(dpo.dpo_loss_and_grads, w.policy, w.params,
                                                            [("hi!", "a", "b")], loss="kto"), r"unknown loss 'kto'"),
    lib("world.sample_prompts n -1", lambda w: call(W.sample_prompts, W.all_prompts(), -1, RNG(0)),
        r"sample_prompts: n must be an integer >= 0, got -1"),
    lib("world.sample_prompts n 2.5", lambda w: call(W.sample_prompts, W.all_prompts(), 2.5, RNG(0)),
        r"sample_prompts: n must be an integer"),
    lib("world.sample_prompts weight NaN", lambda w: call(W.sample_prompts, W.all_prompts(), 2, RNG(0),
                                                          {"greeting": np.nan, "unsafe": 1.0}),
        r"family_weights must be finite numbers >= 0, got \{'greeting': nan\}"),
    lib("world.sample_prompts weight inf", lambda w: call(W.sample_prompts, W.all_prompts(), 2, RNG(0),
                                                          {"greeting": np.inf}), r"family_weights must be finite"),
    lib("world.sample_prompts weight -1", lambda w: call(W.sample_prompts, W.all_prompts(), 2, RNG(0),
                                                         {"greeting": -1.0, "unsafe": 1.0}),
        r"family_weights must be finite numbers >= 0"),
    lib("world.sample_prompts unknown family", lambda w: call(W.sample_prompts, W.all_prompts(), 2, RNG(0),
                                                              {"maths": 1.0}), r"unknown family 'maths'"),
    lib("world.sft_corpus n -1", lambda w: call(W.sft_corpus, W.all_prompts(), -1, RNG(0)), r"n must be an integer"),
    lib("world.sft_corpus preferred_rate 1.5", lambda w: call(W.sft_corpus, W.all_prompts(), 2, RNG(0), 1.5),
        r"preferred_rate must be in \[0, 1\]"),
    lib("world.split_prompts val_fraction 0", lambda w: call(W.split_prompts, W.all_prompts(), 0.0, RNG(0)),
        r"val_fraction must be in \(0, 1\)"),
    lib("world.split_prompts val_fraction NaN", lambda w: call(W.split_prompts, W.all_prompts(), np.nan, RNG(0)),
        r"val_fraction must be in \(0, 1\)"),
    lib("world.get_prompt a list", lambda w: call(W.get_prompt, ["hi!"]), r"unknown prompt text \['hi!'\]"),
    lib("world.respond a style of another family", lambda w: call(W.respond, "hi!", "correct", RNG(0)),
        r"unknown style 'correct' for family 'greeting'"),
    lib("world.Prompt unknown family", lambda w: call(W.Prompt, "maths", "what?"), r"unknown family 'maths'"),
    lib("world.check_response empty", lambda w: call(W.check_response, ""), r"empty response"),
    lib("annotator.sample_comparisons k 1", lambda w: call(A.sample_comparisons, ["hi!"], None, 1,
                                                           A.AnnotatorConfig(), RNG(0)), r"k >= 2 responses"),
    lib("annotator.sample_comparisons k 2.5", lambda w: call(A.sample_comparisons, ["hi!"], None, 2.5,
                                                             A.AnnotatorConfig(), RNG(0)), r"k >= 2 .*got 2.5"),
    lib("annotator.Comparison ranking of another size", lambda w: call(A.Comparison, "hi!", ("a", "b"), (True,),
                                                                       (0, 1)), r"ranking or ended does not match"),
    lib("annotator.ceiling_accuracy nothing", lambda w: call(A.ceiling_accuracy, [], A.AnnotatorConfig()),
        r"no pairs of ended responses"),
    lib("reward.evaluate nothing", lambda w: call(R.evaluate, w.rm, [], A.AnnotatorConfig()),
        r"evaluate: no scored pair"),
    lib("reward.score batch_size 0", lambda w: call(R.score, w.rm, ["hi!"], ["a"], batch_size=0),
        r"score.batch_size must be an integer >= 1"),
    lib("reward.score_samples a bare string", lambda w: call(R.score_samples, w.rm, ["hi!"], ["hello."]),
        r"samples\[0\] is 'hello.', not a \(text, ended\) pair"),
    lib("reward.reward_forward no EOS", lambda w: call(R.reward_forward, w.rm.params, CFG, ones(1, 3), ones(1, 3)),
        r"sequence 0 does not end in EOS"),
    lib("best_of_n.best_of_n n 0", lambda w: call(bon.best_of_n, w.policy, w.rm, ["hi!"], 0, RNG(0)),
        r"n must be a positive integer, got 0"),
    lib("best_of_n.bon_kl_bound True", lambda w: call(bon.bon_kl_bound, True), r"n must be a positive integer"),
    lib("best_of_n.evaluate_best_of_n no n", lambda w: call(bon.evaluate_best_of_n, z(2, 3), z(2, 3), [0, 1], []),
        r"ns must list at least one n"),
    lib("best_of_n.evaluate_best_of_n n 0", lambda w: call(bon.evaluate_best_of_n, z(2, 3), z(2, 3), [0, 1], [0]),
        r"n must be a positive integer, got 0"),
    lib("best_of_n.evaluate_best_of_n n beyond the samples", lambda w: call(bon.evaluate_best_of_n, z(2, 3), z(2, 3),
                                                                            [0, 1], [5]),
        r"n = 5 needs at least that many samples"),
    lib("best_of_n.empirical_bon nothing", lambda w: call(bon.empirical_bon, z(0), z(0), 2), r"non-zero size"),
    lib("tokenizer.pad_batch side", lambda w: call(T.pad_batch, [[1]], side="up"), r"side must be 'left' or 'right'"),
    lib("tokenizer.pad_batch nothing", lambda w: call(T.pad_batch, []), r"needs at least one sequence"),
    lib("grpo_objective.kl_loss_forward kind 'k4'", lambda w: call(go.kl_loss_forward, z(2, 3), z(2, 3), M2, "k4"),
        r"unknown KL loss 'k4'"),
    lib("grpo_objective.kl_loss_forward rho_k3 without logp_old", lambda w: call(go.kl_loss_forward, z(2, 3),
                                                                                 z(2, 3), M2, "rho_k3"),
        r"rho_k3 needs logp_old"),
    lib("grpo_objective.token_weights kind 'mean'", lambda w: call(go.token_weights, M2, "mean"),
        r"unknown aggregator 'mean'"),
    lib("grpo_objective.token_weights constant without max_len", lambda w: call(go.token_weights, M2, "constant"),
        r"constant needs max_len >= every row's length 3"),
    lib("grpo_objective.sequence_loss_forward ratio 'max'", lambda w: call(go.sequence_loss_forward, z(2, 3),
                                                                           z(2, 3), z(2), M2, ratio="max"),
        r"ratio must be 'mean' or 'sum'"),
    lib("grpo_objective.reinforce_pp_advantages baseline without groups", lambda w: call(
        go.reinforce_pp_advantages, z(2), z(2, 3), z(2, 3), M2, 0.1, baseline=True), r"needs the group ids"),
    lib("ppo_objective.gae mask with a hole", lambda w: call(po.gae, z(1, 3), z(1, 3), masked([[1, 0, 1]])),
        r"mask row 0 is not a prefix of valid tokens"),
    lib("optim.clip_grads max_norm -1", lambda w: call(optim.clip_grads, {"w": np.full(2, 3.0)}, -1.0), r"max_norm"),
    lib("optim.clip_grads max_norm NaN", lambda w: call(optim.clip_grads, {"w": np.full(2, 3.0)}, np.nan), r"max_norm"),
    lib("optim.adamw_step lr NaN", lambda w: call(optim.adamw_step, {"w": np.ones(2)}, {"w": np.ones(2)},
                                                  optim.adamw_init({"w": np.ones(2)}), optim.AdamWConfig(),
                                                  lr=np.nan), r"lr"),
    lib("optim.adamw_step lr -1", lambda w: call(optim.adamw_step, {"w": np.ones(2)}, {"w": np.ones(2)},
                                                 optim.adamw_init({"w": np.ones(2)}), optim.AdamWConfig(), lr=-1.0),
        r"lr"),
    lib("optim.lr_schedule step 0.5", lambda w: call(optim.lr_schedule, 0.5, 10, 1e-3), r"step"),
]

LIBRARY = LENGTHS + IDS + MASKS + ALL_MASKED + NANS + ZERO_VARIANCE + CONFIGS + DOMAIN


@pytest.mark.parametrize("build, exc, match", LIBRARY)
def test_a_public_function_refuses_bad_input_and_changes_nothing(build, exc, match, w):
    fn, args, kwargs = build(w)
    before = snapshot((args, kwargs, w.params, w.rm))
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert snapshot((args, kwargs, w.params, w.rm)) == before


# ================================================================ 4. run folders

RUN_EDITS = {  # name -> (how a finished run's folder is damaged, what load_run must say about it)
    "unfinished": (lambda f: _manifest(f, status="running"),
                   r"{f}: its run did not finish \(stages done: sft, reward_model, ppo, evaluation\); re-make it "
                   r"with python -m minirlhf.demo --out {f} --force"),
    "no manifest": (lambda f: os.unlink(f / runs.MANIFEST),
                    r"{f} holds no run \(no manifest.json\): its files \(metrics.jsonl, .*\) are no run's"),
    "manifest empty": (lambda f: (f / runs.MANIFEST).write_text(""), r"{f}/manifest.json: unreadable run manifest"),
    "manifest files a list": (lambda f: _manifest(f, files=["sft.npz"]),
                              r"{f}/manifest.json: unreadable run manifest \(files must map names to hashes"),
    "a file missing": (lambda f: os.unlink(f / "policy.npz"),
                       r"{f}/policy.npz is missing from the run; re-make it with .* --out {f} --force"),
    "a stranger's file": (lambda f: (f / "notes.txt").write_text("mine"),
                          r"{f}/notes.txt does not belong to the run in {f} .*move it out of the folder"),
    "a file changed": (lambda f: (f / "split.json").write_text("{}"),
                       r"{f}/split.json changed since its run wrote it .* --force"),
    "split.json not JSON": (lambda f: _record(f, "split.json", b"{not json"),
                            r"{f}/split.json: not the run's prompt split \(JSONDecodeError"),
    "split.json unknown prompt": (lambda f: _record(f, "split.json", b'{"train": ["zzz"], "val": []}'),
                                  r"{f}/split.json: not the run's prompt split \(ValueError: unknown prompt text"),
    "split.json without val": (lambda f: _record(f, "split.json", b'{"train": []}'),
                               r"{f}/split.json: not the run's prompt split \(KeyError: 'val'\)"),
    "reward gain NaN": (lambda f: _info(f, "reward.npz", gain=float("nan")),
                        r"{f}/reward.npz: its info is unreadable \(ValueError: RewardModel needs a finite gain > 0"),
    "reward without gain": (lambda f: _info(f, "reward.npz", gain=None),
                            r"{f}/reward.npz: its info is unreadable \(KeyError: 'gain'\)"),
    "sft without sampling": (lambda f: _info(f, "sft.npz", sampling=None),
                             r"{f}/sft.npz: its info is unreadable \(KeyError: 'sampling'\)"),
    "sft sampling tau -1": (lambda f: _info(f, "sft.npz", sampling={"temperature": -1.0, "max_new_tokens": 32}),
                            r"{f}/sft.npz: its info is unreadable \(ValueError: Sampling.temperature"),
    "sft of another run": (lambda f: _info(f, "sft.npz", run_id="another"),
                           r"{f}/sft.npz belongs to run another, not to the run .* --out {f} --force"),
    "reward model as sft.npz": (lambda f: _record(f, "sft.npz", (f / "reward.npz").read_bytes()),
                                r"{f}/sft.npz: has extra parameters \['head.b', 'head.w'\], expected \[\]"),
    "not a demo run": (lambda f: _manifest(f, files={k: v for k, v in runs.read_manifest(str(f))["files"].items()
                                                     if k != "split.json"}) or os.unlink(f / "split.json"),
                       r"{f}: its run has no split.json: not a demo run"),
}


def _manifest(folder, **changes):
    manifest = runs.read_manifest(str(folder))
    manifest.update(changes)
    (folder / runs.MANIFEST).write_text(json.dumps(manifest))


def _record(folder, name, data):
    (folder / name).write_bytes(data)
    rehash(folder, name)


def _info(folder, name, **changes):
    """Rewrite a checkpoint of the run with its info changed (None deletes a key) and record it."""
    params, cfg, info = load_checkpoint(str(folder / name))
    info = {k: v for k, v in {**info, **changes}.items() if v is not None}
    save_checkpoint(str(folder / name), params, cfg, info)
    rehash(folder, name)


@pytest.mark.parametrize("edit", list(RUN_EDITS))
def test_load_run_refuses_a_folder_that_is_not_one_finished_demo_run(edit, run_copy):
    damage, match = RUN_EDITS[edit]
    damage(run_copy)
    before = tree(run_copy)
    with pytest.raises(ValueError) as e:
        runs.load_run(str(run_copy), pipeline.DEMO_MODEL)
    assert re.match(match.format(f=re.escape(str(run_copy))), str(e.value)), str(e.value)
    assert tree(run_copy) == before


@pytest.mark.parametrize("folder, match", [("", r"the run folder is an empty path"),
                                           ("{tmp}/nope", r".*nope: no such run folder"),
                                           ("{tmp}/afile", r".*afile: a file, not a run folder")])
def test_load_run_refuses_what_is_no_folder(folder, match, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=match):
        runs.load_run(folder.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_load_run_ignores_temporary_files_and_subfolders(run_copy):
    (run_copy / f"{TMP_PREFIX}abc.npz").write_bytes(b"half a save")
    (run_copy / "labels").mkdir()
    (run_copy / "labels" / "x.txt").write_text("a tool's")
    assert runs.load_run(str(run_copy))["sft"].params


@pytest.mark.parametrize("folder, force, match", [
    ("finished", False, r"holds another run \(finished, seed 0.*add --force to replace it"),
    ("foreign", True, r"notes.txt belong to no run; --force deletes only what runs wrote"),
    ("stranger", True, r"is not empty and holds no run \(data.csv\)"),
    ("afile", False, r"afile is a file, not a folder"),
    ("afile/sub", False, r"afile/sub: .*afile is a file, not a folder"),
    ("", False, r"the run folder is an empty path")])
def test_start_run_refuses_a_folder_it_may_not_use(folder, force, match, env):
    before = tree(env)
    with pytest.raises(ValueError, match=match):
        runs.start_run(str(env / folder) if folder else "", {}, 1, force=force)
    assert tree(env) == before


def test_force_clears_an_unfinished_run_and_its_unrecorded_files(run_copy):
    """A run stopped before it recorded metrics.jsonl: --force must still replace it (a run starts in an empty
    folder, so every file beside an unfinished run's manifest is its own)."""
    for name in os.listdir(run_copy):
        os.unlink(run_copy / name)
    manifest = runs.start_run(str(run_copy), {}, 1)
    (run_copy / "metrics.jsonl").write_text("")  # the demo's Recorder makes it before its first record
    assert runs.check_start(str(run_copy), force=True) == [runs.MANIFEST, "metrics.jsonl"]
    assert runs.start_run(str(run_copy), {}, 2, force=True)["run_id"] != manifest["run_id"]
    assert os.listdir(run_copy) == [runs.MANIFEST]


def test_an_interrupted_force_leaves_a_folder_consumers_refuse_and_force_can_clear(run_copy, monkeypatch):
    """Ctrl-C while --force deletes the old run: the manifest goes last, so what is left is a run with files
    missing (refused, naming one, with the command that re-makes it), not a folder of files no run owns."""
    real, deleted = os.unlink, []

    def unlink(path):
        if len(deleted) == 2:
            raise KeyboardInterrupt
        deleted.append(path)
        real(path)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        runs.start_run(str(run_copy), {}, 1, force=True)
    monkeypatch.undo()
    assert runs.MANIFEST in os.listdir(run_copy) and runs.read_manifest(str(run_copy))["status"] == "finished"
    with pytest.raises(ValueError, match=r"is missing from the run; re-make it with .*--force"):
        runs.load_run(str(run_copy))
    runs.check_start(str(run_copy), force=True)  # a re-run with --force may start


@pytest.mark.parametrize("change, match", [
    (lambda p: _set(p, "wte", np.full_like(p["wte"], np.nan)), r"parameter wte is not finite"),
    (lambda p: _set(p, "ln_f.g", np.full_like(p["ln_f.g"], np.inf)), r"parameter ln_f.g is not finite"),
    (lambda p: _set(p, "wte", p["wte"].astype(np.int32)), r"parameter wte is int32, not a float array"),
    (lambda p: _set(p, "wte", p["wte"].tolist()), r"parameter wte is list, not a float array"),
    (lambda p: p.pop("ln_f.b"), r"parameters missing for this config: \['ln_f.b'\]"),
    (lambda p: _set(p, "wpe", p["wpe"][:2]), r"wpe has shape \(2, 8\), config says \(8, 8\)")],
    ids=["nan", "inf", "int", "list", "missing", "shape"])
def test_save_checkpoint_refuses_and_leaves_no_file(change, match, ckpt, tmp_path):
    params = {k: v.copy() for k, v in ckpt.params.items()}
    change(params)
    before = snapshot(params)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "m.npz")) + ": " + match):
        save_checkpoint(str(tmp_path / "m.npz"), params, CK)
    assert os.listdir(tmp_path) == [] and snapshot(params) == before


@pytest.mark.parametrize("save, match", [
    (lambda d, k: save_checkpoint(str(d / "m.npz"), k.params, CK, info={"gain": np.float32(1)}),
     r"m.npz: info is not JSON"),
    (lambda d, k: save_checkpoint(str(d), k.params, CK), r"a folder, not a file"),
    (lambda d, k: atomic_write("", lambda f: None), r"an empty path, not a file"),
    (lambda d, k: lora.save_adapter(str(d / "a.npz"), dataclasses.replace(
        k.adapter, weights={n: np.full_like(x, np.nan) for n, x in k.adapter.weights.items()})),
     r"a.npz: adapter weight .* holds NaN or inf")], ids=["info", "a folder", "empty path", "adapter nan"])
def test_a_refused_save_writes_nothing(save, match, ckpt, tmp_path):
    with pytest.raises(ValueError, match=match):
        save(tmp_path, ckpt)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- a real run, interrupted

def spawn(argv):
    """Popen of python argv with SIGINT at its default in the child: a shell that runs the tests in the
    background may ignore it, a child inherits that, and Ctrl-C would never reach the demo (only the main
    thread may set a handler; the processes the thread below starts are never sent SIGINT)."""
    ignored = (signal.getsignal(signal.SIGINT) is signal.SIG_IGN
               and threading.current_thread() is threading.main_thread())
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def finished(p):
    """(exit code, stderr) of a process, once it has ended."""
    code = p.wait(timeout=300)
    return code, p.stderr.read().decode()


E2E = [  # end to end, as a user types it: exit code 2, a usage error, no traceback (and a demos/ script below)
    (["-m", "minirlhf.demo", "--kl-coef", "inf", "--out", "{env}/run"], r"argument --kl-coef: must be a finite"),
]
SIGINT_AFTER = 0.5  # seconds into the new run (its manifest written, SFT under way)
SIGKILL_AFTER = float(np.random.default_rng(15).uniform(0, 1.5))  # a seeded moment of its first 1.5 seconds


@pytest.fixture(scope="module", autouse=True)
def background(tiny_run, tmp_path_factory):
    """Every subprocess of this file, started at the first test so that they run beside the in-process
    probes: the E2E command lines, and `python -m minirlhf.demo --quick --force --seed 1` into two copies of
    the finished tiny run, stopped SIGINT_AFTER and SIGKILL_AFTER seconds after their new manifest appears.
    When the first has stopped, a --force re-run at the tiny sizes (conftest.TINY_RUN) goes into a copy of
    what it left (the tests look at the original meanwhile); when the second has, demos/explain_ranking.py is
    pointed at it. A thread does all this; join() waits for it and returns what happened."""
    base = tmp_path_factory.mktemp("interrupted")
    old_id = runs.read_manifest(str(tiny_run[0]))["run_id"]
    folders = {kind: base / kind for kind in ("sigint", "sigkill", "rerun", "e2e")}
    folders["e2e"].mkdir()
    procs, out = {}, {"folders": folders, "old_id": old_id, "early": [], "e2e_before": tree(folders["e2e"])}
    for kind in ("sigint", "sigkill"):
        shutil.copytree(tiny_run[0], folders[kind])
        procs[kind] = spawn(["-m", "minirlhf.demo", "--quick", "--force", "--seed", "1", "--out", str(folders[kind])])
    for i, (argv, _) in enumerate(E2E):
        procs[f"e2e{i}"] = spawn([a.format(env=folders["e2e"]) for a in argv])

    def new_run_started(folder):
        try:
            manifest = runs.read_manifest(str(folder))
        except ValueError:
            return False
        return manifest is not None and manifest["run_id"] != old_id

    def run():
        try:
            follow()
        except BaseException:  # reported by every test that joins, instead of a thread dying in silence
            out["error"] = traceback.format_exc()
            for p in procs.values():
                p.kill()

    def follow():
        signals, started, deadline = {"sigint": (SIGINT_AFTER, signal.SIGINT),
                                      "sigkill": (SIGKILL_AFTER, signal.SIGKILL)}, {}, time.monotonic() + 120
        while signals and time.monotonic() < deadline:  # both runs watched at once, each signalled on time
            for kind, (after, sig) in list(signals.items()):
                if procs[kind].poll() is not None:  # it ended before its signal: the test below says so
                    out["early"].append(kind)
                    del signals[kind]
                    continue
                if kind not in started and new_run_started(folders[kind]):
                    started[kind] = time.monotonic()
                if kind in started and time.monotonic() >= started[kind] + after:
                    procs[kind].send_signal(sig)
                    del signals[kind]
            time.sleep(0.005)
        for kind in signals:
            procs[kind].kill()
        out["sigint"] = finished(procs["sigint"])
        shutil.copytree(folders["sigint"], folders["rerun"])
        procs["rerun"] = spawn(["-m", "minirlhf.demo", *TINY_RUN, "--force", "--out", str(folders["rerun"])])
        out["sigkill"] = finished(procs["sigkill"])
        procs["script"] = spawn(["demos/explain_ranking.py", "--quick", "--run", str(folders["sigkill"])])
        for name in ["rerun", "script"] + [f"e2e{i}" for i in range(len(E2E))]:
            out[name] = finished(procs[name])
        out["e2e_after"] = tree(folders["e2e"])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    def join():
        thread.join()
        if "error" in out:
            pytest.fail(out["error"])
        return out
    yield SimpleNamespace(join=join)
    thread.join()


@pytest.mark.parametrize("i", range(len(E2E)), ids=[" ".join(argv) for argv, _ in E2E])
def test_a_bad_command_line_end_to_end(i, background):
    out = background.join()
    code, err = out[f"e2e{i}"]
    assert code == 2 and "usage:" in err and "Traceback" not in err, err
    assert re.search(E2E[i][1], err), err
    assert out["e2e_after"] == out["e2e_before"]


def check_what_is_left(folder, old_id):
    """What an interrupted --force re-run leaves: every checkpoint present loads; nothing of the old run sits
    beside the new run's manifest; load_run refuses, naming the folder's problem and --force; and a --force
    re-run may start there."""
    names = [n for n in os.listdir(folder) if not n.startswith(TMP_PREFIX)]
    for name in names:
        if name.endswith(".npz"):
            load_checkpoint(str(folder / name))
    manifest = runs.read_manifest(str(folder))  # the new run's: the signal came after it appeared
    assert manifest["run_id"] != old_id and manifest["seed"] == 1 and manifest["status"] == "running"
    assert set(names) <= {runs.MANIFEST, "split.json", "metrics.jsonl"}, names
    with pytest.raises(ValueError, match=re.escape(str(folder)) + r": its run did not finish.*--force"):
        runs.load_run(str(folder))
    runs.check_start(str(folder), force=True)


def test_sigint_during_sft_leaves_no_orphan_and_a_folder_every_consumer_refuses(background, capsys):
    out = background.join()
    folder = out["folders"]["sigint"]
    code, err = out["sigint"]
    assert "sigint" not in out["early"] and code != 0 and "KeyboardInterrupt" in err, err
    assert not [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX)]
    check_what_is_left(folder, out["old_id"])
    for script in (kl_sweep, explain_ranking):  # the experiments, pointed at it, say why and exit 2
        with pytest.raises(SystemExit) as e:
            C.main_guard(lambda: script.main(["--quick", "--run", str(folder)]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(r"error: " + re.escape(str(folder)) + r": its run did not finish.*"
                                               r"--force", err), err


def test_sigkill_at_a_seeded_moment_leaves_a_folder_every_consumer_refuses(background):
    out = background.join()
    code, _ = out["sigkill"]
    assert "sigkill" not in out["early"] and code == -signal.SIGKILL
    check_what_is_left(out["folders"]["sigkill"], out["old_id"])  # a killed save's temporary file is ignored
    code, err = out["script"]  # demos/explain_ranking.py --quick --run <it>, end to end
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r"error: " + re.escape(str(out["folders"]["sigkill"])) + r": its run did not finish.*--force",
                     err), err


def test_a_force_re_run_into_the_interrupted_folder_makes_one_run_again(background):
    out = background.join()
    folder = out["folders"]["rerun"]
    code, err = out["rerun"]
    assert code == 0, err
    manifest = runs.load_run(str(folder))["manifest"]
    assert manifest["status"] == "finished" and manifest["seed"] == 0 and manifest["run_id"] != out["old_id"]
    assert json.loads((folder / "summary.json").read_text())["run_id"] == manifest["run_id"]
    assert not [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX)]
