"""The golden fixtures: the committed set is what minirlhf computes today (regenerated and compared), the
same machine writes the same bytes, the files load without pickle, and `compare` can fail."""
import json
import os

import numpy as np
import pytest

from minirlhf.kit import fixtures as F
from minirlhf.kit.registry import reference

COMMITTED = F.GOLDEN


def arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("h5_fixtures")
    return out, F.write_fixtures(out)


def test_regenerated_fixtures_match_the_committed_ones(regenerated):
    out, index = regenerated
    with open(os.path.join(COMMITTED, "index.json")) as f:
        committed = json.load(f)
    assert json.loads(json.dumps(index)) == {**committed, "fixtures": {
        k: v for k, v in committed["fixtures"].items() if k in index["fixtures"]}}
    assert set(committed["fixtures"]) == set(index["fixtures"])
    for name, entry in index["fixtures"].items():
        new, old = arrays(os.path.join(out, entry["file"])), arrays(os.path.join(COMMITTED, entry["file"]))
        assert new.keys() == old.keys(), name
        for k in new:
            assert new[k].dtype == old[k].dtype and new[k].shape == old[k].shape, (name, k)
            if new[k].dtype.kind == "f":
                assert new[k].dtype == np.float64, (name, k)  # float64 everywhere
                np.testing.assert_allclose(new[k], old[k], rtol=1e-12, atol=1e-12, err_msg=f"{name} {k}")
            else:
                np.testing.assert_array_equal(new[k], old[k], err_msg=f"{name} {k}")


def test_same_machine_same_bytes(regenerated, tmp_path):
    out, index = regenerated
    F.write_fixtures(tmp_path)
    for entry in [*index["fixtures"].values(), {"file": "index.json"}]:
        with open(os.path.join(out, entry["file"]), "rb") as a, open(os.path.join(tmp_path, entry["file"]), "rb") as b:
            assert a.read() == b.read(), entry["file"]


def test_committed_set_is_small_and_names_its_conventions():
    with open(os.path.join(COMMITTED, "index.json")) as f:
        index = json.load(f)
    size = sum(os.path.getsize(os.path.join(COMMITTED, n)) for n in os.listdir(COMMITTED))
    assert size < 250_000  # 48 fixtures, 204 KB
    for name, entry in index["fixtures"].items():
        assert entry["conventions"] and set(entry["conventions"]) <= set(index["conventions"]), name
    used = {c for e in index["fixtures"].values() for c in e["conventions"]}
    assert used == set(index["conventions"])  # every convention is pinned by some fixture


@pytest.mark.parametrize("name", sorted(F.FIXTURES))
def test_minirlhf_matches_the_committed_fixtures_through_compare(name):
    forward, vjp = reference(name)
    errors = F.compare(os.path.join(COMMITTED, f"{name}.npz"), forward, vjp)
    assert "out" in errors or any(k.startswith("out.") for k in errors)
    assert (vjp is None) == (not any(k.startswith("grad.") for k in errors))
    assert max(errors.values()) < 1e-10


def test_compare_fails_on_a_wrong_port():
    forward, vjp = reference("whiten")
    unbiased = lambda x, mask: np.where(mask > 0, (x - x[mask > 0].mean()) / x[mask > 0].std(ddof=1), 0)  # noqa
    with pytest.raises(AssertionError, match="whiten.npz out"):
        F.compare(os.path.join(COMMITTED, "whiten.npz"), unbiased)
    forward, vjp = reference("policy_loss")
    halved = lambda dout, **kw: {"logp": vjp(dout, **kw)["logp"] / 2}  # noqa: E731
    with pytest.raises(AssertionError, match="grad.logp"):
        F.compare(os.path.join(COMMITTED, "policy_loss.npz"), forward, halved)
