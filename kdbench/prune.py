"""Structured pruning of a staged CNN teacher into nested, weight-sharing candidates (AMD's teacher assistants).

Three steps, each a pure function of the teacher:

1. :func:`sort_channels`: every group of coupled channels (a conv's filters with its BN, the next layers'
   input channels and, in a ResNet, every layer joined by an identity shortcut; found by ``torch-pruning``'s
   dependency graph) is permuted in decreasing order of its L2 group magnitude
   (``torch_pruning.importance.GroupMagnitudeImportance(p=2)``). A permutation is function-preserving: the
   sorted teacher computes the same outputs.
2. :func:`candidate_grid`: the candidates' widths, one uniform keep ratio per candidate (every group keeps the
   same fraction of its channels), found by bisection so that the parameter count is as close as possible to
   the target scale times the teacher's; the last stage's width is then adjusted by a few channels where
   rounding small widths is too coarse to come within 2% of the target.
3. :func:`slice_state`: a candidate's weights are the leading channels of every group of the sorted teacher,
   i.e. a prefix slice of each tensor. Candidate k's kept channels are therefore a subset of candidate k+1's
   (nested), and all candidates share one set of weights: slicing a tensor that requires gradients gives
   views whose gradients accumulate into the shared tensor (:func:`torch.func.functional_call`).

A pruned candidate is an ordinary model of the teacher's family with other widths
(:func:`kdbench.models.pruned_name`, e.g. ``cnn_m:w13-26-51``), so it can be saved, loaded, cached and
distilled from like any teacher.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kdbench.models import create_model, pruned_name, split_pruned_name, staged_widths

CLASSIFIER_INPUT = "<classifier input>"
"""Key of :func:`sort_channels`'s result for the order of the channels that feed the classifier (the last
feature stage's)."""


@dataclass(frozen=True)
class Candidate:
    """One teacher-assistant candidate.

    Attributes:
        index: Position on the grid (0 = smallest).
        scale: Target parameter ratio to the teacher.
        name: The pruned model's name (``<teacher>:w<widths>``).
        widths: Its widths (:func:`kdbench.models.staged_widths` order).
        params: Its parameter count.
        ratio: ``params`` over the teacher's parameter count.
    """

    index: int
    scale: float
    name: str
    widths: tuple[int, ...]
    params: int
    ratio: float

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "scale": self.scale,
            "name": self.name,
            "widths": list(self.widths),
            "params": self.params,
            "ratio": self.ratio,
        }


def _permute(module: nn.Module, handler: str, order: torch.Tensor) -> None:
    """Permutes one layer's output (``prune_out_channels``) or input (``prune_in_channels``) channels."""
    out = handler == "prune_out_channels"
    if isinstance(module, nn.BatchNorm2d):
        for t in (module.weight, module.bias, module.running_mean, module.running_var):
            if t is not None:
                t.data = t.data[order]
    elif isinstance(module, (nn.Conv2d, nn.Linear)):
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"grouped convolution {module} cannot be sorted channel-wise")
        module.weight.data = module.weight.data[order] if out else module.weight.data[:, order]
        if out and module.bias is not None:
            module.bias.data = module.bias.data[order]
    elif any(True for _ in module.parameters(recurse=False)):
        raise ValueError(f"cannot sort the channels of a {type(module).__name__} layer")


def sort_channels(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sorts every prunable channel group of ``model`` in place by decreasing L2 group magnitude.

    The classifier's outputs (the classes) are never sorted.

    Args:
        model: A staged CNN (in eval mode for the trace; its function is unchanged).
        example: An input batch for tracing, e.g. ``zeros(1, C, H, W)``.

    Returns:
        For each sorted group, the name of the layer whose output channels it roots -> the applied order
        (``order[i]`` = the original channel now at position ``i``); the classifier's input group is also
        under :data:`CLASSIFIER_INPUT`.
    """
    import torch_pruning as tp  # imported here: only the AMD search needs it

    names = {m: n for n, m in model.named_modules()}
    head = model.get_classifier()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)  # traces with autograd
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    orders: dict[str, torch.Tensor] = {}
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        items = [(dep.target.module, dep.handler.__name__, idxs) for dep, idxs in group]
        root, handler, _ = items[0]
        if root is head and handler == "prune_out_channels":
            continue
        with torch.no_grad():
            scores = importance(group)
        order = torch.argsort(scores.detach().cpu(), descending=True, stable=True)
        for module, handler, idxs in items:
            if len(idxs) != len(order):
                raise ValueError(
                    f"channel group of {names[root]} is not one-to-one ({len(idxs)} vs {len(order)})"
                )
            _permute(module, handler, order)
            if module is head and handler == "prune_in_channels":
                orders[CLASSIFIER_INPUT] = order
        orders[names[root]] = order
    return orders


def param_count(name: str, num_classes: int, in_chans: int, img_size: int) -> int:
    """Parameters of a model, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = create_model(name, num_classes, in_chans, img_size)
    return sum(p.numel() for p in model.parameters())


def scaled_widths(widths: tuple[int, ...], keep: float) -> tuple[int, ...]:
    """Every width times ``keep``, rounded, at least 1 (equal widths stay equal: coupled groups stay coupled)."""
    return tuple(max(1, round(w * keep)) for w in widths)


def candidate_grid(
    teacher: str, num_classes: int, in_chans: int, img_size: int, min_scale: float, step: float = 0.1
) -> list[Candidate]:
    """The AMD grid: one candidate per scale ``k * step`` strictly between ``min_scale`` and 1.

    Args:
        teacher: The teacher's model name (a staged CNN).
        num_classes, in_chans, img_size: The dataset's.
        min_scale: The largest student's parameter ratio to the teacher (candidates are larger).
        step: Grid step.

    Raises:
        ValueError: No scale fits, or a scale has no widths larger than the previous candidate's.
    """
    base, _ = split_pruned_name(teacher)
    widths = staged_widths(teacher)
    total = param_count(teacher, num_classes, in_chans, img_size)
    count: dict[tuple[int, ...], int] = {}

    def params(w: tuple[int, ...]) -> int:
        if w not in count:
            count[w] = param_count(pruned_name(base, w), num_classes, in_chans, img_size)
        return count[w]

    scales = [round(k * step, 10) for k in range(1, int(1 / step) + 1) if min_scale < k * step < 1 - 1e-9]
    if not scales:
        raise ValueError(f"no grid scale between the student's ratio {min_scale:.3f} and 1 at step {step}")
    out: list[Candidate] = []
    for i, scale in enumerate(scales):
        target = scale * total
        lo, hi = 0.0, 1.0
        for _ in range(40):  # params(scaled_widths(keep)) is non-decreasing in keep
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if params(scaled_widths(widths, mid)) < target else (lo, mid)
        # The uniform widths, then the last (widest) stage nudged by a few channels, which refines the count
        # where rounding small widths is coarse; nesting needs every width >= the previous candidate's.
        prev = out[-1].widths if out else (0,) * len(widths)
        options = [scaled_widths(widths, k) for k in (lo, hi)]
        options += [
            (*w[:-1], w[-1] + d) for w in options[:2] for d in range(-4, 5) if 1 <= w[-1] + d <= widths[-1]
        ]
        options = [w for w in options if all(a >= b for a, b in zip(w, prev)) and w != prev]
        if not options:
            raise ValueError(
                f"grid step {step} is too fine for {teacher}: scale {scale} has no widths above"
                f" the previous candidate's {prev}"
            )
        w = min(options, key=lambda w: (abs(params(w) - target), w))
        n = params(w)
        out.append(Candidate(i, scale, pruned_name(base, w), w, n, n / total))
    return out


def slice_state(
    shared: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A candidate's tensors: the leading slice of every shared tensor, of the candidate's own shape.

    Args:
        shared: The sorted teacher's tensors (parameters and/or buffers).
        target: The candidate's tensors of the same names (only their shapes are read).

    Returns:
        Name -> view of the shared tensor (gradients flow back into ``shared``).
    """
    out = {}
    for name, t in target.items():
        s = shared[name]
        if s.dim() != t.dim() or any(a > b for a, b in zip(t.shape, s.shape)):
            raise ValueError(f"{name}: candidate shape {tuple(t.shape)} is not a prefix of {tuple(s.shape)}")
        out[name] = s[tuple(slice(0, n) for n in t.shape)] if s.dim() else s
    return out


@functools.cache
def _assistant_grid(
    teacher: str, students: tuple[str, ...], num_classes: int, in_chans: int, img_size: int, step: float
) -> tuple[Candidate, ...]:
    t_params = param_count(teacher, num_classes, in_chans, img_size)
    s_params = max(param_count(s, num_classes, in_chans, img_size) for s in students)
    return tuple(candidate_grid(teacher, num_classes, in_chans, img_size, s_params / t_params, step))


def assistant_grid(
    teacher: str, students: Sequence[str], num_classes: int, in_chans: int, img_size: int, step: float
) -> list[Candidate]:
    """AMD's grid for a table: from its largest student's parameter ratio to the teacher (one search per
    (table, teacher), shared by every student). Computed once per process: the workflow's plan asks for it
    from several rules."""
    return list(_assistant_grid(teacher, tuple(students), num_classes, in_chans, img_size, step))
