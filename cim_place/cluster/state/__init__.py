"""Shared domain state kept in KV: node heartbeats, names, the applied policy set, the materialised
locations and the controller's leadership lease.
"""
