"""Packaging rules: namespace roots, every sub-package listed, light imports."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = {"platform": "retro.platform", "components": "retro.components", "cli": "retro.cli"}


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_stdlib_platform_wins_from_repo_root():
    res = run_py("import platform, uuid; print(platform.system())")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("Linux", "Darwin", "Windows")


def test_pytest_runs_from_repo_root():
    for cmd in ([sys.executable, "-m", "pytest", "--co", "-q", "tests/platform/test_layout.py"],
                [str(Path(sys.executable).parent / "pytest"), "--co", "-q",
                 "tests/platform/test_layout.py"]):
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr


def test_code_roots_have_no_init_and_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    for folder, package in CODE.items():
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py shadows"
        assert package in listed
        for init in (ROOT / folder).rglob("__init__.py"):
            sub = init.parent.relative_to(ROOT / folder)
            assert f"{package}.{'.'.join(sub.parts)}" in listed, f"{sub} missing in pyproject"


def test_validate_path_imports_no_heavy_libraries():
    res = run_py("import sys; from retro.platform.registry import registry; "
                 "registry.load_plugins(); import retro.cli.main; "
                 "heavy = [m for m in ('torch', 'ray', 'faiss', 'transformers', 'wandb', "
                 "'datasets', 'matplotlib') if m in sys.modules]; print(heavy)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_platform_never_imports_science_libraries():
    import re

    bad = re.compile(r"^\s*(from|import)\s+(torch|faiss|transformers|retro\.components)\b", re.M)
    for path in (ROOT / "platform").rglob("*.py"):
        match = bad.search(path.read_text())
        assert match is None, f"{path} imports {match and match.group(0)!r}"


def test_components_never_import_the_scheduler():
    for path in (ROOT / "components").rglob("*.py"):
        text = path.read_text()
        for needle in ("retro.platform.scheduler", "retro.platform.execute", "retro.platform.api"):
            assert needle not in text, f"{path} imports {needle}"
