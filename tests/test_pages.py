"""What the report's pages say, read as a reader would (issue 28): the offline default's random encoder named where its
scores are shown, a headline that compares only runs that learned, no ``nan`` or ``-0.000`` on a page, chapter pages
titled for the chapter, and figures small enough that a handed-over report stays a few MB."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from PIL import Image

from isic_utils.base import files
from isic_utils.config.params import chapter_values
from isic_utils.evaluation import comparison, trust
from isic_utils.report import pipeline, plots
from isic_utils.report import tables as report
from isic_utils.training import experiments

ROOT = Path(__file__).resolve().parents[1]


def per_image(ids: int, missed: int, iou: float = 0.8) -> pd.DataFrame:
    """A per-image test table: ``missed`` predictions miss the lesion (a speck beside it: JA 0, as the offline task 1's
    did, never an empty mask), the rest score ``iou``."""
    rows = [
        {
            "id": f"ISIC_{k:07d}",
            "tp": 0 if k < missed else 80,
            "fp": 40 if k < missed else 10,
            "fn": 20,
            "tn": 900,
            "iou": 0.0 if k < missed else iou,
        }
        for k in range(ids)
    ]
    return pd.DataFrame(rows)


def saved_run(folder: Path, name: str, frame: pd.DataFrame, random: bool, seeds=(0,)) -> None:
    """The files a finished run leaves that the index reads: seeds.csv, run.json, per-image test tables."""
    run_dir = folder / name
    (run_dir / "tables").mkdir(parents=True)
    source = "random initialisation" if random else "ImageNet weights (torchvision IMAGENET1K_V1)"
    (run_dir / "run.json").write_text(
        json.dumps(
            {"params": {"epochs": 8}, "encoder_weights": {str(s): {"source": source} for s in seeds}, "trained_on": {}}
        )
    )
    pd.DataFrame(
        [{"seed": s, "test_iou_mean_orig": frame["iou"].mean(), "best_epoch": 8, "val_iou_mean": 0.5} for s in seeds]
    ).to_csv(run_dir / "tables" / "seeds.csv", index=False)
    for s in seeds:
        frame.to_csv(run_dir / "tables" / f"per_image_test_seed{s}.csv", index=False)


@pytest.fixture
def offline_report(tmp_path):
    """The offline default's outcome: task 1 (a frozen random encoder) misses the lesion on every test image,
    task 2 (fine-tuned, random encoder too) segments; Table 9 and the Wilcoxon table as the comparison saves them."""
    out = tmp_path / "synthetic"
    saved_run(out, "task1", per_image(60, missed=60), random=True)
    saved_run(out, "task2", per_image(60, missed=2), random=True)
    (out / "compare" / "tables").mkdir(parents=True)
    pd.DataFrame({"run": ["task1", "task2"]}).to_csv(out / "compare" / "tables" / "comparison.csv", index=False)
    pd.DataFrame([{"A": "task1", "B": "task2", "mean B − A": 0.572, "p-value": 1.6e-11}]).to_csv(
        out / "compare" / "tables" / "wilcoxon.csv", index=False
    )
    return out


def test_the_headline_leaves_out_a_run_that_learned_nothing_and_says_why(offline_report):
    """The offline index's first line read "task2 … +0.572 over task1 (Wilcoxon p 1.6e-11)": a win over a model whose
    masks all missed the lesion, the cause one screen lower."""
    line = report.chapter_finding(offline_report, "compare", "compare")
    assert "over task1" not in line and "Wilcoxon" not in line
    assert "task2 segments the test set best" in line
    assert (
        "task1 is not compared: it learned nothing: its masks miss the lesion (JA < 0.05) on 60 of 60 test predictions"
        in line
    )
    assert "random" in line
    task1 = report.chapter_finding(offline_report, "task1", "train")
    assert task1.startswith("Learned nothing: its masks miss the lesion (JA < 0.05) on 60 of 60")
    task2 = report.chapter_finding(offline_report, "task2", "train")
    assert task2.startswith("Random encoder (no ImageNet weights): not transfer learning; test JA")


def test_runs_that_all_learned_keep_the_paired_test_in_the_headline(offline_report):
    (offline_report / "task1").rename(offline_report / "old")
    saved_run(offline_report, "task1", per_image(60, missed=5, iou=0.5), random=False)
    line = report.chapter_finding(offline_report, "compare", "compare")
    assert "+0.572 over task1 (Wilcoxon p 1.6e-11)" in line and "not compared" not in line


def test_every_chapter_names_the_random_encoder_at_its_top(offline_report, tmp_path, monkeypatch):
    """The eda, external and compare pages never said that the runs had no ImageNet weights (the README said every
    chapter does); before any run, a chapter says what will happen offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-cache"))  # no ImageNet file cached
    for chapter in ("eda", "external", "compare"):
        values = chapter_values(chapter, "synthetic", None, {"output_dir": str(offline_report)}, root=ROOT)
        line = experiments.describe_data(values)
        assert "**Random encoder**: task1, task2 started from a randomly initialised MobileNetV2" in line, chapter
    before = chapter_values("eda", "synthetic", None, {"output_dir": str(tmp_path / "empty")}, root=ROOT)
    assert "No ImageNet weights on this machine" in experiments.describe_data(before)
    weights = tmp_path / "mobilenet_v2.pth"
    weights.write_bytes(b"a state_dict")
    monkeypatch.setenv("ISIC_ENCODER_WEIGHTS", str(weights))
    assert "ImageNet" not in experiments.describe_data(before)  # weights at hand: nothing to warn about
    real = chapter_values("eda", "isic2016", None, {"output_dir": str(tmp_path / "empty")}, root=ROOT)
    monkeypatch.delenv("ISIC_ENCODER_WEIGHTS")
    assert "random" not in experiments.describe_data(real).lower()  # a real profile refuses a random encoder


def test_the_student_table_says_what_a_run_that_learned_nothing_means():
    frames = {"task1": per_image(60, missed=60), "task2": per_image(60, missed=0)}
    runs = {
        name: experiments.SavedRun(
            name,
            Path(name),
            {"encoder_weights": {"0": {"source": "random initialisation"}}},
            pd.DataFrame({"seed": [0], "test_iou_mean_orig": [frame["iou"].mean()]}),
            pd.DataFrame(),
            {0: frame},
            None,
        )
        for name, frame in frames.items()
    }
    notes = comparison.caveats(runs)
    assert notes["task1"].startswith("learned nothing") and notes["task2"].startswith("random encoder")
    table = report.report_vs_reproduction({"task1": {"iou_mean": 0.0}, "task2": {"iou_mean": 0.8}}, notes)
    assert list(table["ours: read first"]) == [notes["task1"], notes["task2"]]
    reading = comparison.written_reading(runs, pd.DataFrame())
    assert (
        "**task1** learned nothing" in reading and "Best mean per-image Jaccard on the test set: **task2**" in reading
    )


def test_a_set_where_every_image_failed_reads_without_nan():
    """Task 1's trust line read "ρ +nan, AUROC —, 0 of 60 failures flagged" when all 60 had failed."""
    rows = pd.DataFrame(
        [
            {
                "run": "task1",
                "set": "ISIC test",
                "confidence": "mean max-probability",
                "images": 60,
                "Spearman ρ": np.nan,
                "AUROC (JA < 0.65)": np.nan,
                "failed & flagged": 0,
                "failed, not flagged": 60,
                "flagged, not failed": 0,
            },
            {
                "run": "task2",
                "set": "ISIC test",
                "confidence": "mean max-probability",
                "images": 60,
                "Spearman ρ": -0.00001,
                "AUROC (JA < 0.65)": np.nan,
                "failed & flagged": 0,
                "failed, not flagged": 0,
                "flagged, not failed": 1,
            },
        ]
    )
    calibration = pd.DataFrame(
        [{"run": r, "kept T": 1.0, "ECE test": 0.1, "ECE test, calibrated": 0.1} for r in ("task1", "task2")]
    )
    text = trust.trust_reading(rows, calibration)
    assert "nan" not in text and "-0.00" not in text
    assert "every image failed (JA < 0.65)" in text and "0 of 60 flagged" in text
    assert "ρ +0.00, AUROC — (no failure), 0 of 0 failures flagged with 1 false alarms" in text


@pytest.mark.parametrize(
    "value, shown",
    [(-0.00004, "+0.000"), (0.0004, "+0.000"), (-0.0006, "-0.001"), (0.5724, "+0.572"), (-0.0, "+0.000")],
)
def test_a_change_too_small_to_show_never_reads_minus_zero(value, shown):
    assert files.signed(value) == shown


def test_tables_on_pages_show_no_minus_zero_and_keep_thousands():
    table = pd.DataFrame(
        {"JA gap": [-0.00004, -0.25], "images": [1200, 3], "p-value": [1.6e-11, 0.5], "run": ["task1", "task2"]}
    )
    page = report.for_reading(table).to_html()
    cells = [c.split(">")[-1] for c in page.split("</td>")[:-1]]
    assert cells == ["0.000", "1,200", "1.6e-11", "task1", "-0.250", "3", "0.5", "task2"]


def test_a_chapter_page_is_titled_for_its_chapter(tmp_path):
    """Every chapter page was titled "Notebook" in the browser's tab and history."""
    notebook = nbformat.read(ROOT / "notebooks" / "02_train.ipynb", as_version=4)
    nbformat.write(notebook, tmp_path / "task1.ipynb")
    for reader in (False, True):
        page = pipeline.export_html(tmp_path / "task1.ipynb", tmp_path / "page.html", reader=reader).read_text()
        assert "<title>task1 · Chapter 2 — Training a run</title>" in page


def _png(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture


def test_figures_are_written_and_shown_in_256_colours(tmp_path):
    """A figure is in a report four times (its file, the notebook, the page with code, the reader's copy): full-colour
    PNGs made the synthetic report's zip 17.4 MB. Written and shown in a notebook, it is a palette PNG, several times
    smaller than matplotlib's own."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.imshow(np.random.default_rng(0).random((64, 64, 3)) * np.linspace(0, 1, 64)[:, None, None])
    ax.plot(np.sin(np.linspace(0, 6, 100)))
    path = plots.save_figure(fig, tmp_path, "demo")
    own = io.BytesIO()
    fig.savefig(own, dpi=110, bbox_inches="tight", format="png")
    assert _png(path.read_bytes()).mode == "P" and path.stat().st_size < own.tell() / 2
    plt.close(fig)
    # in a kernel, as a chapter shows them: a figure returned by a cell, and one drawn and left for the inline backend
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(source)
            for source in (
                "from isic_utils.report import plots\nimport matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 3, 2])\nfig",
                "plt.subplots()[1].imshow([[0, 1], [2, 3]]);",
            )
        ]
    )
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    shown = [
        base64.b64decode(output["data"]["image/png"])
        for cell in notebook.cells
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(shown) >= 2 and all(_png(picture).mode == "P" for picture in shown)


def test_the_other_clinic_line_leaves_out_a_run_that_learned_nothing(offline_report):
    """The offline index read "task1 JA 0.000 on other-clinic vs 0.000 on the ISIC test set (+0.000)"."""
    from isic_utils.evaluation.external import ON_SET

    (offline_report / "external" / "tables").mkdir(parents=True)
    pd.DataFrame(
        [
            {
                "run": run,
                "external set": "other-clinic",
                f"JA {ON_SET}": ja,
                "JA ISIC test": ja + 0.003,
                "JA gap": -0.003,
            }
            for run, ja in (("task1", 0.0), ("task2", 0.572))
        ]
    ).to_csv(offline_report / "external" / "tables" / "gap.csv", index=False)
    line = report.chapter_finding(offline_report, "external", "external")
    assert line.startswith("task2 JA 0.572 on other-clinic") and "task1 JA" not in line
    assert line.endswith(
        "task1 is left out: it learned nothing: its masks miss the lesion (JA < 0.05) on 60 of 60 "
        "test predictions (its encoder is random: no ImageNet weights)."
    )


def test_the_index_answers_the_other_clinic_question_with_a_table_and_one_sentence(tmp_path):
    """The front page's other-clinic answer: one sentence naming the range of gaps, and a table (run, set, images,
    JA on each, gap ± spread, verdict), not one long sentence per run; a run that learned nothing is named apart."""
    out = tmp_path / "report"
    ja = {"task1": 0.0, "task2": 0.78, "task3": 0.86}
    for run, value in ja.items():
        folder = out / run / "tables"
        folder.mkdir(parents=True)
        pd.DataFrame({"seed": [0, 1, 2], "test_iou_mean_orig": [value] * 3}).to_csv(folder / "seeds.csv", index=False)
        for seed in range(3):
            pd.DataFrame({"id": ["a", "b"], "iou": [value, value]}).to_csv(
                folder / f"per_image_test_seed{seed}.csv", index=False
            )
    rows = []
    for run, value in ja.items():
        for name, drop in (("PH2", 0.10), ("PH2, reporting half", 0.12)):
            rows.append(
                {
                    "run": run,
                    "external set": name,
                    "images": 50,
                    "JA ISIC test": value,
                    "JA on the set": value - drop,
                    "JA gap": -drop,
                    "seeds": 3,
                    "JA gap std over seeds": 0.02,
                    "JA gap against the seed spread": "beyond the seed spread",
                }
            )
    (out / "external" / "tables").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(out / "external" / "tables" / "gap.csv", index=False)
    (out / "compare" / "tables").mkdir(parents=True)
    pd.DataFrame({"run": list(ja)}).to_csv(out / "compare" / "tables" / "comparison.csv", index=False)

    finding = report._external_finding(out)
    assert finding.startswith("Every run scores lower on another clinic's images than on the ISIC test set: JA gap")
    assert "task1 is left out: it learned nothing" in finding and finding.count("ISIC test") == 1
    best = max(ja, key=lambda run: ja[run] if run != "task1" else -1)
    assert f"On PH2 (50 images) the best, {best}, scores JA {ja[best] - 0.10:.3f} (a gap of -0.100)." in finding
    table, left_out = report._external_rows(out)
    columns = ["run", "external set", "images", "JA ISIC test", "JA on the set", "gap", "against the seed spread"]
    assert list(table.columns) == columns
    assert set(table["run"]) == {"task2", "task3"} and len(table) == 4 and set(left_out) == {"task1"}
    assert table.loc[0, "gap"] == "-0.100 ± 0.020"
    page = report.answer_section(out).split("On another clinic")[1].split("Table 9")[0]
    assert "Every run scores lower on another clinic&#x27;s images than on the ISIC test set" in page
    assert page.count("<tr>") == 4 and "<th>against the seed spread</th>" in page and "-0.120 ± 0.020" in page
