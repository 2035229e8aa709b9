"""Every public function, method and class in ``pipelines/`` and ``sae_model/`` has a docstring.

The check reads the sources with ``ast`` and imports nothing, so it runs without
Spark or torch. Public means the name does not start with ``_``; methods count
when their class is public; properties and functions nested in functions are
not public API and are skipped.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "sae_model")


def _is_property(node):
    for dec in node.decorator_list:
        if isinstance(dec, ast.Name) and dec.id in ("property", "cached_property"):
            return True
        if isinstance(dec, ast.Attribute) and dec.attr in ("setter", "getter", "deleter", "cached_property"):
            return True
    return False


def _missing_in_body(body, prefix, out):
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name.startswith("_") or _is_property(node):
                continue
            if ast.get_docstring(node) is None:
                out.append(f"{prefix}{node.name}")
        elif isinstance(node, ast.ClassDef):
            if node.name.startswith("_"):
                continue
            if ast.get_docstring(node) is None:
                out.append(f"{prefix}{node.name}")
            _missing_in_body(node.body, f"{prefix}{node.name}.", out)


def missing_docstrings():
    """Return ``path:qualname`` for every public definition without a docstring."""
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            names = []
            _missing_in_body(tree.body, "", names)
            rel = path.relative_to(ROOT).as_posix()
            out.extend(f"{rel}:{name}" for name in names)
    return out


def test_public_definitions_have_docstrings():
    missing = missing_docstrings()
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)
