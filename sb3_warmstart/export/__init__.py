"""Take a trained router out of the simulator: an ONNX graph of the acting policy, its
schema, and the recipe for loading the run's models with stock Stable-Baselines3.

``train/export.py RUN --out DIR`` is the command line; ``docs/export.md`` describes the folder.

- :mod:`~sb3_warmstart.export.graph`: the greedy actor as an ``nn.Module``
  (:func:`policy_graph`), its ONNX file (:func:`write_onnx`) and the ONNX-vs-torch check;
- :mod:`~sb3_warmstart.export.samples`: observations of the training environment to check on;
- :mod:`~sb3_warmstart.export.schema`: ``schema.json`` and the reference-hardware table;
- :mod:`~sb3_warmstart.export.sb3_bundle`: ``sb3/`` (loading recipe, normaliser as JSON);
- :mod:`~sb3_warmstart.export.router_export`: :func:`export_router` and :func:`export_policy`;
- :mod:`~sb3_warmstart.export.errors`: :class:`ExportError`.
"""

from sb3_warmstart.export.errors import ExportError
from sb3_warmstart.export.graph import (
    FlatPolicyGraph,
    GraphSpec,
    RecurrentFlatPolicyGraph,
    RecurrentSetPolicyGraph,
    SetPolicyGraph,
    compare_with_onnx,
    policy_graph,
    write_onnx,
)
from sb3_warmstart.export.router_export import (
    ExportResult,
    export_policy,
    export_router,
    require_deploy_extra,
)
from sb3_warmstart.export.samples import graph_inputs, sample_observations
from sb3_warmstart.export.schema import build_schema, reference_hardware

__all__ = ["ExportError", "ExportResult", "FlatPolicyGraph", "GraphSpec",
           "RecurrentFlatPolicyGraph", "RecurrentSetPolicyGraph", "SetPolicyGraph",
           "build_schema", "compare_with_onnx", "export_policy", "export_router", "graph_inputs",
           "policy_graph", "reference_hardware", "require_deploy_extra", "sample_observations",
           "write_onnx"]
