"""The one registry type: a name -> thing table with registration, did-you-mean look-up and no duplicates.

Backbones, fusion methods, ensemble methods, comparison variants, callbacks and CLI commands each keep one
:class:`Registry` (as torchvision's ``register_model`` / ``get_model`` do for models). No torch here: the CLI's
help and the configs use registries too.

    FUSIONS = Registry("fusion method")

    @FUSIONS.register("concat")
    class ConcatFusion(Fuser): ...

    FUSIONS.get("concat")    # the class
    FUSIONS.get("concta")    # ConfigError: unknown fusion method 'concta'; did you mean 'concat'? available: ...
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from fusionnet.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` is what error messages call them), in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """``register(name, item)`` adds ``item``; ``@register(name)`` adds the decorated class or function.
        A name registered already is refused (a ConfigError naming what holds it)."""
        def add(thing: T) -> T:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"a {self.kind} needs a non-empty name, got {name!r}")
            if name in self._items:
                held = getattr(self._items[name], "__name__", None)
                by = f" (by {held})" if held else ""
                raise ConfigError(f"{self.kind} {name!r} is already registered{by}; choose another name")
            self._items[name] = thing
            return thing
        return add if item is None else add(item)

    def unregister(self, name: str) -> T:
        """Remove ``name`` (tests that register toy entries clean up with this)."""
        self.get(name)
        return self._items.pop(name)

    def get(self, name: str) -> T:
        """The entry called ``name``, or a ConfigError with the closest names and every available one."""
        if name in self._items:
            return self._items[name]
        raise ConfigError(self.unknown(name))

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered: did you mean ..., and what is available."""
        close = difflib.get_close_matches(str(name), list(self._items), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ";"
        return f"unknown {self.kind} {name!r}{hint} available: {', '.join(self._items) or '(none)'}"

    def check(self, names) -> list[str]:
        """``names`` as a list, every one registered (else the ConfigError of the first that is not)."""
        for n in names:
            self.get(n)
        return list(names)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
