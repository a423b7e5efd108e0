"""`bash broker/install.sh` on a machine whose Python refuses `pip install` (PEP 668, as
Debian 12's does): it installs into a virtual environment, .venv, which then runs the
package. Run on a copy of the project, so the test leaves the working tree alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# A python3 that refuses `pip install` outside a virtual environment, as PEP 668 has it.
PEP_668_PYTHON = f"""\
#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ] && [ "$3" = "install" ]; then
    echo "error: externally-managed-environment" >&2
    exit 1
fi
exec {sys.executable} "$@"
"""


@pytest.mark.timeout(300)
def test_install_makes_and_uses_a_virtual_environment_where_pip_is_refused(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "broker"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "flotta_mqtt", project / "flotta_mqtt", ignore=_caches)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(PEP_668_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    environment.pop("VIRTUAL_ENV", None)
    environment.pop("PYTHONPATH", None)  # a checkout on it would answer for the venv's package

    install = subprocess.run(
        ["bash", "broker/install.sh"],
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert install.returncode == 0, install.stderr
    assert "installed in" in install.stdout and ".venv" in install.stdout
    check = textwrap.dedent(
        """
        import sys, flotta_mqtt.cli.main
        print(sys.prefix != sys.base_prefix, flotta_mqtt.cli.main.__file__)
        """
    )
    ran = subprocess.run(
        [str(project / ".venv" / "bin" / "python"), "-c", check],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    in_venv, module = ran.stdout.split()
    assert in_venv == "True"
    assert Path(module).is_relative_to(project)


def _caches(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if name in ("__pycache__", ".mypy_cache")]
