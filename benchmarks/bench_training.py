"""Benchmark (not a test): the naive pipeline vs this project's, side by side in ONE run, on the same images.

naive   : decode + resize every image every epoch (PIL, DataLoader), fp32, contiguous, default AdamW, batch 16,
          task 1 runs the frozen encoder on every batch.
project : decode once into a uint8 tensor, batches sliced in memory, channels_last, fused AdamW, batch 32,
          precision "auto" (bf16 only where the CPU has native bf16), task 1 on cached encoder features.

Prints images/s for a task 1 epoch, a task 2 epoch and a test-set evaluation, the speed-ups, and the achieved
GFLOP/s of the training step against the matmul peak measured in this run (fp32 and bf16).

    python benchmarks/bench_training.py [--train 128] [--test 96]
Uses $ISIC_SAMPLE_DIR/isic2016-train-512 (or ../shared/data beside the checkout) when present, else synthetic data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from isic_utils import data as D  # noqa: E402
from isic_utils.model import build_model  # noqa: E402
from isic_utils.synthetic import make_synthetic_isic  # noqa: E402
from isic_utils.training import (  # noqa: E402
    TrainConfig,
    build_optimizer,
    encode_all,
    evaluate,
    flip_variants,
    loss_fn,
    resolve_precision,
    set_threads,
    train_epoch,
)


def find_images(n_train: int, n_test: int):
    sample = os.environ.get("ISIC_SAMPLE_DIR") or (ROOT.parent / "shared" / "data")
    real = Path(sample) / "isic2016-train-512"
    if D.has_split(real, "train"):
        pairs = D.find_pairs(real, "train")
        return pairs[:n_train], pairs[n_train:n_train + n_test], f"real ISIC images from {real}"
    root = make_synthetic_isic(Path(tempfile.gettempdir()) / "isic-bench-synthetic", n_train, n_test)
    return D.find_pairs(root, "train"), D.find_pairs(root, "test"), "synthetic images (no real data found)"


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
        image = torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1)
        mask = D.read_mask(pair.mask, self.size).float()
        return D.normalize(image.unsqueeze(0), self.mean, self.std)[0], mask


def naive_epoch(model, loader, optimizer=None):
    criterion = loss_fn("bce")
    model.train(optimizer is not None)
    for images, masks in loader:
        if optimizer is None:
            with torch.no_grad():
                criterion(model(images), masks)
            continue
        loss = criterion(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak(dtype, n=2048, repeats=5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    seconds = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / seconds / 1e9


def forward_gflop(module, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() / 1e9 / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--test", type=int, default=96)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    threads = set_threads()
    train_pairs, test_pairs, source = find_images(args.train, args.test)
    precision = resolve_precision("auto")
    print(f"data: {len(train_pairs)} train + {len(test_pairs)} test {source}; {threads} threads; "
          f"project precision: {precision}")

    torch.manual_seed(0)
    probe = build_model(encoder_weights=None)
    x = torch.zeros(1, 3, args.size, args.size)
    encoder_gf = forward_gflop(probe.encoder, x)
    decoder_gf = forward_gflop(probe.decoder, probe.encoder(x))
    work = {"task1": 3 * decoder_gf, "task2": 3 * (encoder_gf + decoder_gf)}  # backward ≈ 2× forward
    mean, std = probe.spec.mean, probe.spec.std

    results = {}
    # ---------------- naive
    for task, frozen in (("task1", True), ("task2", False)):
        torch.manual_seed(0)
        model = build_model(encoder_weights=None, freeze_encoder=frozen)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loader = torch.utils.data.DataLoader(DecodeEveryTime(train_pairs, args.size, mean, std), batch_size=16,
                                             shuffle=True)
        results[("naive", task)] = len(train_pairs) / timed(lambda: naive_epoch(model, loader, optimizer))
    test_loader = torch.utils.data.DataLoader(DecodeEveryTime(test_pairs, args.size, mean, std), batch_size=16)
    results[("naive", "eval")] = len(test_pairs) / timed(lambda: naive_epoch(model, test_loader))

    # ---------------- project
    holder = {}
    decode_s = timed(lambda: holder.update(train=D.decode_pairs(train_pairs, args.size, progress=False),
                                           test=D.decode_pairs(test_pairs, args.size, progress=False)))
    train, test = holder["train"], holder["test"]
    for task, frozen in (("task1", True), ("task2", False)):
        torch.manual_seed(0)
        config = TrainConfig(freeze_encoder=frozen, batch_size=32, precision=precision, augment=("hflip", "vflip"))
        model = build_model(encoder_weights=None, freeze_encoder=frozen).to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, config)
        generator = torch.Generator().manual_seed(0)
        cache = None
        cache_s = 0.0
        if frozen:
            model.eval()
            cache_s = timed(lambda: holder.update(cache=[encode_all(model, train.images, precision, "cpu", 64, True, h, v)
                                                         for h, v in flip_variants(config.augment)]))
            cache = holder["cache"]
        train_epoch(model, train, optimizer, config, precision, generator, cache)  # warm-up (allocator, kernels)
        seconds = timed(lambda: train_epoch(model, train, optimizer, config, precision, generator, cache))
        results[("project", task)] = len(train) / seconds
        results[("project", task + " +cache/20")] = len(train) / (seconds + cache_s / 20) if frozen else None
    eval_config = TrainConfig(freeze_encoder=False, eval_batch_size=64, precision=precision)
    evaluate(model, test, eval_config, precision)
    results[("project", "eval")] = len(test) / timed(lambda: evaluate(model, test, eval_config, precision))

    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, n=1024 if precision == "fp32" else 2048)
    print(f"\nmatmul peak measured now: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    print(f"forward GFLOP per {args.size}px image: encoder {encoder_gf:.3f}, decoder {decoder_gf:.3f}; "
          f"training step ≈ 3× forward of what trains: task 1 {work['task1']:.2f}, task 2 {work['task2']:.2f}")
    print(f"decode once: {len(train) + len(test)} images in {decode_s:.1f} s "
          f"({(len(train) + len(test)) / decode_s:.0f} images/s; cached on disk afterwards)\n")
    print(f"{'':18s}{'naive img/s':>12s}{'project img/s':>15s}{'speed-up':>10s}{'project GFLOP/s':>17s}{'% of peak':>11s}")
    peak = peak16 if precision == "bf16" else peak32
    for task in ("task1", "task2", "eval"):
        naive, ours = results[("naive", task)], results[("project", task)]
        if task == "eval":
            gflops = ours * (encoder_gf + decoder_gf)
        else:
            gflops = ours * work[task]
        label = {"task1": "task 1 epoch", "task2": "task 2 epoch", "eval": "test evaluation"}[task]
        print(f"{label:18s}{naive:12.1f}{ours:15.1f}{ours / naive:9.2f}x{gflops:17.1f}{100 * gflops / peak:10.1f}%")
    amortised = results[("project", "task1 +cache/20")]
    print(f"{'task 1 incl. cache':18s}{results[('naive', 'task1')]:12.1f}{amortised:15.1f}"
          f"{amortised / results[('naive', 'task1')]:9.2f}x   (feature cache built once, amortised over 20 epochs)")
    print(f"\nproject precision {precision} (auto): peak used for % is {'bf16' if precision == 'bf16' else 'fp32'}")


if __name__ == "__main__":
    main()
