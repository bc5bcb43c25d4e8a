"""The model leaves Python: ``export`` writes an ONNX file that says what it is, scores as the checkpoint does, and
replaces nothing it did not write; int8 is measured on validation before it is written."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from isic_utils.__main__ import main
from isic_utils.deploy import export as E
from isic_utils.deploy import predictor as R
from isic_utils.model.inference import load_trained, predicted_probabilities
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
    with pytest.raises(R.ModelFileError, match="cannot be read as an ONNX model"):
        E.read_metadata(corrupt)
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "other", [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])]
    )
    other = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), str(other))
    with pytest.raises(R.ModelFileError, match="not one this project exported"):
        E.read_metadata(other)
    assert main(["predict", "--checkpoint", str(other), "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "not one this project exported" in capsys.readouterr().err and not (tmp_path / "o").exists()
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


@pytest.mark.slow  # trains a run and quantises it: the slow tier keeps make test under three minutes
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
    weights = [
        onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims
    ]
    # 7-bit weights: full-range ones saturate ONNX Runtime's uint8 × int8 sums on CPUs without VNNI
    assert weights and all(-64 <= w.min() and w.max() <= 64 for w in weights)
    assert read["quantisation"] == E.QUANTISATION
    _, meta = load_trained(tiny_task3)
    images = torch.randint(0, 256, (2, 3, meta["image_size"], meta["image_size"]), dtype=torch.uint8)
    assert E.onnx_probabilities(target, read, images).shape == (2, 1, meta["image_size"], meta["image_size"])


# ----------------------------------------------------------------------------- the predictor without torch


@pytest.mark.slow  # both engines over a folder; the numpy steps are pinned one by one in the fast tier
def test_the_onnx_predictor_writes_what_predict_writes(exported, tiny_data, tmp_path):
    """The same folder through predict (PyTorch, the checkpoint) and the ONNX engine (the export): the masks agree on
    ≥ 99.9 % of the pixels at original size, the confidences to 1e-4, the flags and the files written alike."""
    import pandas as pd
    from PIL import Image

    from isic_utils.predict import predict_folder

    folder, target, _ = exported
    images = tmp_path / "images"
    images.mkdir()
    for pair in tiny_data.test.sources:
        shutil.copy(pair.image, images / pair.image.name)
    torch_out, onnx_out = tmp_path / "torch", tmp_path / "onnx"
    predict_folder(folder / "best.pt", images, torch_out, overlays=True)
    assert (
        main(["predict", "--checkpoint", str(target), "--input", str(images), "--output", str(onnx_out), "--overlays"])
        == 0
    )
    assert sorted(p.name for p in torch_out.iterdir()) == sorted(p.name for p in onnx_out.iterdir())
    differing = pixels = 0
    for mask in torch_out.glob("*_Segmentation.png"):
        a, b = np.asarray(Image.open(mask)), np.asarray(Image.open(onnx_out / mask.name))
        assert a.shape == b.shape and set(np.unique(b)) <= {0, 255}
        differing, pixels = differing + int((a != b).sum()), pixels + a.size
    assert differing <= 1e-3 * pixels
    ours, theirs = pd.read_csv(torch_out / "confidence.csv"), pd.read_csv(onnx_out / "confidence.csv")
    assert list(ours["image"]) == list(theirs["image"]) and list(ours["mask"]) == list(theirs["mask"])
    assert (ours["confidence"] - theirs["confidence"]).abs().max() < 1e-4


def test_the_numpy_steps_equal_the_package_ones():
    """Each numpy step of the ONNX engine against the package's torch step it stands in for."""
    from isic_utils.data.transforms import apply_color_constancy
    from isic_utils.scoring import confidence
    from isic_utils.scoring.metrics import postprocess_mask

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 20, 24), dtype=np.uint8)
    images[1, 0] //= 3  # a colour cast
    assert np.array_equal(
        R.shades_of_grey(images), apply_color_constancy(torch.from_numpy(images), "shades_of_grey").numpy()
    )
    probability = torch.sigmoid(torch.from_numpy(rng.normal(0, 3, (16, 12)).astype(np.float32)))
    for width, height in ((37, 53), (12, 16), (7, 5)):
        expected = torch.nn.functional.interpolate(
            probability[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        assert np.abs(R.upsampled(probability.numpy(), width, height) - expected).max() < 1e-6
    mask = probability.numpy() > 0.5
    assert np.array_equal(R.largest_lesion(mask), postprocess_mask(torch.from_numpy(mask), "largest_component").numpy())
    maps = torch.sigmoid(torch.from_numpy(rng.normal(0, 2, (3, 1, 32, 32)).astype(np.float32)))
    maps[2] = 0.01  # an empty mask
    for rule in confidence.CANDIDATES:
        for temperature in (1.0, 1.7):
            calibration = {"confidence": rule, "temperature": temperature}
            expected = confidence.scores(maps, calibration)
            got = [R.map_confidence(m[0].numpy(), calibration) for m in maps]
            assert np.abs(np.array(got) - expected).max() < 1e-5, (rule, temperature)


def test_the_onnx_predictor_runs_where_torch_cannot_be_imported(exported, tiny_data, tmp_path):
    import subprocess
    import sys

    _, target, _ = exported
    images = tmp_path / "images"
    images.mkdir()
    for pair in tiny_data.test.sources[:2]:
        shutil.copy(pair.image, images / pair.image.name)
    script = (
        "import sys; sys.modules['torch'] = None  # import torch fails, as where it is not installed\n"
        "from isic_utils.deploy.predictor import main\n"
        f"code = main(['--model', {str(target)!r}, '--input', {str(images)!r}, '--output', {str(tmp_path / 'out')!r}])\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 masks" in done.stdout and len(list((tmp_path / "out").glob("*_Segmentation.png"))) == 2


def test_the_deployment_reading_comes_from_the_numbers():
    from isic_utils.deploy import costs

    cost = pd.DataFrame(
        [
            {
                "run": "task3",
                "seed": 0,
                "parameters": 6_000_000,
                "MFLOPs / image": 812.0,
                "image size": 128,
                "MB fp32": 25.2,
                "MB int8": 6.3,
                "int8 validation JA cost": 0.012,
                "int8 offered by export": False,
                "PyTorch eager ms": 60.0,
                "PyTorch eager IQR ms": 2.0,
                "ONNX fp32 ms": 20.0,
                "ONNX fp32 IQR ms": 1.0,
                "ONNX int8 ms": 15.0,
                "ONNX int8 IQR ms": 1.0,
                **{f"{f} images/s at 16": 50.0 for f in costs.FORMATS},
                "machine": "a CPU",
            }
        ]
    )
    ja = pd.DataFrame(
        [
            {"run": "task3", "data": d, "images": 10, "format": f, "JA": j, "pixels unlike PyTorch's": 0.0}
            for d, js in (("ISIC test", (0.8, 0.8, 0.79)), ("PH2", (0.7, 0.7001, 0.72)))
            for f, j in zip(costs.FORMATS, js)
        ]
    )
    reading = costs.deploy_reading(cost, ja)
    assert reading.startswith("Measured on a CPU, one thread, batch 1.")
    assert "3.0× faster than PyTorch eager (20.0 vs 60.0 ms)" in reading and "at most 0.0001 on any set" in reading
    assert "int8 is 4.0× smaller (6.3 MB) and takes 15.0 ms (4.0× faster than eager, 1.3× faster than fp32)" in reading
    assert "by at most 0.0200 on any set and by -0.0120 on validation" in reading
    assert costs.deploy_sentence(cost) == (
        "Deployed, one image on one CPU thread (a CPU) takes: task3 15 ms as ONNX int8 (6.3 MB, 4.0× PyTorch eager)."
    )
    assert "export refuses it" in reading  # 0.012 lost on validation: over the tolerance
    view = costs.ja_view(ja)
    assert list(view["data"]) == ["ISIC test", "PH2"] and view["JA ONNX int8"].tolist() == [0.79, 0.72]
    shown = costs.cost_view(cost)
    assert shown["PyTorch eager: ms (batch 1)"].iloc[0] == "60.0 ± 2.0" and shown["ONNX fp32: × eager"].iloc[0] == 3.0


def test_engines_are_timed_in_turn():
    from isic_utils.deploy import costs

    calls = []
    timed = costs.timed_in_turn({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert calls == ["a", "b"] * 5 and set(timed) == {"a", "b"}
    assert all(median >= 0 and spread >= 0 for median, spread in timed.values())
