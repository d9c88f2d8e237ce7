"""scribe_cli/sio.py: socketio imported without the optional backends the client never uses."""

from __future__ import annotations

import subprocess
import sys

from scribe_cli.sio import UNUSED_BACKENDS


def test_uploader_import_leaves_unused_backends_out_and_they_still_import_later():
    """Importing the uploader pulls in neither redis nor requests (each installed here), socketio's
    AsyncClient is complete, and a later `import requests`/`import redis` works as usual."""
    code = (
        "import sys, scribe_cli.upload, scribe_cli.sio as s\n"
        f"hidden = sorted(m for m in {sorted(UNUSED_BACKENDS)!r} if m in sys.modules)\n"
        "assert hidden == [], hidden\n"
        "assert s.socketio.AsyncClient.connect and s.socketio.exceptions.ConnectionError\n"
        "import requests, redis\n"
        "assert requests.get and redis.Redis\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
