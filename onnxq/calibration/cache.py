"""Calibration cache: observed statistics in a ranges file, tied to the model they came from.

``ranges.json`` holds, per observed tensor, the observers' state (min/max, the histogram, the
moving average), so any range method or percentile can be chosen when quantizing, plus:

* ``model.fingerprint``: sha256 of the prepared float graph (``model_fingerprint``: nodes,
  attributes, initializers i.e. weights, inputs and outputs) and ``model.tensors`` (the names
  observed). A file from another model is refused (``RangesError``).
* ``onnxq_version``, sample and batch counts, the averaging constant of the moving average.
* ``hessians``: GPTQ's input Hessians ``E[x x^T]`` per node are ``K x K`` float64 matrices
  (hundreds of MB for a ResNet-18), so they go to a companion ``<stem>.hessians.npz`` next to
  the JSON. Both files carry the same random ``run`` id; a companion from another run is
  refused. A ranges file written without Hessians quantizes with nearest rounding.

Writes are atomic (temporary file in the same folder, then ``os.replace``), the companion first
and the JSON last: an interrupted write leaves no partial file, and at worst an older JSON next to
a newer companion, which the ``run`` ids tell apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.calibration.observers import MinMaxObserver, observer_from_dict
from onnxq.errors import RangesError, first_line
from onnxq.model_io import atomic_write, is_large, without_initializers

FORMAT = "onnxq.ranges"
FORMAT_VERSION = 1


def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the graph's deterministic serialisation: structure and weights (over 2 GB,
    which protobuf cannot serialise at once: the graph without weights, then each weight)."""
    if not is_large(model):
        return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()
    digest = hashlib.sha256(without_initializers(model.graph).SerializeToString(deterministic=True))
    for tensor in model.graph.initializer:
        digest.update(tensor.SerializeToString(deterministic=True))
    return digest.hexdigest()


@dataclass(frozen=True)
class RangesFile:
    """A ranges file, read and checked for format (not yet against a model)."""

    path: Path
    fingerprint: str
    tensors: dict[str, list[MinMaxObserver]]
    samples: int
    batches: int
    onnxq_version: str
    details: dict[str, Any] = field(default_factory=dict)
    hessian_nodes: dict[str, str] = field(default_factory=dict)
    hessians_file: Path | None = None
    run: str = ""

    def check_model(self, fingerprint: str) -> None:
        """Refuse statistics observed on another model."""
        if fingerprint != self.fingerprint:
            raise RangesError(
                f"{self.path}: ranges were calibrated on another model (fingerprint "
                f"{self.fingerprint[:12]}, this model {fingerprint[:12]}, onnxq "
                f"{self.onnxq_version}); run `onnxq calibrate` on this model"
            )

    def hessians(self) -> dict[str, np.ndarray] | None:
        """GPTQ Hessians by node name, or ``None`` when the file was written without them."""
        if self.hessians_file is None:
            return None
        try:
            with np.load(self.hessians_file, allow_pickle=False) as data:
                if str(data["run"]) != self.run:
                    raise RangesError(
                        f"{self.hessians_file}: Hessians from another calibration run than "
                        f"{self.path.name}; run `onnxq calibrate` again"
                    )
                return {node: data[key] for node, key in self.hessian_nodes.items()}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise RangesError(
                f"{self.hessians_file}: cannot read Hessians: {first_line(exc)}"
            ) from None


def save_ranges(
    path: str | os.PathLike[str],
    *,
    fingerprint: str,
    tensors: Mapping[str, Sequence[MinMaxObserver]],
    samples: int,
    batches: int,
    hessians: Mapping[str, np.ndarray] | None = None,
    details: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write the ranges file (and its Hessians companion when given); returns what was written."""
    from onnxq import __version__

    out = Path(path)
    run = uuid.uuid4().hex
    written = []
    hessian_entry = None
    if hessians is not None:
        companion = hessians_path(out)
        keys = {node: f"h{i}" for i, node in enumerate(hessians)}
        arrays = {keys[node]: np.asarray(h, dtype=np.float64) for node, h in hessians.items()}
        atomic_write(companion, lambda f: np.savez(f, run=np.array(run), **arrays))
        hessian_entry = {"file": companion.name, "nodes": keys}
        written.append(companion)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "onnxq_version": __version__,
        "run": run,
        "model": {"fingerprint": fingerprint, "tensors": list(tensors)},
        "samples": samples,
        "batches": batches,
        "details": dict(details or {}),
        "hessians": hessian_entry,
        "tensors": {name: [obs.to_dict() for obs in group] for name, group in tensors.items()},
    }
    data = json.dumps(document, allow_nan=False).encode()
    atomic_write(out, data)
    return [*written, out]


def load_ranges(path: str | os.PathLike[str]) -> RangesFile:
    """Read a ranges file; every problem is a one-line ``RangesError``."""
    path = Path(path)
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RangesError(f"{path}: no such ranges file") from None
    except (OSError, ValueError) as exc:
        raise RangesError(f"{path}: not a readable ranges file: {first_line(exc)}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise RangesError(f"{path}: not an onnxq ranges file (written by `onnxq calibrate`)")
    if document.get("format_version") != FORMAT_VERSION:
        raise RangesError(
            f"{path}: ranges format version {document.get('format_version')} is not supported "
            f"(this onnxq reads {FORMAT_VERSION})"
        )
    try:
        tensors = {
            name: [observer_from_dict(item) for item in group]
            for name, group in document["tensors"].items()
        }
        entry = document["hessians"]
        return RangesFile(
            path=path,
            fingerprint=str(document["model"]["fingerprint"]),
            tensors=tensors,
            samples=int(document["samples"]),
            batches=int(document["batches"]),
            onnxq_version=str(document["onnxq_version"]),
            details=dict(document["details"]),
            hessian_nodes=dict(entry["nodes"]) if entry else {},
            hessians_file=path.parent / entry["file"] if entry else None,
            run=str(document["run"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RangesError(f"{path}: malformed ranges file: {first_line(exc)}") from None


def hessians_path(ranges_path: Path) -> Path:
    """``ranges.json`` -> ``ranges.hessians.npz`` in the same folder."""
    return ranges_path.with_name(f"{ranges_path.stem}.hessians.npz")
