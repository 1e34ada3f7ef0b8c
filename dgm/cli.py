"""The ``dgm`` command: train, evaluate, sample, draw and report.

Every failure the user can cause ends in one line on stderr and a non-zero exit.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from dgm import interrupts
from dgm.config import CONFIGS, MAX_SEED, config_class, field_type, from_dict, validate
from dgm.errors import DgmError

# Options of a run that may change when it is resumed; the rest define the run.
RESUMABLE = {"epochs", "device", "data_dir", "offline", "precision", "compile", "sample_epochs",
             "tensorboard", "threads", "patience"}


RUN_HELP = ("a run folder, a file that 'dgm export' packed, or zoo:NAME (a trained model "
            "that ships with dgm; see dgm zoo)")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must lie in 0..2^63-1, got {text}")
    return value


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        base, _ = field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse
        kw = {"default": argparse.SUPPRESS, "help": text}
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif base == list[int]:
            p.add_argument(flag, type=_int_list, metavar="N,N,...", **kw)
        else:
            p.add_argument(flag, type=base, metavar=f.name.upper(),
                           choices=f.metadata.get("choices"), **kw)


def build_parser(own_model: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``own_model`` (an import path) adds ``train <own_model>`` with its flags."""
    parser = Parser(prog="dgm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train a model into a run folder")
    p.add_argument("--model", metavar="MODULE:CLASS", dest="model_path",
                   help="train your own model class, named by import path, in place of "
                        "vae/gan/flow/diffusion (then: dgm train --model MODULE:CLASS --help)")
    models = p.add_subparsers(dest="model", required=True, parser_class=Parser)
    own = {own_model: config_class(own_model)} if own_model not in (None, *CONFIGS) else {}
    for name, cls in (CONFIGS | own).items():
        m = models.add_parser(name, help=f"train a {name}")
        m.add_argument("--config", metavar="FILE.yaml", type=_path,
                       help="options from a YAML file; flags win over it")
        m.add_argument("--out", metavar="RUN", type=_path,
                       help="run folder (default runs/<model>-<data>-<time>); a new or empty "
                            "folder")
        m.add_argument("--resume", metavar="RUN", type=_path,
                       help="continue the run in this folder")
        m.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
        _add_config_flags(m, cls)
        m.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test metrics of a run (printed and saved as JSON)")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--split", help="data split (default: the run's test_split)")
    p.add_argument("--iw-samples", type=int, default=5000, metavar="K",
                   help="importance samples per image for log p(x) (default 5000)")
    p.add_argument("--batch-size", type=int, default=100, help="images per batch (default 100)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--dequant-samples", type=int, default=1, metavar="K",
                   help="flow: also the importance-weighted bound over K dequantisation draws "
                        "per image, beside the one-draw bound (default 1: only that)")
    p.add_argument("--time-samples", type=int, default=8, metavar="K",
                   help="diffusion: draws of t per image for the bound's time integral, "
                        "stratified (default 8)")
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                   help="VAE: also the naive prior-sampling estimate of report 1.4, which "
                        "costs as much as the IWAE one (default: on)")
    p.add_argument("--num-samples", type=int, default=10000, metavar="N",
                   help="samples drawn for the sample-quality scores (default 10000, the "
                        "usual count; fewer for a quick look, kept under its own key)")
    _add_sampling(p)
    p.add_argument("--sample-quality", action="store_true",
                   help="add Frechet and kernel distances, precision and recall (in the data "
                        "set's shipped feature network) and the Parzen score for any model "
                        "(always on for gan)")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="samples from a trained run: a grid, or an .npz to score")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("-n", type=int, default=64,
                   help="number of samples (default 64; at most 4096 in a grid, 100000 in an "
                        ".npz)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="random seed (default 0; 1234 draws the samples dgm evaluate scores)")
    p.add_argument("--out", metavar="FILE.png", type=_path, help="a grid of the samples")
    p.add_argument("--npz", metavar="FILE.npz", type=_path,
                   help="the samples as one float32 array (N, H, W) or (N, H, W, C) in [0, 1], "
                        "for dgm score; a new file")
    _add_sampling(p)
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    _add_common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("manifold", help="the learned 2-D manifold of a VAE with latent_dim 2")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--size", type=int, default=20, help="rows and columns (default 20)")
    p.add_argument("--out", required=True, metavar="FILE.png", type=_path)
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    _add_common(p)
    p.set_defaults(func=cmd_manifold)

    p = sub.add_parser("data", help="where each data set was found; verify checksums")
    p.add_argument("action", choices=("list", "check"))
    p.add_argument("--data-dir", help="folder holding <dataset>/ IDX files")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("report", help="a self-contained HTML page of one run, or several compared")
    p.add_argument("runs", metavar="RUN", nargs="+", help=RUN_HELP)
    p.add_argument("--out", metavar="FILE.html",
                   help="where to write (default RUN/report.html; required for several runs "
                        "and for a packed run)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("score", help="sample quality of anyone's samples, in the data set's "
                                     "shipped feature network")
    p.add_argument("samples", metavar="SAMPLES",
                   help="an .npz holding one array (uint8 images (N, H, W) or (N, H, W, C), or "
                        "floats in [0, 1]) or a folder of PNGs, from any model")
    p.add_argument("--dataset", required=True, help="a data set with a shipped feature network: "
                                                    "mnist or fashion-mnist")
    p.add_argument("--split", default="test", help="the real images to compare with "
                                                   "(default test)")
    p.add_argument("--train-split", default="train[:90%]",
                   help="real images for the real-against-real floors (default train[:90%%], "
                        "as dgm train)")
    p.add_argument("--val-split", default="train[90%:]",
                   help="images that choose the Parzen bandwidth (default train[90%%:])")
    p.add_argument("--json", action="store_true", help="print JSON only")
    _add_common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="pack a run into one file (weights, config, metrics, "
                                      "evaluations) that is read wherever a run folder is")
    p.add_argument("run", metavar="RUN", help="a run folder")
    p.add_argument("file", metavar="FILE.safetensors", type=_path, help="a new file")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("zoo", help="the trained models that ship with dgm (zoo:NAME)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("bench", help="measure this machine and predict each recipe's wall time "
                                     "(about a minute)")
    p.add_argument("recipes", metavar="RECIPE.yaml", nargs="*",
                   help="recipes to predict (default: every recipes/*.yaml)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="seconds of training steps timed per recipe (default 2)")
    p.add_argument("--threads", dest="cpu_threads", type=int, default=0, metavar="N",
                   help="threads to measure with (default 0: torch's default, one per core)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("interpolate", help="rows of latent interpolations (report Figure 6)")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--rows", type=int, default=8, help="number of paths (default 8)")
    p.add_argument("--steps", type=int, default=9, help="images per path (default 9)")
    p.add_argument("--method", choices=("cdf", "slerp"), default="cdf",
                   help="cdf: straight line in the unit cube through the inverse normal CDF "
                        "(the report's); slerp: spherical (default cdf)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", required=True, metavar="FILE.png", type=_path)
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    _add_common(p)
    p.set_defaults(func=cmd_interpolate)
    return parser


def _add_sampling(p: argparse.ArgumentParser) -> None:
    """How the samples of ``dgm sample`` and ``dgm evaluate`` are drawn, in place of the run's
    own (:func:`dgm.evaluate.set_sampling`)."""
    p.add_argument("--sample-steps", type=int, metavar="N",
                   help="diffusion: denoising steps of the samples (default: the run's "
                        "--sample-steps)")
    p.add_argument("--sample-rho", type=float, metavar="RHO",
                   help="diffusion: spacing of those steps, 0 = equal steps of t, RHO > 0 = "
                        "Karras et al.'s (default: the run's --sample-rho)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"),
                   help="diffusion: DDIM or ancestral sampling (default: the run's)")
    p.add_argument("--sample-eta", type=float, metavar="ETA",
                   help="diffusion, DDIM: 0 = deterministic, 1 = the ancestral sampler's "
                        "noise (default: the run's --sample-eta)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="GAN and flow: standard deviation of the prior, below 1 for "
                        "fidelity over variety (default: the run's --temperature)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="the networks that draw the samples: fp32, or bf16 autocast (a GPU, or "
                        "a CPU with native bf16: about 2x faster there), or auto (bf16 where "
                        "it is native); likelihoods are always fp32 (default fp32)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data-dir", help="folder holding <dataset>/ IDX files")
    p.add_argument("--offline", action="store_true", help="never download data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # dest differs from train's config field `threads`, which ThreadPolicy handles.
    p.add_argument("--threads", dest="cpu_threads", type=int, default=0, metavar="N",
                   help="CPU threads (default 0: torch's default, one per core; 1 beside "
                        "another job on 2 cores)")


def cmd_train(args) -> int:
    from dgm.runs import default_run_dir, load_config, read_yaml
    from dgm.train import train

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class(args.model))
             if hasattr(args, f.name)}
    if args.resume is not None:
        if args.out and Path(args.out) != Path(args.resume):
            raise DgmError("--out and --resume name different folders; give only --resume RUN")
        if args.config:
            raise DgmError(f"--config cannot change a run on --resume; {args.resume}/config.yaml "
                           "holds its options (flags such as --epochs may still change)")
        run = Path(args.resume)
        model, cfg = load_config(run)
        if model != args.model:
            raise DgmError(f"{run} is a {model} run; resume it with: dgm train {model} "
                           f"--resume {run}")
        changed = [k for k, v in flags.items() if getattr(cfg, k) != v and k not in RESUMABLE]
        if changed:
            raise DgmError(f"--{changed[0].replace('_', '-')} cannot change on --resume; "
                           f"only {', '.join(sorted(RESUMABLE))} can")
        cfg = validate(dataclasses.replace(cfg, **flags))
    else:
        values = read_yaml(args.config) if args.config else {}
        values.pop("format_version", None)  # a run's own config.yaml may serve as --config
        if values.pop("model", args.model) != args.model:
            raise DgmError(f"{args.config} is a config for another model, not {args.model}")
        cfg = from_dict(args.model, {**values, **flags}, source=args.config or "flags")
        run = Path(args.out) if args.out else default_run_dir(args.model, cfg.dataset)
    if not args.quiet:
        print(f"dgm: training {args.model} on {cfg.dataset} into {run}", file=sys.stderr)
    train(args.model, cfg, run, resume=args.resume is not None, quiet=args.quiet)
    if not args.quiet:
        print(f"dgm: done; run folder {run}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    if not 0 < args.seconds <= 600:  # --threads: checked and set by _with_threads
        raise DgmError("--seconds must lie in (0, 600]")
    from dgm.bench import bench, format_bench, recipe_files

    files = recipe_files(args.recipes)
    result = bench(files, args.seconds)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def cmd_evaluate(args) -> int:
    from dgm.evaluate import evaluate_run
    from dgm.zoo import is_packed, open_run

    if not (1 <= args.iw_samples <= 10 ** 6 and 1 <= args.batch_size <= 10 ** 5
            and 1 <= args.dequant_samples <= 10 ** 4 and 1 <= args.time_samples <= 10 ** 4
            and 4 <= args.num_samples <= 10 ** 6):
        raise DgmError("--iw-samples must lie in 1..1000000, --dequant-samples and "
                       "--time-samples in 1..10000, --batch-size in 1..100000 and "
                       "--num-samples in 4..1000000")
    with open_run(args.run) as run:
        results = evaluate_run(run, args.split, args.iw_samples, args.batch_size, args.device,
                               args.data_dir, args.offline, args.checkpoint,
                               quiet=args.quiet or args.json, sample_quality=args.sample_quality,
                               naive=args.naive, dequant_samples=args.dequant_samples,
                               time_samples=args.time_samples, num_samples=args.num_samples,
                               sample_steps=args.sample_steps, sample_rho=args.sample_rho,
                               sampler=args.sampler, temperature=args.temperature,
                               precision=args.precision, sample_eta=args.sample_eta)
    if results is None:  # a torchrun rank other than 0
        return 0
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    _print_results(results)
    print(f"not saved: {args.run} is a packed run, not a run folder" if is_packed(args.run)
          else f"saved {Path(args.run) / 'evaluation.json'}")
    return 0


def _print_results(results: dict) -> None:
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"{key:>8}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in value.items()))
        else:
            print(f"{key:>8}: {value}")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from dgm.distributed import autocast, resolve_precision
    from dgm.evaluate import load_model, set_sampling
    from dgm.plots import save_grid
    from dgm.quality import draw_samples
    from dgm.runs import atomic_write
    from dgm.zoo import open_run

    if args.out is None and args.npz is None:
        raise DgmError("say where the samples go: --out FILE.png (a grid), --npz FILE.npz, "
                       "or both")
    if not 1 <= args.n <= (4096 if args.out else 100000):
        raise DgmError(f"-n must lie in 1..{4096 if args.out else 100000}"
                       + (" for a grid (--out)" if args.out else ""))
    out = _new_file(args.out, ".png", own=True) if args.out else None
    npz = _new_file(args.npz, ".npz", "--npz") if args.npz else None
    with open_run(args.run) as run:
        name, _, model, _ = load_model(run, args.checkpoint, args.device)
    set_sampling(model, name, args.run, args.sample_steps, args.sample_rho, args.sampler,
                 args.temperature, args.sample_eta)
    dev = next(model.parameters()).device
    precision = resolve_precision(args.precision, dev)
    gen = torch.Generator(dev).manual_seed(args.seed)
    with autocast(dev, precision):
        samples = draw_samples(lambda n, g: model.sample(n, generator=g), args.n, gen)
    if out:
        print(save_grid(samples, out))
    if npz:
        array = samples.cpu().numpy().transpose(0, 2, 3, 1)  # (N, H, W, C), as images are kept
        array = array[..., 0] if array.shape[-1] == 1 else array

        def write(f):
            np.savez(f, samples=array)

        atomic_write(npz, write, new=True)
        print(npz)
    return 0


def _new_file(path: str, suffix: str, flag: str = "--out", own: bool = False) -> Path:
    """A file that dgm may create: the right suffix, and nothing of yours there already.
    With ``own``, a picture or page that dgm wrote there before (it says so in the file)
    may be replaced, so that re-running a command replaces its own output."""
    from dgm.runs import dgm_wrote

    if not path.lower().endswith(suffix):
        raise DgmError(f"{flag} {path} must end in {suffix}")
    if os.path.islink(path):  # dangling too: replacing it would lose the link
        raise DgmError(f"{flag} {path} is a link; dgm does not replace your files: give the "
                       "path it points to, or another name")
    if Path(path).exists() and not (own and dgm_wrote(Path(path))):
        mine = " and dgm did not write it" if own else ""
        raise DgmError(f"{flag} {path} exists already{mine}; dgm does not replace your "
                       "files: choose another name or delete it")
    return Path(path)


def cmd_manifold(args) -> int:
    from dgm.evaluate import load_model
    from dgm.plots import save_grid
    from dgm.zoo import open_run

    if not 2 <= args.size <= 100:
        raise DgmError("--size must lie in 2..100")
    out = _new_file(args.out, ".png", own=True)
    with open_run(args.run) as run:
        name, cfg, model, _ = load_model(run, args.checkpoint, args.device)
    if getattr(model, "latent_dim", None) != 2 or not hasattr(model, "manifold"):
        raise DgmError(f"{args.run} is not a VAE with latent_dim 2; train one with "
                       "dgm train vae --latent-dim 2")
    print(save_grid(model.manifold(args.size), out, nrow=args.size, scale=1))
    return 0


def cmd_data(args) -> int:
    from dgm.data import DATASETS, find_file, read_idx, search_dirs, verify

    bad = 0
    for name, ds in DATASETS.items():
        print(f"{name}  (looked in: {', '.join(map(str, search_dirs(name, args.data_dir)))})")
        for key, info in ds.files.items():
            try:
                path = find_file(name, key, args.data_dir, offline=True)
            except DgmError:
                print(f"  {key:13} missing")
                continue
            status = ""
            if args.action == "check":
                try:
                    problem = verify(path, info) if info.sha256 else None
                    shape = read_idx(path).shape
                except DgmError as e:
                    problem = str(e)
                status = (f"  BAD: {problem}" if problem else
                          f"  ok {shape}" + ("" if info.sha256 else
                                            " (structure only: no decompressed checksum known)"))
                bad += bool(problem)
            print(f"  {key:13} {path}{status}")
    if bad:
        raise DgmError(f"{bad} file(s) failed the check; delete them and fetch them again")
    return 0


def cmd_report(args) -> int:
    from dgm.evaluate import draw_pictures
    from dgm.report import write_report
    from dgm.zoo import is_packed, open_run

    if args.out is not None:
        _new_file(args.out, ".html", own=True)
    packed = [r for r in args.runs if is_packed(r)]
    if packed and args.out is None:
        raise DgmError(f"{packed[0]} is a packed run, not a run folder; give --out FILE.html")
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(open_run(r)) for r in args.runs]
        for source, run in zip(args.runs, runs, strict=True):
            if is_packed(source):  # it holds no pictures: draw what its last epoch drew
                draw_pictures(run)
        print(write_report(runs, args.out, names=args.runs if packed else None))
    return 0


def cmd_score(args) -> int:
    from dgm.evaluate import score_samples

    results = score_samples(args.samples, args.dataset, args.split, args.train_split,
                            args.val_split, args.device, args.data_dir, args.offline)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_results(results)
    return 0


def cmd_export(args) -> int:
    from dgm.evaluate import export_run

    out = _new_file(args.file, ".safetensors", "FILE")
    export_run(args.run, out, args.checkpoint)
    print(out)
    return 0


def cmd_zoo(args) -> int:
    import dataclasses as dc

    from dgm.zoo import ZOO

    if args.json:
        print(json.dumps([dc.asdict(m) for m in ZOO.values()], indent=2))
        return 0
    if not ZOO:
        print("no trained models ship with this dgm yet")
    for m in ZOO.values():
        print(f"zoo:{m.name}\n  data:    {m.data}\n  recipe:  {m.recipe}\n"
              f"  results: {m.results}\n  sha256:  {m.sha256}")
    return 0


def cmd_interpolate(args) -> int:
    import torch

    from dgm.evaluate import load_model
    from dgm.interpolation import interpolation_rows
    from dgm.plots import save_grid
    from dgm.zoo import open_run

    if not (1 <= args.rows <= 64 and 2 <= args.steps <= 64):
        raise DgmError("--rows must lie in 1..64 and --steps in 2..64")
    out = _new_file(args.out, ".png", own=True)
    with open_run(args.run) as run:
        name, _, model, _ = load_model(run, args.checkpoint, args.device)
    shape = getattr(model, "latent_shape", None) or (getattr(model, "latent_dim", None),)
    missing = [what for what, ok in (("latent_dim or latent_shape", shape != (None,)),
                                     ("generate(z)", hasattr(model, "generate"))) if not ok]
    if missing:
        raise DgmError(f"{args.run} holds a {name} model, which cannot be interpolated (it "
                       f"has no {' and no '.join(missing)}); give a gan, vae, flow or diffusion "
                       "run")
    dev = next(model.parameters()).device
    gen = torch.Generator(dev).manual_seed(args.seed)
    z = interpolation_rows(args.rows, args.steps, tuple(shape), args.method, gen, dev)
    with torch.no_grad():
        images = torch.cat([model.generate(c) for c in z.split(512)])
    print(save_grid(images, out, nrow=args.steps))
    return 0


def _model_of_config(argv: list[str]) -> list[str]:
    """``train [flags] --config FILE [flags]`` with no model named -> ``train MODEL ...``,
    MODEL from the file's ``model:`` (every recipe and run config has one)."""
    if argv[:1] != ["train"] or len(argv) < 2 or not argv[1].startswith("-") \
            or argv[1] in ("-h", "--help", "--model") or argv[1].startswith("--model="):
        return argv
    paths = [b for a, b in zip(argv[1:], argv[2:], strict=False) if a == "--config"] + \
        [a.partition("=")[2] for a in argv[1:] if a.startswith("--config=")]
    if not paths:
        return argv
    from dgm.runs import read_yaml

    model = read_yaml(paths[-1]).get("model")
    if not isinstance(model, str):
        raise DgmError(f"{paths[-1]} names no model; name it: dgm train MODEL --config "
                       f"{paths[-1]}")
    return ["train", model, *argv[1:]]


def _own_model(argv: list[str]) -> tuple[str | None, list[str]]:
    """``train --model PATH ...`` -> (PATH, ``train PATH ...``); ``train PATH ...`` with a
    ":" in PATH -> (PATH, argv); otherwise (None, argv)."""
    if argv[:1] != ["train"] or len(argv) < 2:
        return None, argv
    for i, a in enumerate(argv[1:], 1):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1], ["train", argv[i + 1], *argv[1:i], *argv[i + 2:]]
        if a.startswith("--model="):
            return a.partition("=")[2], ["train", a.partition("=")[2], *argv[1:i], *argv[i + 1:]]
    return (argv[1], argv) if ":" in argv[1] else (None, argv)


def _with_threads(args) -> int:
    """Run the command with ``--threads`` CPU threads, if it has the option (every command
    but train, whose config field ``threads`` ThreadPolicy handles), then restore torch's
    count (tests call :func:`main` in one process)."""
    n = getattr(args, "cpu_threads", 0)
    if not 0 <= n <= 1024:
        raise DgmError("--threads must lie in 0..1024 (0: one per core)")
    if not n:
        return args.func(args)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return args.func(args)
    finally:
        torch.set_num_threads(previous)


def _import_libraries() -> None:
    """Import the heavy libraries (torch, numpy, matplotlib, torchmetrics) now, while
    interrupts are held (see :func:`dgm.interrupts.held`), not in the middle of a command."""
    import dgm.evaluate  # noqa: F401
    import dgm.plots
    import dgm.quality  # noqa: F401
    import dgm.train  # noqa: F401

    dgm.plots.pyplot()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with interrupts.held():
            own, argv = _own_model(_model_of_config(argv))
            args = build_parser(own).parse_args(argv)
            _import_libraries()
        return _with_threads(args)
    except DgmError as e:
        print(f"dgm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # also while torch is imported, before any work began
        print("dgm: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"dgm: error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
