import math

import pandas as pd
import pytest
import torch

from isic_utils.data import apply_augmentation, draw_augmentation
from isic_utils.model import build_model
from isic_utils.training import (
    CheckpointMismatch,
    TrainConfig,
    TrainingDiverged,
    fit,
    load_checkpoint,
    TIMING_COLUMNS,
    resolve_precision,
)

VOLATILE = list(TIMING_COLUMNS)


def config(**changes):
    base = dict(freeze_encoder=False, epochs=3, batch_size=8, eval_batch_size=8, precision="fp32", seed=0)
    return TrainConfig(**{**base, **changes})


def model_for(cfg, seed=123):
    torch.manual_seed(seed)
    return build_model(encoder_weights=None, freeze_encoder=cfg.freeze_encoder, dropout=0.2)


def history(result):
    return result.history.drop(columns=VOLATILE)


def test_same_seed_same_history(tiny_data, tmp_path):
    cfg = config()
    first = fit(model_for(cfg), tiny_data, cfg, tmp_path / "a", verbose=False)
    second = fit(model_for(cfg), tiny_data, cfg, tmp_path / "b", verbose=False)
    pd.testing.assert_frame_equal(history(first), history(second), check_exact=True)
    other = fit(model_for(cfg), tiny_data, config(seed=1), tmp_path / "c", verbose=False)
    assert not history(other).equals(history(first))


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tiny_data, tmp_path):
    cfg = config()
    straight = fit(model_for(cfg), tiny_data, cfg, tmp_path / "straight", verbose=False)

    def kill(epoch, step):
        if epoch == 2 and step == 1:
            raise KeyboardInterrupt("simulated kill")

    run_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        fit(model_for(cfg), tiny_data, cfg, run_dir, on_step=kill, verbose=False)
    assert len(load_checkpoint(run_dir / "last.pt")["history"]) == 1  # epoch 1 complete, epoch 2 lost
    fresh = model_for(cfg)  # a fresh process: same starting encoder (the seed decides it), other decoder weights
    with torch.no_grad():
        for parameter in fresh.decoder.parameters():
            parameter.normal_()
    resumed = fit(fresh, tiny_data, cfg, run_dir, verbose=False)  # the weights must come from last.pt
    pd.testing.assert_frame_equal(history(resumed), history(straight), check_exact=True)
    assert resumed.best_epoch == straight.best_epoch
    assert torch.equal(resumed.test.counts, straight.test.counts)


def test_resume_refuses_another_configuration(tiny_data, tmp_path):
    cfg = config(epochs=1)
    fit(model_for(cfg), tiny_data, cfg, tmp_path / "run", verbose=False)
    other = config(epochs=1, decoder_lr=5e-4)
    with pytest.raises(CheckpointMismatch, match="another configuration"):
        fit(model_for(other), tiny_data, other, tmp_path / "run", verbose=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    cfg = config()
    model = model_for(cfg)

    def poison(epoch, step):
        if epoch == 2 and step == 0:
            with torch.no_grad():
                model.decoder.head.bias.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="loss became nan.*last complete epoch"):
        fit(model, tiny_data, cfg, tmp_path / "run", on_step=poison, verbose=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert len(state["history"]) == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert (tmp_path / "run" / "best.pt").exists()


def test_selection_uses_validation_and_test_is_scored_on_every_image(tiny_data, tmp_path):
    cfg = config(epochs=3)
    result = fit(model_for(cfg), tiny_data, cfg, tmp_path / "run", verbose=False)
    best = result.history["val_iou_mean"].idxmax()
    assert result.best_epoch == int(result.history.loc[best, "epoch"])
    assert result.test.counts.shape == (len(tiny_data.test), 4)
    assert result.test.probabilities.shape == (len(tiny_data.test), 1, 64, 64)
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == result.best_epoch


def test_feature_cache_gives_the_uncached_history(tiny_data, tmp_path):
    cfg_cached = config(freeze_encoder=True, feature_cache=True)
    cfg_plain = config(freeze_encoder=True, feature_cache=False)
    cached = fit(model_for(cfg_cached), tiny_data, cfg_cached, tmp_path / "cached", verbose=False)
    plain = fit(model_for(cfg_plain), tiny_data, cfg_plain, tmp_path / "plain", verbose=False)
    assert cached.used_feature_cache and not plain.used_feature_cache
    pd.testing.assert_frame_equal(history(cached), history(plain), check_exact=False, rtol=1e-4, atol=1e-5)


def test_augmentation_moves_image_and_mask_together():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    masks = (images[:, :1] % 2).to(torch.uint8)
    draws = {"hflip": torch.tensor([True, False]), "vflip": torch.tensor([False, True]),
             "rot90": torch.tensor([1, 0])}
    out_images, out_masks = apply_augmentation(images, masks, draws)
    assert torch.equal(out_images[0], images[0].flip(-1).rot90(1, dims=(-2, -1)))
    assert torch.equal(out_images[1], images[1].flip(-2))
    assert torch.equal(out_masks[:, 0] * 1, (out_images[:, 0] % 2) * 1)
    generator = torch.Generator().manual_seed(0)
    jittered, same_masks = apply_augmentation(images, masks, draw_augmentation(2, ["color_jitter"], generator))
    assert torch.equal(same_masks, masks) and not torch.equal(jittered, images)


def test_bf16_path_runs_and_learns(tiny_data, tmp_path):
    cfg = config(freeze_encoder=True, precision="bf16", epochs=3, decoder_lr=3e-3, augment=())
    result = fit(model_for(cfg), tiny_data, cfg, tmp_path / "bf16", verbose=False)
    assert result.precision == "bf16"
    losses = result.history["train_loss"].tolist()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_precision_auto_follows_the_hardware():
    from isic_utils.training import cpu_has_native_bf16

    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("fp8", "cpu")
