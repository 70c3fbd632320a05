"""docs/ARCHITECTURE.md's import rule, checked on every Python file of the packages: which project package may import
which. Parsed with ``ast`` (imports inside functions count too)."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

LIBRARY = ("modules", "dataloaders", "engine")
TASKS = ("pretraining", "video_text_retrieval", "video_captioning", "video_qa")
ROOT_SCRIPTS = ("main_task_clip", "main_task_fusion", "frozen_tfrecord")
PROJECT = (*LIBRARY, *TASKS, *ROOT_SCRIPTS)
# package -> project packages it may import (beyond itself); modules may import only the error types of dataloaders
# and its restricted unpickler (weights files that are torch pickles: safe_pickle needs only errors and textio)
ALLOWED = {
    "modules": {"dataloaders.errors", "dataloaders.safe_pickle"},
    "dataloaders": set(),
    "engine": {"modules", "dataloaders"},
    **{task: {"engine", "modules", "dataloaders"} for task in TASKS},
}


def project_imports(path) -> set[str]:
    """Dotted names of the project modules a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in PROJECT}


def allowed(package: str, name: str) -> bool:
    top = name.split(".")[0]
    rules = ALLOWED[package]
    return top == package or any(name == rule or name.startswith(rule + ".") or top == rule for rule in rules)


@pytest.mark.parametrize("package", list(ALLOWED))
def test_packages_import_only_what_the_architecture_allows(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    broken = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in files
        for name in project_imports(path)
        if not allowed(package, name)
    ]
    assert broken == []


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from engine.trainer import fit\nimport video_qa.task\n")
    assert project_imports(bad) == {"engine.trainer", "engine.trainer.fit", "video_qa.task"}
    assert not allowed("modules", "engine.trainer") and not allowed("engine", "video_qa.task")
    assert allowed("video_qa", "engine.trainer") and allowed("modules", "dataloaders.errors")
    assert not allowed("modules", "dataloaders.datasets")
