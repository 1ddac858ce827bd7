"""Regenerate the settings table in docs/operations.md from the settings code.

The table sits between two marker comments; everything else in the file is left as it is::

    .venv/bin/python scripts/gen_docs.py           # rewrite the block
    .venv/bin/python scripts/gen_docs.py --check   # exit 1 if the block differs from the code

``tests/unit/test_docs.py`` fails when the block drifts from ``settings.settings_table()``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inference_devtools.settings_doc import DOC, MarkerError, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 on drift")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document (docs/operations.md)")
    args = parser.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    try:
        new = render(text)
    except MarkerError as exc:
        print(f"gen_docs: {args.doc}: {exc}", file=sys.stderr)
        return 2
    if new == text:
        print(f"gen_docs: {args.doc} is up to date")
        return 0
    if args.check:
        print(f"gen_docs: {args.doc} differs from the settings code: run scripts/gen_docs.py",
              file=sys.stderr)  # fmt: skip
        return 1
    args.doc.write_text(new, encoding="utf-8")
    print(f"gen_docs: rewrote the settings table in {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
