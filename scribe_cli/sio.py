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
that no call site can forget it.

Start-up: ``import socketio`` imports every client, server and message-queue
backend the package has (python-socketio's ``__init__``), among them the
*optional* ones it guards with ``try: import ... except ImportError``: redis,
valkey, kafka, kombu, zmq, aio_pika, and requests + websocket-client for the
synchronous client.  scribe's client uses none of them (``AsyncClient`` rides
on aiohttp), and importing redis and requests alone took a third of a second
of every ``scribe resume``.  So they are hidden while socketio is imported:
socketio then sees them as not installed, exactly as on a machine without
them.  Nothing is left behind (a later ``import requests`` elsewhere works as
usual).  This leans on how the package imports its extras, hence the upper
pins on python-socketio and python-engineio; tests/test_startup_imports.py
checks it.  Every client module imports socketio from here.

Also while socketio is imported: aiohttp's connector builds its two default TLS
contexts at import time, each loading the system's CA certificates (~100 ms of
every ``scribe resume``, ``record`` and ``watch`` here), although an
``http://`` server never needs them.  That one call
(``SSLContext.set_default_verify_paths``, made on this thread during the
import) is recorded instead, and made on the same contexts, exactly as it
would have been, before a connection to an ``https://`` or ``wss://`` server
(``AsyncClient.connect``, ``load_deferred_certificates``).  A TLS connection
made without it fails verification: it can never connect unverified.
"""

from __future__ import annotations

import importlib.abc
import os
import ssl
import sys
import threading

#: optional backends of python-socketio/python-engineio that scribe's client never uses
UNUSED_BACKENDS = frozenset({"redis", "valkey", "kafka", "kombu", "zmq", "aio_pika", "requests", "websocket",
                             "tornado"})


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in UNUSED_BACKENDS:
            raise ModuleNotFoundError(f"{name} is not used by scribe's Socket.IO client", name=name)
        return None


#: TLS contexts made while socketio was imported, whose CA certificates are not loaded yet
_deferred: list[ssl.SSLContext] = []
_deferred_lock = threading.Lock()


def load_deferred_certificates() -> None:
    """Load the CA certificates of the TLS contexts made while socketio was imported
    (see the module docstring); a no-op once done."""
    bundle = None if os.environ.get("SSL_CERT_FILE") else (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"))
    with _deferred_lock:
        while _deferred:
            context = _deferred.pop()
            ssl.SSLContext.set_default_verify_paths(context)
            if bundle:  # requests' variable, when OpenSSL's is unset: one variable serves both stacks
                context.load_verify_locations(cafile=bundle)


def _import_socketio():
    if "socketio" in sys.modules:
        return sys.modules["socketio"]
    hide = _Hide()
    importer = threading.get_ident()
    real = ssl.SSLContext.set_default_verify_paths
    own = "set_default_verify_paths" in vars(ssl.SSLContext)  # not so in CPython: inherited from _ssl

    def deferred(context: ssl.SSLContext) -> None:
        if threading.get_ident() != importer:  # another thread's context: as usual
            return real(context)
        with _deferred_lock:
            _deferred.append(context)

    sys.meta_path.insert(0, hide)
    ssl.SSLContext.set_default_verify_paths = deferred
    try:
        import socketio as module
    finally:
        sys.meta_path.remove(hide)
        if own:
            ssl.SSLContext.set_default_verify_paths = real
        else:
            del ssl.SSLContext.set_default_verify_paths
    return module


socketio = _import_socketio()


class AsyncClient(socketio.AsyncClient):
    """``socketio.AsyncClient`` that never installs a signal handler."""

    def __init__(self, *args, **kwargs):
        kwargs["handle_sigint"] = False
        super().__init__(*args, **kwargs)

    async def connect(self, url, *args, **kwargs):
        if str(url).lower().startswith(("https:", "wss:")):
            from scribe_cli.config import check_ca_variables

            check_ca_variables()
            load_deferred_certificates()
        return await super().connect(url, *args, **kwargs)
