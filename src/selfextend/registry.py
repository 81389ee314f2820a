"""One registry style for methods, backends and tasks (lm-evaluation-harness's ``Registry``, trimmed).

Entries register by decorator, or lazily as a ``"module:object"`` string that is imported on first lookup, so
an entry whose module is costly or fragile to import (a GPU backend) costs nothing until it is used. A
duplicate name is refused (a second registration would silently replace the first), and a failed lookup lists
the choices, so a typo tells the user what exists.

Attributes declared beside a lazy entry (``methods=("self-extend",)``) answer ``peek`` without the import,
which is what listing and validating names needs; the entry is checked against them when it loads, so the
declaration cannot drift from the class.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Lazy:
    """A placeholder for an entry not imported yet: its ``"module:object"`` target and declared attributes."""

    target: str
    declared: dict[str, Any]


class Registry(Generic[T]):
    """Names to objects of one kind (``"method"``, ``"backend"``, ``"task"``), all of class ``base`` if given.

    A registered class is stored as an instance (decorator and lazy entry alike), so every lookup returns the
    same object."""

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, T | _Lazy] = {}

    def add(self, name: str, entry: T | str, **declared: Any) -> T | str:
        """Register ``entry`` under ``name``; a ``"module:object"`` string is imported on first lookup, and
        ``declared`` attributes of it are known before that (see ``peek``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if name in self._entries:
            known = self._entries[name]
            where = f" (lazily, as {known.target!r})" if isinstance(known, _Lazy) else ""
            raise ValueError(f"{self.kind} {name!r} is already registered{where}; pick another name")
        if isinstance(entry, str):
            module, colon, obj = entry.partition(":")
            if not (colon and module and obj) or ":" in obj:
                raise ValueError(f"lazy {self.kind} {name!r} must be 'module:object', got {entry!r}")
            self._entries[name] = _Lazy(entry, declared)
            return entry
        self._check(name, entry, declared, "")
        self._entries[name] = entry
        return entry

    def register(self, name: str | None = None) -> Callable[[type], type]:
        """Class decorator: register an instance of the class under ``name``, which also becomes its ``name``
        attribute (default: the class's own ``name``)."""

        def decorate(cls: type) -> type:
            if name is not None:
                cls.name = name
            self.add(cls.name, cls())
            return cls

        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"Unknown {self.kind} {name!r}. Available: {', '.join(self.names())}.")
        entry = self._entries[name]
        if isinstance(entry, _Lazy):
            entry = self._entries[name] = self._load(name, entry)
        return entry

    __getitem__ = get

    def peek(self, name: str, attr: str) -> Any:
        """``attr`` of entry ``name``; a lazy entry that declared ``attr`` answers without being imported."""
        entry = self._entries.get(name)
        if isinstance(entry, _Lazy) and attr in entry.declared:
            return entry.declared[attr]
        return getattr(self.get(name), attr)

    def _load(self, name: str, lazy: _Lazy) -> T:
        module_name, _, obj_name = lazy.target.partition(":")
        what = f"{self.kind} {name!r} is registered as {lazy.target!r}, but"
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ImportError(f"{what} {module_name} cannot be imported: {err}") from err
        try:
            obj = getattr(module, obj_name)
        except AttributeError:
            raise ImportError(f"{what} {module_name} has no {obj_name!r}") from None
        if isinstance(obj, type):
            obj.name = name
            obj = obj()
        self._check(name, obj, lazy.declared, f" ({lazy.target})")
        return obj

    def _check(self, name: str, entry: Any, declared: dict[str, Any], where: str) -> None:
        if self.base is not None and not isinstance(entry, self.base):
            raise TypeError(f"{self.kind} {name!r}{where} must be a {self.base.__name__}, "
                            f"got {type(entry).__name__}")
        for attr, value in declared.items():
            actual = getattr(entry, attr, None)
            if actual != value:
                raise ValueError(f"{self.kind} {name!r}{where} has {attr}={actual!r}, but its registration "
                                 f"declares {attr}={value!r}; make them agree")

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[T]:
        """Every entry, importing the lazy ones."""
        return [self.get(n) for n in list(self._entries)]

    def items(self) -> list[tuple[str, T]]:
        """Every (name, entry), importing the lazy ones."""
        return [(n, self.get(n)) for n in list(self._entries)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
