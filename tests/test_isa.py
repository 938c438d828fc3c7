"""``onnxq.isa``: features from CPUID bits (leaves and subleaves the CPU reports only), and on a
plain x86-64 Linux machine the same answer as the kernel's ``/proc/cpuinfo`` flags."""

from __future__ import annotations

import platform

import pytest

from onnxq import isa


def _fake_cpuid(max_leaf: int, max_subleaf: int, set_bits: set[tuple[int, int, int, int]]):
    def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        if (leaf, subleaf) == (0, 0):
            return (max_leaf, 0, 0, 0)
        registers = [0, 0, 0, 0]
        if (leaf, subleaf) == (7, 0):
            registers[0] = max_subleaf
        for bit_leaf, bit_subleaf, reg, bit in set_bits:
            if (bit_leaf, bit_subleaf) == (leaf, subleaf):
                registers[reg] |= 1 << bit
        return tuple(registers)

    return cpuid


def _has(cpuid, bits) -> bool:
    return isa._has(cpuid, isa._subleaf_limits(cpuid), bits)


def test_vnni_is_any_of_its_three_forms():
    for bits in isa.CPUID_FEATURES["vnni"]:
        assert _has(_fake_cpuid(7, 1, {bits}), isa.CPUID_FEATURES["vnni"])
    assert not _has(_fake_cpuid(7, 1, set()), isa.CPUID_FEATURES["vnni"])


def test_unreported_leaves_and_subleaves_are_not_read():
    avx_vnni = (7, 1, 0, 4)
    assert not _has(_fake_cpuid(7, 0, {avx_vnni}), isa.CPUID_FEATURES["vnni"])  # no 7.1
    assert not _has(_fake_cpuid(6, 1, {(7, 0, 1, 5)}), isa.CPUID_FEATURES["avx2"])  # no 7


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="compares CPUID with Linux's /proc/cpuinfo on x86-64",
)
def test_cpuid_agrees_with_the_kernels_flags():
    from benchmarks.cpu_mask import active_profile

    if active_profile() is not None:
        pytest.skip("CPUID is masked in this process; /proc/cpuinfo is not")
    flags = set((isa.cpuinfo_value("flags") or "").split())
    expected = {name: bool(flags & names) for name, names in isa.CPUINFO_FLAGS.items()}
    got = isa.cpu_features()
    assert {name: getattr(got, name) for name in expected} == expected
