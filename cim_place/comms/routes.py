"""Where application messages travel: their NATS subjects, under the domain's prefix.

- command: ``<prefix>.app.cmd.<type>``, core NATS publish, or request/reply;
- query: ``<prefix>.app.qry.<type>``, request/reply (the reply is an event);
- event: ``<prefix>.evt.<node>.app.<type>``, JetStream: stored in the sending node's leaf
  outbox, which the hub's ``CIM_PLACE_EVENTS`` sources (cim_place.cluster.events.store).

Application events share the event store with the system's events (every event is persisted,
and a leaf cut off from the hub keeps them in its outbox) but sit one token deeper, under
``app``, so a reader of system events filters ``<prefix>.evt.*.*`` and a reader of
application events ``<prefix>.evt.*.app.<type>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cim_place.cluster.nats.envelope import Kind
from cim_place.cluster.nats.subjects import Subjects, check_node_id
from cim_place.comms.content import InvalidMessageError, check_type

__all__ = ["Routes"]

_KIND_TOKEN: dict[Kind, str] = {"command": "cmd", "query": "qry"}


def check_pattern(pattern: str) -> str:
    """A subscription pattern: one message type, or ``*`` / ``>`` for every type."""
    if pattern in ("*", ">"):
        return "*"
    try:
        return check_type(pattern)
    except InvalidMessageError:
        raise InvalidMessageError(
            f"subscription pattern {pattern!r} is not usable: give a message type "
            "(letters, digits, '-', '_') or '*' for every type"
        ) from None


@dataclass(frozen=True, slots=True)
class Routes:
    subjects: Subjects

    _known: dict[tuple[Kind, str, str], str] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def of(self, kind: Kind, message_type: str, node: str) -> str:
        """The subject a message of ``kind`` and ``message_type`` sent from ``node`` goes to."""
        subject = self._known.get((kind, message_type, node))
        if subject is None:
            subject = self._subject(kind, message_type, node)
            if len(self._known) < 4096:  # an application uses a few types; stay bounded
                self._known[(kind, message_type, node)] = subject
        return subject

    def _subject(self, kind: Kind, message_type: str, node: str) -> str:
        check_type(message_type)
        if kind == "event":
            return f"{self.subjects.prefix}.evt.{check_node_id(node)}.app.{message_type}"
        return f"{self.subjects.prefix}.app.{_KIND_TOKEN[kind]}.{message_type}"

    def pattern(self, kind: Kind, pattern: str) -> str:
        """The subject filter of a subscription to ``pattern`` messages of ``kind``."""
        token = check_pattern(pattern)
        if kind == "event":
            return f"{self.subjects.prefix}.evt.*.app.{token}"
        return f"{self.subjects.prefix}.app.{_KIND_TOKEN[kind]}.{token}"
