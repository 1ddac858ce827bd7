"""``inference-service settings``: print every setting with its default, or the effective values."""

from __future__ import annotations

import argparse
import json

from inference_service.settings import (
    add_cli_flags,
    load_settings,
    overrides_from_args,
    settings_table,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--effective",
        action="store_true",
        help="print the values in effect (environment and flags) as JSON instead of the table",
    )
    add_cli_flags(parser)


def run(args: argparse.Namespace) -> int:
    if args.effective:
        settings = load_settings(overrides_from_args(args))
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
    else:
        print(settings_table())
    return 0
