"""A report to hand over: one zip of a finished report's pages, tables and figures, without its checkpoints, caches,
locks or internal state, and a check that none of its text names a folder of the author's machine.

Every page in it stands alone (the chapters' HTML embeds its figures, ``index.html`` its headline figure), so a
reader can open any page from the unpacked folder, or a single page sent on its own.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import os
import re
import zipfile
from importlib import resources
from pathlib import Path

from ..base.files import FileProblem, ReportBusy, atomic_path, project_root, report_lock, writable_file
from ..deploy.costs import exported
from ..deploy.export import INT8_TOLERANCE
from ..deploy.predictor import INPUT, OUTPUT, read_metadata
from ..scoring.shape import BAND, BORDER_FREE, UNCERTAIN
from ..training.experiments import load_run

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


ORT_WEB = "ORT_WEB_DIR"  # where onnxruntime-web's dist/ is, when not in the project's web/node_modules
PAGE = "segment.html"  # the page that segments the reader's own image (pack --with-model)


def ort_web_dir() -> Path:
    """onnxruntime-web's ``dist`` folder: ``$ORT_WEB_DIR``, else ``web/node_modules/onnxruntime-web/dist`` in the
    project (or in the package's own checkout); ``FileProblem`` with the fix when it is not installed."""
    names = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
    inside = Path("web") / "node_modules" / "onnxruntime-web" / "dist"
    candidates = (
        [Path(os.environ[ORT_WEB])]
        if os.environ.get(ORT_WEB)
        else [project_root() / inside, Path(__file__).resolve().parents[2] / inside]
    )
    for folder in candidates:
        if all((folder / name).is_file() for name in names):
            return folder
    raise FileProblem(
        f"the page that segments the reader's image runs the model with onnxruntime-web, which is not in "
        f"{candidates[0]}. Fix: install it with Node.js's npm (`npm ci --prefix web` in the project, or "
        f"`make pack WITH_MODEL=1`, which does), or set {ORT_WEB} to its dist/ folder."
    )


def _embedded(data: bytes) -> str:
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")


def page_model(out_dir: Path, run: str) -> tuple[Path, str]:
    """The exported model the page runs, and why that one: ``run``'s int8 export (the comparison chapter's,
    ``deploy/<run>/``, exported now when the chapter has not), or its fp32 export when int8 loses more validation
    JA than ``export`` accepts."""
    saved = load_run(out_dir, run)  # FileNotFoundError names the run folder
    seed = int(saved.seeds["seed"].min())
    fp32, int8, made = exported(saved.run_dir / f"seed{seed}" / "best.pt", out_dir / "deploy" / run)
    measured = made["int8"]
    before, after = measured["validation JA fp32"], measured["validation JA int8"]
    scores = f"validation JA {after:.3f} in int8, {before:.3f} in fp32"
    if before - after <= INT8_TOLERANCE:
        return int8, f"int8 ({scores})"
    return fp32, f"fp32 (int8 would lose more than the {INT8_TOLERANCE} tolerance: {scores})"


def segment_page(model: Path, why: str, title: str) -> str:
    """The self-contained page: the exported model, ONNX Runtime Web and its WebAssembly embedded, so that it opens
    from a file, offline, with nothing uploaded."""
    folder = ort_web_dir()
    meta = {**read_metadata(model), "input_name": INPUT, "output_name": OUTPUT}
    about = (
        f"The report's {meta['run']} model (seed {meta['seed']}, {meta['decoder']} decoder on {meta['encoder']}), "
        f"exported to ONNX in {why}, runs here in your browser with ONNX Runtime Web (WebAssembly): the image is "
        f"resized to {meta['image_size']} × {meta['image_size']} as the report does, segmented, and the mask brought "
        f"back to the image's size (threshold {meta['threshold']:.2f}"
        + (", the largest lesion kept" if meta["postprocess"] == "largest_component" else "")
        + ")."
    )
    text = resources.files("isic_utils.report").joinpath(PAGE).read_text(encoding="utf-8")
    values = {
        "TITLE": html.escape(title),
        "ABOUT": html.escape(about),
        "META": json.dumps(meta).replace("</", "<\\/"),
        "ORT_JS": _embedded((folder / "ort.wasm.bundle.min.mjs").read_bytes()),
        "ORT_GLUE": _embedded((folder / "ort-wasm-simd-threaded.mjs").read_bytes()),
        "ORT_WASM": _embedded((folder / "ort-wasm-simd-threaded.wasm").read_bytes()),
        "MODEL": _embedded(model.read_bytes()),
        "BAND": str(BAND),
        "UNCERTAIN": repr(UNCERTAIN),
        "BORDER_FREE": repr(BORDER_FREE),
    }
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], text)


def with_page_link(index: str, run: str) -> str:
    """``index.html`` with a line that leads to the page, under its title."""
    line = (
        f'<p class="answer"><a href="{PAGE}">Segment your own image</a> with the report\'s {html.escape(run)} model, '
        "in your browser (nothing is uploaded).</p>"
    )
    head = index.find("</h1>")
    return index[: head + 5] + line + index[head + 5 :] if head >= 0 else index.replace("<body>", "<body>" + line, 1)


def pack_report(
    out_dir: str | Path,
    target: str | Path | None = None,
    overwrite: bool = False,
    partial: bool = False,
    with_model: str | None = None,
) -> tuple[Path, int, list[Path], list[str]]:
    """Zip the report in ``out_dir`` into ``target`` (default ``<out_dir>-report.zip`` beside it), the files under a
    ``<name>-report/`` folder; returns (the zip, its size in bytes, files that name a folder of this machine, pages
    its index links that it lacks).

    Only a finished report is packed: one that a report is writing now, or whose ``index.html`` links a page that
    is not there, is refused unless ``partial`` (then packed as it is, the missing pages returned). ``target`` is
    replaced only when ``pack`` wrote it, or with ``overwrite``. ``with_model``: a run whose model the bundle's
    ``segment.html`` runs in the reader's browser (linked from its ``index.html``)."""
    out_dir = Path(out_dir)
    if not (out_dir / "index.html").is_file():
        raise FileNotFoundError(
            f"{out_dir / 'index.html'} not found: run the report first (make report DATA=…), then pack it."
        )
    target = writable_file(target or out_dir.parent / f"{out_dir.name}-report.zip", overwrite, packed_by_us)
    try:
        with report_lock(out_dir, shared=True):  # no report starts writing the folder while it is read
            return _pack(out_dir, target, partial, with_model)
    except ReportBusy as exc:
        if not partial:
            raise ReportBusy(
                f"{exc} Pack it when that report has finished, or pass --partial to pack what is there now."
            ) from None
        return _pack(out_dir, target, partial, with_model)


def _pack(
    out_dir: Path, target: Path, partial: bool, with_model: str | None
) -> tuple[Path, int, list[Path], list[str]]:
    files = bundle_files(out_dir)
    missing = missing_pages(out_dir, files)
    if missing and not partial:
        raise FileProblem(
            f"{out_dir}'s report is unfinished: its index links {len(missing)} file(s) that are not "
            f"there ({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}). Run the report to "
            "the end and pack it then, or pass --partial to pack it as it is."
        )
    folder = f"{out_dir.name}-report"
    page = None
    if with_model:  # built before the zip is opened: a missing onnxruntime-web stops here, nothing written
        ort_web_dir()
        model, why = page_model(out_dir, with_model)
        page = segment_page(model, why, f"{out_dir.name} report")
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            name = f"{folder}/{path.relative_to(out_dir).as_posix()}"
            if page is not None and path == out_dir / "index.html":
                archive.writestr(name, with_page_link(path.read_text(encoding="utf-8"), with_model))
            else:
                archive.write(path, name)
        if page is not None:
            archive.writestr(f"{folder}/{PAGE}", page)
        archive.comment = MARK
    folders = [project_root(), Path.home()]
    named = machine_paths(files, folders)
    if page is not None and any(str(folder) in page for folder in folders if len(str(folder)) > 1):
        named.append(out_dir / PAGE)
    return target, target.stat().st_size, named, missing
