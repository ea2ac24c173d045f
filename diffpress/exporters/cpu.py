"""Which CPU runs an artifact, and does its int8 arithmetic agree there.

ONNX Runtime picks its u8 x s8 integer kernels by instruction set: with AVX-512 VNNI, AVX-VNNI or AMX the
products accumulate in int32; with only AVX2 they go through ``VPMADDUBSW``, whose int16 pair sums saturate
unless the weights stay within 7 bits (quantize target ``any``). :func:`run_onnx` runs a graph in a separate
process, optionally under ``qemu-x86_64 -cpu MODEL`` (qemu-user) so that ONNX Runtime's dispatch takes another
CPU's path: the tests and ``benchmarks/cpu_agreement.py`` check agreement on an AVX2 CPU from any x86 host.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from diffpress.errors import DiffpressError

INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

# runs in a bare interpreter (numpy + onnxruntime only), so that emulation stays quick
_RUNNER = """
import sys, numpy as np, onnxruntime as ort
path, feeds, out, level = sys.argv[1:5]
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                               else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
np.save(out, s.run(None, dict(np.load(feeds)))[0])
"""


def cpu_flags() -> list[str]:
    """The running CPU's instruction sets that decide which int8 kernels ONNX Runtime runs (Linux: from
    /proc/cpuinfo; an empty list where that cannot be read).

    >>> set(cpu_flags()) <= set(INT8_FLAGS)
    True
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return [f for f in INT8_FLAGS if f in have]


def integer_kernels_agree(target: str | None, flags: list[str] | None = None) -> bool | None:
    """Whether ONNX Runtime's u8 x s8 kernels compute an artifact of quantize ``target`` exactly on a CPU with
    ``flags`` (default: this one): always for ``any``; for ``vnni`` only with VNNI or AMX; None if unknown.

    >>> integer_kernels_agree("vnni", ["avx2"]), integer_kernels_agree("any", ["avx2"])
    (False, True)
    """
    if target in (None, "any"):
        return True
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True  # ARM's int8 dot products accumulate in int32
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    return any(f in flags for f in VNNI_FLAGS)


def run_onnx(model: str | Path, feeds: dict[str, np.ndarray], *, optimize: bool = True,
             emulate: str | None = None) -> np.ndarray:
    """The first output of ``model`` on ``feeds``, computed by ONNX Runtime in a separate process: with
    ``optimize`` its fused integer kernels, without it the graph as written (float Q/DQ arithmetic, what
    the PyTorch simulation computes). ``emulate`` names a qemu CPU model (e.g. ``Haswell``: AVX2, no
    VNNI) to run under ``qemu-x86_64``."""
    cmd = [sys.executable]
    if emulate:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            raise DiffpressError("emulating a CPU needs qemu-x86_64 (apt-get install qemu-user)")
        cmd = [qemu, "-cpu", emulate, sys.executable]
    with tempfile.TemporaryDirectory(prefix="diffpress-ort-") as tmp:
        work = Path(tmp)
        (work / "runner.py").write_text(_RUNNER)
        np.savez(work / "feeds.npz", **feeds)
        proc = subprocess.run([*cmd, str(work / "runner.py"), str(model), str(work / "feeds.npz"),
                               str(work / "out.npy"), "all" if optimize else "none"], capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DiffpressError(f"ONNX Runtime failed on {Path(model).name}"
                                 f"{f' (emulating {emulate})' if emulate else ''}: {last[:300]}")
        return np.load(work / "out.npy")
