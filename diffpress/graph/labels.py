"""Channel labels over a captured ATen graph: the op rules behind :mod:`diffpress.graph.deps`.

Every index of every dimension of every tensor gets an integer label. Each op the walk knows ties labels
together (equal), states that one label is the pair of others (a product: reshapes, GroupNorm groups) or pins
labels that must stay; an op it does not know pins everything it touches and is listed.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import fx

from diffpress.errors import DiffpressError
from diffpress.graph.capture import Graph
from diffpress.graph.macs import COMPUTE_OPS, node_macs

aten = torch.ops.aten

# ops whose output has the labels of their (first) input, dimension for dimension
_SAME = {
    "silu", "gelu", "relu", "sigmoid", "tanh", "exp", "log", "neg", "abs", "sqrt", "rsqrt", "sin", "cos", "erf",
    "clone", "contiguous", "to", "_to_copy", "dropout", "alias", "detach", "lift_fresh_copy", "clamp", "hardtanh",
    "leaky_relu", "softplus", "mish", "hardswish", "hardsigmoid", "elu", "square", "reciprocal", "sign",
    "floor", "ceil", "round", "type_as", "float", "bfloat16", "half", "gelu_", "silu_", "relu_", "fill",
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "log1p", "expm1", "sinh",
    "cosh", "atan", "nan_to_num",
}
# elementwise ops with several tensor operands (broadcast from the right)
_BROADCAST = {"add", "sub", "mul", "div", "where", "maximum", "minimum", "pow", "addcmul", "addcdiv", "lerp",
              "true_divide", "rsub", "eq", "ne", "lt", "gt", "le", "ge", "logical_and", "logical_or", "masked_fill",
              "bitwise_and", "bitwise_or", "copy", "fmod", "remainder", "atan2", "hypot"}
# ops that make a tensor from nothing the graph can shrink (all of its labels pinned)
_SOURCES = {"arange", "zeros", "ones", "full", "empty", "rand", "randn", "scalar_tensor", "tensor", "linspace",
            "randint", "eye", "empty_strided", "new_zeros", "new_ones", "new_full", "new_empty"}
_IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_constrain_range_for_size",
            "_assert_async", "sym_numel", "sym_stride", "sym_storage_offset"}
_UPSAMPLE = {"upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_nearest1d",
             "upsample_linear1d", "_upsample_nearest_exact2d", "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d",
             "avg_pool1d", "max_pool1d", "adaptive_avg_pool1d"}


class Labels:
    """Union-find over integer labels, filled in bulk and resolved once."""

    def __init__(self):
        self.count = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.pins: list[np.ndarray] = []
        self.relations: list[tuple[np.ndarray, np.ndarray, str]] = []  # (atoms, factors (N, k), kind)

    def fresh(self, n: int) -> np.ndarray:
        self.count += n
        return np.arange(self.count - n, self.count, dtype=np.int64)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise ValueError(f"cannot unite {len(a)} with {len(b)} labels")
        self.edges.append((a, b))

    def pin(self, a: np.ndarray) -> None:
        self.pins.append(a)

    def resolve(self) -> np.ndarray:
        """The class (smallest label) of every label: connected components of the equality edges."""
        parent = np.arange(self.count, dtype=np.int64)
        if not self.edges:
            return parent
        a = np.concatenate([e[0] for e in self.edges])
        b = np.concatenate([e[1] for e in self.edges])
        while True:  # min-label propagation with pointer jumping
            low = np.minimum(parent[a], parent[b])
            before = parent.copy()
            np.minimum.at(parent, a, low)
            np.minimum.at(parent, b, low)
            while True:
                jumped = parent[parent]
                if np.array_equal(jumped, parent):
                    break
                parent = jumped
            if np.array_equal(parent, before):
                return parent


def _name(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__.rstrip("_") if packet.__name__.endswith("_") and packet.__name__ != "__" \
            else packet.__name__
    return getattr(target, "__name__", str(target))


def _shape(value) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


class Builder:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.lab = Labels()
        self.labels: dict[str, object] = {}  # node name -> list of label arrays per dim (or a tuple of such)
        self.params: dict[str, list[np.ndarray]] = {}
        self.unknown: list[str] = []
        self.attention_heads: list[np.ndarray] = []  # head labels of attention ops (their q's)
        self.compute: list[tuple[fx.Node, list[np.ndarray], float]] = []  # node, dims that scale MACs, MACs

    # -- helpers --
    def fresh_for(self, shape: tuple[int, ...], pin: bool = False) -> list[np.ndarray]:
        out = [self.lab.fresh(s) for s in shape]
        if pin:
            for a in out:
                self.lab.pin(a)
        return out

    def of(self, arg) -> list[np.ndarray] | None:
        if isinstance(arg, fx.Node):
            got = self.labels.get(arg.name)
            if isinstance(got, list):
                return got
        return None

    def pin_all(self, value) -> None:
        if isinstance(value, list) and all(isinstance(a, np.ndarray) for a in value):
            for a in value:
                self.lab.pin(a)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.pin_all(v)

    def pin_node_inputs(self, node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            self.pin_all(self.labels.get(arg.name))

    def unknown_op(self, node: fx.Node) -> None:
        self.unknown.append(f"{node.name} ({node.target})")
        self.pin_node_inputs(node)
        self.labels[node.name] = self.fallback(node.meta.get("val"))

    def fallback(self, val):
        if isinstance(val, torch.Tensor):
            return self.fresh_for(_shape(val), pin=True)
        if isinstance(val, (list, tuple)):
            return tuple(self.fallback(v) for v in val)
        return None

    # -- the walk --
    def build(self) -> None:
        gm = self.graph.gm
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if node.op == "placeholder":
                self.labels[node.name] = self.fallback(val)
            elif node.op == "get_attr":
                t = _attr(gm, node.target)
                if isinstance(t, torch.Tensor):
                    # a parameter the graph never reads (a module used outside the denoiser's forward) stays whole
                    self.labels[node.name] = self.params[node.target] = self.fresh_for(tuple(t.shape),
                                                                                       pin=not node.users)
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    self.pin_all(self.labels.get(arg.name))
            elif node.op == "call_function":
                try:
                    self.call(node, _name(node), val)
                except (ValueError, IndexError, TypeError) as exc:
                    raise DiffpressError(f"dependency groups: cannot follow channels through node {node.name!r} "
                                         f"({node.target}): {exc}") from exc
            elif node.op == "call_module" and str(node.target).startswith("_guards"):
                continue  # export's shape guards: no tensor flows through them
            else:
                self.unknown_op(node)

    def call(self, node: fx.Node, op: str, val) -> None:
        a = node.args
        if op in _IGNORED:
            return
        if op == "getitem":
            src = self.labels.get(a[0].name)
            self.labels[node.name] = src[a[1]] if isinstance(src, tuple) else self.fallback(val)
            return
        if op in _SOURCES or not node.all_input_nodes:
            self.labels[node.name] = self.fallback(val)
            return
        x = self.of(a[0]) if a else None
        shape = _shape(val)
        if op in _SAME and x is not None and shape is not None and len(x) == len(shape):
            self.labels[node.name] = list(x)
        elif op in _BROADCAST and shape is not None:
            self.labels[node.name] = self.broadcast(node, shape)
        elif op in ("linear",):
            self.linear(node, x, shape)
        elif op in ("conv2d", "conv1d", "convolution", "conv_transpose2d", "conv_transpose1d"):
            self.conv(node, op, x, shape)
        elif op in ("group_norm", "native_group_norm"):
            self.group_norm(node, op, x, val)
        elif op in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"):
            self.layer_norm(node, op, x, val)
        elif op in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
            dim = a[1] % len(x)
            self.lab.pin(x[dim])
            self.labels[node.name] = list(x)
        elif op in ("mean", "sum", "amax", "amin", "var", "std", "var_mean", "norm", "linalg_vector_norm",
                    "max", "min", "prod", "logsumexp", "argmax", "argmin", "std_mean"):
            self.reduction(node, x, val)
        elif op == "scaled_dot_product_attention":
            self.attention(node, shape)
        elif op in ("matmul", "bmm", "mm", "addmm", "baddbmm"):
            self.matmul(node, op, shape)
        elif op == "einsum":
            self.einsum(node, shape)
        elif op in ("transpose", "permute", "t", "numpy_T"):
            self.permute(node, op, x)
        elif op in ("unsqueeze", "squeeze", "view", "reshape", "_unsafe_view", "flatten", "unflatten", "expand",
                    "view_as", "reshape_as", "expand_as"):
            self.reshape(node, op, x, shape)
        elif op == "cat":
            self.cat(node, shape)
        elif op == "stack":
            self.stack(node, shape)
        elif op in ("slice", "narrow"):
            self.slice(node, op, x, shape)
        elif op in ("select", "index_select"):
            self.select(node, op, x, shape)
        elif op in ("chunk", "split", "split_with_sizes", "unbind", "tensor_split"):
            self.split(node, op, x, val)
        elif op in _UPSAMPLE and x is not None and shape is not None:
            out = list(x[:2]) + self.fresh_for(shape[2:], pin=True)  # (N, C, spatial): channels pass through
            for d in x[2:]:
                self.lab.pin(d)
            self.labels[node.name] = out
        elif op in ("constant_pad_nd", "pad", "reflection_pad2d", "replicate_pad2d"):
            pads = list(a[1])
            padded = {len(x) - 1 - i // 2 for i, p in enumerate(pads) if p}
            out = [self.fresh_for((shape[d],), pin=True)[0] if d in padded else x[d] for d in range(len(shape))]
            for d in padded:
                self.lab.pin(x[d])
            self.labels[node.name] = out
        elif op == "embedding":
            w, idx = self.of(a[0]), self.of(a[1])
            self.lab.pin(w[0])
            self.labels[node.name] = (list(idx) if idx is not None else self.fresh_for(shape[:-1], pin=True)) + [w[1]]
        else:
            self.unknown_op(node)

    def broadcast(self, node: fx.Node, shape: tuple[int, ...]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(shape)
        for arg in node.args:
            lab = self.of(arg)
            if lab is None:
                continue
            offset = len(shape) - len(lab)
            for i, arr in enumerate(lab):
                d = offset + i
                if len(arr) != shape[d]:
                    self.lab.pin(arr)  # broadcast from size 1: a single index that cannot go
                    continue
                if out[d] is None:
                    out[d] = arr
                else:
                    self.lab.unite(out[d], arr)
        return [o if o is not None else self.fresh_for((shape[d],), pin=True)[0] for d, o in enumerate(out)]

    def linear(self, node: fx.Node, x, shape) -> None:
        w = self.of(node.args[1])
        b = self.of(node.args[2]) if len(node.args) > 2 else None
        self.lab.unite(x[-1], w[1])
        if b is not None:
            self.lab.unite(b[0], w[0])
        self.labels[node.name] = list(x[:-1]) + [w[0]]
        self.compute.append((node, [*x[:-1], w[0], w[1]], node_macs(node)))

    def conv(self, node: fx.Node, op: str, x, shape) -> None:
        a = node.args
        w = self.of(a[1])
        b = self.of(a[2]) if len(a) > 2 else None
        transposed = op.startswith("conv_transpose") or (op == "convolution" and a[6])
        # aten.convolution carries groups at 8; conv2d / conv1d / conv_transpose2d at 6
        groups = a[8] if op == "convolution" else (a[6] if len(a) > 6 else 1)
        cin, cout = (w[0], w[1]) if transposed else (w[1], w[0])
        out = [x[0], cout] + self.fresh_for(shape[2:], pin=True)
        for d in x[2:]:
            self.lab.pin(d)
        for d in w[2:]:
            self.lab.pin(d)
        if groups == 1:
            self.lab.unite(x[1], cin)
        elif not transposed and len(w[1]) == 1 and len(w[0]) == len(x[1]):  # depthwise: channel c reads channel c
            self.lab.unite(x[1], w[0])
            self.lab.pin(w[1])
        else:
            for d in (x[1], w[0], w[1]):
                self.lab.pin(d)
        if b is not None:
            self.lab.unite(b[0], cout)
        self.labels[node.name] = out
        self.compute.append((node, [x[0], cout, cin], node_macs(node) if node.target in COMPUTE_OPS else 0.0))

    def group_norm(self, node: fx.Node, op: str, x, val) -> None:
        a = node.args
        if op == "group_norm":
            groups, weight, bias = a[1], a[2] if len(a) > 2 else None, a[3] if len(a) > 3 else None
        else:
            weight, bias, groups = a[1], a[2], a[6]
        c = x[1]
        size = len(c) // groups
        gid, pos = self.lab.fresh(groups), self.lab.fresh(size)
        self.lab.pin(pos)  # a position inside a group: removing it from every group changes the statistics
        factors = np.stack([np.repeat(gid, size), np.tile(pos, groups)], axis=1)
        self.lab.relations.append((c, factors, "groups"))
        for p in (weight, bias):
            lab = self.of(p)
            if lab is not None:
                self.lab.unite(lab[0], c)
        for d in x[2:]:
            self.lab.pin(d)
        out = list(x)
        self.labels[node.name] = out if op == "group_norm" else (out, *self.fallback(tuple(val[1:])))

    def layer_norm(self, node: fx.Node, op: str, x, val) -> None:
        a = node.args
        n = len(a[1]) if isinstance(a[1], (list, tuple)) else 1
        for d in x[len(x) - n:]:
            self.lab.pin(d)
        for p in a[2:4]:
            lab = self.of(p)
            if lab is not None:
                for i, arr in enumerate(lab):
                    self.lab.unite(arr, x[len(x) - len(lab) + i])
        out = list(x)
        self.labels[node.name] = out if op in ("layer_norm", "rms_norm") else (out, *self.fallback(tuple(val[1:])))

    def reduction(self, node: fx.Node, x, val) -> None:
        a, kw = node.args, node.kwargs
        dims = a[1] if len(a) > 1 else kw.get("dim")
        keep = (a[2] if len(a) > 2 and isinstance(a[2], bool) else kw.get("keepdim", False))
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(len(x)))
        dims = {d % len(x) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        for d in dims:
            self.lab.pin(x[d])
        out = [x[d] if d not in dims else (self.fresh_for((1,), pin=True)[0] if keep else None)
               for d in range(len(x))]
        out = [o for o in out if o is not None]
        if isinstance(val, (list, tuple)):
            self.labels[node.name] = tuple(list(out) for _ in val)
        else:
            self.labels[node.name] = out

    def attention(self, node: fx.Node, shape) -> None:
        a, kw = node.args, node.kwargs
        q, k, v = (self.of(x) for x in a[:3])
        mask = self.of(a[3]) if len(a) > 3 else self.of(kw.get("attn_mask"))
        scale = a[6] if len(a) > 6 else kw.get("scale")
        lead = len(q) - 2
        for other in (k, v):
            for i in range(lead):
                j = len(other) - len(q) + i
                if j >= 0 and len(other[j]) == len(q[i]):
                    self.lab.unite(q[i], other[j])
                elif j >= 0:
                    self.lab.pin(other[j])
        self.lab.unite(q[-1], k[-1])
        if scale is None:
            self.lab.pin(q[-1])  # the default scale is 1/sqrt(head size)
        self.lab.unite(k[-2], v[-2])
        self.lab.pin(k[-2])  # softmax runs over the keys
        if mask is not None:
            self.pin_all(mask)
        if lead >= 1:
            self.attention_heads.append(q[lead - 1])
        out = list(q[:-1]) + [v[-1]]
        self.labels[node.name] = out
        self.compute.append((node, [*q[:-1], k[-2], q[-1]], node_macs(node)))

    def matmul(self, node: fx.Node, op: str, shape) -> None:
        a = node.args
        lhs, rhs = (self.of(a[1]), self.of(a[2])) if op in ("addmm", "baddbmm") else (self.of(a[0]), self.of(a[1]))
        if lhs is None or rhs is None or len(lhs) < 2 or len(rhs) < 2:
            self.unknown_op(node)
            return
        self.lab.unite(lhs[-1], rhs[-2])
        batch = []
        nb = len(shape) - 2
        for i in range(nb):
            d_l, d_r = len(lhs) - 2 - nb + i, len(rhs) - 2 - nb + i
            cands = [x[d] for x, d in ((lhs, d_l), (rhs, d_r)) if d >= 0 and len(x[d]) == shape[i]]
            for x, d in ((lhs, d_l), (rhs, d_r)):
                if d >= 0 and len(x[d]) != shape[i]:
                    self.lab.pin(x[d])
            for c in cands[1:]:
                self.lab.unite(cands[0], c)
            batch.append(cands[0] if cands else self.fresh_for((shape[i],), pin=True)[0])
        out = batch + [lhs[-2], rhs[-1]]
        if op in ("addmm", "baddbmm"):
            bias = self.of(a[0])
            if bias is not None:
                for i, arr in enumerate(bias):
                    d = len(out) - len(bias) + i
                    if len(arr) == len(out[d]):
                        self.lab.unite(arr, out[d])
                    else:
                        self.lab.pin(arr)
        self.labels[node.name] = out
        self.compute.append((node, [*out, lhs[-1]], node_macs(node)))

    def einsum(self, node: fx.Node, shape) -> None:
        equation, operands = node.args[0].replace(" ", ""), node.args[1]
        lhs, _, rhs = equation.partition("->")
        terms = lhs.split(",")
        if "..." in equation or not rhs and "->" not in equation:
            self.unknown_op(node)
            return
        letters: dict[str, np.ndarray] = {}
        for term, x in zip(terms, operands):
            lab = self.of(x)
            for letter, arr in zip(term, lab):
                if letter in letters and len(letters[letter]) == len(arr):
                    self.lab.unite(letters[letter], arr)
                elif letter in letters:
                    self.lab.pin(arr)
                    self.lab.pin(letters[letter])
                else:
                    letters[letter] = arr
        self.labels[node.name] = [letters[c] for c in rhs]
        if len(operands) > 1:
            self.compute.append((node, list(letters.values()), node_macs(node)))

    def permute(self, node: fx.Node, op: str, x) -> None:
        a = node.args
        if op == "transpose":
            d0, d1 = a[1] % len(x), a[2] % len(x)
            out = list(x)
            out[d0], out[d1] = out[d1], out[d0]
        elif op in ("t", "numpy_T"):
            out = list(reversed(x))
        else:
            out = [x[d % len(x)] for d in a[1]]
        self.labels[node.name] = out

    def reshape(self, node: fx.Node, op: str, x, shape) -> None:
        if op in ("expand", "expand_as"):
            lead = len(shape) - len(x)
            out = self.fresh_for(shape[:lead], pin=True)
            for i, arr in enumerate(x):
                if len(arr) == shape[lead + i]:
                    out.append(arr)
                else:
                    self.lab.pin(arr)
                    out.append(self.fresh_for((shape[lead + i],), pin=True)[0])
            self.labels[node.name] = out
            return
        self.labels[node.name] = self.regroup(x, shape)

    def regroup(self, x: list[np.ndarray], shape: tuple[int, ...]) -> list[np.ndarray]:
        """Labels after a reshape: size-1 dimensions come and go; other dimensions are matched in runs of equal
        products; a run of several input dimensions into one is a merge, one into several a split."""
        ins = [(i, len(a)) for i, a in enumerate(x) if len(a) != 1]
        for a in x:
            if len(a) == 1:
                self.lab.pin(a)
        outs = [(j, s) for j, s in enumerate(shape) if s != 1]
        out: list[np.ndarray | None] = [None] * len(shape)
        i = j = 0
        while i < len(ins) or j < len(outs):
            gi, gj = [ins[i]], [outs[j]]
            pi, pj = ins[i][1], outs[j][1]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    gi.append(ins[i])
                    pi *= ins[i][1]
                    i += 1
                else:
                    gj.append(outs[j])
                    pj *= outs[j][1]
                    j += 1
            src = [x[d] for d, _ in gi]
            if len(gi) == 1 and len(gj) == 1:
                out[gj[0][0]] = src[0]
                continue
            flat = src[0] if len(src) == 1 else self.merge(src)
            if len(gj) == 1:
                out[gj[0][0]] = flat
            else:
                parts = [self.lab.fresh(s) for _, s in gj]
                for inner in parts[1:]:
                    # model code derives the inner sizes (a head's width) from one Python value for q, k and v
                    # alike; only the outer index (the head) can go
                    self.lab.pin(inner)
                grid = np.stack([g.reshape(-1) for g in np.meshgrid(*parts, indexing="ij")], axis=1)
                self.lab.relations.append((flat, grid, "reshape"))
                for (d, _), p in zip(gj, parts):
                    out[d] = p
        return [o if o is not None else self.fresh_for((1,), pin=True)[0] for o in out]

    def merge(self, src: list[np.ndarray]) -> np.ndarray:
        flat = self.lab.fresh(math.prod(len(s) for s in src))
        for inner in src[1:]:
            self.lab.pin(inner)
        grid = np.stack([g.reshape(-1) for g in np.meshgrid(*src, indexing="ij")], axis=1)
        self.lab.relations.append((flat, grid, "reshape"))
        return flat

    def cat(self, node: fx.Node, shape) -> None:
        tensors = node.args[0]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(shape)
        labs = [self.of(t) for t in tensors]
        labs = [lab for lab in labs if lab is not None and sum(len(a) for a in lab) > 0 and len(lab) == len(shape)]
        out = []
        for d in range(len(shape)):
            if d == dim:
                out.append(np.concatenate([lab[d] for lab in labs]))
            else:
                for lab in labs[1:]:
                    self.lab.unite(labs[0][d], lab[d])
                out.append(labs[0][d])
        self.labels[node.name] = out

    def stack(self, node: fx.Node, shape) -> None:
        labs = [self.of(t) for t in node.args[0]]
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
        if any(lab is None for lab in labs):
            self.unknown_op(node)
            return
        for lab in labs[1:]:
            for a, b in zip(labs[0], lab):
                self.lab.unite(a, b)
        out = list(labs[0])
        out.insert(dim, self.fresh_for((shape[dim],), pin=True)[0])
        self.labels[node.name] = out

    def slice(self, node: fx.Node, op: str, x, shape) -> None:
        a = node.args
        dim = (a[1] if len(a) > 1 else 0) % len(x)
        if op == "narrow":
            start, end, step = a[2], a[2] + a[3], 1
        else:
            start = a[2] if len(a) > 2 and a[2] is not None else 0
            end = a[3] if len(a) > 3 and a[3] is not None else len(x[dim])
            step = a[4] if len(a) > 4 else 1
        kept = x[dim][slice(start, min(end, len(x[dim])), step)]
        if len(kept) != len(x[dim]):
            # the slice bounds are literals: the indices around them cannot move
            self.lab.pin(x[dim])
        out = list(x)
        out[dim] = kept
        self.labels[node.name] = out

    def select(self, node: fx.Node, op: str, x, shape) -> None:
        dim = node.args[1] % len(x)
        self.lab.pin(x[dim])
        if op == "select":
            self.labels[node.name] = [a for d, a in enumerate(x) if d != dim]
        else:
            out = list(x)
            out[dim] = self.fresh_for((shape[dim],), pin=True)[0]
            self.labels[node.name] = out

    def split(self, node: fx.Node, op: str, x, val) -> None:
        a = node.args
        dim = (a[2] if len(a) > 2 else node.kwargs.get("dim", 0)) if op != "unbind" else (a[1] if len(a) > 1 else 0)
        dim %= len(x)
        if op == "unbind":
            self.lab.pin(x[dim])
            self.labels[node.name] = tuple([b for d, b in enumerate(x) if d != dim] for _ in val)
            return
        # even chunks shrink in step when the op that joins them unites their labels (GEGLU's value and gate)
        sizes = [int(v.shape[dim]) for v in val]
        outs, start = [], 0
        for s in sizes:
            piece = list(x)
            piece[dim] = x[dim][start:start + s]
            outs.append(piece)
            start += s
        if len(set(sizes)) > 1:  # uneven pieces: their sizes are literals
            self.lab.pin(x[dim])
        self.labels[node.name] = tuple(outs)


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
