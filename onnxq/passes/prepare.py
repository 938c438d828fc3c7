"""Prepare passes: turn any float ONNX model into a clean float graph ready for quantization.

``prepare`` chains them: check domains, upgrade the opset, fold constants, fold BatchNorm, infer
shapes, sort topologically. Each step is also a pass class with a plain function twin, in
``onnxq.passes.opset``, ``onnxq.passes.fold_constants`` and ``onnxq.passes.fold_batchnorm``.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.passes.canonicalize import SpatialMeanToGlobalPoolPass
from onnxq.passes.fold_batchnorm import FoldBatchNormPass, fold_batchnorm
from onnxq.passes.fold_constants import DEFAULT_MAX_SIZE, FoldConstantsPass, fold_constants
from onnxq.passes.half_precision import UpcastHalfPass
from onnxq.passes.infer_shapes import InferShapesPass, infer_shapes
from onnxq.passes.opset import (
    CheckDomainsPass,
    UpgradeOpsetPass,
    check_domains,
    upgrade_opset,
)

__all__ = [
    "CheckDomainsPass",
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "InferShapesPass",
    "PreparePass",
    "RemoveInitializerInputsPass",
    "UpgradeOpsetPass",
    "check_domains",
    "fold_batchnorm",
    "fold_constants",
    "infer_shapes",
    "prepare",
    "upgrade_opset",
]


class RemoveInitializerInputsPass(ir.passes.InPlacePass):
    """Treat initializers that are also main-graph inputs as weights.

    Cases:

    1. An initializer listed among the main graph's inputs (old exporters, IR version < 4, list
       every weight there) is dropped from the inputs: it becomes a constant that can be folded
       and quantized. The IR version is raised to 4 when needed.
    2. Subgraph inputs are never touched (that would change an If/Loop body's signature).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kept = [value for value in graph.inputs if not value.is_initializer()]
        if len(kept) == len(graph.inputs):
            return ir.passes.PassResult(model, False)
        graph.inputs.clear()
        graph.inputs.extend(kept)
        model.ir_version = max(model.ir_version, 4)
        return ir.passes.PassResult(model, True)


class PreparePass(ir.passes.FunctionalPass):
    """Turn a float model into a clean float graph; the input model is left untouched.

    Cases, in order, on a copy of the model (tensors are shared, never written):

    1. Unknown op domains: ``UnsupportedModelError`` (``CheckDomainsPass``).
    2. float16/bfloat16 computed in float32 inside the same interface (``UpcastHalfPass``).
    3. Default-domain opset below ``min_opset``: upgraded (``UpgradeOpsetPass``).
    4. Initializers listed as graph inputs become plain weights (``RemoveInitializerInputsPass``).
    5. Constant subgraphs folded into initializers (``FoldConstantsPass``).
    6. ``Conv``/``ConvTranspose -> BatchNormalization`` folded (``FoldBatchNormPass``).
    7. Shapes inferred (``InferShapesPass``).
    8. ``ReduceMean`` over all spatial axes of a channel-first tensor becomes
       ``GlobalAveragePool`` (an int8 kernel).
    9. Every node and value gets a unique name (nodes are reported and selected by name);
       graphs and functions sorted topologically.
    """

    def __init__(self, min_opset: int = 13, max_size: int = DEFAULT_MAX_SIZE) -> None:
        super().__init__()
        # Built (and validated) up front so a bad option fails before any work.
        self._passes: tuple[ir.passes.InPlacePass, ...] = (
            UpcastHalfPass(),
            UpgradeOpsetPass(min_opset),
            RemoveInitializerInputsPass(),
            FoldConstantsPass(max_size),
            FoldBatchNormPass(),
            InferShapesPass(),
            SpatialMeanToGlobalPoolPass(),
            common_passes.NameFixPass(),
            common_passes.TopologicalSortPass(),
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Not ``ir.passes.Sequential``: it would wrap onnxq's typed errors in ``PassError``.
        CheckDomainsPass()(model)
        prepared = model.clone()
        modified = False
        for pass_ in self._passes:
            modified |= pass_(prepared).modified
        return ir.passes.PassResult(prepared, modified)


def prepare(model: ir.Model, *, min_opset: int = 13, max_size: int = DEFAULT_MAX_SIZE) -> ir.Model:
    """Return a prepared copy of ``model``; the input model is not modified.

    Raises ``UnsupportedModelError`` for unknown op domains or an opset that cannot be upgraded,
    and ``ConfigError`` for an invalid ``min_opset``/``max_size``.
    """
    return PreparePass(min_opset, max_size)(model).model
