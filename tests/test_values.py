"""Hot-path builders of frozen records: the same values as ``__init__``, still frozen."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from worker.dispatch import Outcome
from worker.handlers import Context
from worker.values import builder
from worker.wire import Request


def test_a_built_record_equals_the_one_init_builds_and_stays_frozen() -> None:
    """Same fields, same value, same type; assigning a field still raises."""
    fields: dict[str, Any] = dict(
        session_id="s", message_id="m", type="echo", ts=1, entry_id="1-0", attempt=2
    )
    built = builder(Context)(**fields)
    assert type(built) is Context
    assert Context(**fields) == built
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.attempt = 3  # type: ignore[misc]


def test_every_field_must_be_named_defaults_included() -> None:
    """A builder has no defaults: leaving out a field with a default is a TypeError."""
    with pytest.raises(TypeError):
        builder(Outcome)(status="ok", plaintext=b"")
    assert Outcome(status="ok", plaintext=b"") == builder(Outcome)(
        status="ok", plaintext=b"", dead_letter=None, code=None
    )


def test_a_request_built_by_the_fast_path_is_a_request() -> None:
    """The wire fast path's records are ordinary requests (hashable, comparable)."""
    kw: dict[str, Any] = dict(
        field="e", alg="a", sid="s", mid="m", ts=1, type="t", iv=b"", encrypted_data=b"",
        auth_tag=b"", encrypted_aes_key=None, kid=None,
    )  # fmt: skip
    assert {Request(**kw)} == {builder(Request)(**kw)}


def test_only_frozen_slotted_dataclasses_without_post_init_have_builders() -> None:
    """A mutable dataclass, one without slots, or one with __post_init__ is refused."""

    @dataclasses.dataclass(slots=True)
    class Mutable:
        a: int

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError

    for cls in (Mutable, NoSlots, Checked, int):
        with pytest.raises(TypeError):
            builder(cls)


def test_a_class_with_its_own_init_or_fields_outside_init_has_no_builder() -> None:
    """A builder would skip a hand-written ``__init__`` (its checks) or demand fields
    that ``__init__`` does not take: such classes are refused."""

    @dataclasses.dataclass(frozen=True, slots=True)
    class Own:
        a: int

        def __init__(self, a: int) -> None:
            if a < 0:
                raise ValueError
            object.__setattr__(self, "a", a)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Derived:
        a: int
        b: int = dataclasses.field(init=False, default=0)

    @dataclasses.dataclass(frozen=True, slots=True, init=False)
    class NoInit:
        a: int

    for cls in (Own, Derived, NoInit):
        with pytest.raises(TypeError):
            builder(cls)


@pytest.mark.parametrize("name", ["o", "build", "_new", "_cls", "_set0"])
def test_a_field_named_like_the_builders_own_names_is_refused(name: str) -> None:
    """The generated function's own names cannot be shadowed by a field."""
    cls = dataclasses.make_dataclass("Clash", [(name, int), ("x", int)], frozen=True, slots=True)
    with pytest.raises(TypeError):
        builder(cls)
