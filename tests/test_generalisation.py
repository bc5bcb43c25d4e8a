"""The options study's table and its choice, on per-image tables made up so that the answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from isic_utils.evaluation import generalisation as G
from isic_utils.evaluation.external import CHOOSING, INFERENCE_OPTIONS, REPORTING, Scored, half_name, halves

IDS = [f"IMD{i:03d}" for i in range(20)]
CHOOSE, REPORT = halves(IDS)
SMALL = IDS[::2]  # lesions of 2% of the image; the others fill 60%


def scored(run: str, split: str, seeds, shift) -> Scored:
    """Per-image JA 0.7 (+ noise per seed) + ``shift(seed, id)``, the same for every inference option except that
    flips add 0.01 everywhere."""
    ids = IDS if split != "validation" else [f"V{i}" for i in range(10)]
    tables = {}
    for seed in seeds:
        noise = np.random.default_rng(100 + seed).normal(0, 0.02, len(ids))  # the same draw for every run: paired
        for tta, post in INFERENCE_OPTIONS:
            iou = 0.7 + noise + np.array([shift(seed, i, split) for i in ids]) + (0.01 if tta == "flips" else 0)
            lesion = np.array([20 if i in SMALL else 600 for i in ids])  # pixels of 1,000: 2% or 60% of the image
            tables[(seed, tta, post)] = pd.DataFrame(
                {"id": ids, "iou": iou, "tp": lesion, "fn": 0, "fp": 0, "tn": 1000 - lesion}
            )
    return Scored(run, split, ("none", "none"), tables, {})


def study(shifts: dict, seeds=(0, 1, 2)) -> pd.DataFrame:
    runs = {"base": lambda seed, i, split: 0.0, **shifts}
    result = {
        (run, split): scored(run, split, seeds, shift) for run, shift in runs.items() for split in ("validation", "PH2")
    }
    return G.options_table(result, {run: run for run in runs}, epochs=5)


def test_the_halves_are_fixed_disjoint_and_cover_the_set():
    assert halves(IDS) == (CHOOSE, REPORT)  # fixed: the same halves every time it is asked
    assert not set(CHOOSE) & set(REPORT) and sorted(CHOOSE + REPORT) == IDS and len(CHOOSE) == 10
    assert halves(IDS, seed=1) != (CHOOSE, REPORT)


def test_an_option_is_chosen_on_the_choosing_half_and_reported_on_the_other():
    table = study(
        {
            # helps everywhere on PH2, by a steady +0.05 whatever the seed: chosen, and it holds on the reporting half
            "helps": lambda seed, i, split: 0.05 if split == "PH2" else 0.0,
            # helps only the reporting half's cases: the choice never sees it
            "only reporting": lambda seed, i, split: 0.05 if i in REPORT and split == "PH2" else 0.0,
            # helps PH2 but costs validation beyond the seed spread: not chosen
            "costs validation": lambda seed, i, split: 0.05 if split == "PH2" else -0.03,
            # +0.05 on one seed, −0.05 on another: within the spread
            "noisy": lambda seed, i, split: [0.05, -0.05, 0.01][seed] if split == "PH2" else 0.0,
        }
    ).set_index("option")
    choose, report = half_name("PH2", CHOOSING), half_name("PH2", REPORTING)
    assert list(table.index) == ["base", "helps", "only reporting", "costs validation", "noisy", *G.INFERENCE_STUDIED]
    assert table.loc["helps", "chosen"] == "yes"
    assert abs(table.loc["helps", f"Δ {report}"] - 0.05) < 1e-9
    assert table.loc["helps", f"Δ {report} against the seed spread"] == "beyond the seed spread"
    assert table.loc["only reporting", "chosen"] == "no"
    assert table.loc["only reporting", f"Δ {report} against the seed spread"] == "beyond the seed spread"
    assert table.loc["costs validation", "chosen"] == "no"
    assert table.loc["noisy", f"Δ {choose} against the seed spread"] == "within the seed spread"
    assert table.loc["noisy", "chosen"] == "no"
    # test-time flips add 0.01 to every image of the base run: chosen; the base itself is no choice
    assert table.loc["test-time flips", "chosen"] == "yes" and table.loc["largest component", "chosen"] == "no"
    assert (
        table.loc["base", "chosen"] == "" and (table.loc["base", [f"Δ {s}" for s in ("validation", choose)]] == 0).all()
    )
    assert (table["seeds"] == 3).all()
    reading = G.options_reading(table.reset_index(), ["colour constancy"])
    assert "Chosen: helps, test-time flips." in reading
    assert f"helps on {report}: +0.050" in reading and "not the study's choice" in reading
    view = G.options_view(table.reset_index())
    assert view.loc[1, f"Δ {report}"].startswith("+0.050") and view.loc[1, f"Δ {report}"].endswith("(beyond)")


def test_what_each_option_buys_is_read_by_lesion_area_on_the_reporting_halves():
    """An option that helps small lesions only shows its gain in the < 5% bin, on the reporting half alone."""
    helps_small = {"small lesions": lambda seed, i, split: 0.05 if i in SMALL else 0.0}
    result = {
        (run, split): scored(run, split, (0, 1, 2), shift)
        for run, shift in {"base": lambda seed, i, split: 0.0, **helps_small}.items()
        for split in ("validation", "PH2")
    }
    table = G.options_by_area(result, {"base": "base", "small lesions": "small lesions"})
    report = half_name("PH2", REPORTING)
    assert set(table["data"]) == {report} and set(table["option"]) == {"small lesions", *G.INFERENCE_STUDIED}
    rows = table[table["option"] == "small lesions"].set_index("lesion area")
    assert list(rows.index) == ["< 5%", "> 50%"]  # empty bins are left out
    assert rows.loc["< 5%", "images"] == len(set(SMALL) & set(REPORT))
    assert abs(rows.loc["< 5%", "Δ"] - 0.05) < 1e-9 and rows.loc["< 5%", "against the seed spread"].startswith("beyond")
    assert abs(rows.loc["> 50%", "Δ"]) < 1e-9 and rows.loc["> 50%", "against the seed spread"].startswith("within")
    flips = table[table["option"] == "test-time flips"]
    assert np.allclose(flips["Δ"], 0.01)
    view = G.options_by_area_view(table)
    assert list(view.columns) == ["data", "option", "< 5%", "5–15%", "15–50%", "> 50%"]
    assert view.loc[0, "option"] == "base: JA (images)" and view.loc[0, "5–15%"] == ""
    assert view.loc[1, "< 5%"].startswith("+0.050") and view.loc[1, "< 5%"].endswith("(beyond)")
    reading = G.options_by_area_reading(table)
    assert f"On {report}, lesions of < 5% of the image" in reading and "most from small lesions, +0.050" in reading
    assert "on > 50%" in reading and "it changes JA by +0.000" in reading
    # a change within the seed spread, or none, is not read as a gain (seen: "most from largest component, +0.000")
    unsettled = table.assign(**{"against the seed spread": "within the seed spread"})
    reading = G.options_by_area_reading(unsettled)
    assert "most from" not in reading
    assert "no option raises JA beyond the seed spread (the largest change: small lesions, +0.050" in reading


def test_one_seed_chooses_nothing_and_says_why():
    table = study({"helps": lambda seed, i, split: 0.05}, seeds=(0,))
    assert table.loc[1, "chosen"] == "one seed's difference: needs ≥ 3 seeds"
    assert "No option is chosen: one seed's difference: needs ≥ 3 seeds." in G.options_reading(table)


def test_task_uses_reads_the_options_from_a_runs_parameters():
    from isic_utils.config import params as P

    task3 = P.resolve("train", P.project_root() / "params" / "task3.yaml", "synthetic", {})
    uses = G.task_uses(task3)
    assert "256 px" not in uses and "test-time flips" not in uses and "largest component" in uses
    # the study chose these on the later releases' choosing half
    assert {"weight average", "weight average + zoom-out"} <= set(uses) and "Lovasz hinge" not in uses
    assert G.task_uses({**task3, **G.BASE}) == []
    assert G.task_uses({**task3, "image_size": 256, "color_constancy": "shades_of_grey"}) == [
        "colour constancy",
        "zoom-out augmentation",
        "weight average",
        "weight average + zoom-out",
        "256 px",
        "largest component",
    ]


def test_an_option_outside_the_reports_design_is_measured_never_taken():
    """256 px, zoom and test-time flips are measured and may be chosen, never a default, each with its reason."""
    table = study({"256 px": lambda seed, i, split: 0.05, "colour constancy": lambda seed, i, split: 0.05})
    assert table.set_index("option").loc[["256 px", "test-time flips"], "chosen"].eq("yes").all()
    reading = G.options_reading(table, ["colour constancy", "test-time flips"])
    assert "256 px stays a measured option, never a default: the report's images are 128 × 128" in reading
    assert "test-time flips stays a measured option, never a default: it runs the model four times" in reading
    assert "Task 3's parameters take exactly the chosen options (colour constancy)." in reading
    view = G.options_view(table).set_index("option")
    assert view.loc["256 px", "chosen"] == "yes, never a default (the reading says why)"
    assert view.loc["colour constancy", "chosen"] == "yes"


def test_the_table_says_how_well_the_confidence_ranks_each_options_masks_on_validation():
    """Beside JA, which alone decides: the Spearman correlation between each validation image's confidence and its JA,
    averaged over seeds (an option that ranks its masks worse makes the report's flags worth less)."""
    result = scored("base", "validation", (0, 1), lambda seed, i, split: 0.0)
    for (seed, _, _), table in result.tables.items():
        table["confidence"] = table["iou"] if seed == 0 else -table["iou"]  # ranks perfectly, then backwards
    assert G.confidence_rho(result, "none", "none") == pytest.approx(0.0)
    for table in result.tables.values():
        table["confidence"] = table["iou"] ** 3  # the same order: a rank correlation of 1
    assert G.confidence_rho(result, "none", "none") == pytest.approx(1.0)
    assert np.isnan(G.confidence_rho(result, "none", "not scored"))
    table = study({"helps": lambda seed, i, split: 0.05})  # tables with no confidence: nothing to say
    assert table[G.CONFIDENCE_RHO].isna().all() and G.CONFIDENCE_RHO not in G.options_view(table.dropna(axis=1))
    assert G.options_view(table)[G.CONFIDENCE_RHO].eq("").all()


def test_a_chosen_combination_task_3_does_not_take_is_said_and_its_parts_count_as_taken():
    """Both combinations chosen; task 3 takes the one without the Lovász hinge (``NOT_TAKEN`` says why), and with it
    zoom-out, which it takes as a part of that combination, not as a choice of its own."""
    helps = lambda seed, i, split: 0.05  # noqa: E731
    table = study({"weight average + zoom-out": helps, "weight average + zoom-out + Lovasz": helps})
    uses = ["zoom-out augmentation", "weight average + zoom-out"]
    reading = G.options_reading(table, uses)
    assert "weight average + zoom-out + Lovasz is chosen but not taken: the Lovász hinge makes" in reading
    assert "Task 3's parameters take exactly the chosen options (weight average + zoom-out)." in reading
    view = G.options_view(table).set_index("option")
    assert view.loc["weight average + zoom-out + Lovasz", "chosen"] == "yes, not taken (the reading says why)"
    assert G._part_of("zoom-out augmentation", "weight average + zoom-out")
    assert not G._part_of("Lovasz hinge", "weight average + zoom-out")
    assert "not the study's choice" in G.options_reading(table, ["weight average + zoom-out + Lovasz"])
