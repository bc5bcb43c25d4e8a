"""The options study on a lent GPU, in one call (issue 32's remaining levers): ``make gpu-check`` first, then task 3's
training options that a CPU without native bf16 cannot afford (256 px, 384 px, zoom-out augmentation, beside the base)
with three seeds each, trained side by side on the one GPU (a process per seed: small batches leave it idle between
launches), scored with the project's own scoring (``external.score_split``, a process per run, split and seed) and read
with the study's own tables (``generalisation.options_table``, ``options_by_area``); and task 3 trained on the union of
the releases (ISIC 2016 training ids + the later additions, linked in the ISIC 2018 Task 1 layout, the
``isic2018_holdout`` profile: the shared-folder form of the ``isic2018`` release, which holds the 2016 images) and on
the additions alone, what no CPU measured before what one did (``TRAIN_ORDER``). No phase starts a job after its deadline
(seconds from the call's start), so one call ends inside the device's ten-minute limit with what it finished.

Here, before the call (the data never enters git: ``.gpu/`` is ignored)::

    python tools/gpu_study.py pack        # .gpu/ from $ISIC_DATA_DIR, $ISIC_LATER_DIR, $PH2_DIR, $ISIC_ENCODER_WEIGHTS
    STUDY_QUICK=1 python tools/gpu_study.py all   # a CPU rehearsal: 1 epoch, 16 images, 30 later images

On the GPU machine (device ``run`` with ``carry: [".gpu"]``, timeout 585 s)::

    python3 tools/gpu_study.py session     # gpu-check, the study, everything small in $OUT/results.tgz

``pack`` copies the two 512 px folders and the weights unchanged and PH2 as JPEG (quality 80) images with PNG masks
under PH2's own file names, so that the whole carry fits the device's 64 MiB (PH2's BMPs alone are 68 MiB): scored with
the base's three seeds here, the recompressed PH2 moved each seed's JA by at most 0.0008 (0.7873 / 0.8212 / 0.8407 →
0.7875 / 0.8206 / 0.8399).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
G = ROOT / ".gpu"  # the carry folder (ignored by git)
QUICK = os.environ.get("STUDY_QUICK") == "1"
CARRY_LIMIT = 64 * 2**20  # the device's working tree, carry included
CARRIED = {  # what pack writes and the GPU machine reads
    "ISIC_DATA_DIR": G / "isic2016-train-512",
    "ISIC_LATER_DIR": G / "isic2018-additions-512",
    "PH2_DIR": G / "ph2",
    "ISIC_ENCODER_WEIGHTS": G / "weights" / "mobilenet_v2_imagenet.pth",
}
QUICK_LATER = Path("/tmp/gpu-study-later-quick")  # the rehearsal's 30 later images (links)
OUT = Path(os.environ.get("OUT") or "/tmp/gpu-out")
T0 = float(os.environ.get("T0") or time.time())
PROFILE = "isic2016_holdout"
OPTIONS_OUT = ROOT / "outputs" / ("quick_holdout" if QUICK else PROFILE) / "options"
SCORES = OPTIONS_OUT / "scores"
UNION = Path("/tmp/gpu-study-union-quick" if QUICK else "/tmp/gpu-study-union")
THREADS = int(os.environ.get("JOB_THREADS", "2"))
PARALLEL = int(os.environ.get("PARALLEL", "8"))
# Seconds from the start (T0): fitted to one 585-second device call after a gpu-check of at most 180 s.
TRAIN_UNTIL = float(os.environ.get("TRAIN_UNTIL", "330"))  # no training job starts after this
TRAIN_KILL = float(os.environ.get("TRAIN_KILL", "410"))  # training jobs still running are stopped here
SCORE_KILL = float(os.environ.get("SCORE_KILL", "535"))  # and scoring jobs here (none starts in its last 45 s)
QUICK_SET = {"epochs": 1, "limit": 16, "output_dir": "outputs/quick_holdout"} if QUICK else {}
SEEDS = (0, 1, 2)
# The runs this call trains, in the order their jobs start, what a CPU measured least first: on a 2-core CPU with AMX
# (bf16), 256 px and zoom-out augmentation moved the later releases by less than the seed spread (three seeds each),
# task 3 trained on the union of the releases gained +0.070 ± 0.016 on 223 later images it never saw (three seeds),
# and the union at 256 px instead of 128 px moved those images by +0.0004 and −0.0026 (seeds 0 and 1: 0.8067 → 0.8071,
# 0.8062 → 0.8036; seed 0's lesions under 5 % of the frame 0.775 → 0.775) and ISIC 2016's 168 by +0.003 and +0.000;
# 384 px and the additions alone were never trained. The base
# and the union at 128 px go first (what every other run is compared with on the same GPU), then what no CPU measured.
# ("option", name): an options-study run; (profile label, size): task 3 on that data.
TRAIN_ORDER = (
    ("option", "base"),
    ("union_holdout", "128"),
    ("option", "384_px"),
    ("isic2018_holdout", "256"),
    ("union_holdout", "256"),
    ("option", "256_px"),
    ("option", "zoom-out_augmentation"),
)
OPTION_RUNS = tuple(name for kind, name in TRAIN_ORDER if kind == "option")  # the options study's runs
PROFILE_RUNS = tuple(run for run in TRAIN_ORDER if run[0] != "option")  # (label, size)


def use_data() -> dict[str, Path]:
    """Point the environment at the data this command reads: the carried copies (on the GPU machine), or in a
    rehearsal the environment's own folders with 30 of the later images."""
    if QUICK:
        data = {name: Path(os.environ[name]) for name in CARRIED}
        later = data["ISIC_LATER_DIR"]
        for folder in ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"):
            (QUICK_LATER / folder).mkdir(parents=True, exist_ok=True)
        for picture in sorted((later / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))[:30]:
            mask = later / "ISIC2018_Task1_Training_GroundTruth" / f"{picture.stem}_segmentation.png"
            for source in (picture, mask):
                link = QUICK_LATER / source.parent.name / source.name
                if not link.exists():
                    link.symlink_to(source)
        data["ISIC_LATER_DIR"] = QUICK_LATER
    else:
        data = dict(CARRIED)
    os.environ.update({name: str(path) for name, path in data.items()})
    return data


def log(message: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {message}", flush=True)


# ----------------------------------------------------------------------------- the jobs (each in its own process)


def option_values(option: str, seed: str) -> dict:
    from isic_utils.evaluation.generalisation import study_params

    seeds = list(SEEDS) if seed == "all" else [int(seed)]
    _, runs = study_params(PROFILE, overrides={"seeds": seeds, **QUICK_SET}, only=[option])
    return runs[[o for o in runs if o != "base"][0]] if option != "base" else runs["base"]


def profile_out(label: str) -> Path:
    """Where a task 3 run on ``label``'s data writes (its own output folder, beside the profiles')."""
    return ROOT / "outputs" / f"{'quick_' if QUICK else ''}{label}"


def profile_values(label: str, data_dir: Path, size: int, seed: str) -> dict:
    from isic_utils.config import params as P

    overrides = {
        "seeds": list(SEEDS) if seed == "all" else [int(seed)],
        "image_size": size,
        "data_dir": str(data_dir),
        "run_name": f"task3_{size}px",
        **QUICK_SET,
        "output_dir": str(profile_out(label)),
    }
    return P.resolve("train", ROOT / "params" / "task3.yaml", "isic2018_holdout", overrides, ROOT)


def train(kind: str, *args: str) -> None:
    import torch

    from isic_utils.training.experiments import prepare_data, train_run

    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # train_run takes a thread per CPU unless this says otherwise
    if kind == "option":
        values = option_values(args[0], args[1])
    else:
        label, (size, seed) = kind, args
        values = profile_values(label, UNION if label == "union_holdout" else DATA["ISIC_LATER_DIR"], int(size), seed)
    t0 = time.perf_counter()
    run = train_run(values, prepare_data(values, progress=False), verbose=False)
    fit = run.fits[max(run.fits)]
    print(
        json.dumps(
            {
                "job": [kind, *args],
                "test_orig_iou": [r["test_orig"]["iou_mean"] for r in run.results],
                "val_iou": [r["val"]["iou_mean"] for r in run.results],
                "epochs": len(fit.history),
                "seconds": time.perf_counter() - t0,
                "train_img_s": len(run.data.train) / float(fit.history["train_seconds"].median()),
                "device": fit.trained_on.get("device_name"),
                "precision": fit.precision,
            }
        ),
        flush=True,
    )


def score(run_name: str, split_name: str, seed: str) -> None:
    """One seed of one options run on one split (the base with every inference option, the others plainly, as the
    study compares them); its per-image tables pickled."""
    import torch

    from isic_utils.evaluation.external import INFERENCE_OPTIONS, PLAIN, external_sets, load_external, score_split
    from isic_utils.evaluation.generalisation import study_params
    from isic_utils.training.experiments import load_run, prepare_data

    torch.set_num_threads(1)
    scoring, _ = study_params(PROFILE, overrides=QUICK_SET)
    run = load_run(OPTIONS_OUT, run_name)
    run = dataclasses.replace(run, seeds=run.seeds[run.seeds["seed"] == int(seed)])
    values = {**run.info["params"], "output_dir": str(OPTIONS_OUT)}
    data = prepare_data(values, progress=False)
    if split_name == "validation":
        split = data.val
    else:
        known = {*data.train.ids, *data.val.ids, *data.test.ids}
        external = next(s for s in external_sets(scoring) if s.name == split_name)
        split, _ = load_external(external, int(values["image_size"]), ROOT / "outputs" / "cache", False, known)
    t0 = time.perf_counter()
    result = score_split(run, split, split_name, INFERENCE_OPTIONS if run_name == "base" else PLAIN)
    SCORES.mkdir(parents=True, exist_ok=True)
    target = SCORES / f"{run_name}__{split_name.replace(' ', '_')}__{seed}.pkl"
    with open(target, "wb") as f:
        pickle.dump({"run": run_name, "split": split_name, "own": result.own, "tables": result.tables}, f)
    print(
        json.dumps({"scored": [run_name, split_name, seed], "images": len(split), "seconds": time.perf_counter() - t0})
    )


def prepare(size: str) -> None:
    """Decode (and cache) the study's data and its external sets at one size, once, before the jobs read them."""
    from isic_utils.evaluation.external import external_sets, load_external
    from isic_utils.evaluation.generalisation import study_params
    from isic_utils.training.experiments import prepare_data

    values = {**option_values("base", "0"), "image_size": int(size)}
    data = prepare_data(values, progress=False)
    known = {*data.train.ids, *data.val.ids, *data.test.ids}
    scoring, _ = study_params(PROFILE, overrides=QUICK_SET)
    for external in external_sets(scoring):
        load_external(external, int(size), ROOT / "outputs" / "cache", False, known)
    if int(size) in (128, 256):
        for label, folder in (("union_holdout", UNION), ("isic2018_holdout", DATA["ISIC_LATER_DIR"])):
            prepare_data(profile_values(label, folder, int(size), "0"), progress=False)
    print(f"prepared {size} px", flush=True)


# ----------------------------------------------------------------------------- the session


def make_union() -> None:
    """ISIC 2016 training ids + the later additions, as the ISIC 2018 Task 1 archive unzips (links)."""
    images, masks = UNION / "ISIC2018_Task1-2_Training_Input", UNION / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    later = DATA["ISIC_LATER_DIR"]
    for picture in sorted((later / images.name).glob("*.jpg")):
        (images / picture.name).unlink(missing_ok=True)
        (images / picture.name).symlink_to(picture)
    for mask in sorted((later / masks.name).glob("*.png")):
        (masks / mask.name).unlink(missing_ok=True)
        (masks / mask.name).symlink_to(mask)
    old = DATA["ISIC_DATA_DIR"]
    for picture in sorted((old / "ISBI2016_ISIC_Part1_Training_Data").glob("*.jpg")):
        (images / picture.name).unlink(missing_ok=True)
        (images / picture.name).symlink_to(picture)
        mask = old / "ISBI2016_ISIC_Part1_Training_GroundTruth" / f"{picture.stem}_Segmentation.png"
        (masks / f"{picture.stem}_segmentation.png").unlink(missing_ok=True)
        (masks / f"{picture.stem}_segmentation.png").symlink_to(mask)
    log(f"union: {len(list(images.glob('*.jpg')))} images, {len(list(masks.glob('*.png')))} masks")


def run_pool(jobs: list[list[str]], parallel: int, start_until: float, kill_at: float, tag: str) -> list[str]:
    """Run ``study.py`` subcommands, ``parallel`` at a time, none started after ``start_until``; the jobs still
    running at ``kill_at`` are stopped. Returns their printed JSON lines."""
    pending, running, lines = list(jobs), [], []
    logs = Path(os.environ.get("JOB_LOGS", "/tmp/joblogs"))
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        now = time.time() - T0
        while pending and len(running) < parallel and now < start_until:
            job = pending.pop(0)
            name = "_".join(job).replace(" ", "-")
            handle = open(logs / f"{tag}_{name}.log", "w")
            process = subprocess.Popen(  # output to a file: a full pipe would block the child
                [sys.executable, str(Path(__file__)), *job], stdout=handle, stderr=subprocess.STDOUT, text=True
            )
            running.append((job, process, handle, time.time()))
            log(f"{tag}: started {job}")
        if pending and now >= start_until:
            log(f"{tag}: deadline; not started: {pending}")
            pending = []
        for entry in list(running):
            job, process, handle, started = entry
            if process.poll() is not None:
                handle.close()
                out = Path(handle.name).read_text(errors="replace")
                lines += [line for line in out.splitlines() if line.startswith("{")]
                running.remove(entry)
                status = "done" if process.returncode == 0 else f"FAILED rc {process.returncode}"
                log(f"{tag}: {status} {job} in {time.time() - started:.0f} s {out.strip()[-300:]}")
            elif time.time() - T0 > kill_at:
                process.kill()
                process.wait()
                handle.close()
                running.remove(entry)
                log(f"{tag}: KILLED at the deadline {job}")
        time.sleep(0.5)
    return lines


def assemble(runs: list[str]) -> None:
    """The study's own tables from the pickled scores of the runs with every seed scored on every split."""
    import pandas as pd

    from isic_utils.base.files import read_table, save_table
    from isic_utils.evaluation.external import Scored
    from isic_utils.evaluation.generalisation import TRAINING_OPTIONS, options_by_area, options_table, run_name

    pieces: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(SCORES.glob("*.pkl")):
        with open(path, "rb") as f:
            piece = pickle.load(f)
        pieces.setdefault((piece["run"], piece["split"]), []).append(piece)
    splits = {split for _, split in pieces}
    complete = [r for r in runs if all(len(pieces.get((r, s), [])) == len(SEEDS) for s in splits)]
    log(f"assemble: complete runs {complete} of {runs}; splits {sorted(splits)}")
    if "base" not in complete:
        log("assemble: the base is not complete: no table")
        return
    scored = {}
    for (run, split), parts in pieces.items():
        if run in complete:
            tables = {k: v for part in parts for k, v in part["tables"].items()}
            scored[(run, split)] = Scored(run, split, parts[0]["own"], tables, {})
    names = {"base": "base", **{run_name(o): o for o in TRAINING_OPTIONS if run_name(o) in complete}}
    table = options_table(scored, names, 1 if QUICK else 20)
    out = OPTIONS_OUT / "gpu"
    save_table(table, out, "options")
    save_table(options_by_area(scored, names), out, "options_by_area")
    tests = []
    for run in complete:
        seeds = read_table(OPTIONS_OUT / run, "seeds")
        tests.append(
            {"run": run, "test JA": seeds["test_iou_mean_orig"].mean(), "std": seeds["test_iou_mean_orig"].std()}
        )
    save_table(pd.DataFrame(tests), out, "test")
    cols = [c for c in table.columns if c.startswith("JA ") and "std" not in c]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table[["option", *cols]].round(4).to_string(index=False), flush=True)
        print(pd.DataFrame(tests).round(4).to_string(index=False), flush=True)


def pack() -> None:
    """Build ``.gpu/`` from the development data the environment names, and check it fits the device's carry."""
    from PIL import Image

    sources = {name: os.environ.get(name) for name in CARRIED}
    missing = [name for name, folder in sources.items() if not folder or not Path(folder).exists()]
    if missing:
        sys.exit(f"pack: set {', '.join(missing)} (see ../shared/data/README.md); nothing was written.")
    G.mkdir(exist_ok=True)
    for name in ("ISIC_DATA_DIR", "ISIC_LATER_DIR"):
        target = CARRIED[name]
        if not target.exists():
            shutil.copytree(sources[name], target)
    CARRIED["ISIC_ENCODER_WEIGHTS"].parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sources["ISIC_ENCODER_WEIGHTS"], CARRIED["ISIC_ENCODER_WEIGHTS"])
    ph2 = Path(sources["PH2_DIR"])
    for bmp in sorted(ph2.rglob("*.bmp")):
        target = CARRIED["PH2_DIR"] / bmp.relative_to(ph2)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(bmp) as picture:  # PIL reads a file by its content, whatever its name says
            if bmp.parent.name.endswith("_lesion"):
                picture.convert("1").save(target, format="PNG", optimize=True)
            else:
                picture.convert("RGB").save(target, format="JPEG", quality=80)
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
    size = sum(f.stat().st_size for f in G.rglob("*") if f.is_file() and not f.is_symlink())
    size += sum(Path(f.decode()).stat().st_size for f in tracked if f and Path(f.decode()).is_file())
    verdict = "fits" if size < CARRY_LIMIT else "does NOT fit"
    print(
        f"pack: .gpu/ and the tracked files are {size / 2**20:.1f} MiB: {verdict} the device's {CARRY_LIMIT >> 20} MiB"
    )


def session() -> None:
    """The whole GPU call: the machine, ``make gpu-check`` (3 epochs a task), the study, and ``$OUT/results.tgz``."""
    OUT.mkdir(parents=True, exist_ok=True)
    shown = (
        "import sys, torch, torchvision, pandas; print(sys.version.split()[0], torch.__version__, "
        "torchvision.__version__, pandas.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "
        "'no CUDA device')"
    )
    facts = subprocess.run([sys.executable, "-c", shown], capture_output=True, text=True)
    log(f"machine: {facts.stdout.strip() or facts.stderr.strip()[-300:]}; {os.cpu_count()} CPUs")
    data, weights, epochs = DATA["ISIC_DATA_DIR"], DATA["ISIC_ENCODER_WEIGHTS"], os.environ.get("CHECK_EPOCHS", "3")
    if shutil.which("make"):
        command = ["make", "-o", "setup", "gpu-check", f"PY={sys.executable}", f"DATA_DIR={data}"]
        command += [f"WEIGHTS={weights}", f"EPOCHS={epochs}"]
    else:
        command = [sys.executable, "tools/gpu_check.py", "--data", str(data), "--weights", str(weights)]
        command += ["--epochs", epochs]
    with open(OUT / "gpu_check.log", "w") as handle:
        try:
            limit = float(os.environ.get("CHECK_S", "180"))
            done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=limit)
            log(f"gpu-check rc {done.returncode}")
        except subprocess.TimeoutExpired:
            log("gpu-check stopped at its time limit (its rows so far are in gpu_check.log)")
    study()
    with tarfile.open(OUT / "results.tgz", "w:gz") as tar:
        for path in (ROOT / "outputs").rglob("*"):
            if path.is_file() and path.suffix != ".pt" and "cache" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(ROOT)))
        for path in Path(os.environ.get("JOB_LOGS", "/tmp/joblogs")).glob("*.log"):
            tar.add(path, arcname=f"joblogs/{path.name}")
    log(f"results: {(OUT / 'results.tgz').stat().st_size / 2**20:.1f} MiB in {OUT / 'results.tgz'}")


def every_seed(run_dir: Path, name: str) -> bool:
    return all((run_dir / f"seed{s}" / name).exists() for s in SEEDS)


def study() -> None:
    make_union()
    t = time.time()
    run_pool([["prepare", s] for s in ("128", "256", "384")], 3, 1e9, 1e9, "prepare")
    log(f"prepared in {time.time() - t:.0f} s")
    jobs = [["train", *run, str(s)] for run in TRAIN_ORDER for s in SEEDS]
    if QUICK:  # every kind of job once, in a few minutes on a CPU
        jobs = [j for j in jobs if j[2] in ("256_px", "base") or j[1:3] == ["union_holdout", "128"]]
    trained = run_pool(jobs, PARALLEL, TRAIN_UNTIL, TRAIN_KILL, "train")
    (OUT / "trained.jsonl").write_text("\n".join(trained) + "\n")
    finals = [["train", "option", o, "all"] for o in OPTION_RUNS if every_seed(OPTIONS_OUT / o, "result.json")]
    finals += [
        ["train", label, size, "all"]
        for label, size in PROFILE_RUNS
        if every_seed(profile_out(label) / f"task3_{size}px", "result.json")
    ]
    finalised = run_pool(finals, PARALLEL, 1e9, TRAIN_KILL + 40, "finalise")
    (OUT / "finalised.jsonl").write_text("\n".join(finalised) + "\n")
    done = [
        o for o in OPTION_RUNS if every_seed(OPTIONS_OUT / o, "best.pt") and (OPTIONS_OUT / o / "run.json").exists()
    ]
    log(f"options runs with every seed: {done}")
    score_jobs = [
        ["score", r, sp, str(s)] for sp in ("later ISIC releases", "validation", "PH2") for r in done for s in SEEDS
    ]
    scored = run_pool(score_jobs, 14, SCORE_KILL - 45, SCORE_KILL, "score")
    (OUT / "scored.jsonl").write_text("\n".join(scored) + "\n")
    assemble(done)


DATA: dict[str, Path] = {}


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "pack":
        pack()
        return
    DATA.update(use_data())
    if command == "train":
        train(*args)
    elif command == "score":
        score(*args)
    elif command == "prepare":
        prepare(*args)
    elif command == "all":
        OUT.mkdir(parents=True, exist_ok=True)
        study()
    elif command == "session":
        session()
    elif command == "assemble":
        assemble(args)
    else:
        sys.exit(f"unknown command {command!r}: pack, session, all (the study alone), assemble")


if __name__ == "__main__":
    main()
