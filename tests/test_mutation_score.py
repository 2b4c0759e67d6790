"""demos/mutation_score.py's plumbing (the benchmark itself is long and runs by hand): every mutant is a real
change with a unique id, and --ids refuses an id or a module it does not know, before any work."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos"))
import mutation_score as M  # noqa: E402


def test_every_mutant_changes_its_statement_and_has_its_own_id():
    every = M.mutants("kl")
    assert every and len({m["id"] for m in every}) == len(every)
    assert all(m["before"] != m["after"] and m["id"].startswith("kl:") for m in every)


def test_ids_that_name_no_mutant_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        M.main(["--ids", "kl:kl_estimators:constant:0000000000"])
    assert e.value.code == 2 and "no mutant 'kl:kl_estimators:constant:0000000000'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        M.main(["--ids", "nope:f:constant:0"])
    assert e.value.code == 2 and "no module 'nope'" in capsys.readouterr().err
