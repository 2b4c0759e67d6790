import os

import minirlhf  # noqa: F401  (first: sets one BLAS thread before NumPy loads, see its __init__)
from hypothesis import settings

# CI: same examples every run, no per-example deadline (a 2-core machine's speed drifts).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
