"""Talking to NATS: connections, every subject and stream name, the message envelope and the codec
of typed message bodies, the KV bucket names, and the domain's users, permissions and requester
identity.
"""
