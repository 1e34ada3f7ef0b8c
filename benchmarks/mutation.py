"""Mutation testing of one module against its own tests: how many small bugs the tests catch.

    python benchmarks/mutation.py dgm/maths.py tests/test_maths.py tests/test_vae.py

A small AST mutator rather than mutmut: each mutant is one change (``+`` <-> ``-``,
``*`` <-> ``/``, a comparison swapped for its neighbour, a number n -> n + 1 or x -> 2x,
``True`` <-> ``False``, ``and`` <-> ``or``, a unary minus or ``not`` dropped, a return
value replaced by None). Error messages (``raise``) and docstrings are left alone.

To keep each module to minutes on one core:
- the tests are run once with a line tracer, so that each mutant runs only the tests that
  execute its line, fastest first, stopping at the first failure (``-x``);
- torch and the test libraries are imported once, and each mutant runs in a forked child
  against a copy of the source tree, so no mutant can leave the real tree changed.

A mutant is killed when a test fails or errors, or when it runs past ``--timeout``.
Survivors are listed with their line, to be killed by a new test or argued equivalent.
"""

import argparse
import ast
import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
         ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv,
         ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
         ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And}


def _skipped(tree: ast.AST) -> set[int]:
    """ids of nodes not to mutate: inside raise statements, docstrings and annotations."""
    skip = set()
    for node in ast.walk(tree):
        parts = []
        if isinstance(node, ast.Raise):
            parts = [node]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts = [a.annotation for a in node.args.args + node.args.kwonlyargs
                     if a.annotation] + ([node.returns] if node.returns else [])
        elif isinstance(node, ast.AnnAssign):
            parts = [node.annotation]
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            parts.append(body[0])
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__"
                                                for t in node.targets):
            parts.append(node)
        for p in parts:
            skip.update(id(n) for n in ast.walk(p))
    return skip


def mutants(source: str) -> list[tuple[int, str, str]]:
    """Every single-change mutant of ``source``: (line, what changed, mutated source)."""
    tree = ast.parse(source)
    skip = _skipped(tree)
    sites = []  # (line, description, function that edits a copy of the node)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)) and type(node.op) in SWAPS:
            new = SWAPS[type(node.op)]
            sites.append((node, line, f"{type(node.op).__name__} -> {new.__name__}",
                          lambda n, new=new: setattr(n, "op", new())))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
            new = SWAPS[type(node.ops[0])]
            sites.append((node, line, f"{type(node.ops[0]).__name__} -> {new.__name__}",
                          lambda n, new=new: setattr(n, "ops", [new()])))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            sites.append((node, line, f"{node.value} -> {not node.value}",
                          lambda n: setattr(n, "value", not n.value)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            v = node.value
            new = v + 1 if isinstance(v, int) else (v * 2 if v else 1.0)
            sites.append((node, line, f"{v!r} -> {new!r}",
                          lambda n, new=new: setattr(n, "value", new)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            sites.append((node, line, f"drop unary {type(node.op).__name__}", "unwrap"))
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            sites.append((node, line, "return None",
                          lambda n: setattr(n, "value", ast.Constant(None))))
    out = []
    for i, (_, line, what, edit) in enumerate(sites):
        mutated = copy.deepcopy(tree)
        # The i-th site again, in the copy: ast.walk visits in the same order.
        target = _nth_site(mutated, i, skip_of=_skipped(mutated))
        if edit == "unwrap":
            _replace(mutated, target, target.operand)
        else:
            edit(target)
        out.append((line, what, ast.unparse(ast.fix_missing_locations(mutated))))
    return out


def _nth_site(tree, i, skip_of):
    """The i-th mutation site of ``tree`` in the order ``mutants`` finds them."""
    k = -1
    for node in ast.walk(tree):
        if id(node) in skip_of:
            continue
        site = (isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp))
                and type(node.op) in SWAPS) or (
            isinstance(node, ast.Compare) and len(node.ops) == 1
            and type(node.ops[0]) in SWAPS) or (
            isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float))) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not))) or (
            isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None))
        if site:
            k += 1
            if k == i:
                return node
    raise IndexError(i)


def _replace(tree, old, new):
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                setattr(parent, field, [new if v is old else v for v in value])
                return


def _in_child(fn, timeout: float) -> int:
    """Run ``fn`` in a forked child; its exit status, or -1 when it ran past ``timeout``."""
    pid = os.fork()
    if pid == 0:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = fn()
        except BaseException:
            code = 99
        os._exit(int(code))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1


def _coverage(target: Path, tests: list[str], out: Path) -> int:
    """Child: run the tests once, recording which lines of ``target`` each test executes."""
    import pytest

    name, lines, current = str(target), {}, [None]

    def local(frame, event, arg):
        # Lines run outside any test (at import: module constants, defaults, class
        # attributes) may matter to every test.
        if event == "line":
            lines.setdefault(current[0] or "<import>", set()).add(frame.f_lineno)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == name else None

    class Recorder:
        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):
            current[0], t0 = item.nodeid, time.perf_counter()
            yield
            durations[item.nodeid] = time.perf_counter() - t0
            current[0] = None

    durations: dict[str, float] = {}
    sys.settrace(tracer)
    code = pytest.main([*tests, "-q", "-p", "no:cacheprovider"], plugins=[Recorder()])
    sys.settrace(None)
    out.write_text(json.dumps({"code": int(code), "durations": durations,
                               "lines": {k: sorted(v) for k, v in lines.items()}}))
    return int(code)  # a failing test would "kill" every mutant it covers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("module", help="e.g. dgm/maths.py")
    p.add_argument("tests", nargs="+", help="test files (or node ids) of that module")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds per mutant (default: 3x the covering tests' time + 20)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--lines", help="only the mutants on these lines, e.g. 27,39 (to check "
                   "that new tests kill earlier survivors)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dgm-mutation-"))
    for folder in ("dgm", "tests"):
        shutil.copytree(ROOT / folder, work / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, work / f)
    os.chdir(work)
    sys.dont_write_bytecode = True  # a mutant's source must never meet a stale .pyc
    sys.path[:0] = [str(work), str(work / "tests")]
    os.environ["PYTHONPATH"] = str(work)
    # Imported once here, so that each forked mutant starts with them loaded; dgm itself
    # is imported afresh in every child, mutated.
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import pytest
    import torch

    torch.set_num_threads(1)
    target = work / args.module
    original = target.read_text()
    tests = [str(work / t) if not t.startswith("-") else t for t in args.tests]

    t0 = time.perf_counter()
    cov = work / "coverage.json"
    if _in_child(lambda: _coverage(target, tests, cov), 3600) != 0:
        raise SystemExit("the unmutated tests do not pass; fix them first")
    cover = json.loads(cov.read_text())
    by_line: dict[int, list[str]] = {}
    everyone = list(cover["durations"])
    for test, lines in cover["lines"].items():
        for line in lines:
            by_line.setdefault(line, []).extend([test] if test != "<import>" else everyone)

    results = []
    all_mutants = mutants(original)
    if args.lines:
        wanted = {int(v) for v in args.lines.split(",")}
        all_mutants = [m for m in all_mutants if m[0] in wanted]
    for n, (line, what, source) in enumerate(all_mutants, 1):
        covering = sorted(set(by_line.get(line, [])), key=lambda t: cover["durations"].get(t, 0))
        if not covering:
            results.append({"line": line, "mutation": what, "status": "survived",
                            "why": "no test runs this line"})
            continue
        target.write_text(source)
        budget = args.timeout or 3 * sum(cover["durations"].get(t, 1) for t in covering) + 20
        code = _in_child(lambda ids=covering: pytest.main(
            [*ids, "-x", "-q", "-p", "no:cacheprovider"]), budget)
        target.write_text(original)
        status = "killed" if code != 0 else "survived"
        results.append({"line": line, "mutation": what, "status": status,
                        **({"why": "timeout"} if code == -1 else {}),
                        "tests_run": len(covering)})
        print(f"[{n}/{len(all_mutants)}] line {line}: {what}: {status}", flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    summary = {"module": args.module, "tests": args.tests, "mutants": len(results),
               "killed": killed, "survived": len(results) - killed,
               "score": round(killed / max(len(results), 1), 3),
               "seconds": round(time.perf_counter() - t0, 1),
               "survivors": [r for r in results if r["status"] == "survived"]}
    print(json.dumps({k: v for k, v in summary.items() if k != "survivors"}))
    for r in summary["survivors"]:
        print(f"  survived: line {r['line']}: {r['mutation']} {r.get('why', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
