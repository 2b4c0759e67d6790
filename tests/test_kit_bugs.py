"""The kit's own mutation suite: every porting bug of the catalogue (kit_bugs.py, applied to minirlhf's own
functions, so no torch is needed) is caught by its function's conformance check or golden fixture. Prints
the table of which tool caught which bug with what message (pytest -s shows it); the check runs with few
hypothesis examples, as a porter's quick first run would."""
import os
import warnings

import pytest
from hypothesis import Phase, settings

from kit_bugs import BUGS
from minirlhf.kit.fixtures import GOLDEN, compare
from minirlhf.kit.inputs import FIXTURE_MODEL, KIT_MODEL
from minirlhf.kit.registry import FUNCTIONS, check

QUICK = {"max_examples": 5}
MODEL_CFG = {"rollout": FIXTURE_MODEL, "ppo_minibatch": FIXTURE_MODEL}  # their checks run on the fixtures' model


def run_check(bug):
    name = bug.function
    args = bug.port(MODEL_CFG.get(name, KIT_MODEL))
    kwargs = {"n": 3000} if name == "generate" else {} if name in ("rollout", "ppo_minibatch") else QUICK
    try:
        check(name)(*args, **kwargs)
    except AssertionError as e:
        return str(e)
    return None


def run_fixture(bug):
    name = bug.function
    if FUNCTIONS[name].inputs is None:
        return None
    args = bug.port(FIXTURE_MODEL)
    try:
        compare(os.path.join(GOLDEN, f"{name}.npz"), *args[:2] if name != "rollout" else args[:1])
    except AssertionError as e:
        return str(e)
    except (ValueError, IndexError, KeyError, TypeError) as e:  # a port that crashes on the fixture: caught too
        return f"the port raised {type(e).__name__}: {e}"
    return None


def test_the_catalogue_is_large_and_covers_the_porting_surface():
    assert len(BUGS) >= 30
    assert len({bug.function for bug in BUGS.values()}) >= 25
    new = {name for name, entry in FUNCTIONS.items() if entry.function.startswith(("grpo_objective.", "lora."))}
    assert len(new) == 21 and new <= {bug.function for bug in BUGS.values()}  # every critic-free and LoRA function


@pytest.fixture(scope="module")
def outcomes():
    before = settings.get_current_profile_name()  # a failure is all the suite needs: no shrinking
    settings.register_profile("no_shrinking", parent=settings.get_profile(before), phases=[Phase.generate])
    settings.load_profile("no_shrinking")
    try:
        table = _outcomes()
    finally:
        settings.load_profile(before)
    width = max(map(len, BUGS))
    print(f"\n{'bug':<{width}}  {'check':<6} {'fixture':<7}  message (first 110 characters)")
    for bid, (by_check, by_fixture) in table.items():
        message = (by_check or by_fixture or "NOT CAUGHT").replace("\n", " ")
        print(f"{bid:<{width}}  {'yes' if by_check else '-':<6} {'yes' if by_fixture else '-':<7}  {message[:110]}")
    return table


def _outcomes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the bugs' own arithmetic (NaN, inf) warns
        return {bid: (run_check(bug), run_fixture(bug)) for bid, bug in BUGS.items()}


@pytest.mark.parametrize("bug_id", sorted(BUGS))
def test_every_bug_is_caught(outcomes, bug_id):
    by_check, by_fixture = outcomes[bug_id]
    assert by_check or by_fixture, f"{bug_id}: {BUGS[bug_id].description} slipped through the kit and the fixture"
