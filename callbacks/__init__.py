"""Lightning callbacks for subspace runs."""

from callbacks.geometry_plots import GeometryPlots
from callbacks.subspace_monitor import SubspaceMonitor

__all__ = ["GeometryPlots", "SubspaceMonitor"]
