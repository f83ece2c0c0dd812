"""Run-time set-up shared by every job: device, threads, seeding, provenance."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

import kdbench
from kdbench import distributed
from kdbench.config import Runtime
from kdbench.numerics import Numerics

_logger = logging.getLogger(__name__)
_PACKAGES = ("torch", "torchvision", "timm", "numpy", "h5py", "webdataset", "snakemake")


#: ``CUBLAS_WORKSPACE_CONFIG`` set (unless already set) on CUDA: cuBLAS is deterministic only with a fixed
#: workspace (https://docs.nvidia.com/cuda/cublas/#results-reproducibility).
CUBLAS_WORKSPACE = ":4096:8"


def setup(runtime: Runtime) -> torch.device:
    """Applies the runtime settings and returns the device (``auto``: CUDA when available, else CPU); under
    torchrun with more than one process it joins the job's process group (:func:`kdbench.distributed.init`).

    On CUDA it also asks for determinism (:func:`deterministic_cuda`); on CPU it changes nothing (torch's CPU
    kernels are already deterministic for a fixed thread count, and CPU runs are bit-reproducible as they are).
    """
    torch.set_num_threads(runtime.threads)
    if runtime.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(runtime.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"runtime.device is {runtime.device!r} but CUDA is not available; set runtime.device: auto")
    device = distributed.init(device)  # under torchrun: join the job's processes (cuda:LOCAL_RANK on CUDA)
    if device.type == "cuda":
        deterministic_cuda()
    return device


def deterministic_cuda() -> None:
    """Determinism settings of a CUDA job, applied by :func:`setup` before any CUDA work of the job.

    No cuDNN autotuning (``benchmark`` picks kernels by timing, so two runs may pick different ones), cuDNN's
    deterministic kernels, ``CUBLAS_WORKSPACE_CONFIG`` (:data:`CUBLAS_WORKSPACE`; a value already in the
    environment is kept) and ``torch.use_deterministic_algorithms(True, warn_only=True)``. ``warn_only``: some
    ops used by timm models and methods (e.g. ``index_add_``/scatter-based backward passes, adaptive pooling's
    backward) have no deterministic CUDA kernel, and an error would make those models unusable on a GPU; such
    an op warns instead and the run stays nondeterministic there. That is why ``kdbench verify`` compares a CUDA
    run within :data:`kdbench.verify.GPU_TOLERANCE_PP` instead of bit for bit. The settings actually in effect are
    recorded in every run's provenance (:func:`determinism`).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def determinism(device: torch.device) -> dict:
    """The determinism settings in effect (recorded in provenance); ``CUBLAS_WORKSPACE_CONFIG`` on CUDA only."""
    out = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }
    if device.type == "cuda":
        out["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return out


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


def git_state(root: Path | None = None, dirs: Sequence[str] = SOURCE_DIRS) -> tuple[str, list[str]]:
    """The commit of the kdbench checkout and its uncommitted source files.

    A file under :data:`SOURCE_DIRS` that is modified, staged, deleted or untracked (and not ignored) makes
    the commit ``<sha>+dirty``: a new method file that is not committed yet counts.

    Args:
        root: The checkout (default: the one this kdbench is imported from).
        dirs: The directories, relative to ``root``, whose uncommitted files count (a plugin's: ``(".",)``).

    Returns:
        ``(commit, files)``: the commit (``unknown`` outside git) and the sorted paths, relative to the
        repository's top level, of the uncommitted files (empty when clean).
    """
    root = _repo_root() if root is None else Path(root)
    try:
        rev = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--", *dirs)
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


def plugin_provenance(method: str | None = None, models: Iterable[str] = ()) -> list[dict]:
    """The plugins a run's method and models come from (:mod:`kdbench.plugins`), one entry per package, sorted:
    ``package``, ``version``, what it ``provides`` (``method nkd``, ``model cnn_tiny``), and, when its source
    is a git checkout (an editable install), its ``git_commit`` (``+dirty`` with uncommitted files under the
    package's project directory) and those ``dirty_files``. Empty for built-ins only.

    Args:
        method: The method's registered name (``None``: no method, e.g. a teacher's training).
        models: The timm names of the run's models (teacher, student, assistant).
    """
    from kdbench.methods.base import method_source
    from kdbench.models import split_pruned_name
    from kdbench.plugins import model_source

    used: dict[str, tuple] = {}
    if method is not None and (p := method_source(method)) is not None:
        used.setdefault(p.package, (p, []))[1].append(f"method {method}")
    for model in sorted(set(filter(None, models))):
        if (p := model_source(split_pruned_name(model)[0])) is not None:
            used.setdefault(p.package, (p, []))[1].append(f"model {model}")
    out = []
    for package, (plugin, provides) in sorted(used.items()):
        entry = {"package": package, "version": plugin.version, "provides": provides}
        root = plugin.source_dir
        if root is not None and root.name != "site-packages":
            commit, dirty = git_state(root, (".",))
            if commit != "unknown":
                entry.update(git_commit=commit, dirty_files=dirty)
        out.append(entry)
    return out


def provenance(device: torch.device, numerics: Numerics | None = None) -> dict:
    """Versions, commit (and the uncommitted files that make it ``+dirty``), device and CPU, the determinism
    settings in effect (:func:`determinism`) and, given the ``numerics`` the output was computed in, its
    ``precision`` and ``channels_last``; recorded in every output. ``cpu`` and ``cpu_capability`` name where a
    CPU run is bit-reproducible: on the same CPU model and ISA."""
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
        "determinism": determinism(device),
        **({"precision": numerics.precision, "channels_last": numerics.channels_last} if numerics else {}),
    }
