"""Sluice runtime: CloudEvents in over HTTP, through Kafka and functions, out to tables."""

__version__ = "0.1.0"
