"""Lightning callbacks for subspace runs."""

from callbacks.subspace_monitor import SubspaceMonitor

__all__ = ["SubspaceMonitor"]
