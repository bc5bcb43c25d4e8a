"""Adapting a trained run to another clinic: batch-norm statistics without labels, fine-tuning on k labelled cases,
the adapted checkpoint ``predict`` applies, the learning curve, and the ``adapt`` command's errors."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from isic_utils.__main__ import main
from isic_utils.evaluation import adaptation as A
from isic_utils.evaluation.external import halves
from isic_utils.model.inference import load_trained, model_input
from isic_utils.predict import predict_folder
from isic_utils.training.loop import loss_fn


@pytest.fixture()
def tiny_report_run(trained_run, tmp_path):
    """The trained checkpoint as a finished run's seed 0, as chapter 3 reads it."""
    from isic_utils.training.experiments import SavedRun

    _, run_dir = trained_run
    (tmp_path / "run" / "seed0").mkdir(parents=True)
    shutil.copy(run_dir / "best.pt", tmp_path / "run" / "seed0" / "best.pt")
    return SavedRun(
        "task3", tmp_path / "run", {"params": {}}, pd.DataFrame({"seed": [0]}), pd.DataFrame(), {}, torch.empty(0)
    )


@pytest.fixture()
def clinic(tiny_data, tmp_path):
    """The tiny test set as another clinic's folder: images, and masks in a folder of their own."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for pair in tiny_data.test.sources:
        shutil.copy(pair.image, images / pair.image.name)
        shutil.copy(pair.mask, masks / pair.mask.name)
    return images, masks


def test_batchnorm_statistics_become_the_clinics(trained_run, tiny_data):
    _, run_dir = trained_run
    model, meta = load_trained(run_dir / "best.pt")
    first = A._batch_norms(model)[0]
    before = first.running_mean.clone()
    darker = (tiny_data.test.images.float() * 0.5).to(torch.uint8)  # another camera: half as bright
    A.adapt_batchnorm(model, meta, darker, batch_size=len(darker))
    seen = {}
    hook = first.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    with torch.no_grad():
        model(model_input(meta, darker))
    hook.remove()
    assert not torch.allclose(first.running_mean, before)
    assert torch.allclose(first.running_mean, seen["x"].mean((0, 2, 3)), atol=1e-5)  # one batch: its exact mean
    assert not model.training and all(not m.training for m in A._batch_norms(model))


def test_fine_tuning_on_a_few_cases_fits_them(trained_run, tiny_data):
    _, run_dir = trained_run
    cases = tiny_data.test.subset(tiny_data.test.ids[:3])
    criterion = loss_fn("bce+dice")

    def loss(steps):
        model, meta = load_trained(run_dir / "best.pt")
        A.fine_tune(model, meta, cases.images, cases.masks, seed=0, steps=steps)
        assert not model.training
        with torch.no_grad():
            return float(criterion(model(model_input(meta, cases.images)), cases.masks.float()))

    # Adam's first steps may go up as well as down (1.20 → 1.29 → 1.20 after 10 and 30 steps on an AVX2 EPYC at one
    # thread; 1.24 → 1.05 after 30 elsewhere), and how far 100 steps get depends on the threads that trained the
    # starting checkpoint: 1.20 → 0.10 at one thread, 1.28 → 0.79 at two on that EPYC. A fine-tune that fits its cases
    # takes a quarter off the loss either way; one that does nothing leaves it where it was.
    before, after = loss(0), loss(100)
    assert after < 0.75 * before, (before, after)


def test_an_adapted_checkpoint_says_so_and_predict_applies_it(trained_run, clinic, tmp_path):
    _, run_dir = trained_run
    images, masks = clinic
    base = tmp_path / "best.pt"
    shutil.copy(run_dir / "best.pt", base)
    assert main(["adapt", "--checkpoint", str(base), "--images", str(images), "--masks", str(masks), "--k", "2"]) == 0
    target = tmp_path / "adapted-k2.pt"
    _, meta = load_trained(target)
    adapted = meta["adapted"]
    assert adapted["method"] == "fine-tune" and adapted["cases"] == 2 and len(adapted["ids"]) == 2
    assert set(adapted["ids"]) <= {p.stem for p in images.iterdir()} and adapted["base"].endswith("best.pt")
    assert "/" not in adapted["from"] or not adapted["from"].startswith(str(tmp_path))  # no folder of this machine
    written = predict_folder(target, images, tmp_path / "out")
    assert len(written) == len(list(images.iterdir()))
    # no labels: every image's statistics
    assert main(["adapt", "--checkpoint", str(base), "--images", str(images)]) == 0
    _, meta = load_trained(tmp_path / "adapted-batchnorm.pt")
    assert meta["adapted"]["method"] == "batchnorm" and meta["adapted"]["cases"] == len(list(images.iterdir()))
    # the same again is refused: nothing replaced
    stamp = target.stat().st_mtime_ns
    assert main(["adapt", "--checkpoint", str(base), "--images", str(images), "--masks", str(masks), "--k", "2"]) == 1
    assert target.stat().st_mtime_ns == stamp


def test_a_threshold_chosen_on_k_cases_is_recorded_and_applied_by_predict(trained_run, clinic, tmp_path, capsys):
    """adapt --method threshold: the weights stay as trained, the checkpoint's threshold is the one chosen on the k
    cases (what best_threshold picks on them), and predict's masks are the probabilities above it."""
    from isic_utils.data.decoding import decode_pairs, read_image
    from isic_utils.model.inference import predicted_probabilities
    from isic_utils.scoring.metrics import full_size_mask

    _, run_dir = trained_run
    images, masks = clinic
    arguments = ["adapt", "--checkpoint", str(run_dir / "best.pt"), "--images", str(images), "--masks", str(masks)]
    assert main([*arguments, "--method", "threshold", "--k", "3", "--output", str(tmp_path / "t.pt")]) == 0
    said = capsys.readouterr().out
    model, meta = load_trained(tmp_path / "t.pt")
    base, base_meta = load_trained(run_dir / "best.pt")
    adapted = meta["adapted"]
    assert adapted["method"] == "threshold" and adapted["cases"] == 3 and meta["threshold"] == adapted["threshold"]
    assert f"threshold {adapted['threshold']:.2f} (was {base_meta['threshold']:.2f}) chosen on 3 case(s)" in said
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    pairs = [p for p in A.clinic_pairs(images, masks)[1] if p.id in adapted["ids"]]
    cases = decode_pairs(pairs, meta["image_size"], progress=False)
    assert adapted["threshold"] == A.best_threshold(predicted_probabilities(base, base_meta, cases.images), cases.masks)
    predict_folder(tmp_path / "t.pt", images, tmp_path / "masks-out", postprocess="none")
    first = sorted(images.iterdir())[0]
    image, size = read_image(first, meta["image_size"])
    by_hand = full_size_mask(predicted_probabilities(base, base_meta, image[None]), size, adapted["threshold"])
    written = np.asarray(Image.open(tmp_path / "masks-out" / f"{first.stem}_Segmentation.png")) > 0
    assert (written == by_hand[0, 0].numpy()).all()
    # a threshold needs labelled cases
    assert main([*arguments[:5], "--method", "threshold", "--output", str(tmp_path / "u.pt")]) == 1
    assert "--method threshold chooses on labelled cases: give --masks" in capsys.readouterr().err
    assert not (tmp_path / "u.pt").exists()


def test_the_adapt_commands_errors_name_the_problem_and_the_fix(trained_run, clinic, tmp_path, capsys):
    _, run_dir = trained_run
    images, masks = clinic
    checkpoint = str(run_dir / "best.pt")

    def error(*arguments):
        assert main(["adapt", "--checkpoint", checkpoint, "--output", str(tmp_path / "a.pt"), *arguments]) == 1
        return capsys.readouterr().err

    assert "does not exist" in error("--images", str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .jpg" in error("--images", str(empty))
    n = len(list(images.iterdir()))
    assert f"holds {n} labelled cases" in error("--images", str(images), "--masks", str(masks), "--k", str(n + 1))
    assert "--k needs labelled cases" in error("--images", str(images), "--k", "2")
    lonely = sorted(images.iterdir())[0]
    Image.open(lonely).save(images / "stray.png")  # an image with no mask
    message = error("--images", str(images), "--masks", str(masks))
    assert "1 of" in message and "stray.png" in message and "Fix:" in message
    assert not (tmp_path / "a.pt").exists()


def test_the_learning_curve_scores_only_cases_it_did_not_adapt_on(tiny_report_run, tiny_data):
    run = tiny_report_run
    curve = A.learning_curve(run, tiny_data.test, "clinic", ks=(1, 2, 99), seeds=(0, 1), steps=2)
    pool, scored = halves(tiny_data.test.ids)
    assert not set(pool) & set(scored) and sorted(pool + scored) == sorted(tiny_data.test.ids)
    assert set(curve["method"]) == {
        "as trained",
        "batch-norm statistics (no labels)",
        "fine-tuned on k labelled cases",
        "threshold chosen on k labelled cases",
    }
    assert curve["threshold"].between(0.3, 0.9).all()
    tuned = curve[curve["method"].str.startswith("fine")]
    assert sorted(set(tuned["k"])) == [1, 2, len(pool)]  # k capped at the pool
    for ids in tuned["ids used"]:
        assert set(ids.split()) <= set(pool)
    assert (curve["scored"] == len(scored)).all() and curve["JA"].between(0, 1).all()
    # each draw goes with a training seed of the run (cycling over the run's seeds): this run has one
    assert set(curve["training seed"]) == set(run.seeds["seed"].astype(int))
    summary = A.curve_summary(curve)
    assert summary.loc[summary["method"].str.startswith("fine"), "draws"].eq(2).all()
    assert np.isfinite(summary["JA mean"]).all()


def test_the_threshold_chosen_on_a_few_cases_undoes_over_segmentation():
    truth = torch.zeros(4, 1, 32, 32)
    truth[..., 8:24, 8:24] = 1
    grown = torch.zeros_like(truth)
    grown[..., 4:28, 4:28] = 0.6  # a ring the model is unsure of, outside the lesion
    grown[..., 8:24, 8:24] = 0.95
    assert A.best_threshold(grown, truth) >= 0.6  # the ring (p = 0.6) is left out: p > t
    assert A.best_threshold(truth * 0.9 + 0.05, truth) == 0.5  # nothing to gain: 0.5 stays


def test_the_curve_reading_says_which_way_does_better_with_the_fewest_cases():
    rows = [
        ("as trained", 0, 0.80, float("nan")),
        ("batch-norm statistics (no labels)", 0, 0.75, float("nan")),
        ("threshold chosen on k labelled cases", 5, 0.86, 0.01),
        ("threshold chosen on k labelled cases", 25, 0.86, 0.0),
        ("fine-tuned on k labelled cases", 5, 0.82, 0.02),
        ("fine-tuned on k labelled cases", 25, 0.88, 0.01),
    ]
    summary = pd.DataFrame(
        [
            {
                "run": "task3",
                "set": "PH2",
                "method": m,
                "k": k,
                "JA mean": j,
                "JA std": s,
                "draws": 3,
                "threshold min": 0.7 if m.startswith("threshold") else 0.5,
                "threshold max": 0.85 if m.startswith("threshold") else 0.5,
            }
            for m, k, j, s in rows
        ]
    )
    text = A.curve_reading(summary)
    assert text.startswith("task3 on PH2's reporting half: 0.800 as trained, 0.750 with batch-norm")
    assert "k = 5 labelled cases, 0.860 ± 0.010 by choosing the threshold alone and 0.820 ± 0.020 fine-tuned" in text
    assert "with k = 25, 0.860 ± 0.000 and 0.880 ± 0.010 (thresholds chosen: 0.70–0.85)" in text
    assert "the threshold alone does better" in text
    summary.loc[summary["method"].str.startswith("threshold") & (summary["k"] == 25), "threshold max"] = 0.95
    assert "(thresholds chosen: 0.70–0.95, at the end of the grid searched)" in A.curve_reading(summary)
    summary.loc[summary["method"].str.startswith("threshold"), ["threshold min", "threshold max"]] = 0.95
    assert "(every draw chose the threshold 0.95, at the end of the grid searched)" in A.curve_reading(summary)
    summary.loc[summary["method"].str.startswith("fine") & (summary["k"] == 5), "JA mean"] = 0.9
    assert "With 5 cases, fine-tuning does better." in A.curve_reading(summary)
    summary.loc[summary["method"].str.startswith("fine") & (summary["k"] == 5), "JA mean"] = 0.87  # 0.01 apart
    assert "With 5 cases neither way is clearly better (within the draws' spread)." in A.curve_reading(summary)
    summary["JA std"] = float("nan")  # one draw each (the offline profiles): no winner named from a single draw
    assert "With 5 cases and one draw, no spread says which way is better." in A.curve_reading(summary)
