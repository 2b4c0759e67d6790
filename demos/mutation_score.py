"""Mutation score: how many small mistakes in minirlhf's code its tests catch.

    python demos/mutation_score.py [--modules kl reward ...] [--sample 40] [--seed 0] [--json out.json]
                                   [--list] [--show-killed] [--ids ID ...]

A mutant is the module with one small mistake of the kind people make when they write or port this code:
a comparison flipped (< for <=, == for !=), an operator swapped (+ for -, * for /), a term dropped
(a + b -> a), a sign dropped (-x -> x), a constant changed (n -> n + 1, x -> 2 x, True -> False), `and`
for `or`, the two arguments of a call swapped (np.maximum(a, b) -> np.maximum(b, a), which matters for
np.where, np.clip, subtraction helpers), a dtype= argument dropped, a .copy() dropped. Strings, docstrings,
f-strings and the arguments of print / log calls are left alone (they change no result).

For each mutant the script writes the mutated module into a copy of the repository (the checkout itself is
never touched, so other work can go on beside it) and runs the test files that import the module, stopping
at the first failure (pytest -x, CI=1 so hypothesis draws the same examples each run). A mutant is killed if
a test fails or the run exceeds 5x the unmutated run's time, and survives if every test passes. Mutants known
to be equivalent (no input can tell them from the original: a constant that only names a default nobody
reads, an `x.copy()` of a fresh array) are listed with the reason in EQUIVALENT below, keyed by a stable id
(module, function, operator and a hash of the original and mutated line), and are left out of the score:

    score = killed / (killed + survived), over the non-equivalent mutants

The score is of the tests, not of the code: a survivor is a behaviour change no test notices. Each line of
the survivors' list gives the id, the line, the original and the mutated code; a new test that kills it, or
a reason it is equivalent, settles it.

Cost. Every mutant runs its tests from a fresh interpreter (1-2 s of imports) plus the tests up to the first
failure, or all of them for a survivor: about 3-20 s a mutant on a two-core machine. --sample N draws N
mutants per module (seeded), the default 40; --sample 0 runs them all (hours). Run it on a quiet machine.
"""
import argparse
import ast
import copy
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The lesson's math modules (the score's target is >= 95% in each) and the rest of what gets mutated.
MATH = ["layers", "optim", "reward", "annotator", "kl", "ppo_objective", "dpo", "best_of_n", "grpo_objective",
        "grpo", "lora"]
OTHERS = ["tokenizer", "transformer", "ppo", "sft", "kit/gradcheck", "kit/conformance", "kit/conformance_rl",
          "kit/mistakes"]
# Test files too slow to run once per mutant (whole demo runs): left out unless --with-slow-tests.
SLOW_TESTS = {"test_demo.py", "test_experiments.py", "test_label.py", "test_port_torch.py"}
# Tests that reach a module only through the kit (they import minirlhf.kit, which imports the module).
KIT_TESTS = ["test_conformance.py", "test_fixtures.py", "test_kit_bugs.py"]
EQUIVALENT = {
    # "id": "why no input can tell the mutant from the original",
    "reward:RewardConfig:constant:32517c187b": "RewardConfig's default batch_size: every caller in minirlhf passes "
                                               "its own (pipeline.reward_config), so the default is never read",
    "dpo:dpo_loss_forward:swap_args:7da960c064": "np.logaddexp is symmetric, bit for bit: it computes "
                                                 "max(a, b) + log1p(exp(-|a - b|))",
}
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Pow: ast.Mult, ast.MatMult: None, ast.Mod: ast.FloorDiv}
QUIET_CALLS = {"print", "log", "ValueError", "TypeError", "RuntimeError", "AssertionError"}


# ---------------------------------------------------------------- finding and making mutants

def _quiet(node):
    """True for a call whose arguments change no result (printing, logging, an error's message)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return name in QUIET_CALLS


def sites(tree):
    """[(node path, operator, description)] of every mutation the module allows, in a fixed order. A node
    path is the list of (field, index) steps from the module to the node, so a deep copy can find it."""
    found = []

    def visit(node, path, quiet):
        quiet = quiet or _quiet(node) or isinstance(node, ast.JoinedStr)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value,
                                                                                               str):
            return  # a docstring
        if not quiet:
            for op, desc in _mutations(node):
                found.append((path, op, desc))
        for field, value in ast.iter_fields(node):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        visit(item, path + [(field, i)], quiet)
            elif isinstance(value, ast.AST):
                visit(value, path + [(field, None)], quiet)
    visit(tree, [], False)
    return found


def _mutations(node):
    """The (operator, description) pairs that apply to one node."""
    out = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARE:
                out.append((f"compare{i}", f"{type(op).__name__} -> {COMPARE[type(op)].__name__}"))
    elif isinstance(node, ast.BinOp):
        if BINARY.get(type(node.op)):
            out.append(("binop", f"{type(node.op).__name__} -> {BINARY[type(node.op)].__name__}"))
        if isinstance(node.op, (ast.Add, ast.Sub)):
            out.append(("drop_right", "a +- b -> a"))
    elif isinstance(node, ast.AugAssign) and BINARY.get(type(node.op)):
        out.append(("augassign", f"{type(node.op).__name__}= -> {BINARY[type(node.op)].__name__}="))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append(("drop_unary", f"drop {type(node.op).__name__}"))
    elif isinstance(node, ast.BoolOp):
        out.append(("boolop", "and <-> or"))
    elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None:
        out.append(("constant", f"{node.value!r} -> {_changed(node.value)!r}"))
    elif isinstance(node, ast.Call):
        if len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args[:2]):
            out.append(("swap_args", "f(a, b, ...) -> f(b, a, ...)"))
        if any(k.arg == "dtype" for k in node.keywords):
            out.append(("drop_dtype", "drop dtype="))
        if isinstance(node.func, ast.Attribute) and node.func.attr == "copy" and not node.args:
            out.append(("drop_copy", "x.copy() -> x"))
    return out


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return 1.0 if value == 0 else 2 * value
    return value


def _find(tree, path):
    node = tree
    for field, i in path:
        node = getattr(node, field) if i is None else getattr(node, field)[i]
    return node


def _replace(tree, path, new):
    parent = _find(tree, path[:-1])
    field, i = path[-1]
    if i is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[i] = new


def apply(tree, path, op):
    """A deep copy of tree with the mutation (path, op) made."""
    tree = copy.deepcopy(tree)
    node = _find(tree, path)
    if op.startswith("compare"):
        i = int(op[len("compare"):])
        node.ops[i] = COMPARE[type(node.ops[i])]()
    elif op == "binop":
        node.op = BINARY[type(node.op)]()
    elif op == "drop_right":
        _replace(tree, path, node.left)
    elif op == "augassign":
        node.op = BINARY[type(node.op)]()
    elif op == "drop_unary":
        _replace(tree, path, node.operand)
    elif op == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif op == "constant":
        node.value = _changed(node.value)
    elif op == "swap_args":
        node.args[0], node.args[1] = node.args[1], node.args[0]
    elif op == "drop_dtype":
        node.keywords = [k for k in node.keywords if k.arg != "dtype"]
    elif op == "drop_copy":
        _replace(tree, path, node.func.value)
    return ast.fix_missing_locations(tree)


def enclosing(tree, path):
    """(qualified name of the function or class holding the node, the innermost statement holding it)."""
    names, stmt, node = [], tree, tree
    for field, i in path:
        node = getattr(node, field) if i is None else getattr(node, field)[i]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        if isinstance(node, ast.stmt):
            stmt = node
    return ".".join(names) or "<module>", stmt


def mutants(module):
    """Every mutant of a module: dicts with id, line, function, operator, original and mutated code."""
    path = os.path.join(ROOT, "minirlhf", module + ".py")
    src = open(path).read()
    tree = ast.parse(src)
    out = []
    for node_path, op, desc in sites(tree):
        qualname, stmt = enclosing(tree, node_path)
        stmt_path = _stmt_path(tree, node_path)  # mutate a copy of the statement alone: quicker than the module
        alone = ast.Module(body=[stmt], type_ignores=[])
        mutated_stmt = apply(alone, [("body", 0)] + node_path[len(stmt_path):], op).body[0]
        before = " ".join(ast.unparse(stmt).split())
        after = " ".join(ast.unparse(mutated_stmt).split())
        if before == after:
            continue
        key = hashlib.sha1(f"{before}\n{after}".encode()).hexdigest()[:10]
        out.append({"id": f"{module}:{qualname}:{op}:{key}", "module": module, "line": stmt.lineno,
                    "function": qualname, "operator": desc, "before": before[:160], "after": after[:160],
                    "path": node_path, "op": op})
    return out


def _stmt_path(tree, path):
    """The prefix of path that ends at the innermost statement."""
    node, end = tree, 0
    for k, (field, i) in enumerate(path):
        node = getattr(node, field) if i is None else getattr(node, field)[i]
        if isinstance(node, ast.stmt):
            end = k + 1
    return path[:end]


# ---------------------------------------------------------------- running the tests on a mutant

def tests_for(module, with_slow):
    """The test files that import the module (by name), plus the kit's tests for the kit and for the math
    modules the kit covers."""
    name = module.split("/")[-1]
    dotted = module.replace("/", ".")
    files = []
    for f in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not (f.startswith("test_") and f.endswith(".py")) or (f in SLOW_TESTS and not with_slow):
            continue
        text = open(os.path.join(ROOT, "tests", f)).read()
        if (f"minirlhf.{dotted}" in text or f"from minirlhf import {name}" in text
                or any(line.startswith("from minirlhf import") and f" {name}" in line.replace(",", " ")
                       for line in text.splitlines())):
            files.append(f)
    if module.startswith("kit/") or name in MATH:
        files += [f for f in KIT_TESTS if f not in files]
    # the module's own test file first and the kit's last: most mutants die in the first, and -x stops there
    return sorted(files, key=lambda f: (f != f"test_{name}.py", f in KIT_TESTS))


def run_tests(workdir, files, timeout):
    """(outcome, seconds, first failing test): outcome killed, survived or timeout."""
    env = {**os.environ, "CI": "1", "PYTHONPATH": workdir, "PYTHONDONTWRITEBYTECODE": "1"}
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            *[os.path.join("tests", f) for f in files]], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t, None
    failed = next((line for line in r.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), None)
    return ("survived" if r.returncode == 0 else "killed"), time.perf_counter() - t, failed


def copy_repository(into):
    for part in ("minirlhf", "tests", "demos"):
        shutil.copytree(os.path.join(ROOT, part), os.path.join(into, part),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("setup.cfg", "pyproject.toml"):
        if os.path.exists(os.path.join(ROOT, f)):
            shutil.copy(os.path.join(ROOT, f), into)


def score_module(module, args, workdir, rng):
    target = os.path.join(workdir, "minirlhf", module + ".py")
    original = open(target).read()
    tree = ast.parse(original)
    files = tests_for(module, args.with_slow_tests)
    every = mutants(module)
    if args.ids:
        chosen = [m for m in every if m["id"] in args.ids]
    else:
        chosen = every if args.sample == 0 else sorted(rng.sample(every, min(args.sample, len(every))),
                                                        key=lambda m: m["line"])
    try:
        open(target, "w").write(ast.unparse(tree))  # the baseline runs the unparsed source, as every mutant does
        outcome, base_s, failed = run_tests(workdir, files, timeout=3600)
        if outcome != "survived":
            raise SystemExit(f"{module}: the tests fail on the unmutated module ({failed}); fix that first")
        print(f"\n{module}: {len(every)} mutants, running {len(chosen)} against {len(files)} test files "
              f"({base_s:.1f} s unmutated)", flush=True)
        for m in chosen:
            if m["id"] in EQUIVALENT:
                m["outcome"], m["seconds"], m["failed"] = "equivalent", 0.0, EQUIVALENT[m["id"]]
            else:
                open(target, "w").write(ast.unparse(apply(tree, m["path"], m["op"])))
                m["outcome"], m["seconds"], m["failed"] = run_tests(workdir, files, timeout=max(60, 5 * base_s))
            if m["outcome"] == "survived" or args.show_killed:
                print(f"  {m['outcome']:<10} {m['id']}  line {m['line']}: {m['before'][:70]}  ->  "
                      f"{m['after'][:70]}", flush=True)
    finally:
        open(target, "w").write(original)
    for m in chosen:
        del m["path"]
    return {"module": module, "mutants": len(every), "run": len(chosen), "tests": files, "baseline_s": base_s,
            "results": chosen}


def summary_row(r):
    counts = {k: sum(m["outcome"] == k for m in r["results"]) for k in ("killed", "timeout", "survived",
                                                                         "equivalent")}
    live = counts["killed"] + counts["timeout"] + counts["survived"]
    return {**counts, "score": (counts["killed"] + counts["timeout"]) / live if live else float("nan")}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python demos/mutation_score.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", nargs="+", choices=MATH + OTHERS, help="modules to mutate (default: the math "
                    "modules)")
    ap.add_argument("--sample", type=int, default=40, help="mutants drawn per module, 0 for all (default 40)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    ap.add_argument("--with-slow-tests", action="store_true", help=f"also run {sorted(SLOW_TESTS)}")
    ap.add_argument("--show-killed", action="store_true", help="print every mutant, not only the survivors")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    ap.add_argument("--json", help="write every mutant's outcome to this JSON file")
    ap.add_argument("--ids", nargs="+", help="run exactly these mutants (ids as the survivors' list prints them), "
                    "each outcome printed: how a new test is checked against the mutant it was written for")
    args = ap.parse_args(argv)
    if args.sample < 0:
        ap.error("--sample must be >= 0")
    modules = args.modules or MATH
    if args.ids:
        modules = sorted({i.split(":")[0] for i in args.ids})
        unknown = [m for m in modules if m not in MATH + OTHERS]
        if unknown:
            ap.error(f"--ids: no module {unknown[0]!r} (the modules: {', '.join(MATH + OTHERS)})")
        known = {m["id"] for module in modules for m in mutants(module)}
        missing = [i for i in args.ids if i not in known]
        if missing:
            ap.error(f"--ids: no mutant {missing[0]!r} in the current source (ids change when the line changes)")
        args.show_killed = True
    if args.list:
        for module in modules:
            every = mutants(module)
            print(f"{module}: {len(every)} mutants; tests {tests_for(module, args.with_slow_tests)}")
        return None
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="minirlhf-mutants-") as workdir:
        copy_repository(workdir)
        for module in modules:
            results.append(score_module(module, args, workdir, rng))
    print(f"\n{'module':<20} {'mutants':>7} {'run':>4} {'killed':>6} {'timeout':>7} {'survived':>8} "
          f"{'equivalent':>10} {'score':>6}")
    for r in results:
        s = summary_row(r)
        print(f"{r['module']:<20} {r['mutants']:7d} {r['run']:4d} {s['killed']:6d} {s['timeout']:7d} "
              f"{s['survived']:8d} {s['equivalent']:10d} {s['score']:6.1%}")
        r["summary"] = s
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "sample": args.sample, "modules": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
