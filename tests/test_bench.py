"""dgm bench: each recipe's predicted wall time from measured speeds."""

import json
from pathlib import Path

import pytest

from dgm import bench
from dgm.cli import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_every_shipped_recipe_is_predicted_from_its_splits(monkeypatch, capsys):
    calls = []

    def fake_speeds(model, cfg, precision, seconds):
        calls.append((model, precision))
        return {"vae": 1000.0, "gan": 500.0, "flow": 200.0, "diffusion": 20.0}[model], 2000.0

    monkeypatch.setattr(bench, "speeds", fake_speeds)
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: False)
    assert main(["bench", "--json", *map(str, RECIPES)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["recipes"]) == len(RECIPES) >= 7
    assert "bf16" not in result["matmul_gflops"] and "not native" in result["bf16"]
    # The MNIST recipes share their Fashion-MNIST twins' nets (tests/test_recipes.py holds
    # them equal), so each model's nets are timed once.
    assert len({r["model"] for r in result["recipes"]}) == 4 and len(calls) == 4
    vae = next(r for r in result["recipes"] if r["recipe"].endswith("vae-fashion-mnist.yaml"))
    # train[:90%] = 54000 images, whole batches of 128 only; val train[90%:] = 6000.
    assert (vae["train_images"], vae["val_images"], vae["epochs"]) == (53888, 6000, 550)
    assert vae["fp32"]["epoch_s"] == pytest.approx(53888 / 1000 + 6000 / 2000)
    assert vae["fp32"]["predicted_s"] == pytest.approx(550 * (53.888 + 3))
    flow = next(r for r in result["recipes"] if r["recipe"].endswith("flow-fashion-mnist.yaml"))
    assert flow["train_images"] == 54000 // 64 * 64
    assert flow["fp32"]["predicted_s"] == pytest.approx(40 * (53952 / 200 + 6000 / 2000))


def test_a_tiny_recipe_is_measured_in_both_precisions_where_bf16_is_native(
        tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model: vae\ndataset: fashion-mnist\nhidden_dim: 16\nlatent_dim: 2\n"
                      "epochs: 3\nbatch_size: 32\nval_split: 'train[:1000]'\n")
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: True)  # emulated is fine here
    assert main(["bench", str(recipe), "--seconds", "0.05", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 1 and result["bf16"] == "native"
    assert result["matmul_gflops"]["fp32"] > 0 and result["matmul_gflops"]["bf16"] > 0
    (row,) = result["recipes"]
    for p in ("fp32", "bf16"):
        s = row[p]
        assert s["train_img_s"] > 0 and s["val_img_s"] > 0
        assert s["predicted_s"] == pytest.approx(
            3 * (54000 // 32 * 32 / s["train_img_s"] + 1000 / s["val_img_s"]))
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: False)  # emulated is slow
    assert main(["bench", str(recipe), "--seconds", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "matmul fp32" in text and "tiny.yaml: 3 epochs of vae: fp32" in text


@pytest.mark.parametrize("yaml_text, message", [
    ("model: vae\ndataset: /some/own/images.npz\n", "built-in data sets"),
    ("dataset: mnist\n", "names no model"),
    ("model: vae\nepochs: many\n", "epochs"),
])
def test_bad_recipes_are_one_line(tmp_path, capsys, yaml_text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml_text)
    assert main(["bench", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_no_recipes_and_bad_numbers_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "dgm" / "bench.py"))
    assert main(["bench"]) == 1
    assert "no recipes" in capsys.readouterr().err
    assert main(["bench", "x.yaml", "--seconds", "0"]) == 1
    assert "--seconds" in capsys.readouterr().err


def test_rates_and_times_are_counted_exactly(monkeypatch):
    """On a fake clock: a 2 n^3-flop product per call over the window's elapsed time; the
    seconds per call of a function that takes 0.25 s; whole minutes rounded up, as hours
    past 60 (planted bugs: n^3 flops; a call too few in the mean; "2 h 121 min")."""
    now = [0.0]

    def clock():
        now[0] += 1.0  # each reading of the clock takes one second
        return now[0]

    monkeypatch.setattr(bench.time, "perf_counter", clock)
    # t0 = 1; readings 2, 3, 4 are inside the 3.5 s window (3 products), 5 is not; the
    # rate is taken at the reading after that, 6: 5 s after t0.
    assert bench.matmul_rate(n=4, seconds=3.5) == 2 * 4 ** 3 * 3 / 5

    def quarter():
        now[0] += 0.25

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])  # reading takes no time
    assert bench._timed(quarter, seconds=1.0) == 0.25
    assert [bench._hours(s) for s in (1, 59, 60, 61, 3599, 3600, 7260, 7261)] == \
        ["1 min", "1 min", "1 min", "2 min", "1 h 00 min", "1 h 00 min", "2 h 01 min",
         "2 h 02 min"]


def test_speeds_run_the_model_in_the_precision_asked(monkeypatch):
    """Each training and validation step runs under autocast in the row's precision (planted
    bug: always fp32, so the bf16 row measured fp32)."""
    import contextlib

    from dgm.config import GANConfig

    seen = []

    def autocast(device, precision):
        seen.append(precision)
        return contextlib.nullcontext()

    monkeypatch.setattr(bench, "autocast", autocast)
    train, val = bench.speeds("gan", GANConfig(latent_dim=8, batch_size=4), "bf16", 0.0)
    assert train > 0 and val > 0
    assert seen and set(seen) == {"bf16"}
