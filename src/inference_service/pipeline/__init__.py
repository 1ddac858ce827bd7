"""The service loop behind its ports: records in, ordered outcomes out, commit cycles, rewinds.

Imports the domain, the ports, processing and ordering; never an adapter.
"""

from __future__ import annotations

from inference_service.pipeline.loop import Pipeline, PipelineConfig, rewind_positions

__all__ = ["Pipeline", "PipelineConfig", "rewind_positions"]
