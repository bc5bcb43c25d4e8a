"""What deploying each run costs, measured in one run on this machine: for a run's selected checkpoint (its lowest
seed), exported to ONNX fp32 and int8, the parameters, MFLOPs per image, file sizes, batch-1 latency on one CPU
thread (median and inter-quartile range over repeats, the three engines taken in turn so that none sees a quieter
machine), throughput at a batch, and the JA each format scores on the test set and each external set at original
size — with how many pixels of the fp32 and int8 masks differ from PyTorch's.

The exports are written once per checkpoint under ``outputs/<profile>/deploy/<run>/`` (made again when the
checkpoint changes); int8 is measured whatever it costs, and the table says whether ``export --int8`` would offer it
(validation JA within the tolerance).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..base.devices import device_name
from ..base.files import atomic_path, save_table
from ..config.params import absolute
from ..evaluation.external import external_sets, load_external
from ..model.inference import load_trained, predicted_probabilities
from ..scoring import metrics
from ..training.experiments import load_run, prepare_data
from .export import INT8_TOLERANCE, QUANTISATION, _Deployed, export_checkpoint, onnx_probabilities
from .predictor import INPUT, OUTPUT, session

FORMATS = ("PyTorch eager", "ONNX fp32", "ONNX int8")
BATCH = 16  # the batch the throughput is measured at
EXPORTED = "exported.json"  # which checkpoint the files beside it were exported from


def mflops(model: torch.nn.Module, size: int) -> float:
    """Millions of floating-point operations for one ``size``×``size`` image (torch's counter: a multiply-add is
    two)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e6


def timed_in_turn(runs: dict, repeats: int, warmup: int = 3) -> dict[str, tuple[float, float]]:
    """Wall time in ms of each ``runs[name]()``: (median, inter-quartile range) over ``repeats`` rounds, each round
    calling every one once in turn (after ``warmup`` rounds), so a busy moment of the machine falls on all alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    out = {}
    for name, values in times.items():
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        out[name] = (float(median), float(q3 - q1))
    return out


def exported(checkpoint: Path, folder: Path) -> tuple[Path, Path, dict]:
    """``checkpoint`` as ``folder/<name>.onnx`` and ``<name>-int8.onnx`` (exported again only when the checkpoint
    changed since); returns the two files and their record: ``from`` (what they were exported from) and ``int8``
    (what int8 measured on validation)."""
    fp32, int8 = folder / "model.onnx", folder / "model-int8.onnx"
    stamp = {
        "checkpoint": checkpoint.name,
        "seed folder": checkpoint.parent.name,
        "mtime_ns": checkpoint.stat().st_mtime_ns,
        "quantisation": QUANTISATION,
    }
    record = folder / EXPORTED
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = {}
    if saved.get("from") != stamp or not fp32.is_file() or not int8.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        export_checkpoint(checkpoint, fp32, overwrite=True)
        _, meta = export_checkpoint(checkpoint, int8, int8=True, overwrite=True, tolerance=1.0)
        saved = {"from": stamp, "int8": meta["int8"]}
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps(saved, indent=1))
    return fp32, int8, saved


def speed(model: torch.nn.Module, meta: dict, files: dict[str, Path], repeats: int) -> dict:
    """Batch-1 latency (median, IQR) and throughput at ``BATCH`` for PyTorch eager and each ONNX file, one thread."""
    size = int(meta["image_size"])
    deployed = _Deployed(model, meta).eval()
    sessions = {name: session(path, threads=1) for name, path in files.items()}
    generator = torch.Generator().manual_seed(0)
    one, batch = (torch.rand(n, 3, size, size, generator=generator) * 255 for n in (1, BATCH))

    def runner(name: str, x: torch.Tensor):
        if name == FORMATS[0]:

            def run():
                with torch.inference_mode():
                    deployed(x)

            return run
        array = x.numpy()
        return lambda: sessions[name].run([OUTPUT], {INPUT: array})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = timed_in_turn({name: runner(name, one) for name in FORMATS}, repeats)
        batched = timed_in_turn({name: runner(name, batch) for name in FORMATS}, max(3, repeats // 5), warmup=1)
    finally:
        torch.set_num_threads(threads)
    row = {}
    for name in FORMATS:
        row[f"{name} ms"], row[f"{name} IQR ms"] = single[name]
        row[f"{name} images/s at {BATCH}"] = BATCH * 1000 / batched[name][0]
    return row


def formats_ja(
    model: torch.nn.Module, meta: dict, files: dict[str, Path], split, set_name: str, run: str
) -> list[dict]:
    """Each format's mean per-image JA on ``split`` at original size (the run's own threshold, post-processing and
    test-time flips), and the share of pixels where its mask differs from PyTorch's."""
    maps = {FORMATS[0]: predicted_probabilities(model, meta, split.images)}
    maps.update({name: onnx_probabilities(path, meta, split.images) for name, path in files.items()})
    threshold, post = meta["threshold"], meta["postprocess"]
    counts = metrics.original_size_counts(list(maps.values()), split, threshold, post)
    differing = dict.fromkeys(FORMATS, 0)
    total = 0
    for k, size in enumerate(split.sizes):  # PyTorch's mask once per image, each export's against it
        ours = metrics.full_size_mask(maps[FORMATS[0]][k : k + 1], size, threshold, post)
        total += ours.numel()
        for name in FORMATS[1:]:
            differing[name] += int((metrics.full_size_mask(maps[name][k : k + 1], size, threshold, post) != ours).sum())
    rows = []
    for name, count in zip(maps, counts):
        rows.append(
            {
                "run": run,
                "data": set_name,
                "images": len(split),
                "format": name,
                "JA": float(metrics.scores(count)["iou"].mean()),
                "pixels unlike PyTorch's": differing[name] / total if total else 0.0,
            }
        )
    return rows


@dataclass
class DeployResult:
    cost: pd.DataFrame  # a row per run: parameters, MFLOPs, sizes, latency, throughput
    ja: pd.DataFrame  # a row per run, set and format: JA, pixels unlike PyTorch's (the machine: cost's column)
    reading: str


MEASURED = "measured.json"  # a run's measurements, beside its exports: kept while what they measured is unchanged


def measure_run(params: dict, name: str, repeats: int, progress: bool = False) -> tuple[dict, list[dict]]:
    """One run's cost row and JA rows: measured again only when its exports, ``repeats`` or the external sets
    changed (a chapter rerun, Run All in JupyterLab, rewrites nothing)."""
    output = absolute(params["output_dir"])
    run = load_run(params["output_dir"], name)
    seed = int(run.seeds["seed"].min())
    checkpoint = run.run_dir / f"seed{seed}" / "best.pt"
    folder = output / "deploy" / name
    fp32, int8, made = exported(checkpoint, folder)
    int8_measured = made["int8"]
    sets = [external for external in external_sets(params) if external.found]
    key = {
        "exported": made["from"],
        "repeats": repeats,
        "sets": [s.name for s in sets],
    }
    record = folder / MEASURED
    try:
        saved = json.loads(record.read_text())
        if saved.get("key") == key:
            return saved["cost"], saved["ja"]
    except (OSError, ValueError):
        pass
    model, meta = load_trained(checkpoint)
    size = int(meta["image_size"])
    files = {FORMATS[1]: fp32, FORMATS[2]: int8}
    loss = int8_measured["validation JA fp32"] - int8_measured["validation JA int8"]
    cost = {
        "run": name,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "MFLOPs / image": mflops(_Deployed(model, meta).eval(), size),
        "image size": size,
        "MB fp32": fp32.stat().st_size / 2**20,
        "MB int8": int8.stat().st_size / 2**20,
        "int8 validation JA cost": loss,
        "int8 offered by export": bool(loss <= INT8_TOLERANCE),
        **speed(model, meta, files, repeats),
        "machine": device_name("cpu"),
    }
    data = prepare_data({**run.info["params"], "output_dir": params["output_dir"]}, progress)
    ja = formats_ja(model, meta, files, data.test, "ISIC test", name)
    known = {*data.train.ids, *data.val.ids, *data.test.ids}
    for external in sets:
        split, _ = load_external(external, size, output.parent / "cache", progress, known)
        if split is not None:
            ja += formats_ja(model, meta, files, split, external.name, name)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({"key": key, "cost": cost, "ja": ja}, indent=1))
    return cost, ja


def deployment_costs(params: dict, runs: list[str], out_dir: Path, repeats: int = 30, progress: bool = False):
    """Every run (its lowest seed's ``best.pt``) exported to ONNX fp32 and int8 and measured (``measure_run``);
    ``deploy_cost`` and ``deploy_ja`` saved under ``out_dir``; returns a ``DeployResult``."""
    cost_rows, ja_rows = [], []
    for name in runs:
        cost, ja = measure_run(params, name, repeats, progress)
        cost_rows.append(cost)
        ja_rows += ja
    cost = pd.DataFrame(cost_rows)
    ja = pd.DataFrame(ja_rows)[["run", "data", "images", "format", "JA", "pixels unlike PyTorch's"]]
    save_table(cost, out_dir, "deploy_cost")
    save_table(ja, out_dir, "deploy_ja")
    return DeployResult(cost, ja, deploy_reading(cost, ja))


def cost_view(cost: pd.DataFrame) -> pd.DataFrame:
    """The cost table as a chapter shows it: latency as median ± IQR, speed-ups over eager."""
    view = cost[["run", "parameters", "MFLOPs / image", "MB fp32", "MB int8"]].copy()
    eager = cost[f"{FORMATS[0]} ms"]
    for name in FORMATS:
        view[f"{name}: ms (batch 1)"] = [
            f"{m:.1f} ± {s:.1f}" for m, s in zip(cost[f"{name} ms"], cost[f"{name} IQR ms"])
        ]
        if name != FORMATS[0]:
            view[f"{name}: × eager"] = eager / cost[f"{name} ms"]
    for name in FORMATS:
        view[f"{name}: images/s at {BATCH}"] = cost[f"{name} images/s at {BATCH}"]
    view["int8: validation JA cost"] = cost["int8 validation JA cost"]
    view["int8 offered"] = cost["int8 offered by export"].map({True: "yes", False: "no (over tolerance)"})
    return view


def ja_view(ja: pd.DataFrame) -> pd.DataFrame:
    """JA per format side by side: a row per run and set, a column per format, and the pixels int8 changes."""
    wide = ja.pivot_table(index=["run", "data", "images"], columns="format", values="JA", sort=False)[list(FORMATS)]
    wide.columns = [f"JA {name}" for name in FORMATS]
    unlike = ja.pivot_table(
        index=["run", "data", "images"], columns="format", values="pixels unlike PyTorch's", sort=False
    )
    for name in FORMATS[1:]:
        wide[f"{name}: % pixels unlike PyTorch"] = 100 * unlike[name]
    return wide.reset_index()


def deploy_sentence(cost: pd.DataFrame) -> str:
    """One sentence for the index: the fastest format of each run on one thread, its size, and the speed-up."""
    parts = []
    for _, row in cost.iterrows():
        fastest = min(FORMATS, key=lambda name: row[f"{name} ms"])
        size = row["MB int8"] if fastest == FORMATS[2] else row["MB fp32"]
        parts.append(
            f"{row['run']} {row[f'{fastest} ms']:.0f} ms as {fastest} ({size:.1f} MB, "
            f"{row[f'{FORMATS[0]} ms'] / row[f'{fastest} ms']:.1f}× PyTorch eager)"
        )
    return f"Deployed, one image on one CPU thread ({cost['machine'].iloc[0]}) takes: " + "; ".join(parts) + "."


def deploy_reading(cost: pd.DataFrame, ja: pd.DataFrame) -> str:
    """What the numbers say, in words: size, speed-up and JA change of each format, per run."""
    if cost.empty:
        return "No run was measured."
    machine = cost["machine"].iloc[0] if "machine" in cost else "this machine"
    lines = [f"Measured on {machine}, one thread, batch 1."]
    for _, row in cost.iterrows():
        rows = ja[ja["run"] == row["run"]]
        by = rows.pivot_table(index="data", columns="format", values="JA", sort=False)
        worst = {
            name: float((by[name] - by[FORMATS[0]]).abs().max()) if name in by else float("nan") for name in FORMATS[1:]
        }
        eager, fp32, int8 = (row[f"{name} ms"] for name in FORMATS)
        loss = row["int8 validation JA cost"]
        lines.append(
            f"**{row['run']}** ({row['parameters'] / 1e6:.1f} M parameters, {row['MFLOPs / image']:,.0f} MFLOPs per "
            f"{int(row['image size'])}-px image): ONNX Runtime fp32 runs it {eager / fp32:.1f}× faster than PyTorch "
            f"eager ({fp32:.1f} vs {eager:.1f} ms) and changes JA by at most {worst[FORMATS[1]]:.4f} on any set; "
            f"int8 is {row['MB fp32'] / row['MB int8']:.1f}× smaller ({row['MB int8']:.1f} MB) and takes "
            f"{int8:.1f} ms ({eager / int8:.1f}× faster than eager, "
            + (f"{fp32 / int8:.1f}× faster than fp32" if int8 < fp32 else f"{int8 / fp32:.1f}× slower than fp32")
            + f"); it changes JA by at most {worst[FORMATS[2]]:.4f} on any set and by {round(-loss, 4) + 0.0:+.4f} on "
            "validation ("
            + (
                "export offers it)."
                if row["int8 offered by export"]
                else f"more than the {INT8_TOLERANCE} tolerance: export refuses it)."
            )
        )
    return "\n\n".join(lines)
