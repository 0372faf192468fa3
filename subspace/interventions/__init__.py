"""Edits of the residual stream: projection maths, hooks, the saved edit artefact."""

from subspace.interventions.edit import ProjectionEdit
from subspace.interventions.projection import ProjectionHooks, orthonormalize, project_out

__all__ = ["ProjectionEdit", "ProjectionHooks", "orthonormalize", "project_out"]
