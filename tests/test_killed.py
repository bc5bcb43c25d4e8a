"""Fault injection (the slow tier): a training process SIGKILLed at several points — mid-epoch, inside torch.save,
between the two checkpoint writes — then the same run asked again. The rerun must finish with exactly the
per-image scores of an uninterrupted run and leave no temporary file behind."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from isic_utils.training import experiments

from .conftest import ROOT, tiny_params

pytestmark = pytest.mark.slow

# The run as a chapter trains it, in a process that kills itself (SIGKILL: no cleanup, no finally) at one point.
KILLED_RUN = """
import os, signal, sys, torch
from pathlib import Path
from isic_utils.training import checkpoints
from isic_utils.training import experiments
from isic_utils.training import loop as training
from isic_utils.config.params import resolve
root, out, data_dir, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
params = resolve("train", root / "params" / "task1.yaml", "tiny",
                 {"output_dir": out, "data_dir": data_dir, "epochs": 3, "decoder": "unet", "freeze_encoder": False,
                  "precision": "fp32"}, root=root)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_save, real_fit = checkpoints.save, training.fit
if point == "mid-epoch":
    def fit(*args, **kwargs):
        kwargs["on_step"] = lambda epoch, step: die() if (epoch, step) == (2, 1) else None
        return real_fit(*args, **kwargs)
    experiments.fit = fit
elif point == "inside-save":  # torch.save has written part of last.pt's temporary copy
    def save(state, path):
        if path.name == "last.pt" and len(state["history"]) == 2:
            import torch as t
            original = t.save
            def partial(obj, f):
                Path(f).write_bytes(b"\\0" * 4096)
                die()
            checkpoints.torch.save = partial
        real_save(state, path)
    checkpoints.save = save
elif point == "between-writes":  # last.pt written, best.pt not yet
    def save(state, path):
        if path.name == "best.pt" and state["epoch"] == 1:  # the first epoch always improves
            die()
        real_save(state, path)
    checkpoints.save = save
experiments.train_run(params, experiments.prepare_data(params, progress=False), verbose=False)
"""


def _per_image(out: Path) -> str:
    return (out / "task1" / "tables" / "per_image_test_seed0.csv").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("straight") / "out"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(ROOT), str(out), str(synthetic_root), "none"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return _per_image(out)


@pytest.mark.parametrize("point", ["mid-epoch", "inside-save", "between-writes"])
def test_a_run_killed_then_asked_again_ends_as_if_never_killed(uninterrupted, synthetic_root, tmp_path, point):
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(ROOT), str(out), str(synthetic_root), point],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    seed_dir = out / "task1" / "seed0"
    assert not (out / "task1" / "tables" / "per_image_test_seed0.csv").exists()
    if point == "inside-save":
        assert list(seed_dir.glob(".last.pt.*.tmp"))  # the half-written copy a SIGKILL leaves
    params = tiny_params(
        tmp_path, synthetic_root, "task1", epochs=3, decoder="unet", freeze_encoder=False, precision="fp32"
    )
    experiments.train_run(params, experiments.prepare_data(params, progress=False), verbose=False)
    assert _per_image(out) == uninterrupted
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


KILLED_EXTRACTION = """
import os, signal, sys, zipfile
from isic_utils.data import sources
real, done = zipfile.ZipFile.extract, []
def extract(self, member, path=None, pwd=None):
    done.append(member)
    if len(done) == 3:  # part of the images are out
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, member, path, pwd)
zipfile.ZipFile.extract = extract
sources.download_release(sys.argv[1], splits=["train"], base_url="http://127.0.0.1:9/unused", expected_counts={"train": 3})
"""


def test_an_extraction_killed_then_asked_again_gives_the_whole_split(tmp_path):
    from isic_utils.data.sources import download_release, find_pairs

    from .test_download import build_archives

    root = tmp_path / "isic"
    root.mkdir()
    build_archives(root, counts={"train": 3})  # the archives are there: no download, only extraction
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXTRACTION, str(root)], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list(root.glob(".extracting-*"))  # what the kill left: a staging folder, no split folder
    assert not (root / "ISBI2016_ISIC_Part1_Training_Data").exists()
    download_release(root, splits=["train"], base_url="http://127.0.0.1:9/unused", expected_counts={"train": 3})
    assert len(find_pairs(root, "train")) == 3 and not list(root.glob(".extracting-*"))


KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
from isic_utils.base import files
from isic_utils.report import pipeline
def export_html(notebook_path, html_path, reader=False):
    tmp = html_path.parent / f".{html_path.name}.{files.process_tag()}.0badc0de.tmp"
    tmp.write_text("<html><body>half a pa")
    os.kill(os.getpid(), signal.SIGKILL)
pipeline.export_html = export_html
pipeline.run_report("tiny", only=["eda"], overrides={"output_dir": sys.argv[2]}, root=Path(sys.argv[1]),
                    echo=lambda *_: None)
"""


def test_an_export_killed_then_asked_again_is_exported_alone(tmp_path):
    from isic_utils.report import pipeline

    from .test_user_paths import fake_project

    root = fake_project(tmp_path, "print('the chapter ran')")
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, str(root), str(out)], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list(out.glob(".*.tmp")) and not (out / "eda.html").exists()
    stamp = (out / "eda.ipynb").stat().st_mtime_ns
    lines = []
    pipeline.run_report("tiny", only=["eda"], overrides={"output_dir": str(out)}, root=root, echo=lines.append)
    assert (out / "eda.ipynb").stat().st_mtime_ns == stamp and any("exported" in line for line in lines)
    assert "the chapter ran" in (out / "eda.html").read_text()
    assert not list(out.rglob("*.tmp"))


def test_ctrl_c_in_a_running_report_prints_one_line(tmp_path, synthetic_root):
    """Ctrl-C while a chapter trains: the terminal gets the command's one line and no kernel log or traceback (the
    kernel's "Exception in message handler … ZMQError" and asyncio's "Task exception was never retrieved" were
    printed before), exit status 130."""
    import os
    import time

    command = [
        sys.executable,
        "-m",
        "isic_utils",
        "report",
        "--data",
        "tiny",
        "--only",
        "task1",  # the chapter that trains first (the EDA before it takes 20 s and trains nothing)
        "--set",
        f"output_dir={tmp_path / 'out'}",
        f"data_dir={synthetic_root}",
    ]
    report = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a terminal's process group, which Ctrl-C signals whole
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in report.stdout:  # wait for the first epoch of task 1: its kernel is busy training
        if "task1 seed 0 epoch" in line:
            break
    time.sleep(1)
    os.killpg(report.pid, signal.SIGINT)
    _, error = report.communicate(timeout=120)
    assert report.returncode == 130
    assert error.strip() == (
        "interrupted: every finished epoch and chapter is kept: run the same command again to continue."
    ), error
