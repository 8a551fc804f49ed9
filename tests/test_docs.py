"""The repository stands on its own: every "THEORY" citation in code, tests and docs names a
section of docs/theory.md, nothing points outside the repository, and the documentation site
builds (``mkdocs build --strict``, gallery executed) without a network."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THEORY_DOC = ROOT / "docs" / "theory.md"
WORD = "THE" + "ORY"  # spelt apart so that this file's own examples are not citations

# "THEORY 6", "THEORY §5", "THEORY section 7", "THEORY sections 4, 6", "THEORY.md sections 4, 5",
# "THEORY 6-8", "THEORY 3 and 7", "THEORY §4, §5": the section numbers that follow the word
_CITATION = re.compile(WORD + r"(?:\.md)?(?:'s)?[ \t]*\(?[ \t]*(?:sections?|§)?[ \t]*"
                       r"(§?\d+(?:[ \t]*(?:,|-|–|and|to)[ \t]*(?:sections?[ \t]*)?§?\d+)*)")
_NUMBER = re.compile(r"\d+")
_RANGE = re.compile(r"(\d+)[ \t]*[-–][ \t]*§?(\d+)")

_SKIP_DIRS = {".git", "site", "build", "dist", "runs", "experiments", "__pycache__", ".pytest_cache",
              ".ruff_cache", ".venv", ".jax_cache", ".hypothesis"}
_TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".txt", ".cfg", ".cff", ".json", ""}


def theory_sections(text: str) -> set[int]:
    """Numbers of the top-level sections ``## N. title`` of the theory document."""
    return {int(m) for m in re.findall(r"^## (\d+)\. ", text, flags=re.M)}


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(section, the citation as written) for every THEORY citation in ``text``."""
    out = []
    for m in _CITATION.finditer(text):
        spec = m.group(1)
        nums = {int(n) for n in _NUMBER.findall(spec)}
        for lo, hi in _RANGE.findall(spec):
            nums.update(range(int(lo), int(hi) + 1))
        out.extend((n, m.group(0)) for n in sorted(nums))
    return out


def repo_files() -> list[Path]:
    """The repository's text files: tracked plus untracked-not-ignored when git can say, else a walk."""
    try:
        res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60)
        names = [ROOT / n for n in res.stdout.splitlines()]
    except (OSError, subprocess.SubprocessError):
        names = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            names += [Path(dirpath) / f for f in filenames if f not in ("CLAUDE.md", "AGENTS.md")]
    return [p for p in names if p.is_file() and p.suffix in _TEXT_SUFFIXES and p.name != "test_docs.py"]


def test_citation_parser():
    """The parser finds the forms the repository uses (and would miss none of a list)."""
    w = WORD
    assert cited_sections(f"({w} 6)") == [(6, f"{w} 6")]
    assert [n for n, _ in cited_sections(f"{w} §5 and {w} section 7")] == [5, 7]
    assert [n for n, _ in cited_sections(f"{w}.md sections 4, 5, 7 and 8")] == [4, 5, 7, 8]
    assert [n for n, _ in cited_sections(f"{w} 6-8")] == [6, 7, 8]
    assert [n for n, _ in cited_sections(f"{w} §4, §5")] == [4, 5]
    assert [n for n, _ in cited_sections(f"{w}'s condition")] == []
    assert theory_sections("## 1. A\n## 2. B\n### 2.1 not top level\n") == {1, 2}


def test_theory_document_has_sections_1_to_8():
    secs = theory_sections(THEORY_DOC.read_text(encoding="utf-8"))
    assert secs == set(range(1, 9)), sorted(secs)


def test_every_theory_citation_resolves():
    """`grep -rn THEORY .` finds only citations of sections present in docs/theory.md."""
    secs = theory_sections(THEORY_DOC.read_text(encoding="utf-8"))
    bad, n_cites = [], 0
    for p in repo_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, cite in cited_sections(text):
            n_cites += 1
            if n not in secs:
                bad.append(f"{p.relative_to(ROOT)}: {cite!r} -> section {n}")
    assert n_cites > 50, n_cites  # the scan really saw the code's citations
    assert not bad, "citations of sections that do not exist:\n" + "\n".join(bad)


def test_nothing_points_outside_the_repository():
    """No file refers to the project's shared folder (a clone does not have it)."""
    needles = ("../" + "shared", "/work/" + "shared", "shared/" + WORD)
    bad = []
    for p in repo_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if any(s in line for s in needles):
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


def test_site_builds_strict_with_the_gallery_executed(tmp_path):
    """`mkdocs build --strict` passes (no network needed), the gallery pages hold the current
    output of each script (numbers and figures), and the API page documents every export."""
    pytest.importorskip("mkdocs", reason="the docs tools come with the dev extra")  # CI installs them
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("MFLD_DOCS_GALLERY", None)
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(site)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    gal = site / "gallery"
    # every example ran and printed what it prints today
    own = (gal / "own_data" / "index.html").read_text(encoding="utf-8")
    assert re.search(r"train accuracy 0\.\d+, test accuracy 0\.\d+", own), "own_data output missing"
    cert = (gal / "certify" / "index.html").read_text(encoding="utf-8")
    assert re.search(r"measured rate [0-9.]+ \(95% CI", cert), "certify output missing"
    quick = (gal / "quickstart" / "index.html").read_text(encoding="utf-8")
    assert (gal / "quickstart" / "runs" / "quickstart" / "figures" / "function.png").stat().st_size > 1000
    assert "runs/quickstart/figures/function.png" in quick
    exp = (gal / "experiment_linear_convergence" / "index.html").read_text(encoding="utf-8")
    assert "What the theory predicts" in exp  # the experiment's report.md, embedded
    assert (gal / "experiment_linear_convergence" / "experiments" / "linear-convergence" / "rates.png").exists()
    # the API page: one documented entry per public name of mfld
    sys.path.insert(0, str(ROOT / "docs" / "_hooks"))
    try:
        from gallery import exported_names
    finally:
        sys.path.pop(0)
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    import mfld

    assert set(exported_names(ROOT)) == set(mfld.__all__) - {"__version__"}
    missing = [n for n, m in exported_names(ROOT).items() if f'id="{m}.{n}"' not in api]
    assert not missing, missing
    # the theory page is there, with its eight sections
    theory = (site / "theory" / "index.html").read_text(encoding="utf-8")
    assert all(f"{k}. " in theory for k in range(1, 9))
