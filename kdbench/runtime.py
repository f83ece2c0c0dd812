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


#: Directories whose uncommitted changes (modified or untracked, not ignored) make a run's commit ``+dirty``.
SOURCE_DIRS = ("kdbench", "workflow")


def _repo_root() -> Path:
    return Path(kdbench.__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)


def git_state(root: Path | None = None) -> tuple[str, list[str]]:
    """The commit of the kdbench checkout and its uncommitted source files.

    A file under :data:`SOURCE_DIRS` that is modified, staged, deleted or untracked (and not ignored) makes
    the commit ``<sha>+dirty``: a new method file that is not committed yet counts.

    Args:
        root: The checkout (default: the one this kdbench is imported from).

    Returns:
        ``(commit, files)``: the commit (``unknown`` outside git) and the sorted paths, relative to the
        repository's top level, of the uncommitted files (empty when clean).
    """
    root = _repo_root() if root is None else Path(root)
    try:
        rev = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--", *SOURCE_DIRS)
    except (OSError, subprocess.SubprocessError):
        return "unknown", []
    if rev.returncode != 0 or status.returncode != 0:
        return "unknown", []
    files = _porcelain_paths(status.stdout)
    return rev.stdout.strip() + ("+dirty" if files else ""), files


def _porcelain_paths(out: str) -> list[str]:
    """The paths listed by ``git status --porcelain -z`` (both paths of a rename or copy), sorted."""
    files, entries = set(), iter(out.split("\0"))
    for entry in entries:
        if entry:
            files.add(entry[3:])
            if entry[0] in "RC":  # the next entry is the original path
                files.add(next(entries, ""))
    return sorted(files - {""})


def git_commit(root: Path | None = None) -> str:
    """The commit of the kdbench checkout (``+dirty`` with uncommitted source files), ``unknown`` outside git.

    Args:
        root: The checkout (default: the one this kdbench is imported from).
    """
    return git_state(root)[0]


def cpu_model() -> str:
    """The CPU model (``model name`` of ``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to on this machine (e.g. ``AVX2``, ``AVX512``)."""
    return str(torch.backends.cpu.get_cpu_capability())


def provenance(device: torch.device) -> dict:
    """Versions, commit (and the uncommitted files that make it ``+dirty``), device and CPU, recorded in
    every output. ``cpu`` and ``cpu_capability`` name where a CPU run is bit-reproducible: on the same CPU
    model and ISA."""
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    commit, dirty = git_state()
    return {
        "kdbench_version": kdbench.__version__,
        "git_commit": commit,
        "dirty_files": dirty,
        "packages": packages,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
