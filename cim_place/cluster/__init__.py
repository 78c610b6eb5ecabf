"""NATS wiring of a domain, in rooms by role: ``nats`` (connections, subjects, the envelope,
KV names, accounts), ``events`` (the event log), ``state`` (nodes, names, policies, locations,
leadership), ``tasks`` (the task queue), ``exchange`` (moving blocks between nodes), and the two
long-running roles composed from them, ``agent`` and ``controller`` (which never import each other).
"""
