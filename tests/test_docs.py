"""docs/architecture.md names files that exist, and imports only go down the layers it draws."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
FILE_SUFFIXES = (".py", ".yaml", ".yml", ".sh", ".conf", ".md", ".toml", ".properties", ".xml", ".json", ".txt")
# What each layer may import of the project's own packages and modules (the edges: clients, launcher, benchmarks).
EDGES = {"client", "serve", "frontend", "bench", "fuzz", "scripts"}
MAY_NOT_IMPORT = {
    "skinlesion": {"serving", "training", *EDGES},
    "serving": {"training", *EDGES},
    "training": {"serving", *EDGES},
}


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def named_paths(text: str, top_level: set[str]) -> set[str]:
    """The repository paths a page names: tokens with a file suffix, or with a slash under a top-level folder."""
    names = set()
    for token in re.findall(r"[\w.*/-]+", text):
        token = token.rstrip(".,:;")
        if token.startswith("/") or "//" in token or token in FILE_SUFFIXES:
            continue  # URL paths (/predict, /predictions/skin), URLs, a suffix alone (model_store/<arch>.json)
        if token.endswith(FILE_SUFFIXES) or ("/" in token and token.split("/")[0] in top_level):
            names.add(token)
    return names


def exists(name: str, files: list[str]) -> bool:
    """A path from the root, a glob, a folder, or a bare file name that some tracked file has."""
    if "/" not in name:
        return any(Path(f).name == name for f in files)
    if "*" in name:
        return any(Path(f).match(name) for f in files)
    return any(f == name.rstrip("/") or f.startswith(name.rstrip("/") + "/") for f in files)


def test_every_file_the_architecture_page_names_exists() -> None:
    files = tracked_files()
    top_level = {f.split("/")[0] for f in files if "/" in f}
    names = named_paths(ARCHITECTURE.read_text(), top_level)
    assert {"serving/service.py", "serving/skin_handler.py", "serving/nginx.conf", "skinlesion/predictor.py"} <= names
    missing = sorted(name for name in names if not exists(name, files))
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_page_check_sees_a_missing_file() -> None:
    files = tracked_files()
    assert not exists("handler/skin_handler.py", files) and exists("serving/*.yaml", files)
    assert named_paths("`handler/skin_handler.py`, POST /predict, application/json", {"serving"}) == {
        "handler/skin_handler.py"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(MAY_NOT_IMPORT))
def test_imports_go_down_the_layers(layer: str) -> None:
    wrong = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & MAY_NOT_IMPORT[layer])
             for path in sorted((ROOT / layer).rglob("*.py"))}
    assert not {path: names for path, names in wrong.items() if names}


def test_the_training_guide_stays_a_guide() -> None:
    # Run-by-run records go to model_store/training-log.md; the guide links it.
    guide = (ROOT / "docs" / "training.md").read_text()
    assert len(guide.encode()) <= 15_000 and "(../model_store/training-log.md)" in guide
