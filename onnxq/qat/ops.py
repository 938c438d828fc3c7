"""ONNX operators as differentiable torch functions, for the QAT module's interpreter.

``OPS`` maps a default-domain op type to ``fn(inputs, attrs) -> tensor or tuple``; ``inputs``
are torch tensors (``None`` for an absent optional input) and ``attrs`` the node's attributes
as Python values. The set covers the CNNs and transformers of the zoo as the torch exporters
write them (opset 13 and later): convolutions, GEMMs, element-wise math, pooling, shape ops,
LayerNorm, Softmax, GELU/Erf, Gather, and the mask and position arithmetic of Hugging Face BERT
exports (Range, GatherElements, GreaterOrEqual, And). Anything else is refused by the caller, by
name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Inputs = Sequence[torch.Tensor | None]
Attrs = dict[str, Any]
OpFn = Callable[[Inputs, Attrs], Any]

_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def _ints(value: torch.Tensor | None) -> list[int] | None:
    return None if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _spatial_pads(x: torch.Tensor, attrs: Attrs, kernel: Sequence[int]) -> list[int]:
    """ONNX ``pads`` (``[b1, b2, ..., e1, e2, ...]``), or the ``auto_pad`` SAME_* padding."""
    dims = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        strides = attrs.get("strides") or [1] * dims
        dilations = attrs.get("dilations") or [1] * dims
        begins, ends = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else large)
            ends.append(large if auto == "SAME_UPPER" else small)
        return begins + ends
    return list(attrs.get("pads") or [0] * (2 * dims))


def _pad(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Apply asymmetric pads explicitly; return the tensor and the symmetric padding left."""
    dims = len(pads) // 2
    begins, ends = pads[:dims], pads[dims:]
    if begins == ends:
        return x, begins
    torch_pads: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value), [0] * dims


def conv(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    kernel = list(w.shape[2:])
    x, padding = _pad(x, _spatial_pads(x, attrs, kernel))
    dims = len(kernel)
    return torch.convolution(
        x,
        w,
        bias,
        list(attrs.get("strides") or [1] * dims),
        padding,
        list(attrs.get("dilations") or [1] * dims),
        False,
        [0] * dims,
        int(attrs.get("group", 1)),
    )


def gemm(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    out = float(attrs.get("alpha", 1.0)) * (a @ b)
    return out if c is None else out + float(attrs.get("beta", 1.0)) * c


def _pool_setup(x: torch.Tensor, attrs: Attrs, value: float) -> tuple[torch.Tensor, dict]:
    kernel = list(attrs["kernel_shape"])
    dims = len(kernel)
    x, padding = _pad(x, _spatial_pads(x, attrs, kernel), value)
    options = {
        "kernel_size": kernel,
        "stride": list(attrs.get("strides") or [1] * dims),
        "padding": padding,
        "ceil_mode": bool(attrs.get("ceil_mode", 0)),
    }
    return x, options


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def max_pool(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, options = _pool_setup(inputs[0], attrs, float("-inf"))
    dims = len(options["kernel_size"])
    options["dilation"] = list(attrs.get("dilations") or [1] * dims)
    return _MAX_POOL[dims](x, **options)


def average_pool(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    include = bool(attrs.get("count_include_pad", 0))
    pads = _spatial_pads(x, attrs, list(attrs["kernel_shape"]))
    dims = len(pads) // 2
    if pads[:dims] != pads[dims:] and not include:
        raise NotImplementedError("AveragePool with asymmetric pads that are not counted")
    x, options = _pool_setup(x, attrs, 0.0)
    return _AVG_POOL[dims](x, count_include_pad=include, **options)


def _reduce_axes(inputs: Inputs, attrs: Attrs, rank: int) -> list[int]:
    axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    return list(range(rank)) if not axes else [int(a) % rank for a in axes]


def _reduce(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
        x = inputs[0]
        axes = _reduce_axes(inputs, attrs, x.ndim)
        if not axes and attrs.get("noop_with_empty_axes", 0):
            return x
        return fn(x, dim=axes, keepdim=bool(attrs.get("keepdims", 1)))

    return run


def reshape(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def flatten(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    """``[prod(shape[:axis]), prod(shape[axis:])]``; ``axis`` in ``[-rank, rank]``."""
    x = inputs[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def squeeze(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    if not axes:
        return x.squeeze()
    return x.squeeze([a % x.ndim for a in axes])


def unsqueeze(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs["axes"]
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def slice_(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 0:
            raise NotImplementedError("Slice with a negative step")
        size = x.shape[axis]
        start = max(min(start + size if start < 0 else start, size), 0)
        end = max(min(end + size if end < 0 else end, size), 0)
        index[axis % x.ndim] = slice(start, end, step)
    return x[tuple(index)]


def split(inputs: Inputs, attrs: Attrs) -> tuple[torch.Tensor, ...]:
    x = inputs[0]
    axis = int(attrs.get("axis", 0))
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    if not sizes:
        parts = int(attrs["num_outputs"])
        sizes = [-(-x.shape[axis] // parts)] * parts
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x, sizes, dim=axis))


def clip(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    return torch.clamp(inputs[0], low, high)


def layer_norm(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = int(attrs.get("axis", -1)) % x.ndim
    shape = list(x.shape[axis:])
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape),
                        float(attrs.get("epsilon", 1e-5)))  # fmt: skip


def gather(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    data, index = inputs[0], inputs[1].long()
    axis = int(attrs.get("axis", 0)) % data.ndim
    index = torch.where(index < 0, index + data.shape[axis], index)
    flat = torch.index_select(data, axis, index.reshape(-1))
    return flat.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1 :]))


def gather_elements(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    """``out[i][j] = data[index[i][j]][j]`` along ``axis`` (negative indices count from the end)."""
    data, index = inputs[0], inputs[1].long()
    axis = int(attrs.get("axis", 0)) % data.ndim
    index = torch.where(index < 0, index + data.shape[axis], index)
    return torch.gather(data, axis, index)


def range_(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    """``start, start + delta, ...`` up to ``limit`` (excluded), in the type of ``start``."""
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def shape(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    dims = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def constant_of_shape(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    value = attrs.get("value")
    fill = torch.zeros(1) if value is None else value
    return fill.reshape(-1)[0].expand(_ints(inputs[0])).clone()


def softmax(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return torch.softmax(inputs[0], dim=int(attrs.get("axis", -1)))


def gelu(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda inputs, attrs: fn(inputs[0])


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda inputs, attrs: fn(inputs[0], inputs[1])


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    def run(inputs: Inputs, attrs: Attrs) -> torch.Tensor:
        out = inputs[0]
        for value in inputs[1:]:
            out = fn(out, value)
        return out

    return run


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


OPS: dict[str, OpFn] = {
    "Conv": conv,
    "Gemm": gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Where": lambda inputs, attrs: torch.where(inputs[0], inputs[1], inputs[2]),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Not": _unary(torch.logical_not),
    "Identity": _unary(lambda x: x),
    "Dropout": lambda inputs, attrs: inputs[0],
    "LeakyRelu": lambda inputs, attrs: F.leaky_relu(inputs[0], float(attrs.get("alpha", 0.01))),
    "HardSigmoid": lambda inputs, attrs: torch.clamp(
        float(attrs.get("alpha", 0.2)) * inputs[0] + float(attrs.get("beta", 0.5)), 0.0, 1.0
    ),
    "HardSwish": _unary(F.hardswish),
    "Clip": clip,
    "Gelu": gelu,
    "Softmax": softmax,
    "LogSoftmax": lambda inputs, attrs: torch.log_softmax(inputs[0], int(attrs.get("axis", -1))),
    "LayerNormalization": layer_norm,
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": lambda inputs, attrs: inputs[0].mean(
        dim=list(range(2, inputs[0].ndim)), keepdim=True
    ),
    "GlobalMaxPool": lambda inputs, attrs: inputs[0].amax(
        dim=list(range(2, inputs[0].ndim)), keepdim=True
    ),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "Flatten": flatten,
    "Reshape": reshape,
    "Transpose": lambda inputs, attrs: inputs[0].permute(
        attrs.get("perm") or list(reversed(range(inputs[0].ndim)))
    ),
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Concat": lambda inputs, attrs: torch.cat(list(inputs), dim=int(attrs["axis"])),
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    "GatherElements": gather_elements,
    "Shape": shape,
    "Expand": lambda inputs, attrs: inputs[0] * torch.ones(_ints(inputs[1]), dtype=inputs[0].dtype),
    "ConstantOfShape": constant_of_shape,
    "Range": range_,
    "Cast": lambda inputs, attrs: inputs[0].to(_DTYPES[int(attrs["to"])]),
}
"""Default-domain op type -> torch implementation."""


def torch_dtype(onnx_type: int) -> torch.dtype | None:
    """The torch dtype of an ONNX ``TensorProto`` data type, or ``None`` when unmapped."""
    return _DTYPES.get(onnx_type)
