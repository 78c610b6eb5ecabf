"""Typed message bodies: one codec from a frozen dataclass's fields to a DAG-CBOR map and back.

A body is declared, not coded: :class:`BodyCodec` reads the dataclass's fields and their
annotations once, and from then on builds the map to encode (:meth:`BodyCodec.encode`) and reads
a decoded map back (:meth:`BodyCodec.decode`), refusing with the codec's error (an
:class:`~cim_place.cluster.nats.envelope.EnvelopeError`) that names the message type, the field
and what was wrong: ``TaskFailed.attempts must be a non-negative integer, got -1``.

Annotations and what they accept on the wire:

- ``str``; ``bool``; ``int`` (a count: 0 .. 2**64-1, never a bool); ``float`` (seconds or
  another non-negative number; an integer on the wire is read as a float); ``bytes``;
- ``Annotated[bytes, Size(32, "SHA-256")]``: bytes of exactly that length;
- :data:`CidLink`: a CID (bytes in Python), a tag-42 link on the wire, so IPLD tools see links;
- ``Literal["a", "b"]``: one of those strings;
- ``X | None``: null or an X;
- ``Mapping[str, str]``, ``tuple[X, ...]`` (a list on the wire), ``Mapping[str, Value]`` (any
  map, for free-form results);
- another frozen dataclass: a nested map, by the same rules;
- ``Annotated[X, Check(f)]``: an X that ``f`` accepts (``f`` raises ValueError or a
  CimPlaceError naming the problem), ``Annotated[tuple[...], MaxItems(n)]``.

A key may be absent when its field has a default (the default is used: an event store keeps old
events, so a field added later must have one) or is optional (None). ``field(metadata=wire("k"))``
puts a field under another key; ``wire(None)`` keeps it off the wire (it takes its default).
Values are checked with exact types: the DAG-CBOR decoder returns plain dicts, lists, str and
int, and an exact test is what the controller can afford on every event.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from cim_place.cluster.nats.envelope import EnvelopeError
from cim_place.errors import CimPlaceError
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.dagcbor import Link, Value

__all__ = ["BodyCodec", "Check", "CidLink", "MaxItems", "Size", "wire"]

T = TypeVar("T")
_WIRE = "cim_place.wire"
_ABSENT: Any = object()


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


class _AsLink:
    """The marker of :data:`CidLink`."""


CidLink = Annotated[Cid, _AsLink]
"""A CID field: bytes in Python, a DAG-CBOR link (tag 42) on the wire."""


def wire(key: str | None) -> dict[str, str | None]:
    """Field metadata: travel under ``key`` instead of the field's name; None: do not travel."""
    return {_WIRE: key}


Reader = Callable[[Any, str], Any]
"""Reads one decoded value; the second argument is the message type, for the error message."""
Writer = Callable[[Any], Value]


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str
    read: Reader
    write: Writer | None
    """None: the value travels as it is (str, int, float, bool, bytes)."""
    default: Any
    factory: Callable[[], Any] | None


class BodyCodec(Generic[T]):
    """The body codec of dataclass ``cls``; ``error`` is raised for a body it cannot read.

    ``label`` names the message type in errors (default: ``cls.TYPE``, else the class name).
    """

    def __init__(
        self, cls: type[T], *, error: type[EnvelopeError] = EnvelopeError, label: str = ""
    ) -> None:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} is not a dataclass; declare bodies as dataclasses")
        self.cls = cls
        self.error = error
        self.label = label or getattr(cls, "TYPE", "") or cls.__name__
        hints = typing.get_type_hints(cls, include_extras=True)
        self.fields: tuple[_Field, ...] = ()
        self.sent: tuple[_Field, ...] = ()
        fields = []
        for spec in dataclasses.fields(cls):
            key = spec.metadata.get(_WIRE, spec.name)
            read, write = self._compile(hints[spec.name], key, f"{cls.__name__}.{spec.name}")
            has_default = spec.default is not dataclasses.MISSING
            factory = spec.default_factory
            fields.append(
                _Field(
                    spec.name,
                    key if key is not None else "",
                    read,
                    write,
                    spec.default if has_default else _ABSENT,
                    None if factory is dataclasses.MISSING else factory,
                )
            )
            if key is None and not has_default and factory is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{spec.name} does not travel: give it a default")
        self.fields = tuple(fields)
        self.sent = tuple(f for f in fields if f.key)

    # -- encoding and decoding -------------------------------------------------------------------

    def encode(self, body: T) -> dict[str, Value]:
        """The map that travels for ``body`` (to be encoded with the envelope)."""
        out: dict[str, Value] = {}
        for f in self.sent:
            value = getattr(body, f.name)
            out[f.key] = value if f.write is None else f.write(value)
        return out

    def decode(self, body: Mapping[str, Value], *, label: str = "", **given: Any) -> T:
        """The dataclass read from ``body``; fields in ``given`` are taken from the caller."""
        label = label or self.label
        values: dict[str, Any] = {}
        for f in self.fields:
            if f.name in given:
                continue
            values[f.name] = self._read(f, body, label)
        values.update(given)
        return self.cls(**values)

    def values(self, body: Mapping[str, Value]) -> tuple[Any, ...]:
        """The fields read from ``body``, in declaration order, without building the object."""
        label = self.label
        return tuple([self._read(f, body, label) for f in self.fields])

    def _read(self, f: _Field, body: Mapping[str, Value], label: str) -> Any:
        value = body.get(f.key, _ABSENT) if f.key else _ABSENT
        if value is not _ABSENT:
            return f.read(value, label)
        if f.factory is not None:
            return f.factory()
        if f.default is not _ABSENT:
            return f.default
        raise self.error(f"{label} body is missing field {f.key!r}")

    # -- compiling annotations into readers and writers ------------------------------------------

    def _compile(self, hint: Any, key: str | None, where: str) -> tuple[Reader, Writer | None]:
        path = key or where.rsplit(".", 1)[-1]
        error = self.error
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)

        if origin is Annotated:
            inner, *marks = args
            if _AsLink in marks:
                return _link_reader(path, error), _write_link
            read, write = self._compile(inner, key, where)
            for mark in marks:
                read = _constrained(read, mark, path, error, where)
            return read, write
        if origin in (Union, types.UnionType):
            options = [a for a in args if a is not type(None)]
            if len(options) != 1 or len(args) != 2:
                raise TypeError(f"{where}: only 'X | None' unions are supported, got {hint}")
            read, write = self._compile(options[0], key, where)
            return _optional(read), None if write is None else _optional_writer(write)
        if origin is Literal:
            return _literal_reader(path, args, error), None
        if origin in (Mapping, dict, typing.Mapping):
            if args and args[1] is str:
                return _str_map_reader(path, error), dict
            # Mapping[str, Value]: any map the DAG-CBOR decoder returned.
            return _map_reader(path, error), dict
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            if args[0] is str:
                return _str_list_reader(path, error), list
            item_read, item_write = self._compile(args[0], key, where)
            return _list_reader(path, error, item_read), _list_writer(item_write)
        if hint in _SCALARS:
            return _SCALARS[hint](path, error), None
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            nested: BodyCodec[Any] = BodyCodec(hint, error=error)
            return _nested_reader(path, error, nested), nested.encode
        raise TypeError(f"{where}: no body codec for {hint!r}")


# -- readers: each names the message type and field that is wrong -------------------------------


def _str_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is str:
            return value
        raise error(f"{label}.{path} must be a string, got {type(value).__name__}")

    return read


def _count_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        # bool is an int in Python; a true/false count is foreign data, not a number.
        if type(value) is int and value >= 0:
            return value
        raise error(f"{label}.{path} must be a non-negative integer, got {value!r}")

    return read


def _seconds_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        kind = type(value)
        if (kind is float or kind is int) and value >= 0:
            return float(value)
        raise error(f"{label}.{path} must be a non-negative number, got {value!r}")

    return read


def _bool_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is bool:
            return value
        raise error(f"{label}.{path} must be a boolean")

    return read


def _bytes_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is bytes:
            return value
        raise error(f"{label}.{path} must be a byte string, got {type(value).__name__}")

    return read


_SCALARS: dict[Any, Callable[[str, type[EnvelopeError]], Reader]] = {
    str: _str_reader,
    int: _count_reader,
    float: _seconds_reader,
    bool: _bool_reader,
    bytes: _bytes_reader,
}


def _link_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is Link:
            return value.cid
        raise error(f"{label}.{path} must be a CID link (tag 42), got {value!r}")

    return read


def _write_link(cid: Any) -> Value:
    return Link(cid)


def _optional(read: Reader) -> Reader:
    def read_optional(value: Any, label: str) -> Any:
        return None if value is None else read(value, label)

    return read_optional


def _optional_writer(write: Writer) -> Writer:
    def write_optional(value: Any) -> Value:
        return None if value is None else write(value)

    return write_optional


def _literal_reader(path: str, choices: tuple[Any, ...], error: type[EnvelopeError]) -> Reader:
    as_str = _str_reader(path, error)
    allowed = ", ".join(str(c) for c in choices)

    def read(value: Any, label: str) -> Any:
        if value in choices and type(value) is str:
            return value
        as_str(value, label)
        raise error(f"{label}.{path} must be one of {allowed}, got {value!r}")

    return read


def _str_map_reader(path: str, error: type[EnvelopeError]) -> Reader:
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


def _map_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is dict:
            return value
        raise error(f"{label}.{path} must be a map")

    return read


def _str_list_reader(path: str, error: type[EnvelopeError]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is list and all(type(item) is str for item in value):
            return tuple(value)
        raise error(f"{label}.{path} must be a list of strings")

    return read


def _list_reader(path: str, error: type[EnvelopeError], item: Reader) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is list:
            return tuple([item(v, label) for v in value])
        raise error(f"{label}.{path} must be a list")

    return read


def _list_writer(item: Writer | None) -> Writer:
    if item is None:
        return list
    write = item

    def write_list(value: Any) -> Value:
        return [write(v) for v in value]

    return write_list


def _nested_reader(path: str, error: type[EnvelopeError], codec: BodyCodec[Any]) -> Reader:
    def read(value: Any, label: str) -> Any:
        if type(value) is dict:
            return codec.decode(value, label=f"{label}.{path}")
        raise error(f"{label}.{path} must be a map")

    return read


def _constrained(
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
