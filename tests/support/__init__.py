"""Shared helpers for integration, fault and benchmark tests: broker, topics, consumers."""
