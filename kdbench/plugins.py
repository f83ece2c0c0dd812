"""Plugins: methods and models from a researcher's own installed package, discovered by entry points.

A package adds methods and models to kdbench without a fork by declaring entry points in its
``pyproject.toml``::

    [project.entry-points."kdbench.methods"]
    nkd = "my_kd.nkd:NKD"               # a DistillMethod subclass; the entry point's name is its name

    [project.entry-points."kdbench.models"]
    cnn_tiny = "my_kd.models:cnn_tiny"  # a timm-style model function (pretrained=False, **kwargs)

Discovery is lazy and happens once per process: the method registry loads :data:`METHOD_GROUP` the first time
it is read (:class:`kdbench.registry.Registry`'s loader), :mod:`kdbench.models` loads :data:`MODEL_GROUP` the
first time it creates or checks a model. Every ``kdbench`` command and the Snakefile (which imports kdbench)
therefore see a plugin exactly as they see a built-in. A name that is already taken (by a built-in, timm or
another plugin) is refused with both sources named (:class:`PluginError`).

This module knows where a plugin comes from (:class:`Plugin`: distribution, version, entry point, source
directory); the run's provenance adds its git state (:func:`kdbench.runtime.plugin_provenance`).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdbench.errors import KdbenchError

_logger = logging.getLogger(__name__)

METHOD_GROUP = "kdbench.methods"
MODEL_GROUP = "kdbench.models"
BUILT_IN = "built-in"
"""The source of a method or model that ships with kdbench (or timm)."""


class PluginError(KdbenchError, ValueError):
    """An installed plugin that cannot be used: its entry point does not load, names the wrong object, or
    takes a name that is already registered."""


@dataclass(frozen=True)
class Plugin:
    """Where a plugin's method or model comes from.

    Attributes:
        package: The distribution's name (``kdbench-plugin-example``).
        version: Its installed version.
        entry_point: ``group: name = module:attr`` as declared.
        module: The module the object is defined in.
    """

    package: str
    version: str
    entry_point: str
    module: str

    @property
    def source_dir(self) -> Path | None:
        """The directory holding the object's top-level package (the project root of an editable checkout,
        ``site-packages`` of a regular install), ``None`` when it cannot be told."""
        mod = sys.modules.get(self.module)
        try:
            file = Path(inspect.getfile(mod)).resolve() if mod is not None else None
        except TypeError:
            return None
        if file is None:
            return None
        depth = self.module.count(".") + (1 if file.name == "__init__.py" else 0)
        return file.parents[depth]

    def describe(self) -> str:
        """``package version`` as ``kdbench methods`` and error messages name it."""
        return f"{self.package} {self.version}"


def _entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The entry points of ``group`` in every installed distribution, sorted by (name, value) for a
    deterministic order (the same distribution found twice on ``sys.path`` counts once)."""
    found = {(ep.name, ep.value, _dist_name(ep)): ep for ep in importlib.metadata.entry_points(group=group)}
    return [found[k] for k in sorted(found)]


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "<unknown package>"


def _dist_version(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else "unknown"


def _load(ep: importlib.metadata.EntryPoint, group: str) -> tuple[Any, Plugin]:
    """Imports an entry point's object; a failure names the package, the entry point and the fix."""
    where = f"{group}: {ep.name} = {ep.value}"
    try:
        obj = ep.load()
    except Exception as e:  # the plugin's own import error, whatever it is
        raise PluginError(
            f"package {_dist_name(ep)} {_dist_version(ep)}: entry point '{where}' does not load"
            f" ({type(e).__name__}: {e}); fix the package, or uninstall it (pip uninstall {_dist_name(ep)})"
        ) from e
    module = getattr(obj, "__module__", None) or ep.module
    return obj, Plugin(_dist_name(ep), _dist_version(ep), where, module)


def load_group(group: str, register: Callable[[str, Any, Plugin], None]) -> list[Plugin]:
    """Loads every entry point of ``group`` and hands each to ``register``.

    Args:
        group: :data:`METHOD_GROUP` or :data:`MODEL_GROUP`.
        register: Called with (entry point name, loaded object, its :class:`Plugin`); raises
            :class:`PluginError` to refuse it (a clash, a wrong object).

    Returns:
        The plugins loaded, in entry-point order.
    """
    out = []
    for ep in _entry_points(group):
        obj, plugin = _load(ep, group)
        register(ep.name, obj, plugin)
        _logger.debug("loaded %s from %s", plugin.entry_point, plugin.describe())
        out.append(plugin)
    return out


def clash(kind: str, name: str, first: str, second: Plugin) -> PluginError:
    """The error for a plugin whose name is taken, naming both sources and the fix."""
    return PluginError(
        f"{kind} {name!r} of package {second.describe()} (entry point '{second.entry_point}') clashes with the"
        f" {kind} {name!r} of {first}; rename the entry point (and the class's name) in {second.package}'s"
        f" pyproject.toml, or uninstall one of the two (pip uninstall {second.package})"
    )


# --- models: timm-style functions registered in timm's registry ------------------------------------------

_MODELS: dict[str, Plugin] = {}
_models_loaded = False


def model_source(name: str) -> Plugin | None:
    """The plugin a model comes from, ``None`` for a built-in (timm's or kdbench's own) model."""
    load_models()
    return _MODELS.get(name)


def _model_origin(name: str) -> str:
    import timm

    fn = timm.models.model_entrypoint(name)
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("kdbench"):
        return f"built-in kdbench ({module})"
    return f"timm {timm.__version__} ({module})"


def _register_model(name: str, fn: Any, plugin: Plugin) -> None:
    import timm
    from timm.models import register_model

    if name in _MODELS:
        raise clash("model", name, f"package {_MODELS[name].describe()} ('{_MODELS[name].entry_point}')", plugin)
    if not callable(fn) or inspect.isclass(fn):
        raise PluginError(
            f"package {plugin.describe()}: entry point '{plugin.entry_point}' must name a timm-style model"
            " function (def name(pretrained=False, **kwargs) -> nn.Module), not a"
            f" {type(fn).__name__}; fix its pyproject.toml"
        )
    if timm.is_model(name):
        raise clash("model", name, _model_origin(name), plugin)
    fn.__name__ = name  # timm registers a function under its own name
    register_model(fn)
    _MODELS[name] = plugin


def load_models() -> None:
    """Registers every :data:`MODEL_GROUP` entry point in timm's registry (once per process)."""
    global _models_loaded
    if _models_loaded:
        return
    _models_loaded = True  # set first: a failing plugin is reported once, not at every model
    load_group(MODEL_GROUP, _register_model)
