"""The README's commands, run as written (the slow tier), so that the README cannot drift from the code: every
command of its ``bash`` blocks, from a shell in a user's checkout after `make demo`, with the tiny profile in place of
the synthetic one (the same code path, in two minutes), a folder of labelled images for ``DIR``, and ``make`` checked
with ``make -n`` (the real-data targets would download or train for hours; their profiles must exist)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY_EPOCHS, report_copy
from .test_pipeline import _trained_files, broken_links

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_commands(text: str) -> list[str]:
    """Every command of the README's ``bash`` blocks, its trailing comment dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_the_readme_shows_its_two_commands_first_and_each_user_path():
    text = (ROOT / "README.md").read_text()
    assert readme_commands(text)[:2] == ["make report", "make test"]
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    for path in ("JupyterLab", "papermill", "Colab", "The command line", "Handing a report over"):
        assert path in headings, path
    assert len(text.splitlines()) <= 120
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, synthetic_root, built_report):
    """A user's checkout after `make demo`: the tiny report, the project's .venv, a folder DIR of labelled images."""
    root = report_copy(built_report, tmp_path_factory.mktemp("readme"))
    (root / ".venv").symlink_to(Path(sys.prefix))
    shutil.copy(ROOT / "Makefile", root)
    shutil.copy(ROOT / "pyproject.toml", root)
    shutil.copytree(ROOT / "web", root / "web", ignore=shutil.ignore_patterns("node_modules"))
    images = root / "DIR"
    images.mkdir()
    for path in sorted((synthetic_root / "ISBI2016_ISIC_Part1_Test_Data").glob("*.jpg")):
        shutil.copy(path, images)
        mask = synthetic_root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{path.stem}_Segmentation.png"
        shutil.copy(mask, images)
    return root


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` in a fresh bash in ``cwd``, with the environment a new terminal has (no test's PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_XDIST_WORKER")}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def as_run_here(command: str, checkout: Path) -> str:
    """What the test runs for a README command: the tiny profile for the synthetic one, ``DIR`` the labelled images
    (predict writes beside them into a fresh folder), ``make`` as a dry run, ``jupyter lab`` asked for its help."""
    command = command.replace("synthetic", "tiny")
    if command.startswith("make ") or re.match(r"^[A-Z_]+=\S+ make ", command):
        return re.sub(r"\bmake\b", "make -n", command, count=1)
    if command.startswith(".venv/bin/jupyter lab"):
        return command + " --help"
    if " predict " in command:
        command = command.replace("--output DIR", "--output predicted")
    if ".deploy.predictor " in command:
        command = command.replace("--output DIR", "--output predicted-onnx")
    return command


def test_every_readme_command_runs_as_written(checkout):
    commands = readme_commands((ROOT / "README.md").read_text())
    assert any(c.startswith(".venv/bin/papermill") for c in commands)
    ran = []
    trained = _trained_files(checkout / "outputs" / "tiny", "task2")
    for command in commands:
        done = shell(as_run_here(command, checkout), checkout)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
        ran.append(command)
        if " -p run task2" in command:  # the report's task 2 chapter: it continues the run, nothing retrained
            assert f"resuming after epoch {TINY_EPOCHS} of {TINY_EPOCHS}" in (checkout / "task2.ipynb").read_text()
            assert _trained_files(checkout / "outputs" / "tiny", "task2") == trained
        if "nbconvert --to html task2.ipynb" in command:  # the page beside the notebook: its gallery link opens
            page = checkout / "task2.html"  # ('task2/gallery.html' was relative to the report's folder)
            assert "gallery.html" in page.read_text() and broken_links(page) == []
        if command.startswith("make report DATA="):  # a real profile: the target and the profile both exist
            profile = re.search(r"DATA=(\S+)", command).group(1)
            assert (ROOT / "params" / "profiles" / f"{profile}.yaml").is_file(), profile
    assert (checkout / "task2.html").is_file() and (checkout / "outputs" / "tiny-report.zip").is_file()
    assert list((checkout / "predicted").glob("*_Segmentation.png"))
    assert list((checkout / "predicted-onnx").glob("*_Segmentation.png"))  # the exported int8 model, without torch
    assert list((checkout / "outputs" / "tiny" / "task3" / "seed0").glob("*adapted*"))
    assert "--allow-root" in shell(".venv/bin/jupyter lab --help-all", checkout).stdout
