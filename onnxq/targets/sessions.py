"""Sessions in a target's own runtime, where this machine has it (``compare --target``).

Rules, by the target's ``runtime`` (``RUNTIMES``):

1. ``onnxruntime``: ONNX Runtime on the chosen provider. A target that writes ``.ort`` files
   (``extra_files``) runs each quantized model's ``.ort`` sibling where it exists; the fp32
   reference stays ``.onnx``.
2. ``openvino``: every model, fp32 included, in OpenVINO's CPU plugin at f32 inference
   precision (so the reference is fp32, not the bf16 default on AMX CPUs); peak memory is an
   ONNX Runtime probe, so it is not measured.
3. Any other runtime (TensorRT, QNN) cannot run here: ONNX Runtime CPU measures the models,
   and a note says so (accuracy carries over, latency does not).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from onnxq.runtime import Provider, make_session
from onnxq.targets.ort_format import ort_path
from onnxq.targets.spec import Target

PathLike = str | os.PathLike[str]


class OpenVINOSession:
    """An OpenVINO CPU model behind ONNX Runtime's ``run`` / ``get_outputs`` interface."""

    def __init__(self, path: PathLike, threads: int | None) -> None:
        from onnxq.targets.openvino import compile_model

        compiled = compile_model(path, threads=threads, inference_precision="f32")
        self._request = compiled.create_infer_request()
        self._outputs = [SimpleNamespace(name=out.get_any_name()) for out in compiled.outputs]

    def get_outputs(self) -> list[SimpleNamespace]:
        return self._outputs

    def run(self, names: list[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(dict(feed))
        return [np.array(results[i]) for i in range(len(self._outputs))]


@dataclass(frozen=True)
class TargetRuntime:
    """How ``compare`` runs models for ``target`` here, and what it says about that."""

    target: Target
    provider: Provider

    @property
    def runs_here(self) -> bool:
        return self.target.runtime in RUNTIMES

    @property
    def measures_memory(self) -> bool:
        return self.target.runtime != "openvino"

    def model_path(self, path: PathLike, *, reference: bool) -> Path:
        """The file that runs: a quantized model's ``.ort`` sibling for a target that writes
        one (where it exists), else ``path``."""
        sibling = ort_path(path)
        if not reference and ".ort" in self.target.extra_files and sibling.is_file():
            return sibling
        return Path(path)

    def open(self, path: PathLike, threads: int | None) -> Any:
        """A session with ``run(None, feed)`` and ``get_outputs()`` for the file at ``path``."""
        if self.target.runtime == "openvino":
            return OpenVINOSession(path, threads)
        provider = self.provider if self.runs_here else Provider.CPU
        return make_session(path, provider, intra_op_threads=threads)

    def engine(self) -> str | None:
        """The runtime that measures the models, when it is not ONNX Runtime."""
        if self.target.runtime != "openvino":
            return None
        from onnxq.targets.openvino import openvino_version

        return f"OpenVINO {openvino_version()} CPU plugin (f32 inference precision)"

    def note(self) -> str:
        """One line: where the numbers come from."""
        name = self.target.name
        if self.target.runtime == "openvino":
            return f"target {name}: every model measured in OpenVINO's CPU plugin (f32 hint)"
        if not self.runs_here:
            return (
                f"target {name}: {self.target.runtime} does not run here; measured in ONNX "
                "Runtime CPU (accuracy carries over, latency is not the target's)"
            )
        if ".ort" in self.target.extra_files:
            return f"target {name}: quantized models run from their .ort files where present"
        return f"target {name}: measured in ONNX Runtime ({self.provider.value})"


RUNTIMES = frozenset({"onnxruntime", "openvino"})
"""Target runtimes this package can run models in (``openvino`` with its extra)."""
