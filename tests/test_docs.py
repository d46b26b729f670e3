"""The documentation cannot go stale: generated tables equal their sources."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest

from retinanet.config import all_keys

from conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# Generated tables: the configuration reference and the benchmark tables
# ------------------------------------------------------------------------------------------------
def test_configuration_reference_is_current():
    script = _load_script("config_table")
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert script.page_with_table(page) == page, \
        "docs/configuration.md's table is stale: run python scripts/config_table.py"


def test_config_table_lists_every_key_with_a_meaning():
    rows = _load_script("config_table").rows()
    keys = {row[0].strip("`") for row in rows}
    leaves = {k for k in all_keys() if not any(other.startswith(k + ".") for other in all_keys())}
    assert keys == leaves
    assert all(row[3] for row in rows), [row[0] for row in rows if not row[3]]


def test_config_table_check_mode():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "config_table.py"), "--check"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0 and "current" in proc.stdout, proc.stdout + proc.stderr


def test_benchmark_tables_are_current():
    script = _load_script("benchmark_table")
    assert script.stale() == [], "run python scripts/benchmark_table.py"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "benchmark_table.py"), "--check"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0 and "current" in proc.stdout, proc.stdout + proc.stderr


def test_every_benchmark_file_has_its_machine_and_date_and_is_shown():
    script = _load_script("benchmark_table")
    files = sorted((DOCS / "benchmarks").glob("*.json"))
    assert {"cpu.json", "h100.json"} <= {f.name for f in files}
    for path in files:
        data = script.load(path.name)  # raises without machine, date or rows
        assert data["machine"] and re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["date"])
        text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
        assert data["date"] in text and data["machine"] in text
    assert script.tabled_files() == {f.name for f in files}


def test_a_changed_benchmark_file_makes_its_table_stale(tmp_path, monkeypatch):
    script = _load_script("benchmark_table")
    shutil.copytree(DOCS / "benchmarks", tmp_path / "benchmarks")
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    monkeypatch.setattr(script, "DATA", tmp_path / "benchmarks")
    assert script.render(page) == page
    data = json.loads((tmp_path / "benchmarks" / "cpu.json").read_text(encoding="utf-8"))
    data["rows"][0]["speed_ratio"] = 1.01
    (tmp_path / "benchmarks" / "cpu.json").write_text(json.dumps(data), encoding="utf-8")
    rendered = script.render(page)
    assert rendered != page and "| 1.01 |" in rendered
    del data["date"]
    (tmp_path / "benchmarks" / "cpu.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SystemExit, match="has no date"):
        script.render(page)


def test_add_copies_a_run_with_its_machine_and_date(tmp_path, monkeypatch):
    script = _load_script("benchmark_table")
    monkeypatch.setattr(script, "DATA", tmp_path)
    run = tmp_path / "benchmark.json"  # what scripts/benchmark.py --json writes
    run.write_text(json.dumps({"rows": [{"case": "step", "torchvision_ms": 30.0, "ours_ms": 20.0,
                                         "speed_ratio": 1.5, "torchvision_peak_mb": 10.0, "ours_peak_mb": 5.0,
                                         "memory_ratio": 2.0, "device": "cpu", "threads": 2}],
                               "malloc_env": {}, "repeats": 5, "rounds": 2}))
    target = script.add(run, "cpu", "a test machine", "test", "2026-12-01", "python scripts/benchmark.py")
    data = script.load(target.name)
    assert (data["machine"], data["date"], data["label"]) == ("a test machine", "2026-12-01", "test")
    table = script.table(target.name)
    assert "**a test machine**, 2026-12-01" in table and "| `step` |" in table and "| 1.5 |" in table
    assert "1.5×" in script.summary([target.name])
