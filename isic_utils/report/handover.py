"""A report to hand over: one zip of a finished report's pages, tables and figures, without its checkpoints, caches,
locks or internal state, and a check that none of its text names a folder of the author's machine.

Every page in it stands alone (the chapters' HTML embeds its figures, ``index.html`` its headline figure), so a
reader can open any page from the unpacked folder, or a single page sent on its own.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from ..base.files import FileProblem, ReportBusy, atomic_path, project_root, report_lock, writable_file

KEPT = (".html", ".ipynb", ".csv", ".md", ".png", ".json", ".txt")  # pages, notebooks, tables, figures, run records
INTERNAL = ("pipeline.json",)  # the report's own bookkeeping: which chapters are up to date here


def bundle_files(out_dir: Path) -> list[Path]:
    """What a bundle of ``out_dir`` holds: the kept kinds of file, no hidden file, no partly executed notebook."""
    return [
        path
        for path in sorted(out_dir.rglob("*"))
        if path.is_file()
        and path.suffix in KEPT
        and path.name not in INTERNAL
        and not path.name.endswith(".partial.ipynb")
        and not any(part.startswith(".") for part in path.relative_to(out_dir).parts)
    ]


def machine_paths(files: list[Path], folders: list[Path]) -> list[Path]:
    """The files among ``files`` whose text names one of ``folders`` (the project's, the user's home)."""
    named = [str(folder) for folder in folders if len(str(folder)) > 1]
    return [path for path in files if any(name in path.read_text(encoding="utf-8", errors="replace") for name in named)]


MARK = b"isic_utils pack: a report handed over"  # the zip's comment: a zip pack wrote may be packed again


def packed_by_us(path: Path) -> bool:
    """Whether ``path`` is a zip that ``pack`` wrote (its comment says so): the one file it replaces unasked."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.comment == MARK
    except (OSError, zipfile.BadZipFile):
        return False


def missing_pages(out_dir: Path, files: list[Path]) -> list[str]:
    """What the report's pages link that the bundle lacks (a chapter not run yet, or still running)."""
    present = {path.relative_to(out_dir).as_posix() for path in files}
    links = re.findall(r'href="([^"#?:]+)"', (out_dir / "index.html").read_text(encoding="utf-8", errors="replace"))
    return sorted({link for link in links if link not in present})


def pack_report(
    out_dir: str | Path, target: str | Path | None = None, overwrite: bool = False, partial: bool = False
) -> tuple[Path, int, list[Path], list[str]]:
    """Zip the report in ``out_dir`` into ``target`` (default ``<out_dir>-report.zip`` beside it), the files under a
    ``<name>-report/`` folder; returns (the zip, its size in bytes, files that name a folder of this machine, pages
    its index links that it lacks).

    Only a finished report is packed: one that a report is writing now, or whose ``index.html`` links a page that
    is not there, is refused unless ``partial`` (then packed as it is, the missing pages returned). ``target`` is
    replaced only when ``pack`` wrote it, or with ``overwrite``."""
    out_dir = Path(out_dir)
    if not (out_dir / "index.html").is_file():
        raise FileNotFoundError(
            f"{out_dir / 'index.html'} not found: run the report first (make report DATA=…), then pack it."
        )
    target = writable_file(target or out_dir.parent / f"{out_dir.name}-report.zip", overwrite, packed_by_us)
    try:
        with report_lock(out_dir, shared=True):  # no report starts writing the folder while it is read
            return _pack(out_dir, target, partial)
    except ReportBusy as exc:
        if not partial:
            raise ReportBusy(
                f"{exc} Pack it when that report has finished, or pass --partial to pack what is there now."
            ) from None
        return _pack(out_dir, target, partial)


def _pack(out_dir: Path, target: Path, partial: bool) -> tuple[Path, int, list[Path], list[str]]:
    files = bundle_files(out_dir)
    missing = missing_pages(out_dir, files)
    if missing and not partial:
        raise FileProblem(
            f"{out_dir}'s report is unfinished: its index links {len(missing)} file(s) that are not "
            f"there ({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}). Run the report to "
            "the end and pack it then, or pass --partial to pack it as it is."
        )
    folder = f"{out_dir.name}-report"
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, f"{folder}/{path.relative_to(out_dir).as_posix()}")
        archive.comment = MARK
    return target, target.stat().st_size, machine_paths(files, [project_root(), Path.home()]), missing
