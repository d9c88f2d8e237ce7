"""Client settings and the one function that resolves them.

Precedence, highest first: command-line flag > ``SCRIBE_*`` environment
variable > ``SCRIBE_HOME/config.toml`` > default.  ``SCRIBE_HOME`` relocates
all local state (spool, journals, config).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from scribe_cli.errors import ConfigError

DEFAULT_SERVER = "http://127.0.0.1:3001"
DEFAULT_WINDOW = 32


def scribe_home() -> Path:
    """``SCRIBE_HOME`` or the platform's user data dir."""
    env = os.environ.get("SCRIBE_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("scribe", appauthor=False))


@dataclass(frozen=True)
class Settings:
    home: Path
    server: str
    token: str | None
    window: int = DEFAULT_WINDOW
    ack_timeout: float = 30.0

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def journal_dir(self) -> Path:
        return self.home / "journal"

    def require_token(self) -> str:
        if not self.token:
            raise ConfigError("no token is set", "pass --token or set SCRIBE_TOKEN (scribe-server token create NAME)")
        return self.token


def _config_file(home: Path) -> dict:
    path = home / "config.toml"
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", f"fix or remove {path}") from None


def resolve(server: str | None = None, token: str | None = None, window: int | None = None) -> Settings:
    """Resolve settings: flag > SCRIBE_* env > SCRIBE_HOME/config.toml > default."""
    home = scribe_home()
    file = _config_file(home)

    def pick(flag, env_name, key, default):
        if flag is not None:
            return flag
        if os.environ.get(env_name):
            return os.environ[env_name]
        return file.get(key, default)

    server_url = str(pick(server, "SCRIBE_SERVER", "server", DEFAULT_SERVER)).rstrip("/")
    if not server_url.startswith(("http://", "https://")):
        raise ConfigError(f"server URL {server_url!r} must start with http:// or https://")
    try:
        window_value = int(pick(window, "SCRIBE_WINDOW", "window", DEFAULT_WINDOW))
    except ValueError:
        raise ConfigError("window must be an integer") from None
    if not 1 <= window_value <= 1024:
        raise ConfigError("window must be between 1 and 1024")
    try:
        ack_timeout = float(pick(None, "SCRIBE_ACK_TIMEOUT", "ack_timeout", 30.0))
    except ValueError:
        raise ConfigError("ack_timeout must be a number of seconds") from None
    return Settings(home=home, server=server_url, token=pick(token, "SCRIBE_TOKEN", "token", None),
                    window=window_value, ack_timeout=ack_timeout)
