"""The package's shape: imports run one way, and the docstring examples run."""

import ast
import doctest
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dgm"
MODELS = {"vae", "gan", "flow"}
# What each kind of module may import from dgm (cli -> train/evaluate/report -> models -> maths).
ALLOWED = {
    "maths": set(),
    "errors": set(),
    "data": {"errors"},
    "plots": {"runs", "errors"},
    "model": {"maths", "data", "errors", "optim"},
    "optim": set(),
}


def dgm_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dgm."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dgm.")}
    return names


@pytest.mark.parametrize("module", sorted(p.stem for p in PKG.glob("*.py")))
def test_imports_run_one_way(module):
    kind = "model" if module in MODELS else module
    if kind in ALLOWED:
        extra = dgm_imports(PKG / f"{module}.py") - ALLOWED[kind]
        assert not extra, f"dgm.{module} must not import {extra}"


@pytest.mark.parametrize("module", sorted(p.stem for p in PKG.glob("*.py")
                                          if p.stem not in ("__main__", "cli")))
def test_docstring_examples(module):
    mod = importlib.import_module(f"dgm.{module}" if module != "__init__" else "dgm")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
