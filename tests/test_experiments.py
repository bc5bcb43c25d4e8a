"""Seeds and spread: a run trained once per seed (experiments), read back, and compared (comparison) with mean ± std and
paired Wilcoxon tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import wilcoxon

from isic_utils.config.params import resolve
from isic_utils.evaluation import comparison
from isic_utils.training import experiments

ROOT = Path(__file__).resolve().parents[1]


def saved_run(name: str, per_seed: dict[int, np.ndarray]) -> experiments.SavedRun:
    """A finished run as the comparison chapter reads it, with hand-made per-image JA for each seed."""
    ids = [f"ISIC_{k:07d}" for k in range(len(next(iter(per_seed.values()))))]
    per_image = {seed: pd.DataFrame({"id": ids, "iou": values}) for seed, values in per_seed.items()}
    seeds = pd.DataFrame(
        {
            "seed": list(per_seed),
            **{column: [float(v.mean()) for v in per_seed.values()] for column in comparison.SPREAD_COLUMNS},
        }
    )
    return experiments.SavedRun(name, Path("."), {}, seeds, pd.DataFrame(), per_image, torch.zeros(0))


def test_comparison_shows_mean_and_sample_std_over_seeds():
    run = saved_run("a", {0: np.array([0.5, 0.7]), 1: np.array([0.6, 0.8]), 2: np.array([0.7, 0.9])})
    row = comparison.comparison_table({"a": run}).iloc[0]
    assert row["seeds"] == 3
    assert row["JA / IoU (mean per image, original size)"] == "0.7000 ± 0.1000"  # means 0.6, 0.7, 0.8; ddof=1
    single = comparison.comparison_table({"a": saved_run("a", {0: np.array([0.25, 0.75])})}).iloc[0]
    assert single["JA / IoU (mean per image, original size)"] == "0.5000"  # no spread claimed from one seed


def test_wilcoxon_pairs_seed_averaged_images_and_reports_the_worst_seed():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.8, size=40)
    a = {s: np.clip(base + rng.normal(0, 0.02, 40), 0, 1) for s in (0, 1, 2)}
    b = {s: np.clip(base + 0.05 + rng.normal(0, 0.02, 40), 0, 1) for s in (0, 1, 2)}
    b[2] = a[2] + rng.normal(0, 0.02, 40)  # one seed of B is no better than A: the worst-seed p must show it
    row = comparison.wilcoxon_table({"A": saved_run("A", a), "B": saved_run("B", b)}).iloc[0]
    mean_a, mean_b = np.mean(list(a.values()), axis=0), np.mean(list(b.values()), axis=0)
    statistic, p_value = wilcoxon(mean_a, mean_b)
    assert row["images"] == 40
    assert row["Wilcoxon W"] == pytest.approx(statistic) and row["p-value"] == pytest.approx(p_value)
    assert row["mean B − A"] == pytest.approx((mean_b - mean_a).mean())
    per_seed = [wilcoxon(a[s], b[s]).pvalue for s in (0, 1, 2)]
    assert row["p-value, worst single seed"] == pytest.approx(max(per_seed))
    assert row["p-value"] < 0.05 < row["p-value, worst single seed"]
    reading = comparison.written_reading(
        {"A": saved_run("A", a), "B": saved_run("B", b)},
        comparison.wilcoxon_table({"A": saved_run("A", a), "B": saved_run("B", b)}),
    )
    assert "largest p over single seeds" in reading and "Spread over seeds" in reading


def test_identical_runs_are_not_called_different():
    same = {0: np.array([0.3, 0.6, 0.9])}
    row = comparison.wilcoxon_table({"A": saved_run("A", same), "B": saved_run("B", same)}).iloc[0]
    assert row["p-value"] == 1.0 and "p-value, worst single seed" not in row  # one seed: no per-seed column


def test_train_run_trains_each_seed_and_the_comparison_reads_them_back(tiny_data, tmp_path):
    overrides = {"output_dir": str(tmp_path), "seeds": [0, 1], "epochs": 1, "image_size": 64, "decoder": "unet"}
    params = resolve("train", ROOT / "params" / "task2.yaml", "tiny", overrides, root=ROOT)
    result = experiments.train_run(params, tiny_data, verbose=False)
    assert set(result.fits) == {0, 1} and list(result.seeds_table["seed"]) == [0, 1]
    for seed in (0, 1):
        assert (tmp_path / "task2" / f"seed{seed}" / "best.pt").exists()
        assert len(pd.read_csv(tmp_path / "task2" / "tables" / f"per_image_test_seed{seed}.csv")) == len(tiny_data.test)
    losses = [result.fits[s].history["train_loss"].iloc[0] for s in (0, 1)]
    assert losses[0] != losses[1]  # the seed changes initialisation and batch order
    saved = experiments.load_run(tmp_path, "task2")
    assert set(saved.per_image) == {0, 1}
    row = comparison.comparison_table({"task2": saved}).iloc[0]
    assert row["seeds"] == 2 and "±" in row["JA / IoU (mean per image, original size)"]
    # a second call resumes both finished seeds instead of training them again (checkpoints left untouched)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("task2/seed*/*.pt") if p.name != "test_probabilities.pt"}
    again = experiments.train_run(params, tiny_data, verbose=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(stamps) == 4
    for seed in (0, 1):
        pd.testing.assert_frame_equal(again.fits[seed].history, result.fits[seed].history)


def test_a_seed_decides_the_initialisation_whatever_ran_before():
    """torch seeds itself at random in each new process, and a notebook draws random numbers before it builds the
    model: a rerun of seed k must still start from the same weights."""
    params = resolve("train", ROOT / "params" / "task3.yaml", "tiny", {"decoder": "unet"}, root=ROOT)

    def init(seed: int, before: int) -> torch.Tensor:
        torch.manual_seed(before)  # another process's random start
        torch.rand(before)  # whatever ran before in the notebook
        model, _ = experiments.make_model(params, seed)
        return torch.cat([t.flatten() for t in model.state_dict().values() if t.is_floating_point()])

    assert torch.equal(init(1, 0), init(1, 7))
    assert not torch.equal(init(1, 0), init(2, 0))
