"""Outputs written by earlier versions are still read, each by the one place that knows its older form (the
compatibility the code keeps, pinned here so that it is removed on purpose or not at all): a checkpoint from before
colour constancy, test-time flips, post-processing and the confidence rule; a checkpoint fingerprint from before
colour constancy; a run record from before devices were recorded; a gap table with one column per set; an options
table from before seeds were compared; a leftover named with a bare PID."""

from __future__ import annotations

import os

import pandas as pd
import torch

from isic_utils.base import files
from isic_utils.config.params import TrainConfig
from isic_utils.evaluation import generalisation
from isic_utils.model.inference import load_trained
from isic_utils.predict import CONFIDENCE_FILE, confidence_summary, predict_folder
from isic_utils.report import tables


def test_a_checkpoint_from_before_the_options_and_the_confidence_still_predicts(trained_run, tiny_data, tmp_path):
    _, run_dir = trained_run
    state = torch.load(run_dir / "best.pt", weights_only=True)
    for key in ("color_constancy", "tta", "postprocess", "calibration"):
        state["meta"].pop(key, None)
    old = tmp_path / "best.pt"
    torch.save(state, old)
    _, meta = load_trained(old)
    assert (meta["color_constancy"], meta["tta"], meta["postprocess"]) == ("none", "none", "none")
    written = predict_folder(old, tiny_data.test.sources[0].image.parent, tmp_path / "out")
    assert written and "trained before it), so none is flagged" in confidence_summary(
        tmp_path / "out" / CONFIDENCE_FILE
    )


def test_a_fingerprint_from_before_colour_constancy_is_the_same_as_today_without_it():
    assert "color_constancy" not in TrainConfig().fingerprint()  # "none": checkpoints from before the option resume
    assert TrainConfig(color_constancy="shades_of_grey").fingerprint()["color_constancy"] == "shades_of_grey"


def test_a_run_record_from_before_devices_were_recorded_says_so():
    from isic_utils.training.experiments import RunResult

    run = RunResult.__new__(RunResult)
    run.results = [{"seed": 0}]
    assert run.trained_on == "unrecorded hardware (a run trained before devices were recorded)"


def test_a_gap_table_with_a_column_per_set_is_read(tmp_path):
    (tmp_path / "external" / "tables").mkdir(parents=True)
    pd.DataFrame(
        [{"run": "task2", "external set": "PH2", "JA PH2": 0.68, "JA ISIC test": 0.78, "JA gap": -0.10}]
    ).to_csv(tmp_path / "external" / "tables" / "gap.csv", index=False)
    rows, _ = tables._external_rows(tmp_path)
    assert rows.loc[0, "JA on the set"] == "0.680" and rows.loc[0, "images"] == ""


def test_an_options_table_from_before_seeds_were_compared_asks_for_a_rerun(tmp_path):
    folder = tmp_path / generalisation.FOLDER / "tables"
    folder.mkdir(parents=True)
    pd.DataFrame({"option": ["base"], "validation JA": [0.8]}).to_csv(folder / "options.csv", index=False)
    assert generalisation.saved_options(tmp_path) is None


def test_a_leftover_named_with_a_bare_pid_is_removed_when_its_process_is_gone(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    leftover = tmp_path / f".table.csv.{dead}.abcd1234.tmp"
    leftover.write_text("half")
    mine = tmp_path / f".table.csv.{os.getpid()}.abcd1234.tmp"
    mine.write_text("mine")
    assert files.remove_leftovers(tmp_path) == [leftover] and mine.exists()
