"""What each generalisation option of task 3 buys, measured before it becomes a default.

The study trains task 3 without any option (the *base*: flips, 90° turns, colour jitter, 128 px, no colour
constancy) and, beside it, the base plus each training option alone (colour constancy, crop and rotation
augmentation, stronger colour augmentation, 256 px), into ``outputs/<profile>/options/``; then scores every one,
never retrained, on validation and on each external set at original size (``external.validate_external``), where
the inference options (test-time flips, largest-component post-processing) are scored on every run as well.
``options.csv`` has one row per option: validation JA and each external set's JA, and the change against the base.
The comparison chapter shows it; ``python -m isic_utils options --data PROFILE`` runs it. A run finished earlier
is resumed, not retrained.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import params as P
from .experiments import prepare_data, train_run
from .external import validate_external
from .files import save_table

BASE = {"color_constancy": "none", "tta": "none", "postprocess": "none", "image_size": 128,
        "augment": ["hflip", "vflip", "rot90", "color_jitter"]}
TRAINING_OPTIONS = {  # name → what it changes on top of BASE
    "colour constancy": {"color_constancy": "shades_of_grey"},
    "crop + rotation": {"augment": BASE["augment"] + ["scale_rotate"]},
    "strong colour": {"augment": BASE["augment"] + ["color_strong"]},
    "256 px": {"image_size": 256},
}
# The inference options the study shows, each alone on the base run, in chapter 3's form: (tta, postprocess).
INFERENCE_STUDIED = {"test-time flips": ("flips", "none"), "largest component": ("none", "largest_component")}
FOLDER = "options"


def run_name(option: str) -> str:
    return "base" if option == "base" else option.replace(" + ", "_").replace(" ", "_")


def study_params(profile: str, epochs: int | None = None, overrides: dict | None = None,
                 root: Path | None = None) -> tuple[dict, dict[str, dict]]:
    """(the external chapter's parameters for the study's folder, {option: its run's training parameters})."""
    root = root or P.project_root()
    overrides = dict(overrides or {})
    P.check_overrides(overrides)
    train = P.resolve("train", root / "params" / "task3.yaml", profile,
                      {k: v for k, v in overrides.items() if k in P.schema("train")}, root)
    out = str(Path(train["output_dir"]) / FOLDER)
    runs = {}
    for option, change in {"base": {}, **TRAINING_OPTIONS}.items():
        values = {**train, **BASE, **change, "run_name": run_name(option), "output_dir": out}
        if epochs is not None:
            values["epochs"] = epochs
        problems = P.check("train", values, root)
        if problems:
            raise P.ParameterError("\n".join(problems))
        runs[option] = values
    scoring = P.resolve("external", root / "params" / "external.yaml", profile,
                        {k: v for k, v in overrides.items() if k in P.schema("external")}, root)
    scoring.update(output_dir=out, runs=[run_name(o) for o in runs])
    return scoring, runs


def options_study(profile: str, epochs: int | None = None, overrides: dict | None = None, root: Path | None = None,
                  echo=print) -> pd.DataFrame:
    """Train (or resume) the base and each option's run, score them, write and return ``options.csv``."""
    scoring, runs = study_params(profile, epochs, overrides, root)
    for option, values in runs.items():
        echo(f"options: {option} ({values['run_name']}, {values['epochs']} epochs)")
        train_run(values, prepare_data(values), verbose=True)
    out = P.absolute(scoring["output_dir"])
    result = validate_external(scoring, scoring["runs"], out)
    table = options_table(result["options"], {run_name(o): o for o in runs}, runs["base"]["epochs"], result["scored"])
    save_table(table, out, "options")
    echo(f"options: wrote {out / 'tables' / 'options.csv'}")
    return table


def options_table(scores: pd.DataFrame, names: dict[str, str], epochs: int, scored: dict | None = None) -> pd.DataFrame:
    """One row per option: JA on validation and on each external set (plain scoring: no flips, no
    post-processing, except for the inference options, which are the base run scored with them), Δ vs base, and
    (with ``scored``, the per-image tables) the standard error of Δ from the paired per-image differences on the
    same images, so that a change can be told from noise."""
    plain = scores[~scores["test-time flips"] & ~scores["largest component"]]
    splits = list(dict.fromkeys(scores["data"]))
    rows = []
    for run, option in names.items():
        got = plain[plain["run"] == run].set_index("data")["JA"]
        rows.append({"option": option, "kind": "base" if option == "base" else "training", "epochs": epochs,
                     **{f"JA {s}": got.get(s) for s in splits}})
    base_run = next(run for run, option in names.items() if option == "base")
    for option, (tta, post) in INFERENCE_STUDIED.items():
        chosen = scores[(scores["run"] == base_run) & (scores["test-time flips"] == (tta != "none"))
                        & (scores["largest component"] == (post != "none"))].set_index("data")["JA"]
        rows.append({"option": option, "kind": "inference", "epochs": epochs,
                     **{f"JA {s}": chosen.get(s) for s in splits}})
    table = pd.DataFrame(rows)
    base = table.iloc[0]
    for split in splits:
        table[f"Δ {split}"] = table[f"JA {split}"] - base[f"JA {split}"]
    if scored:
        for split in splits:
            reference = scored[(base_run, split)].per_image_iou(False, False)
            errors = []
            for run, option in [*names.items(), *((base_run, o) for o in INFERENCE_STUDIED)]:
                tta, post = INFERENCE_STUDIED.get(option, ("none", "none"))
                difference = scored[(run, split)].per_image_iou(tta != "none", post != "none") - reference
                errors.append(float(difference.std(ddof=1) / len(difference) ** 0.5) if option != "base" else 0.0)
            table[f"SE Δ {split}"] = errors
    return table


def saved_options(output_dir: str | Path) -> pd.DataFrame | None:
    """The study's table for the profile whose outputs are in ``output_dir``, or None when it has not run."""
    path = P.absolute(output_dir) / FOLDER / "tables" / "options.csv"
    return pd.read_csv(path) if path.exists() else None


def options_reading(table: pd.DataFrame) -> str:
    """Sentences on what the options table shows: for each option, the change on validation and on each external
    set, and which options helped on both."""
    deltas = [c for c in table.columns if c.startswith("Δ ")]
    splits = [c[2:] for c in deltas]
    noise = all(f"SE Δ {s}" in table for s in splits)
    base = table.iloc[0]
    lines = [f"Measured with {int(base['epochs'])} epochs per run, one seed. Base: "
             + ", ".join(f"JA {base[f'JA {s}']:.3f} on {s}" for s in splits) + "."]
    helped, clearly = [], []
    for _, row in table.iloc[1:].iterrows():
        changes = ", ".join(f"{row[f'Δ {s}']:+.3f}" + (f" ± {row[f'SE Δ {s}']:.3f}" if noise else "") + f" on {s}"
                            for s in splits)
        lines.append(f"{row['option']}: {changes}.")
        if all(row[f"Δ {s}"] > 0 for s in splits):
            helped.append(row["option"])
        if noise and all(row[f"Δ {s}"] > 2 * row[f"SE Δ {s}"] for s in splits):
            clearly.append(row["option"])
    lines.append("Better on every split: " + (", ".join(helped) if helped else "none") + ".")
    if noise:
        for split in splits:
            above = [row["option"] for _, row in table.iloc[1:].iterrows()
                     if row[f"Δ {split}"] > 2 * row[f"SE Δ {split}"]]
            lines.append(f"Better by more than two standard errors on {split}: "
                         + (", ".join(above) if above else "none") + ".")
        lines.append("Better by more than two standard errors (paired, per image) on every split: "
                     + (", ".join(clearly) if clearly else "none") + ". A change within two standard errors is "
                     "not told apart from noise by these images, and another seed's spread comes on top.")
    return " ".join(lines)
