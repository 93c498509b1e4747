"""Typed clients of maas services, for other services, the CLI and tests."""
