"""Fast construction of frozen value records on the hot path.

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``
(its own ``__setattr__`` refuses), which costs about three times a plain slot store:
for the ~30 fields the batch path builds per message, a few percent of the worker's
CPU (measured). :func:`builder` makes, once per class, a function that stores the
fields straight into the slots (the slots' own descriptors, which the frozen
``__setattr__`` does not guard), so the values stay frozen for everyone who holds
them. The builder takes every field by name, defaults included: none can be left
out by mistake, and there is no ``__post_init__`` to skip (a class with one is
refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final, TypeVar

T = TypeVar("T")
#: the names the generated function uses itself (and ``_set<i>``)
_RESERVED: Final = frozenset({"build", "o", "_new", "_cls"})


def builder(cls: type[T]) -> Callable[..., T]:
    """A function ``(*, field1, field2, ...) -> cls`` for a frozen, slotted dataclass."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a frozen, slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__: build it the usual way")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    # The ``__init__`` dataclasses generated (by exec, as here), not one of the class's.
    code = getattr(cls.__init__, "__code__", None)
    generated = code is not None and code.co_filename == "<string>"
    if not params.init or not generated or not all(f.init for f in fields):
        raise TypeError(f"{cls.__name__} has its own or no __init__: build it the usual way")
    names = [f.name for f in fields]
    if _RESERVED & set(names) or any(name.startswith("_set") for name in names):
        raise TypeError(f"{cls.__name__} has a field named like the builder's own names")
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def build(*, {', '.join(names)}):", "    o = _new(_cls)"]
    for i, name in enumerate(names):
        scope[f"_set{i}"] = getattr(cls, name).__set__
        lines.append(f"    _set{i}(o, {name})")
    lines.append("    return o")
    exec("\n".join(lines), scope)  # noqa: S102 - source built from field names only
    build: Callable[..., T] = scope["build"]
    build.__doc__ = f"A {cls.__name__} from all its fields (see worker.values)."
    return build
