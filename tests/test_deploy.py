"""The model leaves Python: ``export`` writes an ONNX file that says what it is, scores as the checkpoint does, and
replaces nothing it did not write; int8 is measured on validation before it is written."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from isic_utils.__main__ import main
from isic_utils.deploy import export as E
from isic_utils.model.inference import CheckpointMismatch, load_trained, predicted_probabilities
from isic_utils.scoring.metrics import original_size_counts


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The trained U-Net's best.pt, copied into a folder of its own, and its fp32 export beside it."""
    _, run_dir = trained_run
    folder = tmp_path_factory.mktemp("export")
    shutil.copy(run_dir / "best.pt", folder / "best.pt")
    target, described = E.export_checkpoint(folder / "best.pt")
    return folder, target, described


def test_the_export_says_what_it_is_and_scores_as_the_checkpoint(exported, tiny_data):
    folder, target, described = exported
    assert target == folder / "best.onnx"
    model, meta = load_trained(folder / "best.pt")
    read = E.read_metadata(target)
    assert read == described and read["precision"] == "fp32" and read["format"] == E.FORMAT
    for key in ("image_size", "mean", "std", "threshold", "postprocess", "color_constancy", "tta"):
        assert read[key] == meta[key], key
    assert read["calibration"] == (meta.get("calibration") or {})  # this checkpoint's fit chose none
    assert read["encoder_weights"] == meta["encoder_weights"] and "/" not in read["checkpoint"].split("…/")[-1][:-8]
    ours = predicted_probabilities(model, meta, tiny_data.test.images)
    theirs = E.onnx_probabilities(target, read, tiny_data.test.images)
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() < 1e-4
    a = original_size_counts(ours, tiny_data.test, meta["threshold"], meta["postprocess"])
    b = original_size_counts(theirs, tiny_data.test, read["threshold"], read["postprocess"])
    pixels = a.sum()
    assert (a[:, :2] - b[:, :2]).abs().sum() <= 1e-3 * pixels  # ≥ 99.9 % of the pixels agree


def test_export_replaces_nothing_it_was_not_asked_to(exported, tmp_path, capsys):
    folder, target, _ = exported
    mine = tmp_path / "model.onnx"
    mine.write_bytes(b"a file of mine")
    assert main(["export", "--checkpoint", str(folder / "best.pt"), "--output", str(mine)]) == 1
    assert "exists and was not written by this command; it is kept" in capsys.readouterr().err
    assert mine.read_bytes() == b"a file of mine"
    assert main(["export", "--checkpoint", str(folder / "best.pt"), "--output", str(mine), "--overwrite"]) == 0
    assert " MB, fp32)" in capsys.readouterr().out and E.read_metadata(mine)["precision"] == "fp32"
    assert not [p for p in tmp_path.iterdir() if p.name != "model.onnx"]  # no scratch left beside it


def test_files_that_are_not_ours_are_named_with_the_fix(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(CheckpointMismatch, match="cannot be read as an ONNX model"):
        E.read_metadata(corrupt)
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "other", [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])]
    )
    other = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), str(other))
    with pytest.raises(CheckpointMismatch, match="not one this project exported"):
        E.read_metadata(other)
    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint")
    assert main(["export", "--checkpoint", str(notes), "--output", str(tmp_path / "x.onnx")]) == 1
    assert "cannot be read as a checkpoint of this project" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="module")
def tiny_task3(tmp_path_factory, synthetic_root):
    """task 3 trained one epoch on the tiny profile by train_run: a checkpoint that knows its data."""
    from isic_utils.config import params as P
    from isic_utils.training.experiments import prepare_data, train_run

    base = tmp_path_factory.mktemp("tiny-task3")
    root = P.project_root()
    values = {"output_dir": str(base / "out"), "data_dir": str(synthetic_root), "epochs": 1, "seeds": [0]}
    train = P.resolve("train", root / "params" / "task3.yaml", "tiny", values, root)
    train_run(train, prepare_data(train, progress=False), verbose=False)
    return base / "out" / "task3" / "seed0" / "best.pt"


def test_int8_is_measured_on_validation_before_it_is_written(tiny_task3, tmp_path):
    costly = tmp_path / "refused.onnx"
    with pytest.raises(E.Int8TooCostly, match=r"int8 would cost .* validation JA .* not written"):
        E.export_checkpoint(tiny_task3, costly, int8=True, tolerance=-1.0)  # any cost is too much
    assert not costly.exists() and not list(tmp_path.iterdir())
    target, described = E.export_checkpoint(tiny_task3, tmp_path / "int8.onnx", int8=True, tolerance=1.0)
    read = E.read_metadata(target)
    measured = read["int8"]
    assert read["precision"] == "int8" and measured["calibration images"] > 0 and measured["validation images"] > 0
    assert 0 <= measured["validation JA int8"] <= 1 and measured["tolerance"] == 1.0
    fp32, _ = E.export_checkpoint(tiny_task3, tmp_path / "fp32.onnx")
    assert target.stat().st_size < 0.5 * fp32.stat().st_size  # int8 weights: a quarter of the bytes, and scales
    model = onnx.load(str(target))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # QDQ
    _, meta = load_trained(tiny_task3)
    images = torch.randint(0, 256, (2, 3, meta["image_size"], meta["image_size"]), dtype=torch.uint8)
    assert E.onnx_probabilities(target, read, images).shape == (2, 1, meta["image_size"], meta["image_size"])
