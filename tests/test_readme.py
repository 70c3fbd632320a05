"""Every command in the README's code blocks names a script that exists and only flags that script accepts."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def readme_commands() -> list[str]:
    """Shell commands of the README's ```bash blocks (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@functools.cache
def help_text(target: tuple[str, ...]) -> str:
    proc = subprocess.run(
        [sys.executable, *target, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(target)} --help failed: {proc.stderr[-2000:]}"
    return proc.stdout


def entry_of_shell_script(script: str) -> tuple[str, ...]:
    """The python entry a launch script runs (the .py it hands to torchrun or python)."""
    text = (REPO / script).read_text()
    if "scripts/demo.py" in text or "scripts/test.sh" in text or "pytest" in text:
        return ()
    module = re.search(r"\n\s+-m ([\w.]+)", text)  # launch -m MODULE (the task packages' entry points)
    if module:
        return ("-m", module.group(1))
    match = re.search(r"([\w/]+\.py)", text)
    return (match.group(1),) if match else ()


def parse(command: str) -> tuple[tuple[str, ...], list[str]]:
    """(python target, flags) of one README command; target () when the command runs no project script."""
    tokens = [t for t in shlex.split(command) if not ENV_ASSIGNMENT.match(t)]
    flags = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
    if tokens[:1] in (["python"], ["python3"]) and tokens[1] == "-m":
        module = tokens[2]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"README names a missing module {module}"
        return ("-m", module), flags
    if tokens[:1] in (["python"], ["python3"]):
        assert (REPO / tokens[1]).is_file(), f"README names a missing script {tokens[1]}"
        return (tokens[1],), flags
    if tokens[:1] == ["torchrun"]:
        flags = [f for f in flags if not f.startswith(("--nproc", "--nnodes", "--node_rank", "--master"))]
        if "-m" in tokens:
            module = tokens[tokens.index("-m") + 1]
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"README names a missing module {module}"
            return ("-m", module), flags
        script = next(t for t in tokens if t.endswith(".py"))
        assert (REPO / script).is_file(), f"README names a missing script {script}"
        return (script,), flags
    if tokens[:1] == ["bash"]:
        assert (REPO / tokens[1]).is_file(), f"README names a missing script {tokens[1]}"
        return entry_of_shell_script(tokens[1]), flags
    raise AssertionError(f"unrecognised README command: {command}")


COMMANDS = readme_commands()


def test_readme_has_the_two_setup_commands_first():
    assert COMMANDS[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_names_existing_script_and_flags(command):
    target, flags = parse(command)
    if not target or not flags:
        return
    text = help_text(target)
    unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not unknown, f"{command!r}: {' '.join(target)} does not accept {unknown}"
