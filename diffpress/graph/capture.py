"""capture(): torch.export (non-strict) of a Denoiser into an fx GraphModule, and queries on it.

``torch.fx.symbolic_trace`` cannot trace diffusers models (``len()`` on proxies, data-dependent
branches); non-strict ``torch.export`` runs the Python code for real and records ATen ops, each
carrying ``nn_module_stack`` so every node knows which submodule produced it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx, nn

from diffpress.errors import DiffpressError
from diffpress.graph.macs import COMPUTE_OPS, node_macs
from diffpress.graph.roles import concat_split, is_compute, layer_roles
from diffpress.runtime import hooks


@dataclass(frozen=True)
class Layer:
    """One compute op in execution order: its module's qualified name, op kind, MACs and output shape."""

    name: str
    op: str
    module_type: str
    macs: int
    shape: tuple[int, ...]
    node: str
    roles: frozenset[str] = frozenset()
    concat_split: int | None = None  # channels of the first part when the input is a skip-concat


class Graph:
    """A captured denoiser graph: ``gm`` is the fx GraphModule, ``layers`` the compute ops in order.

    >>> import diffpress
    >>> g = capture(diffpress.load("digits-unet"))
    >>> g.layers[0].op, g.layers[0].name
    ('linear', 'model.time_embedding.linear_1')
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple):
        self.gm = gm
        self.example_inputs = example_inputs
        roles = layer_roles(gm, COMPUTE_OPS)
        self.layers: list[Layer] = [
            Layer(self.module_name(n), COMPUTE_OPS[n.target], self.module_type(n), node_macs(n),
                  tuple(n.meta["val"].shape), n.name, frozenset(roles[n.name]),
                  concat_split(n) if COMPUTE_OPS[n.target] in ("conv2d", "linear") else None)
            for n in gm.graph.nodes
            if is_compute(n, COMPUTE_OPS)
        ]

    @staticmethod
    def _stack_top(node: fx.Node) -> tuple[str, str]:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", ""
        path, mtype = list(stack.values())[-1]
        return path, mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", str(mtype))

    def module_name(self, node: fx.Node) -> str:
        """Qualified name (relative to the Denoiser) of the innermost module that produced ``node``."""
        return self._stack_top(node)[0]

    def module_type(self, node: fx.Node) -> str:
        return self._stack_top(node)[1].rsplit(".", 1)[-1]

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one call at the captured batch size."""
        return sum(layer.macs for layer in self.layers)

    @property
    def batch(self) -> int:
        return int(self.example_inputs[0].shape[0])


@contextlib.contextmanager
def _module_trail(model: nn.Module) -> Iterator[list[str]]:
    """Track which modules are mid-forward, so a capture failure can name the one that failed."""
    trail: list[str] = []

    def leave(module, args, output) -> None:  # a forward hook must return None to keep the output
        if trail:
            trail.pop()

    specs = []
    for name, mod in model.named_modules():
        specs += [(mod, "pre", lambda m, a, name=name: trail.append(name)), (mod, "post", leave)]
    with hooks(specs):
        yield trail


def capture(denoiser: nn.Module, example_inputs: tuple | None = None, batch: int = 1) -> Graph:
    """Capture ``denoiser`` with ``torch.export.export(strict=False)`` on ``example_inputs``.

    ``example_inputs`` defaults to ``denoiser.example_inputs(batch)``. A model that cannot be captured
    raises :class:`DiffpressError` naming the innermost module that was running when export failed.

    >>> import diffpress
    >>> g = capture(diffpress.load("digits-dit"))
    >>> g.macs > 0
    True
    """
    if example_inputs is None:
        example_inputs = denoiser.example_inputs(batch)
    from diffpress.denoiser import eval_mode

    with eval_mode(denoiser), _module_trail(denoiser) as trail, torch.no_grad():
        try:
            ep = torch.export.export(denoiser, tuple(example_inputs), strict=False)
        except Exception as exc:  # noqa: BLE001 - any export failure is reported with the module
            where = (trail[-1] if trail else "") or "<top level>"
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DiffpressError(
                f"torch.export could not capture the model: it failed inside module {where!r} "
                f"({type(exc).__name__}: {first}). Check that the example inputs have the shapes the model "
                "expects; if they do, that module's forward likely branches on tensor values "
                "(data-dependent Python control flow), which export cannot trace") from exc
    return Graph(ep.module(), tuple(example_inputs))
