"""Offline, deterministic datasets built from what is on disk."""
