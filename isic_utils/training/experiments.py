"""Experiments, i.e. runs on disk: the data a profile names, a run's model, training every seed of a run (each
seed writing only its own files; ``jobs`` seeds side by side in worker processes), the run's shared tables merged
from every finished seed, a finished run read back.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..base.devices import resolve_device, set_threads
from ..base.files import LineWriter, atomic_path, locked, read_table, save_table, shown_path, write_json
from ..config.params import ADDED_SETTINGS, TrainConfig, absolute, chapter_values, project_root, with_role
from ..data import augmentation
from ..data.sources import RELEASES, DataError, download_release, has_split
from ..data.splits import ReportData, load_report_data
from ..data.synthetic import make_synthetic_isic
from ..model.inference import load_checkpoint
from ..model.networks import WEIGHTS_ENV, EncoderWeightsError, build_model, weights_on_disk
from ..scoring import confidence, metrics
from . import checkpoints
from .features import FeatureStore
from .loop import FitResult, fit

DATA_ENV = "ISIC_DATA_DIR"


def data_root(params: dict) -> Path:
    """Where the profile's data lives: ``data_dir``, else ``$ISIC_DATA_DIR`` (a real release), else ``data/<source>``."""
    if params["data_dir"]:
        return absolute(params["data_dir"])
    if params["data_source"] in RELEASES and os.environ.get(DATA_ENV):
        return absolute(os.environ[DATA_ENV])
    base = project_root()  # in Colab the project's folder on Drive (the notebooks' setup cell), so data outlives it
    if params["data_source"] == "synthetic":  # one folder per size, so profiles never overwrite each other
        return base / "data" / f"synthetic-{params['synthetic_train']}-{params['synthetic_test']}"
    return base / "data" / params["data_source"]


def describe_data(params: dict) -> str:
    """What this chapter runs on, shown at the top of every chapter and of index.html: the data, and the random
    encoder when the runs had no ImageNet weights (``describe_encoder``)."""
    return " ".join(line for line in (_data_line(params), describe_encoder(params)) if line)


def _data_line(params: dict) -> str:
    if params["data_source"] == "synthetic":
        return (
            "**Synthetic data** (the embedded offline default): generated lesions, not dermoscopy. These numbers "
            "show the pipeline works; they say nothing about real lesion segmentation."
        )
    release = RELEASES[params["data_source"]]
    if params["test_split"] == "official":
        test = "the official test set" + (" and validation set" if "validation" in release.folders else "")
    else:
        test = (
            f"a held-out {params['holdout_fraction']:.0%} of the training ids as test set (not the official test set)"
        )
    return f"**{release.name}** images from `{shown_path(data_root(params), DATA_ENV)}`, with {test}."


def random_encoder(info: dict) -> bool:
    """Whether a run's record (``run.json``) says a seed started from a random encoder."""
    weights = info.get("encoder_weights") or {}
    return any(w.get("source") == "random initialisation" for w in weights.values() if isinstance(w, dict))


def random_encoder_runs(output_dir: str | Path) -> list[str]:
    """The runs in ``output_dir`` whose recorded seeds started from a random encoder (no ImageNet weights to be had)."""
    runs = []
    for record in sorted(absolute(output_dir).glob("*/run.json")):
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if random_encoder(info):
            runs.append(record.parent.name)
    return runs


def describe_encoder(params: dict) -> str:
    """A line for the top of a chapter when its runs did (or, offline, will) start from a random encoder: their
    numbers are then not transfer learning, and a frozen random encoder (task 1) learns next to nothing; "" else."""
    runs = random_encoder_runs(params["output_dir"])
    consequence = (
        "This is not transfer learning: a frozen random encoder (task 1) learns next to nothing, so its "
        "scores and any comparison with it say nothing about ImageNet features. Set "
        f"`${WEIGHTS_ENV}` (or `encoder_weights`) for the real study."
    )
    if runs:
        return (
            f"**Random encoder**: {', '.join(runs)} started from a randomly initialised MobileNetV2 (ImageNet "
            f"weights were not available). {consequence}"
        )
    if "encoder_weights" not in params:  # a chapter that trains nothing: the profile's training settings say
        params = chapter_values("train", params["profile"])
    if params["allow_random_encoder"] and not weights_on_disk(params["encoder_weights"]):
        return (
            "**No ImageNet weights on this machine**: unless they can be downloaded, the runs start from a "
            f"randomly initialised MobileNetV2. {consequence}"
        )
    return ""


def prepare_data(params: dict, progress: bool = True) -> ReportData:
    """Make, find or download the data the parameters name; decode once (cached) and split it."""
    root = data_root(params)
    if params["data_source"] == "synthetic":
        make_synthetic_isic(root, params["synthetic_train"], params["synthetic_test"])
    else:
        source = params["data_source"]
        release = RELEASES[source]
        splits = ["train"] + (
            [s for s in release.folders if s != "train"] if params["test_split"] == "official" else []
        )
        if not all(has_split(root, split, source) for split in splits):
            if not params["download"]:
                raise DataError(
                    f"no {release.name} data under {root}. Fix: set data_dir (or {DATA_ENV}) to the folder holding "
                    f"the unzipped archives ({', '.join(f for s in splits for f in release.folders[s][:1])}, …), or "
                    "set download: true to fetch them."
                )
            download_release(root, source, splits)
    cache = absolute(params["output_dir"]).parent / "cache"
    expected = RELEASES[params["data_source"]].counts if params["data_source"] in RELEASES else None
    return load_report_data(
        root,
        params["image_size"],
        params["val_fraction"],
        seed=0,
        test_split=params["test_split"],
        holdout_fraction=params["holdout_fraction"],
        limit=params["limit"],
        cache_dir=cache,
        progress=progress,
        expected_counts=expected,
        release=params["data_source"] if params["data_source"] in RELEASES else "isic2016",
    )


def make_model(params: dict, seed: int | None = None):
    """Build the run's model; returns (model, a sentence on the encoder weights actually used).

    With ``seed``, torch is seeded first so the decoder's (and a random encoder's) initialisation belongs to the seed:
    torch seeds itself at random in each new process, so without it a rerun of the same seed starts elsewhere.
    """
    if seed is not None:
        torch.manual_seed(seed)
    weights = params["encoder_weights"]
    kwargs = dict(decoder=params["decoder"], dropout=params["dropout"], freeze_encoder=params["freeze_encoder"])
    try:
        model = build_model(encoder_weights=weights, **kwargs)
        note = model.encoder_weights["source"]
    except EncoderWeightsError as exc:
        if not params["allow_random_encoder"]:
            raise
        model = build_model(encoder_weights=None, **kwargs)
        model.encoder_weights["fallback"] = True
        note = (
            f"**random initialisation** — ImageNet weights were not available ({str(exc).split('. Fix')[0]}). "
            "This is not transfer learning; set encoder_weights or $ISIC_ENCODER_WEIGHTS for the real study."
        )
    return model, note


def train_config(params: dict, seed: int) -> TrainConfig:
    return TrainConfig.from_params(params, seed, resolve_device(params["device"]))


@dataclass
class RunResult:
    """What a training chapter produced, and where its files are.

    ``fits`` holds the seeds trained (or resumed) by this call; ``results`` (each seed's ``result.json``),
    ``seeds_table`` and ``per_image`` cover every finished seed of this configuration in the run's folder (seeds
    trained by other processes included). ``model``, ``history`` and ``probabilities`` are the lowest such seed's,
    which the chapter's tables and figures show.
    """

    name: str
    run_dir: Path
    fits: dict[int, FitResult]
    results: list[dict]
    per_image: dict[int, pd.DataFrame]
    seeds_table: pd.DataFrame
    model: torch.nn.Module
    weights_note: str
    data: ReportData
    history: pd.DataFrame
    probabilities: torch.Tensor

    @property
    def best_epoch(self) -> int:
        return self.results[0]["best_epoch"]

    @property
    def params(self) -> dict:
        """The run's parameters, as ``run.json`` records them."""
        return json.loads((self.run_dir / "run.json").read_text())["params"]

    @property
    def trained_on(self) -> str:
        """Where the lowest seed trained, in words: "NVIDIA H100 (cuda, bf16)", "AMD EPYC (AVX2) (cpu, fp32)"."""
        where = self.results[0].get("trained_on") or {}
        if not where:
            return "unrecorded hardware (a run trained before devices were recorded)"
        return (
            f"{where['device_name']} ({where['device']}, {where['precision']}"
            f"{', deterministic' if where.get('deterministic') else ''})"
        )


def run_settings(params: dict) -> dict:
    """The parameters that decide a run's result: all but seeds, resume and where the outputs go, and a setting
    added later (``ADDED_SETTINGS``) left out at its plain value, so that runs from before it keep their key."""
    kept = {k: v for k, v in params.items() if k not in with_role("route", "place", "seeds")}
    for key, plain in ADDED_SETTINGS.items():
        if kept.get(key) == plain:
            kept.pop(key)
    return kept


def run_key(params: dict, encoder_weights: dict) -> str:
    """The identity of a run's configuration, shared by all its seeds: its ``run_settings`` and the encoder's starting
    weights (their hash; "random" for a random encoder, seeded per seed)."""
    kept = run_settings(params)
    weights = "random" if encoder_weights.get("source") == "random initialisation" else encoder_weights.get("sha256")
    return hashlib.sha1(json.dumps([kept, weights], sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_run(params: dict, data: ReportData, verbose: bool = True) -> RunResult:
    """Train ``params['run_name']`` once per seed, score the selected checkpoint on the whole test set at model
    resolution and at original size, and write the run's seed table and ``run.json``. Each seed's files (its
    ``best.pt`` with its confidence rule included) are final as soon as that seed is trained.

    Each seed writes only its own files (``seed<k>/`` and ``tables/per_image_test_seed<k>.csv``), so seeds can
    train in parallel processes: ``params['jobs']`` > 1 trains them side by side in worker processes here (each
    with its share of the CPU threads), and separate processes may train other seeds of the same run. The run's
    shared tables and ``run.json`` are then rebuilt, under a lock, from every finished seed of the same
    configuration in the folder. Seeds starting from the same frozen encoder share its cached features. The
    chapter's own tables (per epoch, summary, parameters) are ``report.run_tables(result)``. ``params['resume']``
    continues finished or interrupted seeds (false retrains them from scratch).
    """
    threads = set_threads()
    run_dir = absolute(params["output_dir"]) / params["run_name"]
    seeds = list(params["seeds"])
    jobs = min(params["jobs"], len(seeds))
    if jobs > 1:
        trained = _fit_in_workers(params, data, jobs, max(1, threads // jobs), verbose)
    else:
        store = FeatureStore()
        trained = {
            seed: _fit_seed(params, data, seed, params["epochs"] * (len(seeds) - k - 1), verbose, store)
            for k, seed in enumerate(seeds)
        }
    fits = {seed: fitted for seed, (fitted, _, _) in trained.items()}
    key = run_key(params, trained[seeds[0]][1])
    model, _ = make_model(params, seeds[0])
    with locked(run_dir):
        return _merge_seeds(params, data, run_dir, key, model, fits)


def _finish_seed(params: dict, data: ReportData, seed: int, result: FitResult, weights: dict, note: str) -> None:
    """Score a trained seed's selected checkpoint at original size, choose its confidence rule on validation, record
    the rule in its ``best.pt`` and write its tables and ``result.json``: done as soon as the seed is trained, so its
    files are final when the seed is, whatever its run's other seeds are still doing."""
    seed_dir = absolute(params["output_dir"]) / params["run_name"] / f"seed{seed}"
    run_dir = seed_dir.parent
    post = params["postprocess"]
    counts = metrics.original_size_counts(result.test.probabilities, data.test, postprocess=post)
    val_counts = metrics.original_size_counts(result.val.probabilities, data.val, postprocess=post)
    test_table = metrics.per_image_table(counts, data.test.ids, data.test.sizes)
    val_table = metrics.per_image_table(val_counts, data.val.ids, data.val.sizes)
    calibration = _calibrate(result, data, val_table, test_table)
    checkpoints.record_calibration(seed_dir / "best.pt", calibration, confidence.IN_CHECKPOINT)
    save_table(test_table, run_dir, f"per_image_test_seed{seed}")
    save_table(val_table, run_dir, f"per_image_val_seed{seed}")
    _save_tensor(result.test.probabilities, seed_dir / "test_probabilities.pt")
    with atomic_path(seed_dir / "history.csv") as tmp:
        result.history.to_csv(tmp, index=False)
    write_json(
        seed_dir / "result.json",
        {
            "seed": seed,
            "run_key": run_key(params, weights),
            "best_epoch": result.best_epoch,
            "val": result.val.summary(),
            "test": result.test.summary(),
            "test_orig": metrics.summarize(counts),
            "val_orig": metrics.summarize(val_counts),
            "precision": result.precision,
            "feature_cache": result.used_feature_cache,
            "train_minutes": float(result.history["epoch_seconds"].sum()) / 60,  # the epochs' time: a resume adds none
            "trained_on": result.trained_on,
            "encoder_weights": weights,
            "weights_note": note,
            "calibration": calibration,
            **_constants_record(result.fingerprint),
        },
    )


def _constants_record(fingerprint: dict) -> dict:
    """``{"augmentation_constants": ...}`` as a seed's checkpoint records them; {} for a run trained before they were
    recorded (its files stay as they were)."""
    key = "augmentation_constants"
    return {key: fingerprint[key]} if key in fingerprint else {}


def _calibrate(result: FitResult, data: ReportData, val_table: pd.DataFrame, test_table: pd.DataFrame) -> dict:
    """Choose the temperature, the confidence and its flagging threshold on validation (``confidence``); add each
    image's ``confidence`` to both per-image tables; the calibration, with the test pixels' ECE before and after."""
    calibration = confidence.fit_calibration(result.val.probabilities, data.val.masks, val_table["iou"])
    val_table["confidence"] = confidence.scores(result.val.probabilities, calibration)
    test_table["confidence"] = confidence.scores(result.test.probabilities, calibration)
    test, calibrated = (
        result.test.probabilities,
        confidence.calibrated(result.test.probabilities, calibration["temperature"]),
    )
    calibration["ece_test"] = confidence.expected_calibration_error(test, data.test.masks)
    calibration["ece_test_calibrated"] = confidence.expected_calibration_error(calibrated, data.test.masks)
    # what a temperature does to the masks: nothing, and measured so
    calibration["mask_pixels_changed"] = int(((calibrated > 0.5) != (test > 0.5)).sum())
    return calibration


SEED_RESULTS = ("result.json", "history.csv", "test_probabilities.pt")  # written once a seed is trained and scored


def _fit_seed(
    params: dict, data: ReportData, seed: int, later_epochs: int, verbose: bool, store: FeatureStore
) -> tuple[FitResult, dict, str]:
    """Train (or resume) one seed into ``seed<k>/``; (its fit, its encoder's starting-weights record, the note)."""
    model, note = make_model(params, seed)
    label = f"{params['run_name']} seed {seed}"
    seed_dir = absolute(params["output_dir"]) / params["run_name"] / f"seed{seed}"
    if verbose:
        print(f"— {label}: encoder {note}", flush=True)
    # a retrain removes the seed's old results (they no longer describe its checkpoints) under the seed's lock
    result = fit(
        model,
        data,
        train_config(params, seed),
        seed_dir,
        resume=params["resume"],
        verbose=verbose,
        label=label,
        later_epochs=later_epochs,
        features=store,
        stale=SEED_RESULTS,
    )
    _finish_seed(params, data, seed, result, model.encoder_weights, note)
    return result, model.encoder_weights, note


# ----------------------------------------------------------------------------- seeds in worker processes

_WORKER: dict = {}


def _worker_start(data: ReportData, lines, threads: int) -> None:
    torch.set_num_threads(threads)
    sys.stdout = LineWriter(lines.put)  # whole lines go to the parent, which prints them
    _WORKER.update(data=data, store=FeatureStore())


def _worker_fit(params: dict, seed: int, later_epochs: int, verbose: bool):
    return _fit_seed(params, _WORKER["data"], seed, later_epochs, verbose, _WORKER["store"])


def _fit_in_workers(
    params: dict, data: ReportData, jobs: int, threads: int, verbose: bool
) -> dict[int, tuple[FitResult, dict, str]]:
    """Train the seeds in ``jobs`` spawned worker processes with ``threads`` threads each (two one-thread workers
    on two cores train more images a second than one two-thread process). Their epoch lines are printed here; the
    first error stops the others and is raised."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch's thread pools exist
    lines = context.Queue()
    seeds = list(params["seeds"])
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_start, initargs=(data, lines, threads))
    finished = False
    try:
        futures = {
            pool.submit(_worker_fit, params, seed, params["epochs"] * ((len(seeds) - k - 1) // jobs), verbose): seed
            for k, seed in enumerate(seeds)
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            _print_lines(lines)
            for future in done:
                future.result()  # raises the worker's error, which stops the rest below
        finished = True
        return {futures[future]: future.result() for future in futures}
    finally:
        _print_lines(lines)
        if not finished:  # an error or an interrupt: stop the seeds still training (their last epoch is kept)
            workers = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in workers:
                worker.terminate()
        pool.shutdown(wait=True)


def _print_lines(lines) -> None:
    while True:
        try:
            print(lines.get_nowait(), flush=True)
        except queue.Empty:
            return


def _save_tensor(tensor: torch.Tensor, path: Path) -> None:
    """``torch.save`` unless ``path`` holds this tensor already (a resumed seed): ``torch.save`` writes a new
    serialization id each time, so the bytes of the same tensor differ from one save to the next."""
    if path.is_file() and torch.equal(torch.load(path, weights_only=True), tensor):
        return
    with atomic_path(path) as tmp:
        torch.save(tensor, tmp)


def _finished(path: Path, record: dict) -> float:
    """When the run recorded in ``path`` finished: the time it says when its record is ``record`` (a resume that
    changed nothing), else now."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return time.time()
    finished = previous.pop("finished", None)
    same = json.dumps(previous, sort_keys=True) == json.dumps(
        json.loads(json.dumps(record, default=float)), sort_keys=True
    )
    return finished if same and isinstance(finished, (int, float)) else time.time()


def _merge_seeds(
    params: dict, data: ReportData, run_dir: Path, key: str, model, fits: dict[int, FitResult]
) -> RunResult:
    """Rebuild ``seeds.csv`` and ``run.json`` from every finished seed with configuration ``key`` and trained with the
    augmentation code's constants as they are now (where the seed records them)."""
    results = []
    constants = augmentation.constants(params["augment"])
    for path in run_dir.glob("seed*/result.json"):
        result = json.loads(path.read_text())
        same = result.get("run_key") == key and result.get("augmentation_constants", constants) == constants
        if same and (path.parent / "history.csv").exists():
            results.append(result)
    results.sort(key=lambda r: r["seed"])
    rows = [
        {
            "seed": r["seed"],
            "best_epoch": r["best_epoch"],
            "val_iou_mean": r["val"]["iou_mean"],
            "test_iou_mean_model_px": r["test"]["iou_mean"],
            "test_iou_pooled_model_px": r["test"]["iou_pooled"],
            **{f"test_{k}_orig": v for k, v in r["test_orig"].items()},
            **({"val_iou_mean_orig": r["val_orig"]["iou_mean"]} if "val_orig" in r else {}),
            "precision": r["precision"],
            "device": r.get("trained_on", {}).get("device", "cpu"),
            "feature_cache": r["feature_cache"],
            "train_minutes": r["train_minutes"],
        }
        for r in results
    ]
    seeds_table = save_table(pd.DataFrame(rows), run_dir, "seeds")
    seeds = [r["seed"] for r in results]
    record = {
        "run_name": params["run_name"],
        "seeds": seeds,
        "weights": results[0]["weights_note"],
        "encoder_weights": {str(r["seed"]): r["encoder_weights"] for r in results},
        "trained_on": {str(r["seed"]): r.get("trained_on", {}) for r in results},
        "params": params,
        "test_source": data.test_source,
        **_constants_record(results[0]),
    }
    write_json(run_dir / "run.json", {**record, "finished": _finished(run_dir / "run.json", record)})
    model.load_state_dict(load_checkpoint(run_dir / f"seed{seeds[0]}" / "best.pt")["model"])
    saved = load_run(params["output_dir"], params["run_name"])  # the same reading the comparison chapter does
    return RunResult(
        params["run_name"],
        run_dir,
        fits,
        results,
        saved.per_image,
        seeds_table,
        model,
        results[0]["weights_note"],
        data,
        saved.history,
        saved.probabilities,
    )


# ----------------------------------------------------------------------------- a finished run, read back


@dataclass
class SavedRun:
    """A finished training run read back from disk (never retrained)."""

    name: str
    run_dir: Path
    info: dict
    seeds: pd.DataFrame
    history: pd.DataFrame  # the lowest seed's, one row per epoch
    per_image: dict[int, pd.DataFrame]
    probabilities: torch.Tensor


def load_run(output_dir: str | Path, name: str) -> SavedRun:
    """Read a finished run (its seeds, per-image scores, epochs and the lowest seed's test probabilities)."""
    run_dir = absolute(output_dir) / name
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise FileNotFoundError(
            f"{info_path} not found: run the training chapter for {name!r} first "
            f"(python -m isic_utils report --only {name}, or papermill notebooks/02_train.ipynb OUT.ipynb -p run {name})."
        )
    info = json.loads(info_path.read_text())
    seeds = read_table(run_dir, "seeds")
    per_image = {int(s): read_table(run_dir, f"per_image_test_seed{int(s)}") for s in seeds["seed"]}
    first = int(seeds["seed"].iloc[0])
    history = pd.read_csv(run_dir / f"seed{first}" / "history.csv")
    probabilities = torch.load(run_dir / f"seed{first}" / "test_probabilities.pt", weights_only=True)
    return SavedRun(name, run_dir, info, seeds, history, per_image, probabilities)


def chapter_dir(params: dict, name: str) -> Path:
    """The folder where a chapter writes its tables and figures: ``output_dir/name``."""
    folder = absolute(params["output_dir"]) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder
