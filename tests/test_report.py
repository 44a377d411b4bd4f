"""The run report (``recsys-kd report``): it renders from a finished tiny run, every figure is a valid
PNG of the size the report declares, every stage's model is placed by AUC, size and latency, and
(slow) a headless Chromium shows every image."""

import base64
import html
import io
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from recsys_kd.cli import main
from recsys_kd.recipe import load_recipe
from recsys_kd.report import CURVES_SIZE, FIGURE_DPI, SCATTER_SIZE, SPECTRUM_SIZE, measure_latencies, stage_models
from recsys_kd.runs import METRICS_LOG, REPORT_FILE, TrainOutput

IMAGE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="(\d+)" height="(\d+)" alt="([^"]*)">')
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pixels(size):
    return round(size[0] * FIGURE_DPI), round(size[1] * FIGURE_DPI)


def png_size(data: bytes):
    """Width and height from the PNG header: the signature, then the IHDR chunk first."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.mark.multiprocess
def test_the_report_renders_from_a_finished_tiny_run(tiny_pipeline_run, capsys):
    config, record = tiny_pipeline_run
    recipe = load_recipe(config)
    run_dir = Path(recipe.run_dir)
    assert (run_dir / REPORT_FILE).exists()  # the pipeline's last step
    (run_dir / REPORT_FILE).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {run_dir / REPORT_FILE}"
    page = (run_dir / REPORT_FILE).read_text()

    images = IMAGE.findall(page)
    assert len(images) == page.count("<img ")
    trained = [model for model in stage_models(record) if (model.output.path / METRICS_LOG).exists()]
    # every model the run trained: teacher, student, FT, and each compression step's fine-tuning
    assert len(trained) == 3 + len(recipe.compress.steps)
    expected = {model.label: pixels(CURVES_SIZE) for model in trained}
    expected.update({"test AUC against parameters": pixels(SCATTER_SIZE),
                     "test AUC against batch-1 latency": pixels(SCATTER_SIZE)})
    expected.update({f"afm: {step.what} compressed": pixels(SPECTRUM_SIZE) for step in recipe.compress.steps})
    assert sorted(alt for *_, alt in images) == sorted(expected)
    for encoded, width, height, alt in images:
        data = base64.b64decode(encoded, validate=True)
        assert png_size(data) == (int(width), int(height)) == expected[alt], alt
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes every row: a truncated or corrupt PNG raises here
        assert image.format == "PNG" and image.size == expected[alt]
        assert len(image.convert("L").getcolors()) > 10, f"{alt}: blank"  # axes, curves, text drawn

    for title in ("splits", "models", "artifacts", "every stage's model"):
        assert f"<caption>{html.escape(title)}</caption>" in page
    for model in stage_models(record):
        assert f"<td>{html.escape(model.label)}</td>" in page
    steps = [row for row in record["stages"]["compress"]["chains"]["afm"] if row["stage"].endswith(" compressed")]
    assert len(steps) == len(recipe.compress.steps)
    for row in steps:  # each AFM step lists every compressed layer or table with its k
        log = TrainOutput(row["output"]).record["log"]
        assert log and all(f"<td>{entry.get('layer', entry.get('feature'))}</td>" in page for entry in log)


@pytest.mark.multiprocess
def test_every_stage_model_gets_the_latency_of_its_architecture(tiny_pipeline_run):
    """An artifact's latency goes to every model of its architecture; an architecture with no artifact
    (the models after the MLP step) is measured once, on a temporary artifact."""
    _, record = tiny_pipeline_run
    models = stage_models(record)
    measure_latencies(models, record["stages"]["export"])
    architecture = lambda output: json.dumps(output.model_config, sort_keys=True)
    artifact_latency = {architecture(TrainOutput(export["train_output"])): export["latency_batch1_ms"]
                        for export in record["stages"]["export"].values()}
    measured = {}
    for model in models:
        assert model.latency_ms is not None and model.latency_ms > 0, model.label
        if architecture(model.output) in artifact_latency:
            assert model.latency_ms == artifact_latency[architecture(model.output)], model.label
            assert model.latency_source.startswith("artifact"), model.label
        else:
            assert model.latency_source == "measured for this report", model.label
            measured.setdefault(architecture(model.output), set()).add(model.latency_ms)
    assert {model.label for model in models if model.latency_source.startswith("measured")} == {
        "afm: mlp compressed", "afm: mlp fine-tuned"}
    assert all(len(values) == 1 for values in measured.values())  # once per architecture


def test_the_metrics_log_reader_keeps_the_last_entry_of_a_step_and_skips_a_torn_line(tmp_path):
    lines = [
        {"step": 1, "loss": 0.9, "lr": 0.1},
        {"step": 2, "loss": 0.8, "lr": 0.1},
        {"step": 2, "valid": {"auc": 0.6}, "lr": 0.1},
    ]
    text = "".join(json.dumps(entry) + "\n" for entry in lines)
    # killed mid-write after step 3; the resumed run logs step 3 again, after the torn line
    text += '{"step": 3, "lo' + json.dumps({"step": 3, "loss": 0.5, "lr": 0.05}) + "\n"
    text += json.dumps({"step": 3, "loss": 0.4, "lr": 0.05}) + "\n"
    (tmp_path / METRICS_LOG).write_text(text)
    entries = TrainOutput(tmp_path).metrics()
    assert [(e["step"], "valid" in e) for e in entries] == [(1, False), (2, False), (2, True), (3, False)]
    assert entries[-1]["loss"] == 0.4
    assert TrainOutput(tmp_path / "none").metrics() == []


# Appended to a copy of the report: after the load, the page's title says which images did not decode.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.title = "IMAGES " + JSON.stringify({count: document.images.length, broken: broken});
});
</script>"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_headless_chromium_shows_every_image(tiny_pipeline_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed; install Debian's package: `sudo apt-get install -y chromium`")
    config, _ = tiny_pipeline_run
    page = (Path(load_recipe(config).run_dir) / REPORT_FILE).read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"))
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         checked.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    title = re.search(r"<title>IMAGES (.*?)</title>", result.stdout)
    assert title, f"chromium did not run the check (exit {result.returncode}): {result.stderr[-2000:]}"
    outcome = json.loads(title.group(1).replace("&quot;", '"'))
    assert outcome["count"] == page.count("<img ") > 0
    assert outcome["broken"] == []
