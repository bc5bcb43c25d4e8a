"""Fault injection (the slow tier): a training process SIGKILLed at several points — mid-epoch, inside torch.save,
between the two checkpoint writes — then the same run asked again. The rerun must finish with exactly the
per-image scores of an uninterrupted run and leave no temporary file behind."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from isic_utils import experiments

from .conftest import ROOT, tiny_params

pytestmark = pytest.mark.slow

# The run as a chapter trains it, in a process that kills itself (SIGKILL: no cleanup, no finally) at one point.
KILLED_RUN = """
import os, signal, sys, torch
from pathlib import Path
from isic_utils import experiments, training
from isic_utils.params import resolve
root, out, data_dir, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
params = resolve("train", root / "params" / "task1.yaml", "tiny",
                 {"output_dir": out, "data_dir": data_dir, "epochs": 3, "decoder": "unet", "freeze_encoder": False,
                  "precision": "fp32"}, root=root)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_save, real_fit = training._save, training.fit
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
            training.torch.save = partial
        real_save(state, path)
    training._save = save
elif point == "between-writes":  # last.pt written, best.pt not yet
    def save(state, path):
        if path.name == "best.pt" and state["epoch"] == 1:  # the first epoch always improves
            die()
        real_save(state, path)
    training._save = save
experiments.train_run(params, experiments.prepare_data(params, progress=False), verbose=False)
"""


def _per_image(out: Path) -> str:
    return (out / "task1" / "tables" / "per_image_test_seed0.csv").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("straight") / "out"
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(ROOT), str(out), str(synthetic_root), "none"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return _per_image(out)


@pytest.mark.parametrize("point", ["mid-epoch", "inside-save", "between-writes"])
def test_a_run_killed_then_asked_again_ends_as_if_never_killed(uninterrupted, synthetic_root, tmp_path, point):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(ROOT), str(out), str(synthetic_root), point],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    seed_dir = out / "task1" / "seed0"
    assert not (out / "task1" / "tables" / "per_image_test_seed0.csv").exists()
    if point == "inside-save":
        assert list(seed_dir.glob(".last.pt.*.tmp"))  # the half-written copy a SIGKILL leaves
    params = tiny_params(tmp_path, synthetic_root, "task1", epochs=3, decoder="unet", freeze_encoder=False,
                         precision="fp32")
    experiments.train_run(params, experiments.prepare_data(params, progress=False), verbose=False)
    assert _per_image(out) == uninterrupted
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
