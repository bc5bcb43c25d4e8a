"""Benchmark (not a test): what running each model costs, PyTorch eager against ONNX Runtime fp32 and int8, side by
side in ONE run on this machine, at one thread and batch 1.

For each checkpoint given (or, with none, each task's model with random weights: task 1 and 2's report decoder, task
3's U-Net): parameters, MFLOPs per image (torch's FLOP counter, multiply-adds counted as two), file size fp32 and
int8, batch-1 latency (median and inter-quartile range over repeats, after warm-up, the engines taken in turn) for
eager fp32, ONNX Runtime fp32 and int8, throughput at batch 16, and the speed-ups over eager: the comparison
chapter's own measure (``deploy.costs``), which also scores each format's JA on every set. int8 is calibrated on
the run's training images for a checkpoint, on random images for a random model (its latency, not its masks, is
what is measured then).

    python benchmarks/bench_deploy.py [CHECKPOINT ...] [--repeats 50] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from isic_utils.base.devices import device_name  # noqa: E402
from isic_utils.deploy import costs  # noqa: E402
from isic_utils.deploy import export as E  # noqa: E402
from isic_utils.model.inference import load_trained, model_meta  # noqa: E402
from isic_utils.model.networks import build_model  # noqa: E402


def random_checkpoint(folder: Path, decoder: str, size: int) -> Path:
    """A best.pt of a random-weight model (the architecture's cost does not depend on its weights)."""
    torch.manual_seed(0)
    model = build_model(encoder_weights=None, decoder=decoder, dropout=0.1)
    path = folder / decoder / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "meta": model_meta(model, size)}, path)
    return path


def quantised(fp32: Path, target: Path, size: int) -> None:
    """int8 on random images, for a model with no run to calibrate on."""
    from onnxruntime.quantization import CalibrationDataReader

    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = 8

        def get_next(self):
            self.left -= 1
            return {E.INPUT: rng.uniform(0, 255, (4, 3, size, size)).astype(np.float32)} if self.left >= 0 else None

    E.quantise(fp32, target, Reader())


def measure(checkpoint: Path, work: Path, repeats: int, name: str) -> dict:
    model, meta = load_trained(checkpoint)
    size = int(meta["image_size"])
    fp32 = work / f"{name}.onnx"
    E.export_checkpoint(checkpoint, fp32, overwrite=True)
    int8 = work / f"{name}-int8.onnx"
    try:
        E.export_checkpoint(checkpoint, int8, int8=True, overwrite=True, tolerance=1.0)
    except (E.CheckpointMismatch, E.DataError):  # no run folder or no data: calibrate on random images
        quantised(fp32, int8, size)
    row = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "MFLOPs / image": costs.mflops(E._Deployed(model, meta).eval(), size),
        "MB fp32": fp32.stat().st_size / 2**20,
        "MB int8": int8.stat().st_size / 2**20,
        **costs.speed(model, meta, {"ONNX fp32": fp32, "ONNX int8": int8}, repeats),
    }
    for fmt in costs.FORMATS[1:]:
        row[f"{fmt} speed-up"] = row["PyTorch eager ms"] / row[f"{fmt} ms"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path, help="best.pt files (default: random task models)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"machine: {device_name('cpu')}; one thread, batch 1 (throughput at batch 16); {args.repeats} repeats")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        chosen = args.checkpoints or [
            random_checkpoint(work, "report", args.size),
            random_checkpoint(work, "unet", args.size),
        ]
        names = [c.parent.parent.name if c.parent.name.startswith("seed") else c.parent.name for c in chosen]
        rows = [measure(c, work, args.repeats, n) for c, n in zip(chosen, names)]
    import pandas as pd

    table = pd.DataFrame(rows).set_index("model").T
    with pd.option_context("display.float_format", "{:,.2f}".format, "display.width", 160):
        print(table)
    for row in rows:
        print(
            f"{row['model']}: int8 {row['MB int8']:.1f} MB ({row['MB fp32'] / row['MB int8']:.1f}× smaller); batch-1 "
            f"latency {row['PyTorch eager ms']:.1f} ms eager, {row['ONNX fp32 ms']:.1f} ms ONNX fp32 "
            f"({row['ONNX fp32 speed-up']:.2f}×), {row['ONNX int8 ms']:.1f} ms int8 ({row['ONNX int8 speed-up']:.2f}×)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
