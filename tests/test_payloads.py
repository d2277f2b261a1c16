"""Typed handlers: dataclass payloads are checked strictly and built; results flattened."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import redis.asyncio as aioredis

from tests.helpers import Raw, open_client, open_ok
from worker import App, BadPayload, RemoteError
from worker.payloads import from_value, payload_converter, to_value
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker


@dataclass(frozen=True)
class Size:
    width: int
    height: int = 0


@dataclass(frozen=True)
class Resize:
    image: bytes
    size: Size
    mode: Literal["fit", "fill"] = "fit"
    scale: float = 1.0
    tags: list[str] = field(default_factory=list)
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def resize(job: Resize) -> Size:
    return Size(width=job.size.width * 2, height=job.size.height)


def test_a_dataclass_payload_is_built() -> None:
    """A conforming map becomes the dataclass, nested dataclasses included."""
    convert = payload_converter(resize)
    assert convert is not None
    job = convert({"image": b"\x00", "size": {"width": 3}, "scale": 2, "tags": ["a"]})
    assert Resize(image=b"\x00", size=Size(width=3), scale=2.0, tags=["a"]) == job


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not a map", "payload: expected a map"),
        ({"image": b"", "size": {"width": 1}, "colour": 1}, "unknown field 'colour'"),
        ({"size": {"width": 1}}, "missing field 'image'"),
        ({"image": b"", "size": {"width": True}}, "payload.size.width: expected an integer"),
        ({"image": b"", "size": {"width": 1.5}}, "payload.size.width: expected an integer"),
        ({"image": "x", "size": {"width": 1}}, "payload.image: expected bytes"),
        ({"image": b"", "size": {"width": 1}, "mode": "zoom"}, "payload.mode: expected one of"),
        ({"image": b"", "size": {"width": 1}, "tags": ["a", 2]}, "payload.tags[1]: expected str"),
        ({"image": b"", "size": {"width": 1}, "note": 5}, "payload.note: expected"),
        ({"image": b"", "size": {"width": 1}, "scale": "2"}, "payload.scale: expected a number"),
    ],
)
def test_a_payload_that_does_not_fit_is_bad_payload(value: Any, message: str) -> None:
    """Each mismatch raises BadPayload naming where it is."""
    with pytest.raises(BadPayload, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_value(Resize, value)


def test_untyped_handlers_get_the_raw_payload() -> None:
    """Without a dataclass annotation there is no converter."""

    async def plain(payload: dict[str, Any]) -> Any:
        return payload

    assert payload_converter(plain) is None


@dataclass
class Odd:
    when: set[int]


async def odd(payload: Odd) -> None:
    return None


def test_unsupported_annotations_are_refused_at_registration() -> None:
    """A dataclass with a field type that cannot be checked is refused when registered."""
    with pytest.raises(ValueError, match="not supported"):
        App().add("odd", odd)


def test_dataclass_results_become_maps() -> None:
    """A dataclass result is sent as a map, recursively; other values unchanged."""
    assert {"width": 2, "height": 0} == to_value(Size(width=2))
    assert [1] == to_value([1])


async def test_typed_handler_end_to_end(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Through a worker: a fitting payload runs the typed handler; a bad one is bad_payload."""
    app = App()
    app.add("resize", resize)
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        out = raw.seal(grant, {"image": b"png", "size": {"width": 4, "height": 3}}, type_="resize")
        await raw.send(out.request)
        assert {"width": 8, "height": 3} == open_ok(
            await raw.reply(grant.sid, out.request.mid), out
        )
        async with (
            open_client(settings, keys) as c,
            c.session(grant) as session,
        ):
            with pytest.raises(RemoteError) as err:
                await session.request("resize", {"image": b"png", "size": {}})
    assert ("bad_payload", "payload.size: missing field 'width'") == (
        err.value.code,
        err.value.remote_message,
    )
