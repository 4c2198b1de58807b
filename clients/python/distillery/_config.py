"""Where the client's settings come from, first match wins: arguments, environment variables
(`DISTILLERY_BASE_URL`, `DISTILLERY_API_KEY`, `DISTILLERY_PROFILE`), then the config file.

The config file is YAML, at `$DISTILLERY_CONFIG` or `~/.config/distillery/config.yaml`:

    base_url: http://127.0.0.1:8000
    api_key: dst_...
    timeout: 60
    profiles:                  # optional; chosen with profile= or DISTILLERY_PROFILE
      studio: {base_url: http://studio.local:8000, api_key: dst_...}
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._exceptions import ConfigError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
KEYS = ("base_url", "api_key", "timeout", "max_retries")


def config_path() -> Path:
    if os.environ.get("DISTILLERY_CONFIG"):
        return Path(os.environ["DISTILLERY_CONFIG"]).expanduser()
    root = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return root / "distillery" / "config.yaml"


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    api_key: str | None
    timeout: float
    max_retries: int


def _read_file(path: Path, profile: str | None) -> dict[str, Any]:
    if not path.is_file():
        if profile or os.environ.get("DISTILLERY_CONFIG"):
            raise ConfigError(f"config file {path} does not exist")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings")
    values = {k: data[k] for k in KEYS if k in data}
    if profile:
        profiles = data.get("profiles") or {}
        if profile not in profiles:
            raise ConfigError(f"config file {path}: no profile {profile!r} (have: {', '.join(profiles) or 'none'})")
        values.update({k: v for k, v in (profiles[profile] or {}).items() if k in KEYS})
    unknown = set(data) - set(KEYS) - {"profiles"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(sorted(unknown))}")
    if values.get("api_key") and os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"{path} holds an API key and is readable by others: chmod 600 it", stacklevel=4)
    return values


def resolve_config(
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    profile: str | None = None,
    timeout: float | None = None,
    max_retries: int | None = None,
) -> ClientConfig:
    profile = profile or os.environ.get("DISTILLERY_PROFILE") or None
    env = {"base_url": os.environ.get("DISTILLERY_BASE_URL"), "api_key": os.environ.get("DISTILLERY_API_KEY")}
    args = {"base_url": base_url, "api_key": api_key, "timeout": timeout, "max_retries": max_retries}
    need_file = any(args[k] is None and env.get(k) is None for k in KEYS)
    file = _read_file(config_path(), profile) if need_file or profile else {}

    def pick(key: str, default: Any) -> Any:
        for source in (args, env, file):
            if source.get(key) not in (None, ""):
                return source[key]
        return default

    try:
        return ClientConfig(
            base_url=str(pick("base_url", DEFAULT_BASE_URL)).rstrip("/"),
            api_key=pick("api_key", None),
            timeout=float(pick("timeout", 60.0)),
            max_retries=int(pick("max_retries", 3)),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid client setting: {e}") from None
