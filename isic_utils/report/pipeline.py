"""Papermill orchestration: which notebook, which parameters, where the output goes.

``run_report(profile)`` runs EDA → task 1 → task 2 (→ task 3 when the profile asks) → comparison into
``outputs/<profile>/``, exports each executed notebook to HTML, and writes ``index.html``. A chapter whose
executed notebook is up to date (same parameters, finished) is not run again unless ``force``, which also
retrains the runs from scratch (``resume: false``). While a chapter runs, what it prints (a line per epoch) is
echoed to the terminal. A failing cell or a dead kernel stops the pipeline with a ``ChapterFailed`` naming the
notebook and the cause, and the partly executed notebook is kept beside the others; a failed HTML export keeps the
executed notebook and is redone alone on the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..base.devices import resolve_device
from ..base.files import (
    PROGRESS_ENV,
    PROJECT_ENV,
    TEMPORARY_SUFFIX,
    LineWriter,
    atomic_path,
    locked,
    os_error_fix,
    process_tag,
    remove_leftovers,
    report_lock,
    writable_folder,
    write_json,
    write_text,
)
from ..config import params as P
from ..data.sources import RELEASES
from ..evaluation.external import external_sets
from ..evaluation.gallery import GALLERY
from ..model.networks import resolve_weights
from ..training.experiments import data_root, describe_data
from . import tables

NOTEBOOKS = {
    "eda": "01_eda.ipynb",
    "train": "02_train.ipynb",
    "compare": "04_compare.ipynb",
    "external": "03_external.ipynb",
}
READS_RUNS = ("external", "compare")  # chapters that read the training runs' outputs (stale once a run retrains)


# The kernel's own log stays out of the terminal: ipykernel ≥ 7.4 warns on every start that its local sockets are not
# encrypted, and logs "KeyboardInterrupt caught in kernel" when the shutdown interrupts it (after every chapter, and
# on Ctrl-C). A failing cell reaches the terminal as the chapter's error, not through this log.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]


@dataclass(frozen=True)
class Step:
    name: str  # output name: eda, task1, task2, task3, external, compare
    chapter: str  # eda | train | external | compare
    run_file: str  # params/<name>.yaml


def steps_for(profile_values: dict) -> list[Step]:
    """EDA, one training chapter per run, the external validation when the profile lists external sets, the
    comparison."""
    runs = profile_values.get("runs", ["task1", "task2"])
    external = [Step("external", "external", "external.yaml")] if profile_values.get("external") else []
    return (
        [Step("eda", "eda", "eda.yaml")]
        + [Step(run, "train", f"{run}.yaml") for run in runs]
        + external
        + [Step("compare", "compare", "compare.yaml")]
    )


def chapter_parameters(
    step: Step, steps: list[Step], profile: str, overrides: dict | None, force: bool, root: Path
) -> dict:
    """What the report sets for a chapter beyond its profile: the run, the overrides it takes, the runs to read when
    they differ from the profile's, and ``resume: false`` under ``--force``. Papermill injects exactly these (and the
    profile), so the executed notebook says how to run the chapter again, and the notebook resolves the rest itself
    (``params.chapter_values``), as it does when opened by hand."""
    given = {k: v for k, v in (overrides or {}).items() if k in P.schema(step.chapter)}
    if step.chapter == "train":
        given["run"] = step.name
        if force:
            given["resume"] = False  # --force retrains; a plain rerun continues finished or interrupted seeds
    if step.chapter in READS_RUNS:
        runs = [s.name for s in steps if s.chapter == "train"]
        if P.chapter_values(step.chapter, profile, None, given, root)["runs"] != runs:
            given["runs"] = runs
    return given


class ChapterFailed(RuntimeError):
    """A notebook failed; the message names it, the cell, and where the partial notebook is."""


def chapter_source(notebook: Path) -> str:
    """The SHA-1 of a chapter's cells as written (type and source; not outputs, counts or metadata, which a by-hand
    run changes): editing the notebook changes it."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    text = json.dumps([(c["cell_type"], "".join(c["source"])) for c in cells])
    return hashlib.sha1(text.encode()).hexdigest()


def _fingerprint(values: dict, source: Path, root: Path) -> str:
    """What decides a chapter's output: its notebook's cells (``chapter_source``), its parameters (not ``resume`` or
    ``jobs``, which are how to get there), the folder its data resolves to, and where ``encoder_weights: imagenet``
    resolves to (``$ISIC_DATA_DIR`` and ``$ISIC_ENCODER_WEIGHTS`` may point elsewhere since the last run). A folder
    inside the project counts by its place in the project: a checkout moved or copied whole is still up to date."""
    kept = {k: v for k, v in values.items() if k not in P.with_role("route")}
    kept["chapter_source"] = chapter_source(source)
    if "encoder_weights" in kept:
        kept["resolved_encoder_weights"] = resolve_weights(kept["encoder_weights"])
    if "data_source" in kept:  # where the data resolves ($ISIC_DATA_DIR may point elsewhere since the last run)
        kept["resolved_data_root"] = _in_project(data_root(values), root)
    if kept.get("external"):  # a set's folder that appeared (PH2 unpacked, $PH2_DIR set) is new input
        kept["resolved_external"] = [(s.name, _in_project(s.root, root), s.found) for s in external_sets(values)]
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _in_project(path: Path, root: Path) -> str:
    """``path`` relative to the project when it lies inside it (as named, links not followed), else absolute."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _line_echo(echo, name: str) -> LineWriter:
    """Each complete line a chapter prints goes to ``echo`` as ``  <step> | <line>``: the terminal follows a long
    chapter epoch by epoch."""
    return LineWriter(lambda line: echo(f"  {name} | {line}"))


class _KnownToTheChapter(logging.Filter):
    """Papermill warns "Passed unknown parameter" for every value the parameters cell does not assign; a chapter's
    cell names only its profile and run and takes every other key (``params.from_notebook`` checks them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


logging.getLogger("papermill").addFilter(_KnownToTheChapter())


class _ProgressRelay:
    """Follows the progress file a chapter's bars draw into (``$ISIC_PROGRESS_FILE``: decoding, extraction,
    downloads, batches) and echoes its updates, at most one every two seconds per bar, as ``  <step> | <bar>``: the
    terminal sees progress while the notebook keeps one line per stage."""

    def __init__(self, path: Path, sink: LineWriter):
        import threading

        self.path, self.sink, self.last, self.offset = path, sink, "", 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self):
        self.path.touch()
        self.environment = _environment(PROGRESS_ENV, self.path)  # the chapter's kernel (and its workers) inherit it
        self.environment.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.environment.__exit__(*exc)
        self.path.unlink(missing_ok=True)

    def _follow(self) -> None:
        while not self.stopped.wait(0.5):
            self._read()
        self._read()

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                handle.seek(self.offset)
                text = handle.read()
                self.offset = handle.tell()
        except FileNotFoundError:
            return
        for update in text.replace("\r", "\n").split("\n"):
            update = update.strip()
            started = "%|" in update and not update.split("%|")[0].endswith(" 0")
            if started and update != self.last:  # a bar's update, not its opening at 0% or its clearing
                self.last = update
                self.sink.write(update + "\n")


def export_html(notebook_path: Path, html_path: Path, reader: bool = False) -> Path:
    """Export an executed notebook to a self-contained HTML page (figures embedded). ``reader``: the reader's copy,
    with the code and the prompts left out (nbconvert's exclude-input): text, tables and figures only."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(notebook_path, as_version=4)
    exporter = HTMLExporter(
        template_name="lab", exclude_input=reader, exclude_input_prompt=reader, exclude_output_prompt=reader
    )
    body, _ = exporter.from_notebook_node(
        notebook, resources={"metadata": {"name": page_title(notebook_path, notebook)}}
    )
    return write_text(html_path, body)


def page_title(notebook_path: Path, notebook) -> str:
    """A chapter page's title in the browser's tab and history: the step and the chapter's own heading ("task1 ·
    Chapter 2 — Training a run"), not nbconvert's "Notebook"."""
    heading = next(
        (
            line.lstrip("#").strip()
            for cell in notebook.cells
            if cell.cell_type == "markdown"
            for line in cell.source.splitlines()
            if line.startswith("#")
        ),
        "",
    )
    return " · ".join(part for part in (notebook_path.stem, heading) if part)


def reader_name(step_name: str) -> str:
    return f"{step_name}_reader.html"


def run_chapter(step: Step, values: dict, out_dir: Path, root: Path, kernel: str | None = None, echo=print) -> float:
    """Execute one chapter with papermill into ``out_dir/<step>.ipynb``; returns its wall time in seconds.

    What the chapter prints (one line per epoch while training) is echoed to ``echo`` as it runs. On any failure
    the partly executed notebook is kept as ``<step>.partial.ipynb`` and the error propagates; a later success
    removes it.
    """
    import papermill as pm

    source = root / "notebooks" / NOTEBOOKS[step.chapter]
    target = out_dir / f"{step.name}.ipynb"
    partial = out_dir / f"{step.name}.partial.ipynb"
    running = out_dir / f".{step.name}.running-{process_tag()}.ipynb"  # one per process: seeds may run side by side
    relay = out_dir / f".{step.name}-progress.{process_tag()}.relay{TEMPORARY_SUFFIX}"
    start = time.perf_counter()
    try:
        # $ISIC_PROJECT_ROOT: the kernel runs in the report's folder, which may lie outside the project it belongs to
        with _ProgressRelay(relay, _line_echo(echo, step.name)), _environment(PROJECT_ENV, root):
            # in the report's folder, as a notebook runs in its own: the links it prints open from its page
            pm.execute_notebook(
                str(source),
                str(running),
                parameters=values,
                cwd=str(out_dir),
                progress_bar=False,
                kernel_name=kernel,
                log_output=False,
                stdout_file=_line_echo(echo, step.name),
                extra_arguments=KERNEL_ARGUMENTS,
            )
    except BaseException:
        if running.exists():
            running.replace(partial)
        raise
    _relative_paths(running, source, root)
    running.replace(target)
    partial.unlink(missing_ok=True)  # an earlier attempt's failure, now run through: not left beside the chapter
    return time.perf_counter() - start


@contextlib.contextmanager
def _environment(name: str, value) -> Iterator[None]:
    """``$name`` set to ``value`` while the block runs (the chapter's kernel inherits it), then as it was."""
    previous = os.environ.get(name)
    os.environ[name] = str(value)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _relative_paths(notebook: Path, source: Path, root: Path) -> None:
    """Papermill records the absolute input and output paths in the executed notebook; a report handed to someone
    else must not carry the author's folders, so they become the chapter's source relative to the project and the
    notebook's own name."""
    import nbformat

    executed = nbformat.read(notebook, as_version=4)
    recorded = executed.metadata.get("papermill", {})
    recorded["input_path"] = str(source.relative_to(root))
    recorded["output_path"] = notebook.name.split(".running-")[0].lstrip(".") + ".ipynb"
    nbformat.write(executed, notebook)


def _run_or_explain(step: Step, values: dict, out_dir: Path, root: Path, kernel: str | None, echo) -> float:
    """``run_chapter`` with its failures turned into ``ChapterFailed`` messages that say what to do."""
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    source = root / "notebooks" / NOTEBOOKS[step.chapter]
    partial = out_dir / f"{step.name}.partial.ipynb"
    start = time.perf_counter()
    try:
        return run_chapter(step, values, out_dir, root, kernel, echo)
    except pm.PapermillExecutionError as exc:
        code = re.match(r"\[Errno (\d+)\]", exc.evalue or "")
        fix = (
            f"{os_error_fix(int(code.group(1))).capitalize()}."
            if code  # a full disk, a read-only folder
            else "Fix the cause and rerun: finished chapters are not run again."
        )
        raise ChapterFailed(
            f"{source.name} ({step.name}) failed in cell {exc.exec_count} with {exc.ename}: {exc.evalue}\n"
            f"The partly executed notebook is kept at {partial}. {fix}"
        ) from exc
    except DeadKernelError as exc:
        raise ChapterFailed(
            f"{source.name} ({step.name}): the kernel died after {time.perf_counter() - start:.0f} s ({exc}). "
            f"This is most often the kernel running out of memory ({_memory_note()}): lower batch_size or "
            f"image_size, set feature_cache: false, or close other programs, then rerun. The partly executed "
            f"notebook is kept at {partial}; finished chapters are not run again."
        ) from exc


def _memory_note() -> str:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"this machine has {pages * size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        return "see the system's memory"


def export_chapter(step: Step, out_dir: Path) -> Path:
    """Export ``<step>.ipynb`` to HTML, the reader's copy (no code) first; a failure raises ``ChapterFailed`` saying
    the notebook itself is kept."""
    notebook = out_dir / f"{step.name}.ipynb"
    try:
        export_html(notebook, out_dir / reader_name(step.name), reader=True)
        return export_html(notebook, out_dir / f"{step.name}.html")
    except Exception as exc:
        raise ChapterFailed(
            f"{notebook} ran and is kept, but exporting it to HTML failed ({type(exc).__name__}: {exc}). Fix the "
            "cause (nbconvert and its templates must be installed) and rerun the report: the chapter is not run "
            "again, only exported."
        ) from exc


def _print(line: str) -> None:
    print(line, flush=True)


def run_report(
    profile: str = "synthetic",
    force: bool = False,
    only: list[str] | None = None,
    overrides: dict | None = None,
    root: Path | None = None,
    kernel: str | None = None,
    echo=_print,
) -> dict[str, float]:
    """Run every chapter of the report for ``profile``; returns {chapter: seconds} (0 for a chapter skipped)."""
    root = root or P.project_root()
    P.check_overrides(overrides or {})  # a key no chapter knows is a typo, not a key for another chapter
    profile_values = P.read_yaml(P.profile_path(profile, root)) if P.profile_path(profile, root).is_file() else {}
    steps = steps_for({**profile_values, **{k: v for k, v in (overrides or {}).items() if k == "runs"}})
    names = [step.name for step in steps]
    if only is not None and not only:
        raise P.ParameterError(
            f"--only needs the steps to run; the steps of profile {profile!r} are {', '.join(names)}"
        )
    for name in only or []:  # a typo would otherwise run nothing and say "done"
        if name not in names:
            raise P.ParameterError(
                f"unknown step {name!r}{P.suggest([name], names)} for profile {profile!r}; "
                f"its steps are {', '.join(names)}"
            )
    resolved, injected = _checked(steps, profile, overrides, force, root)
    out_dir = writable_folder(P.absolute(resolved["eda"]["output_dir"], root), "output_dir")
    # one report writes a folder at a time; processes that only train seeds of their own may share it
    shared = bool(only) and all(s.chapter == "train" for s in steps if s.name in only)
    with report_lock(out_dir, shared=shared):
        return _run_steps(steps, resolved, injected, profile, out_dir, root, force, only, kernel, echo)


def _checked(steps: list[Step], profile: str, overrides: dict | None, force: bool, root: Path) -> tuple[dict, dict]:
    """Every chapter's parameters resolved and validated, and the device each run asks for checked, before any work:
    (resolved values, what papermill injects) per step."""
    resolved, injected = {}, {}
    for step in steps:
        given = chapter_parameters(step, steps, profile, overrides, force, root)
        resolved[step.name] = P.chapter_values(step.chapter, profile, given.get("run"), given, root)
        injected[step.name] = {**given, "profile": profile}
        if step.chapter == "train":
            try:
                resolve_device(resolved[step.name]["device"])
            except ValueError as exc:
                raise P.ParameterError(f"{step.name}: {exc}") from None
    return resolved, injected


def _run_steps(
    steps: list[Step],
    resolved: dict,
    injected: dict,
    profile: str,
    out_dir: Path,
    root: Path,
    force: bool,
    only: list[str] | None,
    kernel: str | None,
    echo,
) -> dict[str, float]:
    remove_leftovers(out_dir, below=True)  # what killed chapters and processes left (their PIDs are gone)
    state_path = out_dir / "pipeline.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    timings: dict[str, float] = {}
    echo(f"report: profile {profile!r} → {out_dir}")
    if resolved["eda"]["data_source"] == "synthetic":
        echo("report: running on SYNTHETIC data (the offline default); use DATA=isic2016 for the real report")
    for step in steps:
        if only and step.name not in only:
            continue
        values = resolved[step.name]
        key = _fingerprint(values, root / "notebooks" / NOTEBOOKS[step.chapter], root)
        done = state.get(step.name, {})
        executed = done.get("fingerprint") == key and (out_dir / f"{step.name}.ipynb").exists()
        stale = step.chapter in READS_RUNS and any(  # a run retrained since the comparison was written
            state.get(s.name, {}).get("finished", 0) > done.get("finished", 0) for s in steps if s.chapter == "train"
        )
        if executed and not force and not stale:
            if (out_dir / f"{step.name}.html").exists():
                echo(f"report: {step.name:8s} up to date, skipped")
            else:  # executed, but its export failed last time
                export_chapter(step, out_dir)
                echo(f"report: {step.name:8s} up to date; exported {step.name}.html")
            timings[step.name] = 0.0
            continue
        echo(f"report: {step.name:8s} running {NOTEBOOKS[step.chapter]} ...")
        for page in (f"{step.name}.html", reader_name(step.name)):  # never leave a page of an older run beside it
            (out_dir / page).unlink(missing_ok=True)
        # not up to date until it finishes: an interrupted chapter (a killed --force) runs again next time
        state = _record(out_dir, step.name, None)
        seconds = _run_or_explain(step, injected[step.name], out_dir, root, kernel, echo)
        timings[step.name] = seconds
        state = _record(out_dir, step.name, {"fingerprint": key, "seconds": seconds, "finished": time.time()})
        export_chapter(step, out_dir)
        echo(f"report: {step.name:8s} done in {seconds / 60:.1f} min")
    write_index(out_dir, steps, resolved, state)
    total = sum(timings.values())
    echo(
        "report: chapter times — "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
        + f"; total {total / 60:.1f} min"
    )
    echo(f"report: open {out_dir / 'index.html'}")
    return timings


def _record(out_dir: Path, name: str, entry: dict | None) -> dict:
    """Set (or with ``None`` drop) one chapter's entry in ``pipeline.json``, re-read under the folder's lock: another
    ``report --only …`` may have finished a chapter meanwhile, and its entry is kept. Returns the whole state."""
    path = out_dir / "pipeline.json"
    with locked(out_dir):
        state = json.loads(path.read_text()) if path.exists() else {}
        if entry is None:
            state.pop(name, None)
        else:
            state[name] = entry
        write_json(path, state)
    return state


def write_index(out_dir: Path, steps: list[Step], resolved: dict, state: dict) -> Path:
    """``index.html``, the answer first: what data the report ran on, Table 9 and the headline figure (the same test
    images predicted by every run), one line per chapter saying what it found (from its saved numbers), then the
    links: each chapter in full and as a reader's copy (no code), its tables and figures."""
    first = resolved[steps[0].name]
    note = describe_data(first).replace("**", "").replace("`", "")
    answer = tables.answer_section(out_dir)
    found, files_ = [], []
    for step in steps:
        seconds = state.get(step.name, {}).get("seconds")
        timing = f" ({seconds / 60:.1f} min)" if seconds is not None else ""
        links = (
            f'<a href="{reader_name(step.name)}">read</a> · <a href="{step.name}.html">with code</a> · '
            f'<a href="{step.name}.ipynb">notebook</a>'
        )
        for page in sorted((out_dir / step.name).glob(GALLERY.replace(".html", "*.html"))):
            which = page.stem.removeprefix(GALLERY.removesuffix(".html")).strip("_")
            label = f"every prediction ({which})" if which else "every prediction"
            links += f' · <a href="{step.name}/{page.name}">{html.escape(label)}</a>'
        finding = tables.chapter_finding(out_dir, step.name, step.chapter)
        found.append(f"<li><b>{html.escape(step.name)}</b> — {html.escape(finding)} <small>({links})</small></li>")
        extras = []
        for kind in ("tables", "figures"):
            for path in sorted((out_dir / step.name / kind).glob("*.csv" if kind == "tables" else "*.png")):
                extras.append(f'<a href="{step.name}/{kind}/{path.name}">{path.name}</a>')
        files_.append(
            f"<li><b>{html.escape(step.name)}</b>{timing}: {links}"
            + (f"<br><small>{' · '.join(extras)}</small>" if extras else "")
            + "</li>"
        )
    data = RELEASES.get(first.get("data_source"), RELEASES["isic2016"]).name  # synthetic: the 2016 report offline
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{data} segmentation report — {html.escape(first['profile'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:68em;margin:1.5em auto;padding:0 1em;line-height:1.45;color:#222}}
h1{{font-size:1.6em;margin-bottom:.2em}} h2{{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}}
.note{{background:#fff3cd;padding:.5em 1em;border-radius:4px}} .answer{{font-size:1.08em}}
table{{border-collapse:collapse;font-size:.92em;margin:.6em 0;display:block;overflow-x:auto}}
th,td{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}} th{{background:#f3f3f3}}
figure{{margin:1em 0}} figure img{{max-width:100%;height:auto;border:1px solid #eee}}
figcaption{{font-size:.9em;color:#555}} li{{margin:.35em 0}} small{{color:#555}}
</style></head><body>
<h1>Skin-lesion segmentation on {data} with a MobileNetV2 encoder</h1>
<p class="note">Profile <b>{html.escape(first['profile'])}</b>: {html.escape(note)} {html.escape(tables.data_line(out_dir))}</p>
{answer}
<h2>What each chapter found</h2>
<ul>{''.join(found)}</ul>
<h2>Files</h2>
<ol>{''.join(files_)}</ol>
</body></html>
"""
    target = out_dir / "index.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target
