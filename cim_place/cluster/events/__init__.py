"""The event log: the event types and their bodies, the hub's event store fed by leaf outboxes, its
publisher, and every reader of it.
"""
