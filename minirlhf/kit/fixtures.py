"""Golden fixtures: minirlhf's inputs, outputs and gradients in float64, for a port to match exactly.

    python -m minirlhf.kit.fixtures --out DIR

writes DIR/<name>.npz for every function of the registry that has fixture inputs, and DIR/index.json. The
set minirlhf ships is in minirlhf/kit/golden (GOLDEN), installed with the package. In an .npz (read it with
np.load(path, allow_pickle=False)) the arrays are named
    in.<arg>            an input, by minirlhf's argument name (a scalar such as temperature: a 0-d array)
    in.<arg>:<key>      an entry of a dict input: a model's parameters (in.params:h0.attn.w_qkv) ...
    out, out.<key>      the output, or each entry of a dict output
    dout                the upstream gradient (random, not ones); the gradients are those of sum(out * dout)
    grad.<arg>[:<key>]  dLoss/d<arg>, shaped like the input
    where.out           (optional) the entries of out the conventions define (not padding queries)
index.json, per fixture: the file, minirlhf's function, the inputs (scalars by value), the outputs and
gradients, and the ids of the conventions it pins; index["conventions"] says each in words, and
index["config"] is the tiny transformer every model fixture uses (inputs.FIXTURE_MODEL).

Determinism: fixed seeds, float64, and zip entries written in sorted order with a fixed timestamp, so the
same machine writes the same bytes on every run; across machines BLAS may change the last bits, so
`compare` allows 1e-10 (tests/test_fixtures.py regenerates the shipped set and compares).
"""
import argparse
import io
import json
import os
import zipfile
import zlib

import numpy as np

from ..cli import output_folder
from .gradcheck import assert_close, worst
from .inputs import FIXTURE_MODEL
from .mistakes import diagnose
from .reference import offsets
from .registry import CONVENTIONS, FUNCTIONS, names_with_a_fixture, reference

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")  # the shipped set
FIXTURES = names_with_a_fixture()


def _flat(prefix, value):
    """{prefix: array} or, for a dict, {prefix:key: array} per entry."""
    if isinstance(value, dict):
        return {f"{prefix}:{k}": np.asarray(v) for k, v in value.items()}
    return {prefix: np.asarray(value)}


def save_npz(path, arrays):
    """np.savez with sorted entries and a fixed timestamp: the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name], order="C"), allow_pickle=False)  # keeps 0-d
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)


def build(name):
    """(arrays, index entry) of one fixture, from minirlhf's function (registry.reference)."""
    entry = FUNCTIONS[name]
    r = np.random.default_rng(zlib.crc32(name.encode()))  # a fixed seed per fixture, whatever the others
    inputs, arrays = entry.inputs(r, offsets(r)), {}
    for arg, x in inputs.items():
        arrays.update(_flat(f"in.{arg}", x))
    forward, vjp = reference(name)
    out, grads, where = forward(**inputs), {}, None
    if name == "ppo_minibatch":  # its vjp ignores dout: the gradients of loss_policy + loss_value
        grads = vjp(None, **inputs)
    elif vjp is not None:
        dout = r.standard_normal(np.shape(out))  # a random upstream gradient, not ones
        if entry.defined is not None:
            where = np.broadcast_to(entry.defined(inputs), np.shape(out))
            dout = np.where(where, dout, 0.0)
        arrays["dout"] = dout
        grads = vjp(dout, **inputs)
    for key, x in (out if isinstance(out, dict) else {None: out}).items():
        arrays.update(_flat("out" if key is None else f"out.{key}", x))
    for arg, x in grads.items():
        arrays.update(_flat(f"grad.{arg}", x))
    if where is not None:
        arrays["where.out"] = where
    index_entry = {"file": f"{name}.npz", "function": f"minirlhf.{entry.function}",
                   "conventions": list(entry.conventions),
                   "scalars": {k: v for k, v in inputs.items() if np.ndim(v) == 0 and not isinstance(v, dict)},
                   "inputs": sorted(inputs), "outputs": sorted(k for k in arrays if k.startswith("out")),
                   "gradients": sorted({k.split(":")[0] for k in arrays if k.startswith("grad.")})}
    return arrays, index_entry


def write_fixtures(out_dir, names=None):
    """Write every fixture (or those in names) and index.json into out_dir. Returns the index."""
    names = [n for n in FIXTURES if names is None or n in names]
    os.makedirs(out_dir, exist_ok=True)
    index = {"config": vars(FIXTURE_MODEL), "conventions": CONVENTIONS, "fixtures": {}}
    for name in names:
        arrays, index["fixtures"][name] = build(name)
        save_npz(os.path.join(out_dir, f"{name}.npz"), arrays)
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    return index


def load(path):
    """One fixture as (inputs, out, dout, grads, where): nested dicts rebuilt, 0-d inputs as Python scalars."""
    parts = {"in": {}, "out": {}, "grad": {}}
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key, x in arrays.items():
        kind, _, rest = key.partition(".")
        if kind not in parts:
            continue
        top, _, sub = rest.partition(":")
        if sub:
            parts[kind].setdefault(top, {})[sub] = x
        else:
            parts[kind][top] = x.item() if kind == "in" and x.ndim == 0 else x
    out = arrays.get("out", parts["out"])
    return parts["in"], out, arrays.get("dout"), parts["grad"], arrays.get("where.out")


def compare(path, forward, vjp=None, tol=None):
    """Check a port against one fixture: output (and gradients, given vjp) within tol (1 + |expected|), by
    default the fixture's own (registry.Entry.tol: 1e-10, less for elementwise losses).

    Returns {"out": error, "grad.<arg>[:<key>]": error, ...} with error = max |a - b| / (1 + |b|). A mismatch
    raises AssertionError naming the fixture, minirlhf's function, the conventions the fixture pins, the
    array and its worst element (index, the port's value, minirlhf's), whether a NaN or inf was involved,
    and any known porting mistake (mistakes.py) the port's output matches.
    """
    name = os.path.splitext(os.path.basename(path))[0]
    entry = FUNCTIONS.get(name)
    tol = tol if tol is not None else entry.tol if entry else 1e-10
    inputs, out, dout, grads, where = load(path)
    errors, got = {}, forward(**inputs)
    pairs = [("out", got, out)] if not isinstance(out, dict) else [(f"out.{k}", got[k], out[k]) for k in out]
    if vjp is not None and grads:
        g = vjp(dout, **inputs)  # ppo_minibatch has no dout: its gradients are of loss_policy + loss_value
        for arg, expected in grads.items():
            if isinstance(expected, dict):
                pairs += [(f"grad.{arg}:{k}", g[arg][k], e) for k, e in expected.items()]
            else:
                pairs.append((f"grad.{arg}", g[arg], expected))
    for label, a, e in pairs:
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if label == "out" and where is not None:
            a, e = a[where], e[where]
        try:
            assert_close(a, e, tol, f"{os.path.basename(path)} {label}")
        except AssertionError as err:
            pins = f" (minirlhf.{entry.function}; pins {', '.join(entry.conventions)})" if entry else ""
            found = (diagnose(name, inputs, got, FIXTURE_MODEL, correct=out) if entry and label.startswith("out")
                     else [])
            hint = f"; the port's output matches a known mistake: {'; '.join(found)}" if found else ""
            raise AssertionError(f"{err}{pins}{hint}") from None
        errors[label] = worst(a, e)[3]
    return errors


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minirlhf.kit.fixtures",
                                 description="Write minirlhf's golden fixtures (.npz and index.json).")
    ap.add_argument("--out", required=True, type=output_folder, help="directory to write into")
    ap.add_argument("--only", nargs="+", choices=sorted(FIXTURES), help="write only these fixtures")
    args = ap.parse_args(argv)
    index = write_fixtures(args.out, args.only)
    size = sum(os.path.getsize(os.path.join(args.out, e["file"])) for e in index["fixtures"].values())
    print(f"wrote {len(index['fixtures'])} fixtures ({size / 1024:.1f} KB) and index.json to {args.out}")


if __name__ == "__main__":
    main()
