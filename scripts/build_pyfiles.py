"""Build the project's packages into one zip for ``spark-submit --py-files``.

The packages are the ones ``pyproject.toml`` ships (``[tool.setuptools.packages.find] include``),
so the zip holds exactly what ``pip install`` would, built offline in well under a second. Entries
get a fixed timestamp, so the same sources give the same bytes; the zip is written aside and
renamed into place, so a job that is being submitted never reads half a file.

    python scripts/build_pyfiles.py            # -> dist/sae.zip
    python scripts/build_pyfiles.py -o /tmp/sae.zip
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def packages(root: Path = ROOT) -> list[str]:
    """Top-level packages named by pyproject's ``packages.find.include`` patterns."""
    with open(root / "pyproject.toml", "rb") as fh:
        find = tomllib.load(fh)["tool"]["setuptools"]["packages"]["find"]
    patterns = find.get("include", ["*"])
    found = [
        p.name
        for p in sorted(root.iterdir())
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    ]
    if not found:
        raise SystemExit(f"no packages matching {patterns} under {root}")
    return found


def build(out: Path, root: Path = ROOT) -> Path:
    """Write every ``.py`` file of the project's packages into ``out``; returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for pkg in packages(root):
                for path in sorted((root / pkg).rglob("*.py")):
                    if "__pycache__" in path.parts:
                        continue
                    info = zipfile.ZipInfo(path.relative_to(root).as_posix(), FIXED_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, path.read_bytes())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Zip the project's packages for spark-submit --py-files.")
    parser.add_argument("-o", "--output", default=str(ROOT / "dist" / "sae.zip"))
    args = parser.parse_args(argv)
    sys.stdout.write(f"{build(Path(args.output).absolute())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
