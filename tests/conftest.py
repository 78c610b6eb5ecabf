"""Shared pytest configuration: real nats-server fixtures come from cim_place.testing."""

pytest_plugins = ["cim_place.testing"]
