"""Training: batches sliced from memory, one epoch, one evaluation, the fit loop with per-epoch atomic checkpoints,
resume, selection on validation and one final scoring of the test set.

Speed (see ``benchmarks/bench_training.py``): the data set is one uint8 tensor in memory — on the GPU when training
runs there — and batches are sliced, augmented and normalised in batch on that device; the model runs
``channels_last``; AdamW is ``fused``. On a GPU nothing waits for the device inside an epoch: losses and counts
accumulate there and are read once. The device and precision come from ``devices``, the frozen encoder's features
from ``features``, the trained model's application from ``inference``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..base.devices import autocast, device_name, grad_scaler, resolve_precision, seed_everything, set_deterministic
from ..base.files import locked, progress_bar, remove_leftovers
from ..config.params import LOSSES, LR_SCHEDULES, STYLE_MIXINGS, WEIGHT_AVERAGES, TrainConfig
from ..data.augmentation import apply_augmentation, draw_augmentation
from ..data.decoding import DecodedSplit
from ..data.splits import ReportData
from ..data.transforms import apply_color_constancy
from ..model.inference import flip_averaged, load_checkpoint, to_input
from ..model.networks import SegmentationModel
from ..scoring import metrics
from . import checkpoints
from .features import Features, FeatureStore, cached_batch, select_features, uses_feature_cache, variant_index
from .style_mixing import draw_style_mixing, mixed_styles


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


TIMING_COLUMNS = ("train_seconds", "eval_seconds", "epoch_seconds")  # history columns that vary run to run


def batch_indices(count: int, batch_size: int, generator: torch.Generator | None, drop_single: bool = False):
    """Index tensors covering ``range(count)``, shuffled with ``generator`` (in order when None).

    With ``drop_single`` a last batch of one image is dropped (train-mode BatchNorm cannot use it).
    """
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    chunks = list(order.split(batch_size))
    if drop_single and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()
    return chunks


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per image, averaged (computed on probabilities)."""
    probabilities = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    intersection = (probabilities * targets).sum(1)
    return (1 - (2 * intersection + eps) / (probabilities.sum(1) + targets.sum(1) + eps)).mean()


def lovasz_hinge_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The Lovász hinge per image, averaged (Berman et al. 2018): a convex surrogate of 1 − Jaccard (JA) on each image's
    hinge errors ``1 − logit · (2·target − 1)``, so that it optimises the report's score, mean per-image JA, directly.
    Where every error is 0 or 1 it equals 1 − JA of the mask the errors make (tested)."""
    truth = (targets.flatten(1) > 0.5).float()
    errors = 1 - logits.flatten(1) * (2 * truth - 1)
    errors, order = errors.sort(dim=1, descending=True, stable=True)
    truth = truth.gather(1, order)
    positives = truth.sum(1, keepdim=True)
    jaccard = 1 - (positives - truth.cumsum(1)) / (positives + (1 - truth).cumsum(1))
    gradient = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)  # the extension's weights
    return (nn.functional.relu(errors) * gradient).sum(1).mean()


def epoch_line(label: str, row: dict, epochs: int, eta_seconds: float) -> str:
    """One terminal / notebook line for a finished epoch: who, which epoch, losses, val IoU, time, ETA."""
    eta = f"{eta_seconds:.0f} s" if eta_seconds < 90 else f"{eta_seconds / 60:.1f} min"
    line = (
        f"{label + ' ' if label else ''}epoch {row['epoch']:>2}/{epochs}  train loss {row['train_loss']:.4f}  "
        f"val loss {row['val_loss']:.4f}  val IoU {row['val_iou_mean']:.4f}  {row['epoch_seconds']:.1f} s  "
        f"ETA {eta}"
    )
    if "test_iou_mean" in row:
        line += f"  [test IoU {row['test_iou_mean']:.4f}, monitoring only]"
    return line


def loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``bce`` (BCE with logits, the report's loss), ``bce+dice`` or ``bce+lovasz``; always computed in fp32."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {kind!r}")
    added = {"bce": None, "bce+dice": soft_dice_loss, "bce+lovasz": lovasz_hinge_loss}[kind]

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        bce = nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return bce if added is None else bce + added(logits, targets)

    return loss


@dataclass
class Evaluation:
    """Mean loss, per-image confusion counts and (optionally) the fp32 probability maps of one evaluated split."""

    loss: float
    counts: torch.Tensor
    probabilities: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss, **metrics.summarize(self.counts)}


@torch.inference_mode()
def evaluate(
    model: SegmentationModel,
    split: DecodedSplit,
    config: TrainConfig,
    precision: str,
    features=None,
    keep_probabilities: bool = False,
    tta: str = "none",
) -> Evaluation:
    """Loss and per-image counts over the **whole** split (threshold 0.5 on probabilities); ``tta="flips"``
    scores the flip-averaged probabilities (the loss then of their logits)."""
    model.eval()
    criterion = loss_fn(config.loss)
    total = torch.zeros((), dtype=torch.float64, device=config.device)  # read once, after the loop
    counts, kept = [], []
    for rows in batch_indices(len(split), config.eval_batch_size, None):
        rows = rows.to(split.masks.device)
        targets = split.masks[rows].to(config.device, non_blocking=True).float()
        with autocast(precision, config.device):
            if features is not None:
                logits = model.decoder(select_features(features, rows, config.channels_last))
            elif tta != "none":
                averaged = flip_averaged(
                    model, to_input(split.images[rows], model.spec, config.device, config.channels_last), tta
                )
                logits = torch.logit(averaged, eps=1e-6)
            else:
                logits = model(to_input(split.images[rows], model.spec, config.device, config.channels_last))
        logits = logits.float()
        total += criterion(logits, targets).double() * len(rows)
        probabilities = torch.sigmoid(logits)
        counts.append(metrics.confusion_counts(probabilities, targets))
        if keep_probabilities:
            kept.append(probabilities)
    return Evaluation(
        float(total) / len(split), torch.cat(counts).cpu(), torch.cat(kept).cpu() if keep_probabilities else None
    )


def build_optimizer(model: SegmentationModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with a decoder group (``decoder_lr``) and, when the encoder trains, an encoder group (``encoder_lr``)."""
    groups = [
        {
            "params": [p for p in model.decoder.parameters() if p.requires_grad],
            "lr": config.decoder_lr,
            "name": "decoder",
        }
    ]
    if not model.freeze_encoder:
        groups.append(
            {
                "params": [p for p in model.encoder.parameters() if p.requires_grad],
                "lr": config.encoder_lr,
                "name": "encoder",
            }
        )
    return adamw(groups, config.weight_decay, config.device)


def learning_rate_factor(schedule: str, epoch: int, epochs: int) -> float:
    """What epoch ``epoch`` (1 to ``epochs``) multiplies the set learning rates by: 1 for ``constant``; for ``cosine``
    half a cosine from 1 at the first epoch to (1 + cos(π (epochs − 1) / epochs)) / 2 at the last (0.006 of 20)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")


def set_learning_rates(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> None:
    """Each parameter group's rate for ``epoch``: its set rate (``decoder_lr``, ``encoder_lr``) times the schedule's
    factor. A function of the epoch alone, so a resumed run continues the schedule where it stopped."""
    factor = learning_rate_factor(config.lr_schedule, epoch, config.epochs)
    for group in optimizer.param_groups:
        group["lr"] = factor * (config.decoder_lr if group["name"] == "decoder" else config.encoder_lr)


EMA_DECAY = 0.99  # per step at most: the average's horizon is then ~100 steps (three epochs of 516 images)


def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
    """One step of the weight average (``AveragedModel``'s ``multi_avg_fn``): averaged ← d · averaged + (1 − d) ·
    current, with d = min(``EMA_DECAY``, (1 + n) / (10 + n)) after n updates, so that a short run's average is not
    held back by its first steps' weights (the warm-up TensorFlow's moving average uses). Computed where the weights
    are: nothing waits for a GPU. Integer buffers (batch-norm's counters) take the trained ones."""
    if not torch.is_floating_point(averaged[0]):
        torch._foreach_copy_(averaged, current)
        return
    n = updates.to(averaged[0].dtype)
    decay = torch.clamp((1 + n) / (10 + n), max=EMA_DECAY)
    step = torch._foreach_mul(current, 1 - decay)
    torch._foreach_mul_(averaged, decay)
    torch._foreach_add_(averaged, step)


def weight_average(model: SegmentationModel, config: TrainConfig) -> AveragedModel | None:
    """``ema``: a copy of ``model`` whose weights and batch-norm statistics follow the trained ones as an exponential
    moving average (``ema_update``), the weights validation judges and ``best.pt`` keeps; None for ``none``."""
    if config.weight_average == "none":
        return None
    if config.weight_average == "ema":
        return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)
    raise ValueError(f"weight_average must be one of {list(WEIGHT_AVERAGES)}, got {config.weight_average!r}")


def adamw(groups: list[dict], weight_decay: float, device: str) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused where the kernel exists (a GPU, or a CPU with torch >= 2.4): one kernel for all the
    parameters instead of a loop of small ops over each (on a CPU the loop took a quarter of a fine-tune step)."""
    fused = device.startswith("cuda") or hasattr(torch, "_fused_adamw_")  # the CPU kernel's op (torch >= 2.4)
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused)
    except (RuntimeError, TypeError):  # fused not available on this build/device
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


def train_epoch(
    model: SegmentationModel,
    split: DecodedSplit,
    optimizer,
    config: TrainConfig,
    precision: str,
    generator: torch.Generator,
    feature_cache: list | None = None,
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
    scaler: torch.amp.GradScaler | None = None,
    average: AveragedModel | None = None,
) -> float:
    """One pass over ``split`` in seeded random order; returns the mean training loss. ``average`` (the run's
    ``weight_average``) is updated after every step.

    Raises ``TrainingDiverged`` on a NaN or infinite loss: on the CPU before the optimiser steps on it; on a GPU,
    where checking each step would make the host wait for the device, at the end of the epoch (whose checkpoint
    is then not written). Images, masks and cached features are used where they are (``split`` on the GPU when
    ``fit`` put it there); the shuffling and augmentation draws come from the CPU ``generator``.
    """
    model.train()
    criterion = loss_fn(config.loss)
    scaler = scaler or grad_scaler(precision, config.device)
    check_each_step = not config.device.startswith("cuda")
    losses, seen = [], 0
    chunks = batch_indices(len(split), config.batch_size, generator, drop_single=not model.freeze_encoder)
    horizontal_choices = 2 if "hflip" in config.augment else 1
    for step, rows in enumerate(progress_bar(chunks, total=len(chunks), desc=desc, unit="batches", summary=False)):
        draws = draw_augmentation(len(rows), config.augment, generator)
        mixing = draw_style_mixing(len(rows), generator) if config.style_mixing == "mixstyle" else None
        rows = rows.to(split.masks.device)  # the data's device (the GPU when fit put it there)
        masks = split.masks[rows].to(config.device, non_blocking=True)
        if feature_cache is not None:
            inputs = cached_batch(
                feature_cache, variant_index(draws, len(rows), horizontal_choices), rows, config.channels_last
            )
            _, masks = apply_augmentation(masks, masks, draws)  # flip the masks like the cached features
        else:
            images = split.images[rows].to(config.device, non_blocking=True)
            images, masks = apply_augmentation(images, masks, draws)
            inputs = to_input(images, model.spec, config.device, config.channels_last)
        targets = masks.float()
        with autocast(precision, config.device), mixed_styles(model, mixing):
            logits = model.decoder(inputs) if feature_cache is not None else model(inputs)
        loss = criterion(logits, targets)
        if check_each_step:
            _check_finite(loss.detach().view(1), step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if average is not None:
            average.update_parameters(model)
        losses.append(loss.detach().double() * len(rows))
        seen += len(rows)
        if on_step is not None:
            on_step(step)
    if not losses:
        return 0.0
    per_batch = torch.stack(losses)  # the one read of the epoch's losses from the device
    _check_finite(per_batch, 0)
    return float(per_batch.sum()) / seen


def _check_finite(weighted_losses: torch.Tensor, first_step: int) -> None:
    finite = torch.isfinite(weighted_losses)
    if not bool(finite.all()):
        step = first_step + int((~finite).nonzero()[0, 0])
        raise TrainingDiverged(
            f"loss became {float(weighted_losses[step - first_step])} at batch {step}. Training stopped; the last "
            "complete epoch's checkpoint is kept. Fix: lower the learning rates, or use precision='fp32'."
        )


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
    trained_on: dict = field(default_factory=dict)  # device, its name, precision, deterministic
    fingerprint: dict = field(default_factory=dict)  # what the final last.pt records it was trained under


def fit(
    model: SegmentationModel,
    data: ReportData,
    config: TrainConfig,
    run_dir: str | Path,
    on_step: Callable[[int, int], None] | None = None,
    resume: bool = True,
    verbose: bool = True,
    label: str = "",
    later_epochs: int = 0,
    features: FeatureStore | None = None,
    stale: tuple[str, ...] = (),
) -> FitResult:
    """Train for ``config.epochs`` epochs; select the checkpoint with the best validation mean IoU; score the
    test set once with it.

    Every epoch writes ``last.pt`` (model, optimiser, RNG states, history) atomically; ``best.pt`` holds the
    selected weights. Rerunning with the same ``run_dir`` and configuration resumes after the last complete
    epoch; ``resume=False`` trains from scratch. A checkpoint of another configuration (hyper-parameters, data,
    or encoder weights), or with more epochs than asked for, raises ``CheckpointMismatch`` saying what differs
    and what to do. Per-epoch test columns are monitoring only: nothing is chosen with them.

    With ``verbose``, one line per epoch: ``label`` (e.g. "task2 seed 0"), losses, validation IoU, seconds and
    an ETA that includes ``later_epochs`` still to come after this run (the study's next seeds).

    On a GPU the data set is copied to the device once, for the whole run. ``features`` shares the frozen
    encoder's features between the seeds of a run (see ``FeatureStore``). Where the time went: each history row
    has ``train_seconds``, ``eval_seconds`` and their sum ``epoch_seconds``; ``FitResult.timings`` the feature
    cache, the checkpoints written (all epochs together) and the final scoring. The run folder is locked while
    it trains: a second process asking for it gets ``FolderBusy`` at once. A retrain (``resume`` false) first
    removes the files ``stale`` names in the run folder, under that lock.
    """
    with locked(run_dir, busy="training this run"):  # one process at a time per run folder
        if not resume:  # a retrain: what described the old checkpoints goes, under the lock (never a live run's)
            for name in stale:
                (Path(run_dir) / name).unlink(missing_ok=True)
        return _fit(model, data, config, Path(run_dir), on_step, resume, verbose, label, later_epochs, features)


def _fit(
    model: SegmentationModel,
    data: ReportData,
    config: TrainConfig,
    run_dir: Path,
    on_step,
    resume: bool,
    verbose: bool,
    label: str,
    later_epochs: int,
    features: FeatureStore | None,
) -> FitResult:
    start = time.perf_counter()
    remove_leftovers(run_dir)  # a killed run's half-written checkpoint copies
    precision = resolve_precision(config.precision, config.device)
    set_deterministic(config.deterministic, config.device)
    generator = seed_everything(config.seed)
    optimizer = _place(model, config)
    average = weight_average(model, config)
    if config.style_mixing not in STYLE_MIXINGS:
        raise ValueError(f"style_mixing must be one of {list(STYLE_MIXINGS)}, got {config.style_mixing!r}")
    judged = average.module if average is not None else model  # the weights validation judges and best.pt keeps
    scaler = grad_scaler(precision, config.device)
    trained_on = {
        "device": config.device,
        "device_name": device_name(config.device),
        "precision": precision,
        "deterministic": config.deterministic,
    }
    data = with_color_constancy(data, config.color_constancy)
    fingerprint, weights = checkpoints.run_fingerprint(model, data, config)
    progress = checkpoints.resume_or_start(
        model,
        optimizer,
        scaler,
        generator,
        fingerprint,
        weights,
        config,
        run_dir,
        resume,
        (label or str(run_dir)) if verbose else None,
        average,
    )
    data = on_device(data, config.device)
    timings = {"feature_cache_s": 0.0, "checkpoint_s": 0.0}
    cached = Features()
    if uses_feature_cache(model, config) and len(progress.rows) < config.epochs:
        t0 = time.perf_counter()
        cached = (features or FeatureStore()).get(model, data, config, precision)
        timings["feature_cache_s"] = time.perf_counter() - t0

    epoch_times: list[float] = []
    meta = checkpoints.best_meta(model, fingerprint, config, trained_on)
    trained_under = fingerprint if progress.fingerprint is None else progress.fingerprint
    for epoch in range(len(progress.rows) + 1, config.epochs + 1):
        set_learning_rates(optimizer, config, epoch)
        row = _one_epoch(model, data, optimizer, config, precision, generator, cached, epoch, on_step, scaler, average)
        _check_epoch(model, row)  # nothing non-finite is ever saved
        t0 = time.perf_counter()
        progress.rows.append(row)
        improved = row["val_iou_mean"] > progress.best_iou  # selection: validation only
        if improved:
            progress.best_iou, progress.best_epoch = row["val_iou_mean"], epoch
        # last.pt first: it records the best epoch, and a crash before best.pt is written is mended on resume
        checkpoints.save(
            {
                "model": model.state_dict(),
                **({"average": average.state_dict()} if average is not None else {}),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": checkpoints.rng_state(generator, config.device),
                "history": progress.rows,
                "best_iou": progress.best_iou,
                "best_epoch": progress.best_epoch,
                "fingerprint": fingerprint,
                "encoder_weights": weights,
                "trained_on": trained_on,
            },
            run_dir / "last.pt",
        )
        if improved:
            best = checkpoints.best_state(judged.state_dict(), meta, epoch, progress.best_iou, fingerprint)
            checkpoints.save(best, run_dir / "best.pt")
        trained_under = fingerprint
        timings["checkpoint_s"] += time.perf_counter() - t0
        epoch_times.append(row["epoch_seconds"] + time.perf_counter() - t0)
        if verbose:
            remaining = (config.epochs - epoch + later_epochs) * sum(epoch_times) / len(epoch_times)
            print(epoch_line(label, row, config.epochs, remaining), flush=True)

    t0 = time.perf_counter()
    final_val, final_test = _score_selected(model, data, config, precision, run_dir / "best.pt")
    timings["final_eval_s"] = time.perf_counter() - t0
    return FitResult(
        pd.DataFrame(progress.rows),
        progress.best_epoch,
        final_test,
        final_val,
        run_dir,
        precision,
        uses_feature_cache(model, config),
        time.perf_counter() - start,
        timings,
        trained_on,
        trained_under,
    )


def with_color_constancy(data: ReportData, method: str) -> ReportData:
    """``data`` with ``apply_color_constancy(method)`` applied to every split's images (the same object for "none").
    Computed once per data set and method, so the seeds of a run share it (and their feature cache)."""
    if method == "none":
        return data
    done = data.__dict__.setdefault("_color_constant", {})
    if method not in done:

        def apply(split: DecodedSplit) -> DecodedSplit:
            return replace(split, images=apply_color_constancy(split.images, method))

        done[method] = replace(data, train=apply(data.train), val=apply(data.val), test=apply(data.test))
    return done[method]


def on_device(data: ReportData, device: str) -> ReportData:
    """``data`` with its images and masks on ``device`` (copied once; the same object on the CPU)."""
    if not device.startswith("cuda"):
        return data

    def move(split: DecodedSplit) -> DecodedSplit:
        return replace(split, images=split.images.to(device), masks=split.masks.to(device))

    return replace(data, train=move(data.train), val=move(data.val), test=move(data.test))


def _place(model: SegmentationModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Move the model to its device and memory format; return its optimiser."""
    model.to(config.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return build_optimizer(model, config)


def _one_epoch(
    model,
    data: ReportData,
    optimizer,
    config: TrainConfig,
    precision: str,
    generator: torch.Generator,
    features: Features,
    epoch: int,
    on_step,
    scaler,
    average: AveragedModel | None = None,
) -> dict:
    """Train one epoch, evaluate validation (and monitor test) with the trained weights, or their ``average`` when
    the run keeps one; the epoch's row of the history."""
    t0 = time.perf_counter()
    train_loss = train_epoch(
        model,
        data.train,
        optimizer,
        config,
        precision,
        generator,
        features.train,
        on_step=(lambda step: on_step(epoch, step)) if on_step else None,
        desc=f"epoch {epoch}/{config.epochs}",
        scaler=scaler,
        average=average,
    )
    t1 = time.perf_counter()
    judged = average.module if average is not None else model
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        **_prefixed("val", evaluate(judged, data.val, config, precision, features.val).summary()),
    }
    if config.monitor_test:
        row.update(_prefixed("test", evaluate(judged, data.test, config, precision, features.test).summary()))
    t2 = time.perf_counter()
    return {**row, "train_seconds": t1 - t0, "eval_seconds": t2 - t1, "epoch_seconds": t2 - t0}


def _check_epoch(model: SegmentationModel, row: dict) -> None:
    """Stop before an epoch is saved when its validation loss or any weight is not finite (a step on the epoch's
    last batch can break the weights after the training loss was checked)."""
    weights = {name: tensor for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in weights.values()]).cpu()  # one read per epoch
    broken = [name for name, ok in zip(weights, finite.tolist()) if not ok]
    if broken or not math.isfinite(row["val_loss"]):
        where = (
            f"weights {', '.join(broken[:3])}{' …' if len(broken) > 3 else ''} are not finite"
            if broken
            else f"validation loss is {row['val_loss']}"
        )
        raise TrainingDiverged(
            f"epoch {row['epoch']}: {where}. Training stopped before this epoch was saved; the last complete "
            "epoch's checkpoints are kept. Fix: lower the learning rates, or use precision='fp32'."
        )


def _score_selected(model, data: ReportData, config: TrainConfig, precision: str, best_path: Path):
    """Load the validation-selected weights; evaluate validation and, once, the whole test set (probabilities kept),
    with the run's test-time flips when it asks for them (selection itself never uses them)."""
    model.load_state_dict(load_checkpoint(best_path)["model"])
    return (
        evaluate(model, data.val, config, precision, keep_probabilities=True, tta=config.tta),
        evaluate(model, data.test, config, precision, keep_probabilities=True, tta=config.tta),
    )


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}_{key}": value for key, value in values.items()}
