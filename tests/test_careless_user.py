"""The careless but ordinary user of issue 29, one section per finding: no command replaces a file it did not write,
values are read as typed, one report writes a folder at a time, a half-finished report is not handed over, an
operating-system failure is one sentence, every setting is checked before any work, what is skipped is named, and a
finished seed's checkpoint is final."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from isic_utils.__main__ import main
from isic_utils.base import files
from isic_utils.config import params as P
from isic_utils.predict import predict_folder
from isic_utils.report import handover, pipeline

from .conftest import ROOT

CHAPTERS = ("eda", "task1", "task2", "task3", "external", "compare")  # the tiny profile's


def fake_report(out: Path, monkeypatch, fail: set | None = None) -> None:
    """The tiny report's bookkeeping without its notebooks: each chapter writes its notebook and pages at once."""

    def chapter(step, values, out_dir, root, kernel=None, echo=print):
        if step.name in (fail or ()):
            raise KeyboardInterrupt("killed")
        (out_dir / f"{step.name}.ipynb").write_text("{}")
        return 0.0

    def export(step, out_dir):
        for page in (f"{step.name}.html", pipeline.reader_name(step.name)):
            (out_dir / page).write_text("<html></html>")

    monkeypatch.setattr(pipeline, "run_chapter", chapter)
    monkeypatch.setattr(pipeline, "export_chapter", export)
    monkeypatch.setattr(pipeline.tables, "answer_section", lambda out_dir: "")
    monkeypatch.setattr(pipeline.tables, "chapter_finding", lambda *a: "found")
    monkeypatch.setattr(pipeline.tables, "data_line", lambda out_dir: "")


def snapshot(folder: Path) -> dict:
    """Every file's bytes, but the lock and the name of its holder (the first report's own)."""
    return {
        p.relative_to(folder): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".report")
    }


# ----------------------------------------------------------------------------- 1. pack --output


def test_pack_never_replaces_a_file_it_did_not_write(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fake_report(out, monkeypatch)
    pipeline.run_report("tiny", overrides={"output_dir": str(out)}, root=ROOT, echo=lambda *_: None)
    monkeypatch.chdir(ROOT)
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(photo)
    kept = photo.read_bytes()
    pack = ["pack", "--data", "tiny"]
    monkeypatch.setattr(P, "chapter_values", lambda *a, **k: {"output_dir": str(out)})
    assert main(pack + ["--output", str(photo)]) == 1
    error = capsys.readouterr().err
    assert "photo.jpg exists and was not written by this command; it is kept" in error and "--overwrite" in error
    assert photo.read_bytes() == kept
    # its own zip is packed again without asking; a folder given as --output is a sentence
    target = tmp_path / "handed-over.zip"
    assert main(pack + ["--output", str(target)]) == 0 and main(pack + ["--output", str(target)]) == 0
    with zipfile.ZipFile(target) as archive:
        assert "out-report/index.html" in archive.namelist()
    assert main(pack + ["--output", str(tmp_path)]) == 1
    assert "is a folder; give the path of a file" in capsys.readouterr().err
    assert main(pack + ["--output", str(photo), "--overwrite"]) == 0 and zipfile.is_zipfile(photo)


# ----------------------------------------------------------------------------- 2. --set read literally


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("data_dir=/data/dönnées #1", "data_dir", "/data/dönnées #1"),
        ("output_dir=/x/site #2", "output_dir", "/x/site #2"),
        ("encoder_weights=/w/#3 best.pth", "encoder_weights", "/w/#3 best.pth"),
        ("encoder_weights=null", "encoder_weights", None),
        ("seeds=[0, 1, 2]", "seeds", [0, 1, 2]),
        ("augment=[hflip]", "augment", ["hflip"]),
        ("decoder_lr=5e-4", "decoder_lr", 5e-4),
    ],
)
def test_set_reads_a_value_as_typed(item, key, value):
    assert P.parse_override(item) == (key, value)


def test_set_refuses_a_value_yaml_would_cut_at_a_comment():
    with pytest.raises(P.ParameterError, match=r"seeds's value from ' #' on as a comment"):
        P.parse_override("seeds=[0, 1] #2")


# ----------------------------------------------------------------------------- 3. one report per folder

FIRST_REPORT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from isic_utils.report import pipeline
from isic_utils.__main__ import main
out, go = Path(sys.argv[1]), Path(sys.argv[3])

def chapter(step, values, out_dir, root, kernel=None, echo=print):  # each chapter as a real one ends: its notebook
    if step.name == "task1":
        print("training task1", flush=True)
        while not go.exists():  # the test's second report comes now
            time.sleep(0.05)
    (out_dir / f"{step.name}.ipynb").write_text("{}")
    return 0.0

def export(step, out_dir):
    for page in (f"{step.name}.html", pipeline.reader_name(step.name)):
        (out_dir / page).write_text("<html></html>")

pipeline.run_chapter, pipeline.export_chapter = chapter, export
pipeline.tables.answer_section = lambda out_dir: ""
pipeline.tables.chapter_finding = lambda *a: "found"
pipeline.tables.data_line = lambda out_dir: ""
sys.exit(main(["report", "--data", "tiny", "--set", f"output_dir={out}"] + sys.argv[4:]))
"""


@pytest.mark.parametrize("force", [False, pytest.param(True, marks=pytest.mark.slow)])  # --force: the slow tier
def test_a_second_report_on_a_folder_in_use_stops_at_once_and_changes_nothing(tmp_path, monkeypatch, capsys, force):
    """Two `report` processes on one folder, the second with or without --force: the second stops at once, naming
    the first, and changes nothing; the first finishes its report whole."""
    out, go = tmp_path / "out", tmp_path / "go"
    fake_report(out, monkeypatch)
    pipeline.run_report("tiny", overrides={"output_dir": str(out)}, root=ROOT, echo=lambda *_: None)  # a finished one
    first = subprocess.Popen(
        [sys.executable, "-c", FIRST_REPORT, str(out), str(ROOT), str(go), "--force"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert next(line for line in first.stdout if "training task1" in line)
        before = snapshot(out)
        monkeypatch.chdir(ROOT)
        started = time.perf_counter()
        assert main(["report", "--data", "tiny", "--set", f"output_dir={out}"] + (["--force"] if force else [])) == 1
        assert time.perf_counter() - started < 10
        error = capsys.readouterr().err
        host = files.process_tag().rsplit("-", 1)[0]
        assert f"is being written by another report (PID {first.pid} on {host})" in error, error
        assert "Nothing was changed" in error and "Traceback" not in error
        assert snapshot(out) == before
        # processes that only train their own seeds may share the folder with each other, not with a whole report
        with pytest.raises(files.ReportBusy):
            pipeline.run_report(
                "tiny",
                only=["task2"],
                overrides={"output_dir": str(out), "seeds": [1]},
                root=ROOT,
                echo=lambda *_: None,
            )
    finally:
        go.touch()
        _, first_error = first.communicate(timeout=60)
    assert first.returncode == 0, first_error
    state = json.loads((out / "pipeline.json").read_text())
    assert all((out / f"{name}.html").exists() and name in state for name in CHAPTERS)  # nothing of the first lost
    with files.report_lock(out, shared=True), files.report_lock(out, shared=True):
        pass


# ----------------------------------------------------------------------------- 4. pack of an unfinished report


def test_pack_refuses_a_half_finished_report_unless_partial(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fake_report(out, monkeypatch)
    pipeline.run_report("tiny", overrides={"output_dir": str(out)}, root=ROOT, echo=lambda *_: None)
    (out / "task2.html").unlink()  # a chapter rerunning: its pages are removed until it finishes
    with pytest.raises(
        files.FileProblem,
        match=r"unfinished: its index links 1 file\(s\) that are not there "
        r"\(task2.html\).*--partial",
    ):
        handover.pack_report(out)
    assert not (tmp_path / "out-report.zip").exists()
    target, _, _, missing = handover.pack_report(out, partial=True)
    assert missing == ["task2.html"] and zipfile.is_zipfile(target)
    # a report writing the folder right now: refused too
    with files.report_lock(out), pytest.raises(files.ReportBusy, match="--partial"):
        handover.pack_report(out, tmp_path / "other.zip")


# ----------------------------------------------------------------------------- 5. a sentence, not a traceback


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_an_os_failure_while_writing_is_one_sentence(tmp_path, monkeypatch, capsys, code):
    out = tmp_path / "out"
    fake_report(out, monkeypatch)
    real = pipeline.write_json

    def failing(path, value):
        if Path(path).name == "pipeline.json" and "eda" in value:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, value)

    monkeypatch.setattr(pipeline, "write_json", failing)
    monkeypatch.chdir(ROOT)
    assert main(["report", "--data", "tiny", "--set", f"output_dir={out}"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Traceback" not in error, error
    assert error.startswith(f"error: cannot write {out / 'pipeline.json'}: {os.strerror(code)}; ")
    assert not list(out.glob(".*.tmp"))  # nothing half-written left behind


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    monkeypatch.chdir(ROOT)
    assert main(["report", "--data", "tiny", "--set", f"output_dir={blocker / 'out'}"]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and str(blocker) in error and "choose another path" in error
    assert blocker.read_text() == "mine"


def test_predict_and_pack_given_the_wrong_kind_of_path_say_so(trained_run, tiny_data, tmp_path, capsys):
    _, run_dir = trained_run
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(tiny_data.test.sources[0].image, images)
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert (
        main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--input", str(images), "--output", str(existing)])
        == 1
    )
    error = capsys.readouterr().err
    assert "--output" in error and "is a file, not a folder" in error and "Traceback" not in error
    assert existing.read_text() == "mine"


def test_adapt_refuses_a_negative_seed(trained_run, tiny_data, tmp_path, capsys):
    _, run_dir = trained_run
    assert (
        main(
            [
                "adapt",
                "--checkpoint",
                str(run_dir / "best.pt"),
                "--images",
                str(tiny_data.test.sources[0].image.parent),
                "--seed",
                "-1",
            ]
        )
        == 1
    )
    assert "--seed -1: a seed is an integer >= 0" in capsys.readouterr().err


def test_the_kernel_logs_nothing_on_an_interrupt_or_a_shutdown():
    assert "--IPKernelApp.log_level=CRITICAL" in pipeline.KERNEL_ARGUMENTS


# ----------------------------------------------------------------------------- 6. every setting checked first


@pytest.mark.parametrize(
    "item, message",
    [
        ("adapt_k=[0]", r"adapt_k must be a non-empty list of distinct integers >= 1"),
        ("adapt_k=[-3]", r"adapt_k must be a non-empty list of distinct integers >= 1"),
        ("adapt_seeds=[]", r"adapt_seeds must be a non-empty list"),
        ("runs=[task9]", r"unknown run 'task9'.*did you mean"),
    ],
)
def test_settings_that_would_fail_after_training_are_refused_before_any_work(item, message, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fake_report(out, monkeypatch)
    key, value = P.parse_override(item)
    with pytest.raises(P.ParameterError, match=message):
        pipeline.run_report("tiny", overrides={"output_dir": str(out), key: value}, root=ROOT, echo=lambda *_: None)
    assert not out.exists()


def test_a_gpu_asked_for_where_there_is_none_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    fake_report(out, monkeypatch)
    with pytest.raises(P.ParameterError, match=r"task1: device 'cuda' was asked for, but .* sees no CUDA GPU"):
        pipeline.run_report(
            "tiny", overrides={"output_dir": str(out), "device": "cuda"}, root=ROOT, echo=lambda *_: None
        )
    assert not out.exists()


def test_only_without_steps_and_a_data_dir_that_is_a_file_are_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fake_report(out, monkeypatch)
    monkeypatch.chdir(ROOT)
    assert main(["report", "--data", "tiny", "--force", "--only", "--set", f"output_dir={out}"]) == 1
    assert "--only needs the steps to run" in capsys.readouterr().err and not out.exists()
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"jpeg")
    with pytest.raises(P.ParameterError, match=r"data_dir .*photo.jpg is a file, not a folder"):
        P.resolve("eda", profile="tiny", overrides={"data_dir": str(photo)}, root=ROOT)


# ----------------------------------------------------------------------------- 7. unclear or silent


def test_a_checkpoint_folder_or_an_empty_file_is_named_in_words(trained_run, tiny_data, tmp_path, capsys):
    _, run_dir = trained_run
    folder = tiny_data.test.sources[0].image.parent
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(folder), "--output", str(tmp_path / "o")]) == 1
    error = capsys.readouterr().err
    assert "is a folder; give the checkpoint file in it, a best.pt" in error and "Delete" not in error
    empty = tmp_path / "best.pt"
    empty.touch()
    assert main(["predict", "--checkpoint", str(empty), "--input", str(folder), "--output", str(tmp_path / "o")]) == 1
    error = capsys.readouterr().err
    assert "it is empty (0 bytes" in error and "()" not in error and "Delete" not in error


def test_an_image_whose_name_looks_like_a_mask_is_read_and_what_is_left_out_is_named(
    trained_run, tiny_data, tmp_path, capsys
):
    _, run_dir = trained_run
    images = tmp_path / "images"
    images.mkdir()
    pair = tiny_data.test.sources[0]
    shutil.copy(pair.image, images / "arm_lesion.jpg")  # a photo named so, with no "arm" image: an image
    shutil.copy(pair.image, images / "a.jpg")
    shutil.copy(pair.mask, images / "a_lesion.png")  # a's mask
    (images / "notes.txt").write_text("mine")
    written = predict_folder(run_dir / "best.pt", images, tmp_path / "out")
    assert sorted(p.name for p in written) == ["a_Segmentation.png", "arm_lesion_Segmentation.png"]
    said = capsys.readouterr().out
    assert "left out 2 file(s)" in said and "a_lesion.png" in said and "notes.txt" in said


def test_a_very_large_image_is_one_line_not_pillows_warning(tmp_path, capsys, monkeypatch):
    from isic_utils.data import decoding

    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120,000 pixels: above the warning, below the limit
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own warning would fail the test
        decoding.read_image(path, 64)
    assert "big.png is 0.1 megapixels (400×300); it is read whole" in capsys.readouterr().err


def test_a_synthetic_other_clinic_is_made_inside_the_data_folder_it_was_given(tmp_path):
    from isic_utils.evaluation.external import external_sets

    values = P.resolve(
        "external", ROOT / "params" / "external.yaml", "tiny", {"data_dir": str(tmp_path / "photos" / "new")}, root=ROOT
    )
    roots = [s.root for s in external_sets(values) if s.synthetic]
    assert roots and all(tmp_path / "photos" / "new" in r.parents for r in roots)


# ----------------------------------------------------------------------------- 8. a finished seed is final


def test_a_seeds_checkpoint_is_final_when_the_seed_finishes(tiny_data, synthetic_root, tmp_path, monkeypatch):
    """Seed 0's best.pt holds its confidence rule before seed 1 starts: a copy taken then is the final file."""
    from isic_utils.training import experiments

    from .conftest import tiny_params

    params = tiny_params(tmp_path, synthetic_root, "task1", epochs=1, decoder="unet", seeds=[0, 1])
    seen = {}
    real = experiments.fit

    def fit(model, data, config, run_dir, **kwargs):
        if config.seed == 1:
            first = Path(run_dir).parent / "seed0"
            seen["best"] = (first / "best.pt").read_bytes()
            seen["result"] = (first / "result.json").exists()
        return real(model, data, config, run_dir, **kwargs)

    monkeypatch.setattr(experiments, "fit", fit)
    experiments.train_run(params, tiny_data, verbose=False)
    final = tmp_path / "out" / "task1" / "seed0" / "best.pt"
    assert seen["result"] and seen["best"] == final.read_bytes()
    assert "flag_below" in torch.load(final, weights_only=True)["meta"]["calibration"]
