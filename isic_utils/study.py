"""The report's chapters as functions: prepare the data a profile names, train a run (every seed), score it
like the challenge, and gather runs for the comparison. Notebooks call these and show what they return.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import metrics, plots, report
from .data import (
    OFFICIAL_COUNTS,
    DataError,
    ReportData,
    download_isic2016,
    has_split,
    load_report_data,
    read_mask,
)
from .model import EncoderWeightsError, build_model, resolve_weights
from .params import absolute, project_root
from .synthetic import make_synthetic_isic
from .training import FitResult, TrainConfig, fit, load_checkpoint, resolve_device, set_threads

DATA_ENV = "ISIC_DATA_DIR"


def data_root(params: dict) -> Path:
    """Where the profile's data lives: ``data_dir``, else ``$ISIC_DATA_DIR`` (real data), else ``data/<source>``."""
    if params["data_dir"]:
        return absolute(params["data_dir"])
    if params["data_source"] == "isic2016" and os.environ.get(DATA_ENV):
        return absolute(os.environ[DATA_ENV])
    colab = Path("/content")
    base = colab if _in_colab() else project_root()
    if params["data_source"] == "synthetic":  # one folder per size, so profiles never overwrite each other
        return base / "data" / f"synthetic-{params['synthetic_train']}-{params['synthetic_test']}"
    return base / "data" / "isic2016"


def _in_colab() -> bool:
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


def describe_data(params: dict) -> str:
    """One line saying what data this chapter runs on (shown at the top of every chapter and of index.html)."""
    if params["data_source"] == "synthetic":
        return ("**Synthetic data** (the embedded offline default): generated lesions, not dermoscopy. These numbers "
                "show the pipeline works; they say nothing about real lesion segmentation.")
    test = ("the official test set" if params["test_split"] == "official"
            else f"a held-out {params['holdout_fraction']:.0%} of the training ids as test set (not the official test set)")
    return f"**ISIC 2016 Part 1** images from `{data_root(params)}`, with {test}."


def prepare_data(params: dict, progress: bool = True) -> ReportData:
    """Make, find or download the data the parameters name; decode once (cached) and split it."""
    root = data_root(params)
    if params["data_source"] == "synthetic":
        make_synthetic_isic(root, params["synthetic_train"], params["synthetic_test"])
    elif not has_split(root, "train") or (params["test_split"] == "official" and not has_split(root, "test")):
        if not params["download"]:
            raise DataError(
                f"no ISIC 2016 data under {root}. Fix: set data_dir (or {DATA_ENV}) to the folder holding the unzipped "
                "archives, or set download: true to fetch them (about 1 GB)."
            )
        splits = ["train"] + (["test"] if params["test_split"] == "official" else [])
        download_isic2016(root, splits)
    cache = absolute(params["output_dir"]).parent / "cache"
    expected = OFFICIAL_COUNTS if params["data_source"] == "isic2016" else None  # say so when a copy is partial
    return load_report_data(root, params["image_size"], params["val_fraction"], seed=0,
                            test_split=params["test_split"], holdout_fraction=params["holdout_fraction"],
                            limit=params["limit"], cache_dir=cache, progress=progress, expected_counts=expected)


def make_model(params: dict, seed: int | None = None):
    """Build the run's model; returns (model, a sentence on the encoder weights actually used).

    With ``seed``, torch is seeded first so the decoder's (and a random encoder's) initialisation belongs to the seed:
    torch seeds itself at random in each new process, so without it a rerun of the same seed starts elsewhere.
    """
    if seed is not None:
        torch.manual_seed(seed)
    weights = params["encoder_weights"]
    kwargs = dict(decoder=params["decoder"], dropout=params["dropout"], freeze_encoder=params["freeze_encoder"])
    try:
        model = build_model(encoder_weights=weights, **kwargs)
        resolved = resolve_weights(weights)
        note = ("ImageNet weights (torchvision IMAGENET1K_V1)" if resolved == "imagenet"
                else "random initialisation" if resolved in (None, "none") else f"weights from `{resolved}`")
    except EncoderWeightsError as exc:
        if not params["allow_random_encoder"]:
            raise
        model = build_model(encoder_weights=None, **kwargs)
        model.encoder_weights["fallback"] = True
        note = (f"**random initialisation** — ImageNet weights were not available ({str(exc).split('. Fix')[0]}). "
                "This is not transfer learning; set encoder_weights or $ISIC_ENCODER_WEIGHTS for the real study.")
    return model, note


def train_config(params: dict, seed: int) -> TrainConfig:
    return TrainConfig(
        freeze_encoder=params["freeze_encoder"], encoder_lr=params["encoder_lr"], decoder_lr=params["decoder_lr"],
        weight_decay=params["weight_decay"], epochs=params["epochs"], batch_size=params["batch_size"], seed=seed,
        augment=tuple(params["augment"]), loss=params["loss"], precision=params["precision"],
        monitor_test=params["monitor_test"], feature_cache=params["feature_cache"], device=resolve_device("auto"),
    )


def original_size_counts(probabilities: torch.Tensor, data_split, threshold: float = 0.5) -> torch.Tensor:
    """Challenge-style counts: each probability map upsampled (bilinear) to its image's original size,
    thresholded at ``threshold``, and compared with the original full-size mask."""
    counts = []
    for k, pair in enumerate(data_split.sources):
        width, height = data_split.sizes[k]
        mask = read_mask(pair.mask, None).float().unsqueeze(0)
        upsampled = torch.nn.functional.interpolate(probabilities[k:k + 1].float(), size=(height, width),
                                                    mode="bilinear", align_corners=False)
        counts.append(metrics.confusion_counts(upsampled, mask, threshold))
    return torch.cat(counts)


@dataclass
class RunResult:
    """What a training chapter produced, and where its files are.

    ``fits`` holds the seeds trained (or resumed) by this call; ``seeds_table``, ``per_image`` and ``tables``
    cover every finished seed of this configuration found in the run's folder (seeds trained by other processes
    included). ``model``, ``history``, ``best_epoch`` and ``probabilities`` are those of the lowest such seed,
    which the chapter's tables and figures show.
    """

    name: str
    run_dir: Path
    fits: dict[int, FitResult]
    per_image: dict[int, pd.DataFrame]
    seeds_table: pd.DataFrame
    model: torch.nn.Module
    weights_note: str
    data: ReportData
    history: pd.DataFrame
    best_epoch: int
    probabilities: torch.Tensor
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


_NOT_THE_EXPERIMENT = ("seeds", "resume", "output_dir")  # keys that do not change what one seed's run is


def run_key(params: dict, encoder_weights: dict) -> str:
    """The identity of a run's configuration, shared by all its seeds: the parameters (but seeds, resume, where the
    outputs go) and the encoder's starting weights (their hash; "random" for a random encoder, seeded per seed)."""
    kept = {k: v for k, v in params.items() if k not in _NOT_THE_EXPERIMENT}
    weights = "random" if encoder_weights.get("source") == "random initialisation" else encoder_weights.get("sha256")
    return hashlib.sha1(json.dumps([kept, weights], sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_run(params: dict, data: ReportData, verbose: bool = True) -> RunResult:
    """Train ``params['run_name']`` once per seed, score the selected checkpoint on the whole test set at model
    resolution and at original size, and write the run's tables.

    Each seed writes only its own files (``seed<k>/`` and ``tables/per_image_test_seed<k>.csv``), so seeds can
    train in parallel processes; the run's shared tables and ``run.json`` are then rebuilt, under a lock, from
    every finished seed of the same configuration in the folder. ``params['resume']`` continues finished or
    interrupted seeds (false retrains them from scratch).
    """
    set_threads()
    run_dir = absolute(params["output_dir"]) / params["run_name"]
    fits = {}
    model = note = None
    for index, seed in enumerate(params["seeds"]):
        model, note = make_model(params, seed)
        label = f"{params['run_name']} seed {seed}"
        if verbose:
            print(f"— {label}: encoder {note}", flush=True)
        seed_dir = run_dir / f"seed{seed}"
        later = params["epochs"] * (len(params["seeds"]) - index - 1)
        result = fit(model, data, train_config(params, seed), seed_dir, resume=params["resume"], verbose=verbose,
                     label=label, later_epochs=later)
        challenge = original_size_counts(result.test.probabilities, data.test)
        report.save_table(report.per_image_scores(challenge, data.test.ids, data.test.sizes), run_dir,
                          f"per_image_test_seed{seed}")
        with report.atomic_path(seed_dir / "test_probabilities.pt") as tmp:
            torch.save(result.test.probabilities, tmp)
        with report.atomic_path(seed_dir / "history.csv") as tmp:
            result.history.to_csv(tmp, index=False)
        report.write_json(seed_dir / "result.json", {
            "seed": seed, "run_key": run_key(params, model.encoder_weights), "best_epoch": result.best_epoch,
            "val": result.val.summary(), "test": result.test.summary(), "test_orig": metrics.summarize(challenge),
            "precision": result.precision, "feature_cache": result.used_feature_cache,
            "train_minutes": result.seconds / 60, "encoder_weights": model.encoder_weights, "weights_note": note,
        })
        fits[seed] = result
    with report.locked(run_dir):
        return _write_run_tables(params, data, run_dir, run_key(params, model.encoder_weights), model, note, fits)


def _write_run_tables(params: dict, data: ReportData, run_dir: Path, key: str, model, note: str,
                      fits: dict[int, FitResult]) -> RunResult:
    """Rebuild the run's shared files from every finished seed with configuration ``key``."""
    results = []
    for path in run_dir.glob("seed*/result.json"):
        result = json.loads(path.read_text())
        if result.get("run_key") == key and (path.parent / "history.csv").exists():
            results.append(result)
    results.sort(key=lambda r: r["seed"])
    rows = [{
        "seed": r["seed"], "best_epoch": r["best_epoch"], "val_iou_mean": r["val"]["iou_mean"],
        "test_iou_mean_model_px": r["test"]["iou_mean"], "test_iou_pooled_model_px": r["test"]["iou_pooled"],
        **{f"test_{k}_orig": v for k, v in r["test_orig"].items()},
        "precision": r["precision"], "feature_cache": r["feature_cache"], "train_minutes": r["train_minutes"],
    } for r in results]
    first = results[0]
    first_dir = run_dir / f"seed{first['seed']}"
    history = pd.read_csv(first_dir / "history.csv")
    model.load_state_dict(load_checkpoint(first_dir / "best.pt")["model"])
    seeds_table = report.save_table(pd.DataFrame(rows), run_dir, "seeds")
    original = {f"{k} (original size)": v for k, v in first["test_orig"].items() if k.endswith("_mean")}
    tables = {
        "epochs": report.save_table(report.epoch_table(history), run_dir, "epochs"),
        "summary": report.save_table(report.summary_table(history, first["val"], {**first["test"], **original},
                                                          first["best_epoch"]), run_dir, "summary"),
        "parameters": report.save_table(pd.concat([report.parameter_table(model.encoder, "encoder"),
                                                   report.parameter_table(model.decoder, "decoder"),
                                                   report.parameter_table(model, "whole model")],
                                                  ignore_index=True), run_dir, "parameters"),
    }
    seeds = [r["seed"] for r in results]
    report.write_json(run_dir / "run.json", {
        "run_name": params["run_name"], "seeds": seeds, "weights": first["weights_note"],
        "encoder_weights": {str(r["seed"]): r["encoder_weights"] for r in results}, "params": params,
        "test_source": data.test_source, "finished": time.time(),
    })
    per_image = {seed: report.read_table(run_dir, f"per_image_test_seed{seed}") for seed in seeds}
    probabilities = torch.load(first_dir / "test_probabilities.pt", weights_only=True)
    return RunResult(params["run_name"], run_dir, fits, per_image, seeds_table, model, first["weights_note"], data,
                     history, first["best_epoch"], probabilities, tables)


def run_figures(result: RunResult, n_images: int = 6) -> dict[str, object]:
    """The training chapter's figures for the lowest seed, saved under the run's ``figures/``."""
    history, best = result.history, result.best_epoch
    name = result.name
    figures = {
        "loss": plots.loss_curves(history, f"{name}: loss per epoch"),
        "iou": plots.metric_curves(history, "iou", f"{name}: IoU per epoch", best),
        "dice": plots.metric_curves(history, "dice", f"{name}: Dice per epoch", best),
        "accuracy": plots.metric_curves(history, "accuracy", f"{name}: pixel accuracy per epoch", best),
    }
    test = result.data.test
    rows = list(range(min(n_images, len(test))))
    scores = result.per_image[int(result.seeds_table["seed"].iloc[0])]["iou"].tolist()
    figures["predictions"] = plots.predictions(test.images[rows], test.masks[rows], result.probabilities[rows],
                                               [test.ids[k] for k in rows], [scores[k] for k in rows])
    for key, fig in figures.items():
        plots.save_figure(fig, result.run_dir, key)
    return figures


# ----------------------------------------------------------------------------- comparison


@dataclass
class SavedRun:
    """A finished training run read back from disk (never retrained)."""

    name: str
    run_dir: Path
    info: dict
    seeds: pd.DataFrame
    epochs: pd.DataFrame
    per_image: dict[int, pd.DataFrame]
    probabilities: torch.Tensor


def load_run(output_dir: str | Path, name: str) -> SavedRun:
    run_dir = absolute(output_dir) / name
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path} not found: run the training chapter for {name!r} first "
                                f"(papermill notebooks/02_train.ipynb ... -f params/{name}.yaml).")
    info = json.loads(info_path.read_text())
    seeds = report.read_table(run_dir, "seeds")
    per_image = {int(s): report.read_table(run_dir, f"per_image_test_seed{int(s)}") for s in seeds["seed"]}
    first = int(seeds["seed"].iloc[0])
    history = pd.read_csv(run_dir / "tables" / "epochs.csv")
    probabilities = torch.load(run_dir / f"seed{first}" / "test_probabilities.pt", weights_only=True)
    return SavedRun(name, run_dir, info, seeds, history, per_image, probabilities)


SPREAD_COLUMNS = {
    "test_iou_mean_orig": "JA / IoU (mean per image, original size)",
    "test_iou_pooled_orig": "IoU (pooled pixels, original size)",
    "test_dice_mean_orig": "Dice (mean per image)",
    "test_accuracy_mean_orig": "pixel accuracy (mean per image)",
    "test_sensitivity_mean_orig": "sensitivity (mean per image)",
    "test_specificity_mean_orig": "specificity (mean per image)",
    "test_iou_mean_model_px": "IoU (mean per image, model resolution)",
}


def comparison_table(runs: dict[str, SavedRun]) -> pd.DataFrame:
    """Table 9: test scores of each run's validation-selected checkpoint, mean ± std over seeds."""
    rows = []
    for name, run in runs.items():
        row = {"run": name, "seeds": len(run.seeds)}
        for column, label in SPREAD_COLUMNS.items():
            values = run.seeds[column]
            row[label] = f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values.mean():.4f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_wilcoxon(a: pd.Series, b: pd.Series) -> tuple[pd.DataFrame, float, float]:
    """Join two per-image series on id; Wilcoxon signed-rank (W, p), or (nan, 1.0) when every pair is tied."""
    from scipy.stats import wilcoxon

    joined = pd.concat([a, b], axis=1, keys=["A", "B"]).dropna()
    if ((joined["B"] - joined["A"]) != 0).any():
        statistic, p_value = wilcoxon(joined["A"], joined["B"])
        return joined, float(statistic), float(p_value)
    return joined, float("nan"), 1.0


def wilcoxon_table(runs: dict[str, SavedRun], metric: str = "iou") -> pd.DataFrame:
    """Paired Wilcoxon signed-rank tests on per-image JA between every pair of runs.

    The main test pairs each image's score averaged over the run's seeds. With several seeds in common it is also
    run seed by seed (seed k of A against seed k of B) and the largest of those p-values is reported, so a reader
    sees whether the conclusion holds for every single training run and not only for the average.
    """
    def by_id(frame: pd.DataFrame) -> pd.Series:
        return frame.set_index("id")[metric]

    per_image = {name: pd.concat(list(run.per_image.values())).groupby("id")[metric].mean() for name, run in runs.items()}
    names = list(runs)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            joined, statistic, p_value = _paired_wilcoxon(per_image[a], per_image[b])
            difference = joined["B"] - joined["A"]
            row = {"A": a, "B": b, "images": len(joined), f"mean {metric} A": joined["A"].mean(),
                   f"mean {metric} B": joined["B"].mean(), "mean B − A": difference.mean(),
                   "B better on": f"{(difference > 0).mean():.0%} of images", "Wilcoxon W": statistic,
                   "p-value": p_value}
            common = sorted(set(runs[a].per_image) & set(runs[b].per_image))
            if len(common) > 1:
                row["p-value, worst single seed"] = max(
                    _paired_wilcoxon(by_id(runs[a].per_image[s]), by_id(runs[b].per_image[s]))[2] for s in common)
            rows.append(row)
    return pd.DataFrame(rows)


def written_reading(runs: dict[str, SavedRun], tests: pd.DataFrame) -> str:
    """A short reading of the comparison, generated from the numbers."""
    means = {name: run.seeds["test_iou_mean_orig"].mean() for name, run in runs.items()}
    best = max(means, key=means.get)
    lines = [f"- Best mean per-image Jaccard on the test set: **{best}** ({means[best]:.3f})."]
    for _, row in tests.iterrows():
        verdict = "a significant" if row["p-value"] < 0.05 else "no significant"
        lines.append(f"- {row['B']} vs {row['A']}: mean per-image JA changes by {row['mean B − A']:+.3f} "
                     f"({row['B better on']} improve); Wilcoxon p = {row['p-value']:.2g}, {verdict} difference at 0.05"
                     + (f" (largest p over single seeds: {row['p-value, worst single seed']:.2g})."
                        if pd.notna(row.get("p-value, worst single seed")) else "."))
    spreads = {name: run.seeds["test_iou_mean_orig"].std(ddof=1) for name, run in runs.items() if len(run.seeds) > 1}
    if spreads:
        lines.append("- Spread over seeds (std of mean JA): " + ", ".join(f"{n} {s:.3f}" for n, s in spreads.items()) + ".")
    else:
        lines.append("- One seed per run: differences smaller than a few hundredths may be seed noise "
                     "(set `seeds: [0, 1, 2]` for the spread).")
    return "\n".join(lines)


def chapter_dir(params: dict, name: str) -> Path:
    """The folder where a chapter writes its tables and figures: ``output_dir/name``."""
    folder = absolute(params["output_dir"]) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def headline(run: SavedRun) -> dict[str, float]:
    """A run's test scores averaged over seeds (original size, challenge-style)."""
    return {
        "iou_mean": run.seeds["test_iou_mean_orig"].mean(),
        "iou_pooled": run.seeds["test_iou_pooled_orig"].mean(),
        "dice_mean": run.seeds["test_dice_mean_orig"].mean(),
        "accuracy_mean": run.seeds["test_accuracy_mean_orig"].mean(),
    }


def compare_predictions_figure(params: dict, runs: dict[str, SavedRun], count: int = 6):
    """The same test images (chosen by spread of difficulty) with each run's predicted mask."""
    dataset = prepare_data(params, progress=False)
    test = dataset.test
    first = next(iter(runs.values()))
    scores = first.per_image[int(first.seeds["seed"].iloc[0])]["iou"]
    order = scores.sort_values().index.tolist()
    rows = sorted({order[int(k * (len(order) - 1) / max(1, count - 1))] for k in range(min(count, len(order)))})
    predicted = {name: run.probabilities[rows] for name, run in runs.items()}
    return plots.compare_predictions(test.images[rows], test.masks[rows], predicted, [test.ids[k] for k in rows])
