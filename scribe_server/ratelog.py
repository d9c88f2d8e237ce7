"""Log lines that an attacker or an outage could repeat thousands of times a second."""

from __future__ import annotations

import logging
import time
from typing import Any


class RateLimitedLog:
    """Logs a kind of line at most once per ``every`` seconds, counting the rest."""

    def __init__(self, logger: logging.Logger, every: float = 10.0):
        self.logger, self.every = logger, every
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, level: int, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (0.0, 0))
        if now - last < self.every:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            message += f" ({suppressed} more like it in the last {self.every:.0f} s)"
        self.logger.log(level, message, *args)
