"""Run-time set-up shared by every job: device, threads, seeding, provenance."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

import kdbench
from kdbench.config import Runtime

_logger = logging.getLogger(__name__)
_PACKAGES = ("torch", "torchvision", "timm", "numpy", "h5py", "webdataset", "snakemake")


def setup(runtime: Runtime) -> torch.device:
    """Applies the runtime settings and returns the device (``auto``: CUDA when available, else CPU)."""
    torch.set_num_threads(runtime.threads)
    if runtime.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(runtime.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"runtime.device is {runtime.device!r} but CUDA is not available; set runtime.device: auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str:
    """The commit of the kdbench checkout (``+dirty`` if modified), or ``unknown`` outside git."""
    root = Path(kdbench.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "kdbench"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: torch.device) -> dict:
    """Versions, commit and device, recorded in every output."""
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "kdbench_version": kdbench.__version__,
        "git_commit": git_commit(),
        "packages": packages,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch_threads": torch.get_num_threads(),
    }
