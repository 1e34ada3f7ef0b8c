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
    "plots": {"runs", "errors"},
    "optim": set(),
    "evaluate": {"data", "distributed", "errors", "features", "maths", "models", "plots",
                 "quality", "runs", "zoo"},
    "zoo": {"errors", "runs"},
    "features": {"data", "errors", "runs"},
    "quality": {"features", "maths"},
}
# Everything under dgm/models/: the maths and data layers and each other, nothing above.
MODEL_ALLOWED = {"maths", "data", "errors", "optim", "models"}
# The data layer is one package whose modules import one way: each only the ones before it
# (builtin and own, the two kinds of source, not each other) and dgm.errors.
DATA_LAYERS = {"data.idx": set(), "data.splits": set(),
               "data.builtin": {"data.idx", "data.splits"},
               "data.own": {"data.idx", "data.splits"},
               "data.__init__": {"data.idx", "data.splits", "data.builtin", "data.own"}}
MODULES = sorted(".".join(p.relative_to(PKG).with_suffix("").parts)
                 for p in PKG.rglob("*.py"))


def dgm_imports(path: Path) -> set[str]:
    """The dgm modules that ``path`` imports, as paths below dgm ("models.transforms"), in
    every form: ``from dgm.x import y``, ``from dgm import x`` and ``import dgm.x``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
        if isinstance(node, ast.ImportFrom) and node.module == "dgm":
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dgm."):
            names.add(node.module.removeprefix("dgm."))
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("dgm.") for a in node.names
                      if a.name.startswith("dgm.")}
    return names


def test_the_data_layer_is_one_package_importing_one_way():
    assert {m for m in MODULES if m.startswith("data")} == set(DATA_LAYERS)
    for module, allowed in DATA_LAYERS.items():
        imported = dgm_imports(PKG / (module.replace(".", "/") + ".py"))
        assert imported <= allowed | {"errors"}, f"dgm.{module} imports {imported - allowed}"


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
