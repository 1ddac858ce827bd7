#!/usr/bin/env python3
"""Check that the locks in requirements/ satisfy what pyproject.toml asks for.

Every requirement of the package (and its extras), of devtools and of the ``*.in`` files must be
pinned in the lock that installs it, at a version its specifier allows. Exit status 1 with one line
per problem otherwise (then run ``make lock``). ``make venv`` runs it; so does the test suite.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQS = ROOT / "requirements"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def pins(lock: Path) -> dict[str, set[Version]]:
    """Pinned versions by canonical name (a universal lock may pin one name under two markers)."""
    out: dict[str, set[Version]] = {}
    for line in lock.read_text().splitlines():
        if match := _PIN.match(line):
            out.setdefault(canonicalize_name(match[1]), set()).add(Version(match[2]))
    return out


def _in_file(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def wanted() -> dict[str, list[str]]:
    """The requirements each lock must satisfy."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    devtools = tomllib.loads((ROOT / "devtools" / "pyproject.toml").read_text())["project"]
    base = list(project["dependencies"]) + _in_file(REQS / "build.in")
    extras = project.get("optional-dependencies", {})
    export = base + list(extras.get("export", []))
    dev = export + list(extras.get("dev", [])) + list(devtools.get("dependencies", []))
    return {
        "service.txt": base,
        "export.txt": export,
        "dev.txt": dev + _in_file(REQS / "stack.in"),
        "uv.txt": _in_file(REQS / "uv.in"),
    }


def problems() -> list[str]:
    """One line per requirement a lock misses or pins outside its specifier."""
    out = []
    for name, requirements in wanted().items():
        lock = REQS / name
        if not lock.is_file():
            out.append(f"{lock.relative_to(ROOT)} is missing")
            continue
        pinned = pins(lock)
        for text in requirements:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate():
                continue
            versions = pinned.get(canonicalize_name(req.name), set())
            if not any(req.specifier.contains(v, prereleases=True) for v in versions):
                found = ", ".join(sorted(map(str, versions))) or "not pinned"
                out.append(f"{lock.relative_to(ROOT)}: {text} ({found})")
    return out


def main() -> int:
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print("the locks are behind pyproject.toml: run `make lock`", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
