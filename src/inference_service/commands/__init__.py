"""Subcommands of the ``inference-service`` command line (see ``inference_service.cli``).

Beside the subcommands live the helpers that only they use: ``collecting`` (a video's results and
their completeness), ``report`` (the HTML page of a collected video) and ``progress`` (progress of
long commands). The service itself imports none of them.
"""
