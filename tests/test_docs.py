"""The documentation cannot go stale: the site builds in strict mode, generated tables equal their
sources, every Python example runs, and every command, option, config key and path it shows exists."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from retinanet.config import all_keys

from conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
README = REPO_ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
NO_RUN = re.compile(r"<!--\s*no-run:\s*(.*?)\s*-->\s*$")
HAS_MKDOCS = importlib.util.find_spec("mkdocs") is not None and importlib.util.find_spec("material") is not None


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks(path: Path, language: str) -> list[tuple[int, str, str | None]]:
    """(line, code, no-run reason or None) of each fenced block of `language` in a page."""
    text = path.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        if match.group(1) != language:
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NO_RUN.search(before)
        out.append((text.count("\n", 0, match.start()) + 2, match.group(2), reason and reason.group(1)))
    return out


# ------------------------------------------------------------------------------------------------
# The site
# ------------------------------------------------------------------------------------------------
def _mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


@pytest.mark.skipif(not HAS_MKDOCS, reason="mkdocs / mkdocs-material not installed (pip install -e .[docs])")
def test_site_builds_in_strict_mode(tmp_path):
    proc = _mkdocs_build(REPO_ROOT, tmp_path / "site")
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stderr[-3000:]
    for page in PAGES:
        name = page.relative_to(DOCS).with_suffix("")
        built = tmp_path / "site" / ("index.html" if str(name) == "index" else f"{name}/index.html")
        assert built.is_file(), f"{page.name} was not built"


@pytest.mark.skipif(not HAS_MKDOCS, reason="mkdocs / mkdocs-material not installed (pip install -e .[docs])")
def test_strict_build_fails_on_a_broken_link_a_missing_page_and_a_page_left_out(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    config = (REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    (tmp_path / "mkdocs.yml").write_text(config.replace("  - Contributing: contributing.md",
                                                        "  - Contributing: contributing.md\n  - Gone: gone.md"))
    with open(tmp_path / "docs" / "training.md", "a", encoding="utf-8") as page:
        page.write("\nSee [the missing page](no-such-page.md) and [a missing section](evaluation.md#no-such-section).\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the navigation\n")
    proc = _mkdocs_build(tmp_path, tmp_path / "site")
    assert proc.returncode != 0
    for planted in ("no-such-page.md", "#no-such-section", "gone.md", "orphan.md"):
        assert planted in proc.stderr, (planted, proc.stderr[-3000:])


def _slug(heading: str) -> str:
    """Python-Markdown's default heading id (what mkdocs links to)."""
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def test_readme_links_into_the_docs_resolve():
    """The README is not part of the site, so strict mode does not see its links: check them here."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local), "the README links into the docs"
    for link in local:
        path, _, anchor = link.partition("#")
        target = REPO_ROOT / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+\s+(.*)$", target.read_text(encoding="utf-8"), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"README links to {link}: no such section"


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
    run.write_text(json.dumps({"rows": [{"case": "match", "torchvision_ms": 30.0, "ours_ms": 20.0,
                                         "speed_ratio": 1.5, "torchvision_peak_mb": 10.0, "ours_peak_mb": 5.0,
                                         "memory_ratio": 2.0, "device": "cpu", "threads": 2}],
                               "malloc_env": {}, "repeats": 5, "rounds": 2}))
    target = script.add(run, "cpu", "a test machine", "test", "2026-12-01", "python scripts/benchmark.py")
    data = script.load(target.name)
    assert (data["machine"], data["date"], data["label"]) == ("a test machine", "2026-12-01", "test")
    table = script.table(target.name)
    assert "**a test machine**, 2026-12-01" in table and "| `match` |" in table and "| 1.5 |" in table
    assert "1.5×" in script.summary([target.name])


# ------------------------------------------------------------------------------------------------
# Python examples run
# ------------------------------------------------------------------------------------------------
PYTHON_PAGES = [p for p in PAGES if _blocks(p, "python")]


def test_python_examples_are_marked_runnable_or_say_why_not():
    for page in PAGES + [README]:
        for line, _, reason in _blocks(page, "python"):
            assert reason is None or reason.strip(), f"{page.name}:{line}: no-run needs a reason"


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[p.stem for p in PYTHON_PAGES])
def test_python_examples_run(page, tmp_path, monkeypatch):
    """A page's ```python blocks run in order in one namespace, in an empty folder holding a link to
    configs/ (so that they write nothing into the repository)."""
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code, reason in _blocks(page, "python"):
        if reason is None:
            exec(compile(code, f"{page.relative_to(REPO_ROOT)}:{line}", "exec"), namespace)


# ------------------------------------------------------------------------------------------------
# Commands, options, config keys and paths exist
# ------------------------------------------------------------------------------------------------
SECTIONS = tuple(key for key in all_keys() if "." not in key)
SCRIPT = re.compile(r"^(?:\./)?((?:tools|scripts)/\w+\.py)$")


def _commands(text: str) -> list[list[str]]:
    """The shell commands of a page's ```bash blocks, continuation lines joined, as token lists."""
    commands = []
    for match in FENCE.finditer(text):
        if match.group(1) not in ("bash", "sh", "shell", "console"):
            continue
        for line in match.group(2).replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|\|\||;|\|", line):
                tokens = shlex.split(part, comments=True)
                if tokens:
                    commands.append(tokens)
    return commands


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE))


def command_problems(text: str) -> list[str]:
    """Make targets, tools/ and scripts/ files, their options and the config keys they are given
    that do not exist, in a page's shell commands."""
    cli_source = (REPO_ROOT / "retinanet" / "cli.py").read_text()
    targets, keys, problems = _makefile_targets(), set(all_keys()), []
    for tokens in _commands(text):
        where = " ".join(tokens)
        if tokens[0] == "make":
            problems += [f"{where}: no make target {t}" for t in tokens[1:]
                         if "=" not in t and not t.startswith("-") and t not in targets]
        scripts = [i for i, t in enumerate(tokens) if SCRIPT.match(t)]
        if not scripts:
            continue
        path = REPO_ROOT / SCRIPT.match(tokens[scripts[0]]).group(1)
        if not path.is_file():
            problems.append(f"{where}: {path.relative_to(REPO_ROOT)} does not exist")
            continue
        source = path.read_text()
        for token in tokens[scripts[0] + 1:]:
            if token.startswith("--"):
                option = token.split("=", 1)[0]
                if f'"{option}"' not in source and f'"{option}"' not in cli_source:
                    problems.append(f"{where}: {path.name} has no option {option}")
            elif "=" in token and token.split(".", 1)[0] in SECTIONS and token.split("=", 1)[0] not in keys:
                problems.append(f"{where}: no config key {token.split('=', 1)[0]}")
    return problems


def _code(text: str, languages: tuple[str, ...] | None = None) -> list[str]:
    """Inline code spans and fenced blocks (of `languages`, or all)."""
    return re.findall(r"`([^`\n]+)`", text) + [m.group(2) for m in FENCE.finditer(text)
                                               if languages is None or m.group(1) in languages]


def key_problems(text: str) -> list[str]:
    """`model.foo.bar` in inline code, shell, YAML or plain blocks that is no key of the schema."""
    pattern = re.compile(r"(?<![\w./-])((?:%s)(?:\.\w+)+)(?![\w/(])" % "|".join(SECTIONS))
    keys = set(all_keys())
    return [f"`{key}` is no config key" for snippet in _code(text, ("bash", "yaml", ""))
            for key in pattern.findall(snippet)
            if key not in keys and not key.endswith((".py", ".yaml", ".json", ".pth", ".pt", ".onnx", ".png", ".md"))]


def path_problems(text: str) -> list[str]:
    """Repository paths (retinanet/..., tools/..., configs/..., ...) in code that do not exist."""
    prefixes = ("retinanet", "tools", "scripts", "configs", "tests", "docs")
    pattern = re.compile(r"(?<![\w./~-])((?:%s)/[\w./-]*[\w/])" % "|".join(prefixes))
    return [f"{path} does not exist" for snippet in _code(text) for token in snippet.split()
            if not re.search(r"[{}<>*]|\.\.\.", token)  # a pattern or a placeholder
            for path in pattern.findall(token) if not (REPO_ROOT / path).exists()]


@pytest.mark.parametrize("page", PAGES + [README], ids=[p.stem for p in PAGES] + ["README"])
def test_commands_options_keys_and_paths_exist(page):
    text = page.read_text(encoding="utf-8")
    assert command_problems(text) == []
    assert key_problems(text) == []
    assert path_problems(text) == []


def test_the_checks_find_planted_mistakes():
    commands = """```bash
.venv/bin/python tools/train.py --config configs/shapes_R18.yaml train.optimizer.lr=0.1
.venv/bin/python tools/trian.py --config configs/shapes_R18.yaml
.venv/bin/python tools/infer.py --config c.yaml --weights w.pth --treshold 0.5 \\
    train.optimizer.rl=0.1
make tset
```"""
    assert command_problems(commands) == [
        ".venv/bin/python tools/trian.py --config configs/shapes_R18.yaml: tools/trian.py does not exist",
        ".venv/bin/python tools/infer.py --config c.yaml --weights w.pth --treshold 0.5 train.optimizer.rl=0.1: "
        "infer.py has no option --treshold",
        ".venv/bin/python tools/infer.py --config c.yaml --weights w.pth --treshold 0.5 train.optimizer.rl=0.1: "
        "no config key train.optimizer.rl",
        "make tset: no make target tset"]
    assert key_problems("Set `model.postprocess.score_tresh` or `train.max_iter`.") == [
        "`model.postprocess.score_tresh` is no config key"]
    assert path_problems("See `retinanet/losses/focal.py` and `retinanet/losses/focall.py`.") == [
        "retinanet/losses/focall.py does not exist"]
