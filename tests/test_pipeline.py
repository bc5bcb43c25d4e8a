"""End to end: the whole report on the tiny profile with papermill, every expected file checked."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from isic_utils.pipeline import ChapterFailed, run_report

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    out = base / "out"
    lines = []
    old = os.umask(0o022)  # what most users have: their report must be readable by others
    try:
        timings = run_report("tiny", overrides={"output_dir": str(out), "data_dir": str(base / "data")}, root=ROOT,
                             echo=lines.append)
    finally:
        os.umask(old)
    return out, timings, lines, base


def test_every_chapter_executed_and_exported(tiny_report):
    out, timings, lines, _ = tiny_report
    assert list(timings) == ["eda", "task1", "task2", "external", "compare"]
    for name in timings:
        notebook = json.loads((out / f"{name}.ipynb").read_text())
        errors = [o for c in notebook["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, name
        page = (out / f"{name}.html").read_text()
        assert "Synthetic data" in page, name  # every chapter says what data it ran on
        assert "<img" in page or name == "eda" and "image/png" in page
        raw = (out / f"{name}.ipynb").read_text()
        assert "application/vnd.jupyter.widget" not in raw and "application/vnd.jupyter.widget" not in page, name
        streams = [o for c in notebook["cells"] for o in c.get("outputs", []) if o.get("output_type") == "stream"]
        assert not any("\r" in "".join(o["text"]) for o in streams), name  # no carriage-return progress bars
    index = (out / "index.html").read_text()
    assert "Synthetic data" in index and all(f'href="{n}.html"' in index for n in timings)
    assert any("chapter times" in line for line in lines)


def test_the_terminal_shows_one_line_per_epoch_while_a_chapter_runs(tiny_report):
    out, _, lines, _ = tiny_report
    for run in ("task1", "task2"):
        epochs = [line for line in lines if line.startswith(f"  {run} | ") and " epoch " in line]
        assert len(epochs) == 2, lines  # tiny profile: two epochs, one line each
        assert all(f"{run} seed 0" in line and "val IoU" in line and "ETA" in line and " s " in line
                   for line in epochs), epochs
    page = (out / "task1.html").read_text()
    assert "task1 seed 0 epoch" in page.replace("  ", " ")  # the same lines are the chapter's log


def test_every_written_file_is_readable_by_others(tiny_report):
    out, *_ = tiny_report
    unreadable = [p for p in out.rglob("*") if p.is_file() and not stat.S_IMODE(p.stat().st_mode) & stat.S_IROTH]
    assert not unreadable, unreadable[:5]


def test_tables_have_the_right_columns_and_rows(tiny_report):
    out, *_ = tiny_report
    for run in ("task1", "task2"):
        epochs = pd.read_csv(out / run / "tables" / "epochs.csv")
        assert len(epochs) == 2  # tiny profile: two epochs
        for column in ("epoch", "train loss", "val loss", "val IoU (mean/img)", "val IoU (pooled)",
                       "val Dice (mean/img)", "val pixel acc (mean/img)", "test loss [monitor]",
                       "test IoU (mean/img) [monitor]", "test Dice (mean/img) [monitor]",
                       "test pixel acc (mean/img) [monitor]"):
            assert column in epochs, (run, column)
        summary = pd.read_csv(out / run / "tables" / "summary.csv")
        assert list(summary.columns) == ["split", "row", "loss", "IoU", "Dice", "accuracy"]
        assert len(summary) <= 10 and summary["row"].str.startswith("selected checkpoint (epoch").sum() == 2
        quartiles = pd.read_csv(out / run / "tables" / "ja_by_lesion_size.csv")
        assert list(quartiles["lesion size"]) == ["Q1 (smallest)", "Q2", "Q3", "Q4 (largest)"]
        parameters = pd.read_csv(out / run / "tables" / "parameters.csv")
        decoder = parameters.set_index("part").loc["decoder"]
        assert decoder["total"] == 13_272_065
        encoder = parameters.set_index("part").loc["encoder"]
        assert encoder["trainable"] == (0 if run == "task1" else 2_223_872)
        per_image = pd.read_csv(out / run / "tables" / "per_image_test_seed0.csv")
        assert len(per_image) == 6 and {"id", "width", "height", "iou", "dice"} <= set(per_image.columns)
        assert (out / run / "decoder_parameters.txt").read_text().startswith("blocks.0.weight")
        for figure in ("loss", "iou", "dice", "accuracy", "predictions", "worst", "ja_vs_size"):
            assert (out / run / "figures" / f"{figure}.png").stat().st_size > 5000
    for table in ("counts", "sizes", "size_overview", "pixel_stats", "alignment"):
        assert not pd.read_csv(out / "eda" / "tables" / f"{table}.csv").empty
    for figure in ("fig1_samples", "fig2_sizes", "fig3_augmentations"):
        assert (out / "eda" / "figures" / f"{figure}.png").exists()
    comparison = pd.read_csv(out / "compare" / "tables" / "comparison.csv")
    assert list(comparison["run"]) == ["task1", "task2"]
    assert "JA / IoU (mean per image, original size)" in comparison
    assert len(pd.read_csv(out / "compare" / "tables" / "wilcoxon.csv")) == 1
    assert len(pd.read_csv(out / "compare" / "tables" / "report_vs_reproduction.csv")) == 2
    for figure in ("val_iou", "val_loss", "predictions", "per_image_iou"):
        assert (out / "compare" / "figures" / f"{figure}.png").exists()
    # chapter 4: every run on the profile's other-clinic set (PH2's layout) beside the test set, and the gap
    gap = pd.read_csv(out / "external" / "tables" / "gap.csv")
    assert list(gap["run"]) == ["task1", "task2"] and set(gap["external set"]) == {"other-clinic"}
    assert (gap["JA gap"] - (gap["JA other-clinic"] - gap["JA ISIC test"])).abs().max() < 1e-12
    assert len(pd.read_csv(out / "external" / "tables" / "per_image_other-clinic_task2_seed0.csv")) == 6
    options = pd.read_csv(out / "external" / "tables" / "inference_options.csv")
    assert len(options) == 2 * 2 * 4  # runs × (validation, other-clinic) × (flips, largest component) on/off
    for figure in ("ja_distribution", "worst_other-clinic"):
        assert (out / "external" / "figures" / f"{figure}.png").stat().st_size > 5000
    assert len(pd.read_csv(out / "task1" / "tables" / "per_image_val_seed0.csv")) == 4  # validation at full size too


def test_rerun_skips_finished_chapters(tiny_report):
    out, _, _, base = tiny_report
    lines = []
    timings = run_report("tiny", overrides={"output_dir": str(out), "data_dir": str(base / "data")}, root=ROOT,
                         echo=lines.append)
    assert set(timings.values()) == {0.0}
    assert sum("up to date, skipped" in line for line in lines) == 5


def test_failing_chapter_names_notebook_and_cell_and_keeps_partial(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    overrides = {"output_dir": str(tmp_path / "out"), "data_source": "isic2016", "data_dir": str(empty),
                 "download": False}
    with pytest.raises(ChapterFailed, match=r"01_eda\.ipynb \(eda\) failed in cell \d+ with DataError"):
        run_report("tiny", only=["eda"], overrides=overrides, root=ROOT, echo=lambda *_: None)
    assert (tmp_path / "out" / "eda.partial.ipynb").exists()
    assert not (tmp_path / "out" / "eda.ipynb").exists()


def test_plain_papermill_runs_one_chapter(tiny_report, tmp_path):
    _, _, _, base = tiny_report
    target = tmp_path / "task2.ipynb"
    settings = (f"epochs: 1\nimage_size: 64\nsynthetic_train: 20\nsynthetic_test: 6\nencoder_weights: null\n"
                f"batch_size: 8\noutput_dir: {tmp_path / 'out'}\ndata_dir: {base / 'data'}\n")
    completed = subprocess.run(
        [sys.executable, "-m", "papermill", "notebooks/02_train.ipynb", str(target), "-f", "params/task2.yaml",
         "-y", settings, "--no-progress-bar"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "out" / "task2" / "tables" / "epochs.csv")) == 1


def test_bad_parameters_fail_before_any_work(tmp_path):
    with pytest.raises(Exception, match="image_size must be a positive multiple of 32"):
        run_report("tiny", overrides={"output_dir": str(tmp_path / "out"), "image_size": 100}, root=ROOT)
    assert not (tmp_path / "out").exists()


def test_a_chapter_survives_run_all_twice_in_one_kernel(tiny_report, tmp_path):
    """What a JupyterLab / Colab user does: Run All, then Run All again (and one cell again) in the same kernel."""
    from nbclient import NotebookClient
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from isic_utils.params import resolve

    _, _, _, base = tiny_report
    values = resolve("train", ROOT / "params" / "task1.yaml", "tiny",
                     {"output_dir": str(tmp_path / "out"), "data_dir": str(base / "data")}, root=ROOT)
    notebook = parameterize_notebook(load_notebook_node(str(ROOT / "notebooks" / "02_train.ipynb")), values)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    with client.setup_kernel():
        for _ in range(2):
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)  # raises CellExecutionError on the first failing cell
        setup = next(i for i, c in enumerate(notebook.cells) if "from_notebook" in c.source)
        client.execute_cell(notebook.cells[setup], setup)
    assert len(pd.read_csv(tmp_path / "out" / "task1" / "tables" / "epochs.csv")) == 2


def test_the_index_gives_the_answer_first_and_every_chapter_has_a_readers_copy(tiny_report):
    out, timings, *_ = tiny_report
    index = (out / "index.html").read_text()
    answer = index.index("The answer")
    assert answer < index.index("What each chapter found") < index.index("Files")
    assert "Table 9" in index and '<table' in index and "JA / IoU (mean per image, original size)" in index
    assert '<img src="compare/figures/predictions.png"' in index
    assert "segments the test set best" in index and "test JA" in index and "Data: " in index
    assert "on other-clinic vs" in index  # the external chapter's finding, from its gap table
    for name in timings:
        assert f'href="{name}_reader.html"' in index
        reader = (out / f"{name}_reader.html").read_text()
        assert 'class="jp-CodeMirrorEditor' not in reader and "from_notebook" not in reader, name  # no code cells
        assert "Synthetic data" in reader, name  # the outputs and the text are all there
    full = (out / "task2.html").read_text()
    assert 'class="jp-CodeMirrorEditor' in full and "from_notebook" in full  # the full page keeps the code
    for figure in ("worst", "ja_vs_size"):
        assert (out / "compare" / "figures" / f"{figure}.png").stat().st_size > 5000
