"""Each compute job's memory and time limits come from the plan (kdbench.resources), and reach SLURM as they are."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _helpers_store import tiny_raw, write_fmnist_idx
from test_data import make_cifar100
from test_imagefolder import make_folder

from kdbench import cli
from kdbench.errors import ConfigError
from kdbench.plan import Plan, resolve_tables
from kdbench.resources import BASE_MB, MEM_MARGIN, MIN_RUNTIME_MIN, Need, Needs, stage_limits

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflow" / "config"
SLURM = REPO / "workflow" / "profiles" / "slurm"
COMPUTE = {"train_teacher", "verify_teacher", "train_assistant", "cache_shard", "trial", "distill", "distill_tuned"}
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    return write_fmnist_idx(tmp_path_factory.mktemp("fmnist"))


def plan_of(tmp_path: Path, root: Path, **over) -> Plan:
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(root, name="rs", **over), sort_keys=False))
    return Plan.resolve([path])


def need(plan: Plan, label: str = "baseline", **kind) -> Need:
    (job,) = [j for j in plan.jobs if j.label == label]
    return Needs(plan).distill(job, **kind)


def protocol(**over) -> dict:
    return {"epochs": 4, "batch_size": 32, "eval_batch_size": 16, "lr": 0.01, "views": {"count": 3, "seed": 7},
            **over}


# --- memory -------------------------------------------------------------------------------------------------


def test_a_tiny_job_asks_for_its_processes_and_little_more(fmnist, tmp_path):
    n = need(plan_of(tmp_path, fmnist))
    assert BASE_MB * MEM_MARGIN <= n.mem_mb <= BASE_MB * MEM_MARGIN + 500 and n.runtime == MIN_RUNTIME_MIN


def test_memory_grows_with_the_batch_and_with_the_stores_a_job_reads(fmnist, tmp_path):
    small = need(plan_of(tmp_path, fmnist, protocol=protocol(batch_size=32)))
    big = need(plan_of(tmp_path, fmnist, protocol=protocol(batch_size=8192)))
    assert big.mem_mb > small.mem_mb + 1000  # a batch's activations, kept for the backward
    # FitNets reads a feature store: all its views of every training image in memory, so its extra memory over the
    # student alone (which reads none) doubles with the views.
    methods = {"baseline": {}, "fitnet": {}}
    extra = {}
    for views in (400, 800):
        plan = plan_of(tmp_path, fmnist, methods=methods, protocol=protocol(views={"count": views, "seed": 7}),
                       cache={"logits_dtype": "float32", "feature_dtype": "float32"})
        extra[views] = need(plan, "fitnet").mem_mb - need(plan, "baseline").mem_mb
    assert extra[400] >= 1000 and abs(extra[800] - 2 * extra[400]) <= 1000, extra


def test_streamed_data_costs_its_buffers_not_the_dataset(tmp_path):
    root = make_folder(tmp_path / "folder", n_train=12, n_test=2)
    raw = yaml.safe_load((REPO / "tests" / "configs" / "tiny-imagefolder.yaml").read_text())
    held = {}
    for workers in (0, 4):
        raw["data"] = {**raw["data"], "root": str(root), "workers": workers, "stream": True}
        path = tmp_path / f"w{workers}.yaml"
        path.write_text(yaml.safe_dump(raw))
        plan = Plan.resolve([path])
        key = plan.data_key(raw["name"])
        held[workers] = Needs(plan).data_bytes(key, 32)
    image = 3 * raw["data"]["image_size"] ** 2
    assert held[0] == (1000 + 4 * 32) * image  # one process's shuffle buffer and batches
    assert held[4] == 5 * held[0]


# --- time ---------------------------------------------------------------------------------------------------


def test_the_time_limit_follows_the_flops_at_the_configured_throughput(fmnist, tmp_path):
    slow = {"device": "cpu", "threads": 1, "tflops": 1e-7}  # off the 30-minute floor even on tiny data
    one = need(plan_of(tmp_path, fmnist, runtime=slow, protocol=protocol(epochs=4)))
    two = need(plan_of(tmp_path, fmnist, runtime=slow, protocol=protocol(epochs=8)))
    half = need(plan_of(tmp_path, fmnist, runtime={**slow, "tflops": 2e-7}, protocol=protocol(epochs=4)))
    assert one.runtime > 3 * MIN_RUNTIME_MIN
    assert two.runtime == pytest.approx(2 * one.runtime, rel=0.05)
    assert half.runtime == pytest.approx(one.runtime / 2, rel=0.05)
    # A trial trains the budget's epochs and is scored on val only: less time than the run it tunes.
    plan = plan_of(tmp_path, fmnist, runtime=slow, protocol=protocol(epochs=4),
                   tune={"trials": 2, "budget": {"epochs": 1}})
    job = plan.jobs[0]
    assert Needs(plan).trial(job).runtime < Needs(plan).distill(job).runtime / 3
    # ... and on a training subset (tune.budget.train_limit), less again
    subset = plan_of(tmp_path, fmnist, runtime=slow, protocol=protocol(epochs=4),
                     tune={"trials": 2, "budget": {"epochs": 1, "train_limit": 64}})
    assert Needs(subset).trial(subset.jobs[0]).runtime < Needs(plan).trial(job).runtime


def test_amds_search_counts_its_jointly_trained_candidates_and_the_oracle_its_epochs(fmnist, tmp_path):
    slow = {"device": "cpu", "threads": 1, "tflops": 1e-7}

    def amd(**params):
        plan = plan_of(tmp_path, fmnist, runtime=slow, protocol=protocol(epochs=6),
                       methods={"baseline": {}, "amd": {"grid_step": 0.3, **params}})
        (ak,) = [tk for tk in plan.teachers.values() if tk.label == "amd"]
        return Needs(plan), ak

    (n1, a1), (n3, a3) = amd(sandwich=1, joint_epochs=2), amd(sandwich=3, joint_epochs=2)
    # a joint step trains the largest candidate and `sandwich` others: 2 copies against 4
    assert n3.search(a3).runtime == pytest.approx(2 * n1.search(a1).runtime, rel=0.05)
    n4, a4 = amd(sandwich=1, joint_epochs=4, oracle_epochs=4)
    assert n4.search(a4).runtime == pytest.approx(2 * n1.search(a1).runtime, rel=0.05)
    # the search trains teacher-sized candidates: above the assistant's own training (one copy, its epochs)
    assert n1.search(a1).runtime > n1.teacher(a1).runtime * 2 / 6
    # an oracle run: one student from a live candidate for the oracle epochs (a third of the protocol's by default)
    _, a_default = amd()
    n2, a2 = amd(oracle_epochs=2)
    assert n4.oracle(a4, "cnn_xs").runtime == pytest.approx(2 * n2.oracle(a2, "cnn_xs").runtime, rel=0.05)
    assert amd()[0].oracle(a_default, "cnn_xs") == n2.oracle(a2, "cnn_xs")  # 6 / 3 = 2 epochs
    (job,) = [j for j in n2.plan.jobs if j.label == "baseline"]
    assert n2.oracle(a2, "cnn_xs").runtime > n2.distill(job, epochs=2).runtime  # plus the candidate's forwards


def test_a_bad_throughput_is_one_line_naming_the_key(fmnist, tmp_path):
    with pytest.raises(ConfigError, match=r"key 'runtime.tflops' must be a number > 0"):
        plan_of(tmp_path, fmnist, runtime={"tflops": 0})


def test_the_estimate_prints_each_stages_largest_limits(fmnist, tmp_path, capsys):
    plan = plan_of(tmp_path, fmnist, methods={"baseline": {}, "kd": {}, "takd": {"assistant": "cnn_xs"}})
    limits = stage_limits(plan, "rs")
    assert set(limits) == {"teachers", "assistants", "store shards", "distill"}
    assert limits["distill"] == max((Needs(plan).distill(j) for j in plan.jobs), key=lambda n: n.mem_mb)
    cli.main(["plan", "--configfile", str(next(tmp_path.glob("c*.yaml"))), "--estimate"])
    out = capsys.readouterr().out
    assert "job limits on a cluster" in out and re.search(r"distill\s+\d+\.\dGB\s+0h30m", out), out


# --- what SLURM is asked for --------------------------------------------------------------------------------


def dry_run_resources(workdir: Path, config: Path, *overrides: str) -> dict[tuple[str, str], tuple[int, int]]:
    """``snakemake -n --workflow-profile <slurm>``: (rule, wildcards) -> (mem_mb, runtime) of every job."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "-n", "--workflow-profile", str(SLURM), "--configfile", str(config), "--config", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out.stdout + out.stderr):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"resources: .*?mem_mb=(\d+),.*?runtime=(\d+)", block)
        if rule and res:
            wildcards = re.search(r"wildcards: (.*)", block)
            jobs[rule[1], wildcards[1] if wildcards else ""] = (int(res[1]), int(res[2]))
    return jobs


def wildcards(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(", "))


def expected(plan: Plan, rule: str, w: dict[str, str]) -> Need:
    needs = Needs(plan)
    if rule in ("distill", "distill_tuned", "trial"):
        job = plan.job(w["table"], w["teacher"], w["student"], w["label"], w["seed"])
        return needs.trial(job) if rule == "trial" else needs.distill(job)
    if rule == "cache_shard":
        return needs.store_shard(plan.store(w["key"], w["spec"], w["tapdir"]))
    if rule in ("train_teacher", "verify_teacher"):
        tk = plan.teachers[w["tkey"]]
        return needs.teacher(tk) if rule == "train_teacher" else needs.verify(tk)
    return needs.teacher(plan.teachers[w["akey"]])


@pytest.mark.slow
def test_the_slurm_profile_passes_each_jobs_own_limits_for_cifar100_and_imagenet(tmp_path):
    """Per rule, every job of the two GPU-scale configs asks SLURM for exactly the plan's limits (none of the
    profile's old fixed 3000 MB / 120 min), and longer or larger jobs ask for more."""
    cifar = tmp_path / "cifar"
    make_cifar100(cifar, n_train=120, n_test=30)
    folder = make_folder(tmp_path / "folder", n_train=12, n_test=2)
    ckpt = {t: tmp_path / f"{t}.pth" for t in ("resnet34", "resnet50")}
    for path in ckpt.values():
        path.write_bytes(b"a state dict")
    cases = {
        "cifar100": (CONFIGS / "cifar100.yaml", {
            "data": {"root": str(cifar), "val_size": 20, "shard_size": 50},
            "select": {"pairs": [["resnet56", "resnet20"], ["resnet32x4", "resnet8x4"]], "methods": ["kd", "crd"],
                       "seeds": [0]},
            "runtime": {"tflops": 0.001}}),
        "imagenet": (CONFIGS / "imagenet.yaml", {
            "data": {"root": str(folder), "val_size": 4, "shard_size": 4, "shards_per_job": 2},
            "teachers": {t: {"checkpoint": str(p)} for t, p in ckpt.items()},
            "select": {"methods": ["baseline", "kd"], "seeds": [0]},
            "runtime": {"tflops": 0.001}}),
    }
    asked = {}
    for name, (config, over) in cases.items():
        jobs = dry_run_resources(tmp_path / name, config, *(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                                          for k, v in over.items()))
        plan = Plan(resolve_tables([config], over))
        rules = {rule for rule, _ in jobs}
        assert {"train_teacher", "cache_shard", "distill", "trial", "distill_tuned"} <= rules, rules
        for (rule, w), got in jobs.items():
            if rule not in COMPUTE:  # data jobs and gathers: the profile's fixed limits
                continue
            want = expected(plan, rule, wildcards(w))
            assert got == (want.mem_mb, want.runtime), (name, rule, w)
        asked[name] = jobs
    distill = {name: [v for (rule, _), v in jobs.items() if rule == "distill"] for name, jobs in asked.items()}
    trial = {name: [v for (rule, _), v in jobs.items() if rule == "trial"] for name, jobs in asked.items()}
    # 224-px ImageNet students ask for more memory than 32-px CIFAR ones, and a trial less time than a full run.
    assert min(m for m, _ in distill["imagenet"]) > max(m for m, _ in distill["cifar100"])
    for name in asked:
        assert max(t for _, t in trial[name]) < min(t for _, t in distill[name])
    assert all(v != (3000, 120) for jobs in asked.values() for (rule, _), v in jobs.items() if rule in COMPUTE)
