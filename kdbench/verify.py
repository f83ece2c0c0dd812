"""``kdbench verify RUN_DIR``: re-run one cell from its record and compare.

Bit-identity holds per machine, not across CPUs: on the same CPU model and ISA (the record's provenance
``cpu`` and ``cpu_capability``) a CPU re-run must be bit-identical (final metrics and every per-epoch
metric, timings excluded). On another CPU, torch dispatches to other vector kernels (AVX2 vs AVX-512, other
summation orders), so small differences are expected: the report says the machines differ, and a
cross-machine check compares leaderboards with ``kdbench compare`` instead.

Two kinds of run are compared within :data:`GPU_TOLERANCE_PP` (percentage points; every float metric) when they
are not bit-identical, and the report states the tolerance and the reason (:func:`tolerance_reasons`):

* CUDA (the record or the re-run): kdbench asks for deterministic kernels (:func:`kdbench.runtime.setup`), but
  with ``warn_only`` (ops without a deterministic CUDA kernel warn and stay nondeterministic), and another GPU
  model, driver or library version picks other kernels, so a GPU run is not bit-reproducible.
* ``protocol.precision: bf16``: bfloat16 keeps 8 significant bits, so any change of kernel or summation order
  (another GPU, another CPU ISA, CUDA vs CPU) moves results far more than fp32 rounding does.
* A data-parallel record (``provenance.parallel.world_size`` N > 1, :mod:`kdbench.distributed`): the re-run is one
  process, with the same global batches in the same order, but the gradients are averaged over the processes in
  another summation order (measured on a model without BatchNorm: weights within 1e-8 after 12 steps, equal
  metrics; ``tests/test_distributed.py``). With BatchNorm per process (``protocol.sync_batchnorm`` false) each
  process normalised B / N samples, so such a record differs from one process by more than rounding (measured:
  weights up to 0.03 apart after 12 steps of a small CNN); the tolerance is then a statement, not a guarantee.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kdbench._util import read_json
from kdbench.config import ConfigError, load_config
from kdbench.distill import run_distill

_logger = logging.getLogger(__name__)
TIMING_KEYS = {"time_s", "samples_per_s", "wall_time_s", "train_time_s", "assistant_time_s",
               "retrieval_time_s"}
GPU_TOLERANCE_PP = 0.5
"""The tolerance (percentage points, every float metric) of a CUDA or bf16 run (see the module docstring)."""
#: Provenance keys naming the machine a CPU run is bit-reproducible on.
MACHINE_KEYS = ("cpu", "cpu_capability")


@dataclass
class VerifyReport:
    """The outcome of a verification: ``identical`` (bit for bit), ``within_tolerance`` or ``differs``.

    Attributes:
        status: The verdict.
        device: The device of the re-run.
        differences: One line per differing metric.
        machine: How the record's machine differs from this one (:data:`MACHINE_KEYS`); empty when it is the
            same machine or the record does not say.
        tolerance: The tolerance the metrics were compared within (0: bit for bit).
        reason: Why a tolerance applies (:func:`tolerance_reasons`), empty without one.
    """

    status: str
    device: str
    differences: list[str] = field(default_factory=list)
    machine: list[str] = field(default_factory=list)
    tolerance: float = 0.0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("identical", "within_tolerance")

    def render(self, run_dir: Path) -> str:
        """The verdict in a few lines, with at most 20 differences."""
        if self.status == "identical":
            head = f"identical: {run_dir} re-ran bit for bit on {self.device} (timings excluded)"
        elif self.status == "within_tolerance":
            head = (f"within tolerance: {run_dir} re-ran on {self.device} within {self.tolerance} points, not bit for"
                    " bit")
        else:
            beyond = f" beyond the tolerance of {self.tolerance} points" if self.tolerance else ""
            head = f"DIFFERS: {run_dir} re-ran on {self.device} with {len(self.differences)} differences{beyond}"
        lines = [head]
        if self.reason and self.status != "identical":
            lines.append(f"tolerance {self.tolerance} points (every float metric), because {self.reason}")
        if self.machine and self.status != "identical":
            lines.append(
                f"note: the record was made on another machine ({'; '.join(self.machine)}). Bit-identity holds "
                "per machine (same CPU model and ISA), not across CPUs, so small differences are expected; for "
                "a cross-machine check compare the leaderboards with 'kdbench compare NEW PUBLISHED'"
            )
        return "\n".join([*lines, *(f"  {line}" for line in self.differences[:20])])


def machine_differences(recorded: dict, here: dict) -> list[str]:
    """How two provenance dicts' machines differ (:data:`MACHINE_KEYS`); keys a record lacks are skipped."""
    return [
        f"{key}: {recorded[key]!r} in the record, {here.get(key)!r} here"
        for key in MACHINE_KEYS
        if recorded.get(key) is not None and recorded[key] != here.get(key)
    ]


def tolerance_reasons(record: dict, rerun_provenance: dict) -> list[str]:
    """Why a run may not be bit-reproducible (then compared within :data:`GPU_TOLERANCE_PP`): empty for a fp32 CPU
    run re-run on a CPU.

    Args:
        record: The recorded run (its ``protocol`` and ``provenance``).
        rerun_provenance: The re-run's provenance.
    """
    reasons = []
    devices = {"the record": record["provenance"].get("device", ""), "the re-run": rerun_provenance.get("device", "")}
    cuda = [f"{who} ran on CUDA ({name})" for who, name in devices.items() if name and "cpu" not in name]
    if cuda:
        reasons.append(" and ".join(cuda) + ": GPU kernels are not bit-deterministic (deterministic algorithms are"
                       " requested with warn_only, and other GPUs, drivers or libraries pick other kernels)")
    world = ((record.get("provenance") or {}).get("parallel") or {}).get("world_size", 1)
    rerun_world = (rerun_provenance.get("parallel") or {}).get("world_size", 1)
    if world != rerun_world:
        batchnorm = ("BatchNorm statistics synchronised" if record["provenance"]["parallel"].get("sync_batchnorm")
                     else "BatchNorm, if any, per process over B / N samples")
        reasons.append(f"the record ran in {world} process(es) and the re-run in {rerun_world} (data parallel: the"
                       f" same global batches, gradients averaged in another order; {batchnorm})")
    if (record.get("protocol") or {}).get("precision") == "bf16":
        reasons.append("the protocol computes in bf16 (8 significant bits): another kernel or summation order moves"
                       " results far beyond fp32 rounding")
    return reasons


def judge(run_dir: Path, rerun_dir: Path, record: dict, rerun_provenance: dict) -> VerifyReport:
    """Compares a re-run with the recorded run: ``identical`` bit for bit, else, for a CUDA or bf16 run
    (:func:`tolerance_reasons`), ``within_tolerance`` of :data:`GPU_TOLERANCE_PP` or ``differs``.

    Args:
        run_dir: The recorded run directory.
        rerun_dir: The re-run's directory.
        record: ``run_dir/record.json``.
        rerun_provenance: The re-run's provenance.
    """
    device = rerun_provenance["device"]
    machine = machine_differences(record["provenance"], rerun_provenance)
    exact = compare_runs(run_dir, rerun_dir)
    if not exact:
        return VerifyReport("identical", device, machine=machine)
    reasons = tolerance_reasons(record, rerun_provenance)
    if not reasons:
        return VerifyReport("differs", device, exact, machine)
    loose = compare_runs(run_dir, rerun_dir, tolerance=GPU_TOLERANCE_PP)
    return VerifyReport("differs" if loose else "within_tolerance", device, loose or exact, machine, GPU_TOLERANCE_PP,
                        "; ".join(reasons))


def strip_timings(obj):
    """A copy of a record/epoch row without wall-clock figures (which legitimately differ between runs)."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def _diff(a, b, path: str, out: list[str], tol: float) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k, out, tol)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out, tol)
    elif isinstance(a, float) and isinstance(b, float) and tol > 0:
        if abs(a - b) > tol:
            out.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        out.append(f"{path}: {a!r} != {b!r}")


def compare_runs(original: Path, rerun: Path, tolerance: float = 0.0, cost: bool = True) -> list[str]:
    """Differences between two run directories' metrics (final + per epoch), timings excluded.

    ``cost=False`` leaves out the cost counters, e.g. to compare a live-teacher run with a cached one (which
    count teacher forwards and cache bytes differently by design).
    """
    out: list[str] = []
    a, b = read_json(original / "record.json", "run record"), read_json(rerun / "record.json", "run record")
    _diff(strip_timings(a.get("final")), strip_timings(b.get("final")), "final", out, tolerance)
    if cost:
        _diff(strip_timings(a.get("cost")), strip_timings(b.get("cost")), "cost", out, 0.0)
    ea = [json.loads(line) for line in (original / "epochs.jsonl").read_text().splitlines()]
    eb = [json.loads(line) for line in (rerun / "epochs.jsonl").read_text().splitlines()]
    _diff(strip_timings(ea), strip_timings(eb), "epochs", out, tolerance)
    if a["provenance"]["model_sha256"] != b["provenance"]["model_sha256"] and tolerance == 0.0:
        out.append("provenance.model_sha256: the trained weights differ")
    return out


def plugin_mismatches(record: dict) -> list[str]:
    """How the installed plugins differ from those the record's run used (``provenance.plugins``): one phrase
    per package whose installed version is another, or which is not installed; empty when they match."""
    out = []
    for entry in (record.get("provenance") or {}).get("plugins") or ():
        package, version = entry["package"], entry["version"]
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"plugin {package} {version} made it, and {package} is not installed"
                       f" (pip install '{package}=={version}')")
            continue
        if installed != version:
            out.append(f"plugin {package} {version} made it, but {package} {installed} is installed"
                       f" (pip install '{package}=={version}')")
    return out


def verify(run_dir: Path, config: Path | None = None, keep: Path | None = None) -> VerifyReport:
    """Re-runs the cell of ``run_dir/record.json`` and compares it with the recorded run.

    A run whose method or models came from a plugin is refused when the installed plugin's version is not the
    recorded one (:func:`plugin_mismatches`): the re-run would test other code.

    Only metrics (final, per epoch, cost; timings excluded) and the trained weights' sha256 are compared,
    never the rest of the provenance (commit, CPU, versions), so an identical re-run reads ``identical``; the
    report also names how the record's machine differs from this one (see the module docstring).

    Args:
        run_dir: A run directory written by ``kdbench distill``.
        config: The config file (default: the one named in the record's provenance).
        keep: Where to write the re-run (default: a temporary directory, removed afterwards).
    """
    record = read_json(run_dir / "record.json", "run record")
    if record.get("status") != "ok":
        raise ConfigError(f"{run_dir / 'record.json'}: status is {record.get('status')!r}; only completed runs can be verified")
    if mismatches := plugin_mismatches(record):
        raise ConfigError(f"{run_dir / 'record.json'}: cannot re-run it with other code: {'; '.join(mismatches)};"
                          " install the recorded version to verify this run")
    cfg = load_config(config or record["provenance"]["config_file"])
    if cfg.protocol.hash() != record["protocol_hash"]:
        raise ConfigError(
            f"{cfg.source}: its protocol (hash {cfg.protocol.hash()}) is not the one of {run_dir} "
            f"({record['protocol_hash']}); pass the config the run was made with (--config)"
        )
    ident, inputs = record["identity"], record["inputs"]
    with tempfile.TemporaryDirectory(prefix="kdbench-verify-") as tmp:
        out = keep or Path(tmp) / "rerun"
        new = run_distill(
            cfg, ident["teacher"], ident["student"], ident["method"], ident["seed"], Path(inputs["data"]),
            Path(inputs["teacher_dir"]) if inputs["teacher_dir"] else None,
            {tap: Path(d) for tap, d in inputs["stores"].items()}, out,
        )
        return judge(run_dir, out, record, new.provenance)
