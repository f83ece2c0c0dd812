"""A small generic registry: one namespace per kind of object (methods, data sources).

A duplicate name is an error, an unknown name lists the valid choices. Each name keeps its source (``built-in``
or the plugin it came from, :mod:`kdbench.plugins`); a registry may have a loader that adds further entries
(plugins) once, the first time it is read.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to registered objects of one kind.

    Args:
        kind: What is registered (used in error messages), e.g. ``"method"``.
        loader: Called once, the first time the registry is read (:meth:`get`, :meth:`names`, ``in``, iteration),
            to register further entries (plugins). Registering never calls it.
    """

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._sources: dict[str, Any] = {}
        self._loader = loader

    def register(self, name: str, source: Any = "built-in") -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` from ``source``; a duplicate name raises ``ValueError``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self._items[name]!r} and {obj!r})")
            self._items[name] = obj
            self._sources[name] = source
            return obj

        return deco

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None  # once, even if it fails (the error is the user's to fix)
            loader()

    def peek(self, name: str) -> T | None:
        """The object registered as ``name`` so far, without running the loader (for the loader itself)."""
        return self._items.get(name)

    def attribute(self, name: str, source: Any) -> None:
        """Sets where an already registered ``name`` comes from (a plugin whose class registered itself)."""
        self._sources[name] = source

    def source(self, name: str) -> Any:
        """Where ``name`` comes from: ``"built-in"`` or the plugin's source object."""
        self.get(name)
        return self._sources[name]

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``; an unknown name raises ``KeyError`` with the choices."""
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
