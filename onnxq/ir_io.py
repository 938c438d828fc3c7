"""ONNX protos to onnx-ir models and back, for every model ONNX allows.

onnx-ir cannot hold map types (``map(int64, tensor(float))``, a ZipMap's
``seq(map(...))`` output, a DictVectorizer's input). Rules:

1. Graph inputs and outputs (subgraphs included) whose type holds a map lose their type on the
   way in; the types travel in the model's metadata (``HELD_TYPES``), which every pass keeps,
   and are put back by ``to_proto``. ONNX Runtime runs a model with untyped outputs meanwhile.
2. ``value_info`` entries holding a map are dropped (they are optional).
3. Anything else onnx-ir cannot read: ``UnsupportedModelError`` with a one-line reason.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from onnxq.errors import UnsupportedModelError, first_line

HELD_TYPES = "onnxq.held_types"  # metadata key: {value name: base64 TypeProto}


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """``ir.from_proto``, with map types held aside (rule 1) instead of failing."""
    if any(_holds_map(v.type) for v in _values(proto, value_info=True)):
        proto = _without_maps(proto)
    try:
        return ir.from_proto(proto)
    except (ir.serde.SerdeError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"onnx-ir cannot read the model: {first_line(exc)}") from None


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``ir.to_proto``, with the held types put back and their metadata entry removed."""
    proto = ir.to_proto(model)
    held = _held(proto)
    if not held:
        return proto
    for value in _values(proto, value_info=False):
        if value.name in held and not value.HasField("type"):
            value.type.CopyFrom(held[value.name])
    _set_held(proto, {})
    return proto


def _without_maps(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with map types cleared from inputs and outputs (held in its metadata) and
    map-typed ``value_info`` dropped."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    held = _held(copy)
    for value in _values(copy, value_info=False):
        if _holds_map(value.type):
            held[value.name] = onnx.TypeProto()
            held[value.name].CopyFrom(value.type)
            value.ClearField("type")
    for graph in all_graphs(copy.graph):
        kept = [v for v in graph.value_info if not _holds_map(v.type)]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    _set_held(copy, held)
    return copy


def _values(proto: onnx.ModelProto, *, value_info: bool) -> Iterator[onnx.ValueInfoProto]:
    for graph in all_graphs(proto.graph):
        yield from graph.input
        yield from graph.output
        if value_info:
            yield from graph.value_info


def _holds_map(type_proto: onnx.TypeProto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind == "sequence_type":
        return _holds_map(type_proto.sequence_type.elem_type)
    if kind == "optional_type":
        return _holds_map(type_proto.optional_type.elem_type)
    return False


def _held(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    for prop in proto.metadata_props:
        if prop.key == HELD_TYPES:
            held = {}
            for name, encoded in json.loads(prop.value).items():
                held[name] = onnx.TypeProto()
                held[name].ParseFromString(base64.b64decode(encoded))
            return held
    return {}


def _set_held(proto: onnx.ModelProto, held: dict[str, onnx.TypeProto]) -> None:
    kept = [p for p in proto.metadata_props if p.key != HELD_TYPES]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if held:
        encoded = {k: base64.b64encode(t.SerializeToString()).decode() for k, t in held.items()}
        proto.metadata_props.add(key=HELD_TYPES, value=json.dumps(encoded, sort_keys=True))


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_graphs(sub)
