"""A chapter's first Run All in a fresh kernel where the package is not installed (the slow tier): opened from a
checkout's notebooks/ folder in JupyterLab, and in a simulated Colab runtime (a stand-in ``google.colab`` module, the
project on a stand-in Drive, an empty working folder), twice — the second time a reconnected runtime that finds the
run on Drive and resumes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import TINY_EPOCHS, project_copy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Imported by every Python started with PYTHONPATH naming its folder: the package's editable install is taken away,
# as in a kernel whose environment never installed the project.
HIDE_PACKAGE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "isic_utils" not in getattr(f, "__module__", "")]
"""
COLAB = {
    "__init__.py": "",
    "drive.py": """from pathlib import Path
def mount(mountpoint, **_):
    (Path(mountpoint) / "MyDrive").mkdir(parents=True, exist_ok=True)
    (Path(mountpoint) / "mounted").write_text("yes")
""",
}


@pytest.fixture
def no_package(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_PACKAGE)
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def run_all(notebook_path: Path, cwd: Path, selectors: str) -> nbformat.NotebookNode:
    """Every cell of the committed chapter in order in a new kernel started in ``cwd``, its selector lines set."""
    notebook = nbformat.read(notebook_path, as_version=4)
    cell = notebook.cells[1]
    cell.source = (
        "\n".join(line for line in cell.source.splitlines() if not line.startswith(("profile =", "run =")))
        + "\n"
        + selectors
    )
    notebook.cells.append(nbformat.v4.new_code_cell("import isic_utils; print('package from', isic_utils.__file__)"))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return notebook


def printed(notebook) -> str:
    return json.dumps([o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])])


def test_first_run_all_without_the_package_installed(tmp_path, no_package, synthetic_root):
    """The setup cell used to `pip install -e` the checkout, after which `import isic_utils` failed until the kernel
    was restarted (an editable install is seen only by new processes)."""
    root = project_copy(tmp_path, synthetic_root)
    shutil.copytree(ROOT / "isic_utils", root / "isic_utils")
    executed = run_all(root / "notebooks" / "01_eda.ipynb", root / "notebooks", "profile = 'tiny'")
    assert f"package from {root / 'isic_utils' / '__init__.py'}" in printed(executed)
    assert (root / "outputs" / "tiny" / "eda" / "tables" / "counts.csv").is_file()


# A Colab runtime, simulated: the package is not installed and papermill not yet (as in Colab), until `%pip install -e
# ROOT` (a stand-in pip on the path) records ROOT; from then on every new process (a restarted kernel, the chapters'
# kernels) imports isic_utils from ROOT and finds papermill, as after a real editable install. A new runtime (after a
# disconnect) forgets the install, not Drive.
COLAB_RUNTIME = """import os, pathlib, sys
from importlib.machinery import PathFinder
_installed = pathlib.Path(os.environ["SIMULATED_INSTALL"])
class _NotInstalledYet:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "papermill" and not _installed.exists():
            return None
        return PathFinder.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(PathFinder, attribute)
sys.meta_path[:] = [_NotInstalledYet() if f is PathFinder else f for f in sys.meta_path
                    if "isic_utils" not in getattr(f, "__module__", "")]
if _installed.exists():
    sys.path.append(_installed.read_text())
"""
STAND_IN_PIP = """import os, pathlib, sys
arguments = sys.argv[1:]
assert arguments[:1] == ["install"] and "-e" in arguments, arguments
pathlib.Path(os.environ["SIMULATED_INSTALL"]).write_text(arguments[arguments.index("-e") + 1])
print("Successfully installed isic_utils (stand-in); Colab asks: restart the session")
"""


@pytest.fixture
def colab(tmp_path, monkeypatch, synthetic_root):
    """(the runtime's /content, the project on Drive, the install record): the project uploaded to Drive, nothing
    installed, a lone chapter file opened from GitHub in /content."""
    site = tmp_path / "site"
    for name, text in {
        "sitecustomize.py": COLAB_RUNTIME,
        "pip/__init__.py": "",
        "pip/__main__.py": STAND_IN_PIP,
        **{f"google/colab/{k}": v for k, v in COLAB.items()},
    }.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(site))
    installed = tmp_path / "installed-from"
    monkeypatch.setenv("SIMULATED_INSTALL", str(installed))
    drive = tmp_path / "drive"
    monkeypatch.setenv("ISIC_DRIVE", str(drive))
    project = project_copy(drive / "MyDrive", synthetic_root)
    project = project.rename(drive / "MyDrive" / "isic-segmentation")
    shutil.copytree(ROOT / "isic_utils", project / "isic_utils")
    shutil.copy(ROOT / "pyproject.toml", project)
    content = tmp_path / "content"
    content.mkdir()
    for name in ("02_train.ipynb", "run_in_colab.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, content)
    return content, project, installed


def test_colab_first_run_restart_session_and_a_new_runtime(colab):
    """Colab as a sequence. First run: Drive mounted, the package installed from the project there, the run trained on
    Drive. Restart session (what Colab asks for after the install): the package is now importable, and the chapter
    must still work in the project's folder (it used to skip its setup and fail: "unknown run 'task1' (no
    /content/params/task1.yaml)"). A new runtime after a disconnect: installed again, the run resumed."""
    content, project, installed = colab
    drive = project.parents[1]
    selectors = "profile = 'tiny'\nrun = 'task1'"

    first = run_all(content / "02_train.ipynb", content, selectors)
    assert (drive / "mounted").read_text() == "yes" and installed.read_text() == str(project)
    assert "Successfully installed isic_utils" in printed(first)
    assert f"package from {project / 'isic_utils' / '__init__.py'}" in printed(first)
    best = project / "outputs" / "tiny" / "task1" / "seed0" / "best.pt"
    assert best.is_file() and f"epoch  {TINY_EPOCHS}/{TINY_EPOCHS}" in printed(first)
    written = best.stat().st_mtime_ns
    assert not (content / "outputs").exists() and not (content / "data").exists()  # nothing left on the runtime

    (drive / "mounted").unlink()
    restarted = run_all(content / "02_train.ipynb", content, selectors)
    assert "Successfully installed" not in printed(restarted) and not (drive / "mounted").exists()  # nothing redone
    assert (
        f"resuming after epoch {TINY_EPOCHS} of {TINY_EPOCHS}" in printed(restarted)
        and best.stat().st_mtime_ns == written
    )

    installed.unlink()  # a new runtime: the install is gone, Drive is not
    again = run_all(content / "02_train.ipynb", content, selectors)
    assert (drive / "mounted").read_text() == "yes" and "Successfully installed isic_utils" in printed(again)
    assert (
        f"resuming after epoch {TINY_EPOCHS} of {TINY_EPOCHS}" in printed(again) and best.stat().st_mtime_ns == written
    )


def test_run_in_colab_finishes_the_report_after_a_restart(colab, built_report):
    """run_in_colab.ipynb in the simulated runtime, after the install and a Restart session, on the Drive an earlier
    session filled (every chapter but the comparison finished; the slow tier's one build of the tiny report): the
    finished chapters are kept, the comparison runs in Colab's kernel, the report is packed on Drive and the index
    shown inline."""
    content, project, installed = colab
    installed.write_text(str(project))  # installed by an earlier run, then the session restarted
    out = project / "outputs" / "tiny"
    shutil.copytree(built_report[0] / "outputs" / "tiny", out, symlinks=True)
    state = json.loads((out / "pipeline.json").read_text())
    del state["compare"]  # the session ended while the comparison ran
    (out / "pipeline.json").write_text(json.dumps(state))
    kept = (out / "task1.html").stat().st_mtime_ns
    executed = run_all(content / "run_in_colab.ipynb", content, "profile = 'tiny'")
    said = printed(executed)
    assert "compare  running" in said and "task1    up to date, skipped" in said, said
    assert (out / "task1.html").stat().st_mtime_ns == kept and (out / "compare.html").is_file()
    assert "report is in" in said and not (content / "outputs").exists()
    assert (project / "outputs" / "tiny-report.zip").is_file()
