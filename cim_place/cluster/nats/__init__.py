"""Talking to NATS: connections, every subject and stream name, the message envelope, the KV bucket
names, and the domain's users, permissions and requester identity.
"""
