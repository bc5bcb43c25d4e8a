"""Benchmark (not a test): what running each model costs, PyTorch eager against ONNX Runtime fp32 and int8, side by
side in ONE run on this machine, at one thread and batch 1.

For each checkpoint given (or, with none, each task's model with random weights: task 1 and 2's report decoder, task
3's U-Net): parameters, MFLOPs per image (torch's FLOP counter, multiply-adds counted as two), file size fp32 and
int8, batch-1 latency (median and inter-quartile range over repeats, after warm-up) for eager fp32, ONNX Runtime
fp32 and int8, throughput at batch 16, and the speed-ups over eager. int8 is calibrated on the run's training images
for a checkpoint, on random images for a random model (its latency, not its masks, is what is measured then).
The JA each format scores is the export's business (``export --int8`` measures it on validation).

    python benchmarks/bench_deploy.py [CHECKPOINT ...] [--repeats 50] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from isic_utils.base.devices import device_name  # noqa: E402
from isic_utils.deploy import export as E  # noqa: E402
from isic_utils.deploy import predictor as R  # noqa: E402
from isic_utils.model.inference import load_trained, model_meta  # noqa: E402
from isic_utils.model.networks import build_model  # noqa: E402


def timed(run, repeats: int) -> tuple[float, float]:
    """(median, inter-quartile range) of ``run()``'s wall time in ms, after three warm-up calls."""
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return float(median), float(q3 - q1)


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


def mflops(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e6


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
    one = torch.rand(1, 3, size, size) * 255
    batch = torch.rand(16, 3, size, size) * 255
    deployed = E._Deployed(model, meta).eval()
    sessions = {fmt: R.session(path, threads=1) for fmt, path in (("onnx fp32", fp32), ("onnx int8", int8))}

    def eager(x):
        with torch.inference_mode():
            deployed(x)

    def onnx(fmt, x):
        sessions[fmt].run([R.OUTPUT], {R.INPUT: x.numpy()})

    row = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "MFLOPs / image": mflops(deployed, size),
        "MB fp32": fp32.stat().st_size / 2**20,
        "MB int8": int8.stat().st_size / 2**20,
    }
    for fmt, run in (
        ("eager", eager),
        ("onnx fp32", lambda x: onnx("onnx fp32", x)),
        ("onnx int8", lambda x: onnx("onnx int8", x)),
    ):
        median, spread = timed(lambda run=run: run(one), repeats)
        row[f"{fmt} ms"], row[f"{fmt} IQR ms"] = median, spread
        batch_median, _ = timed(lambda run=run: run(batch), max(5, repeats // 5))
        row[f"{fmt} images/s at 16"] = 16000 / batch_median
    row["onnx fp32 speed-up"] = row["eager ms"] / row["onnx fp32 ms"]
    row["onnx int8 speed-up"] = row["eager ms"] / row["onnx int8 ms"]
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
            f"latency {row['eager ms']:.1f} ms eager, {row['onnx fp32 ms']:.1f} ms ONNX fp32 "
            f"({row['onnx fp32 speed-up']:.2f}×), {row['onnx int8 ms']:.1f} ms int8 ({row['onnx int8 speed-up']:.2f}×)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
