"""The cache stage of the workflow, seen from ``snakemake -n``, and the config validator of the cache policy.

Adding a method that declares a new teacher tap (FitNet: ``feature[-2]``) must add exactly one store: one
``cache_shard`` job per training shard plus its ``cache_manifest``, and the method's distill jobs; nothing else.
The dataset is a tiny synthetic Fashion-MNIST in IDX format (the dry run reads its split sizes).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_store import tiny_raw, write_config, write_fmnist_idx

from kdbench.config import load_config, parse_config
from kdbench.data.sources import shard_counts
from kdbench.errors import ConfigError
from kdbench.plan import Plan

REPO = Path(__file__).resolve().parents[1]


def dry_run(workdir: Path, config: Path) -> tuple[dict[str, int], set[str]]:
    """Runs ``snakemake -n`` and returns the job-count table and the outputs of the planned jobs."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(workdir), "--configfile", str(config)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    outputs = set(re.findall(r"^\s+output: (\S+)", out.stdout, re.M))
    return counts, outputs


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    return write_fmnist_idx(tmp_path_factory.mktemp("raw"))


def test_adding_fitnet_adds_one_store_and_its_distill_jobs_only(raw_root, tmp_path):
    over = {"students": ["cnn_xs", "vit_pico_patch4"], "seeds": [0, 1]}
    base = tiny_raw(raw_root, methods={"baseline": {}, "kd": {}}, **over)
    more = tiny_raw(raw_root, methods={"baseline": {}, "kd": {}, "fitnet": {}}, **over)
    before, out_before = dry_run(tmp_path / "a", write_config(tmp_path / "a.yaml", base))
    after, out_after = dry_run(tmp_path / "b", write_config(tmp_path / "b.yaml", more))

    shards = shard_counts(parse_config(base).data)["train"]
    assert shards == 3
    cells = len(more["teachers"]) * len(more["students"]) * len(more["seeds"])
    delta = {job: after.get(job, 0) - before.get(job, 0) for job in set(before) | set(after)}
    expected = {"cache_shard": shards, "cache_manifest": 1, "distill": cells, "total": shards + 1 + cells}
    assert {k: v for k, v in delta.items() if v} == expected
    assert before["cache_shard"] == shards and before["cache_manifest"] == 1  # kd's logits store

    # The new jobs are exactly the feature[1] store of the teacher (cnn_s has 3 stages: -2 -> 1) and fitnet's
    # jobs, at the paths the plan gives (the workflow builds no path of its own).
    plan = Plan.resolve([tmp_path / "b.yaml"])
    store = plan.stores[next(d for d in plan.stores if d.endswith("/feature_1"))]
    new = out_after - out_before
    assert new == set(plan.store_shards(store.dir)) | {f"{store.dir}/manifest.json"} | {
        f"{j.run_dir}/record.json" for j in plan.jobs if j.label == "fitnet"}
    assert store.teacher.key.startswith("t-") and store.tap == "feature[1]"
    assert out_before <= out_after


@pytest.mark.parametrize("method", ["dkd", "dist"])
def test_topk_cache_with_a_full_logits_method_is_rejected_at_parse_time(raw_root, tmp_path, method):
    raw = tiny_raw(raw_root, cache={"topk": 5}, methods={"baseline": {}, "kd": {}, f"my_{method}": {"method": method}})
    path = write_config(tmp_path / "grid.yaml", raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and f"'my_{method}'" in msg and "'cache.topk'" in msg
    assert "Fix: remove 'cache.topk'" in msg


def test_topk_cache_is_accepted_when_no_method_needs_full_logits(raw_root):
    cfg = parse_config(tiny_raw(raw_root, cache={"topk": 5}, methods={"baseline": {}, "kd": {}, "fitnet": {}}))
    assert cfg.cache.topk == 5
