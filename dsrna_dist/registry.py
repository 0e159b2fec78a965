"""A tiny name -> object registry: ops, strategies, metrics, attacks and datasets plug in by name.

A new component is one new file that decorates its class with ``@REGISTRY.register("name")``;
looking up an unknown name raises an error that lists every valid one.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate registry name; the message names the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to classes or factories for one kind of component (e.g. "op")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str, obj: Optional[T] = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise RegistryError(f"duplicate {self.kind} name {name!r}")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str, key: Optional[str] = None) -> T:
        """Look ``name`` up; ``key`` (a config key such as "strategy.name") goes in the error."""
        try:
            return self._items[name]
        except KeyError:
            where = f" (config key {key})" if key else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{where}; valid: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
