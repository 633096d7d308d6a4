"""The README's commands: every job command parses with its job's real flags, and the
pandas / DuckDB snippets of the tour run on a real annotate output."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
SMALL = ["--min-size", "128", "--max-size", "192", "--threshold", "0.01", "--batch-size", "2"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _job_commands() -> list[list[str]]:
    """Every ``python -m jobs.X ...`` in the README's bash blocks (and indented ones), continuation lines joined."""
    text = "\n".join(_blocks("bash")).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in re.split(r"&&|;", line.split("#")[0]):
            words = shlex.split(part)
            if words[:2] == ["python", "-m"] and words[2].startswith("jobs."):
                commands.append(words[2:])
            if "--" in words and "python" in words[words.index("--") :]:  # ray job submit ... -- python -m jobs.X
                tail = words[words.index("--") + 1 :]
                if tail[:2] == ["python", "-m"]:
                    commands.append(tail[2:])
    return commands


def test_readme_names_the_two_setup_commands_and_ci_runs_the_test_one():
    setup = _blocks("bash")[0]
    assert "python -m jobs.annotate" in setup and "python -m pytest" in setup
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", _job_commands(), ids=lambda c: " ".join(c)[:60])
def test_every_job_command_in_the_readme_parses(command):
    module = importlib.import_module(command[0])
    module.build_parser().parse_args(command[1:])  # argparse exits (fails the test) on an unknown flag


def test_tour_snippets_run_on_a_real_annotate_output(ray_cluster, tmp_path, tiny_checkpoint, monkeypatch):
    duckdb = pytest.importorskip("duckdb")
    from jobs.annotate import main, parse_config

    monkeypatch.chdir(tmp_path)
    summary = main(
        parse_config(
            [str(ROOT / "jobs" / "annotate" / "sample_images"), "out/coco-mini", "--weights", tiny_checkpoint, *SMALL]
        )
    )
    assert summary.images > 0 and summary.detections > 0

    (python_snippet,) = [b for b in _blocks("python") if "read_parquet" in b]
    namespace: dict = {}
    exec(python_snippet, namespace)  # noqa: S102 - the README's own code
    assert len(namespace["df"]) == summary.images

    (sql,) = _blocks("sql")
    rows = duckdb.sql(sql.replace("-- duckdb\n", "")).fetchall()
    assert sum(n for _, n, _ in rows) == summary.detections
