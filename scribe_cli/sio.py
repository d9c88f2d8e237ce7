"""Socket.IO clients that leave Ctrl-C and SIGTERM to scribe (every client scribe opens comes from here).

Why: python-socketio and python-engineio handle SIGINT themselves by default
(``handle_sigint=True``).  The client constructors replace the process's
SIGINT handler with theirs, and ``engineio.AsyncClient.connect`` adds an
event-loop handler (``loop.add_signal_handler(SIGINT, ...)``) that cancels
*every* task and stops the loop.  Once a connection was open, scribe's own
handler never ran again: Ctrl-C froze the uploads while the recorder, in its
thread, recorded on and ``asyncio.run`` waited for it (issue 12).

``handle_sigint=False`` is the libraries' public, documented switch for
"leave interrupt handling to the calling application"; it is forced here so
that no call site can forget it.  No private API is used.
"""

from __future__ import annotations

import socketio


class AsyncClient(socketio.AsyncClient):
    """``socketio.AsyncClient`` that never installs a signal handler."""

    def __init__(self, *args, **kwargs):
        kwargs["handle_sigint"] = False
        super().__init__(*args, **kwargs)
