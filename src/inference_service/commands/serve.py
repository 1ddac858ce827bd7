"""``inference-service serve``: run the service."""

from __future__ import annotations

import argparse
import asyncio
import logging

from inference_service.settings import add_cli_flags, load_settings, overrides_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    add_cli_flags(parser)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(overrides_from_args(args))
    logging.getLogger().setLevel(settings.log_level)
    from inference_service.app import serve  # the composition root, imported only when serving

    return asyncio.run(serve(settings))
