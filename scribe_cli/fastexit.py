"""Leave the process without the interpreter's teardown, once a command is done.

A finished ``scribe`` command still spends 50-120 ms in CPython's finalization:
freeing every module it imported (aiohttp, socketio, sqlite3, typer, rich...)
and their objects, one by one, for a process that is about to end anyway.
For the read-only commands that is a third of their run, and every ``scribe
resume`` in a script pays it.

``exit_now(code)`` does what the interpreter's exit would do that matters:
it returns when other non-daemon threads are still running (the normal exit
then waits for them), runs the ``atexit`` handlers (``logging.shutdown``,
``weakref.finalize`` callbacks...), flushes stdout and stderr (a closed pipe
behaves as in Python: no traceback, exit code 120 when the output was lost),
then ends the process with ``os._exit``, skipping only the freeing of memory.

``atexit._run_exitfuncs`` is CPython's own (undocumented) way to run the
handlers early; it exists in every CPython 3 and is kept in this one module.
tests/test_fastexit.py checks that exit codes, piped output and atexit
handlers survive.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_now(code: object) -> None:
    """End the process with ``code`` (as ``sys.exit`` would read it), or return when that is unsafe."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    run = getattr(atexit, "_run_exitfuncs", None)
    if run is None:  # not CPython: exit the usual way
        return
    run()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (scribe pending | head): output lost, as in Python
            if stream is sys.stdout and status == 0:
                status = 120
    os._exit(status)
