"""Model layer: one adapter per MoE family, sparse upcycling, task heads."""

from .base import MoEAdapter, MoELayerLayout, MoELayout, RoutingRecorder
from .build import BuiltModel, ModelLoadError, build_model

__all__ = ["BuiltModel", "MoEAdapter", "MoELayerLayout", "MoELayout", "ModelLoadError", "RoutingRecorder", "build_model"]
