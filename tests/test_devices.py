"""Where training runs and how fast (issue 11): the device and precision chosen for each kind of hardware (capability
checks mocked, since no GPU is here), determinism and the CUDA random stream in checkpoints, the frozen encoder's
features shared by a run's seeds, seeds trained side by side in worker processes, full-size masks read once, and
the GPU check script rehearsed on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from isic_utils.base import devices
from isic_utils.base.devices import resolve_device, resolve_precision
from isic_utils.config import params as P
from isic_utils.model import inference
from isic_utils.model.inference import load_checkpoint
from isic_utils.scoring import metrics
from isic_utils.training import checkpoints, experiments, features
from isic_utils.training.loop import TIMING_COLUMNS

from .conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- precision and device


@pytest.fixture
def hardware(monkeypatch):
    """Pretend hardware: ``set(cuda_bf16=..., cpu_bf16=...)``; records how bf16 support was asked on CUDA."""
    asked = []

    def setup(cuda_bf16: str = "none", cpu_bf16: bool = False):
        def is_bf16_supported(including_emulation: bool = True):
            asked.append(including_emulation)
            return cuda_bf16 == "native" or (cuda_bf16 == "emulated" and including_emulation)

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: cpu_bf16)
        return asked

    return setup


@pytest.mark.parametrize("cuda_bf16, expected", [("native", "bf16"), ("emulated", "fp16"), ("none", "fp16")])
def test_auto_precision_on_a_gpu_is_native_bf16_or_fp16_never_emulated_bf16(hardware, cuda_bf16, expected):
    asked = hardware(cuda_bf16=cuda_bf16)
    assert resolve_precision("auto", "cuda") == expected
    assert asked == [False]  # asked for native support only
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("fp16", "cuda") == "fp16"


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_cpu_is_bf16_only_where_native(hardware, native, expected):
    hardware(cpu_bf16=native)
    assert resolve_precision("auto", "cpu") == expected


def test_fp16_on_a_cpu_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")


def test_fp16_scales_the_loss_and_other_precisions_do_not():
    assert not devices.grad_scaler("fp32", "cpu").is_enabled()
    assert not devices.grad_scaler("bf16", "cuda").is_enabled()
    with warnings.catch_warnings():  # without a GPU, torch warns that CUDA autocast is disabled
        warnings.simplefilter("ignore")
        assert devices.autocast("fp16", "cuda").fast_dtype == torch.float16
    assert devices.autocast("bf16", "cpu").fast_dtype == torch.bfloat16


def test_device_auto_follows_the_gpu_and_cuda_without_one_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="sees no CUDA GPU.*device: auto"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("gpu")


def test_device_jobs_and_deterministic_are_validated_parameters():
    values = P.resolve(
        "train", profile="tiny", overrides={"device": "cpu", "jobs": 2, "deterministic": True}, root=ROOT
    )
    assert (values["device"], values["jobs"], values["deterministic"]) == ("cpu", 2, True)
    with pytest.raises(P.ParameterError) as error:
        P.resolve("train", profile="tiny", overrides={"device": "gpu", "jobs": 0, "precision": "fp8"}, root=ROOT)
    message = str(error.value)
    assert "device must be one of ['auto', 'cpu', 'cuda']" in message and "jobs must be >= 1" in message
    assert "precision must be one of" in message


def test_deterministic_sets_torch_cudnn_and_cublas(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        devices.set_deterministic(True, "cuda")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        devices.set_deterministic(False, "cuda")
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        devices.set_deterministic(False, "cpu")
    assert not torch.backends.cudnn.benchmark


def test_checkpoints_carry_the_cuda_random_stream(monkeypatch):
    cuda_state = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: cuda_state.update(now=state))
    generator = torch.Generator().manual_seed(3)
    saved = checkpoints.rng_state(generator, "cuda")
    assert torch.equal(saved["cuda"], torch.arange(16, dtype=torch.uint8))
    assert "cuda" not in checkpoints.rng_state(generator, "cpu")
    cuda_state["now"] = torch.zeros(16, dtype=torch.uint8)  # the stream moved on after the checkpoint
    checkpoints.set_rng_state(saved, torch.Generator(), "cuda")
    assert torch.equal(cuda_state["now"], torch.arange(16, dtype=torch.uint8))


# ----------------------------------------------------------------------------- runs: records, cache, workers, masks


@pytest.fixture
def run_params(synthetic_root):
    """``run_params(tmp_path, **overrides)``: task 1 on the tiny profile, one epoch, the first 8 images of each split,
    reading the shared data set, with the U-Net decoder (where the run's files go and how seeds share work depends
    neither on the decoder nor on how many images there are; its checkpoints are a third of the report decoder's)."""

    def make(tmp_path: Path, **overrides) -> dict:
        values = {"epochs": 1, "decoder": "unet", "limit": 8, **overrides}
        return tiny_params(tmp_path, synthetic_root, "task1", **values)

    return make


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> str:
    """A fixed encoder state_dict, so every seed starts from the same encoder (as with ImageNet weights)."""
    import torchvision

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "encoder.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    return str(path)


def test_the_device_and_precision_are_recorded(tmp_path, run_params):
    params = run_params(tmp_path, seeds=[0], epochs=1)
    run = experiments.train_run(params, experiments.prepare_data(params, progress=False), verbose=False)
    expected = {"device": "cpu", "precision": resolve_precision("auto"), "deterministic": False}
    info = json.loads((run.run_dir / "run.json").read_text())
    assert {k: info["trained_on"]["0"][k] for k in expected} == expected
    assert info["trained_on"]["0"]["device_name"]  # the CPU's model and extensions
    assert run.seeds_table["device"].tolist() == ["cpu"]
    meta = load_checkpoint(run.run_dir / "seed0" / "best.pt")["meta"]
    assert meta["trained_on"]["device"] == "cpu" and meta["trained_on"]["precision"] == expected["precision"]


def test_seeds_share_the_frozen_encoders_features(tmp_path, monkeypatch, encoder_file, run_params):
    built = []
    encode = features.encode_splits
    monkeypatch.setattr(features, "encode_splits", lambda *a, **k: built.append(1) or encode(*a, **k))
    params = run_params(tmp_path, seeds=[0, 1], encoder_weights=encoder_file)
    shared = experiments.train_run(params, experiments.prepare_data(params, progress=False), verbose=False)
    assert len(built) == 1 and all(fit.used_feature_cache for fit in shared.fits.values())
    # the shared features give seed 1 exactly what features of its own would have
    alone = run_params(tmp_path / "alone", seeds=[1], encoder_weights=encoder_file)
    own = experiments.train_run(alone, experiments.prepare_data(alone, progress=False), verbose=False)
    pd.testing.assert_frame_equal(
        shared.fits[1].history.drop(columns=list(TIMING_COLUMNS)),
        own.fits[1].history.drop(columns=list(TIMING_COLUMNS)),
        check_exact=True,
    )
    # seeds with random encoders of their own never share
    built.clear()
    params = run_params(tmp_path / "random", seeds=[0, 1])
    experiments.train_run(params, experiments.prepare_data(params, progress=False), verbose=False)
    assert len(built) == 2


def test_full_size_masks_are_read_once_for_all_seeds(tiny_data, monkeypatch):
    reads = []
    read = metrics.read_mask
    monkeypatch.setattr(metrics, "read_mask", lambda *a, **k: reads.append(a[0]) or read(*a, **k))
    probabilities = [
        torch.rand(len(tiny_data.test), 1, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (0, 1)
    ]
    both = metrics.original_size_counts(probabilities, tiny_data.test)
    assert len(reads) == len(tiny_data.test)
    for seed in (0, 1):
        assert torch.equal(both[seed], metrics.original_size_counts(probabilities[seed], tiny_data.test))


@pytest.mark.slow  # worker processes, each training two seeds: 43 s, a quarter of the fast tier's wall time
def test_seeds_in_worker_processes_write_their_own_files_and_match_one_process(tmp_path, capsys, run_params):
    """Three seeds, two workers: the third seed waits for a free worker; a worker's error stops the run."""
    params = run_params(tmp_path, seeds=[0, 1, 2], jobs=2, precision="fp32")  # bf16 sums differ more by thread count
    data = experiments.prepare_data(params, progress=False)
    parallel = experiments.train_run(params, data, verbose=True)
    printed = capsys.readouterr().out
    for seed in (0, 1, 2):  # relayed by the parent
        assert f"task1 seed {seed} epoch  1/1" in printed
    run_dir = parallel.run_dir
    for seed in (0, 1, 2):
        assert {p.name for p in (run_dir / f"seed{seed}").iterdir() if not p.name.startswith(".")} == {
            "best.pt",
            "last.pt",
            "history.csv",
            "result.json",
            "test_probabilities.pt",
        }
        assert (run_dir / "tables" / f"per_image_test_seed{seed}.csv").exists()
    assert parallel.seeds_table["seed"].tolist() == [0, 1, 2] and set(parallel.fits) == {0, 1, 2}
    assert json.loads((run_dir / "run.json").read_text())["seeds"] == [0, 1, 2]
    sequential = experiments.train_run(
        run_params(tmp_path / "one", seeds=[0, 1, 2], jobs=1, precision="fp32"), data, verbose=False
    )
    for seed in (0, 1, 2):  # one thread per worker sums in another order: equal to float precision
        pd.testing.assert_frame_equal(
            parallel.fits[seed].history.drop(columns=list(TIMING_COLUMNS)),
            sequential.fits[seed].history.drop(columns=list(TIMING_COLUMNS)),
            rtol=1e-4,
            atol=1e-5,
        )
    # a worker's error (here: the finished seeds refuse another configuration) stops the run with its message
    changed = run_params(tmp_path, seeds=[0, 1, 2], jobs=2, precision="fp32", decoder_lr=5e-4)
    with pytest.raises(inference.CheckpointMismatch, match="decoder_lr: 0.001 → 0.0005"):
        experiments.train_run(changed, data, verbose=False)


# ----------------------------------------------------------------------------- the GPU check script


def test_gpu_check_without_a_gpu_says_so_and_exits_0(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA device here" in printed and "nothing was checked" in printed


@pytest.mark.slow
def test_gpu_check_rehearsed_on_the_cpu_passes_every_check(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("\n\n")[-2]
    for check in (
        "tiny task1",
        "tiny task2",
        "tiny task3",
        "identical histories",
        "identical to the uninterrupted run",
        "bench task2",
        "deploy report (tasks 1-2)",
        "deploy unet (task 3)",
        "images/s at batch 16",
    ):
        assert check in table, table
    assert "FAILED" not in done.stdout


def test_the_gpu_study_trains_every_run_once_what_no_cpu_measured_first(monkeypatch):
    """tools/gpu_study.py's one GPU call starts its training jobs in ``TRAIN_ORDER``: every options run and profile run
    it finalises and scores is there once; after the base and the union at 128 px (the baselines on that GPU), 384 px
    and the later additions alone, which no CPU trained, come before 256 px, zoom-out and the union at 256 px, which a
    CPU with native bf16 measured (a deadline that stops starting jobs then loses what is known, not what is not)."""
    import importlib.util

    monkeypatch.chdir(ROOT)  # the module works from the project's root
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("gpu_study", ROOT / "tools" / "gpu_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    order = list(study.TRAIN_ORDER)
    assert sorted(order) == sorted([("option", o) for o in study.OPTION_RUNS] + list(study.PROFILE_RUNS))
    assert order[0] == ("option", "base")  # every option is compared against it
    measured = [("option", "256_px"), ("option", "zoom-out_augmentation"), ("union_holdout", "256")]
    never = [("option", "384_px"), ("isic2018_holdout", "256")]
    assert order[1] == ("union_holdout", "128")
    assert max(map(order.index, never)) < min(map(order.index, measured))
