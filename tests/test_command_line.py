"""The command line as a user types it: ``report --only``, ``options``, ``predict`` (in test_predict), malformed
``--set`` values, the ``isic-report`` console script, and ``tools/check_predict.py``."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from isic_utils.__main__ import main
from isic_utils.evaluation import generalisation
from isic_utils.report import pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def chapters_run(monkeypatch):
    """Chapters stand in for papermill (the pipeline's own choice of chapters is what is tested here)."""
    seen = []

    def fake_chapter(step, values, out_dir, root, kernel=None, echo=print):
        seen.append(step.name)
        (out_dir / f"{step.name}.ipynb").write_text("{}")
        return 0.0

    monkeypatch.setattr(pipeline, "run_chapter", fake_chapter)
    monkeypatch.setattr(pipeline, "export_chapter", lambda step, out_dir: None)
    monkeypatch.setattr(pipeline, "write_index", lambda *a, **k: None)
    return seen


def test_report_only_runs_the_steps_named(chapters_run, tmp_path):
    assert main(["report", "--data", "tiny", "--only", "task2", "compare", "--set", f"output_dir={tmp_path}"]) == 0
    assert chapters_run == ["task2", "compare"]


def test_report_only_with_an_unknown_step_names_the_steps(chapters_run, tmp_path, capsys):
    assert main(["report", "--data", "tiny", "--only", "tsk2", "--set", f"output_dir={tmp_path / 'out'}"]) == 1
    error = capsys.readouterr().err
    assert (
        "unknown step 'tsk2' (did you mean 'task2'?)" in error
        and "eda, task1, task2, task3, external, compare" in error
    )
    assert chapters_run == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "item, message",
    [("epochs", "--set expects KEY=VALUE"), ("seeds=[0, 1", "--set seeds=[0, 1: the value of seeds is not valid YAML")],
)
def test_a_malformed_set_says_what_is_wrong(chapters_run, tmp_path, capsys, item, message):
    assert main(["report", "--data", "tiny", "--set", item, f"output_dir={tmp_path / 'out'}"]) == 1
    assert message in capsys.readouterr().err
    assert chapters_run == [] and not (tmp_path / "out").exists()


def test_the_options_command_runs_the_study_it_names(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(generalisation, "options_study", lambda *args, **named: calls.append((args, named)))
    assert main(["options", "--data", "tiny", "--epochs", "1", "--set", f"output_dir={tmp_path}", "seeds=[0, 1]"]) == 0
    assert calls == [(("tiny", 1, {"output_dir": str(tmp_path), "seeds": [0, 1]}), {"only": None})]
    assert main(["options", "--data", "tiny", "--only", "256_px"]) == 0
    assert calls[-1][1] == {"only": ["256_px"]}


def test_the_options_study_trains_only_the_options_named(tmp_path):
    """--only: the base and the named options (by name or folder), nothing else; an unknown one is named."""
    from isic_utils.config.params import ParameterError

    values = {"output_dir": str(tmp_path)}
    _, runs = generalisation.study_params("tiny", 1, values, only=["256_px"])
    assert list(runs) == ["base", "256 px"]
    _, runs = generalisation.study_params("tiny", 1, values, only=["base"])
    assert list(runs) == ["base"]
    # 384 px (nine times the compute) is trained only when named
    _, runs = generalisation.study_params("tiny", 1, values)
    assert "256 px" in runs and "384 px" not in runs
    _, runs = generalisation.study_params("tiny", 1, values, only=["384_px"])
    assert list(runs) == ["base", "384 px"] and runs["384 px"]["image_size"] == 384
    with pytest.raises(ParameterError, match=r"unknown option 'bigger' for --only: .*256_px \(256 px\)"):
        generalisation.study_params("tiny", 1, values, only=["bigger"])


def test_the_isic_report_console_script_is_installed():
    script = Path(sys.executable).parent / "isic-report"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "report" in done.stdout and "predict" in done.stdout and "options" in done.stdout


def test_check_predict_compares_the_written_masks_with_the_evaluation(
    trained_run, synthetic_root, monkeypatch, capsys, tmp_path
):
    _, run_dir = trained_run
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "check_predict.py",
            "--checkpoint",
            str(run_dir / "best.pt"),
            "--root",
            str(synthetic_root),
            "--split",
            "test",
            "--output",
            str(tmp_path),
        ],
    )
    runpy.run_path(str(ROOT / "tools" / "check_predict.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "6 masks written" in printed and "sizes exact: True" in printed and "binary 0/255: True" in printed
    difference = float(printed.split("max |difference| ")[1].split(";")[0])
    assert difference < 1e-4
    assert len(list(tmp_path.glob("*_Segmentation.png"))) == 6


def test_ctrl_c_says_how_to_continue_instead_of_a_traceback(monkeypatch, capsys):
    from isic_utils.report import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_report", interrupted)
    assert main(["report", "--data", "tiny"]) == 130
    error = capsys.readouterr().err
    assert "run the same command again to continue" in error and "Traceback" not in error
