"""External validation: every run's selected checkpoints scored, never retrained, on data from another source (PH2,
another clinic's camera), at each image's original size, challenge-style, beside the run's ISIC test scores.

A profile lists its external sets (``external:``; see ``params.EXTERNAL_KEYS``). Each set is read by
``sources.find_external_pairs`` with a named layout (PH2's as distributed) or a glob and a mask rule, decoded at each
run's own image size (cached) and passed through the run's own colour constancy (``inference.predicted_probabilities``).
Test-time flips and post-processing are scored both ways for every run, on validation and on each set, so the
chapter shows what they buy whatever the run chose.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..base.files import save_table, shown_path, signed, write_text
from ..config.params import absolute
from ..data import decoding, transforms
from ..data.decoding import DecodedSplit, content_key, decode_pairs, read_image
from ..data.sources import EXTERNAL_LAYOUTS, PH2_URL, RELEASES, DataError, find_external_pairs
from ..data.synthetic import make_synthetic_external
from ..model import inference, networks
from ..model.inference import (
    load_trained,
    predicted_probabilities,
    probabilities_without_and_with_flips,
    zoomed_probabilities,
)
from ..scoring import confidence, metrics, shape
from ..training.experiments import SavedRun, data_root, load_run, prepare_data

# (test-time strategy, postprocess): every combination, scored for every run (the options study shows the single
# ones). "zoom" is coarse-to-fine (``inference.zoomed_probabilities``): the lesion's crop segmented again at the model's
# size, for the small lesions of the later releases; a measured option only, never a run's own.
TEST_TIME = ("none", "flips", "zoom")
INFERENCE_OPTIONS = tuple((tta, post) for post in ("none", "largest_component") for tta in TEST_TIME)
PLAIN = (("none", "none"),)  # no flips, no zoom, no post-processing: how a training option is compared
TEST_NAME = "ISIC test"
ON_SET = "on the set"  # the gap table's column for the external set's score (JA on the set, …)
# Each external set is split once, the same way for every run and every study, into two halves: the cases any choice
# may look at (the options study's choice, a threshold or a fine-tune chosen on a few labelled cases) and the cases
# only ever reported on, so that a gap or a gain is never measured on the cases it was chosen with.
CHOOSING, REPORTING = "choosing half", "reporting half"


def halves(ids: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """An external set's cases in two fixed halves: (the choosing half, the reporting half); sorted ids."""
    order = np.random.default_rng(seed).permutation(len(ids))
    half = len(ids) // 2
    return sorted(ids[i] for i in order[:half]), sorted(ids[i] for i in order[half:])


def half_name(set_name: str, half: str) -> str:
    return f"{set_name}, {half}"


@dataclass(frozen=True)
class ExternalSet:
    """One external set as the profile describes it, its folder resolved."""

    name: str
    root: Path
    images: str
    masks: str
    source: str = ""
    synthetic: int | None = None
    env: str | None = None  # the environment variable that may name the folder (how pages name it)

    @property
    def found(self) -> bool:
        return self.synthetic is not None or self.root.is_dir()

    def shown_as(self) -> str:
        """Where the set is, as a page may say it: relative to the project when inside it (a report handed to
        someone else names no folder of the author's machine), else only the folder's name."""
        return shown_path(self.root, self.env)

    def missing_note(self) -> str:
        where = f" Get it from {self.source} and unpack it there, or" if self.source else " Unpack it there, or"
        variable = f"${self.env}" if self.env else "the set's `dir` in the profile"
        missing = (
            f"{variable} names no folder ({shown_path(self.root)})"
            if self.env and os.environ.get(self.env)
            else f"no folder {shown_path(self.root)}"
        )
        return f"{self.name}: {missing}; the set is skipped.{where} point {variable} at it."


def external_sets(params: dict) -> list[ExternalSet]:
    """The profile's external sets (``params['external']``), folders resolved: ``$env`` when set, else ``dir``;
    a synthetic set lives in ``<the synthetic data folder>/other-clinic-<n>``."""
    sets = []
    for entry in params.get("external") or []:
        layout = EXTERNAL_LAYOUTS[entry.get("layout", "isic")]
        images, masks = entry.get("images", layout["images"]), entry.get("masks", layout["masks"])
        source = entry.get("source", PH2_URL if entry.get("layout") == "ph2" else "")
        if entry.get("synthetic"):  # inside the profile's own synthetic data folder: nothing written outside it
            root = data_root({**params, "data_source": "synthetic"}) / f"other-clinic-{entry['synthetic']}"
            sets.append(ExternalSet(entry["name"], root, images, masks, "", int(entry["synthetic"])))
            continue
        folder = os.environ.get(entry["env"]) if entry.get("env") else None
        root = absolute(folder or entry.get("dir") or f"data/{entry['name']}")
        sets.append(ExternalSet(entry["name"], root, images, masks, source, env=entry.get("env")))
    return sets


def load_external(
    external: ExternalSet,
    image_size: int,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    known: set[str] | frozenset = frozenset(),
) -> tuple[DecodedSplit | None, int]:
    """Find and decode (once, cached) an external set at ``image_size``, without the images whose ids are in
    ``known`` (the run's own data: an ISIC id of a later release may be an image the run trained or was tested on);
    returns (the set, or None when nothing is left; how many images were left out). ``DataError`` names what is
    wrong."""
    if external.synthetic is not None:
        make_synthetic_external(external.root, external.synthetic)
    if not external.root.is_dir():
        raise DataError(external.missing_note())
    found = find_external_pairs(external.root, external.images, external.masks)
    pairs = [p for p in found if p.id not in known]
    if not pairs:
        return None, len(found)
    return decode_pairs(pairs, image_size, cache_dir, progress), len(found) - len(pairs)


def _data_name(params: dict) -> str:
    source = params["data_source"]
    return f"the {RELEASES[source].name} data" if source in RELEASES else "the runs' own data"


def overlap_note(external: ExternalSet, left_out: int, left: int, data: str) -> str:
    """What chapter 3 says of a set that holds images of the runs' own data (``load_external``)."""
    if not left:
        return (
            f"{external.name}: all its {left_out} images are in {data} (trained, validated or tested on): "
            "the set is skipped."
        )
    return (
        f"{external.name}: {left_out} of its {left_out + left} images are in {data} (trained, validated or tested "
        f"on) and are left out; the set is scored on the other {left}."
    )


@dataclass
class Scored:
    """A run scored on one split for every (tta, postprocess): per seed and option, the per-image table."""

    run: str
    split: str
    own: tuple[str, str]  # the options the run itself uses
    tables: dict[tuple[int, str, str], pd.DataFrame]
    # per seed scored by this call, with the run's own test-time flips (for figures); a seed read back from a score
    # store (``score_split``'s ``store``) has none
    probabilities: dict[int, torch.Tensor]
    calibrations: dict[int, dict] = field(default_factory=dict)  # per seed, what its best.pt says (confidence)
    read_back: list[int] = field(default_factory=list)  # the seeds whose tables came from the score store

    @property
    def options(self) -> list[tuple[str, str]]:
        """The (tta, postprocess) combinations it was scored with, in ``INFERENCE_OPTIONS``' order."""
        return list(dict.fromkeys((tta, post) for _, tta, post in self.tables))

    @property
    def ids(self) -> list[str]:
        """The split's image ids, in its per-image tables' order."""
        return list(next(iter(self.tables.values()))["id"])

    def per_seed_ja(self, tta: str, post: str, ids: list[str] | None = None) -> dict[int, float]:
        """Each seed's mean per-image JA on ``ids`` (all when None), scored with (tta, post)."""
        return {
            seed: float((table if ids is None else table[table["id"].isin(ids)])["iou"].mean())
            for (seed, a, b), table in self.tables.items()
            if (a, b) == (tta, post)
        }

    def own_tables(self) -> dict[int, pd.DataFrame]:
        return {seed: table for (seed, tta, post), table in self.tables.items() if (tta, post) == self.own}

    def per_image_iou(self, tta: str, post: str) -> pd.Series:
        """Per-image JA (mean over seeds, indexed by id), scored with test-time strategy ``tta`` and ``post``."""
        chosen = [t.set_index("id")["iou"] for (seed, a, b), t in self.tables.items() if (a, b) == (tta, post)]
        return pd.concat(chosen, axis=1).mean(axis=1)


# What a stored score file holds; raise it when its format changes.
SCORES_VERSION = 1


@functools.cache
def scoring_code() -> bytes:
    """The digest of the code a score comes from (decoding, colour constancy, the model, inference, the metrics, the
    confidence, this module): a stored score computed by other code is never read back."""
    digest = hashlib.sha256()
    for module in (decoding, transforms, networks, inference, metrics, shape, confidence, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    return digest.digest()


def scores_key(checkpoint: Path, split: DecodedSplit, options: list[tuple[str, str]]) -> str:
    """What a checkpoint's scores on a split depend on: the checkpoint's bytes, the split's images (what their files
    hold, ``content_key``: not where they lie or when they were written, so a data folder copied or provisioned anew
    is read back; or the decoded tensors of a split made in memory), its ids, the options scored and the code that
    scores (``scoring_code``)."""
    digest = hashlib.sha256(json.dumps([SCORES_VERSION, options, split.ids, split.sizes]).encode())
    digest.update(scoring_code())
    with open(checkpoint, "rb") as f:
        digest.update(hashlib.file_digest(f, "sha256").digest())
    if split.sources:
        digest.update(f"{content_key(split.sources)}:{int(split.images.shape[-1])}".encode())
    else:
        digest.update(split.images.numpy().tobytes())
        digest.update(split.masks.numpy().tobytes())
    return digest.hexdigest()


def _stored_scores(path: Path, key: str) -> tuple[dict, dict[tuple[str, str], pd.DataFrame]] | None:
    """(calibration, {(tta, postprocess): per-image table}) stored at ``path`` under ``key``, or None (none there, or
    another checkpoint's, split's or version's: scoring again is always safe)."""
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") != key:
            return None
        tables = {
            tuple(option.split("|")): pd.DataFrame(**table).astype(stored["dtypes"])
            for option, table in stored["tables"].items()
        }
        return stored["calibration"], tables
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_scores(path: Path, key: str, calibration: dict, tables: dict[tuple[str, str], pd.DataFrame]) -> None:
    tables_json = {"|".join(option): table.to_dict(orient="split", index=False) for option, table in tables.items()}
    dtypes = {column: str(dtype) for column, dtype in next(iter(tables.values())).dtypes.items()}
    stored = {"key": key, "calibration": calibration, "dtypes": dtypes, "tables": tables_json}
    write_text(path, json.dumps(stored, default=float))  # one line: a base run's store is ~3 MB on 1,149 images


def score_split(
    run: SavedRun,
    split: DecodedSplit,
    name: str,
    options: tuple[tuple[str, str], ...] = INFERENCE_OPTIONS,
    store: Path | None = None,
) -> Scored:
    """Every seed's selected checkpoint (``best.pt``) on ``split`` at original size, with each of ``options``
    ((test-time strategy, post-processing); default every combination) and the run's own (the run's own colour
    constancy always: its model was trained on such images). Only what the options ask for runs: the flips' three
    extra passes, the zoom's crops and the post-processing cost nothing when ``PLAIN`` is asked for.

    With ``store`` (a folder), each seed's tables are kept there, one file per run, seed and split, keyed by
    ``scores_key``; a seed whose checkpoint, split and options are those of its stored tables is read back, not
    scored again (the options study, which compares runs trained over several calls)."""
    params = run.info["params"]
    tables, kept, calibrations, read_back = {}, {}, {}, []
    own = (params.get("tta", "none"), params.get("postprocess", "none"))
    wanted = [o for o in INFERENCE_OPTIONS if o in options or o == own]
    for seed in run.seeds["seed"].astype(int):
        checkpoint = run.run_dir / f"seed{seed}" / "best.pt"
        if store is not None:
            path = Path(store) / f"{run.name}_seed{seed}_{name}.json"
            key = scores_key(checkpoint, split, wanted)
            stored = _stored_scores(path, key)
            if stored is not None:
                calibrations[int(seed)] = stored[0]
                tables.update({(int(seed), *option): table for option, table in stored[1].items()})
                read_back.append(int(seed))
                continue
        model, meta = load_trained(checkpoint)
        calibrations[int(seed)] = meta.get("calibration") or {}
        if any(tta == "flips" for tta, _ in wanted):
            probabilities = probabilities_without_and_with_flips(model, meta, split.images)
        else:
            probabilities = {"none": predicted_probabilities(model, meta, split.images, tta="none")}
        probabilities["zoom"] = probabilities["none"]  # its coarse pass; the crop's pass runs at the original size
        trust = {tta: confidence.scores(probabilities[tta], calibrations[int(seed)]) for tta, _ in wanted}
        maps = [probabilities[tta] for tta, _ in wanted]

        def zoom(k: int, coarse: torch.Tensor, model=model, meta=meta) -> torch.Tensor:
            return zoomed_probabilities(model, meta, read_image(split.sources[k].image)[0], coarse)

        counts = metrics.original_size_counts(
            maps,
            split,
            postprocess=[post for _, post in wanted],
            refine=[zoom if tta == "zoom" else None for tta, _ in wanted],
        )
        for (tta, post), c in zip(wanted, counts):
            tables[(seed, tta, post)] = metrics.per_image_table(c, split.ids, split.sizes)
            tables[(seed, tta, post)]["confidence"] = trust[tta]
        kept[int(seed)] = probabilities[own[0]]
        if store is not None:
            _store_scores(path, key, calibrations[int(seed)], {o: tables[(seed, *o)] for o in wanted})
    return Scored(run.name, name, own, tables, kept, calibrations, read_back)


def _mean(tables: dict[int, pd.DataFrame], metric: str) -> float:
    """The mean over seeds of each seed's mean per-image score."""
    return float(pd.Series([t[metric].mean() for t in tables.values()]).mean())


SUMMARY_METRICS = {"iou": "JA", "dice": "Dice", "accuracy": "accuracy", "threshold_iou": "threshold JA"}


@dataclass
class ExternalResult:
    """What chapter 3 measured: the sets (found or not) and the notes on those skipped, every run's scores per split
    (``scored[(run, split)]``), the decoded splits (``splits[(split, image size)]``), the runs read, and the tables
    written: per run and set (``table``), the gap to the ISIC test set (``gap``), the inference options (``options``)
    and the confidence's flags (``confidence``)."""

    sets: list[ExternalSet]
    skipped: list[str]
    scored: dict[tuple[str, str], Scored]
    splits: dict[tuple[str, int], DecodedSplit]
    table: pd.DataFrame
    gap: pd.DataFrame
    options: pd.DataFrame
    runs: dict[str, SavedRun]
    confidence: pd.DataFrame
    overlaps: list[str] = field(default_factory=list)  # the sets that held images of the runs' own data, in words


def validate_external(
    params: dict,
    runs: list[str],
    out_dir: Path,
    progress: bool = False,
    echo=None,
    every_option: list[str] | None = None,
    store: Path | None = None,
) -> ExternalResult:
    """Score every run on validation and on each external set that is there; write the chapter's tables. ``echo``,
    when given, takes a line as each run starts on each split (a long study says where it is). ``every_option``:
    the runs scored with every inference option (default: all of them); the others are scored plainly and with their
    own options (``score_split``: what the options study compares a training option with). ``store``: a folder where
    each seed's scores are kept and read back while its checkpoint and the images are the same (``score_split``).

    Returns an ``ExternalResult``. Tables (under ``out_dir``):
    ``per_image_<set>_<run>_seed<k>`` (the run's own options, with each image's confidence), ``external`` (each
    run's scores on the ISIC test set, each set and each set's reporting half: ``halves``), ``gap`` (each of those
    minus the ISIC test set), ``inference_options``
    (validation and each set, every combination of test-time flips and post-processing), ``confidence`` (how each
    seed's confidence flags the set's failures at the threshold it chose on validation).
    """
    sets = external_sets(params)
    present = [s for s in sets if s.found]
    skipped = [s.missing_note() for s in sets if not s.found]
    overlaps: dict[str, str] = {}
    cache = absolute(params["output_dir"]).parent / "cache"
    saved = {name: load_run(params["output_dir"], name) for name in runs}
    splits: dict[tuple[str, int], DecodedSplit] = {}
    scored: dict[tuple[str, str], Scored] = {}
    rows, option_rows, trust_rows, gaps = [], [], [], []
    for name, run in saved.items():
        run_params = run.info["params"]
        size = int(run_params["image_size"])
        if ("validation", size) not in splits:
            data = prepare_data({**run_params, "output_dir": params["output_dir"]}, progress)
            splits[("validation", size)] = data.val
            known = {*data.train.ids, *data.val.ids, *data.test.ids}
        for external in list(present):
            if (external.name, size) not in splits:
                split, left_out = load_external(external, size, cache, progress, known)
                if left_out:
                    overlaps[external.name] = overlap_note(external, left_out, len(split or ()), _data_name(run_params))
                if split is None:
                    present.remove(external)
                    continue
                splits[(external.name, size)] = split
        test = {int(s): t for s, t in run.per_image.items()}
        rows.append(
            {
                "run": name,
                "data": TEST_NAME,
                "images": len(next(iter(test.values()))),
                "seeds": len(test),
                **{label: _mean(test, metric) for metric, label in SUMMARY_METRICS.items()},
            }
        )
        for split_name in ["validation"] + [s.name for s in present]:
            split = splits[(split_name, size)]
            every = every_option is None or name in every_option
            if echo is not None:
                echo(
                    f"scoring {name} on {split_name}: {len(split)} images × {len(run.seeds)} seeds at original size, "
                    + ("every inference option" if every else "plain")
                )
            result = score_split(run, split, split_name, INFERENCE_OPTIONS if every else PLAIN, store)
            scored[(name, split_name)] = result
            if echo is not None and result.read_back:
                echo(
                    f"{name} on {split_name}: seeds {result.read_back} read back from {shown_path(store)} (their "
                    "checkpoints and these images were scored before)"
                )
            plain = _mean(
                {s: t for (s, tta, post), t in result.tables.items() if (tta, post) == ("none", "none")}, "iou"
            )
            for tta, post in result.options:
                chosen = {s: t for (s, a, b), t in result.tables.items() if (a, b) == (tta, post)}
                option_rows.append(
                    {
                        "run": name,
                        "data": split_name,
                        "test-time flips": tta == "flips",
                        "zoom": tta == "zoom",
                        "largest component": post != "none",
                        "JA": _mean(chosen, "iou"),
                        "Δ JA": _mean(chosen, "iou") - plain,
                        "the run's own scoring": (tta, post) == result.own,
                    }
                )
            if split_name == "validation":
                continue
            own = result.own_tables()
            for seed, table in own.items():
                save_table(table, out_dir, f"per_image_{split_name}_{name}_seed{seed}")
                flag_below = result.calibrations[seed].get("flag_below")
                if flag_below is not None:
                    trust_rows.append(
                        {
                            "run": name,
                            "set": split_name,
                            "seed": seed,
                            **confidence.assessment(table["confidence"], table["iou"], flag_below),
                        }
                    )
            reporting = halves(result.ids)[1]
            for data_name, tables in (
                (split_name, own),
                (half_name(split_name, REPORTING), {s: t[t["id"].isin(reporting)] for s, t in own.items()}),
            ):
                rows.append(
                    {
                        "run": name,
                        "data": data_name,
                        "images": len(next(iter(tables.values()))),
                        "seeds": len(tables),
                        **{label: _mean(tables, metric) for metric, label in SUMMARY_METRICS.items()},
                    }
                )
                for seed, table in tables.items():  # each seed's gap, against the same seed's ISIC test score
                    if seed in test:
                        gaps.append(
                            {
                                "run": name,
                                "external set": data_name,
                                "seed": seed,
                                "JA gap": float(table["iou"].mean() - test[seed]["iou"].mean()),
                            }
                        )
    table = save_table(pd.DataFrame(rows), out_dir, "external")
    gap = save_table(gap_table(table, pd.DataFrame(gaps)), out_dir, "gap")
    options = save_table(pd.DataFrame(option_rows), out_dir, "inference_options")
    trust = save_table(pd.DataFrame(trust_rows), out_dir, "confidence")
    return ExternalResult(sets, skipped, scored, splits, table, gap, options, saved, trust, list(overlaps.values()))


def gap_table(table: pd.DataFrame, seed_gaps: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run and external set (or half): JA / Dice / accuracy on the ISIC test set, on the set, and the gap
    (set − test; negative: the run does worse on the other source); with ``seed_gaps`` (one JA gap per seed), the
    gap's std over seeds and whether it stands out of that spread (``metrics.seed_spread``)."""
    rows = []
    if table.empty:
        return pd.DataFrame(columns=GAP_COLUMNS)
    for run, group in table.groupby("run", sort=False):
        test = group[group["data"] == TEST_NAME].iloc[0]
        for _, other in group[group["data"] != TEST_NAME].iterrows():
            row = {"run": run, "external set": other["data"], "images": int(other["images"])}
            for label in ("JA", "Dice", "accuracy"):
                row[f"{label} ISIC test"] = test[label]
                row[f"{label} {ON_SET}"] = other[label]
                row[f"{label} gap"] = other[label] - test[label]
            if seed_gaps is not None and not seed_gaps.empty:
                chosen = seed_gaps[(seed_gaps["run"] == run) & (seed_gaps["external set"] == other["data"])]
                spread = metrics.seed_spread(chosen["JA gap"])
                row["seeds"] = spread["seeds"]
                row["JA gap std over seeds"] = spread["std"]
                row["JA gap against the seed spread"] = spread["verdict"]
            rows.append(row)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=GAP_COLUMNS)


def gap_spread(row) -> str:
    """A gap table row's spread over seeds in words (" ± 0.010 over 3 seeds, beyond the seed spread"), or its
    verdict alone for one seed; "" for a table from before seeds were compared."""
    if "seeds" not in row:
        return ""
    if row["seeds"] > 1:
        return (
            f" ± {row['JA gap std over seeds']:.3f} over {int(row['seeds'])} seeds, "
            f"{row['JA gap against the seed spread']}"
        )
    return f" ({row['JA gap against the seed spread']})"


GAP_COLUMNS = ["run", "external set", "images"]  # the header of a gap table with no external set scored


def external_reading(result: ExternalResult) -> str:
    """Sentences on what the external chapter found, from its tables."""
    gap, options = result.gap, result.options
    lines = [*result.skipped, *result.overlaps]
    if gap.empty:
        return " ".join(lines) or "No external set was scored."
    for _, row in gap.iterrows():
        name = row["external set"]
        lines.append(
            f"{row['run']}: JA {row['JA ISIC test']:.3f} on the ISIC test set, {row[f'JA {ON_SET}']:.3f} on "
            f"{name} ({row['images']} images): a gap of {signed(row['JA gap'])}{gap_spread(row)}."
        )
    if gap["external set"].str.endswith(REPORTING).any():
        lines.append(
            f"Each set's {REPORTING} is the half no choice looks at (the options study, a threshold or a "
            f"fine-tune choose on the {CHOOSING}): its gap is the one to quote for options chosen that way."
        )
    best = gap.loc[gap["JA gap"].idxmax()]
    lines.append(f"Smallest gap: {best['run']} on {best['external set']} ({signed(best['JA gap'])}).")
    for (data_name,), group in options[options["data"] != "validation"].groupby(["data"], sort=False):
        plain = ~group["test-time flips"] & ~group["zoom"]
        flips = group[group["test-time flips"] & ~group["largest component"]]["Δ JA"]
        post = group[plain & group["largest component"]]["Δ JA"]
        zoomed = group[group["zoom"] & ~group["largest component"]]["Δ JA"]
        lines.append(
            f"On {data_name}, test-time flips change JA by {signed(flips.min())} to {signed(flips.max())} across "
            f"runs, the largest-component post-processing by {signed(post.min())} to {signed(post.max())}"
            + f", coarse-to-fine zoom by {signed(zoomed.min())} to {signed(zoomed.max())}."
        )
    return " ".join(lines)


def worst_external(
    result: ExternalResult, run: str, split_name: str, k: int = 6
) -> tuple[DecodedSplit, torch.Tensor, pd.DataFrame]:
    """(the set at the run's size, the lowest seed's probabilities with the run's own options, its per-image
    table) for figures of the run on an external set."""
    saved = result.runs[run]
    size = int(saved.info["params"]["image_size"])
    split = result.splits[(split_name, size)]
    scored = result.scored[(run, split_name)]
    seed = min(scored.own_tables())
    return split, scored.probabilities[seed], scored.own_tables()[seed]


def area_frames(result: ExternalResult) -> dict[tuple[str, str], pd.DataFrame]:
    """Each run's per-image tables (lowest seed, its own options) on the ISIC test set and on each external set
    scored, keyed by (run, set): what the area-ratio table and figure read."""
    frames = {}
    for name, run in result.runs.items():
        seed = int(run.seeds["seed"].min())
        frames[(name, TEST_NAME)] = run.per_image[seed]
        for (scored_run, split), scored in result.scored.items():
            if scored_run == name and split != "validation":
                frames[(name, split)] = scored.own_tables()[seed]
    return frames
