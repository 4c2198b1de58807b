"""Datasets: JSONL files uploaded to the project and validated with the engine's own rules."""
