"""The package's import rule, checked on the source: imports only flow down the layers.

    errors                       UserError, Diverged and the exit statuses (no project imports)
    config                       typed YAML -> dataclasses
    runtime | loss | data        independent of each other
    model                        model.architectures: one module per family (config mapping, weight
                                 table as plain data, own transforms, model types); nothing else
                                 of the project at run time
    checkpoint
    conversion                   consumes the families' weight tables: expansion, generic transforms, streaming
    evaluation
    training
    recipe                       composes every section's config
    preflight | plan             checks the files and folders a recipe names | its memory and time plan
    run                          initialise -> build -> train -> teardown
    cli                          the commands (psft-train, psft-evaluate, ...) and the shell they run in
    train                        ``python -m psft_megatron.train`` (psft-train for ``torchrun -m``)
    testing                      helpers for tests and benchmarks (nothing imports it)

A module may import its own package and any lower layer, never a sibling of its layer
or a higher one. Project imports sit at the top of a module (a function-level import
would hide an edge from a reader); the exceptions are a ``TYPE_CHECKING`` import inside
the same package, which never runs, the commands in ``cli``, which import the library
inside functions so that ``--help`` and their torch-free input checks answer before
megatron-core is imported, and the few modules that import an optional extra at their top
(``OPTIONAL_EXTRA``: lm-eval), which a module every training process imports loads only when
it is used (this test still checks all those imports' direction).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "psft_megatron"

LAYERS = {
    "errors": 0,
    "config": 1,
    "runtime": 2, "loss": 2, "data": 2,
    "model": 3,
    "checkpoint": 4,
    "conversion": 5,
    "evaluation": 6,
    "training": 7,
    "recipe": 8,
    "preflight": 9, "plan": 9,
    "run": 10,
    "cli": 11,
    "train": 12,
    "testing": 13,
}

# Components whose modules may import the library inside functions (see the module docstring).
LAZY_IMPORTS = {"cli"}

# Modules that import an optional extra (lm-eval, the ``eval`` extra) at their top: any module may
# import them inside a function, so a process that does not use them never loads the extra.
OPTIONAL_EXTRA = {"psft_megatron.evaluation.harness", "psft_megatron.evaluation.lm_eval_model"}

# psft_megatron/__init__.py runs before everything else; it only installs the megatron import hook.
ROOT_MAY_IMPORT = {"psft_megatron.runtime.megatron_import"}


def _component(module: str) -> str:
    """``psft_megatron.model.build`` -> ``model``; ``psft_megatron.recipe`` -> ``recipe``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool, bool]]:
    """(imported module, line, at module top, under TYPE_CHECKING) for every project import."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: list[tuple[str, int, bool, bool]] = []

    def visit(node: ast.AST, top: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, top, True)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this module's package
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("psft_megatron"):
                    found.append((target, child.lineno, top, typing_only))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("psft_megatron"):
                        found.append((alias.name, child.lineno, top, typing_only))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            visit(child, inner, typing_only)

    visit(tree, True, False)
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_component_has_a_layer():
    components = {_component(_module_name(p)) for p in _sources()} - {""}
    assert components <= set(LAYERS), f"add {sorted(components - set(LAYERS))} to LAYERS (and the README's Layout)"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_down(path):
    me = _component(_module_name(path))
    problems = []
    for target, line, top, typing_only in _imports(path):
        other = _component(target)
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        if typing_only:
            if other != me:
                problems.append(f"{where}: a TYPE_CHECKING import may only name its own package")
            continue
        if not top and me not in LAZY_IMPORTS and target not in OPTIONAL_EXTRA:
            problems.append(f"{where} inside a function or class: move it to the top of the module")
        if me == "":  # the package root: importing it must stay cheap and pull in no layer
            if target not in ROOT_MAY_IMPORT:
                problems.append(f"{where}: the package root imports only {sorted(ROOT_MAY_IMPORT)}")
            continue
        if other and other != me and LAYERS[other] >= LAYERS[me]:
            problems.append(f"{where}: {other} (layer {LAYERS[other]}) is not below {me} (layer {LAYERS[me]})")
    assert not problems, "\n".join(problems)


ARCHITECTURES = PACKAGE / "model" / "architectures"


@pytest.mark.parametrize("path", sorted(ARCHITECTURES.glob("*.py")), ids=lambda p: p.name)
def test_family_modules_are_plain_data(path):
    """A family module is data and small functions: at run time it imports only its own package, so
    ``model.config`` can import the registry, and the converters (above) consume the tables."""
    outside = [f"{path.name}:{line} imports {target}" for target, line, _, typing_only in _imports(path)
               if not typing_only and not target.startswith("psft_megatron.model.architectures")]
    assert not outside, "\n".join(outside)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a planted upward import and a function-level import are reported."""
    pkg = tmp_path / "psft_megatron"
    (pkg / "loss").mkdir(parents=True)
    bad = pkg / "loss" / "bad.py"
    bad.write_text("from psft_megatron.training.step import evaluate\n\ndef f():\n    from psft_megatron.loss import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    found = _imports(bad)
    assert ("psft_megatron.training.step", 1, True, False) in found
    assert ("psft_megatron.loss", 4, False, False) in found
    with pytest.raises(AssertionError, match="training \\(layer 7\\) is not below loss"):
        test_imports_flow_down(bad)


def test_a_command_may_import_lazily_but_only_downwards(tmp_path, monkeypatch):
    """cli's function-level imports pass when they go down, and are reported when they go up."""
    pkg = tmp_path / "psft_megatron"
    (pkg / "cli").mkdir(parents=True)
    ok = pkg / "cli" / "ok.py"
    ok.write_text("def main():\n    from psft_megatron.run import run\n")
    bad = pkg / "cli" / "bad.py"
    bad.write_text("def main():\n    from psft_megatron.testing.multiproc import run_in_processes\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    test_imports_flow_down(ok)
    with pytest.raises(AssertionError, match="testing \\(layer 13\\) is not below cli"):
        test_imports_flow_down(bad)
