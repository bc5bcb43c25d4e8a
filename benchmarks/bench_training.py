"""Benchmark (not a test): the naive pipeline vs this project's, side by side in ONE run, on the same images.

naive   : decode + resize every image every epoch (PIL, DataLoader), fp32, contiguous, default AdamW, batch 16,
          task 1 runs the frozen encoder on every batch; batches copied to the device one by one.
project : decode once into a uint8 tensor (on the device), batches sliced in memory, channels_last, fused AdamW,
          batch 32, precision "auto" (bf16 only where the hardware has native bf16, fp16 on an older GPU), task 1
          on cached encoder features; one read of the losses per epoch.

Prints the machine (CPU model and vector extensions, or the GPU), the fp32 and bf16 matmul peaks measured in this
run, images/s for a task 1 epoch, a task 2 epoch and a test-set evaluation, the speed-ups, and the achieved
GFLOP/s against the peak. On a CPU also: two seeds trained side by side in one-thread workers (the ``jobs``
parameter) against one two-thread process; where the hardware computes bf16 natively, the project's bf16 path
against its own fp32 path: speed, and a quality check that can fail (task 3's model trained the same epochs in
both precisions; it fails when fp32 did not learn, or when the low precision loses more than 0.02 test IoU).

    python benchmarks/bench_training.py [--train 128] [--test 96] [--device auto|cpu|cuda]
Uses $ISIC_SAMPLE_DIR/isic2016-train-512 (or ../shared/data beside the checkout) when present, else synthetic data.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from isic_utils.base.devices import (  # noqa: E402
    cpu_flags,
    cpu_has_native_bf16,
    cuda_has_native_bf16,
    device_name,
    resolve_device,
    resolve_precision,
    set_threads,
)
from isic_utils.config.params import TrainConfig  # noqa: E402
from isic_utils.data import decoding, sources, transforms  # noqa: E402
from isic_utils.data.synthetic import make_synthetic_isic  # noqa: E402
from isic_utils.model.networks import ENCODERS, build_model  # noqa: E402
from isic_utils.training.features import encode_variants  # noqa: E402
from isic_utils.training.loop import build_optimizer, evaluate, loss_fn, train_epoch  # noqa: E402


def find_images(n_train: int, n_test: int, sample_dir: str | Path | None = None):
    sample = sample_dir or os.environ.get("ISIC_SAMPLE_DIR") or (ROOT.parent / "shared" / "data")
    real = Path(sample) / "isic2016-train-512"
    if not sources.has_split(real, "train") and sources.has_split(Path(sample), "train"):
        real = Path(sample)
    if sources.has_split(real, "train"):
        pairs = sources.find_pairs(real, "train")
        return pairs[:n_train], pairs[n_train : n_train + n_test], f"real ISIC images from {real}"
    root = make_synthetic_isic(Path(tempfile.gettempdir()) / "isic-bench-synthetic", n_train, n_test)
    return sources.find_pairs(root, "train"), sources.find_pairs(root, "test"), "synthetic images (no real data found)"


class DecodeEveryTime(torch.utils.data.Dataset):
    """The naive data path: open, decode and resize the JPEG on every access."""

    def __init__(self, pairs, size, mean, std):
        self.pairs, self.size, self.mean, self.std = pairs, size, mean, std

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        from PIL import Image

        pair = self.pairs[k]
        image = Image.open(pair.image).convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        mask = decoding.read_mask(pair.mask, self.size).float()
        return transforms.normalize(image.unsqueeze(0), self.mean, self.std)[0], mask


def naive_epoch(model, loader, device: str, optimizer=None) -> None:
    criterion = loss_fn("bce")
    model.train(optimizer is not None)
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        if optimizer is None:
            with torch.no_grad():
                criterion(model(images), masks)
            continue
        loss = criterion(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str = "cpu") -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def matmul_peak(dtype, device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n×n matmul in ``dtype`` on ``device``, best of ``repeats`` (measured now, in this run)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    seconds = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / seconds / 1e9


def forward_gflop(module, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() / 1e9 / len(x)


def naive_rates(train_pairs, test_pairs, size: int, device: str) -> dict[str, float]:
    """Images/s of the naive loop: task 1 and task 2 training epochs, test evaluation."""
    rates = {}
    mean, std = ENCODERS["mobilenet_v2"].mean, ENCODERS["mobilenet_v2"].std
    for task, frozen in (("task1", True), ("task2", False)):
        torch.manual_seed(0)
        model = build_model(encoder_weights=None, freeze_encoder=frozen).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loader = torch.utils.data.DataLoader(DecodeEveryTime(train_pairs, size, mean, std), batch_size=16, shuffle=True)
        if device.startswith("cuda"):  # one warm-up batch so CUDA start-up is not counted
            naive_epoch(model, [next(iter(loader))], device, optimizer)
        rates[task] = len(train_pairs) / timed(lambda: naive_epoch(model, loader, device, optimizer), device)
    test_loader = torch.utils.data.DataLoader(DecodeEveryTime(test_pairs, size, mean, std), batch_size=16)
    rates["eval"] = len(test_pairs) / timed(lambda: naive_epoch(model, test_loader, device), device)
    return rates


def project_rates(
    train: decoding.DecodedSplit, test: decoding.DecodedSplit, device: str, precision: str, epochs: int = 1
) -> dict[str, float]:
    """Images/s of the project's own loop (after one warm-up epoch): task 1 on cached features, task 2, evaluation;
    also the cache's build time and, with ``epochs`` > 1, the validation IoU after that many epochs."""
    if device.startswith("cuda"):
        train = decoding.DecodedSplit(train.ids, train.images.to(device), train.masks.to(device), train.sizes)
        test = decoding.DecodedSplit(test.ids, test.images.to(device), test.masks.to(device), test.sizes)
    rates = {}
    for task, frozen in (("task1", True), ("task2", False)):
        torch.manual_seed(0)
        config = TrainConfig(
            freeze_encoder=frozen, batch_size=32, precision=precision, augment=("hflip", "vflip"), device=device
        )
        model = (
            build_model(encoder_weights=None, freeze_encoder=frozen).to(device).to(memory_format=torch.channels_last)
        )
        optimizer = build_optimizer(model, config)
        generator = torch.Generator().manual_seed(0)
        cache, cache_s = None, 0.0
        if frozen:
            model.eval()
            holder = {}
            cache_s = timed(
                lambda: holder.update(cache=encode_variants(model, train.images, config, precision)), device
            )
            cache = holder["cache"]
        train_epoch(model, train, optimizer, config, precision, generator, cache)  # warm-up (allocator, kernels)
        seconds = (
            timed(
                lambda: [
                    train_epoch(model, train, optimizer, config, precision, generator, cache) for _ in range(epochs)
                ],
                device,
            )
            / epochs
        )
        rates[task] = len(train) / seconds
        rates[task + "_cache_s"] = cache_s
        if not frozen:
            eval_config = TrainConfig(freeze_encoder=False, eval_batch_size=64, precision=precision, device=device)
            evaluate(model, test, eval_config, precision)
            holder = {}
            rates["eval"] = len(test) / timed(
                lambda: holder.update(e=evaluate(model, test, eval_config, precision)), device
            )
            rates["val_iou_after"] = holder["e"].summary()["iou_mean"]
    return rates


def _one_thread_worker(train: decoding.DecodedSplit) -> float:
    """Images/s of one task-2 epoch with one thread (after a warm-up epoch); run two at once to see ``jobs``."""
    torch.set_num_threads(1)
    return project_rates(train, train, "cpu", resolve_precision("auto"))["task2"]


def parallel_seeds_rate(train: decoding.DecodedSplit, jobs: int) -> float:
    """Total images/s of ``jobs`` one-thread processes training task 2 at the same time (the ``jobs`` parameter)."""
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(jobs)
    try:
        return sum(pool.map(_one_thread_worker, [train] * jobs))
    finally:
        pool.close()
        pool.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--test", type=int, default=96)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-parallel", action="store_true", help="skip the two-workers measurement (CPU)")
    parser.add_argument(
        "--quality",
        action="store_true",
        help="run the precision quality check even where bf16 is not native (slow there)",
    )
    parser.add_argument("--quality-epochs", type=int, default=6, help="epochs of the quality check's model")
    args = parser.parse_args()
    device = resolve_device(args.device)
    threads = set_threads()
    train_pairs, test_pairs, source = find_images(args.train, args.test)
    precision = resolve_precision("auto", device)
    cuda = device.startswith("cuda")
    native_bf16 = cuda_has_native_bf16() if cuda else cpu_has_native_bf16()
    print(f"machine: {device_name(device)}; {threads} CPU threads; torch {torch.__version__}")
    if not cuda:
        print(f"CPU vector extensions: {', '.join(cpu_flags()) or 'none of AVX2 / AVX-512 / AVX512-BF16 / AMX'}")
    print(f"data: {len(train_pairs)} train + {len(test_pairs)} test {source}; project precision (auto): {precision}")

    peak32 = matmul_peak(torch.float32, device, n=4096 if cuda else 2048)
    peak16 = matmul_peak(torch.bfloat16, device, n=4096 if cuda else (2048 if native_bf16 else 512))
    print(
        f"matmul peak measured now: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s "
        f"({'native' if native_bf16 else 'emulated'} bf16)"
    )

    torch.manual_seed(0)
    probe = build_model(encoder_weights=None)
    x = torch.zeros(1, 3, args.size, args.size)
    encoder_gf = forward_gflop(probe.encoder, x)
    decoder_gf = forward_gflop(probe.decoder, probe.encoder(x))
    work = {"task1": 3 * decoder_gf, "task2": 3 * (encoder_gf + decoder_gf), "eval": encoder_gf + decoder_gf}

    naive = naive_rates(train_pairs, test_pairs, args.size, device)
    holder = {}
    decode_s = timed(
        lambda: holder.update(
            train=decoding.decode_pairs(train_pairs, args.size, progress=False),
            test=decoding.decode_pairs(test_pairs, args.size, progress=False),
        )
    )
    train, test = holder["train"], holder["test"]
    ours = project_rates(train, test, device, precision)

    print(
        f"forward GFLOP per {args.size}px image: encoder {encoder_gf:.3f}, decoder {decoder_gf:.3f}; "
        f"training step ≈ 3× forward of what trains: task 1 {work['task1']:.2f}, task 2 {work['task2']:.2f}"
    )
    print(
        f"decode once: {len(train) + len(test)} images in {decode_s:.1f} s "
        f"({(len(train) + len(test)) / decode_s:.0f} images/s; cached on disk afterwards)\n"
    )
    peak = peak16 if precision in ("bf16", "fp16") else peak32
    print(
        f"{'':20s}{'naive img/s':>12s}{'project img/s':>15s}{'speed-up':>10s}{'project GFLOP/s':>17s}{'% of peak':>11s}"
    )
    for task, label in (("task1", "task 1 epoch"), ("task2", "task 2 epoch"), ("eval", "test evaluation")):
        gflops = ours[task] * work[task]
        print(
            f"{label:20s}{naive[task]:12.1f}{ours[task]:15.1f}{ours[task] / naive[task]:9.2f}x{gflops:17.1f}"
            f"{100 * gflops / peak:10.1f}%"
        )
    amortised = len(train) / (len(train) / ours["task1"] + ours["task1_cache_s"] / 20)
    print(
        f"{'task 1 incl. cache':20s}{naive['task1']:12.1f}{amortised:15.1f}{amortised / naive['task1']:9.2f}x"
        "   (feature cache built once, amortised over 20 epochs)"
    )
    print(
        f"\n% of peak is against the {'bf16' if peak is peak16 else 'fp32'} matmul peak (project precision "
        f"{precision})."
    )

    if not cuda and not args.no_parallel and threads >= 2:
        jobs = threads
        together = parallel_seeds_rate(train, jobs)
        print(
            f"\ntask 2, {jobs} seeds side by side (jobs={jobs}, one thread each): {together:.1f} img/s in all vs "
            f"{ours['task2']:.1f} img/s for one {threads}-thread process: {together / ours['task2']:.2f}x"
        )
    if (native_bf16 and precision != "fp32") or args.quality:
        epochs = 3
        fp32 = project_rates(train, test, device, "fp32", epochs)
        low = project_rates(train, test, device, precision, epochs)
        print(
            f"\n{precision} vs the project's own fp32 path ({epochs} task-2 epochs each, same seed): "
            f"{low['task2']:.1f} vs {fp32['task2']:.1f} img/s ({low['task2'] / fp32['task2']:.2f}x)"
        )
        scores = {name: quality_iou(train, test, device, name, args.quality_epochs) for name in ("fp32", precision)}
        passed, verdict = quality_verdict(scores["fp32"], scores[precision], precision)
        print(f"quality ({QUALITY_RUN}, {args.quality_epochs} epochs each, same seed): {verdict}")
        if not passed:
            sys.exit(1)


QUALITY_RUN = "task 3's U-Net, bce+dice"
LEARNED_ENOUGH = 0.30  # test IoU the fp32 model must reach for a comparison with it to mean anything
QUALITY_TOLERANCE = 0.02  # how far the low-precision model's test IoU may fall from fp32's


def quality_iou(
    train: decoding.DecodedSplit, test: decoding.DecodedSplit, device: str, precision: str, epochs: int
) -> float:
    """Mean per-image test IoU of task 3's model (U-Net decoder, bce+dice, its encoder weights when
    $ISIC_ENCODER_WEIGHTS names them) after ``epochs`` epochs in ``precision``, seeded: a model that learns in a
    benchmark's few epochs (the report decoder on a random encoder scores 0 in both precisions, which proved nothing)."""
    weights = os.environ.get("ISIC_ENCODER_WEIGHTS")
    torch.manual_seed(0)
    config = TrainConfig(
        freeze_encoder=False,
        batch_size=16,
        precision=precision,
        augment=("hflip", "vflip"),
        device=device,
        loss="bce+dice",
        decoder_lr=3e-3,
        encoder_lr=3e-4 if weights else 3e-3,
    )
    model = build_model(encoder_weights=weights, freeze_encoder=False, decoder="unet").to(device)
    optimizer = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        train_epoch(model, train, optimizer, config, precision, generator, None)
    eval_config = TrainConfig(freeze_encoder=False, eval_batch_size=64, precision=precision, device=device)
    return float(evaluate(model, test, eval_config, precision).summary()["iou_mean"])


def quality_verdict(fp32_iou: float, low_iou: float, precision: str) -> tuple[bool, str]:
    """(passed, a line): ``precision`` keeps the model's quality when fp32 learned (IoU ≥ ``LEARNED_ENOUGH``) and
    the low-precision IoU is within ``QUALITY_TOLERANCE`` below it; an fp32 model that learned nothing fails the
    check instead of passing it (0.0000 vs 0.0000 said nothing)."""
    line = f"test IoU {precision} {low_iou:.4f} vs fp32 {fp32_iou:.4f} (difference {low_iou - fp32_iou:+.4f})"
    if not fp32_iou >= LEARNED_ENOUGH:
        return False, (
            f"{line}: FAILED, fp32 did not learn (IoU below {LEARNED_ENOUGH}), so nothing can be judged; "
            "train longer (--quality-epochs) or set $ISIC_ENCODER_WEIGHTS"
        )
    if low_iou < fp32_iou - QUALITY_TOLERANCE:
        return False, f"{line}: FAILED, {precision} loses more than {QUALITY_TOLERANCE}"
    return True, f"{line}: passed (within {QUALITY_TOLERANCE})"


if __name__ == "__main__":
    main()
