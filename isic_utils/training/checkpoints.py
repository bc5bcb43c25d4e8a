"""What a run saves and how it resumes: ``last.pt`` (model, optimiser, scaler, every random stream, the history)
and ``best.pt`` (the validation-selected weights and what the model is, for ``predict``), written atomically; the
fingerprint a checkpoint must match to be resumed, with what differs and the fix when it does not; a ``best.pt`` one
improvement behind its ``last.pt`` (a kill between the two writes) mended on resume.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from ..base.files import atomic_path
from ..config.params import TrainConfig
from ..data import augmentation
from ..data.splits import ReportData
from ..model.inference import CheckpointMismatch, load_checkpoint, model_meta
from ..model.networks import SegmentationModel, count_parameters


def rng_state(generator: torch.Generator, device: str) -> dict:
    """Every random stream a resumed run must continue: torch's CPU and (on a GPU) CUDA state, and the generator
    that shuffles and draws augmentations."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: str) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@dataclass
class Progress:
    """Where a run stands: the per-epoch rows so far and the epoch chosen by validation IoU."""

    rows: list[dict] = field(default_factory=list)
    best_iou: float = -math.inf
    best_epoch: int = 0
    fingerprint: dict | None = None  # what the resumed last.pt was trained under (None: nothing resumed)


def run_fingerprint(model: SegmentationModel, data: ReportData, config: TrainConfig) -> tuple[dict, dict]:
    """(what a checkpoint must match to be resumed, the encoder's starting-weights record)."""
    image_size = int(data.train.images.shape[-1])
    meta = model_meta(model, image_size)
    weights = meta.pop("encoder_weights")
    ids = "\n".join(sorted(data.train.ids)) + "\n--\n" + "\n".join(sorted(data.val.ids))
    fingerprint = {
        **config.fingerprint(),
        "image_size": image_size,
        **meta,
        "train_ids": len(data.train),
        "data_ids_sha256": hashlib.sha256(ids.encode()).hexdigest(),
        "params": count_parameters(model)["total"],
        "encoder_sha256": weights.get("sha256"),
        "augmentation_constants": augmentation.constants(config.augment),
    }
    return fingerprint, weights


def resume_or_start(
    model,
    optimizer,
    scaler,
    generator: torch.Generator,
    fingerprint: dict,
    weights: dict,
    config: TrainConfig,
    run_dir: Path,
    resume: bool,
    announce: str | None,
    average: AveragedModel | None = None,
) -> Progress:
    """Continue from ``last.pt`` when asked and it matches (else ``CheckpointMismatch``); or start afresh. The run's
    weight ``average``, when it keeps one, continues from there too."""
    last_path = run_dir / "last.pt"
    if not resume:
        for stale in (last_path, run_dir / "best.pt"):
            stale.unlink(missing_ok=True)
    if not last_path.exists():
        return Progress()
    state = load_checkpoint(last_path)
    check_resumable(state, fingerprint, weights, config.epochs, last_path)
    mend_best(state, model, fingerprint, config, run_dir / "best.pt")
    model.load_state_dict(state["model"])
    if average is not None:
        average.load_state_dict(state["average"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], generator, config.device)
    if announce:
        print(f"{announce}: resuming after epoch {len(state['history'])} of {config.epochs}", flush=True)
    return Progress(state["history"], state["best_iou"], state["best_epoch"], state.get("fingerprint") or {})


def best_meta(model: SegmentationModel, fingerprint: dict, config: TrainConfig, trained_on: dict) -> dict:
    """What ``best.pt`` says of itself, so ``predict`` and chapter 3 apply it as the run was scored."""
    return {
        **model_meta(model, fingerprint["image_size"]),
        "trained_on": trained_on,
        "color_constancy": config.color_constancy,
        "tta": config.tta,
        "postprocess": config.postprocess,
    }


def best_state(weights: dict, meta: dict, epoch: int, val_iou: float, fingerprint: dict) -> dict:
    return {"model": weights, "meta": meta, "epoch": epoch, "val_iou_mean": val_iou, "config": fingerprint}


def record_calibration(best_path: Path, calibration: dict, kept: tuple[str, ...]) -> None:
    """Write the ``kept`` keys of a run's calibration (chosen on validation after training) into ``best.pt``'s meta,
    so that ``predict`` applies the same temperature, confidence and flagging threshold."""
    state = load_checkpoint(best_path)
    recorded = {key: calibration[key] for key in kept}
    if _as_json(state["meta"].get("calibration")) != _as_json(recorded):  # NaN (a run that learned nothing) == NaN
        state["meta"]["calibration"] = recorded
        save(state, best_path)


def _as_json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def mend_best(state: dict, model: SegmentationModel, fingerprint: dict, config: TrainConfig, best_path: Path) -> None:
    """A run killed between writing ``last.pt`` and ``best.pt`` left ``best.pt`` one improvement behind the history:
    the best epoch is then the last one trained, whose weights ``last.pt`` holds; write them as ``best.pt``."""
    best_epoch, trained = state["best_epoch"], len(state["history"])
    saved = load_checkpoint(best_path).get("epoch") if best_path.exists() else None
    if best_epoch and saved != best_epoch and best_epoch == trained:
        meta = best_meta(model, fingerprint, config, state["trained_on"])
        save(best_state(judged_weights(state), meta, best_epoch, state["best_iou"], fingerprint), best_path)


def judged_weights(state: dict) -> dict:
    """The weights a ``last.pt`` was validated with: its weight average's when the run keeps one, else the model's."""
    if "average" not in state:
        return state["model"]
    return {key.removeprefix("module."): value for key, value in state["average"].items() if key != "n_averaged"}


# compared only where a checkpoint has them: older runs still resume
ADDED_TO_FINGERPRINT = ("data_ids_sha256", "augmentation_constants")


def check_resumable(state: dict, fingerprint: dict, weights: dict, epochs: int, last_path: Path) -> None:
    """Raise ``CheckpointMismatch`` unless ``state`` (a ``last.pt``) continues the run ``fingerprint`` describes."""
    run = last_path.parent.parent.name
    fix = (
        f"Nothing was changed. To train this run afresh with the new configuration, rerun with --force "
        f"(`python -m isic_utils report --force --only {run}` plus your --set; with papermill `-p resume False`; "
        "in the notebook `resume = False`). To keep the trained run, give the new one another output_dir."
    )
    saved = state.get("fingerprint") or {}
    fingerprint = {k: v for k, v in fingerprint.items() if k in saved or k not in ADDED_TO_FINGERPRINT}
    if saved != fingerprint:
        changes = []
        for key in sorted(set(saved) | set(fingerprint)):
            if saved.get(key) == fingerprint.get(key):
                continue
            if key == "encoder_sha256":
                before = state.get("encoder_weights", {})
                changes.append(
                    f"encoder weights: {before.get('source', '?')} (sha256 {str(saved.get(key))[:12]}) → "
                    f"{weights.get('source', '?')} (sha256 {str(fingerprint.get(key))[:12]})"
                )
            else:
                changes.append(f"{key}: {saved.get(key, '(absent)')} → {fingerprint.get(key, '(absent)')}")
        raise CheckpointMismatch(
            f"{last_path} was trained with another configuration:\n  " + "\n  ".join(changes) + f"\n{fix}"
        )
    trained = len(state["history"])
    if trained > epochs:
        raise CheckpointMismatch(
            f"{last_path} has {trained} epochs trained, but the run asks for {epochs}: its "
            f"history and chosen checkpoint would not be a {epochs}-epoch run. {fix}"
        )
