"""Every figure of the report: one function each, returning the matplotlib Figure; ``save_figure`` writes PNGs;
``run_figures``, ``failure_figures``, ``compare_predictions_figure``, ``compare_failures_figure`` and
``external_figures`` draw a chapter's figures from its runs."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from PIL import Image

from ..base.files import atomic_path
from ..data import augmentation
from ..data.decoding import DecodedSplit
from ..evaluation import external, failures
from ..scoring import confidence, metrics
from ..training.experiments import RunResult, SavedRun, prepare_data

sns.set_theme(style="whitegrid", context="notebook")


def figure_png(fig, dpi: float | None = None) -> bytes:
    """``fig`` as a PNG of 256 colours (an adaptive palette, dithered): a quarter of the bytes of matplotlib's own
    PNG for the same picture, and each figure is in a report four times (its file, the notebook, the page with
    code and the reader's copy)."""
    drawn = io.BytesIO()
    fig.savefig(drawn, dpi=dpi or fig.dpi, bbox_inches="tight", format="png")
    with Image.open(drawn) as picture:
        palette = picture.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    packed = io.BytesIO()
    palette.save(packed, format="PNG", optimize=True)
    return packed.getvalue()


def save_figure(fig, run_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Write ``fig`` to ``figures/NAME.png`` under ``run_dir`` (atomically; ``figure_png``) and return the path."""
    target = Path(run_dir) / "figures" / f"{name}.png"
    with atomic_path(target) as tmp:
        tmp.write_bytes(figure_png(fig, dpi))
    return target


def _show_figures_as_palette_png() -> None:
    """In a notebook, figures are shown (and so embedded in the notebook and its pages) as ``figure_png`` draws them,
    in place of matplotlib-inline's full-colour PNG."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    try:  # a kernel's inline backend sets its own formats once, when loaded: loaded first, so that ours stay
        import matplotlib_inline.backend_inline  # noqa: F401
    except ImportError:
        pass
    shell.display_formatter.formatters["image/png"].for_type(Figure, figure_png)


_show_figures_as_palette_png()


@contextlib.contextmanager
def _fixed_jitter(seed: int = 0):
    """seaborn's strip plots jitter with NumPy's global random state: seeded here (and restored after), so the same
    numbers draw the same figure and a chapter run again rewrites no file."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _epoch_axis(ax):
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _show_image(ax, image_uint8: torch.Tensor, title: str = ""):
    ax.imshow(image_uint8.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _show_mask(ax, mask: torch.Tensor, title: str = ""):
    ax.imshow(mask.squeeze(0).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def sample_grid(images: torch.Tensor, masks: torch.Tensor, ids: Sequence[str], columns: int = 6):
    """Figure 1: sample images (top row) with their ground-truth masks (bottom row)."""
    count = min(columns, len(images))
    fig, axes = plt.subplots(2, count, figsize=(2.2 * count, 4.6), squeeze=False)
    for k in range(count):
        _show_image(axes[0, k], images[k], ids[k])
        _show_mask(axes[1, k], masks[k], "mask")
    fig.suptitle("Sample images and their lesion masks")
    fig.tight_layout()
    return fig


def size_distribution(sizes: pd.DataFrame):
    """Figure 2: original image sizes (width × height scatter, with the width histogram)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    counts = sizes.groupby(["width", "height"]).size().reset_index(name="images")
    sns.scatterplot(data=counts, x="width", y="height", size="images", ax=axes[0], legend="brief")
    axes[0].set_title("Original sizes (px)")
    sns.histplot(sizes["width"] * sizes["height"] / 1e6, bins=20, ax=axes[1])
    axes[1].set_xlabel("megapixels")
    axes[1].set_title("Image area")
    fig.tight_layout()
    return fig


def augmentation_examples(images: torch.Tensor, masks: torch.Tensor, rows: int = 3):
    """Figure 3: each augmentation training uses, alone, on a few images with their masks.

    The panels come from ``augmentation.each_augmentation``, i.e. the very ``apply_augmentation`` the training loop
    calls (same colour-jitter strength), so the figure shows what the model saw.
    """
    count = min(rows, len(images))
    panels = augmentation.each_augmentation(images[:count], masks[:count])
    fig, axes = plt.subplots(2 * count, len(panels), figsize=(2.3 * len(panels), 4.6 * count), squeeze=False)
    for c, (name, (shown_images, shown_masks)) in enumerate(panels.items()):
        for r in range(count):
            _show_image(axes[2 * r, c], shown_images[r], name)
            _show_mask(axes[2 * r + 1, c], shown_masks[r])
    fig.suptitle(
        "Augmentations as training applies them (flips and rotations move image and mask together; "
        "colour jitter changes the image only)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def loss_curves(history: pd.DataFrame, title: str = "Loss per epoch"):
    """Figures 4 / 9: train, validation and (monitoring) test loss per epoch."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for column, label in (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test (monitor)")):
        if column in history:
            ax.plot(
                history["epoch"],
                history[column],
                marker="o",
                markersize=3,
                label=label,
                linestyle="--" if column.startswith("test") else "-",
            )
    _epoch_axis(ax)
    ax.set_ylabel("BCE loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def metric_curves(history: pd.DataFrame, metric: str, title: str | None = None, best_epoch: int | None = None):
    """Figures 5–7 / 10–12: one metric (``iou``, ``dice``, ``accuracy``) per epoch, validation and test."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for split, label, style in (("val", "validation", "-"), ("test", "test (monitor)", "--")):
        for kind in ("mean", "pooled"):
            column = f"{split}_{metric}_{kind}"
            if column in history and (kind == "mean" or metric == "iou"):
                ax.plot(
                    history["epoch"],
                    history[column],
                    marker="o",
                    markersize=3,
                    linestyle=style,
                    label=f"{label}, {'mean per image' if kind == 'mean' else 'pooled pixels'}",
                )
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linewidth=1, linestyle=":", label=f"selected (epoch {best_epoch})")
    _epoch_axis(ax)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def predictions(
    images: torch.Tensor,
    masks: torch.Tensor,
    probabilities: torch.Tensor,
    ids: Sequence[str],
    scores: Sequence[float] | None = None,
    columns: int = 6,
):
    """Figures 8 / 13: images with their actual and predicted masks (probability > 0.5)."""
    count = min(columns, len(images))
    fig, axes = plt.subplots(3, count, figsize=(2.2 * count, 6.8), squeeze=False)
    for k in range(count):
        _show_image(axes[0, k], images[k], ids[k])
        _show_mask(axes[1, k], masks[k], "actual")
        title = "predicted" + (f" (IoU {scores[k]:.2f})" if scores is not None else "")
        _show_mask(axes[2, k], (probabilities[k].float() > 0.5).float(), title)
    fig.tight_layout()
    return fig


def compare_curves(histories: dict[str, pd.DataFrame], metric: str = "val_iou_mean", ylabel: str = "validation IoU"):
    """Both (all) runs' curves of one history column side by side."""
    if not any(metric in history for history in histories.values()):
        raise KeyError(f"no run's history has a column {metric!r}; columns: {sorted(next(iter(histories.values())))}")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, history in histories.items():
        if metric in history:
            ax.plot(history["epoch"], history[metric], marker="o", markersize=3, label=name)
    _epoch_axis(ax)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    return fig


def compare_predictions(
    images: torch.Tensor, masks: torch.Tensor, predicted: dict[str, torch.Tensor], ids: Sequence[str], columns: int = 6
):
    """The same test images predicted by every run: image, actual mask, then one row per run."""
    count = min(columns, len(images))
    fig, axes = plt.subplots(
        2 + len(predicted), count, figsize=(2.2 * count, 2.3 * (2 + len(predicted))), squeeze=False
    )
    for k in range(count):
        _show_image(axes[0, k], images[k], ids[k])
        _show_mask(axes[1, k], masks[k], "actual")
        for r, (name, probabilities) in enumerate(predicted.items(), start=2):
            _show_mask(axes[r, k], (probabilities[k].float() > 0.5).float(), name)
    fig.tight_layout()
    return fig


def per_image_distribution(per_image: dict[str, pd.DataFrame], metric: str = "iou"):
    """Distribution of per-image scores for each run (box + strip)."""
    long = pd.concat([table.assign(run=name) for name, table in per_image.items()], ignore_index=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.boxplot(data=long, x="run", y=metric, ax=ax, color="white", fliersize=0)
    with _fixed_jitter():
        sns.stripplot(data=long, x="run", y=metric, ax=ax, size=2, alpha=0.5)
    ax.set_title(f"per-image {metric} on the test set")
    fig.tight_layout()
    return fig


def worst_cases(
    images: torch.Tensor,
    masks: torch.Tensor,
    probabilities: torch.Tensor,
    ids: Sequence[str],
    scores: Sequence[float],
    title: str = "",
    axes_row=None,
):
    """Images with the ground truth (green) and the prediction (magenta, probability > 0.5) outlined, JA in each
    title. Draws into ``axes_row`` when given (one row of a larger figure), else into a figure of its own."""
    fig = None
    if axes_row is None:
        fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 2.9), squeeze=False)
        axes_row = axes[0]
    for k, ax in enumerate(axes_row):
        if k >= len(images):
            ax.axis("off")
            continue
        _show_image(ax, images[k], f"{ids[k]}\nJA {scores[k]:.2f}")
        ax.contour(masks[k].squeeze(0).float().numpy(), levels=[0.5], colors="lime", linewidths=1.2)
        predicted = (probabilities[k].squeeze(0).float() > 0.5).float().numpy()
        if 0 < predicted.sum() < predicted.size:
            ax.contour(predicted, levels=[0.5], colors="magenta", linewidths=1.2)
        ax.title.set_fontsize(8)
    if title:  # the run's name beside its row (the image axes themselves are hidden)
        axes_row[0].text(
            -0.06,
            0.5,
            title,
            transform=axes_row[0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=10,
            fontweight="bold",
        )
    if fig is not None:
        fig.suptitle(
            f"{title + ': ' if title else ''}worst test images — green: ground truth, magenta: prediction", fontsize=9
        )
        fig.tight_layout()
    return fig


def ja_vs_size(frames: dict[str, pd.DataFrame]):
    """Per-image test JA against lesion area (% of the image) and against original image size, one colour per run."""
    long = pd.concat([frame.assign(run=name) for name, frame in frames.items()], ignore_index=True)
    long["lesion area (% of image)"] = 100 * long["lesion_area"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, column in zip(axes, ("lesion area (% of image)", "megapixels")):
        sns.scatterplot(data=long, x=column, y="iou", hue="run", ax=ax, s=14, alpha=0.7, legend=ax is axes[0])
        ax.axhline(failures.FAIL_BELOW, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(column if column != "megapixels" else "original image size (megapixels)")
    axes[0].set_ylabel("test JA per image")
    axes[0].set_title(f"JA against lesion area (dashed: JA {failures.FAIL_BELOW})", fontsize=10)
    axes[1].set_title("JA against original image size", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- a chapter's figures


def run_figures(result: RunResult, n_images: int = 6) -> dict[str, object]:
    """The training chapter's figures for the lowest seed, saved under the run's ``figures/``."""
    history, best = result.history, result.best_epoch
    name = result.name
    figures = {
        "loss": loss_curves(history, f"{name}: loss per epoch"),
        "iou": metric_curves(history, "iou", f"{name}: IoU per epoch", best),
        "dice": metric_curves(history, "dice", f"{name}: Dice per epoch", best),
        "accuracy": metric_curves(history, "accuracy", f"{name}: pixel accuracy per epoch", best),
    }
    test = result.data.test
    rows = list(range(min(n_images, len(test))))
    scores = result.per_image[int(result.seeds_table["seed"].iloc[0])]["iou"].tolist()
    figures["predictions"] = predictions(
        test.images[rows],
        test.masks[rows],
        result.probabilities[rows],
        [test.ids[k] for k in rows],
        [scores[k] for k in rows],
    )
    for key, fig in figures.items():
        save_figure(fig, result.run_dir, key)
    return figures


def failure_figures(result: RunResult, k: int = 6) -> dict[str, object]:
    """The training chapter's "where it fails" figures for the lowest seed: its ``k`` worst test images with both
    outlines, and JA against lesion area and image size; saved under the run's ``figures/``."""
    frame = failures.per_image_frame(result.per_image[int(result.seeds_table["seed"].iloc[0])])
    figures = {
        "worst": _worst_of(result.data.test, as_scored(result.probabilities, result.params), frame, k, result.name),
        "ja_vs_size": ja_vs_size({result.name: frame}),
    }
    for key, fig in figures.items():
        save_figure(fig, result.run_dir, key)
    return figures


def as_scored(probabilities: torch.Tensor, params: dict) -> torch.Tensor:
    """The masks a run's scores come from, at model resolution: probabilities > 0.5, then the run's post-processing
    (so a figure never shows a speck the scoring removed)."""
    method = params.get("postprocess", "none")
    if method == "none":
        return probabilities
    return torch.stack([metrics.postprocess_mask(p > 0.5, method) for p in probabilities]).float()


def compare_predictions_figure(params: dict, runs: dict[str, SavedRun], count: int = 6):
    """The same test images (chosen by spread of difficulty) with each run's predicted mask."""
    dataset = prepare_data(params, progress=False)
    test = dataset.test
    first = next(iter(runs.values()))
    scores = first.per_image[int(first.seeds["seed"].iloc[0])]["iou"]
    order = scores.sort_values().index.tolist()
    rows = sorted({order[int(k * (len(order) - 1) / max(1, count - 1))] for k in range(min(count, len(order)))})
    predicted = {name: as_scored(run.probabilities[rows], run.info["params"]) for name, run in runs.items()}
    return compare_predictions(test.images[rows], test.masks[rows], predicted, [test.ids[k] for k in rows])


def _worst_of(
    test: DecodedSplit, probabilities: torch.Tensor, frame: pd.DataFrame, k: int, title: str = "", axes_row=None
):
    bad = failures.worst(frame, k)
    rows = [test.ids.index(i) for i in bad["id"]]
    return worst_cases(
        test.images[rows], test.masks[rows], probabilities[rows], list(bad["id"]), bad["iou"].tolist(), title, axes_row
    )


def compare_failures_figure(params: dict, runs: dict[str, SavedRun], k: int = 6):
    """For each run (one row), its ``k`` worst test images (JA averaged over seeds; outlines from the lowest seed)."""
    test = prepare_data(params, progress=False).test
    fig, axes = plt.subplots(len(runs), k, figsize=(2.4 * k, 2.8 * len(runs)), squeeze=False)
    for row, (name, run) in zip(axes, runs.items()):
        _worst_of(test, as_scored(run.probabilities, run.info["params"]), failures.seed_mean_frame(run), k, name, row)
    fig.suptitle("each run's worst test images — green: ground truth, magenta: prediction", fontsize=10)
    fig.tight_layout()
    return fig


def external_distribution(result: external.ExternalResult):
    """Per-image JA of each run on the ISIC test set and on each external set (box + strip, seeds averaged)."""
    frames = []
    for name, run in result.runs.items():
        test = pd.concat([t.set_index("id")["iou"] for t in run.per_image.values()], axis=1).mean(axis=1)
        frames.append(pd.DataFrame({"run": name, "data": external.TEST_NAME, "iou": test.to_numpy()}))
        for (run_name, split), scored in result.scored.items():
            if run_name != name or split == "validation":
                continue
            ja = scored.per_image_iou(*scored.own)
            frames.append(pd.DataFrame({"run": name, "data": split, "iou": ja.to_numpy()}))
    long = pd.concat(frames, ignore_index=True)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    sns.boxplot(data=long, x="run", y="iou", hue="data", ax=ax, fliersize=0)
    with _fixed_jitter():
        sns.stripplot(
            data=long,
            x="run",
            y="iou",
            hue="data",
            dodge=True,
            ax=ax,
            size=2,
            alpha=0.5,
            palette=["black"] * long["data"].nunique(),
            legend=False,
        )
    ax.axhline(failures.FAIL_BELOW, color="grey", linestyle="--", linewidth=0.8)
    ax.set_ylabel("JA per image (original size)")
    ax.set_title("ISIC test set vs the external sets (dashed: JA 0.65)", fontsize=10)
    fig.tight_layout()
    return fig


def external_worst_figure(result: external.ExternalResult, split_name: str, k: int = 6):
    """For each run (one row), its ``k`` worst images of the external set ``split_name``, both outlines drawn."""
    runs = list(result.runs)
    fig, axes = plt.subplots(len(runs), k, figsize=(2.4 * k, 2.8 * len(runs)), squeeze=False)
    for row, name in zip(axes, runs):
        split, probabilities, table = external.worst_external(result, name, split_name, k)
        _worst_of(
            split,
            as_scored(probabilities, result.runs[name].info["params"]),
            failures.per_image_frame(table),
            k,
            name,
            row,
        )
    fig.suptitle(f"each run's worst {split_name} images — green: ground truth, magenta: prediction", fontsize=10)
    fig.tight_layout()
    return fig


def external_figures(result: external.ExternalResult, out_dir: str | Path) -> dict[str, object]:
    """The external chapter's figures, saved under ``out_dir/figures``."""
    figures = {}
    if result.gap.empty:
        return figures
    figures["ja_distribution"] = external_distribution(result)
    for split in {s for (_, s) in result.scored if s != "validation"}:
        figures[f"worst_{split}"] = external_worst_figure(result, split)
    for key, fig in figures.items():
        save_figure(fig, out_dir, key)
    return figures


def reliability_figure(result: RunResult):
    """Reliability diagram of the lowest seed's pixel probabilities (validation where this call scored it, and the
    test set), before and after the temperature it fitted on validation: observed lesion share per predicted bin."""
    seed = int(result.results[0]["seed"])
    temperature = result.results[0].get("calibration", {}).get("temperature", 1.0)
    sets = {"test": (result.probabilities, result.data.test.masks)}
    if seed in result.fits:
        sets = {"validation": (result.fits[seed].val.probabilities, result.data.val.masks), **sets}
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4), squeeze=False)
    for ax, (label, (p, masks)) in zip(axes[0], sets.items()):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
        shown = (
            {"as trained": p}
            if temperature == 1.0
            else {"as trained": p, f"T = {temperature:.2f}": confidence.calibrated(p, temperature)}
        )
        for name, probs in shown.items():
            table = confidence.reliability(probs, masks)
            ece = confidence.expected_calibration_error(probs, masks)
            ax.plot(table["predicted"], table["observed"], marker="o", label=f"{name} (ECE {ece:.3f})")
        ax.set(
            xlabel="predicted lesion probability",
            ylabel="observed lesion share",
            title=f"{result.name}: {label}",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, result.run_dir, "reliability")
    return fig


RATIO_RANGE = 20.0  # area ratios drawn between 1/20 and 20 (an empty predicted mask at 1/20)


def area_ratio_figure(frames: dict[tuple[str, str], pd.DataFrame]):
    """Each image's predicted-to-true lesion area (log scale, clipped to 1/20–20), per set and run: above 1 a run
    over-segments."""
    rows = [
        pd.DataFrame(
            {
                "run": run,
                "data": data,  # an empty mask (ratio 0) has no logarithm: drawn at the floor
                "area ratio": failures.area_ratio(table).clip(1 / RATIO_RANGE, RATIO_RANGE),
            }
        ).dropna()
        for (run, data), table in frames.items()
    ]
    long = pd.concat(rows, ignore_index=True)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.boxplot(data=long, x="data", y="area ratio", hue="run", ax=ax, fliersize=2, log_scale=True)
    for level, style in ((1.0, "-"), (failures.OVER, ":"), (failures.UNDER, ":")):
        ax.axhline(level, color="grey", lw=1, ls=style)
    ax.set(xlabel="", ylabel="predicted / true lesion area", title="area ratio per image (dotted: 1.3× and 1/1.3×)")
    fig.tight_layout()
    return fig


def lesion_area_figure(frames: dict[tuple[str, str], pd.DataFrame]):
    """Per-image JA against the lesion's area as a share of the image (log scale), a panel per run, a colour per set;
    the lines join each set's mean JA per lesion-area bin (``failures.AREA_BINS``), drawn at the bin's median area."""
    rows = []
    for (run, data), table in frames.items():
        frame = failures.per_image_frame(table)
        rows.append(pd.DataFrame({"run": run, "data": data, "lesion area": frame["lesion_area"], "JA": frame["iou"]}))
    long = pd.concat(rows, ignore_index=True)
    long = long[long["lesion area"] > 0]
    long["bin"] = pd.cut(long["lesion area"], failures.AREA_BINS, labels=failures.AREA_LABELS, include_lowest=True)
    runs = list(dict.fromkeys(long["run"]))
    sets = list(dict.fromkeys(long["data"]))
    colours = dict(zip(sets, sns.color_palette(n_colors=len(sets))))
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs) + 1.6, 3.6), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        for data in sets:
            chosen = long[(long["run"] == run) & (long["data"] == data)]
            if chosen.empty:
                continue
            ax.scatter(chosen["lesion area"], chosen["JA"], s=6, alpha=0.35, color=colours[data])
            means = chosen.groupby("bin", observed=True).agg(area=("lesion area", "median"), JA=("JA", "mean"))
            ax.plot(means["area"], means["JA"], marker="o", color=colours[data], label=data)
        for edge in failures.AREA_BINS[1:-1]:
            ax.axvline(edge, color="grey", lw=0.6, ls=":")
        ax.set(xscale="log", xlabel="lesion area (share of the image)", title=run, ylim=(0, 1), xlim=(0.003, 1))
        ticks = [0.01, *failures.AREA_BINS[1:]]
        ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    axes[0][0].set_ylabel("JA per image")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def learning_curve_figure(summary: pd.DataFrame):
    """JA on the clinic's reporting half against k labelled cases fine-tuned on (mean ± std over draws), one line per
    run and set; k = 0 is the run as trained (dot) and with batch-norm statistics adapted, no labels (cross). The
    legend sits beside the axes, never over a line."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for (run, data), rows in summary.groupby(["run", "set"], sort=False):
        tuned = rows[rows["method"].str.startswith("fine-tuned")]
        base = rows[rows["method"] == "as trained"]
        line = ax.errorbar(
            pd.concat([base["k"], tuned["k"]]),
            pd.concat([base["JA mean"], tuned["JA mean"]]),
            yerr=pd.concat([base["JA std"], tuned["JA std"]]).fillna(0),
            marker="o",
            capsize=3,
            label=f"{run} on {data}: fine-tuned on k cases",
        )
        threshold = rows[rows["method"].str.startswith("threshold")]
        if len(threshold):
            ax.errorbar(
                threshold["k"],
                threshold["JA mean"],
                yerr=threshold["JA std"].fillna(0),
                marker="s",
                ls=":",
                capsize=3,
                color=line[0].get_color(),
                label=f"{run}: only the threshold chosen on k cases",
            )
        adapted = rows[rows["method"].str.startswith("batch-norm")]
        ax.scatter(
            adapted["k"],
            adapted["JA mean"],
            marker="x",
            s=80,
            color=line[0].get_color(),
            label=f"{run}: batch-norm statistics adapted (no labels)",
        )
    ax.set(
        xlabel="labelled cases of the clinic used (k)",
        ylabel="JA on the clinic's reporting half",
        title="adapting to another clinic",
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    return fig
