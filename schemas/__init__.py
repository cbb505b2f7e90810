"""The llmcycle spec language: Pydantic models of the YAML, loading with line/column errors, JSON Schema.

Imports only the standard library, pydantic and PyYAML, so validating a spec stays fast.
"""

from .errors import Problem, SpecError
from .pipeline import KINDS, LoadedSpec, PipelineSpec, dependencies, json_schema, load, step_order

__all__ = ["KINDS", "LoadedSpec", "PipelineSpec", "Problem", "SpecError", "dependencies", "json_schema", "load",
           "step_order"]
