"""What a non-editable install ships: every package of the core and the adapters is listed."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "de_plugin").rglob("__init__.py")}
    found |= {p.parent.name for p in (ROOT / "adapters").glob("*/__init__.py")}
    assert found - listed == set(), "packages missing from [tool.setuptools] packages (a wheel would lack them)"
