"""Every public class, function and method of the library has a docstring and type hints."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "adios_pl"


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _gaps(node: ast.AST, path: str, prefix: str = "", in_class: bool = False) -> list[str]:
    """What public definitions under ``node`` lack: a docstring (dunders excepted) or annotations."""
    gaps: list[str] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef) and _public(child.name):
            if ast.get_docstring(child) is None:
                gaps.append(f"{path}:{child.lineno} class {prefix}{child.name} has no docstring")
            gaps += _gaps(child, path, f"{prefix}{child.name}.", in_class=True)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(child.name):
            where = f"{path}:{child.lineno} {prefix}{child.name}"
            args = [*child.args.posonlyargs, *child.args.args, *child.args.kwonlyargs]
            if in_class and args and args[0].arg in ("self", "cls", "ctx"):
                args = args[1:]
            args += [a for a in (child.args.vararg, child.args.kwarg) if a is not None]
            unannotated = [a.arg for a in args if a.annotation is None]
            if unannotated:
                gaps.append(f"{where}: arguments without a type hint {unannotated}")
            if child.returns is None and child.name != "__init__":
                gaps.append(f"{where}: no return type")
            if not child.name.startswith("__") and ast.get_docstring(child) is None:
                gaps.append(f"{where}: no docstring")
    return gaps


def test_every_public_definition_has_a_docstring_and_type_hints() -> None:
    gaps = [gap for path in sorted(SRC.rglob("*.py")) for gap in _gaps(ast.parse(path.read_text()), str(path.relative_to(SRC)))]
    assert not gaps, "\n".join(gaps)


def test_the_check_finds_what_it_looks_for() -> None:
    code = ast.parse(
        "class A:\n    def f(self, x): pass\n    def _g(self, y): pass\n"
        "def h(z: int) -> int:\n    '''Doc.'''\n    return z\n"
        "class _Private:\n    def f(self, x): pass\n"
    )
    assert _gaps(code, "m.py") == [
        "m.py:1 class A has no docstring",
        "m.py:2 A.f: arguments without a type hint ['x']",
        "m.py:2 A.f: no return type",
        "m.py:2 A.f: no docstring",
    ]
