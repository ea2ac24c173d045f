"""Layer roles and skip-concat splits, derived from the captured graph's data flow (not from module names).

Roles:
- ``time_embedding``: a per-sample vector computed without ``x_t`` (output ``(batch, features)``): timestep
  MLPs, pooled-text / size / class embedders and the adaLN modulation they feed;
- ``cond_projection``: a token sequence computed without ``x_t``: projections of text states,
  cross-attention keys / values, the text stream of an MMDiT block before its first joint attention;
- ``first``: the first layer that reads ``x_t``; ``last``: a layer whose output reaches the graph output
  through no other compute layer;
- ``attn_q`` / ``attn_k`` / ``attn_v``: linears whose output feeds an attention op's q / k / v (through
  reshapes only); ``attn_out``: a linear reading an attention op's output;
- ``shortcut``: a 1x1 convolution on a fanned-out input whose output is added to the other branch (resnet skip);
- ``attention``: the attention op itself; ``body``: everything else.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

# every role :func:`layer_roles` can give a compute node; passes select and skip layers by these names
# (``attention`` marks the attention product itself, which no pass rewrites: LAYER_ROLES are the others)
ROLES = ("time_embedding", "cond_projection", "first", "last", "attn_q", "attn_k", "attn_v", "attn_out",
         "shortcut", "attention", "body")
LAYER_ROLES = tuple(r for r in ROLES if r != "attention")

# ops that move or reshape data without mixing values across tokens/channels in a way that matters here
_RESHAPE = {
    aten.view.default, aten.reshape.default, aten.permute.default, aten.transpose.int, aten.contiguous.default,
    aten.clone.default, aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints, aten.to.dtype,
    aten._assert_tensor_metadata.default, aten.expand.default, aten.unflatten.int, aten.alias.default,
    aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default,
}
# per-channel or elementwise ops through which a skip-concat keeps its two channel ranges apart
_CHANNELWISE = _RESHAPE | {
    aten.group_norm.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.dropout.default,
    aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor, aten.sub.Tensor, aten.mish.default, aten.sigmoid.default,
}


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def input_dependencies(gm: fx.GraphModule) -> dict[fx.Node, frozenset[str]]:
    """For every node, the names of the graph inputs (``x``, ``t``, ``cond`` ...) it depends on."""
    deps: dict[fx.Node, frozenset[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            deps[n] = frozenset([n.name])
        else:
            acc: frozenset[str] = frozenset()
            for a in _tensor_inputs(n):
                acc = acc | deps.get(a, frozenset())
            deps[n] = acc
    return deps


def _through(node: fx.Node, ops: set, forward: bool) -> list[fx.Node]:
    """Nodes reached from ``node`` by following ``ops`` (users if forward, first tensor input if backward)."""
    out, frontier, seen = [], [node], set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        nxt = list(n.users) if forward else _tensor_inputs(n)[:1]
        for m in nxt:
            if m.op == "call_function" and m.target in ops:
                frontier.append(m)
            else:
                out.append(m)
    return out


def layer_roles(gm: fx.GraphModule, compute_ops: dict) -> dict[str, set[str]]:
    """Map each compute node's name to its set of roles."""
    deps = input_dependencies(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x_name = placeholders[0].name
    compute = [n for n in gm.graph.nodes if is_compute(n, compute_ops)]
    compute_set = set(compute)
    roles: dict[str, set[str]] = {n.name: set() for n in compute}
    first_done = False
    for n in compute:
        d = deps[n]
        r = roles[n.name]
        if x_name not in d:  # vectors per sample feed the modulation; token sequences are the text stream
            r.add("time_embedding" if len(n.meta["val"].shape) <= 2 else "cond_projection")
        elif not first_done:
            r.add("first")
            first_done = True
        if compute_ops[n.target] == "attention":
            r.add("attention")
            for arg, role in zip(n.args[:3], ("attn_q", "attn_k", "attn_v")):
                for src in _producers(arg):
                    if src.name in roles and compute_ops[src.target] == "linear":
                        roles[src.name].add(role)
            for user in _through(n, _FROM_ATTENTION, forward=True):
                if user.name in roles and compute_ops[user.target] == "linear":
                    roles[user.name].add("attn_out")
        if compute_ops[n.target] == "conv2d" and _is_1x1(n) and _is_shortcut(n):
            r.add("shortcut")
        if x_name in d and _reaches_output(n, compute_set):
            r.add("last")
    for r in roles.values():
        if not r:
            r.add("body")
    return roles


def is_compute(node: fx.Node, compute_ops: dict) -> bool:
    """A compute op that does arithmetic (a one-operand einsum only permutes data)."""
    if node.op != "call_function" or node.target not in compute_ops:
        return False
    return not (node.target == aten.einsum.default and len(node.args[1]) < 2)


def _reaches_output(node: fx.Node, compute: set) -> bool:
    """True if some path from ``node`` to the graph output crosses no other compute node."""
    frontier, seen = list(node.users), set()
    while frontier:
        n = frontier.pop()
        if n in seen or n in compute:
            continue
        seen.add(n)
        if n.op == "output":
            return True
        frontier.extend(n.users)
    return False


# what lies between a projection and the attention op that reads it: reshapes, token concatenation (MMDiT
# joint attention), q/k normalisation and rotary embedding arithmetic
_TO_ATTENTION = _RESHAPE | {
    aten.cat.default, aten.stack.default, aten.unbind.int, aten.select.int, aten.slice.Tensor, aten.mul.Tensor,
    aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.rms_norm.default, aten.layer_norm.default,
    aten.native_layer_norm.default, aten.type_as.default, aten.view_as_real.default, aten.view_as_complex.default,
    aten._to_copy.default, aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default,
}


# what lies between an attention op and the projection that reads its output (MMDiT splits the joint stream)
_FROM_ATTENTION = _RESHAPE | {aten.slice.Tensor, operator.getitem, aten.select.int}


def _producers(node, limit: int = 64) -> list[fx.Node]:
    """The nodes outside ``_TO_ATTENTION`` that produce ``node`` (at most ``limit`` nodes visited)."""
    out, frontier, seen = [], [node], set()
    while frontier and len(seen) < limit:
        n = frontier.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and (n.target in _TO_ATTENTION or n.target is operator.getitem):
            frontier.extend(_tensor_inputs(n))
        else:
            out.append(n)
    return out


def _is_reshape(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _RESHAPE


def _is_shortcut(node: fx.Node) -> bool:
    """Its input fans out (the other branch reads it too) and its output is added to that branch."""
    src = _through(node.args[0], _RESHAPE, forward=False) if _is_reshape(node.args[0]) else [node.args[0]]
    fans_out = any(len(p.users) > 1 for p in src)
    added = any(u.op == "call_function" and u.target == aten.add.Tensor
                for u in _through(node, _RESHAPE, forward=True))
    return fans_out and added


def _is_1x1(node: fx.Node) -> bool:
    w = node.args[1].meta["val"].shape
    return tuple(w[2:]) == (1, 1)


def concat_split(node: fx.Node) -> int | None:
    """If ``node``'s input is a channel concat of two tensors (through per-channel ops only), the channel
    count of the first part; else ``None``. This finds UNet decoder skip-concats feeding ``conv1`` (after
    GroupNorm + SiLU) and ``conv_shortcut``."""
    frontier, seen = [node.args[0]], set()
    while frontier:
        n = frontier.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op != "call_function":
            continue
        if n.target == aten.cat.default:
            parts, dim = n.args[0], (n.args[1] if len(n.args) > 1 else 0)
            if len(parts) == 2 and dim in (1, -3) and len(n.meta["val"].shape) == 4:
                return int(parts[0].meta["val"].shape[1])
            return None
        if n.target in _CHANNELWISE:
            # follow the data input: for binary ops, the operand that has the node's full shape
            shape = n.meta["val"].shape
            for a in _tensor_inputs(n):
                if hasattr(a.meta.get("val"), "shape") and a.meta["val"].shape == shape:
                    frontier.append(a)
                    break
    return None
