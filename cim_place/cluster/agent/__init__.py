"""The leaf agent: its configuration and the composition of one node's services."""
