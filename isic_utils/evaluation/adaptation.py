"""A trained run adapted to another clinic, the two ways a clinic would: with **no labels**, the batch-norm statistics
re-estimated on the clinic's own images (AdaBN: the weights stay, the normalisation follows the new camera); with
**a few labelled cases**, the model fine-tuned on ``k`` of them. An adapted checkpoint says so in its meta (method,
how many cases, which, from where), so ``predict`` applies it like any other; the learning curve measures both on
the clinic's cases that were not used to adapt.

``python -m isic_utils adapt --checkpoint RUN/seed0/best.pt --images DIR [--masks DIR] [--k K] [--output PATH]``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..base.files import shown_path, writable_file
from ..data.decoding import DecodedSplit, decode_pairs, read_image
from ..data.sources import DataError, Pair, folder_images
from ..model.inference import load_checkpoint, load_trained, model_input, predicted_probabilities
from ..scoring import metrics
from ..training import checkpoints
from ..training.experiments import SavedRun
from ..training.loop import adamw, loss_fn
from .external import ExternalResult, halves

MASK_NAMES = (
    "{stem}_Segmentation.png",
    "{stem}_segmentation.png",  # ISIC 2017 and 2018
    "{stem}_lesion.bmp",
    "{stem}_lesion.png",
    "{stem}.png",
)
ADAPT_METHODS = ("batchnorm", "threshold", "fine-tune")  # what `adapt --method` offers (chapter 3 measures all three)
STEPS, BATCH, ENCODER_LR, DECODER_LR = 40, 8, 1e-4, 1e-3  # the few-shot fine-tune: short, gentle on the encoder
WEIGHT_DECAY = 0.01  # AdamW's default, which the fine-tune has always used


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, meta: dict, images_uint8: torch.Tensor, batch_size: int = 32) -> nn.Module:
    """Re-estimate every batch-norm layer's running mean and variance on ``images_uint8`` (no labels): statistics
    reset, then the cumulative average over the images' batches. Weights are untouched; returns the model in eval."""
    norms = _batch_norms(model)
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every batch seen
        norm.train()
    for start in range(0, len(images_uint8), batch_size):
        model(model_input(meta, images_uint8[start : start + batch_size]))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def fine_tune(
    model: nn.Module,
    meta: dict,
    images_uint8: torch.Tensor,
    masks: torch.Tensor,
    seed: int = 0,
    steps: int = STEPS,
    batch_size: int = BATCH,
    loss: str = "bce+dice",
) -> nn.Module:
    """Fine-tune the whole model on a few labelled cases: ``steps`` AdamW steps (encoder ``ENCODER_LR``, decoder
    ``DECODER_LR``) on batches drawn with replacement and flipped at random, batch-norm statistics kept (a handful of
    cases cannot estimate them; ``adapt_batchnorm`` does that from unlabelled images). Returns the model in eval."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    for p in model.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device.type
    groups = [
        {"params": list(model.encoder.parameters()), "lr": ENCODER_LR},
        {"params": list(model.decoder.parameters()), "lr": DECODER_LR},
    ]
    optimizer = adamw(groups, WEIGHT_DECAY, device)
    criterion = loss_fn(loss)
    model.train()
    for norm in _batch_norms(model):
        norm.eval()
    for _ in range(steps):
        rows = torch.randint(len(images_uint8), (min(batch_size, len(images_uint8)),), generator=generator)
        x, y = model_input(meta, images_uint8[rows]), masks[rows].float()
        flips = [d for d, draw in zip((-1, -2), torch.rand(2, generator=generator)) if draw < 0.5]
        if flips:
            x, y = x.flip(flips), y.flip(flips)
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()
    return model.eval()


# ----------------------------------------------------------------------------- a checkpoint adapted to a folder


def clinic_pairs(images: str | Path, masks: str | Path | None) -> tuple[list[Path], list[Pair]]:
    """The clinic's images in ``images`` (JPEG/PNG/BMP/TIFF; masks and overlays are not images) and, with ``masks``,
    each image's mask there (``<stem>_Segmentation.png``, ``<stem>_lesion.bmp|png`` or ``<stem>.png``). Clear errors
    for a missing folder, no images, and images without a mask (named)."""
    images = Path(images)
    files, _ = folder_images(images, "--images")
    if masks is None:
        return files, []
    masks = Path(masks)
    if not masks.is_dir():
        raise DataError(
            f"--masks {masks} {'is a file' if masks.exists() else 'does not exist'}: point it at the "
            "folder of the images' masks, or leave it out to adapt without labels."
        )
    pairs, missing = [], []
    for path in files:
        found = next(
            (
                masks / rule.format(stem=path.stem)
                for rule in MASK_NAMES
                if (masks / rule.format(stem=path.stem)).is_file()
            ),
            None,
        )
        if found is None:
            missing.append(path)
        else:
            pairs.append(Pair(path.stem, path, found))
    if missing:
        raise DataError(
            f"{len(missing)} of {len(files)} images in {images} have no mask in {masks} (e.g. "
            f"{missing[0].name}: looked for "
            + ", ".join(r.format(stem=missing[0].stem) for r in MASK_NAMES)
            + "). Fix: add the masks, or move those images out of --images."
        )
    return files, pairs


def adapt_checkpoint(
    checkpoint: str | Path,
    images: str | Path,
    masks: str | Path | None = None,
    k: int | None = None,
    seed: int = 0,
    output: str | Path | None = None,
    overwrite: bool = False,
    method: str | None = None,
) -> tuple[Path, dict]:
    """Adapt ``checkpoint`` to a clinic and write the adapted checkpoint (default: beside it,
    ``adapted-batchnorm.pt``, ``adapted-threshold-k<k>.pt`` or ``adapted-k<k>.pt``); returns (its path, what its meta
    records under ``adapted``).

    ``method`` (``ADAPT_METHODS``; default: fine-tune with ``masks``, batch-norm statistics without):
    ``batchnorm``, the batch-norm statistics from every image in ``images`` (no labels); ``threshold``, only the
    probability threshold chosen on ``k`` labelled cases (all when ``k`` is None) drawn with ``seed``, the weights
    unchanged (``predict`` applies the checkpoint's threshold); ``fine-tune``, the model fine-tuned on them. Nothing
    is replaced unless ``overwrite``."""
    checkpoint = Path(checkpoint)
    if seed < 0:
        raise DataError(f"--seed {seed}: a seed is an integer >= 0 (it draws the k cases and seeds the fine-tune).")
    method = method or ("fine-tune" if masks is not None else "batchnorm")
    if method not in ADAPT_METHODS:
        raise DataError(f"--method {method!r}: choose one of {', '.join(ADAPT_METHODS)}.")
    if method != "batchnorm" and masks is None:
        raise DataError(
            f"--method {method} chooses on labelled cases: give --masks (the folder of their masks), or use "
            "--method batchnorm, which needs no labels."
        )
    if method == "batchnorm":
        masks = None  # the images alone
    files, pairs = clinic_pairs(images, masks)
    if pairs:
        k = len(pairs) if k is None else k
        if not 1 <= k <= len(pairs):
            raise DataError(
                f"--k {k}: {images} holds {len(pairs)} labelled cases. Fix: choose k from 1 to "
                f"{len(pairs)}, or add cases."
            )
    elif k is not None:
        raise DataError("--k needs labelled cases: give --masks (or leave --k out to adapt without labels).")
    default = {"batchnorm": "adapted-batchnorm.pt", "threshold": f"adapted-threshold-k{k}.pt"}
    target = writable_file(output or checkpoint.parent / default.get(method, f"adapted-k{k}.pt"), overwrite)
    model, meta = load_trained(checkpoint)
    size = meta["image_size"]
    threshold = None
    if pairs:
        chosen = sorted(np.random.default_rng(seed).choice(len(pairs), size=k, replace=False).tolist())
        used = [pairs[i] for i in chosen]
        decoded = decode_pairs(used, size, progress=False)
        if method == "threshold":
            threshold = best_threshold(predicted_probabilities(model, meta, decoded.images), decoded.masks)
        else:
            fine_tune(model, meta, decoded.images, decoded.masks, seed=seed)
        ids = decoded.ids
    else:
        adapt_batchnorm(model, meta, torch.stack([read_image(p, size)[0] for p in files]))
        ids = [p.stem for p in files]
    adapted = {
        "method": method,
        **({"threshold": threshold, "threshold before": meta["threshold"]} if threshold is not None else {}),
        "cases": len(ids),
        "ids": ids,
        "from": shown_path(images),
        "base": shown_path(checkpoint),
        "seed": seed,
    }
    state = load_checkpoint(checkpoint)
    state["model"] = model.state_dict()
    state["meta"] = {**state["meta"], "adapted": adapted}
    if threshold is not None:
        state["meta"]["threshold"] = threshold
    checkpoints.save(state, target)
    return target, adapted


# ----------------------------------------------------------------------------- the learning curve


def learning_curve(
    run: SavedRun, split: DecodedSplit, name: str, ks=(5, 10, 25), seeds=(0, 1, 2), steps: int = STEPS
) -> pd.DataFrame:
    """JA on the clinic's reporting half (``external.halves``): each run seed as trained (k = 0), with batch-norm
    statistics adapted on the choosing half's images (the pool; no labels), with only the threshold chosen on k
    labelled pool cases, and fine-tuned on k labelled pool cases (k capped at the pool). Draw ``seeds[i]`` of the k
    cases goes with the run's i-th training seed (cycling), so the spread over draws holds both the training run's
    and the cases' randomness. One row per (method, k, draw), with its training seed, the threshold and the ids
    used."""
    pool, scored = halves(split.ids)
    target, pool_split = split.subset(scored), split.subset(pool)
    trained = sorted(int(s) for s in run.seeds["seed"])
    pairs = [(draw, trained[i % len(trained)]) for i, draw in enumerate(seeds)]  # (draw seed, training seed)
    post = run.info["params"].get("postprocess", "none")
    rows = []

    def checkpoint(seed: int):
        return load_trained(run.run_dir / f"seed{seed}" / "best.pt")

    def score(
        probabilities: torch.Tensor, method: str, k: int, draw: int, seed: int, used: list[str], threshold: float = 0.5
    ):
        counts = metrics.original_size_counts(probabilities, target, threshold, post)
        rows.append(
            {
                "run": run.name,
                "set": name,
                "method": method,
                "k": k,
                "seed": draw,
                "training seed": seed,
                "JA": float(metrics.scores(counts)["iou"].mean()),
                "threshold": threshold,
                "scored": len(scored),
                "used": len(used),
                "ids used": " ".join(used),
            }
        )

    def drawn(k: int, draw: int) -> list[str]:
        return sorted(np.random.default_rng(draw).choice(pool, size=k, replace=False).tolist())

    ks = sorted({min(k, len(pool)) for k in ks})
    for seed in dict.fromkeys(seed for _, seed in pairs):
        model, meta = checkpoint(seed)
        as_trained = predicted_probabilities(model, meta, target.images)  # once: the threshold rows rescore it
        score(as_trained, "as trained", 0, seed, seed, [])
        pool_probabilities = predicted_probabilities(model, meta, pool_split.images)
        for k in ks:  # no training: only the threshold, chosen on the k cases
            for draw in (d for d, s in pairs if s == seed):
                cases = drawn(k, draw)
                chosen = [pool.index(i) for i in cases]
                score(
                    as_trained,
                    "threshold chosen on k labelled cases",
                    k,
                    draw,
                    seed,
                    cases,
                    best_threshold(pool_probabilities[chosen], pool_split.masks[chosen]),
                )
        adapted = adapt_batchnorm(model, meta, pool_split.images)
        score(
            predicted_probabilities(adapted, meta, target.images),
            "batch-norm statistics (no labels)",
            0,
            seed,
            seed,
            pool,
        )
        for k in ks:
            for draw in (d for d, s in pairs if s == seed):
                cases = drawn(k, draw)
                model, meta = checkpoint(seed)
                chosen = pool_split.subset(cases)
                fine_tune(model, meta, chosen.images, chosen.masks, seed=draw, steps=steps)
                score(
                    predicted_probabilities(model, meta, target.images),
                    "fine-tuned on k labelled cases",
                    k,
                    draw,
                    seed,
                    cases,
                )
    return pd.DataFrame(rows)


THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))  # a choice at either end is said so


def best_threshold(probabilities: torch.Tensor, masks: torch.Tensor) -> float:
    """The probability threshold (0.05 to 0.95) with the best mean per-image JA on a few labelled cases (model
    resolution); 0.5 wins ties. A remedy for a run that over- (or under-) segments a clinic's lesions."""

    def ja(t: float) -> float:
        return float(metrics.scores(metrics.confusion_counts(probabilities, masks.float(), t))["iou"].mean())

    return float(max(THRESHOLDS, key=lambda t: (round(ja(t), 6), t == 0.5)))


def curve_summary(curve: pd.DataFrame) -> pd.DataFrame:
    """The learning curve per run, set, method and k: mean and std of JA over the draws, how many draws, and the
    lowest and highest threshold used."""
    grouped = curve.groupby(["run", "set", "method", "k"], sort=False)
    summary = (
        grouped["JA"]
        .agg(["mean", "std", "count"])
        .rename(columns={"mean": "JA mean", "std": "JA std", "count": "draws"})
    )
    summary["threshold min"] = grouped["threshold"].min()
    summary["threshold max"] = grouped["threshold"].max()
    return summary.reset_index()


def chapter_curves(result: ExternalResult, params: dict) -> pd.DataFrame:
    """Chapter 3's learning curves: every run of ``params['adapt_runs']`` that was scored, on every external set."""
    frames = []
    for name in (r for r in params["adapt_runs"] if r in result.runs):
        run = result.runs[name]
        size = int(run.info["params"]["image_size"])
        for external in (s for s in result.sets if s.found):
            frames.append(
                learning_curve(
                    run,
                    result.splits[(external.name, size)],
                    external.name,
                    params["adapt_k"],
                    params["adapt_seeds"],
                    params["adapt_steps"],
                )
            )
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(
            columns=[
                "run",
                "set",
                "method",
                "k",
                "seed",
                "training seed",
                "JA",
                "threshold",
                "scored",
                "used",
                "ids used",
            ]
        )
    )


def curve_reading(summary: pd.DataFrame) -> str:
    """Sentences on the learning curves (``curve_summary``): per run and set, JA as trained, without labels, and
    with the fewest and the most labelled cases, and which way does best with the fewest."""
    lines = []
    threshold, tuned = "threshold chosen on k labelled cases", "fine-tuned on k labelled cases"
    for (run, name), group in summary.groupby(["run", "set"], sort=False):
        points = group.set_index(["method", "k"])

        def said(method: str, k: int) -> str:
            mean, std = points.loc[(method, k), ["JA mean", "JA std"]]
            return f"{mean:.3f}" + (f" ± {std:.3f}" if std == std else "")

        labelled = sorted(int(k) for method, k in points.index if method == tuned)
        if not labelled or ("as trained", 0) not in points.index:
            continue
        few, most = labelled[0], labelled[-1]
        text = (
            f"{run} on {name}'s reporting half: {said('as trained', 0)} as trained, "
            f"{said('batch-norm statistics (no labels)', 0)} with batch-norm statistics from the pool (no labels); "
            f"with k = {few} labelled cases, {said(threshold, few)} by choosing the threshold alone and "
            f"{said(tuned, few)} fine-tuned"
        )
        if most != few:
            text += f"; with k = {most}, {said(threshold, most)} and {said(tuned, most)}"
        chosen = points.loc[threshold]
        low, high = chosen["threshold min"].min(), chosen["threshold max"].max()
        text += (
            (
                f" (every draw chose the threshold {low:.2f}"
                if low == high
                else f" (thresholds chosen: {low:.2f}–{high:.2f}"
            )
            + (", at the end of the grid searched" if low <= THRESHOLDS[0] or high >= THRESHOLDS[-1] else "")
            + ")"
        )
        (a, a_std), (b, b_std) = (points.loc[(m, few), ["JA mean", "JA std"]] for m in (threshold, tuned))
        if a_std != a_std or b_std != b_std:  # one draw: no spread to tell a better way from luck
            lines.append(text + f". With {few} cases and one draw, no spread says which way is better.")
        elif abs(a - b) <= max(a_std, b_std):
            lines.append(text + f". With {few} cases neither way is clearly better (within the draws' spread).")
        else:
            lines.append(text + f". With {few} cases, {'the threshold alone' if a > b else 'fine-tuning'} does better.")
    return " ".join(lines)
