"""The ``diffpress`` command: compress denoisers with recipes; inspect, sample, evaluate and export them.

MODEL is a zoo name (digits-unet, digits-cond-unet, digits-dit) or a local folder: a diffusers model
folder (config.json + .safetensors) or a pipeline folder (model_index.json). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from diffpress.errors import DiffpressError

EPILOG = """examples:
  diffpress run w8a8                                  # the default model -> diffpress-out/w8a8-digits-cond-unet
  diffpress run w4a8 --model ./my-pipeline --set passes.0.group_size=32 --out w4a8-run
  diffpress recipes                                   # the built-in recipes
  diffpress inspect                                   # the default model, digits-cond-unet
  diffpress sample digits-dit --out dit.png --guidance 4
  diffpress eval digits-cond-unet ./my-compressed-unet --out eval/
  diffpress export diffpress-out/w8a8-digits-cond-unet --format executorch --out w8a8-pte   # phones: XNNPACK
  torchrun --standalone --nproc_per_node 2 -m diffpress.cli run w8a8     # calibration shared by 2 processes
"""


class _Parser(argparse.ArgumentParser):
    """Argument errors in the one form every diffpress error takes: ``diffpress: error: ...``, exit code 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"diffpress: error: {message} (see: {self.prog} --help)\n")


def _at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


_positive, _count = _at_least(1), _at_least(0)


def _add_model(p: argparse.ArgumentParser) -> None:
    from diffpress.zoo import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"zoo name or local model/pipeline folder (default: {DEFAULT_MODEL})")


def _add_sampling(p: argparse.ArgumentParser, steps: int = 50) -> None:
    from diffpress.schedulers import SCHEDULERS

    p.add_argument("--steps", type=_positive, default=steps, help=f"sampling steps (default: {steps})")
    p.add_argument("--scheduler", default="auto", choices=["auto", *SCHEDULERS, "model"],
                   help="diffusers scheduler; 'model': the one the checkpoint shipped with; 'auto' (default): that "
                        "one unless it is a DDPM training schedule or missing, then DDIM (flow-euler for "
                        "flow-matching models)")
    p.add_argument("--conditions", type=Path, default=None, metavar="FILE",
                   help="text-conditioned models: a safetensors file of embeddings, one tensor per conditioning "
                        "input (rows reused in turn)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 3.0 for conditional models, else 1)")
    p.add_argument("--seed", type=_count, default=0, help="sample i uses seed SEED+i (default: 0)")


def _scheduler(name: str) -> str | None:
    return None if name == "model" else name


def cmd_inspect(args: argparse.Namespace) -> None:
    from diffpress.loading import load, resolve_source

    resolve_source(args.model)  # a wrong path answers before torch is imported
    from diffpress.eval import cost
    from diffpress.graph import capture

    den = load(args.model)
    graph = capture(den)
    info = {
        "model": str(args.model),
        "architecture": type(den.model).__name__,
        "kind": den.kind,
        "prediction_type": den.prediction_type,
        "sample_shape": list(den.sample_shape),
        "conditioning": den.cond_kind,
        "cond_inputs": {name: list(part.shape) for name, part in den.parts.items()},
        "num_classes": den.num_classes,
        "guidance": den.supports_guidance,
        "scheduler": (den.scheduler_config or {}).get("_class_name"),
        "params": cost.parameter_count(den),
        "bytes": cost.bytes_on_disk(den),
        "macs_per_call": graph.macs,
        "layers": [{"name": l.name, "op": l.op, "macs": l.macs, "shape": list(l.shape)} for l in graph.layers],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['model']}: {info['architecture']} ({den.kind})")
    print(f"  prediction     {den.prediction_type}")
    print(f"  sample shape   {tuple(den.sample_shape)}")
    shapes = ", ".join(f"{name} {tuple(part.shape)}" for name, part in den.parts.items() if part.shape)
    cond = den.cond_kind + (f": {shapes}" if shapes else "")
    cond += f", {den.num_classes} classes" if den.num_classes else ""
    cond += ", label conditioner" if den.conditioner is not None else ""
    print(f"  conditioning   {cond}{' (classifier-free guidance)' if den.supports_guidance else ''}")
    print(f"  scheduler      {info['scheduler'] or 'none shipped'}")
    print(f"  parameters     {info['params']:,}")
    print(f"  bytes (fp32)   {info['bytes']:,}")
    print(f"  MACs per call  {info['macs_per_call']:,} (batch 1, counted on the captured graph)")
    print(f"\n  {'#':>3}  {'layer':<58} {'op':<10} {'MACs':>14}  output")
    for i, l in enumerate(graph.layers):
        print(f"  {i:>3}  {l.name:<58} {l.op:<10} {l.macs:>14,}  {tuple(l.shape)}")


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DiffpressError(f"--labels takes comma-separated integers, got {text!r}") from None


def cmd_sample(args: argparse.Namespace) -> None:
    from diffpress._io import check_writable
    from diffpress.loading import load, resolve_source

    check_writable(args.out, args.force)
    labels = _parse_labels(args.labels)  # bad flags and paths fail before torch is imported
    exported = (Path(args.model) / "io_spec.json").is_file()
    if not exported:
        resolve_source(args.model)
    from diffpress.eval.grid import save_grid
    from diffpress.sampling import sample

    if exported:  # an ONNX export folder: the network runs in ONNX Runtime (diffpress.deploy)
        from diffpress.deploy import OrtDenoiser

        den = OrtDenoiser(args.model, threads=args.threads)
        if args.conditions is not None:
            raise DiffpressError("--conditions needs a PyTorch model; for an export folder pass the states from Python: "
                                 "diffpress.deploy.sample(folder, cond=...)")
    else:
        den = load(args.model)
    kw: dict = {}
    if den.cond_kind != "none" and args.conditions is not None:
        if labels is not None:
            raise DiffpressError("give --labels or --conditions, not both")
        from diffpress.conditions import load_file

        kw["cond"] = load_file(den, args.conditions, args.num)
    elif den.cond_kind != "none":
        if labels is None:
            if den.num_classes is None:
                raise DiffpressError("this model is conditioned on hidden states; give --conditions "
                                     "EMBEDDINGS.safetensors (or sample from Python with diffpress.sample(den, cond=...))")
            labels = [i % den.num_classes for i in range(args.num)]
        kw["labels"] = labels
    else:
        if labels is not None:
            raise DiffpressError("this model is unconditional; drop --labels")
        kw["num_samples"] = args.num
    guidance = args.guidance if args.guidance is not None else den.default_guidance
    out = sample(den, steps=args.steps, scheduler=_scheduler(args.scheduler), guidance=guidance,
                 seed=args.seed, **kw)
    rows = [("" if i else "samples", out.images[i:i + args.columns]) for i in range(0, len(out.images), args.columns)]
    save_grid(rows, args.out, force=args.force)
    print(f"wrote {args.out} ({len(out.images)} samples, {args.steps} steps, guidance {guidance})")


def cmd_eval(args: argparse.Namespace) -> None:
    from diffpress._io import check_writable
    from diffpress.loading import load, resolve_source

    check_writable(args.out, args.force)
    resolve_source(args.reference), resolve_source(args.candidate)
    from diffpress.eval import evaluate

    ref, cand = load(args.reference), load(args.candidate)
    if ref.sample_shape != cand.sample_shape or ref.cond_kind != cand.cond_kind:
        raise DiffpressError(
            f"the models do not take the same inputs: {args.reference} {ref.sample_shape}/{ref.cond_kind} vs "
            f"{args.candidate} {cand.sample_shape}/{cand.cond_kind}")
    cond = None
    if args.conditions is not None and ref.cond_kind != "none":
        from diffpress.conditions import load_file

        cond = load_file(ref, args.conditions, args.samples)
    report = evaluate(ref, cand, num_samples=args.samples, steps=args.steps, scheduler=_scheduler(args.scheduler),
                      guidance=args.guidance, seed=args.seed, names=(str(args.reference), str(args.candidate)),
                      cond=cond)
    if not report["fidelity"]["candidate_finite"]:
        raise DiffpressError(f"the samples of {args.candidate} contain NaN or inf (the model diverged, or its weights "
                             f"are broken); {args.out} was not written")
    report.save(args.out, force=args.force)
    print(report.to_markdown())
    print(f"wrote {args.out}/report.json, report.md, grid.png")


def cmd_run(args: argparse.Namespace) -> None:
    from diffpress._io import check_writable
    from diffpress.loading import resolve_source

    if args.model is not None:
        resolve_source(args.model)  # a wrong path answers before torch is imported
    if args.out is not None:
        check_writable(args.out, args.force)
    if args.conditions is not None and not args.conditions.is_file():
        raise DiffpressError(f"--conditions: no file at {args.conditions}; give a safetensors file of embeddings")
    if args.prompts is not None and not args.prompts.is_file():
        raise DiffpressError(f"--prompts: no file at {args.prompts}; give a text file, one prompt per line")
    if args.prompts is not None and args.conditions is not None:
        raise DiffpressError("give --conditions or --prompts, not both")
    if args.prompts is not None and not (args.model is not None and (Path(args.model) / "model_index.json").is_file()):
        raise DiffpressError("--prompts: --model must be a diffusers pipeline folder (model_index.json with its text "
                             "encoders), whose text encoders encode the prompts")
    from diffpress.recipes.schema import load_recipe

    sets = list(args.set)
    if args.conditions is not None:  # the same file for calibration and evaluation, before the user's --set
        sets[:0] = [f"{section}.conditions={{kind: file, path: {json.dumps(str(args.conditions))}}}"
                    for section in ("calibration", "evaluation")]
    if args.prompts is not None:
        sets[:0] = [f"{section}.conditions={{kind: prompts, path: {json.dumps(str(args.prompts))}, "
                    f"pipeline: {json.dumps(str(args.model))}}}" for section in ("calibration", "evaluation")]
    recipe = load_recipe(args.recipe, sets)  # a bad recipe fails before the model is loaded
    from diffpress.recipes.runner import default_out, run_recipe

    out = args.out if args.out is not None else default_out(recipe.name, args.model)
    _quiet_exporters()
    import diffpress.distributed as distributed

    distributed.init()  # under torchrun: one process group; every rank calibrates, rank 0 writes
    try:
        result = run_recipe(recipe, args.model, out, calibration=args.calibration, force=args.force,
                            progress=not args.no_progress)
    finally:
        distributed.finish()
    if result is not None:
        print(result.summary())


def _quiet_exporters() -> None:
    """Keep the exporters' log lines (torch.onnx registry notes, ORT graph-serialisation warnings) off the terminal."""
    import logging

    import onnxruntime

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)


def _run_folder_model(path: str) -> str:
    """A run's output folder stands for the compressed model inside it."""
    p = Path(path)
    return str(p / "model") if (p / "recipe.yaml").is_file() and (p / "model").is_dir() else path


def cmd_export(args: argparse.Namespace) -> None:
    from diffpress._io import check_writable
    from diffpress.loading import load, resolve_source

    check_writable(args.out, args.force)
    source = resolve_source(_run_folder_model(args.model))
    if args.format != "onnx" and args.opset != 21:
        raise DiffpressError(f"--opset applies to ONNX only; drop it for --format {args.format}")
    if args.format == "onnx":
        from diffpress.exporters.onnx import check_opset

        check_opset(args.opset)  # before the model loads
    if args.format == "executorch":
        from diffpress.exporters.executorch import _require

        _require()  # the optional extra, before the model loads
    den = load(source)
    _quiet_exporters()
    if args.format == "onnx":
        from diffpress.exporters import export_onnx

        res = export_onnx(den, args.out, opset=args.opset, batch=args.batch, force=args.force)
        worst = max(c["rel_rms_diff"] for c in res.verification["checks"])
        check = f"ONNX Runtime vs PyTorch: rel. RMS diff {worst:.2g} (limit {res.verification['rtol']:g})"
    elif args.format == "executorch":
        from diffpress.exporters.executorch import export_executorch

        spec = export_executorch(den, args.out, batch=args.batch, force=args.force)
        d = spec["delegation"][spec["methods"][0]]
        check = (f"ExecuTorch runtime vs PyTorch: rel. RMS diff {spec['verification']['rel_rms_diff']:.2g} (limit "
                 f"{spec['verification']['rtol']:g}); methods {', '.join(spec['methods'])}; XNNPACK runs "
                 f"{d['delegated_nodes']} of {d['delegated_nodes'] + d['not_delegated_nodes']} nodes "
                 f"({d['int8_layers']} linears / convolutions on int8 kernels), lowering {spec['lowering_seconds']:.0f} s")
    else:
        from diffpress.exporters import export_torchscript
        from diffpress.exporters.torchscript import DEPRECATION

        print(f"note: {DEPRECATION}", file=sys.stderr)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            spec = export_torchscript(den, args.out, batch=args.batch, force=args.force)
        check = f"reloaded TorchScript vs PyTorch: rel. RMS diff {spec['verification']['rel_rms_diff']:.2g}"
    print(f"wrote {args.out} ({args.format}, {'compressed' if den.compression else 'uncompressed'} model); {check}")


def cmd_recipes(args: argparse.Namespace) -> None:
    from diffpress.recipes.schema import builtin_recipes, dump_recipe, load_recipe

    if args.recipe is not None:
        print(dump_recipe(load_recipe(args.recipe, args.set)), end="")
        return
    names = list(builtin_recipes())
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {load_recipe(name).description}")
    print("\nshow one resolved (every default filled in): diffpress recipes NAME; run one: diffpress run NAME")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diffpress", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from diffpress._version import __version__

    parser.add_argument("--version", action="version", version=f"diffpress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="compress a model with a recipe: calibrate, compress, evaluate, export",
                       description="Run RECIPE on a model: calibrate, apply the passes, evaluate against the "
                                   "uncompressed model on the same seeds, export, and write --out atomically: model/ "
                                   "(reloadable with diffpress.load), recipe.yaml (resolved), one folder per export, "
                                   "report.json, report.md and grid.png. Ctrl-C or an error leaves nothing behind. "
                                   "Under `torchrun --nproc_per_node N -m diffpress.cli run ...` the processes share "
                                   "the calibration (trajectories and activation statistics); rank 0 evaluates and "
                                   "writes, and the result is bit-identical to one process's.")
    p.add_argument("recipe", help="a built-in recipe name (see: diffpress recipes) or a recipe YAML file")
    p.add_argument("--model", default=None,
                   help="zoo name or local model/pipeline folder (default: digits-cond-unet)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: diffpress-out/RECIPE-MODEL in the current folder)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set passes.0.weights=int4 (repeatable; values are YAML)")
    p.add_argument("--calibration", type=Path, default=None, metavar="PATH",
                   help="calibration file: reused if it exists (it must fit the model and the recipe), "
                        "else collected and saved there")
    p.add_argument("--conditions", type=Path, default=None, metavar="FILE",
                   help="a safetensors file of conditioning embeddings (one tensor per model input, e.g. "
                        "encoder_hidden_states, pooled_projections), used for calibration and evaluation; without it "
                        "class models use labels 0..N-1 and text models random states (see --set "
                        "calibration.conditions.kind=null|random)")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="a text file, one prompt per line, encoded by the text encoders of the --model pipeline "
                        "folder, for calibration and evaluation (needs pip install 'diffpress[prompts]')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage messages")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="export a (compressed) model to ONNX, ExecuTorch or TorchScript",
                       description="Export MODEL (a run's output folder, a model/pipeline folder or a zoo name) "
                                   "and check the artifact against PyTorch: onnx (Q/DQ, ONNX Runtime), executorch "
                                   "(.pte for phones and edge devices, XNNPACK backend; pip install "
                                   "'diffpress[executorch]'; lowering takes minutes for a UNet), torchscript "
                                   "(deprecated upstream; ExecuTorch is its successor on mobile).")
    p.add_argument("model", help="a `diffpress run` output folder, a model/pipeline folder or a zoo name")
    p.add_argument("--format", required=True, choices=["onnx", "executorch", "torchscript"])
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (default: 21)")
    p.add_argument("--batch", type=_positive, default=2,
                   help="example batch traced (ONNX keeps the batch dynamic; ExecuTorch and TorchScript fix it) "
                        "(default: 2)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recipes", help="list the built-in recipes, or print one resolved",
                       description="Without RECIPE: the built-in recipes and what they do. With RECIPE (a name or a "
                                   "YAML file): the resolved recipe, every default filled in.")
    p.add_argument("recipe", nargs="?", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value (repeatable)")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("inspect", help="architecture, parameters, MACs, layer table, conditioning",
                       description="Load MODEL, capture its graph with torch.export and print what it is.")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("sample", help="generate samples into a PNG grid (PyTorch, or an ONNX export in ONNX Runtime)",
                       description="Sample MODEL with a diffusers scheduler and write a PNG grid. MODEL may be an ONNX "
                                   "export folder (diffpress export --format onnx, or a run's onnx/ folder): the whole "
                                   "loop then runs the exported graphs in ONNX Runtime, cached steps included "
                                   "(diffpress.deploy), with the same seeds and scheduler as PyTorch.")
    _add_model(p)
    p.add_argument("--threads", type=_count, default=0,
                   help="ONNX Runtime threads for an export folder (default: 0, its own choice)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--num", type=_positive, default=20, help="number of samples (default: 20)")
    p.add_argument("--labels", default=None, help="comma-separated class labels, e.g. 3,3,7 (default: 0..9 repeated)")
    p.add_argument("--columns", type=_positive, default=10, help="images per grid row (default: 10)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    _add_sampling(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="measure a candidate denoiser against its reference",
                       description="Sample REFERENCE and CANDIDATE with the same sampler and seeds; write "
                                   "report.json, report.md and grid.png (reference / candidate / difference).")
    p.add_argument("reference", help="zoo name or folder of the uncompressed model")
    p.add_argument("candidate", help="zoo name or folder of the model to measure")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--samples", type=_positive, default=500, help="samples per model (default: 500)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    _add_sampling(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        args.func(args)
    except DiffpressError as exc:
        print(f"diffpress: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (full disk, permissions): no traceback, say what failed
        print(f"diffpress: error: {exc.strerror or exc}: {exc.filename or ''}; nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # outputs are written atomically; a collected calibration set is kept (--calibration, or beside the
        # output for `run` to resume from; the runner names it)
        print("diffpress: interrupted; the output folder was not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
