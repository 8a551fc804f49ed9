"""The architecture, checked: layers, private names, import cycles, function size, vocabulary.

The imports are read from the source (``ast``), function-level imports included and
``if TYPE_CHECKING:`` blocks excluded, so a lazy import cannot hide a dependency. The layers
(docs/architecture.md): the core (``mfld/*.py``) never imports the app layer (``mfld.app``),
the CLI or the experiments; ``mfld.sklearn`` and ``mfld.cli`` are adapters on top.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mfld"
ADAPTERS = {"mfld.cli", "mfld.sklearn", "mfld.__main__"}
UPPER = ("mfld.app", "mfld.cli", "mfld.experiments")
MAX_LINES = 60
RUNNER_MAX_PARAMS = 5
#: The public entry point ``mfld.run`` keeps its keyword-only arguments (the config's inputs:
#: overrides, arrays, out, resume, ...): a notebook's call reads like the CLI. Its body builds a
#: RunOptions and hands over to the _Run object, whose steps obey the limit.
PUBLIC_ENTRY_POINTS = {"run"}


def _modname(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path = PKG) -> dict[str, Path]:
    return {_modname(p): p for p in sorted(root.rglob("*.py"))}


@functools.cache
def _tree(path: Path) -> ast.Module:
    """The parsed source of ``path`` (each file is read by several checks; parsed once)."""
    return ast.parse(path.read_text())


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, modname: str):
    """(imported module, imported name or None, line) for every import outside TYPE_CHECKING."""
    tree = _tree(path)
    pkg = modname if path.name == "__init__.py" else modname.rpartition(".")[0]
    out = []

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, None, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out.extend((base, a.name, node.lineno) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _targets(mod: str, name: str | None, modules) -> list[str]:
    """The mfld modules an import statement depends on."""
    if not mod.startswith("mfld"):
        return []
    if name is not None and f"{mod}.{name}" in modules:
        return [f"{mod}.{name}"]
    return [mod] if mod in modules else []


def import_graph(modules) -> dict[str, set[str]]:
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for mod, name, _ in _imports(path, m):
            for t in _targets(mod, name, modules):
                # importing a submodule runs its package's __init__ (lazy here): not a dependency
                if t != m:
                    graph[m].add(t)
    return graph


def find_cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def layer_violations(modules) -> list[str]:
    bad = []
    for m, path in modules.items():
        if path.parent.name != "mfld" or path.name == "__init__.py" or m in ADAPTERS:
            continue  # the core: the modules mfld/<name>.py
        for mod, name, line in _imports(path, m):
            for t in _targets(mod, name, modules) or ([mod] if mod.startswith("mfld.") else []):
                if t.startswith(UPPER):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {t}")
    return bad


def private_violations(modules) -> list[str]:
    """Private names taken from another module: ``from x import _y`` and ``alias._y`` on an
    imported mfld module. A package-private module (``_common``) used inside its own package
    is allowed."""
    bad = []
    for m, path in modules.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        aliases = {}
        for mod, name, line in _imports(path, m):
            if not mod.startswith("mfld"):
                continue
            if name and name.startswith("_") and not name.startswith("__"):
                own_package_module = f"{mod}.{name}" in modules and mod == pkg
                if not own_package_module:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}.{name}")
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mfld"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("mfld") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return bad


def long_functions(modules, max_lines: int = MAX_LINES) -> list[str]:
    bad = []
    for m, path in modules.items():
        if m.startswith("mfld.experiments"):
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > max_lines:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {n} lines")
    return bad


def wide_functions(path: Path, max_params: int = RUNNER_MAX_PARAMS, exempt=()) -> list[str]:
    bad = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in exempt:
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            names = [a for a in names if a not in ("self", "cls")]
            n = len(names) + (args.vararg is not None) + (args.kwarg is not None)
            if n > max_params:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} takes {n} parameters")
    return bad


MODULES = _modules()


def test_core_does_not_import_the_app_cli_or_experiments():
    assert layer_violations(MODULES) == []


def test_no_private_names_across_modules():
    assert private_violations(MODULES) == []


def test_no_import_cycles():
    assert find_cycles(import_graph(MODULES)) == []


def test_functions_are_at_most_60_lines_outside_experiments():
    assert long_functions(MODULES) == []


def test_runner_functions_take_at_most_5_parameters():
    assert wide_functions(PKG / "app" / "runner.py", exempt=PUBLIC_ENTRY_POINTS) == []


# ---- the checks themselves catch what they claim to (synthetic packages) ----


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A synthetic package ``mfld`` under tmp_path with the given files; its module map."""
    def make(files):
        base = {"__init__.py": "", "app/__init__.py": "", "experiments/__init__.py": ""}
        for rel, text in {**base, **files}.items():
            p = tmp_path / "mfld" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
        return _modules(tmp_path / "mfld")
    return make


def test_checks_catch_a_lazy_app_import_a_private_name_and_a_cycle(fake):
    mods = fake({
        "core.py": "def f():\n    from mfld.app import rundir\n    return rundir\n",
        "other.py": "from mfld.core import _helper\nimport mfld.core as c\nx = c._hidden\n",
        "a.py": "def g():\n    from mfld import b\n",
        "b.py": "from mfld.a import g\n",
        "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mfld.app import x\n",
        "experiments/_common.py": "",
        "experiments/one.py": "from mfld.experiments import _common\n",
        "app/rundir.py": "",
    })
    assert len(layer_violations(mods)) == 1 and "core.py" in layer_violations(mods)[0]
    priv = private_violations(mods)
    assert len(priv) == 2 and all("other.py" in v for v in priv)  # _common inside its package is fine
    assert find_cycles(import_graph(mods)) == [["mfld.a", "mfld.b"]]


def test_size_checks_count_lines_and_parameters(fake, tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    mods = fake({"long.py": f"def ok():\n{body}\n\n\ndef too_long():\n{body}\n    return 1\n",
                 "wide.py": "class R:\n    def m(self, a, b, c, d, e):\n        pass\n\n"
                            "    def n(self, a, b, c, d, e, *, f=1):\n        pass\n"})
    assert [v.split()[-3] for v in long_functions(mods)] == ["has"] and "too_long" in long_functions(mods)[0]
    wide = wide_functions(tmp_path / "mfld" / "wide.py")
    assert len(wide) == 1 and " n takes 6" in wide[0]


# ---- one vocabulary ----


def test_the_vocabulary_matches_every_registry():
    from mfld import activations, activations_numpy, choices, config, data, dynamics, gibbs, losses, problem

    assert tuple(activations.ACTIVATIONS) == choices.ACTIVATIONS
    assert tuple(activations_numpy.NUMPY_FORMS) == choices.ACTIVATIONS
    assert tuple(losses.LOSSES) == choices.LOSSES
    assert tuple(data.GENERATORS) == choices.DATA_KINDS
    assert dynamics.SCHEMES == choices.SCHEMES and dynamics.TAU_SCHEDULES == choices.TAU_SCHEDULES
    assert problem.OUTPUTS == choices.OUTPUTS and problem.SCALINGS == choices.SCALINGS
    assert gibbs.METHODS == choices.CERTIFY_METHODS and gibbs.PROPOSALS == choices.PROPOSALS
    # the config accepts exactly these names
    for path, names in [("model.activation", choices.ACTIVATIONS), ("model.output", choices.OUTPUTS),
                        ("model.scaling", choices.SCALINGS), ("objective.loss", choices.LOSSES),
                        ("dynamics.scheme", choices.SCHEMES), ("dynamics.tau_schedule", choices.TAU_SCHEDULES),
                        ("record.certify_method", choices.CERTIFY_METHODS), ("precision", choices.PRECISIONS),
                        ("data.kind", choices.DATA_KINDS)]:
        section, _, field = path.rpartition(".")
        model = config.Config
        for part in filter(None, section.split(".")):
            model = model.model_fields[part].annotation
        assert model.model_fields[field].annotation.__args__ == names, path


def test_the_type_checking_imports_of_the_package_match_its_lazy_exports():
    import mfld

    tree = _tree(PKG / "__init__.py")
    block = next(n for n in tree.body if isinstance(n, ast.If) and _is_type_checking(n))
    seen = {a.name: n.module for n in block.body for a in n.names}
    assert seen == mfld._EXPORTS
    assert mfld.__all__ == sorted(mfld._EXPORTS) + ["__version__"]
