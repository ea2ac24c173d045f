"""Calibration under torchrun: two processes give what one gives, bit for bit (statistics, calibration set,
compressed model), and `diffpress run` works under torchrun unchanged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from diffpress import distributed
from diffpress.calibration.observers import StepStats

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process; the same for the single run
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _same_file(a: Path, b: Path) -> None:
    fa, fb = safe_open(str(a), "pt"), safe_open(str(b), "pt")
    assert fa.metadata() == fb.metadata() and list(fa.keys()) == list(fb.keys())
    for k in fa.keys():
        assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k


def test_single_process_is_the_default():
    assert not distributed.active() and distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.gather_pieces({2: "b", 0: "a"}) == {0: "a", 2: "b"}


def test_bottom_k_samples_do_not_depend_on_batch_order_or_grouping():
    g = torch.Generator()
    xs = [torch.randn(300, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def stats(order, groups):
        parts = []
        for group in groups:
            st = StepStats()
            for i in (i for i in order if i in group):
                st.update(xs[i], 64, g.manual_seed(100 + i))
            parts.append(st)
        for other in parts[1:]:
            parts[0].merge(other, 64)
        return parts[0]

    one = stats(range(6), [set(range(6))])
    two = stats([5, 3, 1, 0, 2, 4], [{0, 2, 4}, {1, 3, 5}])
    assert torch.equal(one.samples, two.samples) and len(one.samples) == 64
    assert (one.min, one.max, one.count) == (two.min, two.max, two.count) == (
        float(torch.cat(xs).min()), float(torch.cat(xs).max()), 1800)


def test_torchrun_statistics_and_streamed_set_equal_a_single_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    script = str(HERE / "distributed_stats.py")
    _run([sys.executable, script, "one"], tmp_path)
    _run([*TORCHRUN, script, "two", "--stream"], tmp_path)  # streamed to disk by two ranks
    order = json.loads(safe_open(str(tmp_path / "one" / "stats.safetensors"), "pt").metadata()["order"])
    assert len(order) > 100  # every linear, input and output, three timesteps
    _same_file(tmp_path / "one" / "stats.safetensors", tmp_path / "two" / "stats.safetensors")
    _same_file(tmp_path / "one" / "cal.safetensors", tmp_path / "two" / "cal.safetensors")
    assert not list((tmp_path / "two").glob(".*parts"))  # the streamed chunks are cleaned up


PRUNE = ["--no-progress", "--set", "calibration.samples=8", "--set", "calibration.batch_size=2",
         "--set", "calibration.steps=6", "--set", "calibration.policy.count=3", "--set", "passes.0.batch_size=2",
         "--set", "passes.1.batch_size=8", "--set", "evaluation.samples=4", "--set", "evaluation.steps=6",
         "--set", "evaluation.latency_repeats=1", "--set", "exports=[]", "--set", "evaluation.metrics=[psnr]"]


def test_diffpress_run_under_torchrun_writes_the_single_process_model(tmp_path):
    """`diffpress run` under torchrun, nothing else changed: calibration trajectories, pruning's gradient importance
    (pieces summed in order) and the W8A8 observers split over two ranks give the single-process calibration set
    and model, bit for bit; rank 0 alone reports and writes. (Distillation follows the clock, so it is not
    reproducible even in one process: see the next test.)"""
    cli = ["-m", "diffpress.cli", "run", "prune30-w8a8", "--model", "digits-dit", *PRUNE, "--set", "passes.0.recover=null"]
    one = _run([sys.executable, *cli, "--out", "one", "--calibration", "one.safetensors"], tmp_path)
    two = _run([*TORCHRUN, *cli, "--out", "two", "--calibration", "two.safetensors"], tmp_path)
    assert one.stdout.count("wrote one") == 1 and two.stdout.count("wrote two") == 1  # rank 0 alone reports
    _same_file(*(tmp_path / d / "model" / "compressed.safetensors" for d in ("one", "two")))
    fa, fb = (safe_open(str(tmp_path / f), "pt") for f in ("one.safetensors", "two.safetensors"))
    assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    prune = [r["passes"][0] for r in reports]
    assert prune[0]["importance_steps"] == prune[1]["importance_steps"] >= 1, prune[0]
    assert prune[0]["macs_after"] == prune[1]["macs_after"] <= 0.72 * prune[0]["macs_before"]
    assert reports[0]["evaluation"]["fidelity"]["psnr_db"] == reports[1]["evaluation"]["fidelity"]["psnr_db"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.safetensors", "two", "two.safetensors"]


CLOCKED = """
version: 1
calibration: {samples: 8, batch_size: 2, steps: 6, policy: {kind: uniform, count: 3}}
passes:
  - {pass: prune, target: 0.3, batch_size: 4, recover: {time_budget: 600, steps: 6, eval_every: 3, batch_size: 4}}
  - {pass: quantize, weights: int8, activations: int8, batch_size: 8, reconstruct: {time_budget: 2}}
  - {pass: cache, budget: 0.6, search: search, samples: 2, holdout: 0, time_budget: 2}
exports: []
evaluation: {samples: 2, steps: 6, latency_repeats: 1, metrics: [psnr]}
"""


def test_passes_that_follow_the_clock_leave_every_rank_with_rank_0s_model(tmp_path):
    """Distillation (learning rate and stop follow elapsed time), block reconstruction and the cache schedule's
    annealing (both until a deadline) run on every rank, then every rank takes rank 0's result: the runner's
    check after each pass (all ranks hold the same model) passes, and the run writes."""
    (tmp_path / "clocked.yaml").write_text(CLOCKED)
    _run([*TORCHRUN, "-m", "diffpress.cli", "run", "clocked.yaml", "--model", "digits-dit", "--no-progress",
          "--out", "three"], tmp_path)
    passes = json.loads((tmp_path / "three" / "report.json").read_text())["passes"]
    assert [p["pass"] for p in passes] == ["prune", "quantize", "cache"]
    assert passes[0]["recovery"]["steps"] == 6 and passes[0]["recovery"]["best"] <= passes[0]["recovery"]["initial"]
    assert any(r["result"] == "adaround" for r in passes[1]["reconstruction"]), passes[1]["reconstruction"]
    assert passes[2]["macs_fraction"] <= 0.6 and "search" in passes[2]["candidates"]


def test_ordered_reduction_equals_a_plain_loop():
    total, seen = torch.zeros(4), []
    parts = [torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(5)]

    def consume(i, x):
        seen.append(i)
        total.add_(x)
        return i < 3  # stop after piece 3

    distributed.reduce_in_order(5, lambda i: parts[i], consume, numel=4)
    assert seen == [0, 1, 2, 3]
    assert torch.equal(total, ((parts[0] + parts[1]) + parts[2]) + parts[3])
