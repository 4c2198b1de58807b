"""Operations endpoints: liveness, readiness, Prometheus metrics (no API key needed)."""
