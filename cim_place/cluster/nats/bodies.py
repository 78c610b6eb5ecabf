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
puts a field under another key; ``wire(None)`` keeps it off the wire (it takes its default);
``field(metadata=sparse())`` sends it only when it differs from its default.
Values are checked with exact types: the DAG-CBOR decoder returns plain dicts, lists, str and
int, and an exact test is what the controller can afford on every event.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from cim_place.cluster.nats.envelope import EnvelopeError
from cim_place.cluster.nats.fields import (
    SCALARS,
    Check,
    MaxItems,
    Reader,
    Size,
    Writer,
    constrained,
    link_reader,
    list_reader,
    list_writer,
    literal_reader,
    map_reader,
    nested_reader,
    optional,
    optional_writer,
    str_items,
    str_list_reader,
    str_map_reader,
    str_values,
    write_link,
)
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.dagcbor import Link, Value

__all__ = ["BodyCodec", "Check", "CidLink", "MaxItems", "Size", "sparse", "wire"]

T = TypeVar("T")
_WIRE = "cim_place.wire"
_SPARSE = "cim_place.sparse"
_ABSENT: Any = object()


class _AsLink:
    """The marker of :data:`CidLink`."""


CidLink = Annotated[Cid, _AsLink]
"""A CID field: bytes in Python, a DAG-CBOR link (tag 42) on the wire."""


def wire(key: str | None) -> dict[str, str | None]:
    """Field metadata: travel under ``key`` instead of the field's name; None: do not travel."""
    return {_WIRE: key}


def sparse() -> dict[str, bool]:
    """Field metadata: the key is left out while the value is the field's default, so a field
    added later changes no existing message's bytes (and readers that predate it see none)."""
    return {_SPARSE: True}


Compiled = tuple[Reader, "Writer | None", "tuple[str, str] | None"]
"""A field's reader, writer (None: as it is) and inline test and value (see _generate)."""


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str
    read: Reader
    write: Writer | None
    """None: the value travels as it is (str, int, float, bool, bytes)."""
    default: Any
    factory: Callable[[], Any] | None
    fast: tuple[str, str] | None
    """(test, value): Python expressions over ``v`` for a value the reader would take as it is."""


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
        self._names: dict[str, Any] = {}
        fields = []
        for spec in dataclasses.fields(cls):
            key = spec.metadata.get(_WIRE, spec.name)
            read, write, fast = self._compile(hints[spec.name], key, f"{cls.__name__}.{spec.name}")
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
                    fast,
                )
            )
            if key is None and not has_default and factory is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{spec.name} does not travel: give it a default")
        self.fields: tuple[_Field, ...] = tuple(fields)
        self.sent: tuple[_Field, ...] = tuple(f for f in fields if f.key)
        self._sparse = frozenset(
            spec.name for spec in dataclasses.fields(cls) if spec.metadata.get(_SPARSE)
        )
        self._decode: Callable[[Mapping[str, Value], str], T] = self._generate(build=True)
        self._values: Callable[[Mapping[str, Value], str], tuple[Any, ...]] = self._generate(
            build=False
        )

    # -- encoding and decoding -------------------------------------------------------------------

    def encode(self, body: T) -> dict[str, Value]:
        """The map that travels for ``body`` (to be encoded with the envelope)."""
        out: dict[str, Value] = {}
        for f in self.sent:
            value = getattr(body, f.name)
            if f.name in self._sparse and value == f.default:
                continue
            out[f.key] = value if f.write is None else f.write(value)
        return out

    def decode(self, body: Mapping[str, Value], *, label: str = "", **given: Any) -> T:
        """The dataclass read from ``body``; fields in ``given`` are taken from the caller."""
        label = label or self.label
        if not given:
            return self._decode(body, label)
        values: dict[str, Any] = {}
        for f in self.fields:
            if f.name not in given:
                value = body.get(f.key, _ABSENT) if f.key else _ABSENT
                values[f.name] = (
                    self._absent(f, label) if value is _ABSENT else f.read(value, label)
                )
        values.update(given)
        return self.cls(**values)

    def values(self, body: Mapping[str, Value]) -> tuple[Any, ...]:
        """The fields read from ``body``, in declaration order, without building the object."""
        return self._values(body, self.label)

    def _absent(self, f: _Field, label: str) -> Any:
        if f.factory is not None:
            return f.factory()
        if f.default is not _ABSENT:
            return f.default
        raise self.error(f"{label} body is missing field {f.key!r}")

    def _generate(self, *, build: bool) -> Callable[[Mapping[str, Value], str], Any]:
        """A reader of the whole body, written out per field as dataclasses write ``__init__``.

        For each field a value that passes its exact-type test is taken inline; anything else
        goes to the field's reader (which converts it or raises naming the field), an absent
        key to its default. So the result is the readers' by construction, at about a third of
        their cost: the controller reads every event through here.
        """
        names: dict[str, Any] = {
            **self._names,
            "ABSENT": _ABSENT,
            "Link": Link,
            "cls": self.cls,
            "str_values": str_values,
            "str_items": str_items,
        }
        lines = ["def read_body(body, label):", "    get = body.get"]
        for i, f in enumerate(self.fields):
            names[f"read{i}"] = f.read
            names[f"absent{i}"] = functools.partial(self._absent, f)
            if not f.key:
                lines.append(f"    f{i} = absent{i}(label)")
                continue
            lines.append(f"    v = get({f.key!r}, ABSENT)")
            if f.fast is not None:
                test, value = f.fast
                lines += [f"    if {test}:", f"        f{i} = {value}", "    elif v is ABSENT:"]
            else:
                lines.append("    if v is ABSENT:")
            lines += [
                f"        f{i} = absent{i}(label)",
                "    else:",
                f"        f{i} = read{i}(v, label)",
            ]
        results = [f"f{i}" for i in range(len(self.fields))]
        if not build:
            lines.append(f"    return ({', '.join(results)},)")
        elif _fillable(self.cls):
            # Frozen slotted dataclasses: set the slots, as __init__ would, at half its cost.
            names["new"] = object.__new__
            lines.append("    o = new(cls)")
            for i, f in enumerate(self.fields):
                names[f"set{i}"] = getattr(self.cls, f.name).__set__
                lines.append(f"    set{i}(o, f{i})")
            lines.append("    return o")
        else:
            args = ", ".join(f"{f.name}=f{i}" for i, f in enumerate(self.fields))
            lines.append(f"    return cls({args})")
        exec("\n".join(lines), names)
        function: Callable[[Mapping[str, Value], str], Any] = names["read_body"]
        return function

    # -- compiling annotations into readers and writers ------------------------------------------

    def _compile(self, hint: Any, key: str | None, where: str) -> Compiled:
        """The reader, writer and inline test of a field (or list item) annotated ``hint``."""
        path = key or where.rsplit(".", 1)[-1]
        error = self.error
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)

        if origin is Annotated:
            inner, *marks = args
            if _AsLink in marks:
                return link_reader(path, error), write_link, ("type(v) is Link", "v.cid")
            read, write, fast = self._compile(inner, key, where)
            for mark in marks:
                read = constrained(read, mark, path, error, where)
            size = [m for m in marks if isinstance(m, Size)]
            if len(size) == len(marks) and fast is not None:
                fast = (f"{fast[0]} and len(v) == {size[0].length}", fast[1])
            else:
                fast = None  # a check or a bound: the reader decides
            return read, write, fast
        if origin in (Union, types.UnionType):
            options = [a for a in args if a is not type(None)]
            if len(options) != 1 or len(args) != 2:
                raise TypeError(f"{where}: only 'X | None' unions are supported, got {hint}")
            read, write, fast = self._compile(options[0], key, where)
            if fast is not None:
                fast = (f"v is None or ({fast[0]})", f"None if v is None else {fast[1]}")
            return optional(read), None if write is None else optional_writer(write), fast
        if origin is Literal:
            choices = self._name("choices", frozenset(args))
            test = f"type(v) is str and v in {choices}"
            return literal_reader(path, args, error), None, (test, "v")
        if origin in (Mapping, dict, typing.Mapping):
            if args and args[1] is str:
                fast = ("type(v) is dict and str_values(v)", "v")
                return str_map_reader(path, error), dict, fast
            # Mapping[str, Value]: any map the DAG-CBOR decoder returned.
            return map_reader(path, error), dict, ("type(v) is dict", "v")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            if args[0] is str:
                fast = ("type(v) is list and str_items(v)", "tuple(v)")
                return str_list_reader(path, error), list, fast
            item_read, item_write, _ = self._compile(args[0], key, where)
            return list_reader(path, error, item_read), list_writer(item_write), None
        if hint in SCALARS:
            reader, test = SCALARS[hint]
            return reader(path, error), None, (test, "float(v)" if hint is float else "v")
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            nested: BodyCodec[Any] = BodyCodec(hint, error=error)
            return nested_reader(path, error, nested.decode), nested.encode, None
        raise TypeError(f"{where}: no body codec for {hint!r}")

    def _name(self, prefix: str, value: Any) -> str:
        """A name under which generated code sees ``value``."""
        name = f"{prefix}{len(self._names)}"
        self._names[name] = value
        return name


def _fillable(cls: type[Any]) -> bool:
    """Whether generated code may set the slots of ``cls`` instead of calling ``__init__``."""
    params = getattr(cls, "__dataclass_params__", None)
    return (
        params is not None
        and params.frozen
        and "__slots__" in cls.__dict__
        and not hasattr(cls, "__post_init__")
    )
