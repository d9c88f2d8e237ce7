"""Output scripts and people can rely on: JSON shapes, help, version, units, the README recipe."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from scribe_cli.cli import app as client_app
from scribe_server.cli import app as server_app
from tests.conftest import ROOT
from tests.infra import free_port
from tests.test_client_upload import fill_spool, scribe

STREAMING = ["record", "watch", "demo", "follow", "chaos"]
DOCUMENT = ["resume", "pending", "gaps", "sessions", "export", "devices"]
CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")


def keys(data) -> set[str]:
    """Every key of every object in ``data``, recursively."""
    if isinstance(data, dict):
        return set(data) | {k for v in data.values() for k in keys(v)}
    if isinstance(data, list):
        return {k for v in data for k in keys(v)}
    return set()


@pytest.mark.parametrize("command", STREAMING + DOCUMENT)
def test_json_help_says_lines_or_one_document(command):
    """`--json` help says JSON Lines for streaming commands and one document for the others, camelCase for all."""
    result = CliRunner().invoke(client_app, [command, "--help"], terminal_width=400)
    assert result.exit_code == 0
    (line,) = [line for line in result.output.splitlines() if line.strip().startswith("--json")]
    assert ("JSON Lines" in line) == (command in STREAMING), line
    assert ("one JSON document" in line) == (command in DOCUMENT), line
    assert "camelCase" in line


def test_json_keys_are_camel_case(server):
    """pending, sessions, resume and gaps --json use camelCase keys only (no dataclass snake_case)."""
    fill_spool("keys", 3, final=False)
    docs = [json.loads(scribe("pending", "--json").stdout), json.loads(scribe("sessions", "--json").stdout)]
    assert {"mimeType", "durationMs", "lastError"} <= keys(docs[0])
    assert "finalSeq" in keys(docs[1])
    resumed = scribe("resume", "keys", "--server", server.url, "--token", server.alice, "--json")
    docs.append(json.loads(resumed.stdout))
    assert "ackedBytes" in keys(docs[-1])
    docs.append(json.loads(scribe("gaps", "keys", "--server", server.url, "--token", server.alice, "--json").stdout))
    snake = {k for doc in docs for k in keys(doc) if not CAMEL.match(k)}
    assert not snake, snake


def test_streaming_json_is_json_lines_ending_in_done(tmp_path):
    """`watch --json` prints one object per line, each with an event, the last one `done`."""
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "notes.txt").write_text("not audio")  # listed once as ignored; a rejected file would exit 5
    result = scribe("watch", str(folder), "--once", "--offline", "--settle", "0.1", "--json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and [e["event"] for e in events] == ["ignored", "done"], result.stderr
    assert all("event" in e for e in events) and events[-1]["event"] == "done"
    assert all(CAMEL.match(k) for k in keys(events))


def test_version_on_both_clis():
    """`scribe --version` and `scribe-server --version` print the version and exit 0."""
    for module, name in (("scribe_cli", "scribe"), ("scribe_server", "scribe-server")):
        result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and re.fullmatch(rf"{name} \d+\.\d+\.\d+\S*\n", result.stdout), result


def test_server_help_keeps_env_and_default_brackets():
    """`scribe-server serve --help` shows "[env: ...; default: ...]" (rich markup used to eat it)."""
    result = CliRunner().invoke(server_app, ["serve", "--help"], terminal_width=400)
    assert "[env: SCRIBE_SERVER_HOME; default: user data dir]" in result.output
    assert "[env: SCRIBE_SERVER_DATABASE_URL; default: SQLite in the data dir]" in result.output


def test_serve_warns_when_its_store_has_no_token(server_factory):
    """A server whose store holds no active token says so on stderr (every client would be refused)."""
    srv = server_factory("empty").start()
    srv.stop()
    log = srv.log_path.read_text()
    assert "holds no active token" in log and "scribe-server token create NAME --data-dir" in log


def test_readme_server_recipe_works_literally(tmp_path):
    """The README's "Using the server" commands, run as written in a fresh directory, list sessions (not 401)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using the server"):]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    port = free_port()
    script = script.replace("3001", str(port)) + 'status=$?\nkill $! 2>/dev/null; wait\nexit $status\n'
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SCRIBE_SERVER_HOME")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", "curl() { command curl -sS --fail \"$@\"; }\n" + script],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"sessions": []}
    assert "holds no active token" not in result.stderr


def test_progress_speed_and_summary_use_the_same_units():
    """The progress bar's speed and the summary line both say MiB/s (binary), never MB/s."""
    from scribe_cli import display

    column = display.BinarySpeedColumn().render(SimpleNamespace(finished_speed=None, speed=3 * 2**20))
    assert column.plain == "3.0 MiB/s"
    stats = SimpleNamespace(sent=6, acked=6, duplicates=0, skipped=0, acked_bytes=6 * 2**20, elapsed=2.0, disconnects=0)
    from scribe_cli.jobs import ResumeResult

    result = ResumeResult(session="s", stats=stats, pending=0, failed=[], quarantined=[], server={})
    with display.console.capture() as captured:
        display.print_resume(result)
    assert "(3.0 MiB/s)" in captured.get()


def test_timeline_reads_without_colour():
    """Stored, missing-but-spooled and missing cells are different characters, not only different colours."""
    from scribe_cli import display

    line = display.timeline(9, [[3, 4], [7, 8]], spooled={3, 4}).plain
    stored, spooled, missing = display.TIMELINE_CELLS
    assert len({stored, spooled, missing}) == 3
    assert line == stored * 3 + spooled * 2 + stored * 2 + missing * 2 + stored


def test_piped_output_is_not_wrapped_and_has_no_dict_reprs(server):
    """Piped human output keeps each sentence on one line (no 80-column wrap) and prints no Python dict."""
    fill_spool("piped-" + "x" * 40, 2)
    session = "piped-" + "x" * 40
    result = scribe("resume", session, "--server", server.url, "--token", server.alice)
    assert result.returncode == 0, result.stderr
    (summary,) = [line for line in result.stdout.splitlines() if "sent" in line]
    assert summary.startswith(session) and "disconnect(s)" in summary and len(summary) > 100
    chaos = scribe("chaos", "--chunks", "20", "--chunk-bytes", "2048", "--cut-every", "0.2", "--server-kills", "0",
                   "--client-kills", "1", "--duplicates", "0.1", "--seed", "3", timeout=300)
    assert chaos.returncode == 0, chaos.stdout[-2000:] + chaos.stderr[-2000:]
    assert "{'" not in chaos.stderr + chaos.stdout and "Traceback" not in chaos.stderr, chaos.stderr
    assert "Exception in callback" not in chaos.stderr


@pytest.mark.slow
def test_ci_installs_into_a_fresh_venv_and_fails_when_no_test_ran(tmp_path):
    """`.ci/run` builds its own venv from pyproject alone, and a run in which no test ran fails (pytest exit 5)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(SCRIBE_CI_SKIP_APT="1", TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "-k", "no_test_has_this_name", "-p", "no:cacheprovider"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 5, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no test ran" in result.stderr
    assert not list(tmp_path.glob("scribe-ci-venv.*")), "the CI venv is removed afterwards"

