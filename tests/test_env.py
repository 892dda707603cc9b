"""Every NPN_* variable is read in npn_kernels/_env.py and listed in the README."""

from __future__ import annotations

import re
from pathlib import Path

from npn_kernels import _env

ROOT = Path(__file__).resolve().parent.parent


def test_readme_lists_every_variable():
    readme = (ROOT / "README.md").read_text()
    for name in _env.ENV_VARS:
        assert f"| `{name}` |" in readme, name


def test_no_other_module_reads_the_environment():
    offenders = []
    for path in (ROOT / "npn_kernels").rglob("*.py"):
        if path.name != "_env.py" and re.search(r"os\.environ|os\.getenv", path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"read environment variables through npn_kernels/_env.py: {offenders}"


def test_every_npn_variable_in_the_package_is_declared():
    used = set()
    for path in list((ROOT / "npn_kernels").rglob("*.py")) + [ROOT / "setup.py"]:
        used |= set(re.findall(r"\bNPN_[A-Z_]+\b", path.read_text()))
    assert used <= set(_env.ENV_VARS), used - set(_env.ENV_VARS)
