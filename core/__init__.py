"""Shared kit: app factory, micro-batcher, HTTP client, models, rewards."""
