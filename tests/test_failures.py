"""Where the models fail, and the tables a person reads: lesion area and image size per test image, JA by
lesion-size quartile, the worst images, the reading; the compact summary and the EDA size overview."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from isic_utils.evaluation import failures
from isic_utils.report import tables as report
from isic_utils.training import experiments


def per_image(areas, ious, width=100, height=50):
    """Hand-made per-image rows: ``areas`` (fraction of the image that is lesion) and the JA of each image."""
    pixels = width * height
    rows = []
    for k, (area, iou) in enumerate(zip(areas, ious)):
        lesion = int(round(area * pixels))
        tp = int(round(iou * lesion))  # a prediction inside the lesion: JA = tp / lesion
        rows.append(
            {
                "id": f"ISIC_{k:07d}",
                "width": width,
                "height": height + k,
                "tp": tp,
                "fp": 0,
                "fn": lesion - tp,
                "tn": pixels + k * width - lesion,
                "iou": iou,
            }
        )
    return pd.DataFrame(rows)


def test_lesion_area_and_megapixels_come_from_the_ground_truth():
    frame = failures.per_image_frame(per_image([0.1, 0.5], [0.2, 0.9]))
    assert frame["lesion_area"].tolist() == pytest.approx([0.1, 0.5 * 5000 / 5100])
    assert frame["megapixels"].tolist() == pytest.approx([0.005, 0.0051])


def test_quartiles_of_lesion_size_hold_the_same_images_for_every_run():
    areas = [0.01, 0.02, 0.03, 0.04, 0.2, 0.3, 0.4, 0.5]
    small_fail = failures.per_image_frame(per_image(areas, [0.1, 0.3, 0.6, 0.7, 0.8, 0.8, 0.9, 0.9]))
    even = failures.per_image_frame(per_image(areas, [0.8] * 8))
    table = failures.size_quartiles({"a": small_fail, "b": even})
    assert table["images"].tolist() == [2, 2, 2, 2]
    assert table["a JA"].tolist() == pytest.approx([0.2, 0.65, 0.8, 0.9])
    assert table["a JA < 0.65"].tolist() == ["100%", "50%", "0%", "0%"]
    assert table["b JA"].tolist() == pytest.approx([0.8] * 4)
    assert table["lesion area (% of image)"].iloc[0].startswith("1.0–")
    worst = failures.worst(small_fail, 2)
    assert worst["id"].tolist() == ["ISIC_0000000", "ISIC_0000001"]
    reading = failures.failure_reading({"a": small_fail})
    assert "3 of 8 test images (38%) score JA below 0.65" in reading
    assert "0.200 on the smallest quarter of lesions vs 0.900 on the largest" in reading
    assert "rises with lesion area (Spearman ρ +" in reading and "Worst: ISIC_0000000 (JA 0.10" in reading


def test_seed_mean_frame_averages_each_image_over_seeds():
    first = per_image([0.1, 0.2], [0.2, 0.4])
    second = first.copy()
    second["iou"] = [0.4, 0.8]
    run = experiments.SavedRun(
        "r",
        Path("."),
        {},
        pd.DataFrame({"seed": [0, 1]}),
        pd.DataFrame(),
        {0: first, 1: second.iloc[::-1].reset_index(drop=True)},
        torch.zeros(0),
    )
    assert failures.seed_mean_frame(run)["iou"].tolist() == pytest.approx([0.3, 0.6])


def test_the_summary_is_one_compact_table_with_the_selected_checkpoint_per_split():
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [1, 0.5, 0.4],
            "val_loss": [0.9, 0.6, 0.7],
            "test_loss": [1, 0.7, 0.8],
            "val_iou_mean": [0.2, 0.5, 0.4],
            "test_iou_mean": [0.3, 0.1, 0.6],
            "val_dice_mean": [0.3, 0.6, 0.5],
            "test_dice_mean": [0.4, 0.2, 0.7],
            "val_accuracy_mean": [0.8, 0.9, 0.85],
            "test_accuracy_mean": [0.7, 0.6, 0.75],
        }
    )
    final_test = {
        "loss": 0.7,
        "iou_mean": 0.1,
        "dice_mean": 0.2,
        "accuracy_mean": 0.6,
        "iou_mean (original size)": 0.12,
        "dice_mean (original size)": 0.22,
        "accuracy_mean (original size)": 0.61,
    }
    table = report.summary_table(
        history, {"loss": 0.6, "iou_mean": 0.5, "dice_mean": 0.6, "accuracy_mean": 0.9}, final_test, 2
    )
    assert list(table.columns) == ["split", "row", "loss", "IoU", "Dice", "accuracy"] and len(table) == 9
    rows = table.set_index(["split", "row"])
    assert rows.loc[("validation", "max over epochs"), "IoU"] == 0.5
    assert rows.loc[("test", "mean over epochs [monitor]"), "IoU"] == pytest.approx(1 / 3)
    assert rows.loc[("validation", "selected checkpoint (epoch 2)"), "loss"] == 0.6
    assert rows.loc[("test", "selected checkpoint, original size"), "IoU"] == 0.12
    assert np.isnan(rows.loc[("test", "selected checkpoint, original size"), "loss"])


def test_the_eda_size_overview_sums_up_every_size():
    sizes = pd.DataFrame({"width": [1022, 1022, 3008, 640], "height": [767, 767, 2000, 480]})
    table = report.size_overview(sizes).set_index("dimension")
    assert (
        table.loc["width", "min"] == 640 and table.loc["width", "max"] == 3008 and table.loc["width", "median"] == 1022
    )
    assert table.loc["megapixels", "max"] == pytest.approx(6.016)
    assert table.loc["width × height", "distinct"] == 3 and table.loc["width × height", "images"] == 4


def test_tables_for_reading_hide_the_index_and_round_but_keep_small_p_values():
    table = pd.DataFrame({"score": [0.123456, None], "parameters": [13272065, 2], "p-value": [1.6e-11, 0.5]})
    page = report.for_reading(table).to_html()
    assert ">0.123<" in page and ">13,272,065<" in page and ">1.6e-11<" in page and "0.123456" not in page
    assert "row_heading" not in page  # no index column
    assert table["score"].iloc[0] == 0.123456  # the table itself (and its CSV) keeps full precision


def test_the_size_overview_shows_pixels_as_whole_numbers():
    """The EDA's size table read '602.000' for a width: pixel counts stay whole, megapixels keep decimals."""
    from isic_utils.report import tables as report

    sizes = pd.DataFrame({"width": [602, 700, 1000, 1500], "height": [400, 500, 600, 700]})
    page = report.for_reading(report.size_overview(sizes)).to_html()
    assert ">602<" in page and ">1,500<" in page and ">850<" in page and "602.000" not in page
    assert ">0.241<" in page


def test_the_area_ratio_says_which_way_a_run_misses():
    from isic_utils.evaluation.failures import area_ratio, area_ratio_table
    from isic_utils.report.plots import area_ratio_figure

    def table(predicted_over_true):
        # 100-pixel lesions; predictions k times as large, overlapping the lesion as far as they can
        rows = [
            {"tp": min(100, 100 * k), "fp": max(0, 100 * k - 100), "fn": max(0, 100 - 100 * k), "tn": 1000}
            for k in predicted_over_true
        ]
        return pd.DataFrame(rows + [{"tp": 0, "fp": 5, "fn": 0, "tn": 1000}])  # no lesion: no ratio

    over, under = table([1.5, 1.4, 1.6, 1.0]), table([0.5, 0.6, 1.0, 0.7])
    assert area_ratio(over).round(3).tolist()[:4] == [1.5, 1.4, 1.6, 1.0] and area_ratio(over).isna().iloc[-1]
    result = area_ratio_table(
        {("task3", "ISIC test"): table([1.0, 1.05, 0.95]), ("task3", "PH2"): over, ("task2", "PH2"): under}
    ).set_index(["run", "data"])
    assert result.loc[("task3", "PH2"), "reading"] == "over-segments"
    assert result.loc[("task3", "PH2"), "> 1.3×"] == "75%" and result.loc[("task3", "PH2"), "images"] == 4
    assert result.loc[("task2", "PH2"), "reading"] == "under-segments"
    assert result.loc[("task3", "ISIC test"), "reading"] == "neither, on the whole"
    empty = pd.DataFrame([{"tp": 0, "fp": 0, "fn": 100, "tn": 1000}] * 3)  # nothing predicted: ratio 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a warning would land in chapter 3's page
        figure = area_ratio_figure({("task3", "PH2"): over, ("task2", "PH2"): under, ("task1", "PH2"): empty})
    assert figure.axes[0].get_yscale() == "log"


def test_ja_by_lesion_area_bins_every_image_once_and_reads_the_bins():
    """Chapter 3's small-lesion table: each image in the bin of its true lesion area (share of the image, original
    size), the bins' images adding up to the set, each bin's JA the mean of its images'; the page's view and the
    reading say the same numbers."""
    total = 10_000
    true = np.array([100, 400, 900, 2_100, 4_000, 7_000])  # 1 %, 4 %, 9 %, 21 %, 40 %, 70 % of the image
    iou = np.array([0.2, 0.4, 0.6, 0.7, 0.8, 0.9])
    tp = (true * iou).astype(int)
    table = pd.DataFrame({"id": list("abcdef"), "tp": tp, "fn": true - tp, "fp": 0, "tn": total - true, "iou": iou})
    frames = {("task3", "ISIC test"): table, ("task3", "later"): table.iloc[:3]}
    by_area = failures.lesion_area_table(frames)
    rows = by_area[by_area["data"] == "ISIC test"].set_index("lesion area")
    assert list(rows["images"]) == [2, 1, 2, 1, 6]
    assert rows.loc["< 5%", "JA"] == pytest.approx(0.3) and rows.loc["15–50%", "JA"] == pytest.approx(0.75)
    assert rows.index[-1] == "all (median 15%)" and rows.iloc[-1]["JA"] == pytest.approx(iou.mean())
    later = by_area[by_area["data"] == "later"]
    assert list(later["images"]) == [2, 1, 0, 0, 3] and later["JA"].isna().sum() == 2  # empty bins: no JA
    view = failures.lesion_area_view(by_area)
    assert list(view.columns) == ["run", "data", "< 5%", "5–15%", "15–50%", "> 50%", "all", "median lesion area"]
    assert (
        view.iloc[0]["< 5%"] == "0.300 (2)"
        and view.iloc[1]["> 50%"] == ""
        and view.iloc[1]["median lesion area"] == "4%"
    )
    reading = failures.lesion_area_reading(by_area)
    assert (
        "task3 on ISIC test: JA 0.300 on lesions of < 5% of the image (2 images) against 0.900 on > 50% (1)" in reading
    )
    assert "task3 on later: JA 0.300 on lesions of < 5% of the image (2 images) against 0.600 on 5–15% (1)" in reading
