"""What each generalisation option of task 3 buys, measured over training seeds before it becomes a default.

The study trains task 3 without any option (the *base*: flips, 90° turns, colour jitter, 128 px, no colour
constancy) and, beside it, the base plus each training option alone (``TRAINING_OPTIONS``; 384 px only when
asked: ``ON_REQUEST``), each with the same seeds (three unless ``--set seeds=…``), into
``outputs/<profile>/options/``; then scores every seed, never retrained, on validation and on each external set at
original size (``external.validate_external``): the base run with every inference option (test-time flips,
largest-component post-processing, coarse-to-fine zoom), each training option's run plainly, as it is compared.

Each external set is read in its two fixed halves (``external.halves``). An option is **chosen** on validation and
the sets' *choosing* halves only: its change against the base, seed for seed, stands out of the seed spread
(``metrics.seed_spread``) upwards on at least one of them and downwards on none. The *reporting* halves are never
looked at by the choice: the table shows there whether a chosen option still helps. ``options.csv`` has one row per
option measured in the study's folder with the study's parameters, whichever call trained it (``measured_before``);
the comparison chapter shows it; ``python -m isic_utils options --data PROFILE`` runs it. A seed finished earlier is
resumed, not retrained, and a checkpoint scored earlier on the same images is read back from ``options/scores/``
(``external.score_split``'s store), not scored again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..base.files import save_table, signed
from ..config import params as P
from ..data import augmentation
from ..scoring import metrics
from ..training.experiments import prepare_data, run_settings, train_run
from .external import CHOOSING, REPORTING, Scored, half_name, halves, validate_external
from .failures import AREA_BINS, AREA_LABELS, per_image_frame

BASE = {
    "color_constancy": "none",
    "tta": "none",
    "postprocess": "none",
    "image_size": 128,
    "lr_schedule": "constant",
    "weight_average": "none",
    "style_mixing": "none",
    "loss": "bce+dice",
    "augment": ["hflip", "vflip", "rot90", "color_jitter"],
}
TRAINING_OPTIONS = {  # name → what it changes on top of BASE
    "colour constancy": {"color_constancy": "shades_of_grey"},
    "crop + rotation": {"augment": BASE["augment"] + ["scale_rotate"]},
    "strong colour": {"augment": BASE["augment"] + ["color_strong"]},
    "zoom-out augmentation": {"augment": BASE["augment"] + ["zoom_out"]},
    "shrunk on skin": {"augment": BASE["augment"] + ["shrink_on_skin"]},
    "cosine learning rate": {"lr_schedule": "cosine"},
    "slower encoder": {"encoder_lr": 1e-4},  # a third of task 3's rate: the ImageNet features moved less
    "weight average": {"weight_average": "ema"},
    "style mixing": {"style_mixing": "mixstyle"},  # MixStyle in the encoder's early blocks (training.style_mixing)
    # the base's loss is BCE + soft Dice per image, which weighs a small lesion's image as much as a large one's: this
    # option measures what that buys against BCE alone (the report's loss for tasks 1 and 2), pooled over pixels
    "BCE alone": {"loss": "bce"},
    # the Lovász hinge per image in place of soft Dice: a surrogate of the score itself, 1 − JA of each image
    "Lovasz hinge": {"loss": "bce+lovasz"},
    # the three training options that gained most on the later releases' choosing half
    # without costing validation beyond the seed spread, taken together: whether their gains add up
    "weight average + zoom-out + Lovasz": {
        "weight_average": "ema",
        "augment": BASE["augment"] + ["zoom_out"],
        "loss": "bce+lovasz",
    },
    # the same without the Lovász hinge, which costs the confidence's ranking of masks (its validation ρ): what the
    # two augmentation and averaging options buy alone
    "weight average + zoom-out": {"weight_average": "ema", "augment": BASE["augment"] + ["zoom_out"]},
    "256 px": {"image_size": 256},
    "384 px": {"image_size": 384},
}
# Trained only when asked by name (``--only 384_px``): nine times the base's compute, hours a seed on a CPU without
# native bf16; for a GPU.
ON_REQUEST = {"384 px"}
BY_DEFAULT = [o for o in TRAINING_OPTIONS if o not in ON_REQUEST]  # what the study trains when no option is named
# Measured, never taken by default whatever the study says, and why: the report's design is 128 × 128 images, a run
# scores (and predict applies) whole images once, and every prediction's cost counts as well as its JA.
NEVER_DEFAULT = {
    "256 px": "the report's images are 128 × 128 (and it takes four times the compute)",
    "384 px": "the report's images are 128 × 128 (and it takes nine times the compute)",
    "zoom (coarse-to-fine)": "a run's own scoring and predict segment the whole image once",
    "test-time flips": "it runs the model four times for every image, so every prediction, export and page costs four "
    "times as much (the deployment section's latencies are for one pass)",
}
# Chosen by the rule but not taken by task 3, and why (said where the study chooses them, nothing where it does not).
NOT_TAKEN = {
    "weight average + zoom-out + Lovasz": "the Lovász hinge makes the confidence rank masks worse (the table's "
    "confidence ρ), and weight average + zoom-out, the same without it, is chosen too",
}
# The inference options the study shows, each alone on the base run, in chapter 3's form: (tta, postprocess).
INFERENCE_STUDIED = {
    "test-time flips": ("flips", "none"),
    "largest component": ("none", "largest_component"),
    "zoom (coarse-to-fine)": ("zoom", "none"),
}
FOLDER = "options"
SCORES = "scores"  # under FOLDER: each seed's scores, read back while its checkpoint and the images are the same


def run_name(option: str) -> str:
    return "base" if option == "base" else option.replace(" + ", "_").replace(" ", "_")


STUDY_SEEDS = (0, 1, 2)  # a choice is judged against the seed spread, which needs three seeds (metrics.MIN_SEEDS)


def study_params(
    profile: str,
    epochs: int | None = None,
    overrides: dict | None = None,
    root: Path | None = None,
    only: list[str] | None = None,
) -> tuple[dict, dict[str, dict]]:
    """(the external chapter's parameters for the study's folder, {option: its run's training parameters}); with
    ``only`` (option names or their run folders' names; "base" alone for none), the base and those options alone."""
    root = root or P.project_root()
    overrides = dict(overrides or {})
    P.check_overrides(overrides)
    train = P.resolve(
        "train",
        root / "params" / "task3.yaml",
        profile,
        {k: v for k, v in overrides.items() if k in P.schema("train")},
        root,
    )
    out = str(Path(train["output_dir"]) / FOLDER)
    known = {"base", *TRAINING_OPTIONS, *map(run_name, TRAINING_OPTIONS)}
    unknown = [o for o in only or [] if o not in known]
    if unknown:
        raise P.ParameterError(
            f"unknown option {unknown[0]!r} for --only: the training options are "
            + ", ".join(f"{run_name(o)} ({o})" for o in TRAINING_OPTIONS)
            + " (the inference options are always scored)."
        )
    named = BY_DEFAULT if only is None else [o for o in TRAINING_OPTIONS if o in only or run_name(o) in only]
    chosen = {o: TRAINING_OPTIONS[o] for o in named}
    runs = {}
    for option, change in {"base": {}, **chosen}.items():
        values = {**train, **BASE, **change, "run_name": run_name(option), "output_dir": out}
        if "seeds" not in overrides:
            values["seeds"] = list(STUDY_SEEDS)
        if epochs is not None:
            values["epochs"] = epochs
        problems = P.check("train", values, root)
        if problems:
            raise P.ParameterError("\n".join(problems))
        runs[option] = values
    scoring = P.resolve(
        "external",
        root / "params" / "external.yaml",
        profile,
        {k: v for k, v in overrides.items() if k in P.schema("external")},
        root,
    )
    scoring.update(output_dir=out, runs=[run_name(o) for o in runs])
    return scoring, runs


def options_study(
    profile: str,
    epochs: int | None = None,
    overrides: dict | None = None,
    root: Path | None = None,
    echo=print,
    only: list[str] | None = None,
) -> pd.DataFrame:
    """Train (or resume) the base and each option's run (``only``: those named), every seed, score them, write and
    return ``options.csv``."""
    scoring, runs = study_params(profile, epochs, overrides, root, only)
    for option, values in runs.items():
        echo(f"options: {option} ({values['run_name']}, {values['epochs']} epochs, seeds {values['seeds']})")
        train_run(values, prepare_data(values), verbose=True)
    out = P.absolute(scoring["output_dir"])
    runs = {**runs, **measured_before(profile, epochs, overrides, root, runs, echo)}
    runs = {option: runs[option] for option in ["base", *TRAINING_OPTIONS] if option in runs}
    # the inference options are read on the base run alone; a training option's run is compared plainly
    result = validate_external(
        scoring,
        [values["run_name"] for values in runs.values()],
        out,
        echo=lambda line: echo(f"options: {line}"),
        every_option=[run_name("base")],
        store=out / SCORES,
    )
    names = {run_name(o): o for o in runs}
    table = options_table(result.scored, names, runs["base"]["epochs"])
    save_table(table, out, "options")
    save_table(options_by_area(result.scored, names), out, "options_by_area")
    echo(f"options: wrote {out / 'tables' / 'options.csv'}")
    return table


def measured_before(
    profile: str,
    epochs: int | None,
    overrides: dict | None,
    root: Path | None,
    trained: dict[str, dict],
    echo=print,
) -> dict[str, dict]:
    """{option: its run's parameters} for each option not trained by this call whose run in the study's folder is
    finished, every seed, with the parameters the study gives it now and the base's encoder weights: the table holds
    every option measured on the same footing, over however many calls (``--only`` one option at a time on a CPU).
    A run in the folder that is unfinished or was trained otherwise is left out, and the line says how to finish it."""
    _, every = study_params(profile, epochs, overrides, root, list(TRAINING_OPTIONS))
    base = _saved_record(every["base"])
    found = {}
    for option, values in every.items():
        if option in trained:
            continue
        record = _saved_record(values)
        if record is None:
            continue
        missing = [s for s in values["seeds"] if s not in record["seeds"]]
        constants = augmentation.constants(values["augment"])
        weights = {w.get("sha256") for w in record["encoder_weights"].values()}
        if missing:
            why = f"seeds {missing} of {values['seeds']} are not finished"
        elif differences := _differences(record["params"], values):
            why = f"it was trained with other parameters than the study's now ({differences})"
        elif record.get("augmentation_constants", constants) != constants:
            why = (
                f"it was trained with other augmentation constants than data/augmentation.py's now "
                f"({record['augmentation_constants']}, now {constants})"
            )
        elif base is None or weights != {w.get("sha256") for w in base["encoder_weights"].values()}:
            why = "its encoder started from other weights than the base's"
        else:
            found[option] = values
            continue
        echo(
            f"options: {option} ({values['run_name']}) is in the study's folder but left out of the table: {why}; "
            f"--only {values['run_name']} trains it as the study does"
        )
    return found


def _differences(saved: dict, values: dict) -> str:
    """ "epochs 1, the study's 2; …": where a saved run's ``run_settings`` differ from those of ``values`` ("" when
    the run is the one the study would train)."""
    saved, values = run_settings(saved), run_settings(values)
    keys = [k for k in dict.fromkeys([*values, *saved]) if saved.get(k) != values.get(k)]
    return "; ".join(
        f"{k} {saved.get(k, P.ADDED_SETTINGS.get(k))}, the study's {values.get(k, P.ADDED_SETTINGS.get(k))}"
        for k in keys
    )


def _saved_record(values: dict) -> dict | None:
    """A study run's ``run.json`` (None when it has none or it is unreadable)."""
    path = P.absolute(values["output_dir"]) / values["run_name"] / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def study_splits(scored: dict[tuple[str, str], Scored]) -> dict[str, tuple[str, list[str] | None]]:
    """{column label: (the scored split it is read from, the ids it keeps or None for all)}: validation, then each
    external set's choosing and reporting halves."""
    splits: dict[str, tuple[str, list[str] | None]] = {"validation": ("validation", None)}
    for (_, split), result in scored.items():
        if split == "validation" or half_name(split, CHOOSING) in splits:
            continue
        choosing, reporting = halves(result.ids)
        splits[half_name(split, CHOOSING)] = (split, choosing)
        splits[half_name(split, REPORTING)] = (split, reporting)
    return splits


def options_table(scored: dict[tuple[str, str], Scored], names: dict[str, str], epochs: int) -> pd.DataFrame:
    """One row per option: on each split (``study_splits``) the mean per-image JA over seeds, its change against the
    base seed for seed (seed k of the option against seed k of the base: mean, std over seeds, and whether it
    stands out of that spread), and whether the choosing splits choose it (``chosen``). Training options are plain
    scoring (no flips, no post-processing); an inference option is the base run scored with it."""
    splits = study_splits(scored)
    entries = _entries(names)
    base_run = entries[0][2]
    bases = {
        label: scored[(base_run, split)].per_seed_ja("none", "none", ids) for label, (split, ids) in splits.items()
    }
    rows = []
    for option, kind, run, (tta, post) in entries:
        row = {"option": option, "kind": kind, "epochs": epochs}
        for label, (split, ids) in splits.items():
            mine, base = scored[(run, split)].per_seed_ja(tta, post, ids), bases[label]
            spread = metrics.seed_spread([mine[s] - base[s] for s in sorted(mine) if s in base])
            row["seeds"] = len(mine)
            row[f"JA {label}"] = float(np.mean(list(mine.values())))
            row[f"JA std {label}"] = float(np.std(list(mine.values()), ddof=1)) if len(mine) > 1 else float("nan")
            row[f"Δ {label}"] = spread["mean"]
            row[f"Δ std {label}"] = spread["std"]
            row[f"Δ {label} against the seed spread"] = spread["verdict"] if option != "base" else ""
        row[CONFIDENCE_RHO] = confidence_rho(scored[(run, "validation")], tta, post)
        choosing = [label for label in splits if not label.endswith(REPORTING)]
        row["chosen"] = _choice(row, choosing) if option != "base" else ""
        rows.append(row)
    return pd.DataFrame(rows)


# not part of the choice, which is JA's: an option may rank masks worse for the confidence the report's flags rely on
CONFIDENCE_RHO = "confidence ρ validation"


def confidence_rho(result: Scored, tta: str, post: str) -> float:
    """How well the confidence ranks a run's masks: the Spearman correlation between each image's confidence and its
    JA on ``result``'s split, scored with (tta, post), averaged over seeds (NaN where a seed's tables have none)."""
    values = [
        table["confidence"].corr(table["iou"], method="spearman") if "confidence" in table else float("nan")
        for (_, a, b), table in result.tables.items()
        if (a, b) == (tta, post)
    ]
    return float(np.mean(values)) if values else float("nan")


def _entries(names: dict[str, str]) -> list[tuple[str, str, str, tuple[str, str]]]:
    """(option, kind, the run it is scored on, (tta, postprocess)) for the base, each training option's run and each
    inference option (on the base run); the base first."""
    base_run = next(run for run, option in names.items() if option == "base")
    entries = [(option, "training", run, ("none", "none")) for run, option in names.items() if run != base_run]
    entries += [(option, "inference", base_run, chosen) for option, chosen in INFERENCE_STUDIED.items()]
    return [("base", "base", base_run, ("none", "none")), *entries]


def options_by_area(scored: dict[tuple[str, str], Scored], names: dict[str, str]) -> pd.DataFrame:
    """What each option buys by the lesion's share of the image (``failures.AREA_BINS``), on each external set's
    reporting half (never looked at by the choice): one row per (option, set, bin) with the images in the bin, the
    base's mean JA there and the option's change against it, seed for seed (mean, std, against the seed spread)."""
    entries = _entries(names)
    base_run = entries[0][2]
    rows = []
    for label, (split, ids) in study_splits(scored).items():
        if not label.endswith(REPORTING):
            continue
        first = next(iter(scored[(base_run, split)].tables.values()))
        frame = per_image_frame(first[first["id"].isin(ids)])
        bins = pd.cut(frame["lesion_area"], AREA_BINS, labels=AREA_LABELS, include_lowest=True)
        for area in AREA_LABELS:
            chosen = list(frame["id"][bins == area])
            if not chosen:
                continue
            base = scored[(base_run, split)].per_seed_ja("none", "none", chosen)
            for option, _, run, (tta, post) in entries[1:]:
                mine = scored[(run, split)].per_seed_ja(tta, post, chosen)
                spread = metrics.seed_spread([mine[s] - base[s] for s in sorted(mine) if s in base])
                rows.append(
                    {
                        "option": option,
                        "data": label,
                        "lesion area": area,
                        "images": len(chosen),
                        "JA base": float(np.mean(list(base.values()))),
                        "Δ": spread["mean"],
                        "Δ std": spread["std"],
                        "against the seed spread": spread["verdict"],
                    }
                )
    return pd.DataFrame(rows)


def options_by_area_view(table: pd.DataFrame) -> pd.DataFrame:
    """``options_by_area`` as a page shows it: a row per set and option (the base's JA first), a column per
    lesion-area bin reading "Δ ± std (beyond / within)", the images per bin in the base's row."""
    rows = []
    for data, rows_of_set in table.groupby("data", sort=False):
        first = rows_of_set.drop_duplicates("lesion area")
        rows.append(
            {
                "data": data,
                "option": "base: JA (images)",
                **{r["lesion area"]: f"{r['JA base']:.3f} ({r['images']})" for _, r in first.iterrows()},
            }
        )
        for option, of_option in rows_of_set.groupby("option", sort=False):
            rows.append(
                {
                    "data": data,
                    "option": option,
                    **{
                        r["lesion area"]: _delta_text(r["Δ"], r["Δ std"], r["against the seed spread"])
                        for _, r in of_option.iterrows()
                    },
                }
            )
    return pd.DataFrame(rows).reindex(columns=["data", "option", *AREA_LABELS]).astype(object).fillna("")


def _choice(row: dict, choosing: list[str]) -> str:
    """The study's rule on the choosing splits: "yes" when the option's change is beyond the seed spread upwards on
    at least one and downwards on none, "no" otherwise, or what the seeds are missing for a verdict."""
    verdicts = [row[f"Δ {label} against the seed spread"] for label in choosing]
    if any(not v.endswith("seed spread") for v in verdicts):
        return next(v for v in verdicts if not v.endswith("seed spread"))
    changes = [(row[f"Δ {label}"], v) for label, v in zip(choosing, verdicts)]
    up = any(_beyond(d, v, 1) for d, v in changes)
    return "yes" if up and not any(_beyond(d, v, -1) for d, v in changes) else "no"


def _beyond(change: float, verdict: str, sign: int) -> bool:
    """Whether a change stands out of the seed spread (``metrics.seed_spread``'s verdict) in the direction ``sign``."""
    return str(verdict).startswith("beyond") and change * sign > 0


def saved_options(output_dir: str | Path) -> pd.DataFrame | None:
    """The study's table for the profile whose outputs are in ``output_dir``, or None when it has not run."""
    path = P.absolute(output_dir) / FOLDER / "tables" / "options.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path)
    return table if "chosen" in table else None  # a one-seed table of an earlier version: the study must rerun


def saved_options_by_area(output_dir: str | Path) -> pd.DataFrame | None:
    """The study's by-lesion-area table (``options_by_area``) for the profile, or None when it has not been written."""
    path = P.absolute(output_dir) / FOLDER / "tables" / "options_by_area.csv"
    return pd.read_csv(path) if path.exists() else None


def options_by_area_reading(table: pd.DataFrame) -> str:
    """Per set, which option changed the smallest lesions' JA most and what it did to the largest; "most from" only
    when that change stands out of the seed spread upwards, else that no option did (and the largest change)."""
    lines = []
    for data, of_set in table.groupby("data", sort=False):
        bins = [b for b in AREA_LABELS if b in set(of_set["lesion area"])]
        smallest, largest = of_set[of_set["lesion area"] == bins[0]], of_set[of_set["lesion area"] == bins[-1]]
        best = smallest.loc[smallest["Δ"].idxmax()]
        change = _delta_text(best["Δ"], best["Δ std"], best["against the seed spread"])
        raised = _beyond(best["Δ"], best["against the seed spread"], 1)
        line = (
            f"On {data}, lesions of {bins[0]} of the image ({best['images']} images, base JA {best['JA base']:.3f}): "
            + (
                f"most from {best['option']}, {change}"
                if raised
                else f"no option raises JA beyond the seed spread (the largest change: {best['option']}, {change})"
            )
        )
        if len(bins) > 1:
            other = largest[largest["option"] == best["option"]].iloc[0]
            line += (
                f"; on {bins[-1]} ({other['images']} images) it changes JA by "
                f"{_delta_text(other['Δ'], other['Δ std'], other['against the seed spread'])}"
            )
        lines.append(line + ".")
    return " ".join(lines)


def _part_of(option: str, combined: str) -> bool:
    """Whether training option ``option``'s change is contained in ``combined``'s (a combination of options)."""
    if option == combined or option not in TRAINING_OPTIONS or combined not in TRAINING_OPTIONS:
        return False
    return _takes(TRAINING_OPTIONS[combined], TRAINING_OPTIONS[option])


def _takes(values: dict, change: dict) -> bool:
    """Whether ``values`` (a run's parameters, or another option's change) hold ``change``: each of its settings, a
    list's items among the list's."""
    return all(
        (set(v) <= set(values.get(k) or []) if isinstance(v, list) else values.get(k) == v) for k, v in change.items()
    )


def options_view(table: pd.DataFrame) -> pd.DataFrame:
    """The options table as a reader takes it in: per split "JA ± std" and "Δ ± std (beyond / within)"."""
    splits = [c[len("JA std ") :] for c in table.columns if c.startswith("JA std ")]
    view = table[["option", "kind", "epochs", "seeds"]].copy()
    for split in splits:
        view[f"JA {split}"] = [
            f"{m:.3f} ± {s:.3f}" if s == s else f"{m:.3f}"
            for m, s in zip(table[f"JA {split}"], table[f"JA std {split}"])
        ]
        view[f"Δ {split}"] = ["" if row["kind"] == "base" else _change(row, split) for _, row in table.iterrows()]
    if CONFIDENCE_RHO in table:  # tables from before it was measured have none
        view[CONFIDENCE_RHO] = [f"{rho:.2f}" if rho == rho else "" for rho in table[CONFIDENCE_RHO]]
    said = {  # a chosen option task 3 does not take: the reading says why
        **dict.fromkeys(NEVER_DEFAULT, "yes, never a default (the reading says why)"),
        **dict.fromkeys(NOT_TAKEN, "yes, not taken (the reading says why)"),
    }
    view["chosen"] = [
        said.get(option, chosen) if chosen == "yes" else chosen
        for option, chosen in zip(table["option"], table["chosen"].fillna(""))
    ]
    return view


def _change(row, split: str) -> str:
    return _delta_text(row[f"Δ {split}"], row[f"Δ std {split}"], row[f"Δ {split} against the seed spread"])


def _delta_text(mean: float, std: float, verdict: str) -> str:
    """ "+0.012 ± 0.004 (beyond)": a change, its std over seeds, and its verdict against that spread."""
    word = verdict.split()[0] if verdict.endswith("seed spread") else "?"
    spread = f" ± {std:.3f}" if std == std else ""
    return f"{signed(mean)}{spread} ({word})"


def options_reading(table: pd.DataFrame, uses: list[str] | None = None) -> str:
    """Sentences on what the options table shows: how it was measured, which options the choosing splits choose,
    whether those still help on the reporting halves, and (with ``uses``, the options task 3's parameters take)
    whether task 3's defaults agree with the choice."""
    splits = [c[len("JA std ") :] for c in table.columns if c.startswith("JA std ")]
    choosing = [s for s in splits if not s.endswith(REPORTING)]
    reporting = [s for s in splits if s.endswith(REPORTING)]
    base = table.iloc[0]
    seeds = int(base["seeds"])
    plural = "s" if seeds > 1 else ""
    lines = [
        f"Measured with {int(base['epochs'])} epochs per run and {seeds} seed{plural} per option; each "
        "change is seed for seed against the base, judged against its spread over seeds (beyond: the mean more "
        "than twice the std from 0). Chosen on "
        + " and ".join(choosing)
        + "; reported on "
        + (" and ".join(reporting) or "no external set")
        + ", which no choice looked at. Base: "
        + ", ".join(f"JA {base[f'JA {s}']:.3f} on {s}" for s in splits)
        + "."
    ]
    options = table.iloc[1:]
    if (options["chosen"].isin(["yes", "no"])).all():
        chosen = options[options["chosen"] == "yes"]
        lines.append("Chosen: " + (", ".join(chosen["option"]) if len(chosen) else "none") + ".")
        for _, row in chosen.iterrows():
            for split in reporting:
                lines.append(f"{row['option']} on {split}: {_change(row, split)}.")
        for option in (o for o in chosen["option"] if o in NEVER_DEFAULT):
            lines.append(f"{option} stays a measured option, never a default: {NEVER_DEFAULT[option]}.")
        for option in (o for o in chosen["option"] if o in NOT_TAKEN):
            lines.append(f"{option} is chosen but not taken: {NOT_TAKEN[option]}.")
        if uses is not None:
            picked = [o for o in chosen["option"] if o not in NEVER_DEFAULT and o not in NOT_TAKEN]
            # an option task 3 takes only as part of a chosen combination (zoom-out within weight average + zoom-out)
            parts = {o for o in uses if o not in picked and any(_part_of(o, c) for c in picked)}
            if set(picked) == set(uses) - set(NEVER_DEFAULT) - parts:
                lines.append(
                    "Task 3's parameters take exactly the chosen options"
                    + (" (" + ", ".join(picked) + ")." if picked else ": none.")
                )
            else:
                lines.append(
                    "Task 3's parameters take "
                    + (", ".join(uses) or "none of them")
                    + ": not the study's choice ("
                    + (", ".join(picked) or "none")
                    + ")."
                )
    else:
        lines.append(f"No option is chosen: {options['chosen'].iloc[0]}.")
    return " ".join(lines)


def task_uses(params: dict) -> list[str]:
    """The study's options that a run's parameters take (e.g. task 3's defaults)."""
    uses = [option for option, change in TRAINING_OPTIONS.items() if _takes(params, change)]
    return uses + [
        option
        for option, (tta, post) in INFERENCE_STUDIED.items()
        if (tta == "none" or params.get("tta") == tta) and (post == "none" or params.get("postprocess") == post)
    ]
