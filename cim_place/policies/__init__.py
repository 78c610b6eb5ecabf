"""Replication policies: the YAML schema, validation, selectors and the policy store (NATS KV)."""
