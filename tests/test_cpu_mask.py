"""The CPUID mask behind ``benchmarks.run --cpu``: a process under it sees the profile's CPU
(read back through numpy's own CPUID dispatch and through ``onnxq.isa``), its own SIGSEGV
handlers still get real faults, and the rules it hands the shim are the SDM's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from support import cpuid_masked_env

from benchmarks.cpu_mask import FEATURE_BITS, PROFILES, mask_spec
from onnxq.isa import cpu_features

SEEN_FEATURES = (
    "import json; from numpy._core._multiarray_umath import __cpu_features__ as f; "
    "from onnxq.isa import cpu_features; from benchmarks.cpu_mask import active_mask; "
    "print(json.dumps([f, cpu_features().to_dict(), active_mask()]))"
)


def _rules(spec: str) -> dict[tuple[int, int, int], int]:
    rules = [tuple(int(x, 16) for x in token.split(",")) for token in spec.split()]
    return {(leaf, sub, reg): bits for leaf, sub, reg, bits in rules}


def test_avx2_profile_clears_avx512_vnni_and_amx_bits():
    rules = _rules(mask_spec("avx2"))
    assert rules[(7, 0, 1)] & 1 << 16  # AVX512F, EBX bit 16
    assert rules[(7, 0, 2)] & 1 << 11  # AVX512_VNNI, ECX bit 11
    assert rules[(7, 0, 3)] & 1 << 25  # AMX-INT8, EDX bit 25
    assert rules[(7, 1, 0)] & 1 << 4  # AVX-VNNI, leaf 7.1 EAX bit 4
    assert not rules[(7, 0, 1)] & 1 << 5  # AVX2 (EBX bit 5) stays
    assert sum(bin(bits).count("1") for bits in rules.values()) == len(FEATURE_BITS)


def test_avx512_no_vnni_profile_keeps_avx512():
    rules = _rules(mask_spec("avx512-no-vnni"))
    assert (7, 0, 1) not in rules  # EBX (AVX512F/BW/VL...) untouched
    assert rules[(7, 0, 2)] == 1 << 11  # only AVX512_VNNI of ECX
    assert rules[(7, 1, 0)] & 1 << 4 and not rules[(7, 1, 0)] & 1 << 5  # AVX-VNNI; BF16 stays


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_masked_process_sees_the_profiles_cpu(profile):
    env = cpuid_masked_env(profile)
    run = [sys.executable, "-c", SEEN_FEATURES]
    host, host_isa, no_mask = json.loads(
        subprocess.run(run, check=True, capture_output=True, text=True).stdout
    )
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    masked, masked_isa, mask = json.loads(done.stdout)
    assert no_mask is None and mask.startswith(f"{profile}: ")
    assert masked["AVX2"] == host["AVX2"] and masked["FMA3"] == host["FMA3"]
    assert not masked["AVX512VNNI"]
    assert masked["AVX512F"] == (host["AVX512F"] and profile == "avx512-no-vnni")
    assert host_isa == cpu_features().to_dict()
    assert masked_isa["u8s8_saturates"] and not masked_isa["vnni"]
    assert masked_isa["avx512"] == masked["AVX512F"] and masked_isa["avx2"] == masked["AVX2"]


def test_the_processs_own_segfault_handler_still_runs():
    """faulthandler (as pytest and Ray install) replaces SIGSEGV handlers: the mask keeps
    answering CPUID and hands the real fault on, so the traceback is printed."""
    env = cpuid_masked_env("avx2")
    crash = "import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)"
    done = subprocess.run(
        [sys.executable, "-c", crash], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in done.stderr
