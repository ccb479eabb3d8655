"""The benchmark scripts still name what the package has.

benchmarks/ is not imported by the suite, so a refactor that moves a function can leave a script
patching or timing a name its module no longer looks up: `gpu_model_parts.py` timed
`adtrain.memory.bank.certified_nearest` after the search moved to `adtrain.memory.bank_search`
(a crash on the GPU machine, found by a CPU rehearsal), and `bank_search_run.py` counted its
re-searches on the old module (silently zero: `bank.rerank` is still there, re-exported, but no
function of that module calls it). Checked statically: every `from adtrain... import name`
resolves; every attribute read on an `import adtrain... as alias` exists there; and every name a
script replaces on such a module (`alias.name = ...`, `setattr(alias, "name", ...)`, or a
`(label, alias, "name")` timer target) is looked up by adtrain: as a global by a function of that
module, or as an attribute by one of a module that imports it. The tests and notebooks too.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
OTHERS = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "notebooks").glob("*.py"))


def _names_read(module: types.ModuleType) -> list[set[str]]:
    """Per function or method defined in ``module``'s file (nested code included): the names its
    code reads (``co_names``: globals, attributes, and the modules and names of its imports)."""
    def functions(obj):  # decorated (torch.no_grad, lru_cache), static, class methods, properties
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            return [f for o in (obj.fget, obj.fset) if o is not None for f in functions(o)]
        obj = inspect.unwrap(obj) if callable(obj) else obj
        return [obj] if inspect.isfunction(obj) and obj.__module__ == module.__name__ else []

    found = []
    for obj in vars(module).values():
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            found += [f for member in vars(obj).values() for f in functions(member)]
        else:
            found += functions(obj)
    out = []
    for f in found:
        names, codes = set(), [f.__code__]
        while codes:
            code = codes.pop()
            names.update(code.co_names)
            codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        out.append(names)
    return out


@functools.lru_cache(maxsize=None)
def _import_all() -> None:
    """Every adtrain module imported (the same answer in any test process, whatever ran before);
    one that needs an absent optional dependency is left out."""
    import adtrain

    for info in pkgutil.walk_packages(adtrain.__path__, "adtrain."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:
            pass


def _looked_up(module: types.ModuleType, attr: str) -> bool:
    """Does replacing ``module.attr`` change what adtrain runs? Yes where a function reads it as a
    global of ``module``, as an attribute of ``module`` held by its own module, or imports it from
    ``module`` when it runs (``from module import attr`` inside the function)."""
    _import_all()
    for name, m in list(sys.modules.items()):
        if not name.startswith("adtrain") or m is None:
            continue
        holds = m is module or any(v is module for v in vars(m).values())
        for names in _names_read(m):
            if attr in names and (holds or module.__name__ in names):
                return True
    return False


def _is_setattr(func: ast.AST) -> bool:
    """``setattr(...)`` or ``monkeypatch.setattr(...)`` (a getattr only reads)."""
    return (isinstance(func, ast.Name) and func.id == "setattr") or (
        isinstance(func, ast.Attribute) and func.attr == "setattr")


def _patched(tree: ast.AST, aliases: dict[str, str]):
    """(line, module name, attribute) of each replacement of an aliased module's attribute."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id in aliases:
                        yield node.lineno, aliases[el.value.id], el.attr
        elif isinstance(node, ast.Tuple) or (isinstance(node, ast.Call) and _is_setattr(node.func)):
            items = node.elts if isinstance(node, ast.Tuple) else node.args
            for i, el in enumerate(items[:-1]):
                nxt = items[i + 1]
                if (isinstance(el, ast.Name) and el.id in aliases and isinstance(nxt, ast.Constant)
                        and isinstance(nxt.value, str)):
                    yield node.lineno, aliases[el.id], nxt.value


def _missing_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    missing, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adtrain"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:  # a submodule imported by name
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"line {node.lineno}: {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.name.startswith("adtrain") and a.asname})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if not hasattr(importlib.import_module(aliases[node.value.id]), node.attr):
                missing.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
    for line, name, attr in _patched(tree, aliases):
        module = importlib.import_module(name)
        if hasattr(module, attr) and not _looked_up(module, attr):
            missing.append(f"line {line}: {name}.{attr} replaced, but nothing in adtrain looks it up there")
        elif not hasattr(module, attr):
            missing.append(f"line {line}: {name}.{attr}")
    return sorted(set(missing))


def test_every_benchmark_script_names_what_the_package_has():
    assert len(SCRIPTS) > 20
    found = {p.name: _missing_names(p) for p in SCRIPTS}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_tests_replace_only_what_adtrain_looks_up():
    """A monkeypatch of a name nothing calls leaves its test checking nothing."""
    found = {p.name: _missing_names(p) for p in OTHERS}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_sees_a_name_that_moved(tmp_path):
    script = tmp_path / "moved.py"
    script.write_text("import adtrain.memory.bank as bank_mod\n\n"
                      "def main():\n    return bank_mod.certified_nearest, bank_mod.MemoryBank\n")
    assert _missing_names(script) == ["line 4: adtrain.memory.bank.certified_nearest"]
    # replaced where nothing looks it up (re-exported by bank, called from bank_search)
    script.write_text("import adtrain.memory.bank as bank_mod\nimport adtrain.memory.bank_search as bs\n\n"
                      "def main(wrap):\n    bank_mod.rerank = wrap\n    bs.rerank = wrap\n"
                      "    setattr(bank_mod, 'rerank', getattr(bank_mod, 'LOWP_PAD'))\n"
                      "    return [('timed', bank_mod, 'rerank'), ('timed', bs, 'certified_nearest')]\n")
    assert _missing_names(script) == [
        "line 5: adtrain.memory.bank.rerank replaced, but nothing in adtrain looks it up there",
        "line 7: adtrain.memory.bank.rerank replaced, but nothing in adtrain looks it up there",
        "line 8: adtrain.memory.bank.rerank replaced, but nothing in adtrain looks it up there"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_gpu_suite_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")], check=True)
