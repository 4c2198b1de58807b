"""Where the client's settings come from, first match wins: arguments (the CLI's `--base-url` / `--api-key`),
environment variables (`DISTILLERY_BASE_URL`, `DISTILLERY_API_KEY`, `DISTILLERY_PROFILE`), then the config file.
So a key stored with `distillery login` is used only while `DISTILLERY_API_KEY` is unset.

The config file is YAML, at `$DISTILLERY_CONFIG` or `$XDG_CONFIG_HOME/distillery/config.yaml` (default
`~/.config/distillery/config.yaml`); `save_settings` writes it with mode 0600 (its folder 0700):

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
from dataclasses import dataclass, field
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
    # where each of base_url and api_key came from: "argument", "env:DISTILLERY_API_KEY", "file:<path>" (with
    # " profile <name>"), or "default" / "unset": so an error can name the variable, flag or file to fix
    sources: dict[str, str] = field(default_factory=dict)


def _read_file(path: Path, profile: str | None) -> dict[str, Any]:
    if not path.is_file():
        if profile or os.environ.get("DISTILLERY_CONFIG"):
            raise ConfigError(f"config file {path} does not exist")
        return {}
    data = read_settings(path)
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

    where = {"args": "argument", "env": "env:DISTILLERY_{}", "file": f"file:{config_path()}"}
    if profile and file:
        where["file"] += f" profile {profile}"
    sources: dict[str, str] = {}

    def pick(key: str, default: Any) -> Any:
        for name, source in (("args", args), ("env", env), ("file", file)):
            if source.get(key) not in (None, ""):
                sources[key] = where[name].format(key.upper())
                return source[key]
        sources[key] = "default" if default is not None else "unset"
        return default

    try:
        return ClientConfig(
            base_url=str(pick("base_url", DEFAULT_BASE_URL)).rstrip("/"),
            api_key=pick("api_key", None),
            timeout=float(pick("timeout", 60.0)),
            max_retries=int(pick("max_retries", 3)),
            sources=sources,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid client setting: {e}") from None


def read_settings(path: Path | None = None) -> dict[str, Any]:
    """The config file as it is (an empty mapping when there is none)."""
    path = path or config_path()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings")
    return data


def save_settings(values: dict[str, Any], *, profile: str | None = None, path: Path | None = None) -> Path:
    """Set `values` (None removes a setting) in the config file, at its top level or in `profiles.<profile>`,
    keeping everything else. Written to a new file with mode 0600, then renamed over the old one."""
    path = path or config_path()
    unknown = set(values) - set(KEYS)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}; settings: {', '.join(KEYS)}")
    data = read_settings(path)
    target = data
    if profile:
        profiles = data.setdefault("profiles", {}) or {}
        data["profiles"] = profiles
        target = profiles.setdefault(profile, {}) or {}
        profiles[profile] = target
    for key, value in values.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(data, fh, sort_keys=False)
        os.replace(tmp, path)
        os.chmod(path, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot write the config file {path}: {e.strerror or e}") from None
    return path
