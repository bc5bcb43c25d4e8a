"""Where and how fast a run computes: the device (``auto``: the GPU when torch sees one), the autocast precision
(``auto``: bf16 only where the hardware computes it natively — a CPU with AMX or AVX512-BF16, a GPU with native bf16 —
fp16 with a ``GradScaler`` on an older GPU, fp32 elsewhere; emulated bf16 is never chosen), deterministic kernels,
seeding, threads, and what the machine is (for the records a run writes).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


DEVICES = ("auto", "cpu", "cuda")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AMX tiles or AVX512-BF16)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch
        return False


def cuda_has_native_bf16() -> bool:
    """True when the current GPU computes bf16 natively (Ampere and later), not through emulation."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation and answers for native support only
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """The autocast precision a run uses: ``fp32``, ``bf16`` or ``fp16`` (CUDA only, with a ``GradScaler``).

    ``auto``: on a GPU, bf16 where it is native (A100, H100, L4…), else fp16 (T4, V100); on a CPU, bf16 with AMX or
    AVX512-BF16, else fp32. Emulated bf16 (many times slower than fp32) is never chosen by ``auto``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    cuda = device.startswith("cuda")
    if precision == "fp16" and not cuda:
        raise ValueError(
            "precision 'fp16' is for CUDA GPUs (autocast with a gradient scaler); on a CPU use 'auto', "
            "'fp32' or 'bf16'."
        )
    if precision != "auto":
        return precision
    if cuda:
        return "bf16" if cuda_has_native_bf16() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: str):
    kind = "cuda" if device.startswith("cuda") else "cpu"
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(kind, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def grad_scaler(precision: str, device: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its gradients underflow without it); a no-op for every other precision."""
    return torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu", enabled=precision == "fp16")


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error naming the fix."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for, but torch {torch.__version__} sees no CUDA GPU. Fix: device: auto "
            "(the GPU when there is one, else the CPU) or cpu; in Colab, Runtime → Change runtime type → GPU."
        )
    return device


def device_name(device: str) -> str:
    """What the device is, for run.json: the GPU's name, or the CPU's model and its vector extensions."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({', '.join(cpu_flags()) or 'no AVX2'})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's vector extensions that decide the speed of training here: AVX2, AVX-512, AVX512-BF16, AMX."""
    checks = {
        "AVX2": "_is_avx2_supported",
        "AVX-512": "_is_avx512_supported",
        "AVX512-BF16": "_is_avx512_bf16_supported",
        "AMX": "_is_amx_tile_supported",
    }
    found = []
    for name, check in checks.items():
        try:
            if getattr(torch.cpu, check)():
                found.append(name)
        except AttributeError:
            pass
    return found


def set_deterministic(on: bool, device: str) -> None:
    """Deterministic kernels or the fastest ones (``torch.use_deterministic_algorithms``, cuDNN, cuBLAS).

    On a GPU, same-seed runs then give the same history; it costs speed (cuDNN benchmarking is off). Ops without
    a deterministic kernel warn instead of stopping the run. ``CUBLAS_WORKSPACE_CONFIG`` must be set before cuBLAS
    starts: this sets it unless the environment already does, which works when no GPU work ran before.
    """
    cuda = device.startswith("cuda")
    if on and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = cuda and not on


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (dropout, initialisation) and return a generator for shuffling/augmentation."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(threads: int | None = None) -> int:
    """Use one compute thread per CPU the OS reports (``os.cpu_count()``: hyper-threads count) unless told otherwise
    (``OMP_NUM_THREADS`` wins); returns the number in use."""
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, os.cpu_count() or 1)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
