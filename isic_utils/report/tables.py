"""The report's tables (pandas): per epoch, the compact summary, parameters, EDA, the student report vs ours; and
what the index page says first: the answer, Table 9, one finding per chapter, all read from the saved tables.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..base.files import page_link, plain, save_table, signed, write_text
from ..data.eda import check_alignment
from ..deploy.costs import deploy_sentence
from ..evaluation import failures, gallery, trust
from ..evaluation.comparison import best_run, caveat
from ..evaluation.external import ON_SET, ExternalResult
from ..evaluation.gallery import GALLERY
from ..model.networks import IMAGENET_MEAN, IMAGENET_STD, count_parameters
from ..training.experiments import RunResult, SavedRun, prepare_data
from . import plots

# The student report's printed results (its Tables 2, 6 and 9), reproduced for comparison only.
STUDENT_REPORT = {
    "task1": {"iou": 0.5585, "dice": 0.7167, "accuracy": 0.8150},
    "task2": {"iou": 0.7165, "dice": 0.8348, "accuracy": 0.8973},
}


# ----------------------------------------------------------------------------- the report's tables

EPOCH_COLUMNS = {
    "epoch": "epoch",
    "train_loss": "train loss",
    "val_loss": "val loss",
    "val_iou_mean": "val IoU (mean/img)",
    "val_iou_pooled": "val IoU (pooled)",
    "val_dice_mean": "val Dice (mean/img)",
    "val_accuracy_mean": "val pixel acc (mean/img)",
    "test_loss": "test loss [monitor]",
    "test_iou_mean": "test IoU (mean/img) [monitor]",
    "test_iou_pooled": "test IoU (pooled) [monitor]",
    "test_dice_mean": "test Dice (mean/img) [monitor]",
    "test_accuracy_mean": "test pixel acc (mean/img) [monitor]",
    "epoch_seconds": "seconds",
}


def epoch_table(history: pd.DataFrame) -> pd.DataFrame:
    """The per-epoch table (the report's Tables 1 and 5): losses, IoU, Dice and pixel accuracy per epoch.

    Test columns are labelled ``[monitor]``: they are printed as the report did, never used to choose.
    """
    present = [c for c in EPOCH_COLUMNS if c in history.columns]
    return history[present].rename(columns=EPOCH_COLUMNS)


def summary_table(history: pd.DataFrame, final_val: dict, final_test: dict, best_epoch: int) -> pd.DataFrame:
    """The summary (the report's Tables 2 and 6) as one compact table: for each split, the min / max / mean over
    epochs of loss, IoU, Dice and pixel accuracy (per-image means), as the report printed them, then the checkpoint
    chosen by validation IoU (epoch ``best_epoch``) scored once on the whole split — the numbers to quote — and,
    for the test set, at each image's original size (challenge-style). Test rows over epochs say ``[monitor]``:
    choosing among them would be choosing on the test set.
    """
    metrics_ = {"loss": "loss", "IoU": "iou_mean", "Dice": "dice_mean", "accuracy": "accuracy_mean"}
    rows = []
    for split, final in (("val", final_val), ("test", final_test)):
        label = "validation" if split == "val" else "test"
        columns = {name: f"{split}_{key}" for name, key in metrics_.items()}
        if f"{split}_iou_mean" in history:
            for stat in ("min", "max", "mean"):
                rows.append(
                    {
                        "split": label,
                        "row": f"{stat} over epochs" + (" [monitor]" if split == "test" else ""),
                        **{
                            name: getattr(history[column], stat)() if column in history else None
                            for name, column in columns.items()
                        },
                    }
                )
        rows.append(
            {
                "split": label,
                "row": f"selected checkpoint (epoch {best_epoch})",
                **{name: final.get(key) for name, key in metrics_.items()},
            }
        )
        original = {name: final.get(f"{key} (original size)") for name, key in metrics_.items() if key != "loss"}
        if any(value is not None for value in original.values()):
            rows.append({"split": label, "row": "selected checkpoint, original size", "loss": None, **original})
    return pd.DataFrame(rows, columns=["split", "row", *metrics_])


def parameter_table(module, name: str) -> pd.DataFrame:
    """Total / trainable / non-trainable parameters of ``module`` (the report's Tables 3, 4, 7, 8)."""
    counts = count_parameters(module)
    return pd.DataFrame(
        [
            {
                "part": name,
                "total": counts["total"],
                "trainable": counts["trainable"],
                "non-trainable": counts["non_trainable"],
            }
        ]
    )


def write_decoder_parameters(decoder, path: str | Path, max_values: int = 20) -> Path:
    """Write each decoder tensor's name, shape, statistics and first values to a text file (as the report did)."""
    lines = []
    for name, tensor in decoder.state_dict().items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.flatten().float()
        lines.append(
            f"{name}  shape={tuple(tensor.shape)}  mean={flat.mean():.6f}  std={flat.std(correction=0):.6f}  "
            f"min={flat.min():.6f}  max={flat.max():.6f}"
        )
        lines.append(
            "  "
            + " ".join(f"{v:.5f}" for v in flat[:max_values].tolist())
            + (" ..." if flat.numel() > max_values else "")
        )
    return write_text(path, "\n".join(lines) + "\n")


def report_vs_reproduction(ours: dict[str, dict], notes: dict[str, str] | None = None) -> pd.DataFrame:
    """The student report's numbers beside ours (task1, task2), with the method differences that explain them;
    ``notes`` (``comparison.caveats``): what a run's numbers mean when it learned nothing or had no ImageNet
    weights, shown beside them."""
    rows = []
    for task, theirs in STUDENT_REPORT.items():
        if task not in ours:
            continue
        mine = ours[task]
        rows.append(
            {
                "task": task,
                "report IoU (max over epochs, last test batch)": theirs["iou"],
                "ours IoU (mean/img, whole test set, val-selected)": mine.get("iou_mean"),
                "ours IoU (pooled)": mine.get("iou_pooled"),
                "report Dice": theirs["dice"],
                "ours Dice (mean/img)": mine.get("dice_mean"),
                "report accuracy": theirs["accuracy"],
                "ours accuracy (mean/img)": mine.get("accuracy_mean"),
                **({"ours: read first": (notes or {}).get(task, "")} if notes else {}),
            }
        )
    return pd.DataFrame(rows)


METHOD_DIFFERENCES = [
    (
        "Test metrics",
        "the last test batch only",
        "every test image, once",
        "a single batch of a few images is a noisy sample; ours averages the whole set",
    ),
    (
        "Model selection",
        "max IoU over epochs on the test set",
        "best validation IoU; test scored once",
        "choosing on the test set inflates the number by the noise across epochs",
    ),
    (
        "Frozen BatchNorm",
        "left in train mode (running stats drift)",
        "kept in eval mode",
        "task 1 then really is feature extraction with ImageNet statistics",
    ),
    (
        "Input normalisation",
        "none",
        "ImageNet mean/std, as the weights expect",
        "the encoder sees inputs on the scale it was trained on",
    ),
    (
        "Mask resizing",
        "bilinear (grey edge values)",
        "nearest-neighbour, binarised",
        "targets stay binary, so BCE and IoU are computed on true labels",
    ),
    (
        "Threshold",
        "0.5 on raw logits (= probability 0.62)",
        "0.5 on probabilities",
        "a logit threshold of 0.5 shrinks every predicted lesion",
    ),
    (
        "IoU averaging",
        "unstated (batch-level)",
        "mean per image and pooled, both labelled",
        "the challenge ranked by mean per-image Jaccard; pooled IoU is higher on large lesions",
    ),
]


def method_differences_table() -> pd.DataFrame:
    return pd.DataFrame(METHOD_DIFFERENCES, columns=["aspect", "student report", "this reproduction", "effect"])


def counts_table(dataset) -> pd.DataFrame:
    """Images per split, with where the test set came from."""
    return pd.DataFrame(
        [{"split": split, "images": count} for split, count in dataset.counts().items()]
        + [{"split": "test source", "images": dataset.test_source}]
    )


def size_overview(sizes: pd.DataFrame) -> pd.DataFrame:
    """Original sizes at a glance: per dimension (width, height, megapixels) the images, distinct values, min,
    median and max, and how many distinct (width, height) pairs there are (the full list: ``size_summary``)."""
    values = sizes.assign(megapixels=sizes["width"] * sizes["height"] / 1e6)

    def plain(value, pixels: bool):  # pixels stay whole numbers (602, not 602.000); a median may be a half
        return int(value) if pixels and float(value).is_integer() else float(value)

    rows = [
        {
            "dimension": column,
            "images": int(values[column].count()),
            "distinct": int(values[column].nunique()),
            **{k: plain(getattr(values[column], k)(), column != "megapixels") for k in ("min", "median", "max")},
        }
        for column in ("width", "height", "megapixels")
    ]
    rows.append(
        {
            "dimension": "width × height",
            "images": int(len(sizes)),
            "distinct": int(len(sizes.groupby(["width", "height"]))),
        }
    )
    return pd.DataFrame(rows, columns=["dimension", "images", "distinct", "min", "median", "max"], dtype=object)


def size_summary(sizes: pd.DataFrame) -> pd.DataFrame:
    """Distinct original sizes and how many images have each, most common first."""
    table = sizes.groupby(["width", "height"]).size().reset_index(name="images")
    return table.sort_values("images", ascending=False).reset_index(drop=True)


def pixel_stats_table(stats: dict) -> pd.DataFrame:
    """Per-channel mean/std of the training images beside ImageNet's."""
    return pd.DataFrame(
        {
            "channel": ["R", "G", "B"],
            "mean (training images)": stats["mean"],
            "std (training images)": stats["std"],
            "ImageNet mean": IMAGENET_MEAN,
            "ImageNet std": IMAGENET_STD,
        }
    )


def alignment_summary(splits: dict) -> pd.DataFrame:
    """Per split: images checked, masks named for their image, empty or full masks, lesion darker than skin."""
    rows = []
    for name, split in splits.items():
        table = check_alignment(split)
        rows.append(
            {
                "split": name,
                "images": len(table),
                "mask named for its image": int(table["mask_named_for_image"].sum()),
                "empty masks": int((table["lesion_fraction"] == 0).sum()),
                "full masks": int((table["lesion_fraction"] == 1).sum()),
                "lesion darker than skin": int(table["lesion_darker_than_skin"].sum()),
                "mean lesion fraction": table["lesion_fraction"].mean(),
            }
        )
    return pd.DataFrame(rows)


def run_tables(run: RunResult) -> dict[str, pd.DataFrame]:
    """A training chapter's tables for its lowest seed, written under the run's ``tables/`` (and the decoder's
    parameters to ``decoder_parameters.txt``): ``epochs`` (Tables 1 / 5), ``summary`` (2 / 6), ``parameters``."""
    first = run.results[0]
    original = {f"{k} (original size)": v for k, v in first["test_orig"].items() if k.endswith("_mean")}
    write_decoder_parameters(run.model.decoder, run.run_dir / "decoder_parameters.txt")
    return {
        "epochs": save_table(epoch_table(run.history), run.run_dir, "epochs"),
        "summary": save_table(
            summary_table(run.history, first["val"], {**first["test"], **original}, first["best_epoch"]),
            run.run_dir,
            "summary",
        ),
        "parameters": save_table(
            pd.concat(
                [
                    parameter_table(run.model.encoder, "encoder"),
                    parameter_table(run.model.decoder, "decoder"),
                    parameter_table(run.model, "whole model"),
                ],
                ignore_index=True,
            ),
            run.run_dir,
            "parameters",
        ),
    }


def trust_tables(run: RunResult) -> dict:
    """The training chapter's "which masks to trust": the confidence (how it flags failures on validation and the
    test set), its candidates' validation ρ, the calibration, saved under the run's ``tables/``; the run's gallery
    page (``<run>/gallery.html``) written; the reading."""
    seed = int(run.results[0]["seed"])
    tables = {
        "confidence": save_table(trust.confidence_table(run.run_dir, run.name), run.run_dir, "confidence"),
        "candidates": save_table(trust.candidates_table(run.run_dir, run.name), run.run_dir, "confidence_candidates"),
        "calibration": save_table(trust.calibration_table(run.run_dir, run.name), run.run_dir, "calibration"),
    }
    flag = trust.calibrations(run.run_dir).get(seed, {}).get("flag_below")
    trust.run_gallery(
        run.run_dir / GALLERY,
        run.name,
        run.data.test,
        plots.as_scored(run.probabilities, run.params),
        run.per_image[seed],
        flag,
    )
    tables["reading"] = trust.trust_reading(tables["confidence"], tables["calibration"])
    tables["link"] = (
        f"**[Every test prediction of {run.name}]({page_link(run.run_dir / GALLERY)})** — a page of thumbnails "
        "sortable by JA, confidence and lesion size."
    )
    return tables


def compare_trust(params: dict, runs: dict[str, SavedRun], out_dir: Path) -> dict:
    """The comparison chapter's "which masks to trust": every run's confidence and calibration tables side by side
    (saved in ``out_dir/tables``) and the gallery of every test image predicted by every run (``compare/gallery.html``)."""
    confidence = pd.concat([trust.confidence_table(r.run_dir, n) for n, r in runs.items()], ignore_index=True)
    calibration = pd.concat([trust.calibration_table(r.run_dir, n) for n, r in runs.items()], ignore_index=True)
    test = prepare_data(params, progress=False).test
    trust.compare_gallery(
        out_dir / GALLERY, test, runs, {n: plots.as_scored(r.probabilities, r.info["params"]) for n, r in runs.items()}
    )
    return {
        "confidence": save_table(confidence, out_dir, "confidence"),
        "calibration": save_table(calibration, out_dir, "calibration"),
        "reading": trust.trust_reading(confidence, calibration),
        "link": f"**[Every test prediction, run by run]({page_link(out_dir / GALLERY)})**",
    }


def external_galleries(result: ExternalResult, out_dir: Path) -> str:
    """Chapter 3's galleries: for each external set scored, every image with each run's prediction (lowest seed,
    its own options) as ``gallery_<set>.html`` in ``out_dir``; returns the Markdown links."""
    links = []
    for external in (s for s in result.sets if s.found):
        entries, split = {}, None
        for name, run in result.runs.items():
            scored = result.scored[(name, external.name)]
            seed = min(scored.probabilities)
            split = result.splits[(external.name, int(run.info["params"]["image_size"]))]
            entries[name] = {
                "masks": plots.as_scored(scored.probabilities[seed], run.info["params"]),
                "table": failures.per_image_frame(scored.own_tables()[seed]),
                "flag_below": scored.calibrations[seed].get("flag_below"),
            }
        page = out_dir / f"{GALLERY.removesuffix('.html')}_{_slug(external.name)}.html"
        gallery.write_gallery(
            page,
            f"{external.name} — every prediction, run by run",
            f"Every image of {html.escape(external.name)}, one thumbnail per run: JA and the run's "
            "confidence (chosen on ISIC validation, never on this set).",
            split.images,
            split.masks,
            split.ids,
            entries,
        )
        links.append(f"**[Every {external.name} prediction]({page_link(page)})**")
    return " · ".join(links) or "No external set scored: no gallery."


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


# ----------------------------------------------------------------------------- the index page: the answer first


def _table(folder: Path, name: str) -> pd.DataFrame | None:
    path = folder / "tables" / f"{name}.csv"
    return pd.read_csv(path) if path.exists() else None


def data_line(out_dir: Path) -> str:
    """ "Data: 516 train / 129 validation / 161 test images." from the EDA chapter's counts ('' before it ran)."""
    counts = _table(out_dir / "eda", "counts")
    if counts is None:
        return ""
    images = dict(zip(counts["split"], counts["images"]))
    return (
        f"Data: {images.get('train')} train / {images.get('validation')} validation / {images.get('test')} test images."
    )


def _run_finding(folder: Path) -> str:
    seeds = _table(folder, "seeds")
    info_path = folder / "run.json"
    if seeds is None or not info_path.exists():
        return "not run yet."
    info = json.loads(info_path.read_text())
    scores = seeds["test_iou_mean_orig"]
    spread = f" ± {scores.std(ddof=1):.3f} over {len(seeds)} seeds" if len(seeds) > 1 else ""
    first = int(seeds["seed"].iloc[0])
    per_image = _table(folder, f"per_image_test_seed{first}")
    fails = (
        ""
        if per_image is None
        else (
            f"; {int((per_image['iou'] < failures.FAIL_BELOW).sum())} of {len(per_image)} test images below JA "
            f"{failures.FAIL_BELOW} (seed {first})"
        )
    )
    trained = (info.get("trained_on") or {}).get(str(first), {})
    where = f"; trained on {trained['device_name']} ({trained['precision']})" if trained else ""
    weights = (info.get("encoder_weights") or {}).get(str(first), {})
    encoder = weights.get("source", "unrecorded") + (
        " (ImageNet weights were unavailable)" if weights.get("fallback") else ""
    )
    warning = _run_caveat(folder, seeds)
    warning = f"{warning[0].upper()}{warning[1:]}; " if warning else ""
    return (
        f"{warning}test JA {scores.mean():.3f}{spread} (mean per image, original size); checkpoint of epoch "
        f"{int(seeds['best_epoch'].iloc[0])} of {info['params']['epochs']} chosen on validation (val IoU "
        f"{seeds['val_iou_mean'].iloc[0]:.3f}){fails}; encoder: {encoder}{where}."
    )


def _compare_finding(out_dir: Path) -> str:
    folder = out_dir / "compare"
    table, tests = _table(folder, "comparison"), _table(folder, "wilcoxon")
    if table is None:
        return "not run yet."
    means, nothing = {}, {}
    for name in table["run"]:
        seeds = _table(out_dir / name, "seeds")
        if seeds is not None:
            means[name] = float(seeds["test_iou_mean_orig"].mean())
            text = _run_caveat(out_dir / name, seeds)
            if text.startswith("learned nothing"):
                nothing[name] = text
    best = best_run(means, set(nothing))
    if best is None:
        return "no run learned to segment: " + "; ".join(f"{name} {text}" for name, text in nothing.items()) + "."
    line = f"{best} segments the test set best: mean per-image JA {means[best]:.3f}"
    others = []
    for _, row in (tests if tests is not None else pd.DataFrame()).iterrows():
        if best in (row["A"], row["B"]):
            other = row["A"] if row["B"] == best else row["B"]
            if other in nothing:
                continue
            gain = row["mean B − A"] if row["B"] == best else -row["mean B − A"]
            others.append(f"{signed(gain)} over {other} (Wilcoxon p {row['p-value']:.2g})")
    left_out = "".join(f" {name} is not compared: it {text}." for name, text in nothing.items())
    return line + ("; " + ", ".join(others) if others else "") + "." + left_out


def _run_caveat(folder: Path, seeds: pd.DataFrame) -> str:
    """``comparison.caveat`` of the run saved in ``folder``, read from its record and per-image tables."""
    try:
        info = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        info = {}
    tables = (_table(folder, f"per_image_test_seed{int(seed)}") for seed in seeds["seed"])
    return caveat(info, [table for table in tables if table is not None])


def _eda_finding(out_dir: Path) -> str:
    folder = out_dir / "eda"
    sizes = _table(folder, "sizes")
    line = data_line(out_dir)
    if sizes is None:
        return line or "not run yet."
    smallest = sizes.loc[(sizes["width"] * sizes["height"]).idxmin()]
    largest = sizes.loc[(sizes["width"] * sizes["height"]).idxmax()]
    alignment = _table(folder, "alignment")
    checked = "" if alignment is None else " Every image was checked against its own mask (see the alignment table)."
    return (
        f"{line} Original sizes from {smallest['width']}×{smallest['height']} to {largest['width']}×"
        f"{largest['height']} ({len(sizes)} distinct), resized to the model's square input.{checked}"
    )


def _external_gaps(out_dir: Path) -> tuple[pd.DataFrame | None, dict[str, str]]:
    """Chapter 3's gap table, read once, without the runs that learned nothing, and those runs with why; (None, {})
    before the chapter ran."""
    gap = _table(out_dir / "external", "gap")
    if gap is None:
        return None, {}
    nothing = {}
    for run in gap["run"].unique():
        seeds = _table(out_dir / run, "seeds")
        text = _run_caveat(out_dir / run, seeds) if seeds is not None else ""
        if text.startswith("learned nothing"):
            nothing[run] = text
    return gap[~gap["run"].isin(list(nothing))], nothing


def _external_rows(out_dir: Path, gaps=None) -> tuple[pd.DataFrame | None, dict[str, str]]:
    """Chapter 3's gaps as the index shows them, one row per run that learned to segment and external set (its
    reporting half included): the ISIC test JA, the set's, the gap ± its std over seeds and whether it stands out of
    that spread; and the runs left out, with why. (None, {}) before the chapter ran. ``gaps``: ``_external_gaps``'
    answer, when the caller has it."""
    gap, nothing = gaps or _external_gaps(out_dir)
    if gap is None:
        return None, {}
    rows = []
    for _, row in gap.iterrows():
        name = row["external set"]
        spread = row.get("JA gap std over seeds")
        rows.append(
            {
                "run": row["run"],
                "external set": name,
                "images": int(row["images"]) if pd.notna(row.get("images")) else "",
                "JA ISIC test": plain(row["JA ISIC test"]),
                "JA on the set": plain(_ja_on_set(row)),
                "gap": signed(row["JA gap"]) + (f" ± {plain(spread)}" if pd.notna(spread) else ""),
                "against the seed spread": row.get("JA gap against the seed spread", ""),
            }
        )
    return pd.DataFrame(rows), nothing


def _ja_on_set(row) -> float:
    """A gap row's JA on its set (or, in a table of an earlier version, its per-set column)."""
    return row.get(f"JA {ON_SET}", row.get(f"JA {row['external set']}"))


def _external_finding(out_dir: Path, gaps=None) -> str:
    """One sentence: how far every run that learned to segment falls (or rises) on each external set as a whole."""
    gap, nothing = gaps or _external_gaps(out_dir)
    if gap is None:
        return "not run yet."
    left_out = "".join(f" {name} is left out: it {text}." for name, text in nothing.items())
    if gap.empty and not nothing:
        return "no external set was found (see the chapter for where to get PH2)."
    whole = gap[~gap["external set"].str.contains(",")]  # not a set's choosing or reporting half
    if whole.empty:
        return left_out.strip()
    if len(whole) == 1:  # one run on one set: its numbers, in one line
        r = _external_rows(out_dir, (whole, nothing))[0].iloc[0]
        return (
            f"{r['run']} JA {r['JA on the set']} on {r['external set']} vs {r['JA ISIC test']} on the ISIC test "
            f"set ({r['gap']}).{left_out}"
        )
    gaps_ = {f"{r['run']} on {r['external set']}": float(r["JA gap"]) for _, r in whole.iterrows()}
    low, high = min(gaps_, key=gaps_.get), max(gaps_, key=gaps_.get)
    elsewhere = "another clinic's images" if whole["external set"].nunique() == 1 else "every external set"
    if gaps_[high] < 0:
        sentence = (
            f"Every run scores lower on {elsewhere} than on the ISIC test set: JA gap from "
            f"{signed(gaps_[high])} ({high}) to {signed(gaps_[low])} ({low})."
        )
    else:
        sentence = (
            f"The JA gap to the ISIC test set runs from {signed(gaps_[low])} ({low}) to {signed(gaps_[high])} ({high})."
        )
    worth = []  # what the best model is worth on each set
    for name, rows in whole.groupby("external set", sort=False):
        best = rows.loc[rows[f"JA {ON_SET}"].astype(float).idxmax()] if f"JA {ON_SET}" in rows else None
        if best is not None and len(rows) > 1:
            worth.append(
                f"on {name} ({int(best['images'])} images) the best, {best['run']}, scores JA "
                f"{plain(best[f'JA {ON_SET}'])} (a gap of {signed(best['JA gap'])})"
            )
    if worth:
        sentence += " " + "; ".join(worth)[0].upper() + "; ".join(worth)[1:] + "."
    return sentence + left_out


def chapter_finding(out_dir: Path, name: str, chapter: str) -> str:
    """One sentence of what chapter ``name`` found, from the numbers it saved."""
    if chapter == "eda":
        return _eda_finding(out_dir)
    if chapter == "external":
        return _external_finding(out_dir)
    if chapter == "compare":
        return _compare_finding(out_dir) + _deploy_finding(out_dir)
    return _run_finding(out_dir / name)


def _deploy_finding(out_dir: Path) -> str:
    """What deploying the best-scoring run costs, from the comparison's ``deploy_cost`` table ('' before it)."""
    cost = _table(out_dir / "compare", "deploy_cost")
    if cost is None or cost.empty:
        return ""
    return " " + deploy_sentence(cost)


def embedded_png(path: Path) -> str:
    """A PNG as a ``data:`` URI: the page shows it wherever it is copied, alone or in a bundle."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def answer_section(out_dir: Path) -> str:
    """HTML for the top of ``index.html``: the answer in one sentence (and, when the external chapter ran, how each
    run fares on another clinic's images), Table 9 and the headline figure."""
    folder = out_dir / "compare"
    table = _table(folder, "comparison")
    if table is None:
        return "<p>The comparison chapter has not run yet: the answer appears here once it has.</p>"
    figure = folder / "figures" / "predictions.png"
    picture = (
        (
            f'<figure><img src="{embedded_png(figure) if figure.exists() else ""}" '
            'alt="the same test images predicted by every run">'
            "<figcaption>The same test images (from easy to hard for the first run), their ground truth, and each "
            "run's prediction.</figcaption></figure>"
        )
        if figure.exists()
        else ""
    )
    gaps = _external_gaps(out_dir)  # read once for the sentence and the table
    rows, _ = _external_rows(out_dir, gaps)
    elsewhere = (
        ""
        if rows is None
        else "<h3>On another clinic's images (chapter 3)</h3>"
        f'<p class="answer">{html.escape(_external_finding(out_dir, gaps))}</p>'
        + (rows.to_html(index=False, border=0, na_rep="", classes="external") if len(rows) else "")
    )
    return (
        f'<h2>The answer</h2><p class="answer">{html.escape(_compare_finding(out_dir))}</p>{elsewhere}'
        "<h3>Table 9 — test scores per run (validation-selected checkpoints; mean ± std over seeds)</h3>"
        + table.to_html(index=False, border=0, na_rep="", classes="table9")
        + picture
    )


def for_reading(table: pd.DataFrame, digits: int = 3):
    """``table`` as a chapter shows it: no index column, numbers rounded to ``digits`` decimals, blanks for missing
    values (the CSV under ``tables/`` keeps full precision)."""

    def shown(value):  # -0.0001 reads 0.000, not -0.000
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            return str(value)
        return f"{value:,}" if isinstance(value, (int, np.integer)) else plain(value, digits)

    styled = table.style.hide(axis="index").format(shown, na_rep="")
    p_values = [column for column in table.columns if "p-value" in str(column)]  # 1.6e-11 must not read 0.000
    return styled.format("{:.2g}", subset=p_values, na_rep="") if p_values else styled
