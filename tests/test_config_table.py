"""The README's config table is generated from the schema and must be current."""
import importlib.util
import subprocess
import sys

from retinanet.config import all_keys

from conftest import REPO_ROOT


def _load_script():
    spec = importlib.util.spec_from_file_location("config_table", REPO_ROOT / "scripts" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_config_table_is_current():
    script = _load_script()
    readme = (REPO_ROOT / "README.md").read_text()
    assert script.readme_with_table(readme) == readme, \
        "README.md's config table is stale: run python scripts/config_table.py"


def test_table_lists_every_key_with_a_meaning():
    rows = _load_script().rows()
    keys = {row[0].strip("`") for row in rows}
    leaves = {k for k in all_keys() if not any(other.startswith(k + ".") for other in all_keys())}
    assert keys == leaves
    assert all(row[3] for row in rows), [row[0] for row in rows if not row[3]]


def test_check_mode_fails_on_a_stale_table(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "config_table.py"), "--check"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0 and "current" in proc.stdout
