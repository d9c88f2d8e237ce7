"""Every command has help text with an example, and the docs mention every command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from scribe_cli.cli import app as client_app
from scribe_server.cli import app as server_app

ROOT = Path(__file__).resolve().parent.parent


def commands(app, prefix=()):
    import typer.main

    group = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + (name,))
        else:
            out.append(path)

    walk(group, prefix)
    return out


CLIENT = commands(client_app)
SERVER = commands(server_app)


@pytest.mark.parametrize("app,path", [(client_app, p) for p in CLIENT] + [(server_app, p) for p in SERVER])
def test_every_command_has_help_with_an_example(app, path):
    """`--help` of each command explains it and shows an example."""
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert len(result.output.splitlines()) > 5


def test_docs_mention_every_command():
    """docs/ names every scribe and scribe-server command."""
    text = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for path in CLIENT:
        assert f"scribe {' '.join(path)}" in text, path
    for path in SERVER:
        assert f"scribe-server {' '.join(path)}" in text, path


def test_top_level_help_documents_exit_codes():
    """`scribe --help` lists the exit codes."""
    result = CliRunner().invoke(client_app, ["--help"])
    assert "Exit codes:" in result.output and "130 interrupted" in result.output
