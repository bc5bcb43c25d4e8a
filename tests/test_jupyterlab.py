"""The chapters in a real JupyterLab, driven in headless Chromium through Playwright (the slow tier): right after
`make demo`, a user opens a chapter from notebooks/, sets the profile, and runs it — Run All, then Restart & Run All
— and clicks the gallery link it prints. Nothing is retrained, no cell errs or writes to stderr, no file of the
report is rewritten, and the link opens the page.

Needs Debian's ``chromium`` and the ``playwright`` package (its own browser download is not used); `.ci/run`
installs both, so in CI (``CI=true``) a missing one fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from .conftest import CHROMIUM, TINY_EPOCHS, browser_or_skip, report_copy

pytestmark = pytest.mark.slow
TOKEN = "isic-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stamps(folder: Path) -> dict:
    """Every file below ``folder`` with its modification time and size: a rewritten file changes its time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory, built_report):
    """(project, JupyterLab's URL): `make demo` in a user's checkout, then `jupyter lab` on it (127.0.0.1 only)."""
    sync_playwright = browser_or_skip()
    root = report_copy(built_report, tmp_path_factory.mktemp("lab"))
    for name in ("02_train.ipynb", "04_compare.ipynb"):  # the user sets the profile in the parameters cell
        path = root / "notebooks" / name
        notebook = nbformat.read(path, as_version=4)
        notebook.cells[1].source = notebook.cells[1].source.replace("profile = 'synthetic'", "profile = 'tiny'")
        nbformat.write(notebook, path)
    home = tmp_path_factory.mktemp("jupyter-home")
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--ServerApp.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.allow_root=True",
            "--LabApp.expose_app_in_browser=True",
        ],  # window.jupyterapp: the commands the menus run
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not start within a minute")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            yield root, url, browser
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


KERNEL_READY = """(() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!k && k.status === 'idle'; })()"""
# Every code cell ran, or one failed (Run All stops there: the cells after it never run, and the test says why).
ALL_RUN = """(() => { const w = window.jupyterapp.shell.currentWidget;
    const code = w.content.widgets.filter(c => c.model.type === 'code');
    const failed = code.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
    return w.sessionContext.session.kernel.status === 'idle' && !code.some(c => c.promptNode.textContent.includes('*'))
        && (failed || code.every(c => c.model.executionCount !== null)); })()"""


def open_notebook(browser, url: str, path: str):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{url}/lab/tree/{path}?token={TOKEN}")
    page.wait_for_function(KERNEL_READY, timeout=120_000)
    return page


def run(page, command: str) -> dict:
    """Clear every output (so that a finished run is told from the last one), run ``command`` as its menu item
    does, confirm its dialog if it asks, wait until every cell ran; returns the notebook as JupyterLab holds it."""
    page.evaluate("window.jupyterapp.commands.execute('editmenu:clear-all')")
    # not awaited: Restart & Run All's promise settles only once its dialog is answered, below
    page.evaluate(f"() => {{ window.jupyterapp.commands.execute('{command}'); }}")
    if command == "notebook:restart-run-all":
        page.locator(".jp-Dialog .jp-mod-accept").click()
    page.wait_for_function(ALL_RUN, timeout=300_000, polling=500)
    return page.evaluate("window.jupyterapp.shell.currentWidget.content.model.toJSON()")


def complaints(notebook: dict) -> list[str]:
    """Errors and stderr the cells printed."""
    found = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if output["output_type"] == "error":
                found.append(f"{output['ename']}: {output['evalue']}")
            elif output["output_type"] == "stream" and output["name"] == "stderr":
                found.append("stderr: " + "".join(output["text"])[:300])
    return found


def open_link(page, text: str) -> str:
    """Click the output link labelled ``text``; returns the heading of the page it opened inside JupyterLab."""
    link = page.locator(".jp-OutputArea a", has_text=text).first
    link.scroll_into_view_if_needed()
    link.click()
    page.wait_for_function("window.jupyterapp.shell.currentWidget.title.label.endsWith('.html')", timeout=30_000)
    shown = page.evaluate("window.jupyterapp.shell.currentWidget.id")  # the page just opened, not an earlier one
    return page.frame_locator(f'[id="{shown}"] iframe').locator("h1").inner_text(timeout=30_000)


def test_a_training_chapter_run_all_and_restart_run_all_in_jupyterlab(lab, tmp_path):
    root, url, browser = lab
    before = stamps(root / "outputs")
    page = open_notebook(browser, url, "notebooks/02_train.ipynb")
    for command in ("notebook:run-all-cells", "notebook:restart-run-all"):
        notebook = run(page, command)
        printed = json.dumps(notebook)
        assert not complaints(notebook), (command, complaints(notebook))
        assert (
            f"resuming after epoch {TINY_EPOCHS} of {TINY_EPOCHS}" in printed
            and f"epoch  1/{TINY_EPOCHS}" not in printed
        ), command  # nothing retrained
        assert stamps(root / "outputs") == before, command  # no file rewritten
    page.screenshot(path=str(tmp_path / "train.png"))
    assert "every test prediction" in open_link(page, "Every test prediction of task1")
    assert page.evaluate("window.jupyterapp.shell.currentWidget.title.label") == "gallery.html"


def test_the_comparison_chapter_run_all_in_jupyterlab(lab):
    root, url, browser = lab
    before = stamps(root / "outputs")
    page = open_notebook(browser, url, "notebooks/04_compare.ipynb")
    notebook = run(page, "notebook:run-all-cells")
    assert not complaints(notebook), complaints(notebook)
    assert stamps(root / "outputs") == before
    assert "run by run" in open_link(page, "Every test prediction, run by run")
