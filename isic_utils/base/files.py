"""Files and progress, the package's bottom layer: atomic writes that keep the umask's mode, JSON / text / table
writers, a lock for files several processes share, and the progress shown while a chapter runs.

Every file is written to a temporary name beside its target and renamed into place, so a killed run never leaves
a half-written table, figure, checkpoint or page that a later chapter would read. Imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pandas as pd

TEMPORARY_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``, on error delete it.

    The temporary file is created with mode 0666 less the umask, as ``open()`` would, so the renamed file is as
    readable by others as any file the user writes (``tempfile.mkstemp`` would make every output 0600). When the
    new bytes equal the target's, the target is left as it was: a chapter run again over finished work (Run All,
    Restart & Run All) rewrites nothing, which on a synced folder (Colab's Drive) would upload every file again.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{process_tag()}.{uuid.uuid4().hex[:8]}{TEMPORARY_SUFFIX}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        if _same_bytes(tmp, target):
            return
        _fsync(tmp)  # the bytes are on disk before the name points at them: a crash leaves the old file or the new
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _same_bytes(new: Path, old: Path, chunk: int = 1 << 20) -> bool:
    """Whether file ``old`` exists and holds exactly the bytes of ``new``."""
    try:
        if not old.is_file() or old.stat().st_size != new.stat().st_size:
            return False
        with open(new, "rb") as a, open(old, "rb") as b:
            while block := a.read(chunk):
                if block != b.read(chunk):
                    return False
        return True
    except OSError:
        return False


def _fsync(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on a system that cannot open one (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def process_tag() -> str:
    """``HOST-PID``: names this process's temporary files, so that ``remove_leftovers`` on one machine never takes a
    file of a process running on another machine that shares the folder for one of its own dead processes."""
    return f"{socket.gethostname().replace('.', '_').replace('-', '_')}-{os.getpid()}"


def _leftover_pid(tag: str) -> int | None:
    """The PID in ``tag`` when it names a process of this machine (``HOST-PID``, or a bare PID from older versions)."""
    host, _, pid = tag.rpartition("-")
    if not pid.isdigit() or (host and host != process_tag().rpartition("-")[0]):
        return None
    return int(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or a system that cannot ask
        return True
    return True


def remove_leftovers(folder: str | Path, below: bool = False) -> list[Path]:
    """Delete what killed processes left in ``folder`` (and every folder under it with ``below``):
    ``.NAME.HOST-PID.xxxx.tmp`` files of ``atomic_path``, ``.STEP.running-HOST-PID.ipynb`` notebooks of a
    chapter and ``.report-holder.HOST-PID`` names of a report's lock holder, whose process (on this machine) is gone. Files of a process still running, or of another machine's, are
    kept. Returns the deleted paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*") if below else folder.glob(".*"):
        if not path.is_file():
            continue
        parts = path.name.split(".")
        pid = None
        if path.name.endswith(TEMPORARY_SUFFIX) and len(parts) >= 5:
            pid = _leftover_pid(parts[-3])  # ".", NAME (may hold dots), HOST-PID, random, "tmp"
        elif path.name.endswith(".ipynb") and ".running-" in path.name:
            pid = _leftover_pid(path.name.rsplit(".running-", 1)[1].removesuffix(".ipynb"))
        elif path.name.startswith(".report-holder."):
            pid = _leftover_pid(path.name.split(".report-holder.", 1)[1])
        if pid is not None and pid != os.getpid() and not _alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock (it is training that run right now)."""


@contextlib.contextmanager
def locked(folder: str | Path, busy: str | None = None, shared: bool = False, name: str = ".lock") -> Iterator[None]:
    """Hold a lock on ``folder/<name>`` for as long as the block runs, exclusive unless ``shared``. Processes writing
    one run's shared tables take turns (wait for it); with ``busy`` (what the holder is doing, e.g. "training this
    run") a lock held by another process raises ``FolderBusy`` at once instead: two processes must never train one
    run folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; parallel seeds there are not supported
            yield
            return
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise FolderBusy(
                f"{folder} is in use: another process is {busy} there right now. Wait for it to "
                "finish, or give this run another output_dir (or another seed)."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FileProblem(RuntimeError):
    """A path a command was given cannot be written as asked; the message names it and the fix."""


def writable_file(target: str | Path, overwrite: bool = False, ours=None, option: str = "--output") -> Path:
    """Whether a command may write the file ``target``, checked before any work: the path that ``option`` named
    (made absolute). Refused with a ``FileProblem`` when it is a folder, when a file stands where its folder
    should be, or when it exists and is not one this command wrote (``ours(path)`` says which are) unless
    ``overwrite``: no command replaces a file it did not write."""
    target = Path(target).expanduser().absolute()
    if target.is_dir():
        raise FileProblem(
            f"{option} {target} is a folder; give the path of a file to write (e.g. {target / 'report.zip'})."
        )
    for folder in target.parents:
        if folder.exists():
            if not folder.is_dir():
                raise FileProblem(f"{option} {target}: {folder} is a file, not a folder. Choose another path.")
            break
    if target.exists() and not overwrite and not (ours is not None and ours(target)):
        raise FileProblem(
            f"{target} exists and was not written by this command; it is kept. Choose another "
            f"{option}, or pass --overwrite to replace it."
        )
    writable_folder(target.parent, f"{option} {target.name}: its folder")
    return target


def writable_folder(folder: str | Path, what: str) -> Path:
    """``folder`` (made absolute) when it is, or can be made, a folder this process may write into, checked before
    any work; else a ``FileProblem`` naming it and the fix. ``what`` names the setting that gave it."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise FileProblem(f"{what} {folder} is a file, not a folder. Choose a folder (it is made when missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check.{process_tag()}.probe{TEMPORARY_SUFFIX}"  # a leftover if killed here
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise FileProblem(os_error_sentence(exc, folder, what)) from None
    return folder


_OS_FIXES = {
    errno.EACCES: "this user may not write there: choose a folder you can write, or change its permissions",
    errno.EPERM: "this user may not write there: choose a folder you can write, or change its permissions",
    errno.EROFS: "it is on a read-only file system: choose a folder on a writable disk",
    errno.ENOSPC: "the disk is full: free some space and run the same command again (what finished is kept)",
    errno.EDQUOT: "your disk quota is used up: free some space and run the same command again (what finished is kept)",
    errno.ENOTDIR: "a file stands where a folder is expected: move it away or choose another path",
    errno.EISDIR: "a folder stands where a file is expected: choose a file path",
    errno.EEXIST: "a file of that name exists: choose another path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
}


def os_error_fix(code: int | None) -> str:
    """What to do about an operating-system failure with error number ``code``, in words."""
    return _OS_FIXES.get(code, "fix the cause and run the same command again (what finished is kept)")


def os_error_sentence(exc: OSError, path: str | Path | None = None, what: str = "") -> str:
    """One line for an operating-system failure: the path, what went wrong and the fix (no traceback)."""
    path = exc.filename or path
    fix = os_error_fix(exc.errno)
    where = f"{what + ' ' if what else ''}{path}: " if path else ""
    return f"cannot write {where}{exc.strerror or exc}; {fix}."


class ReportBusy(RuntimeError):
    """Another live process is writing the same report folder."""


@contextlib.contextmanager
def report_lock(folder: str | Path, shared: bool = False) -> Iterator[None]:
    """Hold ``folder/.report.lock`` while a report writes the folder: exclusive for a whole report, ``shared`` for
    processes that only train seeds of their own (``report --only task2 --set seeds=[1]``, which separate
    processes may run side by side). One that cannot have it stops at once with ``ReportBusy`` naming the holders
    (host and PID), before it touches anything."""
    folder = Path(folder)
    holder = folder / f".report-holder.{process_tag()}"
    with contextlib.ExitStack() as held:
        try:  # only taking the lock is refused here: a FolderBusy from the report's own work passes through
            held.enter_context(locked(folder, busy="writing a report", shared=shared, name=".report.lock"))
        except FolderBusy:
            holders = [
                tag
                for tag in (p.name.split(".report-holder.", 1)[1] for p in folder.glob(".report-holder.*"))
                if (pid := _leftover_pid(tag)) is None or _alive(pid)
            ]
            named = ", ".join("PID {1} on {0}".format(*tag.rsplit("-", 1)) for tag in holders) or "another process"
            raise ReportBusy(
                f"{folder} is being written by another report ({named}). Wait for it to finish, or "
                "give this one another output_dir. Nothing was changed."
            ) from None
        holder.touch()
        try:
            yield
        finally:
            holder.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> Path:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, value) -> Path:
    return write_text(target, json.dumps(value, indent=2, default=float) + "\n")


def save_table(table: pd.DataFrame, run_dir: str | Path, name: str, floatfmt: str = ".4g") -> pd.DataFrame:
    """Write ``table`` as ``tables/NAME.csv`` and ``tables/NAME.md`` under ``run_dir``; returns the table."""
    folder = Path(run_dir) / "tables"
    with atomic_path(folder / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_text(folder / f"{name}.md", table.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    return table


def read_table(run_dir: str | Path, name: str) -> pd.DataFrame:
    path = Path(run_dir) / "tables" / f"{name}.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Run the chapter that writes it first (the training notebook for this run)."
        )
    return pd.read_csv(path)


# ----------------------------------------------------------------------------- the project's folders


PROJECT_ENV = "ISIC_PROJECT_ROOT"  # set by the report while a chapter runs: the project the chapter belongs to


def project_root(start: str | Path | None = None) -> Path:
    """The folder holding ``params/profiles`` at or above ``start`` (default: the working directory).

    Relative paths in parameters are taken from there, so a notebook opened in ``notebooks/`` and a papermill
    run from the repository root read and write the same folders. Outside a checkout it is the installed
    package's checkout when there is one (an editable install), else the working directory. A chapter the report
    runs in a report folder elsewhere is told its project by the report (``$ISIC_PROJECT_ROOT``).
    """
    if start is None and os.environ.get(PROJECT_ENV):
        return Path(os.environ[PROJECT_ENV]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params" / "profiles").is_dir():
            return folder
    checkout = Path(__file__).resolve().parents[2]  # the package's own checkout (an editable install, a chapter
    if start is None and (checkout / "params" / "profiles").is_dir():  # running in a report folder elsewhere)
        return checkout
    return here


def signed(value: float, digits: int = 3) -> str:
    """``value`` with its sign, as a page shows a change: rounded first, so a change too small to show reads
    ``+0.000``, never ``-0.000``."""
    return f"{round(float(value), digits) + 0.0:+.{digits}f}"


def plain(value: float, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` decimals as a table shows it, thousands separated, without ``-0.000``."""
    return f"{round(float(value), digits) + 0.0:,.{digits}f}"


def page_link(path: str | Path) -> str:
    """A Markdown link target for ``path`` from a chapter's output: relative to the working directory, which is
    the notebook's folder in JupyterLab and where the report writes its executed chapters, so the link opens from
    the notebook, from its HTML export beside it and from the report's folder alike."""
    return Path(os.path.relpath(Path(path).resolve(), Path.cwd().resolve())).as_posix()


def shown_path(path: str | Path, env: str | None = None) -> str:
    """``path`` as a page, a table or a run's metadata may name it: relative to the project when inside it,
    ``$ENV/…`` when the environment variable ``env`` points at it (or above it), else ``…/<its name>``. A report
    handed to someone else names no folder of the author's machine."""
    path = Path(path).expanduser().resolve()
    try:
        return str(path.relative_to(project_root()))
    except ValueError:
        pass
    if env and os.environ.get(env):
        try:
            below = path.relative_to(Path(os.environ[env]).expanduser().resolve())
            return f"${env}" + (f"/{below}" if str(below) != "." else "")
        except ValueError:
            pass
    return f"…/{path.name}"


# ----------------------------------------------------------------------------- progress


PROGRESS_ENV = "ISIC_PROGRESS_FILE"  # set by the report while a chapter runs: the file it relays to the terminal


def _progress_sink():
    """Where a progress bar draws: the file the report relays (``$ISIC_PROGRESS_FILE``, while a chapter runs
    under ``report``), else the terminal's stderr, else nowhere (a notebook, a log, a test)."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        return open(path, "a", encoding="utf-8")
    return sys.stderr if sys.stderr.isatty() else None


def progress_bar(
    iterable: Iterable,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
    summary: bool = True,
) -> Iterator:
    """Iterate ``iterable`` with a tqdm bar in the terminal (also while a chapter runs under ``report``, which
    relays it), then, with ``summary``, one line on stdout (``decode: 260 images in 3.1 s``). Notebooks and HTML
    get that one line per stage, never a widget placeholder or carriage-return fragments."""
    from tqdm import tqdm

    sink = _progress_sink() if enabled else None
    to_file = sink is not None and sink is not sys.stderr
    bar = tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=sink is None,
        leave=False,
        file=sink,
        unit=unit,
        mininterval=2.0 if to_file else 0.1,
        ascii=to_file or None,
        ncols=90 if to_file else None,
        dynamic_ncols=not to_file,
    )
    start, count = time.perf_counter(), 0
    try:
        for item in bar:
            count += 1
            yield item
    finally:
        bar.close()
        if to_file:
            sink.close()
    if enabled and summary and count:
        print(f"{desc}: {count} {unit} in {time.perf_counter() - start:.1f} s", flush=True)


@contextlib.contextmanager
def third_party_progress() -> Iterator[None]:
    """Progress that other libraries print (torchvision's download bars on stderr, torch.hub's "Downloading: …" line
    on stdout) goes where ours goes: the terminal, the file the report relays, or nowhere — never into a notebook or
    its HTML. Wrap only the third-party call: everything printed inside goes the same way."""
    path = os.environ.get(PROGRESS_ENV)
    if not path and sys.stderr.isatty():
        yield
        return
    with (
        open(path or os.devnull, "a", encoding="utf-8") as sink,
        contextlib.redirect_stderr(sink),
        contextlib.redirect_stdout(sink),
    ):
        yield


class LineWriter:
    """A file-like sink that hands each complete line written to it to ``emit`` (carriage returns end a line too;
    blank lines are dropped): how a chapter's output reaches the terminal, and a worker's reaches its parent."""

    def __init__(self, emit: Callable[[str], object]):
        self.emit, self.pending = emit, ""

    def write(self, text: str) -> int:
        self.pending += text.replace("\r", "\n")
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.emit(line)
        return len(text)

    def flush(self) -> None:
        pass
