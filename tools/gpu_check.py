"""The GPU check: one prepared script that proves the CUDA path (no papermill needed; torch, torchvision, pandas,
pyyaml, pillow are enough).

On a CUDA machine it runs, in order, and prints one table at the end:
1. the tiny profile's tasks 1–3 through the report's own ``train_run`` (every file a chapter reads is written);
2. determinism: task 2 twice with the same seed and ``deterministic`` → identical histories;
3. kill and resume: task 2 killed in epoch 2 and resumed, against an uninterrupted run → identical histories
   (the CUDA random stream travels in the checkpoint);
4. with ``--data``: tasks 1–3 on real images (``isic2016_holdout`` profile: 20% of the ids held out as test),
   ``--epochs`` epochs each, images/s of training and evaluation, the 20-epoch time and the peak GPU memory;
5. the benchmark: naive loop vs the project, same images, same run (``benchmarks/bench_training.py``);
6. what running each architecture costs on the device (the comparison chapter's deployment table, for CUDA): PyTorch
   eager batch-1 latency (median ± IQR over repeats, synchronised) and throughput at batch 16, in fp32 and in the
   precision ``auto`` resolves to, at 128 px (ONNX Runtime's CUDA engine too, when onnxruntime-gpu is installed).

With no CUDA device it says so and exits 0. ``--device cpu --quick`` rehearses every step on the CPU in a minute
or two (the test suite does, so the script cannot rot while no GPU is at hand).

    python tools/gpu_check.py [--data ../shared/data/isic2016-train-512] [--weights mobilenet_v2_imagenet.pth]
    make gpu-check DATA_DIR=... WEIGHTS=...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--data", default="", help="real images in the official training layout (optional)")
    parser.add_argument("--weights", default="", help="ImageNet mobilenet_v2 state_dict (else $ISIC_ENCODER_WEIGHTS)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per task on the real images")
    parser.add_argument("--out", default="", help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a CPU rehearsal)")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "nothing was checked. Run it on a machine with an NVIDIA GPU (in Colab: Runtime → Change runtime "
            "type → GPU)."
        )
        return 0
    if args.weights:
        os.environ["ISIC_ENCODER_WEIGHTS"] = str(Path(args.weights).resolve())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any GPU work, for the determinism check

    from isic_utils.base.devices import device_name, resolve_precision

    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    device = args.device
    print(
        f"gpu_check on {device_name(device)}: torch {torch.__version__}, CUDA {torch.version.cuda}, precision "
        f"auto → {resolve_precision('auto', device)}; runs under {out}",
        flush=True,
    )
    rows: list[dict] = []
    start = time.perf_counter()
    for step in (tiny_tasks, determinism, kill_and_resume, real_tasks, benchmark, deployment):
        t0 = time.perf_counter()
        try:
            new = step(args, out, device)
        except Exception as exc:  # one failed check must not hide the others
            new = [{"check": step.__name__, "result": f"FAILED: {type(exc).__name__}: {exc}"}]
        rows += new
        for row in new:  # as each step ends: a check stopped at a time limit still says what it measured
            shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(f"gpu_check: {shown}", flush=True)
        print(f"gpu_check: {step.__name__} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(rows, device, time.perf_counter() - start)
    return 1 if any(str(r.get("result", "")).startswith("FAILED") for r in rows) else 0


# ----------------------------------------------------------------------------- the checks


def _params(task: str, profile: str, out: Path, device: str, **overrides):
    from isic_utils.config import params as P

    values = {"output_dir": str(out / profile), "device": device, "seeds": [0], **overrides}
    if profile == "tiny":
        values["data_dir"] = str(out / "data" / "tiny")
    return P.resolve("train", run_file=ROOT / "params" / f"{task}.yaml", profile=profile, overrides=values, root=ROOT)


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _run_rows(label: str, params: dict, data, device: str) -> dict:
    """Train one run with the report's own ``train_run``; its row of the table."""
    from isic_utils.training import experiments

    _peak_reset(device)
    t0 = time.perf_counter()
    run = experiments.train_run(params, data, verbose=True)
    seconds = time.perf_counter() - t0
    fitted = run.fits[params["seeds"][0]]
    history = fitted.history
    epochs = history.tail(max(1, len(history) - 1))  # the first epoch includes start-up (kernels, cuDNN tuning)
    evaluated = len(data.val) + (len(data.test) if params["monitor_test"] else 0)
    per_epoch = float(epochs["epoch_seconds"].median()) + fitted.timings["checkpoint_s"] / max(1, len(history))
    return {
        "check": label,
        "device": fitted.trained_on["device"],
        "precision": fitted.precision,
        "train img/s": len(data.train) / float(epochs["train_seconds"].median()),
        "eval img/s": evaluated / float(epochs["eval_seconds"].median()),
        "epoch s": per_epoch,
        "20 epochs s": fitted.timings["feature_cache_s"] + 20 * per_epoch,
        "wall s": seconds,
        "peak GiB": _peak_gib(device),
        "result": f"test JA {run.results[0]['test_orig']['iou_mean']:.4f} ({len(history)} epochs, "
        f"{len(data.train)} train / {evaluated} evaluated an epoch)",
    }


def tiny_tasks(args, out: Path, device: str) -> list[dict]:
    from isic_utils.training import experiments

    rows = []
    for task in ("task1", "task2", "task3"):
        params = _params(task, "tiny", out, device, **({"epochs": 1} if args.quick else {}))
        rows.append(_run_rows(f"tiny {task}", params, experiments.prepare_data(params, progress=False), device))
    return rows


def _tiny_fit(out: Path, device: str, name: str, on_step=None, resume: bool = False, epochs: int = 3):
    from isic_utils.training import experiments

    params = _params("task2", "tiny", out, device, deterministic=True)
    data = experiments.prepare_data(params, progress=False)
    model, _ = experiments.make_model(params, seed=0)
    config = experiments.train_config(params, seed=0)
    config.epochs = epochs
    from isic_utils.training.loop import fit

    return fit(model, data, config, out / "checks" / name, on_step=on_step, resume=resume, verbose=False)


def _same(a, b) -> tuple[bool, float]:
    from isic_utils.training.loop import TIMING_COLUMNS

    left = a.history.drop(columns=list(TIMING_COLUMNS))
    right = b.history.drop(columns=list(TIMING_COLUMNS))
    difference = float((left - right).abs().max().max())
    return left.equals(right), difference


def determinism(args, out: Path, device: str) -> list[dict]:
    epochs = 2 if args.quick else 3
    first = _tiny_fit(out, device, "same-seed-a", epochs=epochs)
    second = _tiny_fit(out, device, "same-seed-b", epochs=epochs)
    same, difference = _same(first, second)
    return [
        {
            "check": "same seed twice (deterministic)",
            "device": device,
            "precision": first.precision,
            "result": "identical histories" if same else f"DIFFERENT (largest difference {difference:.2e})",
        }
    ]


def kill_and_resume(args, out: Path, device: str) -> list[dict]:
    epochs = 2 if args.quick else 3  # killed in epoch 2 either way
    # the uninterrupted run: determinism's first run, resumed when it is there (nothing trained twice), else trained
    straight = _tiny_fit(out, device, "same-seed-a", resume=True, epochs=epochs)

    def kill(epoch, step):
        if epoch == 2 and step == 1:
            raise KeyboardInterrupt("simulated kill")

    try:
        _tiny_fit(out, device, "killed", on_step=kill, epochs=epochs)
    except KeyboardInterrupt:
        pass
    resumed = _tiny_fit(out, device, "killed", resume=True, epochs=epochs)
    same, difference = _same(straight, resumed)
    return [
        {
            "check": "killed in epoch 2, resumed",
            "device": device,
            "precision": resumed.precision,
            "result": "identical to the uninterrupted run"
            if same
            else f"DIFFERENT (largest difference {difference:.2e})",
        }
    ]


def real_tasks(args, out: Path, device: str) -> list[dict]:
    from isic_utils.training import experiments

    if not args.data:
        return [{"check": "real images", "result": "skipped (no --data)"}]
    rows = []
    extra = {"data_dir": str(Path(args.data).resolve()), "epochs": 2 if args.quick else args.epochs}
    if args.quick:
        extra["limit"] = 40
    for task in ("task1", "task2", "task3"):
        params = _params(task, "isic2016_holdout", out, device, **extra)
        data = experiments.prepare_data(params, progress=False)
        rows.append(_run_rows(f"real {task}", params, data, device))
    return rows


def benchmark(args, out: Path, device: str) -> list[dict]:
    import bench_training as B

    from isic_utils.base.devices import resolve_precision
    from isic_utils.data.decoding import decode_pairs

    n_train, n_test = (8, 8) if args.quick else (256, 128)
    train_pairs, test_pairs, source = B.find_images(n_train, n_test, args.data or None)
    precision = resolve_precision("auto", device)
    naive = B.naive_rates(train_pairs, test_pairs, 128, device)
    train = decode_pairs(train_pairs, 128, progress=False)
    test = decode_pairs(test_pairs, 128, progress=False)
    _peak_reset(device)
    ours = B.project_rates(train, test, device, precision)
    rows = []
    for task in ("task1", "task2", "eval"):
        rows.append(
            {
                "check": f"bench {task}",
                "device": device,
                "precision": precision,
                "train img/s" if task != "eval" else "eval img/s": ours[task],
                "peak GiB": _peak_gib(device),
                "result": f"naive {naive[task]:.1f} img/s → project {ours[task]:.1f}: "
                f"{ours[task] / naive[task]:.2f}x ({len(train_pairs)}/{len(test_pairs)} {source})",
            }
        )
    return rows


def deployment(args, out: Path, device: str) -> list[dict]:
    """Batch-1 latency and batch-16 throughput of each architecture on ``device`` (random weights: the cost of
    running a model does not depend on them), timed as the comparison chapter times (``deploy.costs``)."""
    import torch

    from isic_utils.base.devices import autocast, resolve_precision
    from isic_utils.deploy.costs import BATCH, timed_in_turn
    from isic_utils.model.networks import build_model

    size, repeats = (64, 5) if args.quick else (128, 50)
    rows = []
    for decoder, tasks in (("report", "tasks 1-2"), ("unet", "task 3")):
        torch.manual_seed(0)
        model = build_model(encoder_weights=None, decoder=decoder, dropout=0.1).to(device).eval()
        for precision in dict.fromkeys(("fp32", resolve_precision("auto", device))):
            inputs = {n: torch.rand(n, 3, size, size, device=device) for n in (1, BATCH)}

            def run(n: int, precision=precision, model=model, inputs=inputs):
                with torch.inference_mode(), autocast(precision, device):
                    model(inputs[n])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()

            one = timed_in_turn({"one": lambda: run(1)}, repeats)["one"]
            batch = timed_in_turn({"batch": lambda: run(BATCH)}, max(3, repeats // 5), warmup=1)["batch"]
            rows.append(
                {
                    "check": f"deploy {decoder} ({tasks})",
                    "device": device,
                    "precision": precision,
                    "batch-1 ms": one[0],
                    f"img/s at {BATCH}": BATCH * 1000 / batch[0],
                    "result": f"PyTorch eager, {size} px: {one[0]:.2f} ± {one[1]:.2f} ms at batch 1, "
                    f"{BATCH * 1000 / batch[0]:.0f} images/s at batch {BATCH}",
                }
            )
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if (
        device.startswith("cuda")
        and onnxruntime is not None
        and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    ):
        rows += _onnx_cuda(out, size, repeats)
    return rows


def _onnx_cuda(out: Path, size: int, repeats: int) -> list[dict]:
    """ONNX Runtime's CUDA engine on each architecture's fp32 export (onnxruntime-gpu installed)."""
    import numpy as np
    import onnxruntime
    import torch

    from isic_utils.deploy.costs import timed_in_turn
    from isic_utils.model.networks import build_model

    rows = []
    for decoder in ("report", "unet"):
        torch.manual_seed(0)
        model = build_model(encoder_weights=None, decoder=decoder, dropout=0.1).eval()
        path = out / f"deploy-{decoder}.onnx"
        torch.onnx.export(
            model,
            (torch.rand(1, 3, size, size),),
            str(path),
            input_names=["image"],
            dynamic_axes={"image": {0: "batch"}},
            dynamo=False,
        )
        session = onnxruntime.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        median, spread = timed_in_turn({"one": lambda: session.run(None, {"image": x})}, repeats)["one"]
        rows.append(
            {
                "check": f"deploy {decoder} (ONNX Runtime CUDA)",
                "device": "cuda",
                "precision": "fp32",
                "batch-1 ms": median,
                "result": f"ONNX Runtime CUDA, {size} px: {median:.2f} ± {spread:.2f} ms at batch 1",
            }
        )
    return rows


def print_table(rows: list[dict], device: str, seconds: float) -> None:
    import pandas as pd

    table = pd.DataFrame(rows)
    columns = [
        "check",
        "device",
        "precision",
        "train img/s",
        "eval img/s",
        "epoch s",
        "20 epochs s",
        "peak GiB",
        "batch-1 ms",
        "img/s at 16",
        "result",
    ]
    table = table[[c for c in columns if c in table.columns]]
    with pd.option_context("display.max_colwidth", 120, "display.width", 250):
        print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep=""))
    print(f"\ngpu_check: {len(rows)} rows on {device} in {seconds / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
