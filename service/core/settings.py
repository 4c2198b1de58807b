"""All settings in one place, from `DISTILLERY_*` environment variables (or a `.env` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _data_home() -> Path:
    return Path.home() / ".local" / "share" / "distillery"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", env_file=".env", extra="ignore")

    # The embedded default: SQLite and a broker kept in SQLite, no server needed.
    database_url: str = f"sqlite:///{_data_home() / 'distillery.db'}"
    broker_url: str = f"sqla+sqlite:///{_data_home() / 'broker.db'}"
    artifact_root: Path = _data_home() / "artifacts"
    cache_dir: Path = Path.home() / ".cache" / "distillery"

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 2 << 30  # datasets and GGUF uploads
    max_concurrent_uploads: int = 4  # uploads one API process receives at once (429 past it)
    model_roots: list[Path] = []  # server folders models may be registered from ([] = anywhere readable)
    auth_failure_burst: int = 20  # failed authentications one client address may make at once,
    auth_failure_per_second: float = 2.0  # then this many a second (429 past it; service.http.auth_limit)
    metrics_token: SecretStr | None = None  # shows the operator view of /metrics (service.http.metrics)

    lease_seconds: int = 60  # a running job's lease; renewed every lease_seconds / 3
    db_idle_transaction_seconds: int = 300  # PostgreSQL ends a session idle inside a transaction this long
    # (a frozen process would otherwise keep its rows locked: a job row, so no sweeper could take it over)
    sweep_seconds: int = 15  # how often workers look for lost or never-enqueued jobs
    enqueue_grace_seconds: int = 600  # a sent job still queued after this is sent again (a message
    # lost with the broker); never-sent jobs are sent at once
    events_poll_seconds: float = 0.5  # SSE: how often the streams look for new events
    streams_per_key: int = 64  # SSE: open event streams one API key may hold
    streams_total: int = 2000  # SSE: open event streams one API process serves


@lru_cache
def get_settings() -> Settings:
    return Settings()
