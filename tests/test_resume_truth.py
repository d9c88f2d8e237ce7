"""`resume` and `gaps` never claim "complete" for audio the server does not have (wrong token, wrong server)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from scribe_cli.config import resolve
from scribe_cli.spool import Spool


def scribe(*args: str, home: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["SCRIBE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "scribe_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def fill(session: str, seqs: range, final: int | None = None, home: Path | None = None,
         salt: bytes = b"", size: int = 40_000) -> None:
    spool_dir = (home / "spool") if home else resolve().spool_dir
    with Spool(spool_dir) as spool:
        for seq in seqs:
            spool.add(session, seq, salt + os.urandom(size), "audio/wav", duration_ms=1000)
        if final is not None:
            spool.set_final_seq(session, final)


def report(result: subprocess.CompletedProcess) -> dict:
    data = json.loads(result.stdout)
    assert not (data["complete"] and not data["server"]["complete"]), data  # never complete next to not complete
    return data


def clean(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def test_resume_with_another_valid_token_is_not_complete(server):
    """Uploaded with alice's token, checked with bob's (valid, created by `token create`): exit 5, names the cause."""
    fill("field", range(20), final=19)
    first = scribe("resume", "field", "--server", server.url, "--token", server.alice, "--json")
    assert first.returncode == 0, first.stderr
    assert report(first)["complete"] is True
    bob = server.token("bob")
    human = scribe("resume", "field", "--server", server.url, "--token", bob)
    clean(human)
    assert human.returncode == 5, human.stdout + human.stderr
    assert "complete" not in human.stdout.replace("not complete", "")
    assert "holds none of the 20 chunk(s)" in human.stderr and "seq 0-19" in human.stderr
    assert "token" in human.stderr and "Try:" in human.stderr
    as_json = scribe("resume", "field", "--server", server.url, "--token", bob, "--json")
    data = report(as_json)
    assert as_json.returncode == 5 and data["complete"] is False and data["uploaded"] is False
    assert data["server"]["found"] is False and data["spool"]["notOnServer"] == [[0, 19]]
    gaps = scribe("gaps", "field", "--server", server.url, "--token", bob)
    clean(gaps)
    assert gaps.returncode == 5 and "holds none of the 20 chunk(s)" in gaps.stderr
    again = scribe("resume", "field", "--server", server.url, "--token", server.alice, "--json")
    assert again.returncode == 0 and report(again)["complete"] is True  # the right token still says complete
    gaps = scribe("gaps", "field", "--server", server.url, "--token", server.alice, "--json")
    assert gaps.returncode == 0 and json.loads(gaps.stdout)["spool"]["checksums"] == "match"


def test_resume_against_an_empty_second_server_is_not_complete(server, server_factory):
    """--server pointing at a second, empty server: exit 5 with the seqs it lacks, never 'complete'."""
    fill("trip", range(8), final=7)
    assert scribe("resume", "trip", "--server", server.url, "--token", server.alice).returncode == 0
    other = server_factory("second")
    token = other.token("alice")
    other.start()
    result = scribe("resume", "trip", "--server", other.url, "--token", token, "--json")
    clean(result)
    data = report(result)
    assert result.returncode == 5 and not data["complete"] and data["spool"]["notOnServerCount"] == 8
    assert other.url in result.stderr and "different server or token" in result.stderr
    gaps = scribe("gaps", "trip", "--server", other.url, "--token", token, "--json")
    assert gaps.returncode == 5 and json.loads(gaps.stdout)["spool"]["notOnServer"] == [[0, 7]]


def test_server_with_other_bytes_under_the_same_seqs_is_not_complete(server, server_factory, tmp_path):
    """A server holding the same seqs with other checksums (another client's audio): exit 5, 'other bytes'."""
    other = server_factory("second")
    token = other.token("alice")
    other.start()
    home2 = tmp_path / "other-client"
    fill("same", range(5), final=4)
    fill("same", range(5), final=4, home=home2, salt=b"other")
    assert scribe("resume", "same", "--server", server.url, "--token", server.alice).returncode == 0
    assert scribe("resume", "same", "--server", other.url, "--token", token, home=home2).returncode == 0
    result = scribe("resume", "same", "--server", other.url, "--token", token, "--json")
    clean(result)
    data = report(result)
    assert result.returncode == 5 and data["spool"]["checksums"] == "differ" and not data["complete"]
    assert "other bytes" in result.stderr


def test_gaps_of_a_session_only_in_the_spool_says_so(server):
    """`gaps` for a session not yet uploaded: '6 chunk(s) ... spooled, not yet uploaded: run scribe resume', exit 5."""
    fill("local", range(6))
    result = scribe("gaps", "local", "--server", server.url, "--token", server.alice)
    clean(result)
    assert result.returncode == 5
    assert "6 chunk(s) spooled, not yet uploaded: run scribe resume local" in " ".join(result.stdout.split())
    assert "no session" not in result.stderr and "scribe resume local" in result.stderr
    as_json = scribe("gaps", "local", "--server", server.url, "--token", server.alice, "--json")
    data = json.loads(as_json.stdout)
    assert as_json.returncode == 5 and data["found"] is False and data["spooled"] == 6 and not data["complete"]
    nowhere = scribe("gaps", "nowhere", "--server", server.url, "--token", server.alice)
    assert nowhere.returncode == 6 and "Traceback" not in nowhere.stderr


def test_open_session_is_uploaded_but_not_complete(server):
    """No final seq anywhere: resume exits 0 ('uploaded'), but --json never says complete."""
    fill("open", range(3))
    result = scribe("resume", "open", "--server", server.url, "--token", server.alice, "--json")
    data = report(result)
    assert result.returncode == 0 and data["uploaded"] is True and data["complete"] is False
    human = scribe("resume", "open", "--server", server.url, "--token", server.alice)
    assert human.returncode == 0 and "still open" in " ".join(human.stdout.split())


def test_chunk_quarantined_after_a_crash_is_settled_when_the_server_holds_it(server, tmp_path):
    """A spool copy whose value file vanished: fsck quarantines it; resume finds it on the server and completes."""
    fill("copy", range(10), final=9, size=300_000)  # above INLINE_MAX: each chunk's audio is a value file
    home = resolve().home
    copy = tmp_path / "copy-home"
    shutil.copytree(home, copy)
    assert scribe("resume", "copy", "--server", server.url, "--token", server.alice).returncode == 0
    with Spool(copy / "spool") as spool:
        handle = spool.cache.get("a/copy/0000000004", read=True)
        os.remove(handle.name)
        handle.close()
    pending = json.loads(scribe("pending", "--json", home=copy).stdout)
    assert len(pending["chunks"]) == 9 and [m["seq"] for m in pending["audioMissing"]] == [4]
    fsck = scribe("fsck", "--json", home=copy)
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["missingAudio"] == [{"session": "copy", "seq": 4}]
    result = scribe("resume", "copy", "--server", server.url, "--token", server.alice, "--json", home=copy)
    data = report(result)
    assert result.returncode == 0, result.stderr
    assert data["complete"] and data["quarantined"] == [] and data["spool"]["uploaded"] == 10


def test_resume_of_a_large_backlog_is_complete_and_gives_the_spool_space_back(server, tmp_path):
    """The spool's VACUUM runs beside the server's check at the end of `resume`: both still
    happen (the verdict is checked against the server's checksums, the file shrinks)."""
    home = tmp_path / "client-home"
    fill("big", range(600), final=599, size=47_104)  # ~27 MiB in the spool's database
    database = home / "spool" / "cache.db"
    before = database.stat().st_size
    assert before > 25 * 2**20
    result = scribe("resume", "big", "--json", "--server", server.url, "--token", server.alice)
    clean(result)
    assert result.returncode == 0, result.stderr
    data = report(result)
    assert data["complete"] and data["spool"]["checksums"] == "match", data
    assert data["spool"]["uploaded"] == 600
    assert database.stat().st_size < 2 * 2**20, "the space of the sent chunks was given back"
    assert [c["sequence"] for c in server.get("/api/sessions/big", server.alice).json()["chunks"]] == list(range(600))
