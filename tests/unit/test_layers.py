"""The one-way data flow is a checked contract (setup.cfg, import-linter), not a hope."""

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_import_layers_contract_is_kept() -> None:
    lint = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is part of the test extra"
    result = subprocess.run([lint, "--config", str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nurseries_are_opened_only_in_the_composition_root() -> None:
    offenders = [p.name for p in (ROOT / "taskd").rglob("*.py")
                 if "open_nursery" in p.read_text() and p.name != "server.py"]
    assert offenders == []
