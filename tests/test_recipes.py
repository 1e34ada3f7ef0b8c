"""The short version of every recipe in recipes/: the same options, on a few hundred images
for one epoch, through the command line. The full runs and their results are in
BENCHMARKS.md."""

from pathlib import Path

import pytest
import yaml

from dgm.cli import main
from dgm.distributed import cpu_has_native_bf16

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"vae-fashion-mnist", "vae-mnist", "flow-fashion-mnist",
                                       "flow-mnist", "gan-fashion-mnist", "gan-mnist",
                                       "diffusion-fashion-mnist"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_short_version(recipe, fake_data_dir, tmp_path, capsys):
    model = yaml.safe_load(recipe.read_text())["model"]
    run = tmp_path / "run"
    short = ["--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline",
             "--train-split", "train[:192]", "--val-split", "test[:64]", "--test-split",
             "test[64:]", "--epochs", "1", "--quiet", "--out", str(run)]
    recipe_values = yaml.safe_load(recipe.read_text())
    # A recipe runs as it is on any machine: it asks for bf16 as auto, and the run records
    # what auto chose here (a recipe saying bf16 fails here on a CPU without it).
    if recipe_values.get("precision") == "auto":
        recipe_values["precision"] = "bf16" if cpu_has_native_bf16() else "fp32"
    assert main(["train", model, "--config", str(recipe), *short]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in recipe_values.items():  # everything but the shortened options holds
        if key not in ("model", "dataset", "epochs", "train_split", "val_split", "test_split",
                       "offline"):
            assert saved[key] == value, key
    assert main(["evaluate", str(run), "--iw-samples", "5", "--time-samples", "2",
                 "--num-samples", "100", "--json"]) == 0
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.stem.endswith("-mnist")
                                    and not p.stem.endswith("fashion-mnist")],
                         ids=lambda p: p.stem)
def test_mnist_recipe_mirrors_its_fashion_mnist_twin(recipe):
    """The MNIST recipes are the measured Fashion-MNIST ones on other data: a change to a
    recipe that its twin misses (as gan-mnist.yaml once kept the shallow nets) fails here."""
    twin = recipe.with_name(recipe.stem.replace("-mnist", "-fashion-mnist") + ".yaml")
    ours, theirs = (yaml.safe_load(p.read_text()) for p in (recipe, twin))
    assert ours.pop("dataset") == "mnist" and theirs.pop("dataset") == "fashion-mnist"
    assert ours == theirs
