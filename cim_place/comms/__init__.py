"""Application messaging over a cim-place domain, with large content offloaded to the object store.

Send a command carrying a 100-page PDF: the PDF is stored through the local agent, the command
travels with a CID link in its place, and a listener reads the PDF back by that CID::

    async with await Comms.connect(url, "node-a", owner="alice") as comms:
        await comms.send(command("AddDocument", {"pdf": Attachment(path, "application/pdf")}))

Modules: ``content`` (what a body may hold, the offload marker), ``offload`` (the sending side's
walk), ``outgoing`` (envelopes to send, the small message's fast path),
``access`` (the receiving side), ``message`` (what a handler gets), ``routes`` (subjects),
``settings`` (the domain's offload threshold in KV), ``client`` (the Comms API).
"""

from cim_place.comms.access import ContentAccessDeniedError, ContentUnavailableError
from cim_place.comms.client import AppSubscription, Comms, Handler, HandlerFailedError
from cim_place.comms.content import (
    Attachment,
    ContentRef,
    InvalidMessageError,
    command,
    event,
    query,
)
from cim_place.comms.message import Message
from cim_place.comms.settings import (
    DEFAULT_OFFLOAD_THRESHOLD,
    read_offload_threshold,
    set_offload_threshold,
)

__all__ = [
    "DEFAULT_OFFLOAD_THRESHOLD",
    "AppSubscription",
    "Attachment",
    "Comms",
    "ContentAccessDeniedError",
    "ContentRef",
    "ContentUnavailableError",
    "Handler",
    "HandlerFailedError",
    "InvalidMessageError",
    "Message",
    "command",
    "event",
    "query",
    "read_offload_threshold",
    "set_offload_threshold",
]
