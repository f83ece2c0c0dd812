"""The tiny workflow on a live SLURM cluster through the user's profile (`workflow/profiles/slurm`).

Needs a running cluster whose nodes see this machine's temporary directory: in CI the single-node cluster of
`.ci/slurm/start.sh` (`.ci/run` starts it and stops it). Without one the test skips, saying so; with
KDBENCH_REQUIRE_SLURM=1 (set by `.ci/run`) it fails instead, so that CI cannot pass without running it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_workflow import ENV, FMNIST, REPO, TINY

from kdbench.plan import Plan
from kdbench.resources import Need, Needs

PROFILE = REPO / "workflow" / "profiles" / "slurm"
# CI-only: the first status check 2 s after a submission (the plugin's default is 40 s); the profile stays as
# users get it.
CI_ARGS = ("--slurm-init-seconds-before-status-checks", "2")
ALT_PARTITION, ALT_ACCOUNT = "alt", "ci"  # .ci/slurm/start.sh's non-default partition and its account
TIMING_COLUMNS = {"wall_time_s", "train_time_s", "assistant_time_s"}
SQUEUE_FORMAT = {"id": "%i", "state": "%T", "partition": "%P", "account": "%a", "cpus": "%C", "mem": "%m",
                 "timelimit": "%l", "nice": "%y", "workdir": "%Z", "comment": "%500k"}


def _slurm_problem() -> str | None:
    """Why no SLURM cluster can run the test, or None."""
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        return "no SLURM client (sbatch, squeue) on PATH"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20, check=False)
        if ping.returncode != 0 or "UP" not in ping.stdout:
            said = (ping.stdout + ping.stderr).strip().splitlines()
            return f"no SLURM controller answers `scontrol ping` ({said[0] if said else ping.returncode})"
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20,
                               check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer ({err})"
    if not any(s.strip("*~#") in {"idle", "mixed", "allocated", "completing"} for s in nodes.stdout.split()):
        return f"no usable SLURM node (sinfo states: {nodes.stdout.split()})"
    return None


def _needs_slurm():
    problem = _slurm_problem()
    if problem is None:
        return
    if os.environ.get("KDBENCH_REQUIRE_SLURM") == "1":
        pytest.fail(f"KDBENCH_REQUIRE_SLURM=1 but {problem}")
    pytest.skip(f"{problem}; start a local single-node cluster with `.ci/slurm/start.sh` (as root)")


def _squeue(workdir: Path, *states: str) -> dict[str, dict[str, str]]:
    """Our jobs (SLURM's working directory is `workdir`), by job id. No states: pending, running, completing;
    `--states=all` also shows jobs that ended less than MinJobAge ago."""
    cmd = ["squeue", "-h", "-o", "|".join(SQUEUE_FORMAT.values())]
    if states:
        cmd.append(f"--states={','.join(states)}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    jobs = {}
    for line in out.splitlines():
        job = dict(zip(SQUEUE_FORMAT, (f.strip() for f in line.split("|"))))
        if job.get("workdir") == str(workdir):
            jobs[job["id"]] = job
    return jobs


def _has_account(account: str) -> bool:
    """Whether the accounting database (if any) knows `account`."""
    try:
        out = subprocess.run(["sacctmgr", "-n", "-P", "list", "account", account, "format=account"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.split() == [account]


def _partitions() -> list[str]:
    """The cluster's partitions, the default one marked with a `*`."""
    return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30,
                          check=True).stdout.split()


def _rule(job: dict[str, str]) -> str:
    return job["comment"].removeprefix("rule_").split("_wildcards_")[0]


STARTED: list[subprocess.Popen] = []


def _start(workdir: Path, *args: str, env=None, profile: bool = True) -> subprocess.Popen:
    """Snakemake on the tiny config in `workdir`, in the background (its output in a log file there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    profile_args = ["--workflow-profile", str(PROFILE), *CI_ARGS] if profile else []
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(TINY), *profile_args, *args]
    log = workdir / f"snakemake-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        # SIGINT back to its default in the child: a test run from a background job (CI scripts often are)
        # inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt, so Snakemake would
        # not see the interrupt this test sends.
        proc = subprocess.Popen(cmd, cwd=workdir, env=env or ENV, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.log = log
    STARTED.append(proc)
    return proc


@pytest.fixture
def _interrupt_leftovers():
    """A failed test leaves no Snakemake running: SIGINT cancels its jobs (SIGTERM would wait for them)."""
    yield
    for proc in STARTED:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    STARTED.clear()


def _output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def _wait(proc: subprocess.Popen, timeout: float, on_poll=None) -> int:
    """Wait for Snakemake; past the timeout, SIGINT it (SIGTERM would wait for every submitted job)."""
    end = time.monotonic() + timeout
    while proc.poll() is None:
        if on_poll:
            on_poll()
        if time.monotonic() > end:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            pytest.fail(f"snakemake did not finish in {timeout:.0f} s:\n{_output(proc)[-4000:]}")
        time.sleep(1)
    return proc.returncode


def _limits(need: Need) -> tuple[str, str]:
    """A job's memory and time limit as squeue prints them (``4000M``, ``30:00``, ``2:10:00``)."""
    hours, minutes = divmod(need.runtime, 60)
    return f"{need.mem_mb}M", f"{hours}:{minutes:02d}:00" if hours else f"{minutes}:00"


def _board(workdir: Path, name: str) -> list[dict[str, str]]:
    """The leaderboard's rows without timings, and without the note on runs whose provenance (git commit,
    dirty files) differs: a developer's checkout may change while the test runs."""
    with open(workdir / "results" / name / "leaderboard" / "leaderboard.csv") as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]
    for row in rows:
        notes = row["notes"].split("; ")
        row["notes"] = "; ".join(n for n in notes if not n.startswith("provenance differs"))
    return rows


def _records(workdir: Path, name: str) -> dict[str, dict]:
    """Per run: what must be bit-identical across executors (no timings, no provenance)."""
    runs = workdir / "results" / name / "runs"
    out = {}
    for path in sorted(runs.rglob("record.json")):
        rec = json.loads(path.read_text())
        cost = {k: v for k, v in rec["cost"].items() if k not in TIMING_COLUMNS}
        out[str(path.relative_to(runs))] = {"final": rec["final"], "identity": rec["identity"], "cost": cost,
                                           "protocol_hash": rec["protocol_hash"], "status": rec["status"]}
    return out


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "train-labels-idx1-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
def test_tiny_workflow_on_slurm_matches_local_and_survives_an_interrupt(tmp_path, _interrupt_leftovers):
    _needs_slurm()
    name = yaml.safe_load(TINY.read_text())["name"]
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    t0 = time.monotonic()

    # 1. The same table twice, at the same time: locally (`--cores 2`, the reference) and through the profile.
    #    Every job the cluster saw is collected while it runs (squeue keeps ended jobs for MinJobAge only).
    seen: dict[str, dict[str, str]] = {}
    earlier = set(_squeue(slurm_dir, "all"))  # an earlier test's, with the same --basetemp

    def collect():
        seen.update({i: j for i, j in _squeue(slurm_dir, "all").items() if i not in earlier})

    local = _start(local_dir, "--cores", "2", profile=False)
    slurm = _start(slurm_dir)
    assert _wait(slurm, 1200, on_poll=collect) == 0, _output(slurm)[-4000:]
    collect()
    assert _wait(local, 1200) == 0, _output(local)[-4000:]
    t1 = time.monotonic()

    # Record for record and row for row the same numbers: CPU runs are bit-identical whatever executes them.
    assert _records(slurm_dir, name) == _records(local_dir, name)
    assert len(_records(slurm_dir, name)) == 8
    assert _board(slurm_dir, name) == _board(local_dir, name)

    # Only the compute rules were queued (gathers are localrules), each with its profile resources, in the
    # cluster's default partition (the profile names none): the teacher with its 2 threads as 2 CPUs, the
    # distill fan-out niced below the critical path.
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job in seen.values():
        by_rule.setdefault(_rule(job), []).append(job)
    counts = {r: len(j) for r, j in by_rule.items()}
    assert counts == {"prepare_data": 1, "train_teacher": 1, "cache_shard": 2, "distill": 8}, seen
    partitions = _partitions()
    default_partition = next(p.rstrip("*") for p in partitions if p.endswith("*"))
    assert {j["partition"] for j in seen.values()} == {default_partition}
    assert {j["state"] for j in seen.values()} == {"COMPLETED"}
    # Memory and time limits: the data job's from the profile, every compute job's own from the plan
    # (kdbench/resources.py).
    plan = Plan.resolve([TINY])
    needs = Needs(plan)
    want = {"prepare_data": {("1", "3000M", "30:00", "0")},
            "train_teacher": {("2", *_limits(needs.teacher(tk)), "0") for tk in plan.teachers.values()},
            "cache_shard": {("1", *_limits(needs.store_shard(sk)), "0") for sk in plan.stores.values()},
            "distill": {("1", *_limits(needs.distill(j)), "100") for j in plan.jobs}}
    for rule, jobs in by_rule.items():
        assert {(j["cpus"], j["mem"], j["timelimit"], j["nice"]) for j in jobs} == want[rule], rule
    logs = slurm_dir / ".snakemake" / "slurm_logs"
    assert {p.name for p in logs.iterdir()} == {f"rule_{r}" for r in want}

    # 2. Two runs lost (their folders deleted, and the leaderboard): their 2 distill jobs are submitted again,
    #    this time to the partition and account named by SBATCH_PARTITION / SBATCH_ACCOUNT where the cluster
    #    has them (.ci/slurm/start.sh's has). SIGINT once both run: Snakemake cancels them and exits; none
    #    stays queued.
    env = dict(ENV)
    if ALT_PARTITION in partitions:
        env["SBATCH_PARTITION"] = ALT_PARTITION
    if _has_account(ALT_ACCOUNT):
        env["SBATCH_ACCOUNT"] = ALT_ACCOUNT
    runs = slurm_dir / "results" / name / "runs"
    lost = sorted(runs.glob("*/*/kd/seed1"))
    assert len(lost) == 2
    for run_dir in [*lost, slurm_dir / "results" / name / "leaderboard"]:
        shutil.rmtree(run_dir)
    kept = {str(p): p.stat().st_mtime_ns for p in runs.rglob("record.json")}
    run = _start(slurm_dir, env=env)
    queued: dict[str, dict[str, str]] = {}
    end = time.monotonic() + 300
    while len(queued) < 2 or {j["state"] for j in queued.values()} != {"RUNNING"}:
        assert run.poll() is None and time.monotonic() < end, _output(run)[-4000:]
        queued = {i: j for i, j in _squeue(slurm_dir).items() if i not in seen and i not in earlier}
        time.sleep(0.5)
    assert [_rule(j) for j in queued.values()] == ["distill", "distill"]
    assert {j["partition"] for j in queued.values()} == {env.get("SBATCH_PARTITION", default_partition)}
    if "SBATCH_ACCOUNT" in env:
        assert {j["account"] for j in queued.values()} == {ALT_ACCOUNT}
    run.send_signal(signal.SIGINT)
    assert run.wait(120) != 0
    t2 = time.monotonic()
    for _ in range(60):  # a cancelled job may stay COMPLETING for a moment
        if not _squeue(slurm_dir):
            break
        time.sleep(0.5)
    assert _squeue(slurm_dir) == {}, "jobs left in the queue after SIGINT"
    ended = _squeue(slurm_dir, "all")
    assert {ended[i]["state"] for i in queued if i in ended} == {"CANCELLED"}, ended

    # 3. The same command again: exactly the two lost runs (the cancelled, incomplete ones) and the
    #    leaderboard, bit-identical to the local run again; the queue is empty afterwards.
    rerun = _start(slurm_dir, env=env)
    assert _wait(rerun, 900) == 0, _output(rerun)[-4000:]
    t3 = time.monotonic()
    assert {str(p): p.stat().st_mtime_ns for p in runs.rglob("record.json") if p.parent not in lost} == kept
    assert all((d / "record.json").exists() for d in lost)
    assert _records(slurm_dir, name) == _records(local_dir, name)
    assert _board(slurm_dir, name) == _board(local_dir, name)
    assert _squeue(slurm_dir) == {}

    # 4. Preemption: one distill job of a 30-epoch copy of the table (baseline: no teacher or store to build),
    #    here and locally. Once the SLURM job has checkpointed an epoch, it gets what the profile's
    #    `--signal=USR1@300` sends before its time limit: SIGUSR1 to the processes of its steps, not the batch
    #    shell (`scancel --signal=USR1`, without --batch/--full). It checkpoints, requeues itself (same job
    #    id, Restarts=1), runs again, resumes and writes the record of the uninterrupted local run.
    distill_extra = yaml.safe_load(PROFILE.joinpath("config.yaml").read_text())["set-resources"]["distill"]
    assert "--signal=USR1@300" in distill_extra["slurm_extra"].split("'")[1].split()
    over = ("--config", "name=tiny-preempt", "protocol={epochs: 30}")
    run_rel = Path("results/tiny-preempt/runs/cnn_s/cnn_xs/baseline/seed0")
    run_dir, before = slurm_dir / run_rel, set(_squeue(slurm_dir, "all"))
    local4 = _start(local_dir, "--cores", "1", str(run_rel / "record.json"), *over, profile=False)
    slurm4 = _start(slurm_dir, str(run_rel / "record.json"), *over)
    end = time.monotonic() + 300

    def distill_job() -> str | None:
        return next((i for i, j in _squeue(slurm_dir).items() if i not in before and _rule(j) == "distill"), None)

    job = None
    while not (run_dir / "checkpoint.pt").exists():  # epoch 1 of 30 done
        assert slurm4.poll() is None and time.monotonic() < end, _output(slurm4)[-4000:]
        job = job or distill_job()
        time.sleep(0.2)
    job = job or distill_job()
    assert job and _squeue(slurm_dir)[job]["state"] == "RUNNING"
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    while (state := _squeue(slurm_dir, "all")[job]["state"]) != "PENDING":  # requeued
        assert state in {"RUNNING", "COMPLETING", "REQUEUED"}, (state, _output(slurm4)[-4000:])
        assert time.monotonic() < end, _output(slurm4)[-4000:]
        time.sleep(0.2)
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True)
    assert "Restarts=1" in shown.stdout.split(), shown.stdout
    import torch  # only this part reads a checkpoint

    held = torch.load(run_dir / "checkpoint.pt", weights_only=True)["epochs_done"]
    assert 1 <= held < 30 and not (run_dir / "record.json").exists()
    # SLURM holds a requeued job for 2 min (BeginTime: its credentials' lifetime); let it start at once.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=30)
    assert _wait(slurm4, 600) == 0, _output(slurm4)[-4000:]
    assert _wait(local4, 600) == 0, _output(local4)[-4000:]
    t4 = time.monotonic()
    record = json.loads((run_dir / "record.json").read_text())
    assert record["provenance"]["resumed_at_epochs"] == [held]
    assert _records(slurm_dir, "tiny-preempt") == _records(local_dir, "tiny-preempt")
    assert len(_records(slurm_dir, "tiny-preempt")) == 1 and not (run_dir / "checkpoint.pt").exists()
    ended = {i: j for i, j in _squeue(slurm_dir, "all").items() if i not in before and _rule(j) == "distill"}
    assert list(ended) == [job] and ended[job]["state"] == "COMPLETED"  # one job, run twice: no retry
    log = next((slurm_dir / ".snakemake" / "slurm_logs" / "rule_distill").rglob(f"{job}.log")).read_text()
    assert f"JOB {job} ON" in log and "DUE TO JOB REQUEUE" in log and log.count("SNAKEMAKE") >= 4  # both runs
    assert "User defined signal 1" not in log  # the Snakemake in the job ignored it (see the Snakefile)
    kd_log = slurm_dir / "results/tiny-preempt/logs/distill/cnn_s/cnn_xs/baseline/seed0.log"
    assert f"resuming after epoch {held}/30" in kd_log.read_text()

    # 5. A data-parallel job through the profile: the same cell in a copy of the table with runtime.processes 2
    #    (its data, teacher and store are the table's: no hash has the processes in it). One job, 2 CPUs (the
    #    rule's threads, no --ntasks: `kdbench --processes 2` starts torchrun in the job), and its record says so.
    #    The processes are a resource, not a param: the finished teacher and cache jobs are not rerun under
    #    Snakemake's default triggers (a 2-process teacher would ask for 4 CPUs: more than this node).
    over = ("--config", "name=tiny-dp", "runtime={processes: 2, device: cpu, threads: 1}")
    dp_rel = Path("results/tiny-dp/runs/cnn_s/cnn_xs/kd/seed0")
    before = set(_squeue(slurm_dir, "all"))
    dp = _start(slurm_dir, str(dp_rel / "record.json"), *over)
    dp_jobs: dict[str, dict[str, str]] = {}
    assert _wait(dp, 600, on_poll=lambda: dp_jobs.update(
        {i: j for i, j in _squeue(slurm_dir, "all").items() if i not in before})) == 0, _output(dp)[-4000:]
    t5 = time.monotonic()
    dp_jobs.update({i: j for i, j in _squeue(slurm_dir, "all").items() if i not in before})
    assert [(_rule(j), j["cpus"], j["state"]) for j in dp_jobs.values()] == [("distill", "2", "COMPLETED")], dp_jobs
    record = json.loads((slurm_dir / dp_rel / "record.json").read_text())
    assert record["provenance"]["parallel"]["world_size"] == 2 and record["provenance"]["parallel"]["backend"] == "gloo"
    assert record["status"] == "ok" and record["cost"]["student_forward"] > 0
    print(f"\nSLURM test: local + SLURM runs {t1 - t0:.0f} s, interrupted run {t2 - t1:.0f} s,"
          f" rerun {t3 - t2:.0f} s, preempted run {t4 - t3:.0f} s, 2-process job {t5 - t4:.0f} s")


# --- the profile's resources, read as Snakemake reads them (no cluster needed) --------------------------------

MODEL_RULES = {"train_teacher", "verify_teacher", "train_assistant", "amd_search", "amd_oracle", "cache_shard",
               "distill"}


def test_every_rule_that_runs_a_model_asks_for_kdbench_gres_and_no_other_does(tmp_path):
    """``KDBENCH_GRES`` reaches exactly the rules that run a model (resources as ``snakemake -n`` resolves them);
    unset, no job asks for a GPU (an empty gres is not passed to sbatch)."""
    def resources(gres: str | None) -> dict[str, set[str]]:
        env = {k: v for k, v in ENV.items() if k != "KDBENCH_GRES"} | ({"KDBENCH_GRES": gres} if gres else {})
        cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(tmp_path / (gres or "none")), "--workflow-profile", str(PROFILE), "--configfile", str(TINY)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        found: dict[str, set[str]] = {}
        for block in out.stdout.split("\nrule ")[1:]:
            rule = block.split(":", 1)[0]
            line = next((ln for ln in block.splitlines() if ln.strip().startswith("resources:")), "")
            found.setdefault(rule, set()).add(next((r.split("=", 1)[1] for r in line.split(", ")
                                                    if r.startswith("gres=")), "<none>"))
        return found

    with_gpu = resources("gpu:1")
    assert {r for r, g in with_gpu.items() if g == {"gpu:1"}} == MODEL_RULES & set(with_gpu)
    assert {"train_teacher", "cache_shard", "distill"} <= set(with_gpu)  # the tiny table's model rules
    assert all(g == {"<none>"} for r, g in with_gpu.items() if r not in MODEL_RULES)  # data jobs and gathers
    assert all(g <= {"", "<none>"} for g in resources(None).values())
