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

from .test_pipeline import project_copy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Imported by every Python started with PYTHONPATH naming its folder: the package's editable install is taken away,
# as in a kernel whose environment never installed the project.
HIDE_PACKAGE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "isic_utils" not in getattr(f, "__module__", "")]
"""
COLAB = {"__init__.py": "", "drive.py": """from pathlib import Path
def mount(mountpoint, **_):
    (Path(mountpoint) / "MyDrive").mkdir(parents=True, exist_ok=True)
    (Path(mountpoint) / "mounted").write_text("yes")
"""}


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
    cell.source = "\n".join(line for line in cell.source.splitlines()
                            if not line.startswith(("profile =", "run ="))) + "\n" + selectors
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


def test_colab_runtime_with_the_project_on_drive_and_a_reconnect(tmp_path, no_package, synthetic_root, monkeypatch):
    """Colab: nothing installed, the working folder /content empty, the project uploaded to Drive. The chapter mounts
    Drive, works in the project's folder there, trains; a reconnected runtime (a new kernel) resumes the run on Drive
    and trains nothing."""
    for name, text in COLAB.items():
        (no_package / "google" / "colab").mkdir(parents=True, exist_ok=True)
        (no_package / "google" / "colab" / name).write_text(text)
    drive = tmp_path / "drive"
    monkeypatch.setenv("ISIC_DRIVE", str(drive))
    project = project_copy(drive / "MyDrive", synthetic_root)
    project.rename(drive / "MyDrive" / "isic-segmentation")
    project = drive / "MyDrive" / "isic-segmentation"
    shutil.copytree(ROOT / "isic_utils", project / "isic_utils")
    content = tmp_path / "content"
    content.mkdir()
    shutil.copy(ROOT / "notebooks" / "02_train.ipynb", content)  # opened from GitHub: a lone notebook file

    first = run_all(content / "02_train.ipynb", content, "profile = 'tiny'\nrun = 'task1'")
    assert (drive / "mounted").read_text() == "yes"
    assert f"package from {project / 'isic_utils' / '__init__.py'}" in printed(first)
    best = project / "outputs" / "tiny" / "task1" / "seed0" / "best.pt"
    assert best.is_file() and "epoch  2/2" in printed(first)
    written = best.stat().st_mtime_ns
    assert not (content / "outputs").exists() and not (content / "data").exists()  # nothing left on the runtime

    again = run_all(content / "02_train.ipynb", content, "profile = 'tiny'\nrun = 'task1'")
    assert "resuming after epoch 2 of 2" in printed(again) and best.stat().st_mtime_ns == written
