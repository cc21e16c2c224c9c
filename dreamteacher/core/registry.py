"""Name -> thing lookups (methods, teacher kinds, config sections), the way timm finds a model by name:
each entry is registered by the module that defines it, and an unknown name is one clear line that
lists what there is."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from dreamteacher.core.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered name -> entry table; `what` names the kind of entry in error messages."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Adds `entry`; registering the same entry again (a module imported twice) is a no-op, another
        entry under a taken name is refused."""
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.what} '{name}' is registered already")
        self._entries[name] = entry
        return entry

    def decorator(self, name_of: Callable[[T], str]) -> Callable[[T], T]:
        """A class decorator registering the class under `name_of(cls)`."""
        return lambda entry: self.register(name_of(entry), entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UserError(f"unknown {self.what} '{name}'; available: {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())
