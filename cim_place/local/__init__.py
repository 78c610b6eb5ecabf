"""A whole domain on one machine: real nats-server processes, their topologies, and the library
behind ``cim-place up``/``down``.
"""
