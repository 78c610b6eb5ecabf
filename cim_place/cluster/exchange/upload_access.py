"""Who may upload through an agent, and as which owner: the access check of an upload session.

In a domain that authenticates its users (the agent itself connects with credentials), the owner
of the new pin is the requester NATS vouches for (``security.requester_of`` of the open request's
reply subject), never a field the client sends: an empty ``owner`` becomes the requester, a
different one is refused with ``not-allowed``, and so is an anonymous requester. In an open domain
(no users) the client's ``owner`` is taken as it is.
"""

from __future__ import annotations

from cim_place.cluster.exchange.upload_wire import NOT_ALLOWED

__all__ = ["upload_owner"]


class _Refused(Exception):
    """An open request the agent turns down; ``code`` is the error code sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def upload_owner(
    node: str,
    requester: str | None,
    claimed: str,
    *,
    authenticated: bool,
    public_uploaders: frozenset[str],
) -> str:
    """The owner of the new pin; raises _Refused (see the module docstring).

    ``public_uploaders`` are users whose uploads without an owner have none (public).
    """
    if not authenticated:
        return claimed
    if requester is None:
        raise _Refused(
            NOT_ALLOWED,
            f"not allowed: the agent of {node} takes uploads only from authenticated "
            "users; connect with your user's credentials",
        )
    if claimed and claimed != requester:
        raise _Refused(
            NOT_ALLOWED,
            f"not allowed: {requester} may not upload as owner {claimed!r}; leave the "
            f"owner out (it is you) or connect as {claimed}",
        )
    if not claimed and requester in public_uploaders:
        return ""
    return requester
