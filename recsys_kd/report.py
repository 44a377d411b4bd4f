"""The run report: ``<run_dir>/report.html``, one self-contained page (its PNG figures embedded as
base64) with
- the training and validation curves of every model the run trained (training loss and valid
  logloss, valid AUC, learning rate, against the step);
- test AUC against parameters and against batch-1 serving latency, for every stage's model (teacher,
  distilled student, FT, each AFM / SVD step);
- the AFM eigen-spectra of every compressed MLP layer and table (explained variance per component
  and its cumulative share, with the kept rank);
- the result tables the pipeline prints.

Everything is read from the run's records through :mod:`recsys_kd.runs`, with one measurement: a
stage's model whose architecture no artifact of the run has (an MLP step's model, say) is exported to
a temporary artifact for its batch-1 latency (weights do not change a model's latency; its
architecture does). The pipeline writes the report as its last step; ``recsys-kd report RUN_DIR``
writes it again from a finished run.

Example::

    record = pipeline_record("runs/demo")
    write_report("runs/demo", record, result_tables(record))  # -> runs/demo/report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from recsys_kd.io import atomic_write_text
from recsys_kd.runs import REPORT_FILE, TrainOutput

FIGURE_DPI = 100
# inches; at FIGURE_DPI every figure is a whole number of pixels: these sizes are the PNGs' sizes
CURVES_SIZE = (12.0, 3.2)
SCATTER_SIZE = (8.0, 4.4)
SPECTRUM_SIZE = (12.0, 3.8)
# one colour per kind of model in the scatter plots
KIND_COLOURS = {"train": "tab:red", "distill": "tab:blue", "finetune": "tab:green", "afm": "tab:purple",
                "svd": "tab:orange"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# a spectrum figure names its curves in a legend up to this many; beyond, the table below it does
MAX_LEGEND = 8


@dataclass
class StageModel:
    """One stage's model: where it is, what the run measured of it, and its batch-1 latency."""

    label: str
    kind: str
    output: TrainOutput
    test_auc: float
    parameters: int
    latency_ms: Optional[float] = None
    latency_source: str = ""


@dataclass
class Figure:
    """A rendered figure: its PNG and the pixel size it was drawn at."""

    title: str
    caption: str
    png: bytes
    width: int
    height: int


def write_report(run_dir: Union[str, Path], record: Dict[str, Any],
                 tables: Dict[str, List[Dict[str, Any]]]) -> Path:
    """Writes ``<run_dir>/report.html`` from the pipeline's ``record`` and its result ``tables``
    (title -> rows); returns its path."""
    path = Path(run_dir) / REPORT_FILE
    atomic_write_text(path, render_report(record, tables, title=f"recsys-kd run {Path(run_dir)}"))
    return path


def render_report(record: Dict[str, Any], tables: Dict[str, List[Dict[str, Any]]], title: str) -> str:
    """The report page (HTML) of a finished pipeline run."""
    models = stage_models(record)
    measure_latencies(models, record.get("stages", {}).get("export", {}))
    sections = [
        ("Result tables", "".join(_table_html(name, rows) for name, rows in tables.items() if rows)),
        ("Test AUC against size and latency", _figures_html(size_figures(models)) + _table_html(
            "every stage's model", [_model_row(model) for model in models])),
        ("Training and validation curves", _figures_html(
            [curves_figure(model) for model in models if model.output.metrics()])),
        ("AFM eigen-spectra", _spectra_html(record)),
    ]
    body = "".join(f"<h2>{html.escape(name)}</h2>\n{content or '<p>(none in this run)</p>'}\n"
                   for name, content in sections)
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
            f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
            f"<p>Generated {generated}; the pipeline ran {record.get('seconds', float('nan')):.1f} s.</p>\n{body}"
            "</body></html>\n")


# ------------------------------------------------------------------------------------------ the models


def stage_models(record: Dict[str, Any]) -> List[StageModel]:
    """Every stage's model in run order: the teacher, the student, its FT phase, then each step of
    each compression method (compressed, and fine-tuned when the recipe fine-tunes)."""
    stages = record.get("stages", {})
    models = []
    for stage in ("train", "distill", "finetune"):
        result = stages.get(stage)
        if result:
            models.append(StageModel(f"{stage}: {result['model']}", stage, TrainOutput(result["output"]),
                                     result["test"]["auc"], result["parameters"]["total"]))
    for method, chain in (stages.get("compress") or {}).get("chains", {}).items():
        for row in chain[1:]:  # the first row is the uncompressed source, listed above
            models.append(StageModel(f"{method}: {row['stage']}", method, TrainOutput(row["output"]),
                                     row["test_auc"], row["parameters"]))
    return models


def measure_latencies(models: Sequence[StageModel], exported: Dict[str, Dict[str, Any]]) -> None:
    """Sets each model's batch-1 latency: the artifact's of the same architecture when the run exported
    one, else measured on a temporary artifact of the model (once per architecture)."""
    by_architecture: Dict[str, Tuple[float, str]] = {}
    for role, export in exported.items():
        if export.get("latency_batch1_ms") is not None:
            key = _architecture(TrainOutput(export["train_output"]))
            by_architecture[key] = (export["latency_batch1_ms"], f"artifact '{role}'")
    for model in models:
        key = _architecture(model.output)
        if key not in by_architecture:
            by_architecture[key] = (_measured_latency(model.output), "measured for this report")
        model.latency_ms, model.latency_source = by_architecture[key]


def _architecture(output: TrainOutput) -> str:
    return json.dumps(output.model_config, sort_keys=True)


def _measured_latency(output: TrainOutput) -> Optional[float]:
    from recsys_kd.export import export_artifact

    with tempfile.TemporaryDirectory(prefix="report-latency-") as scratch:
        return export_artifact(output.path, Path(scratch) / "model.pt", parity_rows=64)["latency_batch1_ms"]


def _model_row(model: StageModel) -> Dict[str, Any]:
    return {"stage": model.label, "model": model.output.model_name, "test auc": round(model.test_auc, 5),
            "params": f"{model.parameters:,}",
            "batch-1 latency ms": "" if model.latency_ms is None else round(model.latency_ms, 3),
            "latency from": model.latency_source}


# ----------------------------------------------------------------------------------------- the figures


def size_figures(models: Sequence[StageModel]) -> List[Figure]:
    """Test AUC against parameters, and against batch-1 latency, one point per stage's model."""
    timed = [model for model in models if model.latency_ms is not None]
    return [
        _scatter(models, [m.parameters for m in models], "parameters", log_x=True,
                 title="test AUC against parameters"),
        _scatter(timed, [m.latency_ms for m in timed], "batch-1 serving latency (ms)", log_x=False,
                 title="test AUC against batch-1 latency"),
    ]


def _scatter(models: Sequence[StageModel], xs: Sequence[float], x_label: str, log_x: bool, title: str) -> Figure:
    figure, axes = _new_figure(SCATTER_SIZE, 1)
    ax = axes[0]
    seen: Dict[str, int] = {}
    for model, x in zip(models, xs):
        # the colour says the kind; the marker tells apart the models of one kind (points often coincide)
        marker = MARKERS[seen.get(model.kind, 0) % len(MARKERS)]
        seen[model.kind] = seen.get(model.kind, 0) + 1
        ax.scatter([x], [model.test_auc], color=KIND_COLOURS.get(model.kind, "tab:gray"), marker=marker, s=36,
                   alpha=0.8, zorder=3, label=model.label)
    if log_x and xs:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test AUC")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    if models:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        _no_data(ax)
    return _render(figure, title, "One point per stage's model; the colour is its kind (red teacher, blue distilled, "
                                  "green FT, purple AFM, orange SVD).")


def curves_figure(model: StageModel) -> Figure:
    """Training loss and valid logloss, valid AUC, and learning rate against the step, from the
    model's metrics log."""
    entries = model.output.metrics()
    train = [entry for entry in entries if "loss" in entry]
    valid = [entry for entry in entries if "valid" in entry]
    rates = [entry for entry in entries if "lr" in entry]
    figure, (loss_ax, auc_ax, lr_ax) = _new_figure(CURVES_SIZE, 3)
    loss_ax.plot([e["step"] for e in train], [e["loss"] for e in train], lw=1, label="training loss (objective)")
    loss_ax.plot([e["step"] for e in valid], [e["valid"].get("logloss", float("nan")) for e in valid],
                 marker="o", ms=3, label="valid logloss")
    loss_ax.set_title("loss")
    loss_ax.legend(fontsize=7)
    auc_ax.plot([e["step"] for e in valid], [e["valid"].get("auc", float("nan")) for e in valid], marker="o", ms=3)
    best = [e for e in valid if e.get("improved")]
    auc_ax.scatter([e["step"] for e in best], [e["valid"].get("auc", float("nan")) for e in best],
                   facecolors="none", edgecolors="tab:red", s=40, zorder=3, label="new best")
    auc_ax.set_title("valid AUC")
    if best:
        auc_ax.legend(fontsize=7)
    lr_ax.plot([e["step"] for e in rates], [e["lr"] for e in rates], lw=1, marker=".", ms=3)
    lr_ax.set_title("learning rate (dense)")
    for ax, drawn in ((loss_ax, train or valid), (auc_ax, valid), (lr_ax, rates)):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if not drawn:
            _no_data(ax)
    caption = (f"{model.output.path}: {len(train)} training log entries, {len(valid)} evaluations "
               f"(test AUC of the best model {model.test_auc:.5f}).")
    return _render(figure, model.label, caption)


def spectrum_figure(title: str, entries: Sequence[Dict[str, Any]]) -> Figure:
    """One compression step's spectra: explained variance ratio per component (log scale) and its
    cumulative share, one curve per layer or table, the kept rank k marked."""
    import matplotlib

    figure, (ratio_ax, share_ax) = _new_figure(SPECTRUM_SIZE, 2)
    colours = matplotlib.colormaps["viridis"]
    for index, entry in enumerate(entries):
        colour = colours(index / max(len(entries) - 1, 1))
        ratio = entry["spectrum"]["explained_variance_ratio"]
        cumulative = entry["spectrum"]["cumulative"]
        components = range(1, len(ratio) + 1)
        name = _spectrum_name(entry)
        ratio_ax.plot(components, [max(r, 1e-12) for r in ratio], color=colour, lw=1, label=name)
        share_ax.plot(components, cumulative, color=colour, lw=1)
        share_ax.scatter([entry["k"]], [entry["kept_share"]], color=colour, s=14, zorder=3)
    ratio_ax.set_yscale("log")
    ratio_ax.set_ylabel("explained variance ratio")
    share_ax.set_ylabel("cumulative share (dot: kept k)")
    for ax in (ratio_ax, share_ax):
        ax.set_xlabel("component")
        ax.grid(True, alpha=0.3)
    if len(entries) <= MAX_LEGEND:
        ratio_ax.legend(fontsize=7)
    caption = (f"{len(entries)} {'layers' if entries and entries[0]['what'] == 'mlp' else 'tables'}; the PCA of "
               "each one's outputs over the training split (AFM). The table below lists each one's k.")
    return _render(figure, title, caption)


def _spectra_html(record: Dict[str, Any]) -> str:
    """A figure and a table for each AFM step (the compressed model's record holds its spectra)."""
    parts = []
    chain = (record.get("stages", {}).get("compress") or {}).get("chains", {}).get("afm", [])
    for row in chain[1:]:
        if not row["stage"].endswith(" compressed"):
            continue
        entries = [entry for entry in TrainOutput(row["output"]).record.get("log", []) if "spectrum" in entry]
        if not entries:
            continue
        parts.append(_figures_html([spectrum_figure(f"afm: {row['stage']}", entries)]))
        parts.append(_table_html(f"afm: {row['stage']}, rank kept per {'layer' if entries[0]['what'] == 'mlp' else 'table'}", [{
            "layer / table": _spectrum_name(entry), "shape": "x".join(str(n) for n in entry["shape"]),
            "k": entry["k"], "kept share": round(entry["kept_share"], 4),
            **{f"k for {float(share):.0%}": k for share, k in entry["spectrum"]["rank_for_share"].items()
               if share in ("0.9", "0.99")},
        } for entry in entries]))
    return "".join(parts)


def _spectrum_name(entry: Dict[str, Any]) -> str:
    return entry["layer"] if entry["what"] == "mlp" else entry.get("feature", entry.get("table", "?"))


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "not in this run's log", ha="center", va="center", transform=ax.transAxes, color="gray")


def _new_figure(size: Tuple[float, float], panels: int):
    from matplotlib.figure import Figure as MatplotlibFigure

    figure = MatplotlibFigure(figsize=size, dpi=FIGURE_DPI, layout="constrained")
    return figure, [figure.add_subplot(1, panels, index + 1) for index in range(panels)]


def _render(figure, title: str, caption: str) -> Figure:
    """The figure as a PNG of exactly its size in pixels (no tight bounding box)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    width, height = (round(inches * FIGURE_DPI) for inches in figure.get_size_inches())
    return Figure(title, caption, buffer.getvalue(), width, height)


# ---------------------------------------------------------------------------------------------- HTML


def _figures_html(figures: Sequence[Figure]) -> str:
    return "".join(
        f"<figure><img src=\"data:image/png;base64,{base64.b64encode(f.png).decode('ascii')}\" "
        f"width=\"{f.width}\" height=\"{f.height}\" alt=\"{html.escape(f.title)}\">"
        f"<figcaption><b>{html.escape(f.title)}</b>. {html.escape(f.caption)}</figcaption></figure>\n"
        for f in figures
    )


def _table_html(title: str, rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return ""
    headers = list(rows[0])
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(row.get(h)))}</td>" for h in headers) + "</tr>"
                   for row in rows)
    return f"<table><caption>{html.escape(title)}</caption><tr>{head}</tr>{body}</table>\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1.5em 0; }
figcaption { font-size: 0.85em; color: #444; max-width: 1200px; }
"""
