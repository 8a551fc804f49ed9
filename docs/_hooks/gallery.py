"""MkDocs hook: the example gallery, executed at build time, and the API reference page.

Gallery: every script of :data:`GALLERY` is run (one Python subprocess runs them all in turn,
each in its own empty working directory, with the Agg backend) when the site is built. Its page
shows the script, what it printed, the report it wrote (``report.md``, for an experiment) and
every figure it wrote (PNG/GIF), so the numbers and figures in the documentation are always the
code's current output. A script that fails fails the build. ``MFLD_DOCS_GALLERY=skip`` (for a fast
``mkdocs serve`` while editing prose) shows the scripts without running them.

API reference: ``api.md`` has one mkdocstrings entry per name exported by ``mfld/__init__.py``
(read from its ``_EXPORTS`` table, so a new export is documented without editing the page), and
the modules whose functions the guides use.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

# (page name, script under examples/)
GALLERY = [
    ("quickstart", "quickstart.py"),
    ("own_data", "own_data.py"),
    ("certify", "certify.py"),
    ("experiment_linear_convergence", "experiment_linear_convergence.py"),
]
FIGURE_SUFFIXES = (".png", ".gif", ".svg")
# modules documented in full after the exports (functions the guides call)
API_MODULES = ["mfld.theory", "mfld.grid", "mfld.experiments", "mfld.observables"]

_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, time, traceback
jobs = json.loads(sys.argv[1])
results = {}
for name, script, workdir in jobs:
    os.chdir(workdir)
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(script, run_name="__main__")
    except BaseException:
        sys.stderr.write(f"gallery script {script} failed:\n" + traceback.format_exc())
        sys.exit(1)
    results[name] = {"stdout": buf.getvalue(), "wall_s": time.perf_counter() - t0}
    import matplotlib.pyplot as plt
    plt.close("all")
sys.stdout.write("\n@@GALLERY@@" + json.dumps(results))
"""


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _title_and_intro(source: str, fallback: str) -> tuple[str, str]:
    doc = ast.get_docstring(ast.parse(source)) or fallback
    first, _, rest = doc.strip().partition("\n")
    return first.strip().rstrip("."), rest.strip()


def _strip_docstring(source: str) -> str:
    tree = ast.parse(source)
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(getattr(tree.body[0], "value", None),
                                                                       ast.Constant):
        lines = source.splitlines()
        return "\n".join(lines[tree.body[0].end_lineno:]).lstrip("\n")
    return source


def _demote(md: str, by: int = 2) -> str:
    out = []
    for line in md.splitlines():
        if line.startswith("#"):
            line = "#" * by + line
        out.append(line)
    return "\n".join(out)


def _run_all(root: Path, workdirs: dict[str, Path]) -> dict:
    jobs = [(name, str(root / "examples" / script), str(workdirs[name])) for name, script in GALLERY]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        [str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0 or "@@GALLERY@@" not in proc.stdout:
        raise PluginError(f"the example gallery failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.rsplit("@@GALLERY@@", 1)[1])


def _gallery_pages(root: Path, config, files) -> None:
    skip = os.environ.get("MFLD_DOCS_GALLERY", "").lower() == "skip"
    tmp = Path(tempfile.mkdtemp(prefix="mfld-gallery-"))
    workdirs = {name: tmp / name for name, _ in GALLERY}
    for d in workdirs.values():
        d.mkdir()
    t0 = time.perf_counter()
    results = {} if skip else _run_all(root, workdirs)
    total = time.perf_counter() - t0
    index = ["# Example gallery", "",
             "Each page below is a script of the repository's `examples/` folder, **executed when this site "
             "was built**: the printed output, the report and the figures are what the code produces now. "
             "Run one yourself with `python examples/NAME.py` (it writes under `runs/` or `experiments/` of "
             "the working directory).", ""]
    if not skip:
        index += [f"The whole gallery ran in {total:.0f} s at build time.", ""]
    for name, script in GALLERY:
        source = (root / "examples" / script).read_text(encoding="utf-8")
        title, intro = _title_and_intro(source, name)
        index.append(f"- [{title}]({name}.md) — `examples/{script}`")
        page = [f"# {title}", ""]
        if intro:
            page += [intro, ""]
        page += [f"Source: `examples/{script}`", "", "```python", _strip_docstring(source).rstrip(), "```", ""]
        if skip:
            page += ["!!! warning", "    Not executed in this build (`MFLD_DOCS_GALLERY=skip`).", ""]
        else:
            res = results[name]
            page += ["## Output", "", f"Printed when the site was built ({res['wall_s']:.1f} s):", "",
                     "```text", res["stdout"].rstrip() or "(nothing printed)", "```", ""]
            for report in sorted(workdirs[name].rglob("report.md")):
                page += ["## The report it wrote", "",
                         f"`{report.relative_to(workdirs[name]).as_posix()}`, as written:", "",
                         _demote(report.read_text(encoding="utf-8")), ""]
            figs = sorted(p for p in workdirs[name].rglob("*") if p.suffix in FIGURE_SUFFIXES)
            if figs:
                page += ["## Figures", ""]
            for fig in figs:
                rel = fig.relative_to(workdirs[name]).as_posix()
                dest = f"gallery/{name}/{rel}"
                files.append(File.generated(config, dest, content=fig.read_bytes()))
                page += [f"**`{rel}`**", "", f"![{rel}]({name}/{rel})", ""]
        files.append(File.generated(config, f"gallery/{name}.md", content="\n".join(page) + "\n"))
    files.append(File.generated(config, "gallery/index.md", content="\n".join(index) + "\n"))


def exported_names(root: Path) -> dict[str, str]:
    """name -> defining module, from the ``_EXPORTS`` table of ``mfld/__init__.py`` (no import)."""
    tree = ast.parse((root / "mfld" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise PluginError("mfld/__init__.py has no _EXPORTS table")


def _api_page(root: Path, config, files) -> None:
    exports = exported_names(root)
    md = ["# API reference", "",
          "Every public name of the package, generated from the docstrings. Each is importable from the "
          "top level (`import mfld; mfld.NAME`); the heading gives the module that defines it.", "",
          "| name | defined in |", "|---|---|"]
    md += [f"| `mfld.{n}` | `{m}` |" for n, m in sorted(exports.items())]
    md += [""]
    for n, m in sorted(exports.items()):
        md += [f"::: {m}.{n}", "    options:", "      show_root_full_path: true", ""]
    md += ["# Modules", "", "Modules whose functions the guides call by their module name.", ""]
    for m in API_MODULES:
        md += [f"::: {m}", "    options:", "      show_root_full_path: true", "      members_order: source",
               "      show_submodules: false", ""]
    files.append(File.generated(config, "api.md", content="\n".join(md) + "\n"))


def on_files(files, config):
    root = _root(config)
    _api_page(root, config, files)
    _gallery_pages(root, config, files)
    return files
