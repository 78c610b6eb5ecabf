"""The task queue: the work the controller hands to one node's agent, and the agent's worker."""
