import os

import minirlhf  # noqa: F401  (first: sets one BLAS thread before NumPy loads, see its __init__)
import pytest
from hypothesis import settings

# CI: same examples every run, no per-example deadline (a 2-core machine's speed drifts).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def demo_run_start():
    """The demo's stage 1 for seed 0, trained once for the tests that need the real thing: the prompt split,
    the default-length SFT model and the generator's state right after it, so a test can go on exactly as
    `python -m minirlhf.demo` does (each test restores its own copy of the state)."""
    import numpy as np
    from minirlhf import demo
    from minirlhf.world import all_prompts, split_prompts
    rng = np.random.default_rng(0)
    train, val = split_prompts(all_prompts(), 0.25, rng)
    policy, history = demo.run_sft(train, val, demo.PRESETS["default"]["sft_steps"], rng, log=lambda s: None)
    return {"train": train, "val": val, "policy": policy, "history": history,
            "rng_state": rng.bit_generator.state}
