"""One registry style for methods, backends and tasks (lm-evaluation-harness's ``Registry``, trimmed).

Entries register by decorator, a duplicate name is refused (a second registration would silently replace the
first), and a failed lookup lists the choices, so a typo tells the user what exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to objects of one kind (``"method"``, ``"backend"``, ``"task"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
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
        return self._entries[name]

    __getitem__ = get

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
