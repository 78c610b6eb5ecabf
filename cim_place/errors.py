"""The one error hierarchy of cim-place.

Every user-facing error names what was wrong, where, and what to do about it. The CLI prints
``str(error)`` as a single line and exits non-zero, so messages are written to stand alone.
"""

from __future__ import annotations


class CimPlaceError(Exception):
    """Base of every error cim-place raises on purpose."""


class StoreError(CimPlaceError):
    """The local object store could not do what was asked (I/O, missing content, bad input)."""


class InvalidCidError(StoreError):
    """A string or byte sequence is not a CID cim-place understands."""


class CorruptBlockError(StoreError):
    """A block's bytes do not hash to its CID. Nothing corrupt is ever returned to a caller."""

    def __init__(self, cid: str, where: str = "") -> None:
        self.cid = cid
        self.where = where
        at = f" in {where}" if where else ""
        super().__init__(
            f"block {cid}{at} is corrupt: its bytes do not match its hash; "
            "the copy was not used (fetch it again from another holder, or run `cim-place gc`)"
        )


class BlockNotFoundError(StoreError):
    """A block that is needed is not in the store."""

    def __init__(self, cid: str) -> None:
        self.cid = cid
        super().__init__(f"block {cid} is not in this store (fetch or import it first)")


class PinNotFoundError(StoreError):
    """No pin with that root CID or name exists."""


class CarError(StoreError):
    """A CAR file is truncated, malformed, or holds a block that does not match its CID."""


class StoreFullError(StoreError):
    """A volume has no room left for a block (disk full or capacity limit reached)."""


class PolicyError(CimPlaceError):
    """A replication policy is invalid or could not be stored."""


class PlacementError(CimPlaceError):
    """The planner or reconciler could not do what was asked."""


class TransportError(CimPlaceError):
    """NATS could not be reached, or answered in a way cim-place did not expect."""


class ProtocolError(TransportError):
    """A message from a peer does not follow its protocol's framing: refused, never acted on."""


class PortTakenError(TransportError):
    """A port that a server was to listen on is in use by another process."""
