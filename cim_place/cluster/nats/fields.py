"""The field readers and writers of the body codec (``cim_place.cluster.nats.bodies``).

A reader takes one decoded value and the message type, and returns the field's value or raises
the codec's error naming the type, the field and what was wrong; a writer turns a field's value
into what travels. ``bodies`` picks them from the fields' annotations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cim_place.cluster.nats.envelope import EnvelopeError
from cim_place.errors import CimPlaceError
from cim_place.objectstore.dagcbor import Link, Value


@dataclass(frozen=True, slots=True)
class Check:
    """``Annotated[X, Check(f)]``: ``f(value)`` raises ValueError or CimPlaceError if unusable."""

    function: Callable[[Any], object]


@dataclass(frozen=True, slots=True)
class Size:
    """``Annotated[bytes, Size(n, what)]``: exactly ``n`` bytes (``what`` names the content)."""

    length: int
    what: str


@dataclass(frozen=True, slots=True)
class MaxItems:
    """``Annotated[tuple[X, ...], MaxItems(n)]``: at most ``n`` items."""

    count: int


Reader = Callable[[Any, str], Any]
"""Reads one decoded value; the second argument is the message type, for the error message."""
Writer = Callable[[Any], Value]
"""Turns a field's value into what travels (None in place of a writer: as it is)."""


# -- readers: each names the message type and field that is wrong -------------------------------


def str_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is str:
            return value
        raise error(f"{label}.{path} must be a string, got {type(value).__name__}")

    return read


def count_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        # bool is an int in Python; a true/false count is foreign data, not a number.
        if type(value) is int and value >= 0:
            return value
        raise error(f"{label}.{path} must be a non-negative integer, got {value!r}")

    return read


def seconds_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        kind = type(value)
        if (kind is float or kind is int) and value >= 0:
            return float(value)
        raise error(f"{label}.{path} must be a non-negative number, got {value!r}")

    return read


def bool_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is bool:
            return value
        raise error(f"{label}.{path} must be a boolean")

    return read


def bytes_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is bytes:
            return value
        raise error(f"{label}.{path} must be a byte string, got {type(value).__name__}")

    return read


SCALARS: dict[Any, tuple[Callable[[str, type[EnvelopeError]], Reader], str]] = {
    str: (str_reader, "type(v) is str"),
    int: (count_reader, "type(v) is int and v >= 0"),
    float: (seconds_reader, "(type(v) is float or type(v) is int) and v >= 0"),
    bool: (bool_reader, "type(v) is bool"),
    bytes: (bytes_reader, "type(v) is bytes"),
}


def link_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is Link:
            return value.cid
        raise error(f"{label}.{path} must be a CID link (tag 42), got {value!r}")

    return read


def write_link(cid: Any) -> Value:
    return Link(cid)


def optional(read: Reader) -> Reader:
    def read_optional(value: Any, label: str) -> Any:
        return None if value is None else read(value, label)

    return read_optional


def optional_writer(write: Writer) -> Writer:
    def write_optional(value: Any) -> Value:
        return None if value is None else write(value)

    return write_optional


def literal_reader(path: str, choices: tuple[Any, ...], error: type[EnvelopeError]) -> Reader:
    as_str = str_reader(path, error)
    allowed = ", ".join(str(c) for c in choices)

    def read(value: Any, label: str) -> Any:
        if value in choices and type(value) is str:
            return value
        as_str(value, label)
        raise error(f"{label}.{path} must be one of {allowed}, got {value!r}")

    return read


def str_map_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is dict:
            # A loop, not all() over a generator: this runs for every object event.
            for item in value.values():
                if type(item) is not str:
                    break
            else:
                return value
        raise error(f"{label}.{path} must map strings to strings")

    return read


def map_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is dict:
            return value
        raise error(f"{label}.{path} must be a map")

    return read


def str_list_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is list and all(type(item) is str for item in value):
            return tuple(value)
        raise error(f"{label}.{path} must be a list of strings")

    return read


def list_reader(path: str, error: type[EnvelopeError], item: Reader) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is list:
            return tuple([item(v, label) for v in value])
        raise error(f"{label}.{path} must be a list")

    return read


def list_writer(item: Writer | None) -> Writer:
    if item is None:
        return list
    write = item

    def write_list(value: Any) -> Value:
        return [write(v) for v in value]

    return write_list


def nested_reader(path: str, error: type[EnvelopeError], decode: Callable[..., Any]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is dict:
            return decode(value, label=f"{label}.{path}")
        raise error(f"{label}.{path} must be a map")

    return read


def constrained(
    read: Reader, mark: object, path: str, error: type[EnvelopeError], where: str
) -> Reader:
    if isinstance(mark, Size):
        length, what = mark.length, mark.what

        def read_sized(value: Any, label: str) -> Any:
            if type(value) is bytes and len(value) == length:
                return value
            raise error(f"{label}.{path} must be {length} bytes ({what}), got {value!r}")

        return read_sized
    if isinstance(mark, MaxItems):
        most = mark.count

        def read_bounded(value: Any, label: str) -> Any:
            if type(value) is list and len(value) > most:
                raise error(f"{label}.{path} has {len(value)} items; at most {most} allowed")
            return read(value, label)

        return read_bounded
    if isinstance(mark, Check):
        check = mark.function

        def read_checked(value: Any, label: str) -> Any:
            value = read(value, label)
            try:
                check(value)
            except (ValueError, CimPlaceError) as exc:
                raise error(f"{label}.{path}: {exc}") from None
            return value

        return read_checked
    raise TypeError(f"{where}: unknown annotation {mark!r}")


def str_values(mapping: dict[str, Any]) -> bool:
    # A loop, not all() over a generator: this runs for every object event.
    for item in mapping.values():  # noqa: SIM110
        if type(item) is not str:
            return False
    return True


def str_items(items: list[Any]) -> bool:
    for item in items:  # noqa: SIM110
        if type(item) is not str:
            return False
    return True
