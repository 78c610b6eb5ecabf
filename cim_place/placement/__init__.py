"""The planner (a pure function of object, policy and node map) and the reconciler. No NATS here."""
