"""Shared fixtures, built once per session: the tiny synthetic data set in the official layout (the tiny profile's
own: 20 training and 6 test pairs), decoded small, one small trained checkpoint that predicts real masks, and (for
the slow tier) a user's checkout after `make demo`, built once for all the session's worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from isic_utils.config import params as P
from isic_utils.config.params import TrainConfig
from isic_utils.data.splits import load_report_data
from isic_utils.data.synthetic import make_synthetic_isic
from isic_utils.model.networks import build_model
from isic_utils.training.loop import fit

ROOT = Path(__file__).resolve().parents[1]
TINY_EPOCHS = yaml.safe_load((ROOT / "params" / "profiles" / "tiny.yaml").read_text())["epochs"]  # the report's runs

if os.environ.get("PYTEST_XDIST_WORKER"):  # tests in two worker processes on two cores: one compute thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # (two processes of two threads slow each other several times over), and
    torch.set_num_threads(1)  # the kernels and processes the tests start inherit it
SAMPLE_DIR = os.environ.get("ISIC_SAMPLE_DIR")
WEIGHTS = os.environ.get("ISIC_ENCODER_WEIGHTS")


BUILDS_THE_REPORT = "test_pipeline.py"  # the slow tier's longest file: its first test builds ``built_report``


def pytest_collection_modifyitems(items):
    """The order the two test processes take the whole suite's files in (``make test-all``: ``--dist loadfile
    --no-loadscope-reorder``; ``make test``'s fast tier keeps xdist's own order, most tests first, which measured
    faster there): the file that builds the slow tier's report first, the other files that need that report last (a
    process that reaches one of them while the report is being built waits for it), every other file between, the
    slow ones before the fast. Within a file, the order is the file's own."""

    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)

    def rank(file: list) -> int:
        if file[0].path.name == BUILDS_THE_REPORT:
            return 0
        if any("built_report" in item.fixturenames for item in file):
            return 3
        return 1 if any(item.get_closest_marker("slow") for item in file) else 2

    ranked = sorted(files.values(), key=rank)
    items[:] = [item for file in ranked for item in file]


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch, request):
    """Unit tests never depend on $ISIC_ENCODER_WEIGHTS unless they ask for it (real_data marker)."""
    if "real_data" not in request.keywords:
        monkeypatch.delenv("ISIC_ENCODER_WEIGHTS", raising=False)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The tiny profile's data set (``synthetic_train: 20``, ``synthetic_test: 6``, seed 0), made once: pass it as
    ``data_dir`` and the profile finds it already made instead of generating its own."""
    return make_synthetic_isic(tmp_path_factory.mktemp("synthetic"), n_train=20, n_test=6, seed=0)


@pytest.fixture(scope="session")
def tiny_data(synthetic_root, tmp_path_factory):
    return load_report_data(
        synthetic_root,
        image_size=64,
        val_fraction=0.2,
        seed=0,
        cache_dir=tmp_path_factory.mktemp("cache"),
        progress=False,
    )


def tiny_params(
    tmp_path: Path, synthetic_root: Path, run_file: str | None = "task1", chapter: str = "train", **overrides
) -> dict:
    """A chapter's parameters on the tiny profile, writing under ``tmp_path`` and reading the shared data set."""
    values = {"output_dir": str(tmp_path / "out"), "data_dir": str(synthetic_root), **overrides}
    run = ROOT / "params" / f"{run_file}.yaml" if run_file else None
    return P.resolve(chapter, run, "tiny", values, root=ROOT)


TRAINED_CONFIG = TrainConfig(
    freeze_encoder=False,
    epochs=3,
    batch_size=8,
    eval_batch_size=8,
    precision="fp32",
    seed=0,
    decoder_lr=3e-3,
    augment=(),
    loss="bce+dice",
    monitor_test=False,
)


def unet_model(seed: int = 0):
    """A fresh fine-tunable U-Net model, torch seeded first: with seed 0, the ``trained_run``'s starting weights."""
    torch.manual_seed(seed)
    return build_model(encoder_weights=None, freeze_encoder=False, decoder="unet")


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder all the session's worker processes see (the parent of their own temporary folders under xdist)."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    shared.mkdir(exist_ok=True)
    return shared


@contextlib.contextmanager
def locked(folder: Path):
    """Hold ``folder``'s lock: the first worker process to ask builds what the folder holds, the others wait."""
    import fcntl

    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """(FitResult, run folder) of a U-Net fine-tuned three epochs on the tiny data: unlike a frozen random encoder
    (whose masks are empty after a few epochs), its masks hold lesion and background in every test image, so what
    predict writes and what the scorers compute are real predictions. Trained once for the whole session (the first
    worker process to ask trains it, the other reads it). Read it, never write into it."""
    shared = shared_folder(tmp_path_factory, "trained-unet")
    saved = shared / "fit.pt"
    with locked(shared):
        if not saved.exists():
            torch.save(fit(unet_model(), tiny_data, TRAINED_CONFIG, shared / "run", verbose=False), saved)
    return torch.load(saved, weights_only=False), shared / "run"


def assert_same_counts(written: torch.Tensor, expected: torch.Tensor) -> None:
    """Confusion counts of masks written to files equal those the evaluation computed in memory. One image at a time
    (predict) and a batch (the evaluation) may sum a logit in another order, so a pixel sitting exactly at the
    threshold may flip: at most 1e-5 of an image's pixels, never more."""
    assert written.shape == expected.shape
    assert (written - expected).abs().max() <= 1e-5 * expected.sum(1).max(), (written - expected).abs().max()


def requires(variable: str):
    return pytest.mark.skipif(not os.environ.get(variable), reason=f"{variable} is not set")


# ----------------------------------------------------------------------------- a user's checkout with its report


def project_copy(base: Path, synthetic_root: Path) -> Path:
    """A user's checkout: the project's params and notebooks (the package is the installed one), with the tiny
    profile's data set already made where the profile looks for it."""
    root = base / "project"
    for folder in ("params", "notebooks"):
        shutil.copytree(ROOT / folder, root / folder)
    (root / "data").mkdir()
    (root / "data" / "synthetic-20-6").symlink_to(synthetic_root)  # where the tiny profile's data is made
    return root


@contextlib.contextmanager
def inside(folder: Path):
    """Run from ``folder``, as a user runs the command from the project's root."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


# The options study the built report's comparison shows: the base and one training option, the one that changes the
# image size (every option's own training is pinned in test_user_paths and test_external; the study's tables and page
# are the same code for one option as for five, and each option's three seeds cost the report's build 15 s).
STUDIED = ["256 px"]


@pytest.fixture(scope="session")
def built_report(tmp_path_factory, synthetic_root) -> tuple[Path, dict, list[str]]:
    """(checkout, chapter timings, the lines the report printed): `make demo` in a user's checkout under umask 022,
    after a task 3 options study (``STUDIED``; the comparison shows it). Built once for the whole session: the first worker
    process to ask builds it under a lock in the folder the workers share, the others wait for it and read it. Tests
    work on their own copy (``report_copy``), never on this one."""
    from isic_utils.evaluation.generalisation import options_study
    from isic_utils.report.pipeline import run_report

    shared = shared_folder(tmp_path_factory, "built-tiny-report")
    record = shared / "built.json"
    with locked(shared):
        if not record.exists():
            root, lines = project_copy(shared, synthetic_root), []
            old = os.umask(0o022)  # what most users have: their report must be readable by others
            try:
                with inside(root):
                    options_study("tiny", epochs=1, root=root, echo=lines.append, only=STUDIED)
                    timings = run_report("tiny", root=root, echo=lines.append)
            finally:
                os.umask(old)
            record.write_text(json.dumps({"timings": timings, "lines": lines}))
    built = json.loads(record.read_text())
    return shared / "project", built["timings"], built["lines"]


def report_copy(built: tuple[Path, dict, list[str]], base: Path) -> Path:
    """A checkout of one's own holding the built report (modes and links kept): every chapter up to date in it."""
    root = base / "project"
    shutil.copytree(built[0], root, symlinks=True)
    return root


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browser_or_skip(*also: tuple[str, bool, str]):
    """Playwright's ``sync_playwright`` driving Debian's chromium, when both are installed (and each of ``also``:
    (name, found, how to install it)); otherwise a skip, or in CI (``CI=true``, where .ci/run installs them) a
    failure."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    needed = [
        ("chromium", CHROMIUM, "apt-get install chromium"),
        ("playwright", sync_playwright, "pip install playwright"),
        *also,
    ]
    missing = [(name, hint) for name, found, hint in needed if not found]
    if missing:
        message = " and ".join(n for n, _ in missing) + " not installed (" + "; ".join(h for _, h in missing) + ")"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright
