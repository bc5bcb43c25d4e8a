"""The fit loop: one seed gives one history, a killed run resumes to the uninterrupted one, a NaN stops the run
keeping the last good checkpoint, the frozen encoder's feature cache changes nothing, augmentation moves image and
mask together, and the bf16 path learns. The U-Net decoder stands in where the decoder does not matter: it trains
in half the report decoder's time."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from isic_utils.config.params import TrainConfig
from isic_utils.data.augmentation import apply_augmentation, draw_augmentation
from isic_utils.model.inference import CheckpointMismatch, load_checkpoint
from isic_utils.model.networks import build_model
from isic_utils.training import checkpoints
from isic_utils.training.loop import (
    TIMING_COLUMNS,
    TrainingDiverged,
    ema_update,
    fit,
    learning_rate_factor,
    loss_fn,
    lovasz_hinge_loss,
)
from isic_utils.training.style_mixing import draw_style_mixing, mix_styles, mixed_styles

VOLATILE = list(TIMING_COLUMNS)


def config(**changes):
    base = dict(
        freeze_encoder=False,
        epochs=2,
        batch_size=8,
        eval_batch_size=8,
        precision="fp32",
        seed=0,
        augment=("hflip", "vflip", "color_jitter"),
    )
    return TrainConfig(**{**base, **changes})


def model_for(cfg, seed=123, decoder="unet"):
    torch.manual_seed(seed)
    return build_model(encoder_weights=None, freeze_encoder=cfg.freeze_encoder, decoder=decoder, dropout=0.2)


def history(result):
    return result.history.drop(columns=VOLATILE)


def kill_in_epoch_2(epoch, step):
    if epoch == 2 and step == 1:
        raise KeyboardInterrupt("simulated kill")


def killed_then_resumed(cfg, data, run_dir):
    """``cfg``'s run killed in its second epoch, then run again in the same folder (a fresh model, as a new process)."""
    with pytest.raises(KeyboardInterrupt):
        fit(model_for(cfg), data, cfg, run_dir, on_step=kill_in_epoch_2, verbose=False)
    return fit(model_for(cfg), data, cfg, run_dir, verbose=False)


def test_same_seed_same_history(tiny_data, tmp_path):
    """Dropout, batch order and augmentation draws all follow the seed."""
    cfg = config()
    first = fit(model_for(cfg), tiny_data, cfg, tmp_path / "a", verbose=False)
    second = fit(model_for(cfg), tiny_data, cfg, tmp_path / "b", verbose=False)
    pd.testing.assert_frame_equal(history(first), history(second), check_exact=True)
    other = fit(model_for(cfg), tiny_data, config(seed=1), tmp_path / "c", verbose=False)
    assert not history(other).equals(history(first))


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tiny_data, tmp_path):
    cfg = config()
    straight = fit(model_for(cfg), tiny_data, cfg, tmp_path / "straight", verbose=False)

    run_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        fit(model_for(cfg), tiny_data, cfg, run_dir, on_step=kill_in_epoch_2, verbose=False)
    assert len(load_checkpoint(run_dir / "last.pt")["history"]) == 1  # epoch 1 complete, epoch 2 lost
    fresh = model_for(cfg)  # a fresh process: same starting encoder (the seed decides it), other decoder weights
    with torch.no_grad():
        for parameter in fresh.decoder.parameters():
            parameter.normal_()
    resumed = fit(fresh, tiny_data, cfg, run_dir, verbose=False)  # the weights must come from last.pt
    pd.testing.assert_frame_equal(history(resumed), history(straight), check_exact=True)
    assert resumed.best_epoch == straight.best_epoch
    assert torch.equal(resumed.test.counts, straight.test.counts)


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
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 1 and all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("decoder", ["report", "unet"])  # the U-Net reads the cached skip features too
def test_feature_cache_gives_the_uncached_history(tiny_data, tmp_path, decoder):
    cfg_cached = config(freeze_encoder=True, feature_cache=True, augment=("hflip", "vflip"), epochs=1)
    cfg_plain = config(freeze_encoder=True, feature_cache=False, augment=("hflip", "vflip"), epochs=1)
    cached = fit(model_for(cfg_cached, decoder=decoder), tiny_data, cfg_cached, tmp_path / "cached", verbose=False)
    plain = fit(model_for(cfg_plain, decoder=decoder), tiny_data, cfg_plain, tmp_path / "plain", verbose=False)
    assert cached.used_feature_cache and not plain.used_feature_cache
    pd.testing.assert_frame_equal(history(cached), history(plain), check_exact=False, rtol=1e-4, atol=1e-5)


def test_augmentation_moves_image_and_mask_together():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    masks = (images[:, :1] % 2).to(torch.uint8)
    draws = {"hflip": torch.tensor([True, False]), "vflip": torch.tensor([False, True]), "rot90": torch.tensor([1, 0])}
    out_images, out_masks = apply_augmentation(images, masks, draws)
    assert torch.equal(out_images[0], images[0].flip(-1).rot90(1, dims=(-2, -1)))
    assert torch.equal(out_images[1], images[1].flip(-2))
    assert torch.equal(out_masks[:, 0] * 1, (out_images[:, 0] % 2) * 1)
    generator = torch.Generator().manual_seed(0)
    jittered, same_masks = apply_augmentation(images, masks, draw_augmentation(2, ["color_jitter"], generator))
    assert torch.equal(same_masks, masks) and not torch.equal(jittered, images)


def test_bf16_path_runs_and_learns(tiny_data, tmp_path):
    # two epochs: on a CPU without native bf16 every bf16 op is emulated (an epoch took six seconds on an AVX2 EPYC)
    cfg = config(freeze_encoder=True, precision="bf16", epochs=2, decoder_lr=3e-3, augment=())
    result = fit(model_for(cfg), tiny_data, cfg, tmp_path / "bf16", verbose=False)
    assert result.precision == "bf16"
    losses = result.history["train_loss"].tolist()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_the_bce_dice_loss_is_bce_plus_one_minus_soft_dice_per_image():
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]], [[[-2.0, -2.0], [1.0, -1.0]]]])
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [1.0, 1.0]]]])
    p = torch.sigmoid(logits)
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    dice = [(2 * (p[k] * targets[k]).sum() + 1) / (p[k].sum() + targets[k].sum() + 1) for k in range(2)]
    expected = bce + 1 - (dice[0] + dice[1]) / 2  # smoothed by 1, averaged over images (not pooled)
    assert loss_fn("bce+dice")(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss_fn("bce")(logits, targets).item() == pytest.approx(bce.item(), rel=1e-6)
    perfect = torch.where(targets > 0, 20.0, -20.0)
    assert loss_fn("bce+dice")(perfect, targets).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="loss must be"):
        loss_fn("dice")


def test_the_lovasz_hinge_is_one_minus_ja_per_image_where_the_errors_are_binary():
    """``bce+lovasz``: where each pixel's hinge error is 0 (right by a margin of 1) or 1 (logit 0), the Lovász hinge
    is exactly 1 − JA of the mask the wrong pixels make, image by image, averaged; right by more than the margin, 0."""
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(3, 1, 8, 8, generator=generator) < 0.3).float()
    wrong = torch.rand(3, 1, 8, 8, generator=generator) < 0.2
    wrong[2] = False  # an image predicted perfectly
    logits = torch.where(wrong, 0.0, 2 * targets - 1)
    predicted = (targets > 0) ^ wrong
    ja = [((predicted[k] & (targets[k] > 0)).sum() / (predicted[k] | (targets[k] > 0)).sum()).item() for k in range(3)]
    assert ja[2] == 1.0 and min(ja) < 0.9
    expected = sum(1 - j for j in ja) / 3
    assert lovasz_hinge_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert loss_fn("bce+lovasz")(logits, targets).item() == pytest.approx(bce.item() + expected, rel=1e-6)
    assert lovasz_hinge_loss(3 * (2 * targets - 1), targets).item() == 0  # beyond the margin everywhere
    logits.requires_grad_(True)
    lovasz_hinge_loss(logits, targets).backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[:2].abs().sum() > 0


def test_a_cosine_schedule_sets_each_epochs_rates_resumes_in_step_and_is_never_stretched(tiny_data, tmp_path):
    """``lr_schedule: cosine`` (an options-study option of task 3): epoch 1 trains at the set rates, so it is the
    constant run's epoch 1, and the last epoch at a fraction of them; a killed run resumes where its schedule stood;
    asking a finished cosine run for more epochs would stretch the schedule it was trained on, so it is refused."""
    cfg = config(lr_schedule="cosine")
    straight = fit(model_for(cfg), tiny_data, cfg, tmp_path / "straight", verbose=False)
    rates = [group["lr"] for group in load_checkpoint(tmp_path / "straight" / "last.pt")["optimizer"]["param_groups"]]
    assert rates == pytest.approx([0.5 * cfg.decoder_lr, 0.5 * cfg.encoder_lr])  # epoch 2 of 2: half a cosine
    constant = fit(model_for(cfg), tiny_data, config(), tmp_path / "constant", verbose=False)
    pd.testing.assert_frame_equal(history(constant).iloc[:1], history(straight).iloc[:1], check_exact=True)
    assert not history(constant).iloc[1:].equals(history(straight).iloc[1:])

    run_dir = tmp_path / "killed"
    resumed = killed_then_resumed(cfg, tiny_data, run_dir)
    pd.testing.assert_frame_equal(history(resumed), history(straight), check_exact=True)

    with pytest.raises(CheckpointMismatch, match="schedule_epochs: 2 → 3"):
        fit(model_for(cfg), tiny_data, config(lr_schedule="cosine", epochs=3), run_dir, verbose=False)
    assert len(load_checkpoint(run_dir / "last.pt")["history"]) == 2  # nothing was changed


def test_the_cosine_factor_runs_from_one_to_near_zero_and_constant_is_one():
    factors = [learning_rate_factor("cosine", epoch, 20) for epoch in range(1, 21)]
    assert factors[0] == 1.0 and factors[10] == pytest.approx(0.5) and 0 < factors[-1] < 0.01
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert learning_rate_factor("constant", 7, 20) == 1.0
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        learning_rate_factor("step", 1, 20)


def test_a_weight_average_is_what_validation_judges_best_pt_keeps_and_a_resume_continues(tiny_data, tmp_path):
    """``weight_average: ema``: a running average of the weights (and batch-norm statistics) follows training; each
    epoch's validation scores it, ``best.pt`` holds it, and a run killed mid-epoch resumes to the uninterrupted one,
    the average included. A best.pt one write behind (a kill between the two writes) is mended from the average."""
    cfg = config(weight_average="ema")
    straight = fit(model_for(cfg), tiny_data, cfg, tmp_path / "straight", verbose=False)
    last = load_checkpoint(tmp_path / "straight" / "last.pt")
    best = load_checkpoint(tmp_path / "straight" / "best.pt")
    averaged = checkpoints.judged_weights(last)
    raw = fit(model_for(cfg), tiny_data, config(), tmp_path / "raw", verbose=False)
    assert not history(raw).equals(history(straight))  # the average, not the trained weights, was judged
    if straight.best_epoch == 2:
        assert all(torch.equal(best["model"][k], averaged[k]) for k in best["model"])
    assert any(not torch.equal(last["model"][k], averaged[k]) for k in averaged if averaged[k].is_floating_point())

    run_dir = tmp_path / "killed"
    resumed = killed_then_resumed(cfg, tiny_data, run_dir)
    pd.testing.assert_frame_equal(history(resumed), history(straight), check_exact=True)
    assert torch.equal(resumed.test.counts, straight.test.counts)

    state = load_checkpoint(run_dir / "last.pt")  # killed before best.pt was written for the last epoch's best
    state["best_epoch"] = len(state["history"])
    (run_dir / "best.pt").unlink()
    checkpoints.mend_best(state, model_for(cfg), state["fingerprint"], cfg, run_dir / "best.pt")
    mended = load_checkpoint(run_dir / "best.pt")["model"]
    assert all(torch.equal(mended[k], averaged[k]) for k in mended)


def test_the_weight_average_warms_up_so_a_short_run_is_not_held_back_by_its_first_steps():
    """d = min(0.99, (1 + n) / (10 + n)) after n updates: the first steps move the average most of the way, a long
    run's average moves 1 % a step; batch-norm's integer counters take the trained ones."""
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    ema_update(averaged, current, torch.tensor(1))
    assert averaged[0] == pytest.approx(torch.full((3,), 9 / 11))
    late = [torch.zeros(3)]
    ema_update(late, current, torch.tensor(10_000))
    assert late[0] == pytest.approx(torch.full((3,), 0.01))
    counters = [torch.tensor(4)]
    ema_update(counters, [torch.tensor(7)], torch.tensor(3))
    assert counters[0].item() == 7


def test_style_mixing_gives_each_image_a_mix_of_two_styles_and_keeps_its_content():
    """MixStyle: an image's per-channel mean and std become λ · its own + (1 − λ) · its partner's; what is left
    after removing them (the content) is its own. λ = 1 leaves it as it was."""
    torch.manual_seed(0)
    features = torch.randn(3, 4, 6, 6) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1) + torch.arange(3.0).view(
        3, 1, 1, 1
    )
    lam, partner = torch.tensor([1.0, 0.0, 0.25]), torch.tensor([2, 0, 1])
    mixed = mix_styles(features, lam, partner)

    def style(x):
        return x.mean(dim=(1, 2)), x.var(dim=(1, 2)).sqrt()

    def content(x):
        mean, std = style(x)
        return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)

    assert torch.allclose(mixed[0], features[0], atol=1e-5)
    for k in range(3):
        mean, std = style(mixed[k])
        own, other = style(features[k]), style(features[partner[k]])
        assert torch.allclose(mean, lam[k] * own[0] + (1 - lam[k]) * other[0], atol=1e-4)
        assert torch.allclose(std, lam[k] * own[1] + (1 - lam[k]) * other[1], atol=1e-4)
        assert torch.allclose(content(mixed[k]), content(features[k]), atol=1e-3)


def test_style_mixing_changes_only_the_training_forward_pass_of_the_encoders_early_blocks():
    """The mixing is a hook on the blocks of the encoder's first three skips for one forward pass: inside it the
    first skip's features are the plain ones with their styles mixed, after it (and in evaluation, where no draws are
    made) the network is the plain one. A batch of one has no partner and mixes nothing; the draws follow the
    generator (a resumed run draws the same)."""
    model = model_for(config()).eval()
    images = torch.randn(4, 3, 64, 64)
    lam, partner = torch.zeros(4), torch.tensor([1, 2, 3, 0])
    with torch.no_grad():
        plain_features, plain = model.encode(images), model(images)
        with mixed_styles(model, [{"lam": lam, "partner": partner}] * 3):
            mixed_features = model.encode(images)
        after = model(images)
    assert torch.allclose(mixed_features[0], mix_styles(plain_features[0], lam, partner), atol=1e-5)
    assert not torch.allclose(mixed_features[0], plain_features[0], atol=1e-2)
    assert not torch.equal(mixed_features[-1], plain_features[-1])  # the deeper blocks see it
    assert torch.equal(after, plain)
    assert all(not block._forward_hooks for block in model.encoder)
    assert draw_style_mixing(1, torch.Generator().manual_seed(0)) is None
    first = draw_style_mixing(8, torch.Generator().manual_seed(5))
    again = draw_style_mixing(8, torch.Generator().manual_seed(5))
    assert len(first) == 3 and [d is None for d in first] == [d is None for d in again]
    assert all(
        torch.equal(a["lam"], b["lam"]) and torch.equal(a["partner"], b["partner"]) for a, b in zip(first, again) if a
    )


def test_a_run_with_style_mixing_trains_otherwise_and_resumes_to_the_uninterrupted_one(tiny_data, tmp_path):
    """``style_mixing: mixstyle`` (an options-study option of task 3) changes what a run learns, and a run killed
    mid-epoch resumes to the uninterrupted one: its draws come from the run's seeded generator. A misspelt value is
    refused, not trained plainly."""
    cfg = config(style_mixing="mixstyle")
    straight = fit(model_for(cfg), tiny_data, cfg, tmp_path / "straight", verbose=False)
    plain = fit(model_for(cfg), tiny_data, config(), tmp_path / "plain", verbose=False)
    assert not history(plain).equals(history(straight))
    resumed = killed_then_resumed(cfg, tiny_data, tmp_path / "killed")
    pd.testing.assert_frame_equal(history(resumed), history(straight), check_exact=True)
    with pytest.raises(ValueError, match="style_mixing must be one of"):
        fit(model_for(cfg), tiny_data, config(style_mixing="mix_style"), tmp_path / "typo", verbose=False)
