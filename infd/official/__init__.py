"""The paper's released models (github yinboc/infd) converted into infd pipelines."""

from infd.official.checkpoint import ReferenceCheckpoint, read_reference_checkpoint, reference_checkpoint
from infd.official.convert import build_models, convert_official

__all__ = ["ReferenceCheckpoint", "read_reference_checkpoint", "reference_checkpoint", "build_models", "convert_official"]
