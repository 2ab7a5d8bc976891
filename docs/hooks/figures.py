"""MkDocs hook: the Figures section, generated from ``bench/results/`` at build time.

Every ``bench/results/*.md`` (and ``bench/results/<folder>/report.md``) becomes a page
``figures/<name>.md`` holding the file as the benchmark wrote it, plus a line naming its source;
a ``.png`` beside a report is copied and shown under it. ``figures/index.md`` lists them all, and
the nav entry ``figures/index.md`` in mkdocs.yml grows a child per page, labelled by file name. Nothing is written to the
source tree, so the pages cannot go stale: rebuild the docs after a benchmark run.

Only the standard library and mkdocs are used. ``bench/results/tmp*`` (scratch) is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path("bench") / "results"
SECTION = "figures"


@dataclass(frozen=True)
class Figure:
    source: Path  # the .md under bench/results
    name: str     # figures/<name>.md
    title: str
    images: tuple[Path, ...]


def _title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return fallback


def _figures(root: Path) -> list[Figure]:
    results = root / RESULTS
    if not results.is_dir():
        return []
    found = []
    for md in sorted(results.rglob("*.md")):
        rel = md.relative_to(results)
        if rel.parts[0].startswith("tmp"):
            continue
        if len(rel.parts) == 1:
            name = rel.stem
            title = _title(md.read_text(encoding="utf-8"), name)
        else:  # bench/results/router_eval_mbpp/report.md -> router_eval_mbpp
            name = "-".join((*rel.parts[:-1], rel.stem)) if rel.stem != "report" else "-".join(rel.parts[:-1])
            title = f"{_title(md.read_text(encoding='utf-8'), name)}: {name}"
        images = tuple(sorted(md.parent.glob("*.png"))) if len(rel.parts) > 1 else ()
        found.append(Figure(md, name, title, images))
    return found


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_config(config):
    """Expand the nav entry ``figures/index.md`` into the index plus one child per results file."""
    figures = _figures(_root(config))
    nav = config.nav or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and len(item) == 1:
            (label, target), = item.items()
            if target == f"{SECTION}/index.md":
                children = [{"Overview": target}]
                # labelled by file name: many results share a title (one per variant of a run)
                children += [{f.name: f"{SECTION}/{f.name}.md"} for f in figures]
                nav[i] = {label: children}
    return config


def on_files(files, config):
    root = _root(config)
    figures = _figures(root)
    rows = []
    for f in figures:
        text = f.source.read_text(encoding="utf-8").rstrip("\n")
        source = f.source.relative_to(root).as_posix()
        parts = [text, "", f"*Source: `{source}`, as the benchmark wrote it.*", ""]
        for png in f.images:
            uri = f"{SECTION}/{f.name}/{png.name}"
            files.append(File.generated(config, uri, abs_src_path=str(png)))
            parts[1:1] = ["", f"![{png.stem}]({f.name}/{png.name})"]
        files.append(File.generated(config, f"{SECTION}/{f.name}.md", content="\n".join(parts)))
        rows.append(f"| [{f.title}]({f.name}.md) | `{source}` |")
    results = root / RESULTS
    json_only = sorted(j.relative_to(root).as_posix() for j in results.glob("*.json")
                       if not j.with_suffix(".md").exists()) if results.is_dir() else []
    index = [
        "# Figures",
        "",
        "Every results file the benchmarks wrote under `bench/results/`, shown as written (each with",
        "the exact command, the commit, the machine and the load before and after). How a figure is",
        "taken and which targets are met: [Benchmarks and targets](../benchmarks.md). A figure is quoted",
        "in these docs only from a QUIET run.",
        "",
        "| page | file |",
        "|---|---|",
        *rows,
    ]
    if json_only:
        index += ["", "Written as JSON only (no page): " + ", ".join(f"`{j}`" for j in json_only) + "."]
    files.append(File.generated(config, f"{SECTION}/index.md", content="\n".join(index) + "\n"))
    return files
