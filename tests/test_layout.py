"""The package's shape: imports run one way, and the docstring examples run."""

import ast
import doctest
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dgm"
# What each kind of module may import from dgm (cli -> train/evaluate/report -> models -> maths).
# Keys and values are module paths below dgm ("models" is the package, "models.flow" one file).
ALLOWED = {
    "maths": set(),
    "errors": set(),
    "data": {"errors", "own_data"},
    "own_data": {"data", "errors"},
    "plots": {"runs", "errors"},
    "optim": set(),
    "evaluate": {"data", "distributed", "errors", "features", "maths", "models", "quality",
                 "runs"},
    "features": {"data", "errors", "runs"},
    "quality": {"features", "maths"},
}
# Everything under dgm/models/: the maths and data layers and each other, nothing above.
MODEL_ALLOWED = {"maths", "data", "errors", "optim", "models"}
MODULES = sorted(".".join(p.relative_to(PKG).with_suffix("").parts)
                 for p in PKG.rglob("*.py"))


def dgm_imports(path: Path) -> set[str]:
    """The dgm modules that ``path`` imports, as paths below dgm ("models.transforms")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dgm."):
            names.add(node.module.removeprefix("dgm."))
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("dgm.") for a in node.names
                      if a.name.startswith("dgm.")}
    return names


def test_models_are_a_package():
    assert (PKG / "models" / "__init__.py").exists()
    assert {"models.vae", "models.gan", "models.flow", "models.transforms"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_run_one_way(module):
    imported = dgm_imports(PKG / (module.replace(".", "/") + ".py"))
    if module.split(".")[0] == "models":
        allowed = MODEL_ALLOWED
    elif module in ALLOWED:
        allowed = ALLOWED[module]
    else:
        return
    extra = {m for m in imported if m.split(".")[0] not in allowed}
    assert not extra, f"dgm.{module} must not import {extra}"


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("__main__", "cli")])
def test_docstring_examples(module):
    name = "dgm" if module == "__init__" else f"dgm.{module.removesuffix('.__init__')}"
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
