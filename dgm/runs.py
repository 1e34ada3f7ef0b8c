"""The run folder and the checkpoint format: their one owner.

A run folder holds ``config.yaml`` (the model's name and resolved options),
``metrics.csv`` (one row per epoch), ``checkpoints/{last,best}.pt``, sample
grids, curve plots, evaluation results and the HTML report. Every file is
written atomically (temporary file, fsync, rename), so a run killed at any
moment leaves the previous version of each file intact.
"""

import csv
import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from dgm.config import TrainConfig, from_dict
from dgm.errors import DgmError

__all__ = ["FORMAT_VERSION", "DiskFull", "RunLock", "check_no_links", "check_run_folder",
           "holds_results", "is_dgm_run", "json_safe", "load_checkpoint", "load_config",
           "load_weights", "read_evaluations", "read_metrics", "remove_stale_temps",
           "save_checkpoint", "save_config", "save_evaluation", "write_metrics"]

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFull(DgmError):
    """The disk filled while dgm wrote a file; the file's previous version is intact."""


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB"):
        if free < 1024 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024


# What dgm writes at an --out path says so where dgm puts it (a PNG text chunk, the head of
# its page), so that dgm replaces its own pictures and pages there and never a file of
# yours: not a page that merely quotes the mark, nor a file that only contains its bytes.
PNG_MARK = ("Software", "dgm")
HTML_HEAD = ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
             '<meta name="generator" content="dgm">')
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT = PNG_MARK[0].encode() + b"\0" + PNG_MARK[1].encode()
_PNG_CHUNK = len(_PNG_TEXT).to_bytes(4, "big") + b"tEXt" + _PNG_TEXT  # length and all


def dgm_wrote(path: Path) -> bool:
    """Whether the file at ``path`` is a picture or page that dgm wrote."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return ((head.startswith(_PNG_SIGNATURE) and _PNG_CHUNK in head)
            or head.startswith(HTML_HEAD.encode()))


def atomic_write(path: str | Path, write: Callable[[io.IOBase], None], mode: str = "wb",
                 new: bool = False) -> None:
    """Write a file through ``write(f)`` so readers see the old or new file, never half.

    With ``new``, the file must not exist when it is published, even if one appeared while
    it was written: a file found there then ends in a :class:`DgmError` and is left as it is.
    A full disk leaves the old file and no temporary one, and ends in :class:`DiskFull`
    naming the file and the free space."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_TEMP_TAG}",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give the usual mode
            if new:
                _publish_new(tmp, path)
            else:
                os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(f"the disk is full: could not write {path} ({_free_space(path.parent)} "
                       "free there); its previous version is kept; free some space") from None


def _publish_new(tmp: str, path: Path) -> None:
    appeared = DgmError(f"{path} appeared while dgm wrote it; dgm does not replace your files: "
                        "choose another name")
    try:
        os.link(tmp, path)  # unlike a rename, never replaces what is there
    except FileExistsError:
        raise appeared from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        # A file system without hard links: check, then rename (a narrow window remains).
        if os.path.lexists(path):
            raise appeared from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


# The folders of a run that dgm writes into, and the temporary names atomic_write gives:
# ".NAME.dgm-XXXXXXXX.tmp", a tag that a file of yours is unlikely to carry.
RUN_FOLDERS = (".", "checkpoints", "samples", "manifold")
_TEMP_TAG = "dgm-"
_TEMP = re.compile(rf"\..+\.{_TEMP_TAG}[a-z0-9_]{{8}}\.tmp")
# Written with a run's first config.yaml: what a copy of that config in a folder of yours
# lacks, so that such a folder is never taken for a run.
RUN_MARK = ".dgm-run"


def remove_stale_temps(run: Path) -> None:
    """Delete the temporary files that a process killed mid-write left in ``run``: only
    atomic_write's names, only in the folders dgm writes, never through a link to elsewhere."""
    for folder in RUN_FOLDERS:
        if (run / folder).is_symlink():
            continue
        for p in (run / folder).glob(".*.tmp"):
            if _TEMP.fullmatch(p.name) and p.is_file():
                p.unlink()


def is_dgm_run(run: Path) -> bool:
    """Whether ``run`` is a folder that dgm wrote, by what only dgm writes: a config.yaml
    that carries dgm's ``format_version`` beside the run's mark (``.dgm-run``), or (runs
    made before the mark) a last checkpoint that is dgm's. A file named config.yaml alone,
    even a copy of a run's, proves nothing."""
    config = run / "config.yaml"
    if not (run.is_dir() and config.is_file()):
        return False
    if not (run / RUN_MARK).is_file():
        return _has_dgm_checkpoint(run)
    try:
        with open(config) as f:
            values = yaml.load(f, Loader=_Loader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        values = None  # an edited config of a run is still a run: its checkpoint says so
    if isinstance(values, dict) and "model" in values and isinstance(
            values.get("format_version"), int) and not isinstance(values["format_version"], bool):
        return True
    return _has_dgm_checkpoint(run)


def _has_dgm_checkpoint(run: Path) -> bool:
    try:
        load_checkpoint(run / "checkpoints" / "last.pt")
    except DgmError:
        return False
    return True


def holds_results(run: Path) -> bool:
    """Whether a run folder holds what a new training would lose: a checkpoint, a
    metrics row or an evaluation."""
    metrics = run / "metrics.csv"
    try:
        rows = metrics.is_file() and len(metrics.read_text().split()) > 1
    except (OSError, UnicodeDecodeError):
        rows = True  # unreadable: assume it is worth keeping
    return rows or (run / "evaluation.json").exists() or any((run / "checkpoints").glob("*.pt"))


def check_no_links(run: Path) -> None:
    """Refuse a run whose subfolders are links: dgm would write and clean up elsewhere."""
    for folder in RUN_FOLDERS[1:]:
        if (run / folder).is_symlink():
            raise DgmError(f"{run / folder} is a link to elsewhere, and dgm writes only inside "
                           "its run folder: make it a folder (to keep a run on another disk, "
                           "link the whole run folder instead)")


def check_run_folder(run: Path) -> None:
    """Refuse to write a new run into anything but a new or empty folder or a dgm run."""
    if run.exists() and not run.is_dir():
        raise DgmError(f"--out {run} is a file, not a folder; choose another --out")
    # A run killed as it started holds only these: it is dgm's to start again.
    started = {".lock", RUN_MARK}
    if run.is_dir() and any(p.name not in started for p in run.iterdir()) and not is_dgm_run(run):
        raise DgmError(f"--out {run} is a folder that holds other files and is not a dgm run; "
                       "dgm writes only into a new or empty folder: choose another --out")


def default_run_dir(model: str, dataset: str) -> Path:
    """``runs/<model>-<data>-<time>``; a data set given as a path is named by its last part,
    a model given as an import path by its class."""
    name = Path(dataset).stem or "data"
    model = model.rpartition(":")[2]
    return Path("runs") / f"{model}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def save_config(run: Path, model: str, cfg: TrainConfig) -> None:
    if not (run / RUN_MARK).is_file():
        atomic_write(run / RUN_MARK, lambda f: f.write(
            "This folder is a run that dgm wrote (dgm train); see config.yaml.\n"), mode="w")
    text = yaml.safe_dump({"model": model, "format_version": FORMAT_VERSION,
                           **dataclasses.asdict(cfg)}, sort_keys=False)
    atomic_write(run / "config.yaml", lambda f: f.write(text), mode="w")


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a float needs a dot (``1e-3`` is a string); YAML 1.2,
    and most people, read ``1e-3`` and ``2E-4`` as numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning every failure into a one-line error. Numbers follow
    YAML 1.2: ``1e-3`` is a float."""
    try:
        with open(path) as f:
            values = yaml.load(f, Loader=_Loader)
    except OSError as e:
        raise DgmError(f"cannot read config {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise DgmError(f"config {path} is not valid YAML{at}; fix the file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DgmError(f"config {path} must be a mapping of option: value")
    return values


def load_config(run: str | Path) -> tuple[str, TrainConfig]:
    """Return ``(model name, config)`` of a run folder."""
    run = Path(run)
    path = run / "config.yaml"
    if not run.is_dir() or not path.is_file():
        raise DgmError(f"{run} is not a dgm run folder (no config.yaml); "
                       "give the folder that 'dgm train' wrote")
    if not is_dgm_run(run):
        raise DgmError(f"{run} is not a dgm run folder (its config.yaml is not one that dgm "
                       "wrote, and it has no dgm checkpoint); give the folder that 'dgm train' "
                       "wrote")
    values = read_yaml(path)
    model = values.pop("model", None)
    values.pop("format_version", None)
    return model, from_dict(str(model), values, source=str(path), recorded=True)


def save_checkpoint(path: Path, payload: dict) -> None:
    # Serialised in memory first: torch.save on a full disk raises a RuntimeError about
    # file positions, where a plain write raises the OSError that names the problem.
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, model: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise DgmError(f"no checkpoint at {path}; train first, or give a run folder that has one")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DgmError(f"checkpoint {path} is corrupt or not a dgm checkpoint ({first[:120]}); "
                       "resume from another checkpoint or retrain") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "model" not in ckpt:
        raise DgmError(f"{path} is not a dgm checkpoint; give a file that 'dgm train' wrote")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise DgmError(f"checkpoint {path} has format {ckpt['format_version']}, newer than this "
                       f"dgm's {FORMAT_VERSION}; upgrade dgm")
    if model is not None and ckpt["model"] != model:
        raise DgmError(f"checkpoint {path} holds a {ckpt['model']} model, not a {model}")
    return ckpt


def load_weights(model: torch.nn.Module, ckpt: dict, path: str | Path) -> None:
    """Load a checkpoint's weights into ``model``, or say why they do not fit."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError):
        raise DgmError(f"checkpoint {path} does not fit the model its run's config.yaml "
                       "describes; was the config edited? restore it or retrain") from None


def write_metrics(run: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(f):
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)

    atomic_write(run / "metrics.csv", write, mode="w")


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()}
                for row in rows]
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError):
        raise DgmError(f"{path} is not the metrics table dgm wrote (edited or corrupt); "
                       "restore it, or delete it and resume the run to rewrite it") from None


def read_evaluations(run: str | Path) -> dict[str, dict]:
    """Every evaluation saved in ``run/evaluation.json``, keyed by what it measured."""
    path = Path(run) / "evaluation.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and "model" in data:  # one unkeyed result, as dgm 0.1.0 wrote
        data = {"(unkeyed)": data}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DgmError(f"{path} is not the evaluation file dgm wrote (edited or corrupt); "
                       "restore it, or delete it and run dgm evaluate again")
    return data


def save_evaluation(run: str | Path, key: str, results: dict) -> None:
    """Add ``results`` under ``key`` to ``run/evaluation.json``, keeping other evaluations;
    values that are not finite (a standard error from one image) are written as null.

    The read, merge and write hold a lock on ``run/.evaluation.lock``, so that two
    evaluations of one run that end at once both keep their results."""
    text = json.dumps(json_safe(results), allow_nan=False)  # fails before the lock is taken
    with open(Path(run) / ".evaluation.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        evaluations = read_evaluations(run)
        evaluations[key] = {**evaluations.get(key, {}), **json.loads(text)}
        text = json.dumps(evaluations, indent=2, allow_nan=False)
        atomic_write(Path(run) / "evaluation.json", lambda f: f.write(text), mode="w")


def json_safe(value):
    """``value`` with every non-finite float replaced by None, which JSON can hold."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLock:
    """An exclusive lock on a run folder, so that two trainings cannot write the same run."""

    def __init__(self, run: Path):
        self.run, self.made = run, not run.exists()
        run.mkdir(parents=True, exist_ok=True)
        try:  # never truncates, nor follows a link: a .lock of yours stays as it is
            fd = os.open(run / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise DgmError(f"cannot lock {run / '.lock'} ({e.strerror}); dgm does not write "
                           "through links: remove it or choose another --out") from None
        self.file = os.fdopen(fd, "w")  # held for the run's lifetime
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise DgmError(f"{run} is in use by another dgm process; wait for it to finish "
                           "or choose another --out") from None

    def release(self) -> None:
        """Unlock; a folder this lock made and nothing else filled is removed again."""
        if self.made and [p.name for p in self.run.iterdir()] == [".lock"]:
            (self.run / ".lock").unlink()
            self.run.rmdir()
        self.file.close()


# A run packed into one file (``dgm export``), and the zoo's trained models: the weights
# that evaluation uses and the run's config, metrics and evaluations as text, in
# safetensors (no pickle, so loading runs no code).
PACK_FORMAT = "dgm-run"


def pack_run(run: Path, out: Path, state_dict: dict, ckpt: dict) -> None:
    """Write ``run``'s model (``state_dict``: the weights that evaluation uses) and its
    record into ``out``."""
    from safetensors.torch import save

    model, cfg = load_config(run)
    meta = {"format": PACK_FORMAT, "format_version": str(FORMAT_VERSION), "model": model,
            "config": json.dumps(dataclasses.asdict(cfg)),
            "image_shape": json.dumps(list(ckpt.get("image_shape", (1, 28, 28)))),
            "epoch": str(ckpt["epoch"]), "step": str(ckpt["step"]),
            "metrics": json.dumps(json_safe(read_metrics(run))),
            "evaluation": json.dumps(read_evaluations(run))}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = save(tensors, metadata=meta)
    atomic_write(out, lambda f: f.write(data), new=True)  # a file of yours is never replaced


def unpack_run(path: Path, folder: Path) -> None:
    """Lay a packed run out in ``folder`` as a run folder (its checkpoint holds weights only,
    so it can be evaluated, sampled and reported, not resumed)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        if meta.get("format") != PACK_FORMAT:
            raise ValueError("no dgm record in it")
        if int(meta["format_version"]) > FORMAT_VERSION:
            raise DgmError(f"{path} has format {meta['format_version']}, newer than this dgm's "
                           f"{FORMAT_VERSION}; upgrade dgm")
        model, config = meta["model"], json.loads(meta["config"])
        payload = {"model": model, "config": config, "state_dict": tensors,
                   "image_shape": json.loads(meta["image_shape"]), "epoch": int(meta["epoch"]),
                   "step": int(meta["step"]), "history": json.loads(meta["metrics"])}
        evaluation = json.loads(meta["evaluation"])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
        raise DgmError(f"{path} is not a run that 'dgm export' packed ({e}); give a run "
                       "folder, a file that 'dgm export' wrote, or zoo:NAME") from None
    save_config(folder, model, from_dict(model, config, source=str(path), recorded=True))
    write_metrics(folder, payload["history"])
    save_checkpoint(folder / "checkpoints" / "best.pt", payload)
    if evaluation:
        text = json.dumps(evaluation, indent=2)
        atomic_write(folder / "evaluation.json", lambda f: f.write(text), mode="w")
