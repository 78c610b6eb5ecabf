"""The placement controller: its configuration, its in-memory projection of the domain and the
reconcile loop.
"""
