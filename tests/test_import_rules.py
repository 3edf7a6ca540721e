"""The import rules of the house, enforced: import-linter contracts in ``.importlinter``.

The core imports no framework and no adapter; an adapter imports the core through
``de_plugin.adapter`` only (plus ``de_plugin.hookspecs`` for its entry point and ``de_plugin.demo``),
its own framework, and never the other adapter; no import circle among the core's modules.
"""
import ast
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_FOR_ADAPTERS = {"de_plugin.adapter", "de_plugin.hookspecs", "de_plugin.demo"}


def lint(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install 'de-plugin[test]')")
    # the packages as they are under ``root`` (a copy may hold a deliberate violation)
    env = {"PYTHONPATH": f"{root}:{root / 'adapters'}", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    return subprocess.run([exe, "--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_contracts_kept():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "5 kept, 0 broken" in out.stdout


def test_every_core_module_is_behind_the_adapter_api():
    """A new core module is forbidden to adapters unless it is part of the adapter API."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".importlinter")
    listed = set(cfg["importlinter:contract:adapter-api"]["forbidden_modules"].split())
    core = {f"de_plugin.{p.stem}" for p in (ROOT / "de_plugin").glob("*.py") if p.stem != "__init__"}
    core |= {f"de_plugin.{p.parent.name}" for p in (ROOT / "de_plugin").glob("*/__init__.py")}  # subpackages, whole
    assert listed == core - ALLOWED_FOR_ADAPTERS


def test_inc_hooks_module_imports_only_the_hookspec():
    """``de_plugin_inc_hooks`` is a single module (import-linter checks packages): checked here."""
    tree = ast.parse((ROOT / "adapters" / "de_plugin_inc_hooks.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    core = {m for m in imported if m == "de_plugin" or m.startswith("de_plugin.")}
    assert core <= ALLOWED_FOR_ADAPTERS and not imported & {"nni", "de_plugin_nni"}


@pytest.mark.parametrize("where,line", [
    ("de_plugin/channels/coarse.py", "import nni  # violation\n"),
    ("adapters/de_plugin_nni/names.py", "from de_plugin.weights.layerwise import DELayerwise  # violation\n"),
    ("adapters/de_plugin_inc/patterns.py", "import de_plugin_nni  # violation\n"),
    ("de_plugin/pruner.py", "from . import runner  # violation: runner imports pruner, a circle\n"),
])
def test_a_violation_breaks_a_contract(tmp_path, where, line):
    copy = tmp_path / "repo"
    for part in ("de_plugin", "adapters"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / ".importlinter", copy / ".importlinter")
    target = copy / where
    target.write_text(line + target.read_text())
    out = lint(copy)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-2000:]
