"""Exceptions and exit codes of the scribe client.

Exception tree::

    ScribeError                 root; carries a one-line message and a hint
    ├── Interrupted             raised when Ctrl-C, SIGTERM or SIGHUP stopped a command before it finished
    ├── TransientError          retrying later may succeed
    │   └── ServerUnreachable   raised when the server cannot be reached
    └── PermanentError          stop and tell the user
        ├── AuthError           raised when the server refuses the token
        ├── ConfigError         raised when a setting is missing or malformed
        ├── SpoolError          raised when the local spool cannot be used
        │   ├── SpoolFull       raised when the disk under SCRIBE_HOME is full
        │   └── SpoolConflict   raised when a (session, seq) is spooled with other bytes
        ├── NotFound            raised when the server has no such session for this token
        ├── Incomplete          raised when a session still has missing or failed chunks
        └── CaptureError        raised when audio cannot be captured or decoded
            └── NoAudioDevice   raised when PortAudio or an input device is missing
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of ``scribe`` (documented in ``scribe --help`` and docs/operations.md)."""

    OK = 0
    ERROR = 1  # unexpected error, or a chaos run found a violation
    USAGE = 2  # bad command line (typer's own code)
    UNREACHABLE = 3  # server down or not reachable
    AUTH = 4  # token missing, invalid or revoked
    INCOMPLETE = 5  # chunks still pending or failed, or the server reports gaps
    NOT_FOUND = 6  # no such session (locally or for this token on the server)
    NO_AUDIO = 7  # PortAudio missing, no input device, unreadable audio
    DISK = 8  # local disk full or spool unusable
    CONFIG = 9  # a setting's value cannot be used (bad --format, rate, server URL, config.toml)
    INTERRUPTED = 130  # Ctrl-C
    PIPE_CLOSED = 141  # the reader of stdout went away (e.g. `| head`); as a process killed by SIGPIPE


class ScribeError(Exception):
    """Root of the client's exceptions: ``message`` plus a ``hint`` for the user."""

    exit_code = ExitCode.ERROR
    hint = "run the command again with --help"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint


class TransientError(ScribeError):
    """Retrying later may succeed."""


class ServerUnreachable(TransientError):
    exit_code = ExitCode.UNREACHABLE
    hint = "check that scribe-server runs and --server / SCRIBE_SERVER points at it; your audio stays in the spool"


class PermanentError(ScribeError):
    """Retrying will not help; the user must act."""


class NotScribeServer(PermanentError):
    """Something answers at the server's address, but not scribe-server: retrying will not help."""

    exit_code = ExitCode.UNREACHABLE
    hint = ("check --server / SCRIBE_SERVER: scribe-server serve prints the address it listens on; your audio stays "
            "in the spool")


class AuthError(PermanentError):
    exit_code = ExitCode.AUTH
    hint = "set a valid token with --token or SCRIBE_TOKEN (scribe-server token create NAME)"


class ConfigError(PermanentError):
    exit_code = ExitCode.CONFIG
    hint = "check your flags, SCRIBE_* variables and SCRIBE_HOME/config.toml"


class SpoolError(PermanentError):
    exit_code = ExitCode.DISK
    hint = "check the disk under SCRIBE_HOME (scribe pending shows what is spooled)"


class SpoolFull(SpoolError):
    hint = "free disk space under SCRIBE_HOME, then run scribe resume; everything spooled so far is intact"


class SpoolConflict(SpoolError):
    hint = "use a new --session id; a spooled chunk is never overwritten"


class LocalDiskFull(PermanentError):
    """A file scribe writes outside the spool (an export) found its disk full."""

    exit_code = ExitCode.DISK
    hint = "free disk space there, or choose another -o path on another disk"


class NotFound(PermanentError):
    exit_code = ExitCode.NOT_FOUND
    hint = "scribe sessions lists the sessions you have"


class Incomplete(PermanentError):
    exit_code = ExitCode.INCOMPLETE
    hint = "run scribe resume SESSION again when the server is reachable; scribe pending shows what is left"


class CaptureError(PermanentError):
    exit_code = ExitCode.NO_AUDIO
    hint = "check the input file or device (scribe devices)"


class NoAudioDevice(CaptureError):
    hint = "install PortAudio (apt-get install libportaudio2) and connect a microphone, or use scribe watch FOLDER"


class Interrupted(ScribeError):
    """Raised when Ctrl-C, SIGTERM or SIGHUP stopped a command before it finished."""

    exit_code = ExitCode.INTERRUPTED
    hint = "run the same command again; spooled audio is kept"
