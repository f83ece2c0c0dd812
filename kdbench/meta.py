"""Metadata shared by every stage and by the method contract: what is known about a dataset (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataInfo:
    """What methods and models need to know about a dataset (metadata only)."""

    num_classes: int
    in_chans: int
    image_size: int
    num_train: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def data_info(manifest: dict) -> DataInfo:
    return DataInfo(
        num_classes=manifest["num_classes"],
        in_chans=manifest["channels"],
        image_size=manifest["image_size"][0],
        num_train=manifest["splits"]["train"]["count"],
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
    )
