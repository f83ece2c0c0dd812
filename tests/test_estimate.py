"""``kdbench plan --estimate``: jobs per stage and FLOPs from each model's counted forward FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdbench import cli
from kdbench.estimate import Stage, estimate, forward_flops
from kdbench.plan import Plan

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def test_forward_flops_are_counted_on_the_real_forward():
    # RepDistiller's vgg8 on 32 x 32: five 3x3 convs (pooling to 16, 8, 4 between the first four) and the head.
    macs = (3 * 64 * 9 * 32 * 32 + 64 * 128 * 9 * 16 * 16 + 128 * 256 * 9 * 8 * 8 + 256 * 512 * 9 * 4 * 4
            + 512 * 512 * 9 * 4 * 4 + 512 * 100)
    assert forward_flops("vgg8_cifar", 100, 3, 32) == 2 * macs


def _plan(tmp_path, **over) -> Plan:
    raw = yaml.safe_load(TINY.read_text())
    raw.update(over)
    path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Plan.resolve([path])


def _stages(plan: Plan) -> dict[str, Stage]:
    (stages,) = estimate(plan).values()
    return {s.name: s for s in stages}


@pytest.fixture
def fmnist():
    if not Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz").exists():
        pytest.skip("needs dataset-fashion-mnist")


def test_the_estimate_follows_the_plan(tmp_path, fmnist):
    base = _stages(_plan(tmp_path))
    raw = yaml.safe_load(TINY.read_text())
    n_jobs = len(raw["students"]) * len(raw["methods"]) * len(raw["seeds"])
    assert base["distill"].jobs == n_jobs and base["teachers"].jobs == 1 and base["assistants"].jobs == 0
    # 512 training images (train_limit, after the 256 val images are held out), 1 epoch: 3 forwards per training
    # image, one per val and test image.
    flops = sum(forward_flops(s, 10, 1, 28) for s in raw["students"]) * len(raw["methods"]) * len(raw["seeds"])
    assert base["distill"].flops == flops * (3 * 512 + 256 + 512)
    longer = _stages(_plan(tmp_path, protocol={**raw["protocol"], "epochs": 2}))
    assert longer["distill"].flops == 2 * base["distill"].flops
    # A teacher from a checkpoint is not trained: it costs nothing here.
    ckpt = tmp_path / "t.pth"
    ckpt.write_bytes(b"weights")
    loaded = _stages(_plan(tmp_path, teachers={"cnn_s": {"model": "cnn_s", "checkpoint": str(ckpt)}}))
    assert loaded["teachers"].jobs == 0 and loaded["teachers"].flops == 0
    # A live teacher pays its forward in every epoch instead of a store.
    live = _stages(_plan(tmp_path, methods={"baseline": {}, "kd": {"teacher_source": "live"}}))
    assert live["store shards"].jobs == 0 and live["distill"].flops > base["distill"].flops
    assert base["distill"].gpu_hours(10) == pytest.approx(base["distill"].flops / 1e13 / 3600)


def test_the_plan_command_prints_the_estimate(tmp_path, fmnist, capsys):
    cli.main(["plan", "--configfile", str(TINY), "--estimate", "--gpu-tflops", "20"])
    out = capsys.readouterr().out
    assert "compute estimate at 20 TFLOP/s" in out and "distill" in out and "total" in out
