"""The seams between llorch's modules, read from the source: no import cycle, no use of another's privates.

Every import counts, those inside functions too (a lazy import only hides a cycle), except those under
`if TYPE_CHECKING:`, which never run. A private name is one a module defines with a leading underscore
(a function, class, module-level name or attribute); no other module may import it or read it from an
object (`model._run`). llorch's private modules (`_kernels`) are the package's own seams and may be imported.
"""

from __future__ import annotations

import ast
import os
import sys

import llorch

SOURCE = os.path.dirname(llorch.__file__)


def find_modules(root: str) -> dict[str, str]:
    """Every module of the package at root, subpackages included, by dotted name: {"llorch.model": path}."""
    found = {}
    for directory, _, files in os.walk(root):
        relative = os.path.relpath(directory, root)
        package = ".".join(["llorch"] + ([] if relative == "." else relative.split(os.sep)))
        for name in files:
            if name.endswith(".py"):
                found[package if name == "__init__.py" else f"{package}.{name[:-3]}"] = os.path.join(directory, name)
    return found


MODULES = find_modules(SOURCE)
EXTENSIONS = {"llorch._kernels"}   # compiled modules: imported, never parsed


def parse(module: str) -> ast.Module:
    with open(MODULES[module], encoding="utf-8") as f:
        return ast.parse(f.read(), MODULES[module])


def is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def nodes(tree: ast.AST):
    """Every node that runs, i.e. all but those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(tree):
        if is_type_checking(child):
            for node in child.orelse:
                yield node
                yield from nodes(node)
            continue
        yield child
        yield from nodes(child)


def imports(module: str) -> list[tuple[str, list[str]]]:
    """(llorch module imported, names taken from it) for each import statement of module."""
    package = module.split(".") if MODULES[module].endswith("__init__.py") else module.split(".")[:-1]
    found = []
    for node in nodes(parse(module)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "llorch"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if source.split(".")[0] != "llorch":
                continue
            # `from . import model, __version__`: a submodule is an import of its own
            submodules = [name for name in (alias.name for alias in node.names)
                          if f"{source}.{name}" in MODULES or f"{source}.{name}" in EXTENSIONS]
            found += [(f"{source}.{name}", []) for name in submodules]
            names = [alias.name for alias in node.names if alias.name not in submodules]
            if names:
                found.append((source, names))
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names(module: str) -> set[str]:
    """The private names module defines: functions, classes, module-level names, attributes it assigns."""
    defined = set()
    for node in nodes(parse(module)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
    return {name for name in defined if is_private(name)}


def test_no_import_cycle_inside_llorch():
    graph = {module: sorted({imported for imported, _ in imports(module) if imported in MODULES})
             for module in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in graph[module]:
            assert state.get(imported) != "open", "import cycle: " + " -> ".join(path + [imported])
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_no_module_uses_another_modules_private_names():
    privates = {module: private_names(module) for module in MODULES}
    problems = []
    for module in sorted(MODULES):
        others = set().union(*(names for other, names in privates.items() if other != module)) - privates[module]
        for imported, names in imports(module):
            problems += [f"{module}: from {imported} import {name}" for name in names if is_private(name)]
        for node in nodes(parse(module)):
            if (isinstance(node, ast.Attribute) and node.attr in others
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                problems.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not problems, "\n".join(problems)


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """A lazy import that closes a cycle and a private call through an object, in two planted modules."""
    (tmp_path / "a.py").write_text("from .b import helper\n\n\ndef _secret():\n    pass\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n\n\n"
                                   "def helper(x):\n    from .a import _secret\n    return x._secret()\n")
    (tmp_path / "c.py").write_text("")
    planted = {"llorch.a": str(tmp_path / "a.py"), "llorch.b": str(tmp_path / "b.py"),
               "llorch.c": str(tmp_path / "c.py")}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", planted)
    assert imports("llorch.b") == [("llorch.a", ["_secret"])]   # the TYPE_CHECKING import is not one
    for check, said in ((test_no_import_cycle_inside_llorch, "llorch.a -> llorch.b -> llorch.a"),
                        (test_no_module_uses_another_modules_private_names, "llorch.b:8: x._secret")):
        try:
            check()
        except AssertionError as e:
            assert said in str(e)
        else:
            raise AssertionError(f"{check.__name__} found nothing")
