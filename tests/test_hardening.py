"""Inputs that once ended in a traceback, a silent wrong result, lost files or advice that
did not work: each family gets a one-line error or the documented behaviour."""

import dataclasses
import gzip
import json
import math
import os
import stat

import numpy as np
import pytest
import torch
from conftest import write_idx
from test_cli import one_line_error, vae

from dgm import data
from dgm.cli import main
from dgm.config import CONFIGS, field_type
from dgm.errors import DgmError
from dgm.interpolation import interpolate
from dgm.runs import load_checkpoint


def usage_error(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err, err


# Numbers that pass a range check but not the optimiser or the maths.

@pytest.mark.parametrize("model", list(CONFIGS))
def test_non_finite_floats_are_refused(model, fake_data_dir, tmp_path, capsys):
    floats = [f.name for f in dataclasses.fields(CONFIGS[model]) if field_type(f)[0] is float]
    for name in floats:
        for value in ("nan", "inf", "-inf"):
            argv = ["train", model, f"--{name.replace('_', '-')}={value}",
                    "--out", str(tmp_path / "r")]
            one_line_error(capsys, 1, argv, f"option {name} must be")
    assert not (tmp_path / "r").exists()


def test_readme_counts_the_non_finite_floats_tested():
    """The README's hardening table gives the count that the test above enumerates."""
    from pathlib import Path

    n = sum(field_type(f)[0] is float for m in CONFIGS for f in dataclasses.fields(CONFIGS[m]))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"| {3 * n} non-finite floats (`nan`, `inf`, `-inf` in each of the {n} float" in readme


def test_out_of_range_numbers(fake_data_dir, tmp_path, capsys):
    r = str(tmp_path / "r")
    cases = [
        (["train", "gan", "--beta1", "1.0", "--out", r], "beta1 must be < 1.0"),
        (["train", "gan", "--beta2", "1", "--out", r], "beta2 must be < 1.0"),
        (["train", "vae", "--seed", str(2 ** 64), "--out", r], "seed must be <="),
        (["train", "vae", "--latent-dim", str(10 ** 9), "--out", r], "latent_dim must be <="),
        (["train", "vae", "--hidden-dim", str(10 ** 12), "--out", r], "hidden_dim must be <="),
        (["train", "gan", "--batch-size", "1", "--out", r], "batch_size must be >= 2"),
        (["train", "flow", "--batch-size", "1", "--out", r], "batch_size must be >= 2"),
        (["train", "vae", "--sample-epochs", "0,-1", "--out", r], "integers >= 0"),
        (["evaluate", r, "--iw-samples", str(10 ** 7)], "--iw-samples must lie in"),
        (["evaluate", r, "--num-samples", "3"], "--num-samples in 4..1000000"),
        (["report", r, "--out", "x.png"], "must end in .html"),
    ]
    for argv, match in cases:
        one_line_error(capsys, 1, argv, match)
    usage_error(capsys, ["sample", r, "--seed", str(2 ** 64), "--out", "x.png"], "seed")
    usage_error(capsys, ["interpolate", r, "--seed", "-1", "--out", "x.png"], "seed")
    assert not (tmp_path / "r").exists()


def test_out_of_memory_is_one_line(fake_data_dir, tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 4000000000000 bytes.")

    monkeypatch.setattr("dgm.train.build_model", no_memory)
    one_line_error(capsys, 1, vae(fake_data_dir, tmp_path / "r"), "out of memory")
    assert not (tmp_path / "r").exists()


# Run folders with a corrupt or hand-edited file.

@pytest.fixture
def run(fake_data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(vae(fake_data_dir, run, "--epochs", "1")) == 0
    return run


def test_report_on_corrupt_run_files(run, capsys):
    report = ["report", str(run)]
    edits = [("config.yaml", "model: [vae\n", "not valid YAML"),
             ("config.yaml", "- a list\n", "must be a mapping"),
             ("metrics.csv", "epoch,val_elbo\n1,lots\n", "not the metrics table"),
             ("metrics.csv", "epoch\n1,2,3\n", "not the metrics table"),
             ("evaluation.json", "{not json", "not the evaluation file"),
             ("evaluation.json", "[1, 2]", "not the evaluation file")]
    for name, text, match in edits:
        original = (run / name).read_bytes() if (run / name).exists() else None
        (run / name).write_text(text)
        one_line_error(capsys, 1, report, match)
        if original is None:
            (run / name).unlink()
        else:
            (run / name).write_bytes(original)
    # Files in samples/ that dgm did not write are passed over, not fatal.
    (run / "samples" / "epoch_abc.png").write_bytes(b"not a png")
    (run / "samples" / "epoch_007.png").write_text("a text file with a png name")
    (run / "samples" / "notes.txt").write_text("mine")
    assert main(report) == 0
    page = (run / "report.html").read_text()
    assert page.count("<img") == 3  # curves, and the samples of epochs 0 and 1


def test_resumed_training_with_a_corrupt_evaluation_still_finishes(run, capsys):
    (run / "evaluation.json").write_text("{not json")
    assert main(["train", "vae", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert "no report written" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert (run / "evaluation.json").read_text() == "{not json"  # not dgm's to repair


# Data files of the wrong image size or element type.

@pytest.mark.parametrize("images", [np.zeros((256, 32, 32), np.uint8),
                                    np.zeros((256, 28, 28), np.int32)])
def test_data_of_the_wrong_size_or_type(images, fake_data_dir, tmp_path, capsys):
    path = fake_data_dir / "mnist" / "train-images-idx3-ubyte.gz"
    if images.dtype == np.uint8:
        write_idx(path.with_suffix(""), images)
    else:  # IDX type code 0x0C: big-endian int32
        header = bytes([0, 0, 0x0C, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
        path.write_bytes(gzip.compress(header + images.astype(">i4").tobytes()))
    data.idx._read_idx.cache_clear()
    one_line_error(capsys, 1, vae(fake_data_dir, tmp_path / "r"), "not the 8-bit 28x28")


# torchrun's variables set wrongly or without torchrun.

@pytest.mark.parametrize("env,match", [
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE is 0"),
    ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT is not"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "RANK 2 is outside 0..1"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9",
      "DGM_DIST_TIMEOUT": "1"}, "waited 1 s for rank 0"),
])
def test_torchrun_environment(env, match, fake_data_dir, tmp_path, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    one_line_error(capsys, 1, vae(fake_data_dir, tmp_path / "r"), match)
    assert not (tmp_path / "r").exists()


# Interrupts, non-finite losses, and whether the advice they print then works.

def test_interrupt_at_start_up_leaves_nothing(fake_data_dir, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dgm.train.epoch_pictures", interrupt)
    assert main(vae(fake_data_dir, tmp_path / "r", "--epochs", "1")) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr("dgm.train.build_model", interrupt)
    assert main(vae(fake_data_dir, tmp_path / "s", "--epochs", "1")) == 130
    assert not (tmp_path / "s").exists()  # no lock-only folder


def test_advice_after_an_interrupt_in_the_first_epoch_works(fake_data_dir, tmp_path, capsys,
                                                            monkeypatch):
    import dgm.train

    real = dgm.train._train_epoch

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dgm.train, "_train_epoch", interrupt)
    run = tmp_path / "r"
    assert main(vae(fake_data_dir, run, "--epochs", "2")) == 130
    advice = capsys.readouterr().err.split("continue with: ")[1].split()
    monkeypatch.setattr(dgm.train, "_train_epoch", real)
    assert advice[:3] == ["dgm", "train", "vae"]
    assert main(advice[1:] + ["--quiet"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_advice_after_a_non_finite_loss_works(fake_data_dir, tmp_path, capsys):
    """With the cause in place (a VAE that diverges at --lr 10), the advice is followed as
    written: a new --out and the --lr it says (lower), same seed. The same run again fails
    alike, so it is the learning rate that the advice fixes. Planted bug it catches: advice
    that names the wrong remedy (the message saying "a higher --lr")."""
    argv = vae(fake_data_dir, tmp_path / "r", "--epochs", "1", "--lr", "10")
    one_line_error(capsys, 1, argv, "no epoch had finished; start a new run (another --out) "
                   "with a lower --lr")
    assert main(argv) == 1  # again, to read the advice: the run fails alike
    advice = capsys.readouterr().err.split("start a new run (another --out) with a ")[1]
    lr = {"lower": "1e-3", "higher": "1e4"}[advice.split()[0]]
    assert main(vae(fake_data_dir, tmp_path / "r2", "--epochs", "1", "--lr", lr)) == 0


def test_resume_combinations(run, fake_data_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\n")
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run), "--config", str(cfg)],
                   "--config cannot change a run on --resume")
    assert main(["train", "vae", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run), "--epochs", "1"],
                   "--epochs 1 is fewer than the 2 epochs")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["epochs"] == 2
    usage_error(capsys, ["train", "vae", "--resume", ""], "empty string")
    usage_error(capsys, ["train", "vae", "--out", " "], "empty string")


# Writing only into what is dgm's.

def test_out_is_never_a_foreign_folder(fake_data_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "deep").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "deep" / ".draft.tmp").write_text("keep me too")
    one_line_error(capsys, 1, vae(fake_data_dir, mine), "not a dgm run")
    assert sorted(p.name for p in mine.rglob("*")) == [".draft.tmp", "deep", "notes.txt"]
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, 1, vae(fake_data_dir, tmp_path / "file"), "is a file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(vae(fake_data_dir, empty, "--epochs", "1")) == 0


@pytest.mark.parametrize("command", ["sample", "interpolate", "manifold", "report"])
def test_out_replaces_only_what_dgm_wrote(run, tmp_path, capsys, command):
    """--out at a file of yours (a PNG or page that another program wrote, even one that
    quotes dgm's mark) is refused and the file kept; a file that dgm wrote there is
    replaced. Planted bugs it catches: --out not checked (every file replaced, as before);
    the mark looked for anywhere in the file's start (as before: a page of notes about dgm
    was replaced)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from dgm.runs import dgm_wrote

    suffix = ".html" if command == "report" else ".png"
    theirs = [tmp_path / f"theirs{i}{suffix}" for i in range(3)]
    if suffix == ".png":
        Image.new("L", (8, 8)).save(theirs[0])
        info = PngInfo()  # another program's picture, whose comment quotes dgm's chunk
        info.add_text("Comment", "made beside tEXtSoftware\0dgm")
        Image.new("L", (8, 8)).save(theirs[1], pnginfo=info)
        theirs[2].write_bytes(b"notes: dgm's PNGs hold \0\0\0\x0ctEXtSoftware\0dgm")
    else:
        theirs[0].write_text('<!doctype html><html><head><meta name="generator" content="x">')
        theirs[1].write_text('<!doctype html><html><head><title>notes</title></head><body>'
                             'dgm marks its pages <meta name="generator" content="dgm"></body>')
        theirs[2].write_text('<p>dgm\'s page starts <!doctype html><html lang="en"><head>'
                             '<meta charset="utf-8"><meta name="generator" content="dgm">')
    for path in theirs:
        before = path.read_bytes()
        assert not dgm_wrote(path)
        one_line_error(capsys, 1, [command, str(run), "--out", str(path)],
                       "dgm did not write it")
        assert path.read_bytes() == before
    if command == "manifold":
        return  # this run's latent is not 2-d; the refusal came first all the same
    ours = tmp_path / f"ours{suffix}"
    assert main([command, str(run), "--out", str(ours)]) == 0
    first = ours.stat().st_ino
    assert main([command, str(run), "--out", str(ours)]) == 0  # over dgm's own file
    assert dgm_wrote(ours) and ours.stat().st_ino != first
    # the run's own pictures carry the mark too (PIL's and matplotlib's writers)
    assert dgm_wrote(run / "curves.png") and dgm_wrote(next((run / "samples").iterdir()))


def test_stale_temps_are_only_dgms(run, capsys):
    """Planted bug: any ".NAME.XXXXXXXX.tmp" taken for dgm's (as dgm did), which deleted a
    file of yours named like ".notes.20241201.tmp"."""
    (run / "samples" / ".epoch_001.png.dgm-ab12cd34.tmp").write_text("dgm's, from a kill")
    (run / "extra").mkdir()
    (run / "extra" / ".epoch_001.png.dgm-ab12cd34.tmp").write_text("the user's")
    yours = [".notes.tmp", ".notes.20241201.tmp", ".report.html.bak_0001.tmp"]
    for name in yours:
        (run / name).write_text("the user's")
    assert main(["train", "vae", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert not (run / "samples" / ".epoch_001.png.dgm-ab12cd34.tmp").exists()
    assert (run / "extra" / ".epoch_001.png.dgm-ab12cd34.tmp").exists()
    assert all((run / name).read_text() == "the user's" for name in yours)


def test_failed_download_leaves_no_litter(tmp_path, monkeypatch):
    info = data.IdxFile("t10k-images-idx3-ubyte", "0" * 64, "")
    ds = data.Dataset(mirrors=((tmp_path / "nowhere").as_uri() + "/",),
                      files={"test-images": info}, classes=())
    monkeypatch.setitem(data.DATASETS, "toy", ds)
    with pytest.raises(DgmError):
        data.download("toy", "test-images", dest_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    (tmp_path / "cache").mkdir()
    with pytest.raises(DgmError):
        data.download("toy", "test-images", dest_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_refused_start_leaves_no_folder(fake_data_dir, tmp_path, capsys, monkeypatch):
    from dgm.errors import DgmError

    def refuse(run):
        raise DgmError("tensorboard refused")

    monkeypatch.setattr("dgm.train._tensorboard", refuse)
    one_line_error(capsys, 1, vae(fake_data_dir, tmp_path / "r", "--tensorboard"), "refused")
    assert not (tmp_path / "r").exists()


# Comparisons, overlapping splits, evaluations.

def test_report_comparison_keeps_runs_of_the_same_name(fake_data_dir, tmp_path, capsys):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert main(vae(fake_data_dir, a, "--epochs", "1")) == 0
    assert main(vae(fake_data_dir, b, "--epochs", "1", "--seed", "1")) == 0
    out = tmp_path / "cmp.html"
    (tmp_path / "cmp.curves.png").write_text("the user's")
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    page = out.read_text()
    assert "a/run" in page and "b/run" in page
    assert (tmp_path / "cmp.curves.png").read_text() == "the user's"
    one_line_error(capsys, 1, ["report", str(a), str(a), "--out", str(out)], "named twice")


def test_overlapping_splits_are_named(fake_data_dir, tmp_path, capsys):
    argv = ["train", "vae", "--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline",
            "--train-split", "train[:128]", "--val-split", "train[96:160]", "--test-split",
            "test", "--epochs", "1", "--batch-size", "32", "--hidden-dim", "16", "--quiet",
            "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "split 'train[:128]' and the validation split 'train[96:160]' share 32 images" in err
    assert "test split" not in err
    assert main(["evaluate", str(tmp_path / "r"), "--split", "train[120:130]", "--iw-samples",
                 "2", "--json"]) == 0
    out = capsys.readouterr()
    assert "8 of these 10 images are in the training split" in json.loads(out.out)["warning"]
    assert "not a test result" in out.err


def test_evaluations_are_valid_json_and_kept_apart(run, capsys):
    for argv in (["--split", "test[64:65]", "--iw-samples", "1"], ["--iw-samples", "5"],
                 ["--iw-samples", "7"]):
        assert main(["evaluate", str(run), "--json", *argv]) == 0
        json.loads(capsys.readouterr().out)  # no NaN, which JSON cannot hold
    saved = json.loads((run / "evaluation.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in evaluation.json"))
    assert list(saved) == ["test[64:65] (best, k=1)", "test[64:] (best, k=5)",
                           "test[64:] (best, k=7)"]
    one = saved["test[64:65] (best, k=1)"]
    assert one["n_images"] == 1 and one["elbo"]["sem_nats"] is None
    assert one["iwae"]["mc_stderr_nats"] is None
    assert math.isfinite(one["iwae"]["log_px_nats"])


def test_slerp_through_the_origin():
    for a, b in ((torch.tensor([0.5]), torch.tensor([-0.3])),
                 (torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])),
                 (torch.zeros(3), torch.ones(3))):
        path = interpolate(a, b, 5, "slerp")
        assert torch.isfinite(path).all()
        assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    path = interpolate(torch.tensor([0.5]), torch.tensor([-0.3]), 5, "slerp")
    torch.testing.assert_close(path.flatten(), torch.tensor([0.5, 0.3, 0.1, -0.1, -0.3]))


# A folder of the user's that merely holds dgm's file names.

@pytest.mark.parametrize("theirs", ["my notes: keep\n", "model: vae\nlatent_dim: 3\n"])
def test_a_users_config_yaml_does_not_make_a_run(theirs, fake_data_dir, tmp_path, capsys):
    """Planted bug: recognising a run by the name config.yaml alone (as dgm did): the
    user's file is then replaced and the folder trained into."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text(theirs)
    one_line_error(capsys, 1, vae(fake_data_dir, mine, "--epochs", "1"), "not a dgm run")
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(mine)], "not a dgm run")
    one_line_error(capsys, 1, ["report", str(mine)], "not a dgm run")
    one_line_error(capsys, 1, ["evaluate", str(mine)], "not a dgm run")
    assert [p.name for p in mine.iterdir()] == ["config.yaml"]
    assert (mine / "config.yaml").read_text() == theirs


def test_a_copy_of_a_runs_config_does_not_make_a_run(run, fake_data_dir, tmp_path, capsys):
    """A run's config.yaml serves as --config, so it is copied into folders of yours; with
    dgm's format_version in it, it once made such a folder a run, and training there replaced
    your metrics.csv, report.html and pictures. Planted bug: the run's mark not required."""
    mine = tmp_path / "mine"
    (mine / "samples").mkdir(parents=True)
    yours = {"config.yaml": (run / "config.yaml").read_text() + "# my notes\n",
             "metrics.csv": "mine\n", "report.html": "<html>mine</html>",
             "samples/epoch_000.png": "mine"}
    for name, text in yours.items():
        (mine / name).write_text(text)
    one_line_error(capsys, 1, vae(fake_data_dir, mine, "--epochs", "1"), "not a dgm run")
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(mine)], "not a dgm run")
    one_line_error(capsys, 1, ["report", str(mine)], "not a dgm run")
    assert {str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file()} == set(yours)
    assert all((mine / name).read_text() == text for name, text in yours.items())


def test_a_run_killed_as_it_started_starts_again(fake_data_dir, tmp_path):
    """SIGKILL after the lock (and the mark) but before config.yaml leaves only those: the
    same command then starts the run (a random kill in the reliability test found this)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("")
    (run / ".dgm-run").write_text("")
    assert main(vae(fake_data_dir, run, "--epochs", "1", "--quiet")) == 0
    assert (run / "checkpoints" / "last.pt").is_file()


def test_a_run_that_holds_results_is_never_started_again_over_them(run, fake_data_dir,
                                                                   tmp_path, capsys):
    """Without checkpoints/last.pt (kept only best.pt, to save space), a run was taken for
    one stopped before its first checkpoint: a new training, even of another model, or
    --resume replaced its best checkpoint and metrics. Planted bug: last.pt alone checked."""
    (run / "checkpoints" / "last.pt").unlink()
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    gan = ["train", "gan", "--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline",
           "--train-split", "train[:64]", "--val-split", "test[:32]", "--epochs", "1",
           "--out", str(run)]
    one_line_error(capsys, 1, gan, "already holds a run")
    one_line_error(capsys, 1, vae(fake_data_dir, run, "--epochs", "1"), "already holds a run")
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run)], "no checkpoints/last.pt")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept


def test_links_are_never_written_through(run, tmp_path, capsys):
    """A subfolder of a run linked elsewhere (dgm would write and clean up there), a link at
    --npz, an export FILE or --out (a dangling one looked like nothing and was replaced), a
    .lock linked to a file of yours (it was truncated): each refused, nothing touched."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    (gallery / "epoch_002.png").write_text("mine")
    (gallery / ".holiday.dgm-abcdefgh.tmp").write_text("mine")
    (run / "samples").rename(tmp_path / "moved")
    (run / "samples").symlink_to(gallery)
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run), "--epochs", "2"],
                   "is a link to elsewhere")
    assert sorted(p.name for p in gallery.iterdir()) == [".holiday.dgm-abcdefgh.tmp",
                                                          "epoch_002.png"]
    (run / "samples").unlink()
    (tmp_path / "moved").rename(run / "samples")
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(precious)
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run), "--epochs", "2"],
                   "does not write through links")
    assert precious.read_text() == "mine"
    for argv, link in ((["sample", str(run), "-n", "4", "--npz"], "s.npz"),
                       (["sample", str(run), "-n", "4", "--out"], "s.png"),
                       (["export", str(run)], "r.safetensors")):
        (tmp_path / link).symlink_to(tmp_path / "usb" / link)  # dangling
        one_line_error(capsys, 1, [*argv, str(tmp_path / link)], "is a link")
        assert (tmp_path / link).is_symlink()


def test_a_new_file_that_appears_while_dgm_writes_is_kept(tmp_path):
    """--npz and dgm export publish with a link, which never replaces: a file of yours made
    at that name while dgm was writing stays. Planted bug: a rename (which replaces)."""
    from dgm.runs import atomic_write

    path = tmp_path / "s.npz"

    def write(f):
        f.write(b"dgm's")
        path.write_bytes(b"yours")  # made meanwhile

    with pytest.raises(DgmError, match="appeared while dgm wrote it"):
        atomic_write(path, write, new=True)
    assert path.read_bytes() == b"yours" and list(tmp_path.iterdir()) == [path]
    atomic_write(tmp_path / "new.npz", lambda f: f.write(b"dgm's"), new=True)
    assert (tmp_path / "new.npz").read_bytes() == b"dgm's"
    # No temporary link left beside it (planted bug: the temporary file not unlinked after
    # the link), and the usual mode, not mkstemp's private 0600 (planted bug: no chmod).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npz", "s.npz"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.npz").stat().st_mode) == 0o666 & ~umask
    atomic_write(tmp_path / "s.npz", lambda f: f.write(b"replaced"))  # the replacing path
    assert stat.S_IMODE((tmp_path / "s.npz").stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npz", "s.npz"]


def test_a_new_file_on_a_file_system_without_links(tmp_path, monkeypatch):
    import errno
    import os

    from dgm.runs import atomic_write

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    atomic_write(tmp_path / "a.npz", lambda f: f.write(b"dgm's"), new=True)
    assert (tmp_path / "a.npz").read_bytes() == b"dgm's"
    with pytest.raises(DgmError, match="appeared while dgm wrote it"):
        atomic_write(tmp_path / "a.npz", lambda f: f.write(b"again"), new=True)
    assert (tmp_path / "a.npz").read_bytes() == b"dgm's" and len(list(tmp_path.iterdir())) == 1


def test_a_runs_config_is_recognised_and_serves_as_a_config(run, fake_data_dir, tmp_path,
                                                            capsys):
    assert yaml_of(run / "config.yaml")["format_version"] == 1
    # dgm's own run stopped before its first checkpoint (no checkpoint, no metrics row) is
    # still dgm's to restart.
    (run / "checkpoints" / "last.pt").unlink()
    (run / "checkpoints" / "best.pt").unlink()
    (run / "metrics.csv").write_text("\r\n")
    assert main(vae(fake_data_dir, run, "--epochs", "1")) == 0
    again = tmp_path / "again"
    assert main(vae(fake_data_dir, again, "--epochs", "1", "--config",
                    str(run / "config.yaml"))) == 0


def test_a_retired_option_in_an_old_run_loads_and_given_anew_is_refused(run, fake_data_dir,
                                                                       tmp_path, capsys):
    """--compile is offered for flow and diffusion only; runs of the vae that recorded it
    (every run before) still sample, and a config that asks for it says why not."""
    config = run / "config.yaml"
    config.write_text(config.read_text() + "compile: true\n")
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    old = tmp_path / "old.yaml"
    old.write_text("compile: true\n")
    one_line_error(capsys, 1, vae(fake_data_dir, tmp_path / "new", "--config", str(old)),
                   "compile is offered where it pays, for flow and diffusion")
    assert not (tmp_path / "new").exists()


def test_a_run_recorded_before_an_option_keeps_what_it_did():
    """--sample-rho came with default 0 and its default is now 3: a recorded diffusion
    config without it (every run before) samples as it did; a new one gets 3, and a
    recorded 3 stays 3 (the zoo's, the 2026-12-05 recipe, records DDIM at eta 0.5, rho 3).
    Planted bug it catches: BEFORE applied to new configs, or over a recorded value."""
    from dgm.config import from_dict
    from dgm.evaluate import load

    assert from_dict("diffusion", {}, recorded=True).sample_rho == 0.0
    assert from_dict("diffusion", {}).sample_rho == 3.0
    assert from_dict("diffusion", {"sample_rho": 3.0}, recorded=True).sample_rho == 3.0
    model = load("zoo:diffusion-fashion-mnist")
    assert (model.sampler, model.sample_rho, model.sample_eta) == ("ddim", 3.0, 0.5)


def yaml_of(path):
    import yaml

    return yaml.safe_load(path.read_text())


# Numbers as people write them in YAML.

def test_yaml_numbers_as_yaml_1_2_reads_them(tmp_path):
    """Planted bug: PyYAML's YAML 1.1 reading, where 1e-3 is the string '1e-3'."""
    from dgm.config import from_dict
    from dgm.errors import DgmError
    from dgm.runs import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nema: 9.99E-1\nepochs: 1e1\nkl_warmup_steps: 2E+2\n"
                    "latent_dim: 20.0\n")
    cfg = from_dict("vae", read_yaml(path))
    assert (cfg.lr, cfg.ema, cfg.epochs, cfg.kl_warmup_steps, cfg.latent_dim) == \
        (1e-3, 0.999, 10, 200, 20)
    assert type(cfg.epochs) is int and type(cfg.lr) is float
    for text, match in (("lr: '1e-3'\n", "lr must be of type float"),
                        ("lr: 1e-3x\n", "lr must be of type float"),
                        ("epochs: 1.5\n", "epochs must be of type int"),
                        ("epochs: 1e400\n", "epochs must be of type int"),
                        ("latent_dim: true\n", "latent_dim must be of type int")):
        path.write_text(text)
        with pytest.raises(DgmError, match=match):
            from_dict("vae", read_yaml(path))


def test_a_yaml_config_with_1e_minus_3_trains(fake_data_dir, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nepochs: 1e0\n")
    assert main(vae(fake_data_dir, tmp_path / "r", "--config", str(path))) == 0
    assert yaml_of(tmp_path / "r" / "config.yaml")["lr"] == 1e-3


# Too few images for a score.

def test_evaluation_on_a_tiny_split_reports_what_it_can(fake_data_dir, tmp_path, capsys):
    """Planted bug: no size check: precision/recall die in kthvalue() (they need k + 1
    points), the Frechet distance in torchmetrics (it needs two)."""
    run = tmp_path / "gan"
    assert main(["train", "gan", "--dataset", "mnist", "--data-dir", str(fake_data_dir),
                 "--offline", "--train-split", "train[:64]", "--val-split", "test[:32]",
                 "--epochs", "1", "--batch-size", "32", "--sample-epochs", "", "--quiet",
                 "--out", str(run)]) == 0
    for split, n in (("test[100:101]", 1), ("test[100:102]", 2), ("test[100:103]", 3),
                     ("test[100:104]", 4)):
        assert main(["evaluate", str(run), "--split", split, "--num-samples", "50",
                     "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["n_images"] == n and res["frechet"]["n_generated"] == 50
        pr, fd, kid = res["precision_recall"], res["frechet"], res["kid"]
        assert (pr["precision"] is None) == (n < 4) and (fd["distance"] is None) == (n < 2)
        assert (kid["mean"] is None) == (n < 2)
        if n < 4:
            assert "needs at least 4 test" in pr["note"]
        else:
            assert 0 <= pr["precision"] <= 1 and "note" not in pr
        assert math.isfinite(res["parzen"]["log_px_nats"])
