"""Nothing of the user's is lost: synthetic generation writes only into a folder it owns, predict replaces no file
unless told to, extraction adds to a folder that exists instead of replacing it, and an archive that would expand
without end is refused."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from isic_utils.__main__ import main
from isic_utils.config import params as P
from isic_utils.data import sources
from isic_utils.data.sources import DataError, safe_extract
from isic_utils.data.synthetic import MARKER, make_synthetic_isic
from isic_utils.model import inference

from .conftest import ROOT, tiny_params, unet_model
from .test_download import NAMES, build_archives

# ----------------------------------------------------------------------------- synthetic generation


def test_synthetic_generation_never_writes_into_someone_elses_data(synthetic_root, tmp_path):
    """`make report SET='data_dir=/my/isic'` without DATA=isic2016: the real images there must survive."""
    mine = tmp_path / "my-isic"
    shutil.copytree(synthetic_root, mine)
    (mine / MARKER).unlink()  # a real copy: the same layout, no marker of ours
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"my-isic already holds files .*not write.*DATA=isic2016"):
        make_synthetic_isic(mine, n_train=4, n_test=2)
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_synthetic_generation_replaces_its_own_set_and_redoes_a_killed_one(tmp_path, monkeypatch):
    root = make_synthetic_isic(tmp_path / "syn", n_train=3, n_test=1)
    assert len(sources.find_pairs(root, "train")) == 3
    make_synthetic_isic(root, n_train=2, n_test=1)  # ours (marker): other settings replace it
    assert len(sources.find_pairs(root, "train")) == 2
    # killed half-way: files written, the marker still says incomplete; the next run redoes it instead of refusing
    from isic_utils.data import synthetic

    real = synthetic.make_lesion_image
    calls = []

    def dies_on_the_third(seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(seed)

    monkeypatch.setattr(synthetic, "make_lesion_image", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_isic(tmp_path / "killed", n_train=4, n_test=1)
    monkeypatch.undo()
    again = make_synthetic_isic(tmp_path / "killed", n_train=4, n_test=1)
    assert len(sources.find_pairs(again, "train")) == 4 and len(sources.find_pairs(again, "test")) == 1


# ----------------------------------------------------------------------------- predict


@pytest.fixture
def images(tiny_data, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for pair in tiny_data.test.sources[:2]:
        shutil.copy(pair.image, folder / pair.image.name)
    return folder


def test_predict_into_its_own_input_folder_keeps_the_ground_truth(trained_run, tiny_data, images, capsys):
    _, run_dir = trained_run
    truth = tiny_data.test.sources[0].mask
    shutil.copy(truth, images / truth.name)  # ground truth beside the images, as in the official layout
    kept = (images / truth.name).read_bytes()
    assert (
        main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--input", str(images), "--output", str(images)])
        == 1
    )
    error = capsys.readouterr().err
    assert truth.name in error and "--overwrite" in error and "kept" in error
    assert (images / truth.name).read_bytes() == kept
    assert sorted(p.name for p in images.iterdir()) == sorted(
        [truth.name] + [p.image.name for p in tiny_data.test.sources[:2]]
    )


def test_predict_again_replaces_only_with_overwrite(trained_run, images, tmp_path):
    _, run_dir = trained_run
    arguments = [
        "predict",
        "--checkpoint",
        str(run_dir / "best.pt"),
        "--input",
        str(images),
        "--output",
        str(tmp_path / "out"),
        "--overlays",
    ]
    assert main(arguments) == 0
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert len(stamps) == 5  # two masks, two overlays, confidence.csv
    assert main(arguments) == 1  # refused: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps
    first = {p: p.read_bytes() for p in stamps}
    changed = next(p for p in stamps if p.name.endswith("_Segmentation.png"))
    changed.write_bytes(b"edited by hand")  # a file that differs from what predict writes: replaced
    stamps[changed] = changed.stat().st_mtime_ns
    assert main(arguments + ["--overwrite"]) == 0
    assert {p: p.read_bytes() for p in stamps} == first
    # the same bytes again leave a file as it was (a rerun over a synced folder uploads nothing)
    assert {p for p, stamp in stamps.items() if p.stat().st_mtime_ns != stamp} == {changed}


def test_two_inputs_of_one_name_are_refused_before_any_mask(trained_run, images, tmp_path, capsys):
    _, run_dir = trained_run
    first = sorted(images.glob("*.jpg"))[0]
    Image.open(first).save(images / f"{first.stem}.png")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run_dir / "best.pt"),
                "--input",
                str(images),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 1
    )
    error = capsys.readouterr().err
    assert f"{first.name} and {first.stem}.png" in error or f"{first.stem}.png and {first.name}" in error
    assert not (tmp_path / "out").exists()


def test_a_file_given_as_input_is_a_clear_error(trained_run, images, tmp_path, capsys):
    _, run_dir = trained_run
    image = next(images.glob("*.jpg"))
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run_dir / "best.pt"),
                "--input",
                str(image),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 1
    )
    assert "is a file: point it at a folder of images" in capsys.readouterr().err


# ----------------------------------------------------------------------------- extraction


def test_extraction_adds_to_an_existing_folder_and_keeps_its_files(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    build_archives(archives)
    root = tmp_path / "isic"
    data_name, truth_name = NAMES["train"]
    (root / data_name).mkdir(parents=True)
    (root / data_name / "my_notes.txt").write_text("mine")
    (root / data_name / "ISIC_0000000.jpg").write_bytes(b"my own version")  # same name as a member: kept
    safe_extract(archives / f"{data_name}.zip", root)
    assert (root / data_name / "my_notes.txt").read_text() == "mine"
    assert (root / data_name / "ISIC_0000000.jpg").read_bytes() == b"my own version"
    assert (root / data_name / "ISIC_0000002.jpg").exists()  # the archive's other files were added
    assert not list(root.glob(".extracting-*"))


def test_an_archive_that_expands_without_end_is_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ISBI2016_ISIC_Part1_Training_Data/zeros.bin", b"\0" * (4 * 2**20))
    with pytest.raises(DataError, match=r"would expand to .* GiB"):
        safe_extract(bomb, tmp_path / "out", max_bytes=2**20)
    assert not (tmp_path / "out" / "ISBI2016_ISIC_Part1_Training_Data").exists()


# ----------------------------------------------------------------------------- checkpoints


def test_a_kill_between_the_two_checkpoint_writes_is_mended_on_resume(tiny_data, tmp_path, monkeypatch):
    """Killed after last.pt and before best.pt of an improving epoch: the history names an epoch best.pt does not
    hold. The resume writes best.pt from last.pt's weights, so best.pt and the history agree again."""
    from isic_utils.training import checkpoints
    from isic_utils.training import loop as training

    cfg = P.TrainConfig(
        freeze_encoder=False,
        epochs=2,
        batch_size=8,
        eval_batch_size=8,
        precision="fp32",
        decoder_lr=3e-3,
        augment=(),
        monitor_test=False,
    )

    straight = training.fit(unet_model(), tiny_data, cfg, tmp_path / "straight", verbose=False)
    assert straight.best_epoch == 2  # epoch 2 improves: its best.pt is the write that the kill loses
    real_save = checkpoints.save

    def killed_at_best(state, path):
        if path.name == "best.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt("killed between last.pt and best.pt")
        real_save(state, path)

    monkeypatch.setattr(checkpoints, "save", killed_at_best)
    with pytest.raises(KeyboardInterrupt):
        training.fit(unet_model(), tiny_data, cfg, tmp_path / "run", verbose=False)
    monkeypatch.undo()
    assert inference.load_checkpoint(tmp_path / "run" / "last.pt")["best_epoch"] == 2
    assert inference.load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 1  # behind the history
    resumed = training.fit(unet_model(), tiny_data, cfg, tmp_path / "run", verbose=False)
    best = inference.load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == resumed.best_epoch == 2
    expected = inference.load_checkpoint(tmp_path / "straight" / "best.pt")["model"]
    assert all(torch.equal(best["model"][k], expected[k]) for k in expected)
    assert torch.equal(resumed.test.counts, straight.test.counts)


def test_weights_broken_by_the_last_step_of_an_epoch_are_never_saved(tiny_data, tmp_path):
    from isic_utils.training import loop as training

    cfg = P.TrainConfig(
        freeze_encoder=False,
        epochs=2,
        batch_size=8,
        eval_batch_size=8,
        precision="fp32",
        augment=(),
        monitor_test=False,
    )
    model = unet_model()
    steps = len(tiny_data.train) // cfg.batch_size + bool(len(tiny_data.train) % cfg.batch_size)

    def break_after_last_step(epoch, step):  # runs before the step: the epoch's last step then trains on inf
        if epoch == 2 and step == steps - 1:
            with torch.no_grad():
                model.decoder.head.weight.fill_(float("inf"))

    with pytest.raises(training.TrainingDiverged, match=r"epoch 2: .*not finite.*before this epoch was saved"):
        training.fit(model, tiny_data, cfg, tmp_path / "run", on_step=break_after_last_step, verbose=False)
    for name in ("best.pt", "last.pt"):
        state = inference.load_checkpoint(tmp_path / "run" / name)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), name
    assert len(inference.load_checkpoint(tmp_path / "run" / "last.pt")["history"]) == 1


@pytest.mark.parametrize(
    "key, value",
    [
        ("decoder_lr", float("inf")),
        ("encoder_lr", float("nan")),
        ("weight_decay", -0.01),
        ("weight_decay", float("inf")),
    ],
)
def test_values_that_poison_a_run_are_refused_at_validation(key, value):
    from isic_utils.config import params as P

    with pytest.raises(P.ParameterError, match=rf"{key} must be a finite number"):
        P.resolve("train", profile="tiny", overrides={key: value}, root=ROOT)


# ----------------------------------------------------------------------------- another data folder


def test_a_run_refuses_to_resume_on_other_images_of_the_same_count(tiny_data, trained_run):
    from dataclasses import replace

    from isic_utils.training import loop as training
    from tests.conftest import TRAINED_CONFIG

    _, run_dir = trained_run
    renamed = replace(tiny_data.train, ids=[f"OTHER_{k}" for k in range(len(tiny_data.train))])
    other = replace(tiny_data, train=renamed)
    model = unet_model()
    with pytest.raises(inference.CheckpointMismatch, match="data_ids_sha256"):
        training.fit(model, other, TRAINED_CONFIG, run_dir, verbose=False)


def test_a_checkpoint_from_before_the_ids_fingerprint_still_resumes(tiny_data, trained_run, tmp_path):
    from isic_utils.training import loop as training
    from tests.conftest import TRAINED_CONFIG

    result, run_dir = trained_run
    shutil.copytree(run_dir, tmp_path / "old")
    state = inference.load_checkpoint(tmp_path / "old" / "last.pt")
    del state["fingerprint"]["data_ids_sha256"]  # as written by the previous version
    torch.save(state, tmp_path / "old" / "last.pt")
    model = unet_model()
    again = training.fit(model, tiny_data, TRAINED_CONFIG, tmp_path / "old", verbose=False)
    assert torch.equal(again.test.counts, result.test.counts)


def test_a_run_trained_before_an_augmentation_constant_was_tuned_is_neither_resumed_nor_merged(
    tiny_data, synthetic_root, tmp_path, monkeypatch
):
    """A run's parameters name its augmentations, not the constants they draw within (``COLOR_JITTER``,
    ``SHRINK_ON_SKIN``, ...): tuned in place, a seed trained before is refused on resume (saying which constants
    changed), and a seed trained after does not share the run's tables with it. A seed from before constants were
    recorded still resumes, its result as it was."""
    from isic_utils.data import augmentation
    from isic_utils.training import experiments

    def train(seed: int):
        params = tiny_params(tmp_path, synthetic_root, "task3", seeds=[seed], epochs=1)
        return experiments.train_run(params, tiny_data, verbose=False)

    train(1)
    run_dir = tmp_path / "out" / "task3"
    recorded = json.loads((run_dir / "run.json").read_text())["augmentation_constants"]
    assert recorded == augmentation.constants(["hflip", "rot90", "color_jitter", "zoom_out"])  # task 3's
    assert recorded["color_jitter"] == augmentation.COLOR_JITTER == 0.2
    monkeypatch.setattr(augmentation, "COLOR_JITTER", 0.3)
    before = (run_dir / "seed1" / "result.json").read_bytes()
    with pytest.raises(
        inference.CheckpointMismatch,
        match=r"augmentation_constants: \{'color_jitter': 0.2, .*\} → \{'color_jitter': 0.3, ",
    ):
        train(1)
    assert (run_dir / "seed1" / "result.json").read_bytes() == before and (run_dir / "seed1" / "best.pt").exists()
    train(0)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["seeds"] == [0] and record["augmentation_constants"] == {**recorded, "color_jitter": 0.3}
    # seed 1 as the version before recorded it: nothing to compare, so it resumes and its files stay as they were
    state = inference.load_checkpoint(run_dir / "seed1" / "last.pt")
    del state["fingerprint"]["augmentation_constants"]
    torch.save(state, run_dir / "seed1" / "last.pt")
    train(1)
    result = json.loads((run_dir / "seed1" / "result.json").read_text())
    assert "augmentation_constants" not in result
    assert json.loads((run_dir / "run.json").read_text())["seeds"] == [0, 1]


# ----------------------------------------------------------------------------- leftovers of killed processes


def test_leftovers_of_dead_processes_are_removed_and_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from isic_utils.base.files import process_tag, remove_leftovers

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead, live = finished.pid, os.getppid()
    folder = tmp_path / "run"
    (folder / "tables").mkdir(parents=True)
    host = process_tag().rpartition("-")[0]
    leftovers = [
        folder / f".last.pt.{host}-{dead}.ab12cd34.tmp",
        folder / f".task2.running-{host}-{dead}.ipynb",
        folder / "tables" / f".epochs.csv.{host}-{dead}.0a0b0c0d.tmp",
    ]
    kept = [
        folder / f".best.pt.{host}-{live}.ab12cd34.tmp",
        folder / f".task1.running-{host}-{live}.ipynb",
        folder / f".last.pt.othermachine-{dead}.ab12cd34.tmp",  # another machine sharing the folder: its own
        folder / "last.pt",
        folder / ".lock",
    ]
    for path in leftovers + kept:
        path.write_bytes(b"x")
    assert sorted(remove_leftovers(folder)) == sorted(leftovers[:2])
    assert not leftovers[0].exists() and not leftovers[1].exists() and leftovers[2].exists()  # not below
    assert remove_leftovers(folder, below=True) == [leftovers[2]]
    assert all(path.exists() for path in kept)


def test_a_run_killed_while_writing_a_checkpoint_leaves_nothing_behind_after_the_rerun(tiny_data, tmp_path):
    import subprocess
    import sys

    from isic_utils.base.files import process_tag
    from isic_utils.training import loop as training
    from tests.conftest import TRAINED_CONFIG

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = process_tag().rpartition("-")[0]
    (run_dir / f".last.pt.{host}-{finished.pid}.deadbeef.tmp").write_bytes(b"\0" * 1000)  # a SIGKILLed torch.save
    model = unet_model()
    training.fit(model, tiny_data, replace(TRAINED_CONFIG, epochs=1), run_dir, verbose=False)
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["best.pt", "last.pt"]
    assert not list(run_dir.glob("*.tmp"))


# ----------------------------------------------------------------------------- an interrupted --force


def test_an_interrupted_forced_chapter_runs_again_on_the_next_plain_report(monkeypatch, tmp_path):
    from isic_utils.report import pipeline

    seen, fail = [], {"task2"}

    def fake_chapter(step, values, out_dir, root, kernel=None, echo=print):
        seen.append(step.name)
        if step.name in fail:
            raise KeyboardInterrupt("killed")
        (out_dir / f"{step.name}.ipynb").write_text("{}")
        return 0.0

    monkeypatch.setattr(pipeline, "run_chapter", fake_chapter)
    monkeypatch.setattr(
        pipeline, "export_chapter", lambda step, out_dir: (out_dir / f"{step.name}.html").write_text("")
    )
    monkeypatch.setattr(pipeline, "write_index", lambda *a, **k: None)
    overrides = {"output_dir": str(tmp_path / "out")}
    fail.clear()
    pipeline.run_report("tiny", overrides=overrides, root=ROOT, echo=lambda *_: None)
    fail.add("task2")
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_report("tiny", force=True, only=["task2"], overrides=overrides, root=ROOT, echo=lambda *_: None)
    fail.clear()
    seen.clear()
    pipeline.run_report("tiny", overrides=overrides, root=ROOT, echo=lambda *_: None)
    assert seen == ["task2", "external", "compare"]  # not "up to date": the old notebook is not the run's any more


def test_a_retrained_seed_drops_its_old_results_before_training(tiny_data, synthetic_root, tmp_path, monkeypatch):
    from isic_utils.training import experiments

    from .conftest import tiny_params

    params = tiny_params(tmp_path, synthetic_root, "task1", epochs=1, decoder="unet")
    experiments.train_run(params, tiny_data, verbose=False)
    seed_dir = tmp_path / "out" / "task1" / "seed0"
    assert (seed_dir / "result.json").exists()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed in the retrain")

    from isic_utils.training import loop as training

    monkeypatch.setattr(training, "_fit", killed)  # the old results go under the seed's lock, before training
    with pytest.raises(KeyboardInterrupt):
        experiments.train_run({**params, "resume": False}, tiny_data, verbose=False)
    assert not any((seed_dir / name).exists() for name in experiments.SEED_RESULTS)


# ----------------------------------------------------------------------------- one process per run folder


def test_a_run_folder_in_training_refuses_a_second_process(tiny_data, tmp_path):
    import fcntl

    from isic_utils.base.files import FolderBusy
    from isic_utils.training import loop as training
    from tests.conftest import TRAINED_CONFIG

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a") as other:  # another process training this folder holds its lock
        fcntl.flock(other, fcntl.LOCK_EX)
        model = unet_model()
        with pytest.raises(FolderBusy, match=r"run is in use: another process is training this run"):
            training.fit(model, tiny_data, TRAINED_CONFIG, run_dir, verbose=False)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    # released: the same call trains
    training.fit(model, tiny_data, replace(TRAINED_CONFIG, epochs=1), run_dir, verbose=False)


def test_a_seed_listed_twice_is_refused_at_validation():
    from isic_utils.config import params as P

    with pytest.raises(P.ParameterError, match=r"seeds must not repeat .* got \[0, 0\]"):
        P.resolve("train", profile="tiny", overrides={"seeds": [0, 0], "jobs": 2}, root=ROOT)


def test_a_chapter_that_runs_through_removes_the_partial_notebook_of_its_failed_attempt(tmp_path, monkeypatch):
    import papermill

    from isic_utils.report import pipeline

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "eda.partial.ipynb"
    stale.write_text("{}")

    def executed(source, target, **kwargs):  # the chapter, run through
        Path(target).write_text(Path(source).read_text())

    monkeypatch.setattr(papermill, "execute_notebook", executed)
    step = pipeline.Step("eda", "eda", "eda.yaml")
    pipeline.run_chapter(step, {"profile": "tiny"}, out, root, None, lambda line: None)
    assert (out / "eda.ipynb").exists() and not stale.exists()
