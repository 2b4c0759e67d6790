import os

import pytest
from hypothesis import settings

import minirlhf.fast

minirlhf.fast.keep_freed_memory()  # the test run is an entry point like the demo: keep freed memory (fast.py)

# CI: same examples every run, no per-example deadline (a 2-core machine's speed drifts).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def demo_run_start():
    """The demo's stage 1 for seed 0, trained once for the tests that need the real thing: the prompt split,
    the default-length SFT policy and the generator's state right after it, so a test can go on exactly as
    `python -m minirlhf.demo` does (each test restores its own copy of the state)."""
    import numpy as np
    from minirlhf import pipeline as P
    rng = np.random.default_rng(0)
    train, val = P.split(rng)
    policy, history = P.run_sft(train, val, P.STEPS["default"]["sft_steps"], rng, log=lambda s: None)
    return {"train": train, "val": val, "policy": policy, "history": history,
            "rng_state": rng.bit_generator.state}


# A demo run of tiny step counts: seconds, and every file a finished run has. The tests of the demo and of
# the scripts in demos/ start from it.
TINY_RUN = ["--sft-steps", "30", "--rm-steps", "3", "--ppo-updates", "2", "--labels", "24", "--batch-size", "16",
            "--eval-prompts", "40"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from minirlhf import demo
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    summary = demo.main(TINY_RUN + ["--out", str(out)])
    return out, summary
