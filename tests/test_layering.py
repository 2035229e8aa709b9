"""The house's layering, read from the source: jobs are imported by nothing (``jobs.common`` and the
``sae`` dispatcher ``jobs.cli`` aside), and ``sae_model`` never imports pyspark."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "jobs":
                out |= {f"jobs.{a.name}" for a in node.names}
    return out


def test_no_job_imports_another_job():
    offenders = {}
    for path in sorted((ROOT / "jobs").glob("*.py")):
        if path.name in ("cli.py", "__init__.py"):
            continue
        jobs = {m for m in imported_modules(path) if m.startswith("jobs.") and m != "jobs.common"}
        if jobs:
            offenders[path.name] = sorted(jobs)
    assert offenders == {}


def test_library_code_imports_no_job_and_sae_model_no_pyspark():
    for pkg in ("pipelines", "sae_model"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods = imported_modules(path)
            assert not {m for m in mods if m == "jobs" or m.startswith("jobs.")}, path
            if pkg == "sae_model":
                assert not {m for m in mods if m.split(".")[0] == "pyspark"}, path
