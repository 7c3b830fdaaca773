"""The package layout: one installed top-level name, and the rooms import only what they may."""
from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cwdseg"


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by one source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_installed_top_level_names_are_only_cwdseg():
    dist = metadata.distribution("cwdseg")
    top = (dist.read_text("top_level.txt") or "").split()
    assert top == ["cwdseg"], top
    # The generic names of the old layout are not importable from outside the checkout.
    code = "import importlib.util as u; print([n for n in ('utils','dataset','networks','libs','train','evaluate') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    out = subprocess.run([sys.executable, "-c", "import cwdseg, cwdseg.cli.train, cwdseg.cli.evaluate"], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_console_entry_points():
    eps = {ep.name: ep.value for ep in metadata.distribution("cwdseg").entry_points if ep.group == "console_scripts"}
    assert eps == {"cwd-train": "cwdseg.cli.train:cli", "cwd-eval": "cwdseg.cli.evaluate:cli"}


# room -> the cwdseg rooms it must not import
FORBIDDEN = {
    "models": ("cwdseg.data", "cwdseg.distill", "cwdseg.engine", "cwdseg.evaluation", "cwdseg.checkpoint", "cwdseg.cli"),
    "data": ("cwdseg.models", "cwdseg.distill", "cwdseg.engine", "cwdseg.evaluation", "cwdseg.checkpoint", "cwdseg.cli"),
    "distill": ("cwdseg.data", "cwdseg.engine", "cwdseg.evaluation", "cwdseg.checkpoint", "cwdseg.cli"),
    "engine": ("cwdseg.cli",),
    "evaluation": ("cwdseg.cli",),
    "viz": ("cwdseg.models", "cwdseg.engine", "cwdseg.cli"),
    "export": ("cwdseg.cli", "cwdseg.engine"),
}


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_respect_the_layering(room):
    bad = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[room]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_no_script_is_imported_and_no_import_path_is_patched():
    bad = []
    for folder in ("cwdseg", "tools", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            if "sys.path" in text:
                bad.append(f"{path.relative_to(ROOT)} touches sys.path")
            for name in _imports(path):
                if name.split(".")[0] in ("train", "evaluate", "predict"):
                    bad.append(f"{path.relative_to(ROOT)} imports the script {name}")
    assert not bad, bad


def test_top_level_scripts_are_thin():
    for script, limit in (("train.py", 400), ("evaluate.py", 200), ("predict.py", 200)):
        assert len((ROOT / script).read_text().splitlines()) <= limit
    # The command lines behind them read arguments and call the package: their size stays that of a script.
    for module, limit in (("train.py", 400), ("evaluate.py", 250)):
        assert len((PACKAGE / "cli" / module).read_text().splitlines()) <= limit, module
    src = (PACKAGE / "cli" / "train.py").read_text()
    tree = ast.parse(src)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 100
