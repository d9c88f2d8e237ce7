"""Client settings and the one function that resolves them.

Precedence, highest first: command-line flag > ``SCRIBE_*`` environment
variable > ``SCRIBE_HOME/config.toml`` > default.  ``SCRIBE_HOME`` relocates
all local state (spool, journals, config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from scribe_cli.errors import AuthError, ConfigError

DEFAULT_SERVER = "http://127.0.0.1:3001"
DEFAULT_WINDOW = 32


def scribe_home() -> Path:
    """``SCRIBE_HOME`` or the platform's user data dir."""
    env = os.environ.get("SCRIBE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("scribe", appauthor=False))


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
            raise AuthError("no token is set", "pass --token or set SCRIBE_TOKEN (scribe-server token create NAME)")
        return self.token


def _config_file(home: Path) -> dict:
    path = home / "config.toml"
    if not path.exists():
        return {}
    import tomllib  # only when there is a config file: ~3 ms of every command's start-up otherwise

    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", f"fix or remove {path}") from None
    except OSError as exc:  # a folder of that name, no permission to read it
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", f"make {path} a readable file, or remove it") \
            from None


#: the variables that name a CA file for TLS: OpenSSL's (the Socket.IO connection) and requests' (the HTTP API);
#: either one alone is followed by both (see api.ca_bundle_for_requests and sio.load_deferred_certificates)
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def check_ca_variables() -> None:
    """Refuse a CA variable that names no readable file (ConfigError) before a TLS connection
    would fail on it with a library's own exception."""
    for name in CA_VARIABLES:
        value = os.environ.get(name)
        if value and not os.path.isfile(value):
            raise ConfigError(f"{name} names no CA file: {value}",
                              f"point {name} at the PEM file of the CA that signed the server's certificate, "
                              "or unset it to trust the system's CA store")


def check_server_url(url: str) -> str:
    """Validate a server URL and normalise it to the server's root.

    A trailing ``/`` and a trailing ``/api`` (people paste the API's URL) are
    removed: the client adds ``/api/...`` and ``/socket.io`` itself.
    """
    from urllib.parse import urlsplit

    hint = "give the server's root URL, e.g. --server http://10.0.0.5:3001 (or SCRIBE_SERVER)"
    url = url.strip().rstrip("/")
    if url.endswith("/api"):
        url = url[: -len("/api")]
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"server URL {url!r} must start with http:// or https://", hint)
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        raise ConfigError(f"server URL {url!r} has an invalid port (1-65535)", hint) from None
    if not parts.hostname:
        raise ConfigError(f"server URL {url!r} has no host name", hint)
    if parts.query or parts.fragment:
        raise ConfigError(f"server URL {url!r} must not have a query or fragment", hint)
    return url


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

    server_url = check_server_url(str(pick(server, "SCRIBE_SERVER", "server", DEFAULT_SERVER)))
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
    if not 0.1 <= ack_timeout <= 3600:  # (NaN fails this too) 0 or less would wait for no acknowledgement at all
        raise ConfigError(f"ack_timeout must be between 0.1 and 3600 seconds (got {ack_timeout:g})",
                          "fix SCRIBE_ACK_TIMEOUT or ack_timeout in config.toml (the default is 30)")
    return Settings(home=home, server=server_url, token=pick(token, "SCRIBE_TOKEN", "token", None),
                    window=window_value, ack_timeout=ack_timeout)
