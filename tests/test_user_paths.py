"""The paths users take (issue 10): JupyterLab reruns, typos in overrides, --force, a changed configuration,
files other users read, where the encoder weights came from, and failures that must say what to do.

Each test here failed on the code before the fix it pins.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from isic_utils.__main__ import main
from isic_utils.base import files
from isic_utils.config import notebook as N
from isic_utils.config import params as P
from isic_utils.config.params import TrainConfig
from isic_utils.data import augmentation, decoding, sources, transforms
from isic_utils.data import splits as D
from isic_utils.model.inference import CheckpointMismatch, load_checkpoint, load_trained, predicted_probabilities
from isic_utils.model.networks import build_model
from isic_utils.report import pipeline, plots
from isic_utils.report import tables as report
from isic_utils.scoring.metrics import original_size_counts
from isic_utils.training import experiments
from isic_utils.training.loop import Evaluation, evaluate, fit

from .conftest import TRAINED_CONFIG, tiny_params, unet_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**changes):
    base = dict(
        freeze_encoder=False, epochs=1, batch_size=8, eval_batch_size=8, precision="fp32", seed=0, monitor_test=False
    )
    return TrainConfig(**{**base, **changes})


def tiny_model(cfg, seed=123, decoder="report"):
    torch.manual_seed(seed)
    return build_model(encoder_weights=None, freeze_encoder=cfg.freeze_encoder, decoder=decoder, dropout=0.2)


# ----------------------------------------------------------------------------- 1. a notebook run twice


def test_parameters_survive_a_second_run_all_in_one_kernel():
    """After a first Run All the kernel holds params, out, dataset, ...: collecting them again must not fail."""
    parameters_cell = "# Parameters (papermill injects a cell after this one). Plain literals only.\nepochs = 2\n"
    injected = "# Parameters\nepochs = 3\nrun_name = 'task2'\n"
    namespace = {"In": ["", "import x", parameters_cell, injected, "params = ..."], "epochs": 3, "run_name": "task2"}
    first = N.from_notebook("train", namespace)
    namespace.update(params=first, out=Path("."), dataset=object(), n=6, sizes=pd.DataFrame())
    namespace["In"] += ["dataset = ...", parameters_cell, injected, "params = ..."]
    second = N.from_notebook("train", namespace)
    assert second == first and second["epochs"] == 3 and second["run_name"] == "task2"


def test_a_parameters_cell_cut_to_one_line_survives_a_second_run_all():
    """A user cut the parameters cell down to `profile = 'synthetic'`, its header gone: the first Run All worked, and
    the second failed with "unknown parameter 'curve'", since every plain variable of the kernel counted."""
    setup = "# Setup: makes isic_utils importable\nimport sys\n\nREPOSITORY = ''\n"
    chapter = "from isic_utils.config.notebook import from_notebook\n\nparams = from_notebook('train', globals())\n"
    cell = "profile = 'synthetic'\n"
    namespace = {"In": ["", cell, setup, chapter], "profile": "synthetic", "REPOSITORY": ""}
    first = N.from_notebook("train", namespace)
    namespace.update(params=first, curve=pd.DataFrame(), out=Path("."), n=6)  # what the chapter's cells define
    namespace["In"] += ["curve = plots.curve(run)\nn = 6\n", cell, setup, chapter]
    assert N.from_notebook("train", namespace) == first
    namespace["In"] += ["curve = plots.curve(run)\nn = 6\n", "profile = 'tiny'\nepoch = 1\n", setup, chapter]
    namespace.update(profile="tiny", epoch=1)
    with pytest.raises(P.ParameterError, match=r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"):
        N.from_notebook("train", namespace)  # a typo in that cell is still named


def test_a_typo_in_the_parameters_cell_is_still_reported():
    cell = "# Parameters (papermill injects a cell after this one). Plain literals only.\nepochs = 2\n"
    injected = "# Parameters\nseed = [0, 1]\n"
    namespace = {"In": ["", cell, injected], "epochs": 2, "seed": [0, 1], "params": {}, "out": Path(".")}
    with pytest.raises(P.ParameterError, match=r"unknown parameter 'seed' \(did you mean 'seeds'\?\)"):
        N.from_notebook("train", namespace)


# ----------------------------------------------------------------------------- 2. typos in overrides


def test_a_mistyped_override_stops_the_report_before_any_work(tmp_path):
    with pytest.raises(P.ParameterError, match=r"'seed' \(did you mean 'seeds'\?\)") as error:
        pipeline.run_report(
            "tiny", overrides={"output_dir": str(tmp_path / "out"), "seed": [0, 1, 2]}, root=ROOT, echo=lambda *_: None
        )
    assert "valid keys" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_the_command_line_names_the_close_match(capsys, tmp_path):
    code = main(["report", "--data", "tiny", "--set", "seed=[0]", f"output_dir={tmp_path / 'out'}"])
    assert code != 0
    assert "seeds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_parameters_fail_before_any_work(tmp_path):
    with pytest.raises(P.ParameterError, match="image_size must be a positive multiple of 32"):
        pipeline.run_report(
            "tiny", overrides={"output_dir": str(tmp_path / "out"), "image_size": 100}, root=ROOT, echo=lambda *_: None
        )
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. --force, resume, a changed run


def test_force_retrains_and_a_plain_rerun_does_not(monkeypatch, tmp_path):
    seen = []

    def fake_chapter(step, values, out_dir, root, kernel=None, echo=print):
        given = {k: v for k, v in values.items() if k not in P.SELECTORS}  # what the notebook resolves from them
        resolved = P.chapter_values(step.chapter, values["profile"], values.get("run"), given, root)
        seen.append((step.name, resolved.get("resume")))
        (out_dir / f"{step.name}.ipynb").write_text("{}")
        (out_dir / f"{step.name}.html").write_text("")
        return 0.0

    monkeypatch.setattr(pipeline, "run_chapter", fake_chapter)
    monkeypatch.setattr(pipeline, "export_chapter", lambda step, out_dir: None)
    monkeypatch.setattr(pipeline, "write_index", lambda *a, **k: None)
    overrides = {"output_dir": str(tmp_path / "out")}
    pipeline.run_report("tiny", overrides=overrides, root=ROOT, echo=lambda *_: None)
    assert dict(seen)["task1"] is True
    seen.clear()
    pipeline.run_report("tiny", force=True, overrides=overrides, root=ROOT, echo=lambda *_: None)
    assert dict(seen) == {
        "eda": None,
        "task1": False,
        "task2": False,
        "task3": False,
        "external": None,
        "compare": None,
    }
    seen.clear()
    pipeline.run_report("tiny", overrides=overrides, root=ROOT, echo=lambda *_: None)
    assert seen == []  # a forced run leaves the chapters up to date: resume is not part of their fingerprint
    pipeline.run_report("tiny", force=True, only=["task2"], overrides=overrides, root=ROOT, echo=lambda *_: None)
    seen.clear()
    pipeline.run_report("tiny", overrides=overrides, root=ROOT, echo=lambda *_: None)
    # task2 was retrained alone: the chapters that read the runs (external validation, comparison) are stale, nothing else
    assert seen == [("external", None), ("compare", None)]


def test_resume_false_retrains_from_scratch(tiny_data, tmp_path):
    cfg = tiny_config()
    first = fit(tiny_model(cfg, decoder="unet"), tiny_data, cfg, tmp_path / "run", verbose=False)
    changed = tiny_model(
        cfg, seed=5, decoder="unet"
    )  # another start: a retrained run must differ, a resumed one would not
    again = fit(changed, tiny_data, cfg, tmp_path / "run", resume=False, verbose=False)
    assert not again.history["train_loss"].equals(first.history["train_loss"])


def untouched(run_dir: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.iterdir()}


def test_a_changed_configuration_says_what_differs_and_what_to_do(tiny_data, trained_run):
    _, run_dir = trained_run
    before = untouched(run_dir)
    other = replace(TRAINED_CONFIG, decoder_lr=5e-4)
    with pytest.raises(CheckpointMismatch) as error:
        fit(unet_model(), tiny_data, other, run_dir, verbose=False)
    message = str(error.value)
    assert "decoder_lr: 0.003 → 0.0005" in message and "--force" in message and "resume" in message
    assert "another configuration" in message
    assert "encoder_lr" not in message  # only what differs
    assert untouched(run_dir) == before  # refused before anything was written


def test_fewer_epochs_than_trained_is_refused(tiny_data, trained_run):
    _, run_dir = trained_run
    before = untouched(run_dir)
    shorter = replace(TRAINED_CONFIG, epochs=1)
    with pytest.raises(CheckpointMismatch, match="3 epochs.*asks for 1"):
        fit(unet_model(), tiny_data, shorter, run_dir, verbose=False)
    assert untouched(run_dir) == before


def test_a_finished_run_asked_again_trains_nothing_and_scores_the_same(tiny_data, trained_run):
    result, run_dir = trained_run
    before = untouched(run_dir)
    steps = []
    again = fit(
        unet_model(), tiny_data, TRAINED_CONFIG, run_dir, verbose=False, on_step=lambda epoch, step: steps.append(epoch)
    )
    assert steps == [] and untouched(run_dir) == before
    assert torch.equal(again.test.counts, result.test.counts) and again.best_epoch == result.best_epoch


# ----------------------------------------------------------------------------- 4. every model and augmentation trains

ENCODER, DECODER = "encoder.", "decoder."
# A covering set: every pair of (frozen?, decoder), (frozen?, augmentation) and (decoder, augmentation) is trained once;
# the last two rows add the options study's augmentations (crop + rotation, strong colour, zoom-out, shrunk on skin).
STUDY_AUGMENT = ("scale_rotate", "color_strong", "zoom_out", "shrink_on_skin")
COVERING = [
    (True, "report", ()),
    (False, "unet", ()),
    (True, "unet", ("hflip", "vflip")),
    (False, "report", ("hflip", "vflip")),
    (True, "unet", ("hflip", "vflip", "rot90", "color_jitter", *STUDY_AUGMENT)),
    (False, "report", ("hflip", "vflip", "rot90", "color_jitter", *STUDY_AUGMENT)),
]


@pytest.mark.parametrize("freeze, decoder, augment", COVERING)
def test_every_model_and_augmentation_combination_trains(tiny_data, tmp_path, freeze, decoder, augment):
    cfg = tiny_config(
        freeze_encoder=freeze, augment=augment, loss="bce+dice" if decoder == "unet" else "bce", monitor_test=True
    )
    model = tiny_model(cfg, decoder=decoder)
    start = {name: tensor.clone() for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    result = fit(model, tiny_data, cfg, tmp_path / "run", verbose=False)
    row = result.history.iloc[0]
    assert len(result.history) == 1 and all(np.isfinite(row[c]) for c in ("train_loss", "val_loss", "test_loss"))
    # the feature cache serves a frozen encoder with flips at most; anything else encodes every batch
    assert result.used_feature_cache == (freeze and set(augment) <= {"hflip", "vflip"})
    moved = {
        name
        for name, tensor in load_checkpoint(tmp_path / "run" / "best.pt")["model"].items()
        if name in start and not torch.equal(tensor, start[name])
    }
    assert any(name.startswith(DECODER) for name in moved)
    encoder_moved = {name for name in moved if name.startswith(ENCODER)}
    if freeze:  # not a weight, not a BatchNorm statistic
        assert not encoder_moved, sorted(encoder_moved)[:3]
    else:
        assert any(name.endswith(".weight") for name in encoder_moved)
    # the checkpoint rebuilds this architecture and gives the test probabilities the run scored
    loaded, meta = load_trained(tmp_path / "run" / "best.pt")
    assert meta["decoder"] == decoder
    probabilities = predicted_probabilities(loaded, meta, tiny_data.test.images)
    assert torch.allclose(probabilities, result.test.probabilities, atol=1e-5)


def test_limits_too_small_to_split_are_refused_at_validation():
    with pytest.raises(P.ParameterError, match="limit"):
        P.resolve("train", profile="tiny", overrides={"limit": 2}, root=ROOT)


# ----------------------------------------------------------------------------- 5. files other users can read


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        files.write_text(tmp_path / "page.html", "<p>hi</p>")
        files.save_table(pd.DataFrame({"a": [1]}), tmp_path, "t")
        with files.atomic_path(tmp_path / "model.pt") as tmp:
            torch.save({"x": torch.zeros(1)}, tmp)
    finally:
        os.umask(old)
    for path in (
        tmp_path / "page.html",
        tmp_path / "tables" / "t.csv",
        tmp_path / "tables" / "t.md",
        tmp_path / "model.pt",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# ----------------------------------------------------------------------------- 6. where the weights came from


def test_the_encoder_weights_are_recorded_and_a_resume_with_others_is_refused(tiny_data, trained_run):
    _, run_dir = trained_run
    record = unet_model().encoder_weights
    assert record["source"] == "random initialisation" and len(record["sha256"]) == 64
    meta = load_checkpoint(run_dir / "best.pt")["meta"]
    assert meta["encoder_weights"] == record
    before = untouched(run_dir)
    other = unet_model(seed=2)  # another encoder (as when ImageNet weights appear after a fallback run)
    with pytest.raises(CheckpointMismatch, match="encoder weights"):
        fit(other, tiny_data, TRAINED_CONFIG, run_dir, verbose=False)
    assert untouched(run_dir) == before


def test_the_random_fallback_is_named_in_run_json(tiny_data, tmp_path, monkeypatch):
    params = P.resolve(
        "train",
        ROOT / "params" / "task1.yaml",
        "tiny",
        {"output_dir": str(tmp_path), "epochs": 1, "encoder_weights": "imagenet"},
        root=ROOT,
    )
    from isic_utils.model import networks as M

    def offline(*args, **kwargs):
        raise M.EncoderWeightsError("could not download the ImageNet weights (offline). Fix: ...")

    real = M.build_encoder
    monkeypatch.setattr(
        M,
        "build_encoder",
        lambda name="mobilenet_v2", weights="imagenet": offline() if weights == "imagenet" else real(name, weights),
    )
    experiments.train_run(params, tiny_data, verbose=False)
    info = json.loads((tmp_path / "task1" / "run.json").read_text())
    weights = info["encoder_weights"]["0"]
    assert weights["fallback"] is True and weights["source"] == "random initialisation"


@pytest.mark.parametrize("variable", ["ISIC_ENCODER_WEIGHTS", "ISIC_DATA_DIR"])
def test_a_chapter_is_stale_when_its_weights_or_data_point_elsewhere(monkeypatch, tmp_path, variable):
    values = P.resolve("train", ROOT / "params" / "task2.yaml", "isic2016", root=ROOT)
    monkeypatch.setenv(variable, str(tmp_path / "a"))
    source = ROOT / "notebooks" / "02_train.ipynb"
    first = pipeline._fingerprint(values, source, ROOT)
    monkeypatch.setenv(variable, str(tmp_path / "b"))
    assert pipeline._fingerprint(values, source, ROOT) != first
    assert pipeline._fingerprint({**values, "resume": False}, source, ROOT) == pipeline._fingerprint(
        values, source, ROOT
    )


def test_a_checkout_moved_whole_is_still_up_to_date(tmp_path):
    """The data folder inside the project counts by its place there: a copied or renamed checkout reruns nothing."""
    values = P.resolve("eda", ROOT / "params" / "eda.yaml", "tiny", root=ROOT)
    source = ROOT / "notebooks" / "01_eda.ipynb"
    here, there = tmp_path / "here", tmp_path / "there"
    for root in (here, there):
        (root / "params" / "profiles").mkdir(parents=True)
    keys = []
    for root in (here, there):
        os.environ[files.PROJECT_ENV] = str(root)
        try:
            keys.append(pipeline._fingerprint(values, source, root))
        finally:
            del os.environ[files.PROJECT_ENV]
    assert keys[0] == keys[1]
    assert pipeline._fingerprint({**values, "data_dir": str(tmp_path / "elsewhere")}, source, here) != keys[0]


def test_random_encoders_are_allowed_only_by_the_synthetic_profiles():
    assert P.defaults("train")["allow_random_encoder"] is False
    for profile, allowed in (("synthetic", True), ("tiny", True), ("isic2016", False), ("isic2016_holdout", False)):
        values = P.resolve("train", ROOT / "params" / "task2.yaml", profile, root=ROOT)
        assert values["allow_random_encoder"] is allowed, profile


# ----------------------------------------------------------------------------- 8. failures that say what to do


def test_a_corrupt_decode_cache_is_rebuilt_with_a_warning(synthetic_root, tmp_path):
    pairs = sources.find_pairs(synthetic_root, "train")[:4]
    first = decoding.decode_pairs(pairs, 32, tmp_path / "cache", progress=False)
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    cache_file.write_bytes(b"\x80\x02 not a torch file")
    with pytest.warns(UserWarning, match="decode cache .* unreadable"):
        again = decoding.decode_pairs(pairs, 32, tmp_path / "cache", progress=False)
    assert torch.equal(again.images, first.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoding.decode_pairs(pairs, 32, tmp_path / "cache", progress=False)  # rewritten: read back quietly


def test_user_supplied_data_with_other_counts_is_named(tmp_path):
    from tests.test_data import make_root, write_pair

    root = make_root(tmp_path, count=5)
    test_images, test_masks = sources.SPLIT_FOLDERS["test"]
    (root / test_images).mkdir()
    (root / test_masks).mkdir()
    for k in range(2):
        write_pair(root, f"ISIC_{k + 900:07d}")
        for suffix, folder in ((".jpg", test_images), ("_Segmentation.png", test_masks)):
            source = root / sources.SPLIT_FOLDERS["train"][0 if suffix == ".jpg" else 1] / f"ISIC_{k + 900:07d}{suffix}"
            source.rename(root / folder / source.name)
    with pytest.warns(UserWarning, match=r"5 training pairs \(ISIC 2016 has 900\), 2 test pairs \(ISIC 2016 has 379\)"):
        D.load_report_data(root, 32, expected_counts=sources.OFFICIAL_COUNTS, progress=False)


def fake_project(tmp_path: Path, source: str) -> Path:
    """A project root with the real params and an EDA chapter of one code cell: the pipeline's own handling of a
    chapter (papermill, failures, export, index) in a second or two, without the real chapter's work."""
    import shutil

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    root = tmp_path / "project"
    shutil.copytree(ROOT / "params", root / "params")
    (root / "notebooks").mkdir()
    nbformat.write(
        new_notebook(
            cells=[new_code_cell(source)],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        ),
        root / "notebooks" / "01_eda.ipynb",
    )
    return root


def test_a_killed_kernel_is_named_as_such(tmp_path):
    root = fake_project(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(pipeline.ChapterFailed, match=r"kernel died.*out of memory.*partly executed notebook"):
        pipeline.run_report(
            "tiny", only=["eda"], overrides={"output_dir": str(tmp_path / "out")}, root=root, echo=lambda *_: None
        )


def test_a_failing_chapter_names_notebook_and_cell_and_keeps_the_partial_notebook(tmp_path):
    root = fake_project(tmp_path, "print('before')\nraise ValueError('no lesions in this folder')")
    with pytest.raises(
        pipeline.ChapterFailed,
        match=r"(?s)01_eda\.ipynb \(eda\) failed in cell 2 with ValueError: "
        r"no lesions in this folder.*partly executed notebook is kept",
    ):
        # cell 1 is the parameters cell papermill injects
        pipeline.run_report(
            "tiny", only=["eda"], overrides={"output_dir": str(tmp_path / "out")}, root=root, echo=lambda *_: None
        )
    partial = json.loads((tmp_path / "out" / "eda.partial.ipynb").read_text())
    assert "before" in json.dumps(partial["cells"][-1]["outputs"])  # what ran is kept, with its output
    assert not (tmp_path / "out" / "eda.ipynb").exists() and not list((tmp_path / "out").glob(".eda.running-*"))


def test_a_failed_html_export_keeps_the_notebook_and_is_redone_alone(tmp_path, monkeypatch):
    def no_export(*args, **kwargs):
        raise RuntimeError("pandoc exploded")

    root = fake_project(tmp_path, "print('the chapter ran')")
    overrides = {"output_dir": str(tmp_path / "out")}
    monkeypatch.setattr(pipeline, "export_html", no_export)
    with pytest.raises(pipeline.ChapterFailed, match=r"eda\.ipynb.*HTML.*pandoc exploded"):
        pipeline.run_report("tiny", only=["eda"], overrides=overrides, root=root, echo=lambda *_: None)
    notebook = tmp_path / "out" / "eda.ipynb"
    stamp = notebook.stat().st_mtime_ns
    monkeypatch.undo()
    lines = []
    pipeline.run_report("tiny", only=["eda"], overrides=overrides, root=root, echo=lines.append)
    assert notebook.stat().st_mtime_ns == stamp  # not executed again
    assert "the chapter ran" in (tmp_path / "out" / "eda.html").read_text()
    assert any("exported" in line for line in lines)


# ----------------------------------------------------------------------------- 9. numbers exactly as computed


class ConstantLogit(torch.nn.Module):
    """A stand-in model whose every pixel has probability sigmoid(logit)."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit, self.spec = logit, build_model(encoder_weights=None).spec
        self.decoder = torch.nn.Identity()

    def forward(self, x):
        return torch.full((len(x), 1, *x.shape[-2:]), self.logit)


def test_probabilities_just_above_one_half_stay_foreground(tiny_data):
    model = ConstantLogit(4e-4)  # p = 0.5001, which fp16 rounds to 0.5
    result = evaluate(model, tiny_data.test, tiny_config(), "fp32", keep_probabilities=True)
    assert result.probabilities.dtype == torch.float32 and (result.probabilities > 0.5).all()
    assert result.probabilities.is_inference()  # evaluated under inference_mode: no autograd bookkeeping
    counts = original_size_counts(result.probabilities, tiny_data.test)
    assert (counts[:, 0] + counts[:, 1] > 0).all() and (counts[:, 2] + counts[:, 3] == 0).all()  # all foreground


def test_the_summary_labels_test_numbers_over_epochs_as_monitoring():
    history = pd.DataFrame(
        {
            "epoch": [1, 2],
            "train_loss": [1, 0.5],
            "val_loss": [1, 0.6],
            "test_loss": [1, 0.7],
            "val_iou_mean": [0.2, 0.3],
            "test_iou_mean": [0.4, 0.1],
            "val_dice_mean": [0.3, 0.4],
            "test_dice_mean": [0.5, 0.2],
            "val_accuracy_mean": [0.8, 0.9],
            "test_accuracy_mean": [0.7, 0.6],
        }
    )
    table = report.summary_table(history, {"iou_mean": 0.3}, {"iou_mean": 0.1}, 2)
    over_epochs = table[table["row"].str.contains("over epochs")]
    assert set(over_epochs["split"]) == {"validation", "test"}
    assert all(over_epochs["row"].str.contains(r"\[monitor\]") == (over_epochs["split"] == "test"))


PARALLEL_SEED = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from isic_utils.training import experiments
from isic_utils.data.splits import load_report_data
from isic_utils.config.params import resolve
root, out, data_root, seed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
params = resolve("train", root / "params" / "task2.yaml", "tiny",
                 {"output_dir": out, "seeds": [seed], "epochs": 1, "decoder": "unet"}, root=root)
data = load_report_data(data_root, 64, progress=False)
experiments.train_run(params, data, verbose=False)
"""


@pytest.mark.slow
def test_seeds_trained_in_parallel_processes_keep_each_others_results(synthetic_root, tmp_path):
    out = tmp_path / "out"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", PARALLEL_SEED, str(ROOT), str(out), str(synthetic_root), str(seed)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for seed in (0, 1)
    ]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()[-2000:]
    seeds = pd.read_csv(out / "task2" / "tables" / "seeds.csv")
    assert sorted(seeds["seed"]) == [0, 1]
    assert json.loads((out / "task2" / "run.json").read_text())["seeds"] == [0, 1]
    assert experiments.load_run(out, "task2").seeds["seed"].tolist() == [0, 1]


def test_a_seed_trained_by_another_call_joins_the_runs_tables(tiny_data, synthetic_root, tmp_path):
    """What separate processes do, one after the other: each writes its own seed, the run's tables hold both."""
    for seed in (1, 0):
        params = tiny_params(tmp_path, synthetic_root, "task1", seeds=[seed], epochs=1, decoder="unet")
        experiments.train_run(params, tiny_data, verbose=False)
    out = tmp_path / "out"
    assert pd.read_csv(out / "task1" / "tables" / "seeds.csv")["seed"].tolist() == [0, 1]
    assert json.loads((out / "task1" / "run.json").read_text())["seeds"] == [0, 1]
    assert set(experiments.load_run(out, "task1").per_image) == {0, 1}


# ----------------------------------------------------------------------------- 10. one augmentation


def test_figure_3_shows_the_augmentation_training_applies(tiny_data, monkeypatch):
    calls = []
    real = augmentation.apply_augmentation
    monkeypatch.setattr(augmentation, "apply_augmentation", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    plots.augmentation_examples(tiny_data.train.images[:2], tiny_data.train.masks[:2])
    assert any("jitter" in draws for draws in calls) and any("hflip" in draws for draws in calls)
    assert not hasattr(transforms, "joint_transform") and not hasattr(
        transforms, "apply_augmentation"
    )  # no second implementation left


# ----------------------------------------------------------------------------- 11. tests that can fail


def test_selection_follows_validation_even_when_test_disagrees(tiny_data, tmp_path, monkeypatch):
    from isic_utils.training import loop as training

    val_scores, test_scores = iter([0.2, 0.8, 0.5, 0.8]), iter([0.9, 0.1, 0.95, 0.1])

    def scripted(model, split, config, precision, features=None, keep_probabilities=False, tta="none"):
        iou = next(val_scores if split is tiny_data.val else test_scores)
        size = split.masks[0].numel()
        tp = int(iou * size)
        counts = torch.tensor([[tp, size - tp, 0, 0]] * len(split))
        probabilities = torch.zeros(len(split), 1, 64, 64) if keep_probabilities else None
        return Evaluation(1.0 - iou, counts, probabilities)

    monkeypatch.setattr(training, "evaluate", scripted)
    cfg = tiny_config(epochs=3, monitor_test=True)
    result = fit(tiny_model(cfg, decoder="unet"), tiny_data, cfg, tmp_path / "run", verbose=False)
    assert result.best_epoch == 2  # the validation maximum; the test maximum was epoch 3
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2


def test_a_file_edited_in_place_is_decoded_again(tmp_path):
    """Same name, same byte size, other pixels: the cache must not serve the old decode."""
    from tests.test_data import make_root

    root = make_root(tmp_path)
    pairs = sources.find_pairs(root, "train")
    path = pairs[0].mask
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(path, format="PNG", compress_level=0)
    before = decoding.decode_pairs(pairs, 32, tmp_path / "cache", progress=False)
    size = path.stat().st_size
    Image.fromarray(np.full((30, 40), 255, np.uint8)).save(path, format="PNG", compress_level=0)
    assert path.stat().st_size == size
    after = decoding.decode_pairs(pairs, 32, tmp_path / "cache", progress=False)
    assert before.masks[0].sum() == 0 and after.masks[0].all()


def test_progress_reaches_the_terminal_and_the_notebook_keeps_one_line(tmp_path):
    """While a chapter decodes (downloads, extracts), its bar is relayed to the terminal under `report`; the notebook
    and its page get one line for the stage, no bar fragments (tqdm wrote nothing there, so `make report` was silent
    for the minutes real data takes to decode)."""
    root = fake_project(
        tmp_path,
        "import time\nfrom isic_utils.base.files import progress_bar\n"
        "for _ in progress_bar(range(10), total=10, desc='decode', unit='images'):\n"
        "    time.sleep(0.4)",
    )
    lines = []
    pipeline.run_report(
        "tiny", only=["eda"], overrides={"output_dir": str(tmp_path / "out")}, root=root, echo=lines.append
    )
    bars = [line for line in lines if line.startswith("  eda | decode:") and "%|" in line]
    assert bars and all("/10 [" in line for line in bars), lines
    assert "  eda | decode: 10 images in" in "\n".join(lines)
    notebook = json.loads((tmp_path / "out" / "eda.ipynb").read_text())
    streams = "".join("".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", []))
    assert streams.startswith("decode: 10 images in") and streams.count("\n") == 1 and "%|" not in streams
    assert not list((tmp_path / "out").glob(".*relay*")) and pipeline.PROGRESS_ENV not in os.environ


def test_editing_a_chapters_notebook_reruns_that_chapter_and_running_it_does_not(tmp_path):
    """The notebook is the source a user edits: an edited cell used to print "up to date, skipped". Outputs and
    execution counts saved by a by-hand run are not edits."""
    import nbformat

    root = fake_project(tmp_path, "print('first version')")
    overrides = {"output_dir": str(tmp_path / "out")}

    def report() -> list[str]:
        lines = []
        pipeline.run_report("tiny", only=["eda"], overrides=overrides, root=root, echo=lines.append)
        return lines

    assert any("eda      running" in line for line in report())
    assert any("eda      up to date, skipped" in line for line in report())
    path = root / "notebooks" / "01_eda.ipynb"
    notebook = nbformat.read(path, as_version=4)
    notebook.cells[0].outputs = [nbformat.v4.new_output("stream", text="first version\n")]
    notebook.cells[0].execution_count = 7
    nbformat.write(notebook, path)
    assert any("eda      up to date, skipped" in line for line in report())
    notebook.cells[0].source = "print('second version')"
    nbformat.write(notebook, path)
    assert any("eda      running" in line for line in report())
    assert "second version" in (tmp_path / "out" / "eda.ipynb").read_text()
