"""Subcommands of the ``inference-service`` command line (see ``inference_service.cli``)."""
