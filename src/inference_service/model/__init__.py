"""The model setting resolved into runnable, checked files (converting a ``.pt`` once, cached)."""

from inference_service.model.metadata import ModelMetadata
from inference_service.model.resolve import ResolvedModel, resolve_model

__all__ = ["ModelMetadata", "ResolvedModel", "resolve_model"]
