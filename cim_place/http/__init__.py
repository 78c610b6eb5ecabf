"""HTTP access to a node's content: the listeners (``server``), the IPFS trustless gateway
(``gateway`` and its ``gateway_*`` parts, ``sources``, ``domain``), and the S3 API (``s3``).

Imports only ``cim_place.objectstore``, ``cim_place.cluster`` exchange and state modules (the
domain-wide content source), never the agent or controller: the agent builds the applications
and hands them to :func:`cim_place.http.server.start_listeners`.
"""
