"""The ``inference-service`` command line: one subcommand per entry of :data:`COMMANDS`.

Each subcommand is a module under ``commands``; the other modules there are helpers that only the
commands use (``collecting``, ``report``, ``progress``).

Subcommand modules are imported only when chosen, so ``--help`` stays fast and a missing optional
dependency fails with a message naming the extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from inference_service.errors import ConfigError

# name -> (module, one-line help). Each module has ``configure(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("inference_service.commands.serve", "run the service (Kafka in, Kafka out, HTTP)"),
    "detect": ("inference_service.commands.detect", "detect on local images, folders or videos"),
    "settings": ("inference_service.commands.settings_cmd", "print every setting and default"),
    "submit": ("inference_service.commands.submit", "split a video or folder into frame tasks"),
    "collect": ("inference_service.commands.collect", "gather and check one video's results"),
    "replay-dlq": ("inference_service.commands.replay_dlq", "copy dead letters back to a topic"),
    "export": ("inference_service.commands.export_cmd", "convert a model to a model directory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-service",
        description="YOLOv8 detections for a Kafka stream of video-frame tasks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args._module.run(args)
    except ConfigError as exc:
        print(f"inference-service: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``inference-service settings | head``): quiet exit, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
