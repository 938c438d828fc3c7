"""CPU instruction sets that decide int8 speed and accuracy in ONNX Runtime.

On x86 without VNNI, ORT's u8s8 kernels multiply with VPMADDUBSW, whose 16-bit intermediate
sums of two ``uint8 * int8`` products saturate once ``|w|`` reaches about 64; 7-bit weights
(``reduce_range``) keep every pair sum inside int16.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any


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
    """Read the flags of this machine's CPU (Linux ``/proc/cpuinfo``; elsewhere all False)."""
    flags = set((cpuinfo_value("flags") or "").split())
    return CpuFeatures(
        machine=platform.machine(),
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni=bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}),
    )


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
