"""cim-place: object placement and replication for CIM domains, on NATS.

Start reading at :mod:`cim_place.interfaces`; it names every component and what it promises.
"""

from cim_place.errors import (
    CimPlaceError,
    CorruptBlockError,
    InvalidCidError,
    PlacementError,
    PolicyError,
    StoreError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "CimPlaceError",
    "CorruptBlockError",
    "InvalidCidError",
    "PlacementError",
    "PolicyError",
    "StoreError",
    "TransportError",
    "__version__",
]
