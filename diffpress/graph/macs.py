"""Multiply-accumulate counts of compute ops on a captured ATen graph, from the shapes export recorded."""
from __future__ import annotations

import math

import torch
from torch import fx

aten = torch.ops.aten

COMPUTE_OPS = {
    aten.conv2d.default: "conv2d",
    aten.conv2d.padding: "conv2d",  # padding="same" / "valid"
    aten.conv1d.default: "conv1d",
    aten.conv1d.padding: "conv1d",
    aten.conv_transpose2d.input: "conv_transpose2d",
    aten.linear.default: "linear",
    aten.matmul.default: "matmul",
    aten.mm.default: "matmul",
    aten.bmm.default: "matmul",
    aten.addmm.default: "matmul",
    aten.baddbmm.default: "matmul",
    aten.einsum.default: "einsum",
    aten.scaled_dot_product_attention.default: "attention",
}


def _shape(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.meta["val"].shape)


def node_macs(node: fx.Node) -> int:
    """MACs of one compute node (0 for ops that only move data, such as a one-operand einsum)."""
    op = COMPUTE_OPS[node.target]
    out = _shape(node)
    a = node.args
    if op in ("conv2d", "conv1d"):
        w = _shape(a[1])  # (Cout, Cin/groups, *kernel)
        return math.prod(out) * math.prod(w[1:])
    if op == "conv_transpose2d":
        w = _shape(a[1])  # (Cin, Cout/groups, kh, kw)
        return math.prod(_shape(a[0])) * math.prod(w[1:])
    if op == "linear":
        return math.prod(out) * _shape(a[1])[1]
    if op == "matmul":
        lhs = a[1] if node.target in (aten.addmm.default, aten.baddbmm.default) else a[0]
        return math.prod(out) * _shape(lhs)[-1]
    if op == "attention":
        q, k, v = (_shape(x) for x in a[:3])
        # QK^T: (..., L, S) x D, then PV: (..., L, Dv) x S
        lead = math.prod(q[:-2])
        return lead * q[-2] * k[-2] * (q[-1] + v[-1])
    if op == "einsum":
        equation, operands = a[0], a[1]
        if len(operands) < 2:
            return 0
        sizes: dict[str, int] = {}
        ellipsis: list[int] = []  # broadcast shape of the "..." dimensions
        for term, x in zip(equation.replace(" ", "").split("->")[0].split(","), operands):
            shape = _shape(x)
            named = term.replace("...", "")
            if "..." in term:
                head = term.index("...")
                rest = shape[head:len(shape) - (len(named) - head)]
                ellipsis = [max(p, q) for p, q in zip([1] * (len(rest) - len(ellipsis)) + ellipsis, rest)] \
                    if len(rest) >= len(ellipsis) else ellipsis
                shape = shape[:head] + shape[len(shape) - (len(named) - head):]
            for letter, size in zip(named, shape):
                sizes[letter] = max(sizes.get(letter, 1), size)
        return math.prod(sizes.values()) * math.prod(ellipsis)
    return 0
