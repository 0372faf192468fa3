"""Geometry of refusal: per-layer statistics of harmful vs harmless residuals, before/after an edit, and plots.

The figures (`subspace.analysis.report`, `subspace.analysis.plots`) are not imported here, so code that only
measures (or merely imports the callbacks package) does not pay for importing matplotlib.
"""

from subspace.analysis.collect import ClassResiduals, class_residuals, prompt_residuals
from subspace.analysis.edit_layers import LayerBases, check_edit_fits, layer_bases
from subspace.analysis.geometry import Geometry, ProbeSettings, layer_table, measure
from subspace.analysis.routing import format_routing_table, routing_stats
from subspace.analysis.statistics import captured_share, principal_components, probe_accuracy, span
from subspace.analysis.training_log import Curves, read_training_curves

__all__ = ["ClassResiduals", "Curves", "Geometry", "LayerBases", "ProbeSettings", "captured_share",
           "check_edit_fits", "class_residuals", "format_routing_table", "layer_bases", "layer_table", "measure",
           "principal_components", "probe_accuracy", "prompt_residuals", "read_training_curves", "routing_stats",
           "span"]
