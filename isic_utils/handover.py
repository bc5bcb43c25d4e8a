"""A report to hand over: one zip of a finished report's pages, tables and figures, without its checkpoints, caches,
locks or internal state, and a check that none of its text names a folder of the author's machine.

Every page in it stands alone (the chapters' HTML embeds its figures, ``index.html`` its headline figure), so a
reader can open any page from the unpacked folder, or a single page sent on its own.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from .files import atomic_path, project_root

KEPT = (".html", ".ipynb", ".csv", ".md", ".png", ".json", ".txt")  # pages, notebooks, tables, figures, run records
INTERNAL = ("pipeline.json",)  # the report's own bookkeeping: which chapters are up to date here


def bundle_files(out_dir: Path) -> list[Path]:
    """What a bundle of ``out_dir`` holds: the kept kinds of file, no hidden file, no partly executed notebook."""
    return [path for path in sorted(out_dir.rglob("*"))
            if path.is_file() and path.suffix in KEPT and path.name not in INTERNAL
            and not path.name.endswith(".partial.ipynb")
            and not any(part.startswith(".") for part in path.relative_to(out_dir).parts)]


def machine_paths(files: list[Path], folders: list[Path]) -> list[Path]:
    """The files among ``files`` whose text names one of ``folders`` (the project's, the user's home)."""
    named = [str(folder) for folder in folders if len(str(folder)) > 1]
    return [path for path in files if any(name in path.read_text(encoding="utf-8", errors="replace") for name in named)]


def pack_report(out_dir: str | Path, target: str | Path | None = None) -> tuple[Path, int, list[Path]]:
    """Zip the report in ``out_dir`` into ``target`` (default ``<out_dir>-report.zip`` beside it), the files under a
    ``<name>-report/`` folder; returns (the zip, its size in bytes, files that name a folder of this machine)."""
    out_dir = Path(out_dir)
    if not (out_dir / "index.html").is_file():
        raise FileNotFoundError(f"{out_dir / 'index.html'} not found: run the report first (make report DATA=…), then "
                                "pack it.")
    files = bundle_files(out_dir)
    target = Path(target) if target else out_dir.parent / f"{out_dir.name}-report.zip"
    folder = f"{out_dir.name}-report"
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, f"{folder}/{path.relative_to(out_dir).as_posix()}")
    return target, target.stat().st_size, machine_paths(files, [project_root(), Path.home()])
