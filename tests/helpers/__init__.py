"""Shared helpers for tests and benchmarks (real-model fixtures and the like)."""
