"""The local content-addressed object store: CIDs, UnixFS import/export, blockstores, pins, CAR.

Imports nothing from the other cim_place subpackages.
"""
