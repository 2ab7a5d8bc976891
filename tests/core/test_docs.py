"""The README stays a short front page, and the docs/ site builds with no broken link: every
relative link and anchor resolves (`mkdocs build --strict`), and the Figures section has a page
for every results file in bench/results/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_commands_run_on_a_fresh_clone():
    """The README's two commands (and CI's, and the docs' front page) name the bootstrap module,
    which runs with the standard library only, before anything is installed: without an action
    it prints its usage and sets nothing up."""
    for doc in ("README.md", "docs/index.md", ".ci/run"):
        modules = set(re.findall(r"python3\.11 -m (coe[\w.]*)", (ROOT / doc).read_text()))
        assert modules == {"coe.tools.bootstrap"}, f"{doc}: {modules}"
    run = subprocess.run([sys.executable, "-S", "-m", "coe.tools.bootstrap"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 2 and "python3.11 -m coe.tools.bootstrap serve" in run.stderr, run.stderr


def test_readme_links_point_at_files_that_exist():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+://", t) and not t.startswith("#")]
    assert local, "README: links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = sorted((ROOT / "bench" / "results").glob("*.md"))
    assert results
    missing = [md.name for md in results if not (site / "figures" / md.stem / "index.html").is_file()]
    assert not missing, f"no Figures page for {missing}"
    index = (site / "figures" / "index.html").read_text()
    assert all(f"bench/results/{md.name}" in index for md in results)
    models = (site / "models" / "index.html").read_text()
    assert "qwen2.5-coder-0.5b-instruct" in models and "Apache-2.0" in models
