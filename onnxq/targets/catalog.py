"""The targets onnxq writes for, as data (``Target`` fields are explained in ``spec``).

Where the ONNX Runtime CPU rules come from: ORT fuses ``DQ -> op -> Q`` into an int8 kernel for
the ops in ``ORT_INT8_OPS`` with u8 (or, on ARM64, s8) activations and s8 weights; on x86
without VNNI its u8s8 kernels multiply with ``vpmaddubsw`` and saturate int16 pair sums unless
weights are 7-bit. Measured on a 2-core EPYC with AVX-512 VNNI (ORT 1.32): u8u8 avoids the
saturation too but runs QLinearConv 3x slower (ResNet-18 1.24x of fp32 vs 0.41x), so the
portable default is u8 activations with 7-bit s8 weights.
"""

from __future__ import annotations

from onnxq.config import QuantMode, QuantType
from onnxq.targets.spec import BiasForm, Target

ORT_INT8_OPS = frozenset(
    {
        "Conv",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "AveragePool",
        "GlobalAveragePool",
        "Sigmoid",
        "LeakyRelu",
        "Concat",
    }
)
"""Ops ONNX Runtime's CPU provider fuses into int8 kernels (ConvTranspose stays float in ORT
1.32, so a Q/DQ around it is overhead: opt-in with ``op_types``)."""

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Ops with a weight whose output channels can each get a scale."""

ORT_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
    }
)
"""ONNX Runtime's own integer operators: other runtimes take only Q/DQ around float ops."""

STATIC_ONLY = frozenset({QuantMode.STATIC})

_ORT_CPU = dict(
    runtime="onnxruntime",
    activation_type=QuantType.UINT8,
    weight_type=QuantType.INT8,
    quantized_ops=ORT_INT8_OPS,
    per_channel_ops=WEIGHTED_OPS,
)

TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            name="ort-cpu",
            summary="ONNX Runtime on any CPU (x86 with or without VNNI, ARM64): u8 activations, "
            "7-bit s8 weights",
            reduce_range=True,
            notes=(
                "7-bit weights keep every u8 x s8 pair sum inside int16, so the model is exact "
                "on x86 without VNNI too; on a VNNI CPU it costs about 1 dB of SQNR next to "
                "ort-x86-vnni",
            ),
            **_ORT_CPU,
        ),
        Target(
            name="ort-x86-vnni",
            summary="ONNX Runtime on x86 CPUs with VNNI or AMX only: u8 activations, 8-bit s8 "
            "weights",
            requires_vnni=True,
            notes=("on an x86 CPU without VNNI u8s8 pair sums saturate int16: use ort-cpu there",),
            **_ORT_CPU,
        ),
        Target(
            name="ort-arm64",
            summary="ONNX Runtime on ARM64 CPUs: s8 activations and s8 weights (S8S8)",
            **{**_ORT_CPU, "activation_type": QuantType.INT8},
            notes=("x86 ONNX Runtime converts s8 activations to u8 at load time: it runs there",),
        ),
        Target(
            name="ort-mobile",
            summary="ONNX Runtime Mobile: the ort-cpu scheme, also written as OUT.ort (ORT format, "
            "fusions baked in)",
            reduce_range=True,
            extra_files=(".ort",),
            notes=(
                "u8 activations: the .ort keeps the same int8 kernels as the .onnx on every CPU "
                "(s8 activations fuse differently on x86 and ARM, so the two files would differ)",
            ),
            **_ORT_CPU,
        ),
        Target(
            name="openvino",
            summary="OpenVINO CPU plugin: u8 per-tensor activations, i8 per-channel weights, "
            "float bias; Q/DQ on the inputs of weighted ops (float outputs) and residual Adds",
            runtime="openvino",
            activation_type=QuantType.UINT8,
            weight_type=QuantType.INT8,
            quantized_ops=WEIGHTED_OPS | {"Add"},
            per_channel_ops=WEIGHTED_OPS,
            float_output_ops=WEIGHTED_OPS,
            reduce_range=True,
            bias=BiasForm.FLOAT,
            forbidden_ops=ORT_KERNELS,
            modes=frozenset({QuantMode.STATIC, QuantMode.WEIGHT_ONLY}),
            fixed=frozenset({"activation_type", "activation_symmetric", "weight_type"}),
            notes=(
                "weighted ops keep float outputs: an output Q on a ViT's patch-embedding Conv "
                "quantized the whole residual stream (tiny ViT 27 -> 39 dB without it)",
                "residual Adds of a CNN run on int8 inputs (ResNet-18 about 15% faster on AMX)",
                "OpenVINO's int8 FullyConnected needs VNNI or AMX: without them (AVX2) it runs "
                "oneDNN's gemm and a transformer is slower than fp32; CNN Convolutions still gain",
            ),
            python_extra="openvino",
        ),
        Target(
            name="tensorrt",
            summary="TensorRT explicit quantization: symmetric int8, zero point 0, Q/DQ on the "
            "inputs of weighted ops and residual Adds",
            runtime="tensorrt",
            activation_type=QuantType.INT8,
            activation_symmetric=True,
            weight_type=QuantType.INT8,
            quantized_ops=WEIGHTED_OPS | {"Add", "AveragePool", "GlobalAveragePool", "Concat"},
            per_channel_ops=WEIGHTED_OPS,
            bias=BiasForm.FLOAT,
            forbidden_ops=ORT_KERNELS,
            residual_add_inputs=True,
            modes=STATIC_ONLY,
            fixed=frozenset({"activation_type", "activation_symmetric", "weight_type"}),
            notes=(
                "an engine is built only where a GPU with TensorRT is present; accuracy here is "
                "measured in ONNX Runtime CPU",
            ),
        ),
        Target(
            name="qnn",
            summary="Qualcomm QNN (HTP): u16 activations, s8 weights (per-channel for Conv)",
            runtime="qnn",
            activation_type=QuantType.UINT16,
            weight_type=QuantType.INT8,
            quantized_ops=ORT_INT8_OPS | {"ConvTranspose"},
            per_channel_ops=frozenset({"Conv", "ConvTranspose"}),
            forbidden_ops=ORT_KERNELS,
            static_shapes=True,
            modes=STATIC_ONLY,
            notes=(
                "16-bit Q/DQ use the com.microsoft domain below opset 21; ONNX Runtime's CPU "
                "provider runs them as float (an accuracy check, not an int8 speed-up)",
            ),
        ),
    )
}
"""Every target by name; ``ort-cpu`` is the default."""

DEFAULT_TARGET = "ort-cpu"
