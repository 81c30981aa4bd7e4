"""The README's test command is the one CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [
        line for line in readme.splitlines() if "pytest" in line and line.startswith("python3 -m venv")
    ]
    assert len(commands) == 1, "the README must show exactly one test command"
    assert commands[0] in ci.splitlines(), "CI must run the README's test command verbatim"
