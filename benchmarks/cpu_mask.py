"""Run a process as if its x86 CPU lacked some features: ONNX Runtime's real kernels for that
CPU, at native speed, on this machine.

``cpuid_mask.c`` (built here with the C compiler, loaded with ``LD_PRELOAD``) makes every CPUID
of the process fault and answers it with the features of a profile cleared, so MLAS, numpy and
oneDNN dispatch as on such a CPU. Instruction timings stay this CPU's: latency ratios carry
over, absolute times do not. Needs Linux on x86_64 with CPUID faulting (``cpuid_fault``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from onnxq.isa import cpuinfo_value

SOURCE = Path(__file__).with_name("cpuid_mask.c")
MASK_VARIABLE = "ONNXQ_CPUID_MASK"
PROFILE_VARIABLE = "ONNXQ_CPUID_PROFILE"  # the profile's name, for reports
SHIM_PREFIX = "onnxq-cpuid-mask-"  # the built shim's file name, before its source digest
REGISTERS = ("eax", "ebx", "ecx", "edx")

#: feature -> (CPUID leaf, subleaf, register, bit), from Intel's SDM, volume 2, CPUID.
FEATURE_BITS: dict[str, tuple[int, int, str, int]] = {
    "avx512f": (7, 0, "ebx", 16),
    "avx512dq": (7, 0, "ebx", 17),
    "avx512ifma": (7, 0, "ebx", 21),
    "avx512pf": (7, 0, "ebx", 26),
    "avx512er": (7, 0, "ebx", 27),
    "avx512cd": (7, 0, "ebx", 28),
    "avx512bw": (7, 0, "ebx", 30),
    "avx512vl": (7, 0, "ebx", 31),
    "avx512vbmi": (7, 0, "ecx", 1),
    "avx512vbmi2": (7, 0, "ecx", 6),
    "avx512_vnni": (7, 0, "ecx", 11),
    "avx512_bitalg": (7, 0, "ecx", 12),
    "avx512_vpopcntdq": (7, 0, "ecx", 14),
    "avx512_4vnniw": (7, 0, "edx", 2),
    "avx512_4fmaps": (7, 0, "edx", 3),
    "avx512_vp2intersect": (7, 0, "edx", 8),
    "amx_bf16": (7, 0, "edx", 22),
    "avx512_fp16": (7, 0, "edx", 23),
    "amx_tile": (7, 0, "edx", 24),
    "amx_int8": (7, 0, "edx", 25),
    "avx_vnni": (7, 1, "eax", 4),
    "avx512_bf16": (7, 1, "eax", 5),
    "amx_fp16": (7, 1, "eax", 21),
    "avx_ifma": (7, 1, "eax", 23),
    "avx_vnni_int8": (7, 1, "edx", 4),
    "avx_ne_convert": (7, 1, "edx", 5),
    "amx_complex": (7, 1, "edx", 8),
    "avx_vnni_int16": (7, 1, "edx", 10),
}
_VNNI_AND_AMX = tuple(f for f in FEATURE_BITS if "vnni" in f or f.startswith("amx"))

#: profile -> (what such a CPU is, the features it hides).
PROFILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "avx2": ("AVX2, no AVX-512, no VNNI (Haswell to Comet Lake, Zen 1-3)", tuple(FEATURE_BITS)),
    "avx512-no-vnni": ("AVX-512 without VNNI (Skylake-SP)", _VNNI_AND_AMX),
}


class MaskUnavailable(RuntimeError):
    """This machine cannot mask CPUID (not x86_64 Linux, no CPUID faulting, or no C compiler)."""


def mask_spec(profile: str) -> str:
    """The shim's rules for ``profile``: one ``leaf,subleaf,register,mask`` per register."""
    masks: dict[tuple[int, int, int], int] = {}
    for feature in PROFILES[profile][1]:
        leaf, subleaf, register, bit = FEATURE_BITS[feature]
        key = (leaf, subleaf, REGISTERS.index(register))
        masks[key] = masks.get(key, 0) | 1 << bit
    return " ".join(
        f"{leaf:x},{sub:x},{reg:x},{bits:x}" for (leaf, sub, reg), bits in masks.items()
    )


def masked_env(profile: str) -> dict[str, str]:
    """This process's environment, with which processes see ``profile``'s CPU."""
    env = dict(os.environ)
    preload = [str(build_shim()), *filter(None, env.get("LD_PRELOAD", "").split(":"))]
    env["LD_PRELOAD"] = ":".join(preload)
    env[MASK_VARIABLE] = mask_spec(profile)
    env[PROFILE_VARIABLE] = profile
    return env


def active_profile() -> str | None:
    """The profile this process runs masked to, or ``None``."""
    profile = os.environ.get(PROFILE_VARIABLE)
    if profile not in PROFILES or os.environ.get(MASK_VARIABLE) != mask_spec(profile):
        return None
    return profile


def active_mask() -> str | None:
    """``"PROFILE: what such a CPU is"`` when this process runs masked, else ``None``."""
    profile = active_profile()
    return None if profile is None else f"{profile}: {PROFILES[profile][0]}"


def unmasked_env() -> dict[str, str]:
    """This process's environment without the mask (for emulators, which cannot run it)."""
    env = {k: v for k, v in os.environ.items() if k not in (MASK_VARIABLE, PROFILE_VARIABLE)}
    preload = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and SHIM_PREFIX not in p]
    return {**env, "LD_PRELOAD": ":".join(preload)} if preload else env


def build_shim() -> Path:
    """Compile ``cpuid_mask.c`` once per source version into the temporary folder."""
    _require_cpuid_faulting()
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    shim = Path(tempfile.gettempdir()) / f"{SHIM_PREFIX}{digest}.so"
    if shim.is_file():
        return shim
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise MaskUnavailable("masking CPUID needs a C compiler (cc or gcc) on PATH")
    partial = shim.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise MaskUnavailable(f"compiling {SOURCE.name} failed: {done.stderr.strip()[:300]}")
    partial.replace(shim)
    return shim


def _require_cpuid_faulting() -> None:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise MaskUnavailable("masking CPUID needs Linux on x86_64")
    if "cpuid_fault" not in (cpuinfo_value("flags") or "").split():
        raise MaskUnavailable("this kernel or CPU cannot fault on CPUID (no cpuid_fault flag)")


def main(argv: list[str]) -> int:
    """``python -m benchmarks.cpu_mask PROFILE COMMAND...``: run COMMAND under the mask (the
    test suite too: ``python -m benchmarks.cpu_mask avx2 python -m pytest``)."""
    if len(argv) < 2 or argv[0] not in PROFILES:
        print(f"usage: python -m benchmarks.cpu_mask {{{','.join(PROFILES)}}} COMMAND...")
        return 2
    try:
        env = masked_env(argv[0])
    except MaskUnavailable as error:
        print(f"cannot mask CPUID: {error}", file=sys.stderr)
        return 2
    return subprocess.run(argv[1:], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
