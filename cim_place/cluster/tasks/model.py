"""The task model: what a task is, its deterministic id and its command envelope.

A :class:`Task` is a ``fetch``, ``drop`` or ``verify`` of one root CID on one
node (optionally one volume of it). Its id is deterministic (:func:`task_id`): the same work at
the same ``generation`` (the controller's desired-state revision) always gets the same id, and
the id is the envelope id, hence ``Nats-Msg-Id``, so JetStream drops a repeated enqueue within
the stream's duplicate window. A task travels as a command envelope
(``FetchObject`` / ``DropObject`` / ``VerifyObject``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated

from cim_place.cluster.nats.bodies import BodyCodec, Check, CidLink, MaxItems, sparse, wire
from cim_place.cluster.nats.envelope import Content, Envelope, EnvelopeError
from cim_place.cluster.nats.subjects import check_node_id
from cim_place.objectstore.cid import Cid
from cim_place.objectstore.dagcbor import Value
from cim_place.placement.reconcile_model import TaskKind

__all__ = [
    "COMMAND_TYPES",
    "KINDS",
    "TASK_COMPLETED",
    "TASK_FAILED",
    "Task",
    "TaskFormatError",
    "decode_task",
    "task_envelope",
    "task_id",
]

KINDS: tuple[TaskKind, ...] = ("fetch", "drop", "verify", "repair")
COMMAND_TYPES: Mapping[TaskKind, str] = {
    "fetch": "FetchObject",
    "drop": "DropObject",
    "verify": "VerifyObject",
    # Re-fetch only the damaged blocks of a replica from the verified ``holders``.
    "repair": "RepairObject",
}
_KIND_OF_COMMAND: Mapping[str, TaskKind] = {v: k for k, v in COMMAND_TYPES.items()}
TASK_COMPLETED = "TaskCompleted"
TASK_FAILED = "TaskFailed"

# A task names at most this many holders; more is a malformed (or hostile) message.
_MAX_HOLDERS = 1024
NodeId = Annotated[str, Check(check_node_id)]


class TaskFormatError(EnvelopeError):
    """A message on a task subject that is not a valid task (wrong command, fields or types)."""


# -- the task model -------------------------------------------------------------------------------


def task_id(
    kind: TaskKind, node: str, root: Cid, generation: int, volume: str | None = None
) -> str:
    """The deterministic id of a task: same work at the same generation, same id.

    ``generation`` tells legitimately repeated work apart (the controller passes its desired-state
    revision), so a task re-derived at the same revision is dropped by the stream as a duplicate,
    and one derived at a later revision runs. ``volume`` is part of the id because one node may
    hold several replicas of a root on different volumes.
    """
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_node_id(node)
    digest = hashlib.sha256()
    for part in (kind, node, root.hex(), str(generation), volume or ""):
        digest.update(part.encode())
        digest.update(b"\x00")
    return "t" + digest.hexdigest()[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """One unit of work for one node's agent.

    ``holders`` (for ``fetch``) are node ids that hold the root, in the controller's order of
    preference; the agent may reorder them by locality. ``attempt`` is not sent: the worker fills it
    in from the delivery count (1 on the first delivery).
    """

    id: str = field(metadata=wire("task_id"))
    kind: TaskKind
    node: NodeId
    root: CidLink
    holders: Annotated[tuple[NodeId, ...], MaxItems(_MAX_HOLDERS)] = ()
    volume: str | None = None
    generation: int = 0
    reason: str = ""
    created_by: str = ""
    attempt: int = field(default=1, metadata=wire(None))
    name: str | None = None
    """For fetch: the object's name, owner and metadata, recorded on the new replica's pin."""
    owner: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    rate_limit: int | None = field(default=None, metadata=sparse())
    """Bytes/s the fetch of this task may use (a repair under a policy's ``repair.bandwidth``);
    None: only the agent's own limit applies."""

    @classmethod
    def create(
        cls,
        kind: TaskKind,
        node: str,
        root: Cid,
        *,
        generation: int,
        holders: tuple[str, ...] | list[str] = (),
        volume: str | None = None,
        reason: str = "",
        created_by: str = "",
        name: str | None = None,
        owner: str = "",
        metadata: Mapping[str, str] | None = None,
        rate_limit: int | None = None,
    ) -> Task:
        """A task with its deterministic id (see :func:`task_id`)."""
        return cls(
            id=task_id(kind, node, root, generation, volume),
            kind=kind,
            node=node,
            root=root,
            holders=tuple(holders),
            volume=volume,
            generation=generation,
            reason=reason,
            created_by=created_by,
            name=name,
            owner=owner,
            metadata=dict(metadata or {}),
            rate_limit=rate_limit,
        )

    @property
    def command_type(self) -> str:
        return COMMAND_TYPES[self.kind]

    def body(self) -> dict[str, Value]:
        """The body of the task's command envelope (``attempt`` does not travel)."""
        return _TASK_BODY.encode(self)


_TASK_BODY = BodyCodec(Task, error=TaskFormatError)


def task_envelope(task: Task, *, cause: Envelope | None = None) -> Envelope:
    """The command envelope of ``task``: its id is the task id (hence ``Nats-Msg-Id``).

    With ``cause`` (the event or request that made the controller act), the task joins the cause's
    conversation: same correlation id, causation = the cause's id.
    """
    content = Content("command", task.command_type, task.body())
    owner = task.created_by
    if cause is None:
        return Envelope(task.id, task.id, None, owner, content)
    return Envelope(task.id, cause.correlation_id, cause.id, owner, content)


def decode_task(envelope: Envelope) -> Task:
    """The task carried by a command envelope; raises TaskFormatError naming the first problem.

    The id is the envelope's (the body's ``task_id`` only repeats it), the kind the command's.
    """
    content = envelope.content
    if content.kind != "command":
        raise TaskFormatError(f"a task must be a command, got a {content.kind}")
    kind = _KIND_OF_COMMAND.get(content.type)
    if kind is None:
        raise TaskFormatError(
            f"unknown task command {content.type!r}; "
            f"expected one of {', '.join(COMMAND_TYPES.values())}"
        )
    body = content.body
    if body.get("kind", kind) != kind:
        raise TaskFormatError(f"task kind {body.get('kind')!r} contradicts command {content.type}")
    task = _TASK_BODY.decode(body, label=content.type, id=envelope.id, kind=kind)
    if task.rate_limit is not None and task.rate_limit <= 0:
        # Refused here, with the other format errors, not when a repair builds its throttle.
        raise TaskFormatError(
            f"{content.type} rate_limit must be a positive number of bytes/s, got {task.rate_limit}"
        )
    return task
