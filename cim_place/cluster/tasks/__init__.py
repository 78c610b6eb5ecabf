"""The task queue: the work the controller hands to one node's agent, and the agent's worker.

model (a task, its deterministic id, its command envelope), queue (the stream and the producer),
outcome (what a handler promises and reports, back-off), worker (the agent's consumer).
"""
