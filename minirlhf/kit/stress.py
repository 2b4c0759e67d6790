"""No false alarms: the whole kit run many times with fresh random draws, on minirlhf itself or on a port.

    python -m minirlhf.kit.stress [--runs 200] [--port demos/port_torch.py] [--json out.json]

A correct implementation must pass every run: the properties' tolerances are derived from float64's
rounding, the statistical checks (the sampler's chi-square tests) run at level 1e-6. Each run draws new
hypothesis examples (derandomize off, no example database) and new sampler seeds, then runs every check
the implementation has, every golden fixture it can be compared with, and exact.py's expectations. It
prints the failures (there should be none) and the time a run takes; the default suite runs the checks
once, derandomized, and this benchmark is how the rate of false alarms is measured.

A port given with --port is a Python file that defines kit_ports(model_cfg) -> {registry name: (forward,
vjp)} (demos/port_torch.py does) and, optionally, exact.py's protocol (exact.PORT_PROTOCOL).
"""
import argparse
import json
import os
import time

from hypothesis import settings

from .. import exact
from .fixtures import GOLDEN, compare
from .inputs import FIXTURE_MODEL, KIT_MODEL
from .reference import generate_adapter, logprobs_adapter
from .reference_grpo import lora_init
from .registry import FUNCTIONS, check, reference

ON_FIXTURE_MODEL = ("rollout", "ppo_minibatch")  # checks that run on the fixtures' model


def minirlhf_ports(model_cfg):
    """{registry name: the arguments of its check} for minirlhf itself, at model_cfg."""
    ports = {}
    for name, entry in FUNCTIONS.items():
        if name == "generate":
            ports[name] = (generate_adapter(model_cfg),)
        elif name == "lora_init":
            ports[name] = (lora_init,)
        elif name == "rollout":
            ports[name] = (reference(name, model_cfg)[0], logprobs_adapter(model_cfg))
        else:
            forward, vjp = reference(name, model_cfg)
            ports[name] = (forward,) if vjp is None else (forward, vjp)
    return ports


def run_once(ports_at, exact_port, seed):
    """One run of everything: {what failed: message}."""
    failures = {}
    kit, on_fixture = ports_at(KIT_MODEL), ports_at(FIXTURE_MODEL)
    for name, args in kit.items():
        try:
            check(name)(*(on_fixture[name] if name in ON_FIXTURE_MODEL else args))
        except AssertionError as e:
            failures[f"check {name}"] = str(e).splitlines()[0]
    for name, args in on_fixture.items():
        if FUNCTIONS[name].inputs is not None:
            try:
                compare(os.path.join(GOLDEN, f"{name}.npz"), *args[:2] if name != "rollout" else args[:1])
            except AssertionError as e:
                failures[f"fixture {name}"] = str(e).splitlines()[0]
    if exact_port is not None:
        for name, r in exact.check_port(exact_port, seed=seed).items():
            if not r["ok"]:
                failures[f"exact {name}"] = str(r)
    return failures


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minirlhf.kit.stress", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="runs with fresh random draws (default 200)")
    ap.add_argument("--port", help="a port's file (kit_ports, optionally exact.py's protocol); default minirlhf")
    ap.add_argument("--json", help="write the counts and failures here")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.port:
        port = exact.load_port(args.port)
        ports_at = port.kit_ports
        exact_port = port if hasattr(port, "policy_gradient") or hasattr(port, "sample") else None
    else:
        ports_at, exact_port = minirlhf_ports, exact.minirlhf_port()
    settings.register_profile("stress", derandomize=False, database=None, deadline=None)
    settings.load_profile("stress")
    failures, t0 = [], time.perf_counter()
    for run in range(args.runs):
        found = run_once(ports_at, exact_port, run)
        failures += [{"run": run, "what": k, "message": v} for k, v in found.items()]
        for k, v in found.items():
            print(f"run {run}: FAILED {k}: {v}", flush=True)
        if (run + 1) % 10 == 0:
            print(f"{run + 1} runs, {len(failures)} failures, {(time.perf_counter() - t0) / (run + 1):.1f} s a run",
                  flush=True)
    result = {"port": args.port or "minirlhf", "runs": args.runs, "failures": failures,
              "seconds_per_run": (time.perf_counter() - t0) / args.runs}
    print(f"{args.runs} runs of the whole kit on {result['port']}: {len(failures)} failures")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
