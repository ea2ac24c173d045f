"""The int8 ONNX graph computes what the simulation computes, on the CPU that runs the tests.

ONNX Runtime runs a W8A8 graph on fused integer kernels; with its optimizations off the same graph runs as
float Q/DQ arithmetic, which is what the PyTorch simulation computes. The default quantize target (``any``)
must make the two agree on every x86 CPU: this test fails on a CPU where they do not (an AVX2 CPU without
VNNI runs full-range int8 weights through saturating int16 sums: 1.9-3.4 % off, measured). Where qemu-user
is installed the same check also runs on an emulated AVX2 CPU, whatever the host.
"""
from __future__ import annotations

import shutil

import pytest
import torch

import diffpress
from diffpress import QuantizeConfig, TimestepPolicy
from diffpress.exporters.cpu import cpu_flags, integer_kernels_agree, run_onnx
from diffpress.exporters.plan import example_feed, io_names, rel_rms

# fused vs float Q/DQ, digits-cond-unet: 2.5e-4 with 7-bit weights on any CPU (requantization rounds a value one
# step differently now and then), 1.9e-3 with full-range weights on a VNNI CPU, 1.8e-2 on an emulated AVX2 one
AGREE = 5e-3


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """digits-cond-unet quantized W8A8 for each target, exported (no verification: the tests compare themselves)."""
    root = tmp_path_factory.mktemp("cpu")
    den = diffpress.load("digits-cond-unet")
    cs = diffpress.calibrate(den, num_samples=4, steps=10, policy=TimestepPolicy("uniform", count=3), progress=False)
    paths = {}
    for target in ("any", "vnni"):
        q = den.copy()
        diffpress.quantize_(q, QuantizeConfig(target=target), cs, progress=False)
        diffpress.export_onnx(q, root / target, verify=False)
        paths[target] = root / target / "model.onnx"
    inputs = list(example_feed(den, 4, seed=7))
    inputs[1] = torch.full((4,), 600.0)
    feeds = {k: v.numpy() for k, v in zip(io_names(den), inputs)}
    return paths, feeds


def _gap(path, feeds, emulate=None) -> float:
    return rel_rms(run_onnx(path, feeds, optimize=True, emulate=emulate),
                run_onnx(path, feeds, optimize=False, emulate=emulate))


def test_default_target_agrees_with_the_simulation_on_this_cpu(exports):
    paths, feeds = exports
    assert QuantizeConfig().target == "any"
    gap = _gap(paths["any"], feeds)
    assert gap < AGREE, f"integer kernels drift {gap:.2e} from float Q/DQ on this CPU ({cpu_flags()})"


def test_vnni_target_agrees_wherever_this_cpu_has_vnni(exports):
    paths, feeds = exports
    gap = _gap(paths["vnni"], feeds)
    if integer_kernels_agree("vnni"):
        assert gap < AGREE
    else:  # the defect the default target avoids: say so, measured
        assert gap > AGREE


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-user not installed: no emulated AVX2 CPU (apt-get install qemu-user)")
def test_on_an_emulated_avx2_cpu_only_the_default_target_agrees(exports):
    paths, feeds = exports
    assert _gap(paths["any"], feeds, emulate="Haswell") < AGREE
    assert _gap(paths["vnni"], feeds, emulate="Haswell") > 2 * AGREE  # saturated int16 sums
    # with 7-bit weights the integer kernels compute the same numbers on both CPUs
    native, emulated = (run_onnx(paths["any"], feeds, emulate=e) for e in (None, "Haswell"))
    assert rel_rms(emulated, native) < 1e-5
