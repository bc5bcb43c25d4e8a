"""Training and evaluation: batches sliced from memory, one epoch, one evaluation, the fit loop with
per-epoch atomic checkpoints, resume, selection on validation and one final scoring of the test set.

Speed (see ``benchmarks/bench_training.py``): the data set is one uint8 tensor in memory, batches are sliced,
augmented and normalised in batch; the model runs ``channels_last``; ``precision="auto"`` uses bf16 autocast
only where the CPU has native bf16 (AMX or AVX512-BF16; elsewhere bf16 is emulated and far slower than fp32),
CUDA autocast on a GPU; AdamW is ``fused``. With a frozen encoder and at most flip augmentation, the encoder's
features are computed once per image and flip (``feature_cache``), which gives the same result as encoding
every batch (the encoder is deterministic in eval mode) at a fraction of the cost.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from . import metrics
from .data import DecodedSplit, ReportData, apply_augmentation, draw_augmentation, normalize
from .files import atomic_path, epoch_line, progress_bar
from .model import SegmentationModel, count_parameters

FLIPS = ("hflip", "vflip")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointMismatch(RuntimeError):
    """A checkpoint holds another configuration than the one asked for."""


# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything that decides a training run's result (its fingerprint guards resume)."""

    freeze_encoder: bool = True
    encoder_lr: float = 1e-4
    decoder_lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    augment: Sequence[str] = ("hflip", "vflip")
    loss: str = "bce"  # "bce" or "bce+dice"
    precision: str = "auto"  # "auto", "fp32", "bf16"
    channels_last: bool = True
    feature_cache: bool = True  # used only when the encoder is frozen and augmentation is flips at most
    monitor_test: bool = True  # score the test set every epoch (monitoring only, never for selection)
    eval_batch_size: int = 64
    device: str = "cpu"

    def fingerprint(self) -> dict:
        keep = asdict(self)
        keep["augment"] = list(self.augment)
        for volatile in ("precision", "channels_last", "feature_cache", "eval_batch_size", "device", "epochs",
                         "monitor_test"):
            keep.pop(volatile)
        return keep


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AMX tiles or AVX512-BF16)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch
        return False


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``auto`` → ``bf16`` on a GPU or a CPU with native bf16, else ``fp32``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: str):
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (dropout, initialisation) and return a generator for shuffling/augmentation."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- batches


def batch_indices(count: int, batch_size: int, generator: torch.Generator | None, drop_single: bool = False):
    """Index tensors covering ``range(count)``, shuffled with ``generator`` (in order when None).

    With ``drop_single`` a last batch of one image is dropped (train-mode BatchNorm cannot use it).
    """
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    chunks = list(order.split(batch_size))
    if drop_single and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()
    return chunks


# ----------------------------------------------------------------------------- feature cache


def uses_feature_cache(model: SegmentationModel, config: TrainConfig) -> bool:
    return bool(config.feature_cache and model.freeze_encoder and set(config.augment) <= set(FLIPS))


def flip_variants(augment: Sequence[str]) -> list[tuple[bool, bool]]:
    """(hflip, vflip) combinations that ``augment`` can produce; index = hflip + 2 * vflip when both are on."""
    hs = (False, True) if "hflip" in augment else (False,)
    vs = (False, True) if "vflip" in augment else (False,)
    return [(h, v) for v in vs for h in hs]


@torch.no_grad()
def encode_all(model: SegmentationModel, images: torch.Tensor, precision: str, device: str, batch_size: int = 64,
               channels_last: bool = True, hflip: bool = False, vflip: bool = False):
    """The frozen encoder's features for every image (after the given flips), kept on the CPU."""
    spec = model.spec
    outputs = None
    for rows in batch_indices(len(images), batch_size, None):
        batch = images[rows]
        if hflip:
            batch = batch.flip(-1)
        if vflip:
            batch = batch.flip(-2)
        x = _to_input(batch, spec, device, channels_last)
        with autocast(precision, device):
            features = model.encode(x)
        features = [features] if torch.is_tensor(features) else features
        if outputs is None:
            outputs = [[] for _ in features]
        for store, feature in zip(outputs, features):
            store.append(feature.cpu())
    joined = [torch.cat(store) for store in outputs]
    return joined[0] if len(joined) == 1 else joined


def _select_features(features, rows: torch.Tensor):
    return features[rows] if torch.is_tensor(features) else [f[rows] for f in features]


def _cached_batch(cache: list, variants: torch.Tensor, rows: torch.Tensor, device: str):
    """Features for ``rows`` from the flip variant each image drew (``variants``: one index per row).

    ``cache`` holds one entry per flip variant: a tensor (the deepest map) or, for a decoder with skips, a list
    of tensors (one per level); the result has the same form.
    """
    def gather(stores: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty((len(rows), *stores[0].shape[1:]), dtype=stores[0].dtype)
        for v, store in enumerate(stores):
            chosen = variants == v
            if chosen.any():
                out[chosen] = store[rows[chosen]]
        return out.to(device)

    if torch.is_tensor(cache[0]):
        return gather(cache)
    return [gather([variant[level] for variant in cache]) for level in range(len(cache[0]))]


# ----------------------------------------------------------------------------- one step, one epoch, one evaluation


def _to_input(images_uint8: torch.Tensor, spec, device: str, channels_last: bool) -> torch.Tensor:
    x = normalize(images_uint8, spec.mean, spec.std).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per image, averaged (computed on probabilities)."""
    probabilities = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    intersection = (probabilities * targets).sum(1)
    return (1 - (2 * intersection + eps) / (probabilities.sum(1) + targets.sum(1) + eps)).mean()


def loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``bce`` (BCE with logits, the report's loss) or ``bce+dice``; always computed in fp32."""
    if kind == "bce":
        return lambda logits, targets: nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
    if kind == "bce+dice":
        return lambda logits, targets: (nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
                                        + soft_dice_loss(logits.float(), targets))
    raise ValueError(f"loss must be 'bce' or 'bce+dice', got {kind!r}")


@dataclass
class Evaluation:
    """Mean loss, per-image confusion counts and (optionally) the fp32 probability maps of one evaluated split."""

    loss: float
    counts: torch.Tensor
    probabilities: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss, **metrics.summarize(self.counts)}


@torch.inference_mode()
def evaluate(model: SegmentationModel, split: DecodedSplit, config: TrainConfig, precision: str,
             features=None, keep_probabilities: bool = False) -> Evaluation:
    """Loss and per-image counts over the **whole** split (threshold 0.5 on probabilities)."""
    model.eval()
    criterion = loss_fn(config.loss)
    total, counts, kept = 0.0, [], []
    for rows in batch_indices(len(split), config.eval_batch_size, None):
        targets = split.masks[rows].float().to(config.device)
        with autocast(precision, config.device):
            if features is not None:
                logits = model.decoder(_move(_select_features(features, rows), config.device))
            else:
                logits = model(_to_input(split.images[rows], model.spec, config.device, config.channels_last))
        logits = logits.float()
        total += float(criterion(logits, targets)) * len(rows)
        probabilities = torch.sigmoid(logits)
        counts.append(metrics.confusion_counts(probabilities, targets).cpu())
        if keep_probabilities:
            kept.append(probabilities.cpu())
    return Evaluation(total / len(split), torch.cat(counts), torch.cat(kept) if keep_probabilities else None)


def _move(features, device: str):
    return features.to(device) if torch.is_tensor(features) else [f.to(device) for f in features]


def build_optimizer(model: SegmentationModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with a decoder group (``decoder_lr``) and, when the encoder trains, an encoder group (``encoder_lr``)."""
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": config.decoder_lr,
               "name": "decoder"}]
    if not model.freeze_encoder:
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": config.encoder_lr,
                       "name": "encoder"})
    fused = config.device.startswith("cuda") or hasattr(torch, "_fused_adamw_")  # the CPU kernel's op (torch >= 2.4)
    try:
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused)
    except (RuntimeError, TypeError):  # fused not available on this build/device
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def train_epoch(model: SegmentationModel, split: DecodedSplit, optimizer, config: TrainConfig, precision: str,
                generator: torch.Generator, feature_cache: list | None = None,
                on_step: Callable[[int], None] | None = None, desc: str = "train") -> float:
    """One pass over ``split`` in seeded random order; returns the mean training loss.

    Raises ``TrainingDiverged`` on a NaN or infinite loss (before the optimiser steps on it).
    """
    model.train()
    criterion = loss_fn(config.loss)
    total, seen = 0.0, 0
    chunks = batch_indices(len(split), config.batch_size, generator, drop_single=not model.freeze_encoder)
    horizontal_choices = 2 if "hflip" in config.augment else 1
    for step, rows in enumerate(progress_bar(chunks, total=len(chunks), desc=desc)):
        draws = draw_augmentation(len(rows), config.augment, generator)
        masks = split.masks[rows]
        if feature_cache is not None:
            inputs = _cached_batch(feature_cache, _variant_index(draws, len(rows), horizontal_choices), rows,
                                   config.device)
            _, masks = apply_augmentation(masks, masks, draws)  # flip the masks like the cached features
        else:
            images, masks = apply_augmentation(split.images[rows], masks, draws)
            inputs = _to_input(images, model.spec, config.device, config.channels_last)
        targets = masks.float().to(config.device)
        with autocast(precision, config.device):
            logits = model.decoder(inputs) if feature_cache is not None else model(inputs)
        loss = criterion(logits, targets)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at batch {step}. Training stopped; the last complete epoch's checkpoint "
                "is kept. Fix: lower the learning rates, or use precision='fp32'."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(rows)
        seen += len(rows)
        if on_step is not None:
            on_step(step)
    return total / max(seen, 1)


def _variant_index(draws: dict, count: int, horizontal_choices: int) -> torch.Tensor:
    """Index into ``flip_variants`` (ordered vflip-major): hflip + horizontal_choices * vflip."""
    h = draws.get("hflip", torch.zeros(count, dtype=torch.bool)).long()
    v = draws.get("vflip", torch.zeros(count, dtype=torch.bool)).long()
    return h + horizontal_choices * v


# ----------------------------------------------------------------------------- checkpoints


def _rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "generator": generator.get_state()}


def _save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def model_meta(model: SegmentationModel, image_size: int) -> dict:
    """What a checkpoint must say about the model so that ``predict`` can rebuild and check it."""
    return {
        "encoder": model.spec.name,
        "decoder": "unet" if getattr(model.decoder, "needs_skips", False) else "report",
        "dropout": _dropout_of(model),
        "image_size": image_size,
        "mean": list(model.spec.mean),
        "std": list(model.spec.std),
        "threshold": 0.5,
        "encoder_weights": dict(getattr(model, "encoder_weights", {})),
    }


def _dropout_of(model: SegmentationModel) -> float:
    for module in model.decoder.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout2d)):
            return float(module.p)
    return 0.0


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by ``fit`` (safely: ``weights_only=True``)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CheckpointMismatch(
            f"{path} cannot be read as a checkpoint of this project ({exc}). Delete it to start the run afresh."
        ) from exc


# ----------------------------------------------------------------------------- the fit loop


@dataclass
class FitResult:
    """History (one row per epoch), the chosen epoch and the final test scoring with its checkpoint."""

    history: pd.DataFrame
    best_epoch: int
    test: Evaluation
    val: Evaluation
    run_dir: Path
    precision: str
    used_feature_cache: bool
    seconds: float
    timings: dict = field(default_factory=dict)


@dataclass
class _Progress:
    """Where a run stands: the per-epoch rows so far and the epoch chosen by validation IoU."""

    rows: list[dict] = field(default_factory=list)
    best_iou: float = -math.inf
    best_epoch: int = 0


@dataclass
class _Features:
    """The frozen encoder's cached features (``train``: one entry per flip variant), or all None."""

    train: list | None = None
    val: object = None
    test: object = None


def fit(model: SegmentationModel, data: ReportData, config: TrainConfig, run_dir: str | Path,
        on_step: Callable[[int, int], None] | None = None, resume: bool = True, verbose: bool = True,
        label: str = "", later_epochs: int = 0) -> FitResult:
    """Train for ``config.epochs`` epochs; select the checkpoint with the best validation mean IoU; score the
    test set once with it.

    Every epoch writes ``last.pt`` (model, optimiser, RNG states, history) atomically; ``best.pt`` holds the
    selected weights. Rerunning with the same ``run_dir`` and configuration resumes after the last complete
    epoch; ``resume=False`` trains from scratch. A checkpoint of another configuration (hyper-parameters, data,
    or encoder weights), or with more epochs than asked for, raises ``CheckpointMismatch`` saying what differs
    and what to do. Per-epoch test columns are monitoring only: nothing is chosen with them.

    With ``verbose``, one line per epoch: ``label`` (e.g. "task2 seed 0"), losses, validation IoU, seconds and
    an ETA that includes ``later_epochs`` still to come after this run (the study's next seeds).
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(config.precision, config.device)
    generator = seed_everything(config.seed)
    optimizer = _place(model, config)
    fingerprint, weights = run_fingerprint(model, data, config)
    progress = _resume_or_start(model, optimizer, generator, fingerprint, weights, config, run_dir, resume,
                                (label or str(run_dir)) if verbose else None)
    timings = {"feature_cache_s": 0.0}
    features = _Features()
    if uses_feature_cache(model, config) and len(progress.rows) < config.epochs:
        t0 = time.perf_counter()
        features = _encode_splits(model, data, config, precision)
        timings["feature_cache_s"] = time.perf_counter() - t0

    epoch_times: list[float] = []
    for epoch in range(len(progress.rows) + 1, config.epochs + 1):
        row = _one_epoch(model, data, optimizer, config, precision, generator, features, epoch, on_step)
        progress.rows.append(row)
        if row["val_iou_mean"] > progress.best_iou:  # selection: validation only
            progress.best_iou, progress.best_epoch = row["val_iou_mean"], epoch
            _save({"model": model.state_dict(), "meta": model_meta(model, fingerprint["image_size"]), "epoch": epoch,
                   "val_iou_mean": progress.best_iou, "config": fingerprint}, run_dir / "best.pt")
        _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(generator),
               "history": progress.rows, "best_iou": progress.best_iou, "best_epoch": progress.best_epoch,
               "fingerprint": fingerprint, "encoder_weights": weights}, run_dir / "last.pt")
        epoch_times.append(row["epoch_seconds"])
        if verbose:
            remaining = (config.epochs - epoch + later_epochs) * sum(epoch_times) / len(epoch_times)
            print(epoch_line(label, row, config.epochs, remaining), flush=True)

    t0 = time.perf_counter()
    final_val, final_test = _score_selected(model, data, config, precision, run_dir / "best.pt")
    timings["final_eval_s"] = time.perf_counter() - t0
    return FitResult(pd.DataFrame(progress.rows), progress.best_epoch, final_test, final_val, run_dir, precision,
                     uses_feature_cache(model, config), time.perf_counter() - start, timings)


def _place(model: SegmentationModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Move the model to its device and memory format; return its optimiser."""
    model.to(config.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return build_optimizer(model, config)


def run_fingerprint(model: SegmentationModel, data: ReportData, config: TrainConfig) -> tuple[dict, dict]:
    """(what a checkpoint must match to be resumed, the encoder's starting-weights record)."""
    image_size = int(data.train.images.shape[-1])
    meta = model_meta(model, image_size)
    weights = meta.pop("encoder_weights")
    fingerprint = {**config.fingerprint(), "image_size": image_size, **meta, "train_ids": len(data.train),
                   "params": count_parameters(model)["total"], "encoder_sha256": weights.get("sha256")}
    return fingerprint, weights


def _resume_or_start(model, optimizer, generator: torch.Generator, fingerprint: dict, weights: dict,
                     config: TrainConfig, run_dir: Path, resume: bool, announce: str | None) -> _Progress:
    """Continue from ``last.pt`` when asked and it matches (else ``CheckpointMismatch``); or start afresh."""
    last_path = run_dir / "last.pt"
    if not resume:
        for stale in (last_path, run_dir / "best.pt"):
            stale.unlink(missing_ok=True)
    if not last_path.exists():
        return _Progress()
    state = load_checkpoint(last_path)
    _check_resumable(state, fingerprint, weights, config.epochs, last_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    generator.set_state(state["rng"]["generator"])
    if announce:
        print(f"{announce}: resuming after epoch {len(state['history'])} of {config.epochs}", flush=True)
    return _Progress(state["history"], state["best_iou"], state["best_epoch"])


def _encode_splits(model: SegmentationModel, data: ReportData, config: TrainConfig, precision: str) -> _Features:
    """The frozen encoder's features: every training image in each flip variant, validation and (monitored) test."""
    model.eval()

    def encode(images, hflip=False, vflip=False):
        return encode_all(model, images, precision, config.device, config.eval_batch_size, config.channels_last,
                          hflip, vflip)

    return _Features([encode(data.train.images, h, v) for h, v in flip_variants(config.augment)],
                     encode(data.val.images), encode(data.test.images) if config.monitor_test else None)


def _one_epoch(model, data: ReportData, optimizer, config: TrainConfig, precision: str, generator: torch.Generator,
               features: _Features, epoch: int, on_step) -> dict:
    """Train one epoch, evaluate validation (and monitor test); the epoch's row of the history."""
    t0 = time.perf_counter()
    train_loss = train_epoch(model, data.train, optimizer, config, precision, generator, features.train,
                             on_step=(lambda step: on_step(epoch, step)) if on_step else None,
                             desc=f"epoch {epoch}/{config.epochs}")
    train_seconds = time.perf_counter() - t0
    row = {"epoch": epoch, "train_loss": train_loss,
           **_prefixed("val", evaluate(model, data.val, config, precision, features.val).summary())}
    if config.monitor_test:
        row.update(_prefixed("test", evaluate(model, data.test, config, precision, features.test).summary()))
    return {**row, "train_seconds": train_seconds, "epoch_seconds": time.perf_counter() - t0}


def _score_selected(model, data: ReportData, config: TrainConfig, precision: str, best_path: Path):
    """Load the validation-selected weights; evaluate validation and, once, the whole test set (probabilities kept)."""
    model.load_state_dict(load_checkpoint(best_path)["model"])
    return (evaluate(model, data.val, config, precision, keep_probabilities=False),
            evaluate(model, data.test, config, precision, keep_probabilities=True))


def _check_resumable(state: dict, fingerprint: dict, weights: dict, epochs: int, last_path: Path) -> None:
    """Raise ``CheckpointMismatch`` unless ``state`` (a ``last.pt``) continues the run ``fingerprint`` describes."""
    run = last_path.parent.parent.name
    fix = (f"Nothing was changed. To train this run afresh with the new configuration, rerun with --force "
           f"(`python -m isic_utils report --force --only {run}` plus your --set; with papermill `-p resume False`; "
           "in the notebook `resume = False`). To keep the trained run, give the new one another output_dir.")
    saved = state.get("fingerprint") or {}
    if saved != fingerprint:
        changes = []
        for key in sorted(set(saved) | set(fingerprint)):
            if saved.get(key) == fingerprint.get(key):
                continue
            if key == "encoder_sha256":
                before = state.get("encoder_weights", {})
                changes.append(f"encoder weights: {before.get('source', '?')} (sha256 {str(saved.get(key))[:12]}) → "
                               f"{weights.get('source', '?')} (sha256 {str(fingerprint.get(key))[:12]})")
            else:
                changes.append(f"{key}: {saved.get(key, '(absent)')} → {fingerprint.get(key, '(absent)')}")
        raise CheckpointMismatch(f"{last_path} was trained with another configuration:\n  "
                                 + "\n  ".join(changes) + f"\n{fix}")
    trained = len(state["history"])
    if trained > epochs:
        raise CheckpointMismatch(f"{last_path} has {trained} epochs trained, but the run asks for {epochs}: its "
                                 f"history and chosen checkpoint would not be a {epochs}-epoch run. {fix}")


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}_{key}": value for key, value in values.items()}


def set_threads(threads: int | None = None) -> int:
    """Use one compute thread per physical core unless told otherwise (``OMP_NUM_THREADS`` wins)."""
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, os.cpu_count() or 1)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
