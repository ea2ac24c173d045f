"""diffpress against the tools a user would otherwise reach for, side by side in one process, on the zoo models.

    pip install -e ".[peers]"     # Torch-Pruning, NVIDIA ModelOpt, torchao, optimum-quanto, DeepCache: benchmarks only
    python benchmarks/peers/run.py --models digits-cond-unet digits-dit --samples 200
    python benchmarks/peers/run.py --table        # benchmarks/results/peers.md from the peers_*.json files

Writes ``benchmarks/results/peers_<model>.json`` after every row (a crash keeps what was measured) and the markdown
table ``benchmarks/results/peers.md``. Every peer runs in its own ``try``: a peer that fails is an error row with
its message, never a missing row.

Models: any name or path ``diffpress.load`` takes (default: the two conditional zoo models). Quality: ``--samples``
images, 50 steps of the model's sampler (DDIM for the zoo), seeds 0.., the conditions ``diffpress.evaluate`` uses
(class labels 0..K-1 repeated, guidance 3 where the model has a null condition), PSNR / SSIM against the
uncompressed model's samples on the same seeds; for 16x16 single-channel models (the digits zoo) also the digits
classifier's conditional accuracy and Frechet distance (FD) to all real digits. Rows whose ``runtime`` is ``ort`` are sampled from the ONNX artifact in ONNX Runtime (the
integer arithmetic is real); ``torch`` rows in PyTorch, where ModelOpt's quantizers are fake-quant (simulated,
float weights kept) and torchao / quanto run their own int8 / int4 kernels.

Groups (``--groups``):
- quant: ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax), calibrated on
  the trajectory points diffpress calibrates on (64 trajectories x 10 steps) and on the middle step only (as many
  points); the same restricted to Conv / MatMul / Gemm (``op_types_to_quantize``) with int8 and with int4 weights;
  ModelOpt ``INT8_DEFAULT_CFG``, ``INT8_SMOOTHQUANT_CFG``, ``INT4_AWQ_CFG``, ``W4A8_AWQ_BETA_CFG``,
  ``NVFP4_SVDQUANT_DEFAULT_CFG``, and that config's SVDQuant algorithm with int4 quantizers (W4A8: int8 per-tensor
  activations; W4A4: int4 activations in dynamic blocks of 64), forward loop over the same points; torchao
  ``Int8DynamicActivationInt8WeightConfig``; quanto int8 weights + int8 activations (calibrated), int8 weights,
  int4 weights; diffpress's built-in recipes w8a8, w4a8, w4a8-lowrank, w4a4-lowrank (passes, then ONNX export).
- prune: diffpress ``prune30`` (diff_pruning importance, recovery ``--recover-budget`` s) against Torch-Pruning's
  ``MetaPruner`` with magnitude (L2) and Taylor importance at the same MACs (ratio bisected), each followed by the
  same recovery (diffpress's distillation, same points, same budget): the importance is what differs.
- cache: DeepCache's uniform rule (every N-th step computes the whole UNet, the others reuse all but the outermost
  branch): the DeepCache package where it can wrap the model (a diffusers UNet: down / mid / up blocks), the rule
  re-implemented on diffpress's captured cache units where it cannot (DiT); diffpress's searched schedule at the
  same MAC fraction (search ``--cache-search`` s). On the UNet both are run, and the PSNR between the package and
  the re-implementation is reported (how faithful the re-implementation is).

Cost: bytes of the artifact (ONNX folder for ``ort`` rows, ``torch.save`` of the state dict for ``torch`` rows),
MACs per call (captured graph), latency per denoiser call at batch 2 (``ort`` rows in ONNX Runtime, ``torch`` rows in
PyTorch, labelled) and the whole 50-step loop in PyTorch for the cache rows, timed interleaved at the end of each
group with ``--threads`` threads (default 1) everywhere; ``compress_seconds``: the tool's own work (quantize,
calibrate over the shared points, prune, recover, search, export) excluding the trajectory collection, which all
share and which is reported once.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import io
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

import diffpress
from diffpress import conditions, export_onnx
from diffpress.conditions import ConditionSource, materialize
from diffpress.deploy import OrtDenoiser
from diffpress.eval import metrics
from diffpress.eval.cost import latency_side_by_side
from diffpress.exporters.onnx import example_feed
from diffpress.graph import capture
from diffpress.recipes.run_report import folder_bytes
from diffpress.recipes.runner import resolve_sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptq import GUIDANCE, STEPS, setup  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
PACKAGES = ("torch", "onnx", "onnxruntime", "diffusers", "nvidia-modelopt", "torchao", "optimum-quanto",
            "torch-pruning", "DeepCache", "diffpress")


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def torch_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


class Bench:
    """One model: the reference samples, the rows measured so far, and the callables timed at the end of a group."""

    def __init__(self, name: str, args, clf, real_feats, results: dict, out: Path):
        self.name, self.args, self.clf, self.real_feats, self.results, self.out = name, args, clf, real_feats, results, out
        self.den = diffpress.load(name)
        self.n = args.samples
        # the conditions diffpress.evaluate uses (labels 0..K-1 repeated; random states for a hidden-state model)
        self.kw, note = materialize(self.den, ConditionSource(), self.n, seed=0)
        self.guidance = GUIDANCE if self.den.supports_guidance else 1.0
        self.digits = self.den.sample_shape == (1, 16, 16)  # diffpress.evaluate's rule: the classifier's data
        graph = capture(self.den, batch=1)
        self.macs = graph.macs
        # the share of the MACs in nn.Linear modules: all that torchao's config quantizes
        self.linear_share = sum(lyr.macs for lyr in graph.layers if lyr.module_type == "Linear") / self.macs
        self.rows: dict[str, dict] = results["models"].setdefault(name, {"rows": {}, "notes": {}})["rows"]
        self.notes: dict = results["models"][name]["notes"]
        self.work = Path(tempfile.mkdtemp(prefix=f"peers-{name}-"))
        self.timers: dict[str, dict] = {}
        t0 = time.perf_counter()
        self.ref = None
        fp, self.ref = self.measure(self.den)
        self.rows["fp32"] = {"group": "reference", "tool": "none", "bits": "fp32", "runtime": "torch", **fp,
                             "bytes": torch_bytes(self.den.model), "macs": self.macs}
        self.notes["reference_sampling_seconds"] = round(time.perf_counter() - t0, 1)
        self.notes["conditions"] = note or "class labels 0..K-1 repeated"
        self.notes["guidance"], self.notes["sampler"] = self.guidance, resolve_sampler(self.den, "auto")[1]["class"]
        if not self.digits:
            self.notes["metrics"] = "no FD / accuracy: the digits classifier applies to 16x16 single-channel images"
        self.x, self.t, self.cond = self.den.example_inputs(2, seed=5)
        self.time_torch("fp32", self.den, "quant")
        self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(self.out)

    # -- rows --------------------------------------------------------------------------------------------------
    def row(self, group: str, key: str, tool: str, bits: str, build, *, sample: bool = True,
            samples: int | None = None) -> object | None:
        """``build()`` returns ``(model, info)``: ``model`` is what :func:`diffpress.sample` runs (a Denoiser or an
        OrtDenoiser), ``info`` the row's other fields (``runtime``, ``bytes``, ``compress_seconds``, ...)."""
        if self.args.rows and not any(fnmatch.fnmatch(key, pat) for pat in self.args.rows):
            return None
        print(f"[{self.name}] {group}: {key} ...", flush=True)
        row = {"group": group, "tool": tool, "bits": bits}
        model = None
        try:
            t0 = time.perf_counter()
            model, info = build()
            info.setdefault("compress_seconds", round(time.perf_counter() - t0, 1))
            row.update(info)
            row.setdefault("macs", self.macs)
            if sample:
                row.update(self.measure(model, samples)[0])
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a row, not a crash
            where = traceback.extract_tb(exc.__traceback__)[-1]
            row["error"] = (f"{type(exc).__name__}: {exc}" if str(exc) else
                            f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno}: {where.line}")[:600]
            row["traceback"] = traceback.format_exc().splitlines()[-8:]
            model = None
        self.rows[key] = row
        print(f"[{self.name}] {key}: " + json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        self.save()
        return model

    def conds(self, n: int) -> dict:
        return {k: (n if k == "num_samples" else conditions.take(v, slice(0, n))) for k, v in self.kw.items()}

    def sample(self, model, n: int | None = None) -> torch.Tensor:
        return diffpress.sample(model, **self.conds(min(n or self.n, self.n)), guidance=self.guidance, steps=STEPS,
                                seed=0, progress=False).images

    def measure(self, model, n: int | None = None) -> tuple[dict, torch.Tensor]:
        """PSNR / SSIM against the reference samples on the same seeds; digits models: accuracy and FD too."""
        t0 = time.perf_counter()
        out = self.sample(model, n)
        row = {"samples": len(out), "seconds": round(time.perf_counter() - t0, 1)}
        if self.digits:
            feats, logits = metrics.classifier_outputs(self.clf, out)
            row["fd_real"] = metrics.frechet_distance(feats.numpy(), self.real_feats)
            if "labels" in self.kw:
                row["cond_accuracy"] = metrics.conditional_accuracy(logits, self.kw["labels"][:len(out)])
        if self.ref is not None:
            row.update(psnr_db=metrics.psnr(self.ref[:len(out)], out), ssim=metrics.ssim(self.ref[:len(out)], out))
        return row, out

    def time_torch(self, key: str, den, group: str) -> None:
        x, t, cond = self.x, self.t, self.cond
        self.timers.setdefault(group, {})[("torch", key)] = lambda: den(x, t, cond)

    def time_ort(self, key: str, ort_den, group: str) -> None:
        sess = ort_den.sessions["model"]
        feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), example_feed(self.den, 2, seed=5))}
        self.timers.setdefault(group, {})[("ort", key)] = lambda: sess.run(None, feed)

    def time_loop(self, key: str, den, group: str) -> None:
        self.timers.setdefault(group, {})[("torch-loop", key)] = lambda: self.sample(den, 2)

    def finish_group(self, group: str, repeats: int) -> None:
        """Time the group's callables interleaved; speedup against the fp32 reference of the same runtime."""
        fns = self.timers.pop(group, {})
        if not fns:
            return
        print(f"[{self.name}] timing {group}: {len(fns)} callables x {repeats}", flush=True)
        med = latency_side_by_side({f"{r}|{k}": f for (r, k), f in fns.items()}, repeats=repeats, warmup=2)
        for name, sec in med.items():
            runtime, key = name.split("|", 1)
            base = med.get(f"{runtime}|fp32")
            row = self.rows.setdefault(key, {}) if key != "fp32" or runtime == "torch" else \
                self.rows.setdefault(f"fp32-{runtime}", {"group": "reference", "tool": "none", "bits": "fp32",
                                                         "runtime": runtime})
            field = "loop_ms" if runtime == "torch-loop" else "latency_ms"
            row[field] = round(sec * 1000, 3)
            row[field.replace("_ms", "_runtime")] = runtime
            if base:
                row[field.replace("_ms", "_speedup")] = round(base / sec, 3)
        self.save()

    # -- helpers -----------------------------------------------------------------------------------------------
    def export(self, den, key: str):
        folder = self.work / key
        t0 = time.perf_counter()
        res = export_onnx(den, folder, force=True)
        return OrtDenoiser(folder, threads=self.args.threads), {
            "runtime": "ort", "bytes": folder_bytes(folder), "export_seconds": round(time.perf_counter() - t0, 1),
            "export_rel_rms": res.verification.get("rel_rms_diff")}



def ort_quantize_static(src: Path, dst: Path, calib, weight_type: str = "QInt8", ops: list[str] | None = None) -> None:
    """ONNX Runtime's ``quantize_static`` of the fp32 export folder ``src`` into ``dst`` (a .onnx path): QDQ,
    per-channel ``weight_type`` weights, uint8 activations, MinMax over the points of ``calib`` (a diffpress
    CalibrationSet, fed in the export's input order), only ``ops`` when given. ORT's calibration writes files
    into the working directory: it runs in a temporary one."""
    import contextlib

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i["name"] for i in json.loads((src / "io_spec.json").read_text())["graphs"][0]["inputs"]]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib.batches(32))

        def get_next(self):
            item = next(self.it, None)
            if item is None:
                return None
            x, t, cond = item
            t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
            return {n: p.contiguous().numpy() for n, p in zip(names, [x, t, *conditions.tensors(cond)])}

    with tempfile.TemporaryDirectory(prefix="ort-quant-") as tmp, contextlib.chdir(tmp):
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src / "model.onnx"), str(pre))
        except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs; ORT documents skipping it
            quant_pre_process(str(src / "model.onnx"), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, weight_type),
                        op_types_to_quantize=ops)


# ---------------------------------------------------------------------------------------------------------------
def quant_group(b: Bench) -> None:
    from diffpress.calibration import TimestepPolicy, collect
    from diffpress.recipes.runner import _calibrate
    from diffpress.recipes.schema import load_recipe

    den = b.den
    recipes = {n: load_recipe(n) for n in ("w8a8", "w4a8", "w4a8-lowrank", "w4a4-lowrank")}
    cfg = recipes["w8a8"].calibration
    sampler, _ = resolve_sampler(den, cfg.sampler)
    t0 = time.perf_counter()
    cs, _ = _calibrate(den, cfg, sampler, None, False)
    b.notes["calibration"] = {"trajectories": cfg.samples, "steps": cfg.steps, "points": len(cs),
                              "policy": "uniform, 10 steps", "seconds": round(time.perf_counter() - t0, 1)}
    conds, _ = materialize(den, cfg.conditions, cfg.samples * 10, seed=cfg.seed)
    conds.pop("num_samples", None)
    mid = collect(den, num_samples=cfg.samples * 10, steps=STEPS, scheduler=sampler, guidance=cfg.guidance,
                  policy=TimestepPolicy("steps", steps=[STEPS // 2]), seed=cfg.seed, progress=False, **conds)
    b.notes["calibration_mid_step"] = {"trajectories": cfg.samples * 10, "points": len(mid), "step": STEPS // 2}

    # fp32 ONNX: the base of the ONNX Runtime rows (and of their latency)
    fp32_onnx = b.row("quant", "fp32-onnx", "none", "fp32", lambda: b.export(den, "fp32-onnx"), sample=False)
    if fp32_onnx is not None:
        b.time_ort("fp32", fp32_onnx, "quant")

    # -- ONNX Runtime quantize_static ---------------------------------------------------------------------------
    def ort_static(calib, weight_type: str, ops: list[str] | None = None):
        def build():
            src = b.work / "fp32-onnx"
            if not (src / "model.onnx").exists():
                b.export(den, "fp32-onnx")
            t0 = time.perf_counter()
            dst = b.work / f"ort-{id(calib)}-{weight_type}-{ops is None}"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            ort_quantize_static(src, dst / "model.onnx", calib, weight_type, ops)
            seconds = time.perf_counter() - t0 + b.rows.get("fp32-onnx", {}).get("export_seconds", 0.0)
            return OrtDenoiser(dst, threads=b.args.threads), {"runtime": "ort", "bytes": folder_bytes(dst),
                                                              "compress_seconds": round(seconds, 1)}
        return build

    linear = ["Conv", "MatMul", "Gemm"]  # what a careful user restricts it to: the layers diffpress quantizes
    for key, calib, wt, ops, bits in (("ort-static-w8a8", cs, "QInt8", None, "W8A8"),
                                      ("ort-static-w8a8-midstep", mid, "QInt8", None, "W8A8"),
                                      ("ort-static-w8a8-convmatmul", cs, "QInt8", linear, "W8A8"),
                                      ("ort-static-w4a8-convmatmul", cs, "QInt4", linear, "W4A8")):
        m = b.row("quant", key, "onnxruntime.quantization.quantize_static", bits, ort_static(calib, wt, ops))
        if m is not None:
            b.time_ort(key, m, "quant")

    def forward_loop(q, calib=cs):
        def loop(_model=None):
            with torch.no_grad():
                for x, t, cond in calib.batches(32):
                    q(x, t, cond)
        return loop

    # -- NVIDIA ModelOpt (fake quant on CPU) ---------------------------------------------------------------------
    # ModelOpt's SVDQuant ships as NVFP4 only; the same algorithm with int4 quantizers is the int peer of
    # diffpress's low-rank recipes (weights: int4 in static blocks of 64; activations: int8 per tensor, or int4 in
    # dynamic blocks of 64 as w4a4-lowrank does)
    int4_w = {"num_bits": 4, "block_sizes": {-1: 64, "type": "static"}}
    custom = {"svdquant-int4-w4a8": (int4_w, {"num_bits": 8, "axis": None}),
              "svdquant-int4-w4a4-dynamic": (int4_w, {"num_bits": 4, "block_sizes": {-1: 64, "type": "dynamic"}})}

    def modelopt_cfg(name: str):
        import modelopt.torch.quantization as mtq

        if name not in custom:
            return getattr(mtq, name.upper() + "_CFG")
        cfg = copy.deepcopy(mtq.NVFP4_SVDQUANT_DEFAULT_CFG)
        for entry in cfg["quant_cfg"]:
            role = {"*weight_quantizer": 0, "*input_quantizer": 1}.get(entry.get("quantizer_name"))
            if role is not None:
                entry["cfg"] = custom[name][role]
        return cfg

    for name, bits in (("int8_default", "W8A8"), ("int8_smoothquant", "W8A8"), ("int4_awq", "W4A16"),
                       ("w4a8_awq_beta", "W4A8 (fp8 act)"), ("nvfp4_svdquant_default", "W4A4 (nvfp4) + low rank"),
                       ("svdquant-int4-w4a8", "W4A8 + low rank"), ("svdquant-int4-w4a4-dynamic", "W4A4 + low rank")):
        def build(name=name):
            import modelopt.torch.quantization as mtq

            q = den.copy()
            mtq.quantize(q.model, modelopt_cfg(name), forward_loop(q))
            info = {"runtime": "torch", "simulated": "fake-quant (ModelOpt on CPU keeps float weights)",
                    "bytes": torch_bytes(q.model)}
            if name in custom:
                info["config"] = ("NVFP4_SVDQUANT_DEFAULT_CFG's algorithm (svdquant, rank 32) with int quantizers: "
                                  f"weights {custom[name][0]}, inputs {custom[name][1]}")
            return q, info
        m = b.row("quant", f"modelopt-{name}", "nvidia-modelopt", bits, build)
        if m is not None:
            b.time_torch(f"modelopt-{name}", m, "quant")

    # -- torchao -----------------------------------------------------------------------------------------------
    def torchao_build():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        q = den.copy()
        quantize_(q.model, Int8DynamicActivationInt8WeightConfig())
        return q, {"runtime": "torch", "bytes": torch_bytes(q.model), "macs_quantized_fraction": b.linear_share,
                   "note": "torchao quantizes nn.Linear only; convolutions and attention matmuls stay float"}
    m = b.row("quant", "torchao-int8dyn-int8w", "torchao", "W8A8 (dynamic, Linear only)", torchao_build)
    if m is not None:
        b.time_torch("torchao-int8dyn-int8w", m, "quant")

    # -- optimum-quanto ------------------------------------------------------------------------------------------
    def quanto_build(weights: str, acts: bool):
        def build():
            from optimum import quanto

            q = den.copy()
            quanto.quantize(q.model, weights=getattr(quanto, weights), activations=quanto.qint8 if acts else None)
            if acts:
                with quanto.Calibration():
                    forward_loop(q)()
            quanto.freeze(q.model)
            return q, {"runtime": "torch", "bytes": torch_bytes(q.model)}
        return build
    for key, w, a, bits in (("quanto-w8a8", "qint8", True, "W8A8"), ("quanto-w8", "qint8", False, "W8A16"),
                            ("quanto-w4", "qint4", False, "W4A16")):
        # quanto's int4 weights run ~40x slower than fp32 on this CPU: that row is measured on the first seeds only
        m = b.row("quant", key, "optimum-quanto", bits, quanto_build(w, a), samples=40 if w == "qint4" else None)
        if m is not None:
            b.time_torch(key, m, "quant")

    # -- diffpress built-in recipes ------------------------------------------------------------------------------
    bits = {"w8a8": "W8A8", "w4a8": "W4A8", "w4a8-lowrank": "W4A8 + low rank", "w4a4-lowrank": "W4A4 + low rank",
            "w8a8-vnni": "W8A8 (8-bit weights: VNNI CPUs only)", "w8a8-dynamic": "W8A8 (dynamic activations)",
            "w8a8-int8-skipped": "W8A8 (+ int8 weights in the float-kept layers)"}
    # the w8a8 recipe with the two settings that make it like-for-like with some peers: full 8-bit weights (the
    # default target 'any' keeps them on 7 bits so that AVX2-only CPUs compute the same), and per-token dynamic
    # activations (torchao's scheme; diffpress exports them as float arithmetic); they are not built-in recipes
    recipes["w8a8-vnni"] = load_recipe("w8a8", overrides=["passes.0.target=vnni"])
    recipes["w8a8-dynamic"] = load_recipe("w8a8", overrides=["passes.0.act_mode=dynamic"])
    # and the layers its skip roles keep in float (time embedding, first, last) with int8 weights: fewer bytes
    recipes["w8a8-int8-skipped"] = load_recipe("w8a8", overrides=["passes.0.skip_roles_weights=int8"])
    for name, recipe in recipes.items():
        def build(recipe=recipe, name=name):
            calib = cs if recipe.calibration == cfg else _calibrate(den, recipe.calibration, sampler, None, False)[0]
            q = den.copy()
            t0 = time.perf_counter()
            for step in recipe.passes:
                step.spec.apply(q, step.config, calib, False)
            passes = time.perf_counter() - t0
            ort_den, info = b.export(q, f"diffpress-{name}")
            info["compress_seconds"] = round(passes + info["export_seconds"], 1)
            return ort_den, info
        m = b.row("quant", f"diffpress-{name}", "diffpress", bits[name], build)
        if m is not None:
            b.time_ort(f"diffpress-{name}", m, "quant")
    b.finish_group("quant", b.args.repeats)


# ---------------------------------------------------------------------------------------------------------------
def prune_group(b: Bench) -> None:
    from prune import tp_prune

    from diffpress.compress.recover import RecoverConfig, recover
    from diffpress.recipes.runner import _calibrate
    from diffpress.recipes.schema import load_recipe

    den, budget = b.den, b.args.recover_budget
    recipe = load_recipe("prune30", overrides=[f"passes.0.recover.time_budget={budget}"])
    sampler, _ = resolve_sampler(den, recipe.calibration.sampler)
    cs, _ = _calibrate(den, recipe.calibration, sampler, None, False)
    b.notes["prune_calibration_points"] = len(cs)
    fp32_onnx = b.rows.get("fp32-onnx") and (b.work / "fp32-onnx" / "model.onnx").exists()
    if not fp32_onnx:
        b.row("prune", "fp32-onnx", "none", "fp32", lambda: b.export(den, "fp32-onnx"), sample=False)

    b.time_ort("fp32", OrtDenoiser(b.work / "fp32-onnx", threads=b.args.threads), "prune")  # the pruned exports' base
    target = recipe.passes[0].config.target

    def finish(m, info: dict, key: str):
        info["macs"] = capture(m, batch=1).macs
        info["params"] = sum(p.numel() for p in m.parameters())
        info["bytes_torch"] = torch_bytes(m.model)
        ort_den, exp = b.export(m, key)
        info.update(bytes=exp["bytes"], runtime="torch", latency_note="latency_ms: ONNX Runtime fp32 export")
        b.time_ort(key, ort_den, "prune")
        return m, info

    def diffpress_build(cut: float, key: str):
        def build():
            m = den.copy()
            config = dataclasses.replace(recipe.passes[0].config, target=cut)
            t0 = time.perf_counter()
            rep = recipe.passes[0].spec.apply(m, config, cs, False)
            info = {"compress_seconds": round(time.perf_counter() - t0, 1), "recover_budget_s": budget,
                    "macs_cut": cut, "units_removed": getattr(rep, "units_removed", None)}
            return finish(m, info, key)
        return build
    b.row("prune", "diffpress-prune30", "diffpress", f"fp32, {target:.0%} fewer MACs",
          diffpress_build(target, "diffpress-prune30"))

    cuts = []
    for imp in ("magnitude", "taylor"):
        def build(imp=imp):
            t0 = time.perf_counter()
            m, cut = tp_prune(den, target, importance=imp, calibration=cs)
            prune_s = time.perf_counter() - t0
            log = recover(m, den, cs, RecoverConfig(time_budget=budget), progress=False)
            cuts.append(cut)
            return finish(m, {"compress_seconds": round(time.perf_counter() - t0, 1), "prune_seconds": round(prune_s, 1),
                              "macs_cut": cut, "recover_budget_s": budget, "recovery_steps": log["steps"]},
                          f"torch-pruning-{imp}")
        b.row("prune", f"torch-pruning-{imp}", "torch-pruning (MetaPruner)", f"fp32, {imp} importance", build)
    # where Torch-Pruning cannot reach the target (its bisection tops out), diffpress again at the MACs it reached
    if cuts and abs(min(cuts) - target) > 0.02:
        cut = round(min(cuts), 3)
        b.row("prune", "diffpress-prune-at-tp-macs", "diffpress", f"fp32, {cut:.1%} fewer MACs",
              diffpress_build(cut, "diffpress-prune-at-tp-macs"))
    b.finish_group("prune", b.args.repeats)


# ---------------------------------------------------------------------------------------------------------------
def deepcache_helper(den, steps: int):
    """DeepCache's ``DeepCacheSDHelper`` on a diffpress Denoiser's UNet: the package's own block wrapping and
    skip rule; only its timestep lookup (``args[1].item()`` on a one-element tensor) is adapted to a batched
    timestep, matched as a float against the sampler's timesteps."""
    from types import SimpleNamespace

    from DeepCache import DeepCacheSDHelper

    from diffpress.schedulers import make_scheduler

    sched = make_scheduler(den, "auto")
    sched.set_timesteps(steps)
    stamps = [float(s) for s in sched.timesteps]

    class Helper(DeepCacheSDHelper):
        def wrap_unet_forward(self):
            self.function_dict["unet_forward"] = self.pipe.unet.forward

            def wrapped_forward(*args, **kwargs):
                t = float(torch.as_tensor(args[1]).reshape(-1)[0])
                self.cur_timestep = min(range(len(stamps)), key=lambda i: abs(stamps[i] - t))
                return self.function_dict["unet_forward"](*args, **kwargs)
            self.pipe.unet.forward = wrapped_forward

    return Helper(SimpleNamespace(unet=den.model, scheduler=sched))


def cache_group(b: Bench) -> None:
    from diffpress.compress.cache import CacheConfig, cache_

    den, interval = b.den, b.args.cache_interval
    b.time_loop("fp32", den, "cache")
    rule = den.copy()
    r = cache_(rule, CacheConfig(search="uniform", interval=interval, branch=0, steps=STEPS, guidance=b.guidance,
                                 holdout=0), progress=False)
    fraction = r.macs_fraction
    b.notes["deepcache_rule"] = {"interval": interval, "branch": 0, "macs_fraction": fraction,
                                 "units": r.schedule.units}
    # what DeepCacheSDHelper wraps: a diffusers UNet's down / mid / up blocks
    is_unet = all(hasattr(den.model, a) for a in ("down_blocks", "mid_block", "up_blocks"))
    dc_images = None
    if is_unet:
        def dc_build():
            m = den.copy()
            helper = deepcache_helper(m, STEPS)  # wraps m.model's blocks in place
            helper.set_params(cache_interval=interval, cache_branch_id=0)
            helper.enable()
            return m, {"runtime": "torch", "macs_fraction": fraction, "macs": round(b.macs * fraction),
                       "bytes": torch_bytes(den.model),
                       "note": "DeepCache package (DeepCacheSDHelper) wrapping the diffusers UNet; MAC fraction "
                               "of the equivalent diffpress rule"}
        m = b.row("cache", f"deepcache-n{interval}", "DeepCache (package)", f"fp32, full pass every {interval} steps",
                  dc_build)
        if m is not None:
            dc_images = b.sample(m, 50)
            b.time_loop(f"deepcache-n{interval}", m, "cache")
    key = f"deepcache-rule-n{interval}" + ("-reimplemented" if is_unet else "")

    def rule_build():
        info = {"runtime": "torch", "macs_fraction": fraction, "macs": round(b.macs * fraction),
                "bytes": torch_bytes(den.model),
                "note": "DeepCache's uniform rule re-implemented on diffpress's cache units (CacheConfig interval, "
                        "branch 0): " + ("the package wraps diffusers UNets (down / mid / up blocks) only" if not is_unet else
                                         "beside the package, to check the re-implementation")}
        if dc_images is not None:
            mine = b.sample(rule, 50)
            info["psnr_vs_package_db"] = metrics.psnr(dc_images, mine)
        return rule, info
    m = b.row("cache", key, "DeepCache rule (re-implemented)",
              f"fp32, full pass every {interval} steps", rule_build)
    if m is not None and not is_unet:
        b.time_loop(key, m, "cache")

    def search_build():
        m = den.copy()
        rep = cache_(m, CacheConfig(budget=fraction, search="search", steps=STEPS, guidance=b.guidance, samples=16,
                                    holdout=32, seed=1000, time_budget=b.args.cache_search), progress=False)
        return m, {"runtime": "torch", "macs_fraction": rep.macs_fraction, "macs": round(b.macs * rep.macs_fraction),
                   "bytes": torch_bytes(den.model), "search_seconds": round(rep.seconds, 1),
                   "patterns": len(rep.schedule.patterns())}
    m = b.row("cache", "diffpress-cache", "diffpress", "fp32, searched schedule", search_build)
    if m is not None:
        b.time_loop("diffpress-cache", m, "cache")
    b.finish_group("cache", max(3, b.args.repeats // 4))


# ---------------------------------------------------------------------------------------------------------------
COLUMNS = ("group", "row", "tool", "bits", "n", "PSNR dB", "SSIM", "acc", "FD", "MB", "MMACs/call", "latency ms",
           "vs fp32", "compress s")


def table(folder: Path) -> str:
    lines = []
    for path in sorted(folder.glob("peers_*.json")):
        data = json.loads(path.read_text())
        s = data["settings"]
        for model, m in data["models"].items():
            sampler = m["notes"].get("sampler", "DDIMScheduler").replace("Scheduler", "")
            lines += [f"\n**{model}** ({s['samples']} samples, {s['steps']} {sampler} steps, "
                      f"guidance {m['notes'].get('guidance', s['guidance'])}; "
                      f"{s['threads']} thread(s); CPU: {s['cpu']})\n",
                      "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            rows = dict(m["rows"])
            if "fp32-ort" in rows and "fp32-onnx" in rows:  # the fp32 export's latency, timed beside its rows
                rows["fp32-onnx"] = {**rows["fp32-onnx"], **rows.pop("fp32-ort")}
            for key, r in rows.items():
                if "error" in r:
                    lines.append(f"| {r.get('group', '')} | {key} | {r.get('tool', '')} | {r.get('bits', '')} | "
                                 f"- | error: {r['error'][:120].replace('|', '/')} |" + " |" * (len(COLUMNS) - 6))
                    continue

                def f(k, fmt):
                    v = r.get(k)
                    return format(v, fmt) if isinstance(v, (int, float)) else "-"
                lat, rt, sp = r.get("latency_ms"), r.get("latency_runtime"), r.get("latency_speedup")
                if r.get("loop_ms") is not None:
                    lat, rt, sp = r["loop_ms"], "torch loop", r.get("loop_speedup")
                lat_s = f"{lat:.1f} ({rt})" if lat is not None else "-"
                sim = " (sim)" if r.get("simulated") else ""
                lines.append(" | ".join([
                    f"| {r.get('group', '')}", key, r.get("tool", ""), r.get("bits", "") + sim, f("samples", "d"),
                    f("psnr_db", ".2f"),
                    f("ssim", ".3f"), f("cond_accuracy", ".3f"), f("fd_real", ".1f"),
                    f"{r['bytes'] / 1e6:.2f}" if r.get("bytes") else "-", f"{r['macs'] / 1e6:.1f}" if r.get("macs") else "-",
                    lat_s, f"{sp:.2f}x" if sp else "-", f("compress_seconds", ".1f")]) + " |")
    text = "\n".join(lines).strip() + "\n"
    (folder / "peers.md").write_text(text)
    return text


def main() -> None:
    from diffpress.exporters.cpu import cpu_flags

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits-cond-unet", "digits-dit"])
    parser.add_argument("--samples", type=int, default=200, help="evaluation samples (seeds 0..N-1)")
    parser.add_argument("--groups", nargs="+", default=["quant", "prune", "cache"], choices=["quant", "prune", "cache"])
    parser.add_argument("--recover-budget", type=float, default=120.0, help="recovery seconds after each pruner")
    parser.add_argument("--cache-search", type=float, default=120.0, help="diffpress cache search seconds")
    parser.add_argument("--cache-interval", type=int, default=3, help="DeepCache's N (every N-th step is full)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch and ONNX Runtime threads (all rows alike)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved latency repeats")
    parser.add_argument("--rows", nargs="+", default=None, help="only the rows whose key matches one of these globs")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="only write peers.md from the JSON files")
    args = parser.parse_args()
    if args.table:
        print(table(args.out_dir))
        return
    torch.set_num_threads(args.threads)
    clf, real_feats, skeleton = setup(samples=args.samples, threads=args.threads, cpu=cpu_flags(),
                                      recover_budget_s=args.recover_budget, cache_search_s=args.cache_search,
                                      cache_interval=args.cache_interval, groups=args.groups)
    skeleton["settings"].update(simulated="see each row's runtime / simulated field", versions=versions(),
                                command=" ".join(sys.argv), platform=platform.platform())
    for name in args.models:
        results = copy.deepcopy(skeleton)  # one JSON file per model
        b = Bench(name, args, clf, real_feats, results, args.out_dir / f"peers_{name}.json")
        try:
            for group in args.groups:
                {"quant": quant_group, "prune": prune_group, "cache": cache_group}[group](b)
        finally:
            shutil.rmtree(b.work, ignore_errors=True)
    print(table(args.out_dir))


if __name__ == "__main__":
    main()
