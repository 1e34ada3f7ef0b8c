"""One self-contained HTML page per run (or per comparison of runs), from run-folder files.

Images are embedded as data URIs and a Content-Security-Policy forbids every
network request, so the page opens anywhere, offline, exactly as written.
"""

import base64
import html
import re
from pathlib import Path

from dgm.errors import DgmError
from dgm.plots import plot_compare
from dgm.runs import HTML_HEAD, atomic_write, is_dgm_run, read_evaluations, read_metrics, read_yaml

__all__ = ["write_report"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0 } td, th { padding: 2px 9px;
  border-bottom: 1px solid #eee; text-align: right } th { background: #f6f6f6 }
td:first-child, th:first-child { text-align: left }
.scroll { max-height: 420px; overflow: auto; display: inline-block }
figure { display: inline-block; margin: 6px 10px 6px 0; vertical-align: top; text-align: center }
figcaption { font-size: 12px; color: #555 } img { image-rendering: pixelated; max-width: 100% }
.muted { color: #777; font-size: 13px } .runs { display: flex; gap: 2em; flex-wrap: wrap }
"""
# Marks the page once every image has decoded; the browser test reads it.
CHECK = """
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = ok + '/' + imgs.length;
});
"""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _img(png: Path | bytes, alt: str) -> str:
    data = base64.b64encode(png if isinstance(png, bytes) else png.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _pngs(folder: Path, pattern: str = "*.png") -> list[Path]:
    """The PNG files in ``folder``; files that only carry the name are left out."""
    found = []
    for p in sorted(folder.glob(pattern)):
        with open(p, "rb") as f:
            if f.read(8) == PNG_SIGNATURE:
                found.append(p)
    return found


def _epoch_pngs(folder: Path) -> list[Path]:
    """``epoch_NNN.png`` pictures in epoch order (other files in the folder are not dgm's)."""
    pngs = [p for p in _pngs(folder, "epoch_*.png") if re.fullmatch(r"epoch_\d+", p.stem)]
    return sorted(pngs, key=lambda p: int(p.stem[6:]))


def _figures(paths: list[Path], caption) -> str:
    return "".join(f"<figure>{_img(p, caption(p))}<figcaption>{html.escape(caption(p))}"
                   "</figcaption></figure>" for p in paths)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return html.escape("" if v is None else str(v))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load(run: Path) -> dict:
    if not is_dgm_run(run):
        why = "its config.yaml is not dgm's" if (run / "config.yaml").is_file() else \
            "no config.yaml"
        raise DgmError(f"{run} is not a dgm run folder ({why}); give the folder that "
                       "'dgm train' wrote")
    return {"config": read_yaml(run / "config.yaml"), "metrics": read_metrics(run),
            "evaluation": read_evaluations(run)}


def _run_sections(run: Path, info: dict) -> str:
    cfg, rows, ev = info["config"], info["metrics"], info["evaluation"]
    parts = [f"<h2>Configuration</h2>{_table(['option', 'value'], list(cfg.items()))}"]
    for key, results in ev.items():
        parts.append(f"<h2>Evaluation: {html.escape(key)}</h2>"
                     + _table(["metric", "value"], list(_flatten(results).items())))
    if (run / "curves.png").is_file():
        parts.append(f"<h2>Curves</h2>{_img(run / 'curves.png', 'training curves')}")
    if rows:
        cols = list(rows[0])
        parts.append(f"<h2>Metrics per epoch</h2><div class=scroll>"
                     f"{_table(cols, [[r.get(c) for c in cols] for r in rows])}</div>")
    epoch = lambda p: f"epoch {int(p.stem[6:])}"  # noqa: E731
    for folder, title in (("samples", "Samples"), ("manifold", "Manifold")):
        pngs = _epoch_pngs(run / folder)
        if pngs:
            parts.append(f"<h2>{title} by epoch</h2>{_figures(pngs, epoch)}")
    extra = [p for p in _pngs(run) if p.name != "curves.png"]
    if extra:
        parts.append(f"<h2>Other pictures</h2>{_figures(extra, lambda p: p.stem)}")
    return "".join(parts)


def _page(title: str, body: str) -> str:
    return (f'{HTML_HEAD}<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"<script>{CHECK}</script></head><body><h1>{html.escape(title)}</h1>{body}"
            "</body></html>")


def _labels(runs: list[Path]) -> dict[Path, str]:
    """A distinct label per run: its folder's name, with as many parent folders as it takes
    to tell runs of the same name apart."""
    if len({r.resolve() for r in runs}) < len(runs):
        raise DgmError("the same run is named twice; give each run once")
    parts = [r.resolve().parts for r in runs]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return dict(zip(runs, labels, strict=True))
    raise AssertionError("distinct resolved paths always have distinct suffixes")


def write_report(runs: list[str | Path], out: str | Path | None = None,
                 names: list[str] | None = None) -> Path:
    """Write the HTML report of one run (default ``RUN/report.html``) or a comparison of several.

    A comparison puts every metric the runs share on one plot per metric and their last epoch
    and evaluation side by side; it needs ``out``. ``names`` label the runs in place of their
    paths (a packed run's folder is a temporary one).
    """
    runs = [Path(r) for r in runs]
    infos = {r: _load(r) for r in runs}
    if names is not None and len(set(names)) < len(names):
        raise DgmError("the same run is named twice; give each run once")
    if len(runs) == 1:
        run = runs[0]
        out = Path(out) if out else run / "report.html"
        cfg = infos[run]["config"]
        where = names[0] if names else str(run.resolve())
        title = f"dgm {cfg.get('model', '?')} on {cfg.get('dataset', '?')}: " + (
            names[0] if names else run.name)
        page = _page(title, f"<p class=muted>{html.escape(where)}</p>"
                            + _run_sections(run, infos[run]))
    else:
        if out is None:
            raise DgmError("comparing runs needs --out FILE.html")
        out = Path(out)
        labels = dict(zip(runs, names, strict=True)) if names else _labels(runs)
        series = {labels[r]: infos[r]["metrics"] for r in runs}
        summary = {}
        for r in runs:
            last = infos[r]["metrics"][-1] if infos[r]["metrics"] else {}
            summary[labels[r]] = {**{f"config.{k}": v for k, v in infos[r]["config"].items()},
                                  **{f"last.{k}": v for k, v in last.items()},
                                  **_flatten(infos[r]["evaluation"], "eval.")}
        keys = list(dict.fromkeys(k for s in summary.values() for k in s))
        names = list(summary)
        table = _table(["", *names], [[k, *(summary[n].get(k) for n in names)] for k in keys])
        body = (f"<h2>Curves</h2>{_img(plot_compare(series), 'curves of all runs')}"
                f"<h2>Side by side</h2><div class=scroll>{table}</div>")
        for r in runs:
            body += f"<h2>{html.escape(labels[r])}: samples</h2>" + _figures(
                _epoch_pngs(r / "samples")[-1:], lambda p: p.stem)
        page = _page(f"dgm: {len(runs)} runs compared", body)
    atomic_write(out, lambda f: f.write(page), mode="w")
    return out
