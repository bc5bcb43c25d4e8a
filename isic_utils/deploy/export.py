"""A trained checkpoint as an ONNX file that needs nothing else to be applied: the model with its normalisation, its
sigmoid and (when the run scored with them) its test-time flips inside the graph, and in the file's metadata
(``META_KEY``) everything a predictor does around it — image size, colour constancy, threshold, post-processing, the
confidence rule and its flag threshold, the encoder's provenance, the run and seed, an adaptation.

The graph's input ``image`` is float32 ``N×3×S×S``: RGB values 0–255 of the image resized to S × S (bilinear, as the
report decodes) after its colour constancy; its output ``probability`` is ``N×1×S×S``.

``--int8``: static quantisation with ONNX Runtime's tools (QDQ, per-channel int8 weights in 7 bits, uint8 activations),
calibrated on the run's own training images (never validation or test), and measured before it is written: the mean
per-image JA on the run's validation set at original size, fp32 against int8. An int8 model that loses more than the
tolerance is not written; the command says what it would cost.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..base.files import atomic_path, shown_path, writable_file
from ..data.sources import DataError
from ..model.inference import CheckpointMismatch, flip_averaged, load_checkpoint, load_trained
from ..scoring import metrics
from ..training.experiments import prepare_data
from .predictor import FORMAT, INPUT, META_KEY, OUTPUT, graph_input, read_metadata, session  # noqa: F401  (read_metadata: the API)

INT8_TOLERANCE = 0.005  # the validation JA int8 may cost before it is refused
CALIBRATION_IMAGES = 128  # training images that calibrate int8's activation ranges


class _Deployed(torch.nn.Module):
    """The trained model as the ONNX graph holds it: 0–255 input → normalised → logits → probability (flip-averaged
    when the run scored with flips)."""

    def __init__(self, model: torch.nn.Module, meta: dict):
        super().__init__()
        self.model = model
        self.flips = meta.get("tta", "none") == "flips"
        self.register_buffer("mean", torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return flip_averaged(self.model, (image - self.mean) / self.std, "flips" if self.flips else "none")


def run_params(checkpoint: Path) -> dict:
    """The parameters of the run a ``seed<k>/best.pt`` belongs to (its ``run.json``), or {} for a checkpoint that
    left its run folder."""
    record = checkpoint.parent.parent / "run.json"
    try:
        return (
            dict(json.loads(record.read_text()).get("params") or {})
            if checkpoint.parent.name.startswith("seed")
            else {}
        )
    except (OSError, ValueError):
        return {}


def describe(checkpoint: Path, state: dict, meta: dict) -> dict:
    """What the ONNX file says of itself (``META_KEY``): all a predictor needs, and where the model came from."""
    config = state.get("config") or {}
    run = run_params(checkpoint).get("run_name") or (
        checkpoint.parent.parent.name if checkpoint.parent.name.startswith("seed") else checkpoint.stem
    )
    return {
        "format": FORMAT,
        "input": f"{INPUT}: float32 N×3×S×S, RGB 0–255, the image resized to S×S (bilinear) after its colour constancy",
        "output": f"{OUTPUT}: float32 N×1×S×S, the lesion's probability per pixel (flip-averaged when tta is flips)",
        "image_size": int(meta["image_size"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "color_constancy": meta.get("color_constancy", "none"),
        "tta": meta.get("tta", "none"),
        "threshold": float(meta.get("threshold", 0.5)),
        "postprocess": meta.get("postprocess", "none"),
        "calibration": meta.get("calibration") or {},
        "encoder": meta.get("encoder"),
        "decoder": meta.get("decoder"),
        "encoder_weights": meta.get("encoder_weights") or {},
        "run": run,
        "seed": config.get("seed"),
        "adapted": meta.get("adapted"),
        "checkpoint": shown_path(checkpoint),
        "precision": "fp32",
    }


def _with_metadata(path: Path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    model.doc_string = f"{meta['run']} seed {meta['seed']} ({meta['precision']}): lesion segmentation, isic_utils"
    onnx.save(model, str(path))


def _export_fp32(model: torch.nn.Module, meta: dict, target: Path) -> None:
    size = int(meta["image_size"])
    example = torch.full((1, 3, size, size), 128.0)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its notice that a newer exporter exists, not the user's
        torch.onnx.export(  # the TorchScript exporter: seconds, where the dynamo one takes a minute on 2 cores
            _Deployed(model, meta).eval(),
            (example,),
            str(target),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def onnx_probabilities(path_or_session, meta: dict, images_uint8: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """The exported model's probabilities for decoded uint8 images, as a tensor (for scoring beside PyTorch's)."""
    run = session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    out = [
        run.run([OUTPUT], {INPUT: graph_input(meta, images_uint8[k : k + batch].numpy())})[0]
        for k in range(0, len(images_uint8), batch)
    ]
    return torch.from_numpy(np.concatenate(out))


def _validation_ja(path: Path, meta: dict, split) -> float:
    probabilities = onnx_probabilities(path, meta, split.images)
    counts = metrics.original_size_counts(probabilities, split, meta["threshold"], meta["postprocess"])
    return float(metrics.scores(counts)["iou"].mean())


def _quantise(fp32: Path, target: Path, meta: dict, params: dict, tolerance: float) -> dict:
    """int8 from ``fp32`` into ``target`` when it costs at most ``tolerance`` validation JA; what it measured.
    ``params``: the run's (its data)."""
    from onnxruntime.quantization import CalibrationDataReader

    if not params:
        raise CheckpointMismatch(
            "int8 calibrates on the run's training images, and this checkpoint is not in its run's folder "
            "(outputs/<profile>/<run>/seed<k>/best.pt, beside the run's run.json), which says what data it was "
            "trained on. Export it from there, or without --int8."
        )
    try:
        data = prepare_data({**params, "download": False}, progress=False)
    except DataError as exc:
        raise DataError(
            f"int8 calibrates on the run's own training images and measures its cost on its validation images; "
            f"they are not here: {exc}"
        ) from exc
    chosen = np.random.default_rng(0).permutation(len(data.train))[:CALIBRATION_IMAGES]  # the run's own split
    calibration = data.train.subset(sorted(data.train.ids[k] for k in chosen))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                {INPUT: graph_input(meta, calibration.images[k : k + 8].numpy())} for k in range(0, len(calibration), 8)
            )

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        quantised = Path(scratch) / "int8.onnx"
        quantise(fp32, quantised, Reader())
        before, after = _validation_ja(fp32, meta, data.val), _validation_ja(quantised, meta, data.val)
        measured = {
            "validation JA fp32": before,
            "validation JA int8": after,
            "validation images": len(data.val),
            "calibration images": len(calibration),
            "tolerance": tolerance,
        }
        if before - after > tolerance:
            raise Int8TooCostly(
                f"int8 would cost {before - after:.4f} validation JA ({before:.4f} → {after:.4f} on "
                f"{len(data.val)} images), more than the tolerance {tolerance}: not written. Use the fp32 export, "
                "or pass --tolerance to accept the loss."
            )
        _with_metadata(quantised, {**meta, "precision": "int8", "int8": measured, "quantisation": QUANTISATION})
        with atomic_path(target) as tmp:
            os.replace(quantised, tmp)
    return measured


QUANTISATION = "QDQ, per-channel int8 weights in 7 bits (reduce_range), uint8 activations"


def quantise(fp32: Path, target: Path, reader) -> None:
    """ONNX Runtime's static int8 (``QUANTISATION``) of ``fp32`` into ``target``, its activation ranges from
    ``reader`` (a ``CalibrationDataReader``).

    Weights keep 7 bits: on x86 CPUs without VNNI (AVX2, plain AVX-512) ONNX Runtime multiplies uint8 by int8 with
    an instruction whose int16 sums saturate, and full-range weights then cost the U-Net 0.010 JA on the held-out
    ISIC test set (0.0016 with 7 bits, at the same speed); int8 activations (S8S8) saturate alike there."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(f"{target.stem}.prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(prepared),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
        )
    finally:
        prepared.unlink(missing_ok=True)


class Int8TooCostly(RuntimeError):
    """int8 would lose more validation JA than the tolerance: nothing was written."""


def default_target(checkpoint: Path, int8: bool) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}{'-int8' if int8 else ''}.onnx")


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path | None = None,
    int8: bool = False,
    overwrite: bool = False,
    tolerance: float = INT8_TOLERANCE,
) -> tuple[Path, dict]:
    """Export ``checkpoint`` (a ``best.pt``, adapted or not) to ONNX at ``output`` (default: beside it, ``best.onnx``
    or ``best-int8.onnx``); returns (the file, its metadata). Nothing is replaced unless ``overwrite``."""
    checkpoint = Path(checkpoint)
    target = writable_file(output or default_target(checkpoint, int8), overwrite)
    model, meta = load_trained(checkpoint)
    state = load_checkpoint(checkpoint)
    described = describe(checkpoint, state, meta)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        fp32 = Path(scratch) / "fp32.onnx"
        _export_fp32(model, meta, fp32)
        _with_metadata(fp32, described)
        if int8:
            measured = _quantise(fp32, target, described, run_params(checkpoint), tolerance)
            described = {**described, "precision": "int8", "int8": measured, "quantisation": QUANTISATION}
        else:
            with atomic_path(target) as tmp:
                os.replace(fp32, tmp)
    return target, described
