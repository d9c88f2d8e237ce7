"""glibc keeps freed audio buffers for reuse (scribe_protocol/memory.py), in both processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import ctypes, sys
sys.path.insert(0, {root!r})
if {keep}:
    from scribe_protocol.memory import keep_freed_memory
    keep_freed_memory()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
mapped = []
for _ in range(3):  # buffers of one audio-chunks event (16 x 46 KiB), made and freed in turn
    event = bytearray(736_000)
    mapped.append(libc.mallinfo2().hblks)
    del event
print(max(mapped), libc.mallinfo2().hblks)
"""


def mapped_buffers(keep: bool) -> tuple[int, int]:
    """(most separately mmapped blocks while an event's buffer lives, after it is freed)."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), keep=keep)], capture_output=True,
                         text=True, check=True)
    during, after = out.stdout.split()
    return int(during), int(after)


def test_an_events_buffer_comes_from_the_heap_and_stays_there_for_the_next():
    """By default glibc maps a 736 KB buffer on its own and unmaps it when freed (the next one
    is mapped and zeroed again: 1 ms each here); kept, it is heap memory reused in turn."""
    default, kept = mapped_buffers(False), mapped_buffers(True)
    assert default[0] > default[1], f"glibc's default no longer maps such buffers ({default}): revisit memory.py"
    assert kept[0] == kept[1], kept


def test_both_the_uploader_and_the_server_apply_it():
    for module in ("scribe_cli/upload.py", "scribe_cli/capture/watch.py", "scribe_server/cli.py"):
        assert "keep_freed_memory()" in (ROOT / module).read_text(), module
