"""Command line: ``python -m isic_utils report``, ``python -m isic_utils predict``,
``python -m isic_utils options`` (what each generalisation option of task 3 buys), ``python -m isic_utils adapt`` (a
trained checkpoint adapted to another clinic's images) and ``python -m isic_utils pack`` (the finished report as one
zip to hand over)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path


def _parse_set(items: list[str]) -> dict:
    from .config.params import parse_override

    return dict(parse_override(item) for item in items)


def _interrupt_quietly(signum, frame) -> None:
    """Ctrl-C: from now on the libraries that stop the chapter's kernel log nothing (a dead kernel's "Task exception
    was never retrieved", nbclient's "Kernel died"); the command ends with its own one line."""
    for name in ("asyncio", "traitlets", "papermill", "nbclient"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where Ctrl-C is ignored or handled
    if ours:
        signal.signal(signal.SIGINT, _interrupt_quietly)
    try:
        return _command(argv)
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _command(argv: list[str] | None) -> int:
    from .model.inference import TTA
    from .scoring.metrics import POSTPROCESSING

    parser = argparse.ArgumentParser(prog="python -m isic_utils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("report", help="run every chapter with papermill and export HTML")
    rep.add_argument("--data", default="synthetic", help="data profile in params/profiles/ (default: synthetic)")
    rep.add_argument("--force", action="store_true", help="rerun every chapter, retraining the runs from scratch")
    rep.add_argument("--only", nargs="*", help="run only these steps (eda task1 task2 task3 external compare)")
    rep.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override parameters")
    pred = commands.add_parser("predict", help="write masks at original size for a folder of images")
    pred.add_argument(
        "--checkpoint",
        required=True,
        help="a best.pt from a training run, or a .onnx file export wrote (run by ONNX Runtime, flips as exported)",
    )
    pred.add_argument("--input", required=True, help="folder of JPEG/PNG/BMP/TIFF images")
    pred.add_argument("--output", required=True, help="folder for <id>_Segmentation.png masks")
    pred.add_argument("--overlays", action="store_true", help="also write <id>_overlay.jpg")
    pred.add_argument(
        "--overwrite",
        action="store_true",
        help="replace masks/overlays that exist already in --output (refused otherwise)",
    )
    pred.add_argument("--tta", choices=TTA, help="test-time flips (default: as the run was scored)")
    pred.add_argument(
        "--postprocess",
        choices=POSTPROCESSING,
        help="keep the largest lesion, holes filled (default: as the run was scored)",
    )
    opt = commands.add_parser(
        "options",
        help="train task 3 without and with each generalisation option (three seeds "
        "each unless --set seeds=...), score them on validation and the external "
        "sets' halves, choose (outputs/<profile>/options)",
    )
    opt.add_argument("--data", default="synthetic", help="data profile in params/profiles/ (default: synthetic)")
    opt.add_argument("--epochs", type=int, help="epochs per run (default: task 3's)")
    opt.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override parameters")
    opt.add_argument(
        "--only",
        nargs="+",
        metavar="OPTION",
        help="train the base and these training options alone (e.g. 256_px, or base for none), not every one",
    )
    pack = commands.add_parser(
        "pack", help="zip a finished report's pages, tables and figures to hand over (no checkpoints, no caches)"
    )
    pack.add_argument("--data", default="synthetic", help="data profile whose report to pack (default: synthetic)")
    pack.add_argument("--output", help="the zip to write (default: outputs/<profile>-report.zip)")
    pack.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output even when it is not a zip that pack wrote (refused otherwise)",
    )
    pack.add_argument(
        "--with-model",
        nargs="?",
        const="task3",
        metavar="RUN",
        help="add segment.html: the run's exported model (default task3) segments the reader's own image in their "
        "browser (needs onnxruntime-web: npm ci --prefix web)",
    )
    pack.add_argument(
        "--partial", action="store_true", help="pack a report that is unfinished or still running, saying what it lacks"
    )
    adapt = commands.add_parser(
        "adapt",
        help="adapt a checkpoint to another clinic: batch-norm statistics from its "
        "images (no labels), or fine-tuned on k labelled cases (--masks)",
    )
    adapt.add_argument("--checkpoint", required=True, help="a best.pt from a training run")
    adapt.add_argument("--images", required=True, help="folder of the clinic's images")
    adapt.add_argument(
        "--masks",
        help="folder of their masks (<id>_Segmentation.png, <id>_lesion.bmp, <id>.png): fine-tune on labelled cases",
    )
    adapt.add_argument(
        "--method",
        choices=("batchnorm", "threshold", "fine-tune"),
        help="batchnorm: statistics from the images, no labels; threshold: only the threshold, chosen on k labelled "
        "cases; fine-tune: the model fine-tuned on them (default: fine-tune with --masks, batchnorm without). "
        "Which to start with: chapter 3's adaptation table",
    )
    adapt.add_argument("--k", type=int, help="labelled cases to choose on or fine-tune on (default: all)")
    adapt.add_argument("--seed", type=int, default=0, help="which k cases are drawn, and the fine-tune's seed")
    adapt.add_argument("--output", help="the adapted checkpoint (default: beside --checkpoint)")
    adapt.add_argument("--overwrite", action="store_true", help="replace --output if it exists (refused otherwise)")
    export = commands.add_parser(
        "export",
        help="a checkpoint as an ONNX file that says what it is (size, normalisation, threshold, confidence rule); "
        "--int8 quantises it, measured on validation first",
    )
    export.add_argument("--checkpoint", required=True, help="a best.pt from a training run (adapted ones too)")
    export.add_argument("--int8", action="store_true", help="int8 (QDQ, per-channel), calibrated on training images")
    export.add_argument(
        "--tolerance", type=float, default=0.005, help="validation JA int8 may cost before it is refused"
    )
    export.add_argument("--output", help="the .onnx file (default: beside --checkpoint, best.onnx or best-int8.onnx)")
    export.add_argument("--overwrite", action="store_true", help="replace --output if it exists (refused otherwise)")
    args = parser.parse_args(argv)

    from .base.files import FileProblem, ReportBusy, os_error_sentence
    from .config.params import ParameterError
    from .data.sources import DataError
    from .deploy.predictor import ModelFileError
    from .model.inference import CheckpointMismatch
    from .report.pipeline import ChapterFailed

    try:
        if args.command == "report":
            from .report.pipeline import run_report

            run_report(args.data, force=args.force, only=args.only, overrides=_parse_set(args.set))
        elif args.command == "options":
            from .evaluation.generalisation import options_study

            options_study(args.data, args.epochs, _parse_set(args.set), only=args.only)
        elif args.command == "pack":
            from .config.params import absolute, chapter_values
            from .report.handover import pack_report

            out_dir = absolute(chapter_values("eda", args.data)["output_dir"])
            target, size, named, missing = pack_report(
                out_dir, args.output, args.overwrite, args.partial, args.with_model
            )
            print(
                f"packed {out_dir.name}'s report into {target} ({size / 2**20:.1f} MB): open index.html in the "
                "unpacked folder"
                + (f" (segment.html: {args.with_model}'s model in the browser)" if args.with_model else "")
            )
            if missing:
                print(
                    f"warning: the report is unfinished: {len(missing)} file(s) its index links are not in the zip "
                    f"({', '.join(missing)})",
                    file=sys.stderr,
                )
            for path in named:
                print(
                    f"warning: {path} names a folder of this machine (a data_dir or weights path given as an "
                    "absolute path?)",
                    file=sys.stderr,
                )
        elif args.command == "export":
            from .deploy.export import Int8TooCostly, export_checkpoint

            try:
                target, described = export_checkpoint(
                    args.checkpoint, args.output, args.int8, args.overwrite, args.tolerance
                )
            except Int8TooCostly as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            line = f"wrote {target} ({target.stat().st_size / 2**20:.1f} MB, {described['precision']})"
            if "int8" in described:
                measured = described["int8"]
                line += (
                    f": validation JA {measured['validation JA fp32']:.4f} in fp32, "
                    f"{measured['validation JA int8']:.4f} in int8 ({measured['validation images']} images)"
                )
            print(line)
        elif args.command == "adapt":
            from .evaluation.adaptation import adapt_checkpoint

            target, adapted = adapt_checkpoint(
                args.checkpoint, args.images, args.masks, args.k, args.seed, args.output, args.overwrite, args.method
            )
            how = {
                "batchnorm": "batch-norm statistics from",
                "threshold": f"threshold {adapted.get('threshold', 0.5):.2f} (was "
                f"{adapted.get('threshold before', 0.5):.2f}) chosen on",
                "fine-tune": "fine-tuned on",
            }[adapted["method"]]
            print(
                f"wrote {target}: {how} {adapted['cases']} case(s) of {adapted['from']}; apply it with predict "
                f"--checkpoint {target}"
            )
        elif args.checkpoint.endswith(".onnx"):  # an exported model: the torch-free engine
            from .deploy.predictor import CONFIDENCE_FILE, confidence_summary, predict_folder

            if args.tta is not None:
                raise ParameterError("--tta: an exported model's test-time flips are fixed at export; leave it out.")
            written = predict_folder(
                args.checkpoint, args.input, args.output, args.overlays, args.postprocess, args.overwrite
            )
        else:
            from .predict import CONFIDENCE_FILE, confidence_summary, predict_folder

            written = predict_folder(
                args.checkpoint, args.input, args.output, args.overlays, args.tta, args.postprocess, args.overwrite
            )
            print(f"wrote {len(written)} masks to {args.output}")
            print(confidence_summary(Path(args.output) / CONFIDENCE_FILE))
    except (
        ParameterError,
        ChapterFailed,
        DataError,
        CheckpointMismatch,
        ModelFileError,
        FileNotFoundError,
        FileProblem,
        ReportBusy,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only, full disk, a file where a folder should be: a sentence, not a traceback
        print(f"error: {os_error_sentence(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: a sentence, not a traceback; every file written so far is whole
        again = (
            "every finished epoch and chapter is kept: run the same command again to continue"
            if args.command in ("report", "options")
            else "files already written are whole"
        )
        print(f"\ninterrupted: {again}.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
