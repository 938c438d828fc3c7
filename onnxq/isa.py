"""CPU instruction sets that decide int8 speed and accuracy in ONNX Runtime, read as its
kernel dispatch reads them (CPUID).

On x86 without VNNI, ORT's u8s8 kernels multiply with VPMADDUBSW, whose 16-bit intermediate
sums of two ``uint8 * int8`` products saturate once ``|w|`` reaches about 64; 7-bit weights
(``reduce_range``) keep every pair sum inside int16.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

Cpuid = Callable[[int, int], tuple[int, int, int, int]]

#: feature -> the CPUID bits (leaf, subleaf, register index EAX..EDX, bit) any of which gives it
CPUID_FEATURES: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "avx2": ((7, 0, 1, 5),),
    "avx512": ((7, 0, 1, 16),),  # AVX512F
    "vnni": ((7, 0, 2, 11), (7, 1, 0, 4), (7, 0, 3, 25)),  # AVX512_VNNI, AVX-VNNI, AMX-INT8
}
#: the same features as Linux ``/proc/cpuinfo`` flags, where CPUID cannot be run
CPUINFO_FLAGS: dict[str, frozenset[str]] = {
    "avx2": frozenset({"avx2"}),
    "avx512": frozenset({"avx512f"}),
    "vnni": frozenset({"avx512_vnni", "avx_vnni", "amx_int8"}),
}
#: and as numpy's run-time dispatch names them (Windows, where neither of the above exists)
NUMPY_FEATURES: dict[str, frozenset[str]] = {
    "avx2": frozenset({"AVX2"}),
    "avx512": frozenset({"AVX512F"}),
    "vnni": frozenset({"AVX512VNNI", "AVXVNNI"}),
}
# void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4]), x86-64 System V calling convention
CPUID_CODE = bytes.fromhex(
    "53"  # push rbx
    "89f8"  # mov eax, edi
    "89f1"  # mov ecx, esi
    "4989d0"  # mov r8, rdx
    "0fa2"  # cpuid
    "418900"  # mov [r8], eax
    "41895804"  # mov [r8 + 4], ebx
    "41894808"  # mov [r8 + 8], ecx
    "4189500c"  # mov [r8 + 12], edx
    "5b"  # pop rbx
    "c3"  # ret
)


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction sets relevant to int8 kernels."""

    machine: str
    avx2: bool
    avx512: bool
    vnni: bool

    @property
    def x86(self) -> bool:
        return self.machine.lower() in {"x86_64", "amd64", "i386", "i686", "x86"}

    @property
    def u8s8_saturates(self) -> bool:
        """True where ORT's u8s8 dot products can saturate (x86 without VNNI)."""
        return self.x86 and not self.vnni

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "u8s8_saturates": self.u8s8_saturates}


@cache
def cpu_features() -> CpuFeatures:
    """This CPU's features as ONNX Runtime's kernel dispatch sees them: from CPUID itself on
    x86-64 Unix (so an emulator's or a masked CPUID counts, as it does for ORT), else from Linux
    ``/proc/cpuinfo`` flags, else from numpy's run-time dispatch table."""
    cpuid = _cpuid()
    if cpuid is not None:
        limits = _subleaf_limits(cpuid)
        found = {name: _has(cpuid, limits, bits) for name, bits in CPUID_FEATURES.items()}
    elif Path("/proc/cpuinfo").is_file():
        flags = set((cpuinfo_value("flags") or "").split())
        found = {name: bool(flags & names) for name, names in CPUINFO_FLAGS.items()}
    else:
        flags = _numpy_flags()
        found = {name: bool(flags & names) for name, names in NUMPY_FEATURES.items()}
    return CpuFeatures(machine=platform.machine(), **found)


def _numpy_flags() -> set[str]:
    """The CPU features numpy detected at import (empty where its table is not found)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return set()
    return {name for name, present in features.items() if present}


def _subleaf_limits(cpuid: Cpuid) -> dict[int, int]:
    """Leaf -> the highest subleaf this CPU reports, for the leaves the features read."""
    max_leaf = cpuid(0, 0)[0]
    return {0: 0, 7: cpuid(7, 0)[0]} if max_leaf >= 7 else {0: 0}


def _has(cpuid: Cpuid, limits: dict[int, int], bits: tuple[tuple[int, int, int, int], ...]) -> bool:
    """Whether any of ``bits`` is set, for leaves and subleaves within ``limits``."""
    return any(
        subleaf <= limits.get(leaf, -1) and cpuid(leaf, subleaf)[reg] >> bit & 1
        for leaf, subleaf, reg, bit in bits
    )


def _cpuid() -> Cpuid | None:
    """CPUID as a Python function: ``CPUID_CODE`` in an executable page (x86-64 Unix), or
    ``None`` where that cannot run (another CPU or OS, or a system that forbids such pages)."""
    if platform.machine().lower() not in {"x86_64", "amd64"} or not hasattr(mmap, "PROT_EXEC"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return None
    page.write(CPUID_CODE)
    signature = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)
    function = signature(ctypes.addressof(ctypes.c_char.from_buffer(page)))

    def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        function(leaf, subleaf, ctypes.addressof(out))
        return tuple(out)  # type: ignore[return-value]

    cpuid.page = page  # type: ignore[attr-defined]  # keeps the code mapped
    return cpuid


@cache
def cpuinfo_value(*keys: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line starting with one of ``keys`` (Linux);
    ``None`` where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(keys) and ":" in line:
            return line.split(":", 1)[1].strip()
    return None
