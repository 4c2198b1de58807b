"""Artifacts: files a job produced (adapter, student folder, summary, metrics), downloadable by id."""
