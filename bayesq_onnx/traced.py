"""What the exporter traces: the ``torch.export`` program of a model, its BatchNorm folded, and every op in it
that consumes a weight.

The ONNX export and the Bayesian analysis start from the same program (docs/design.md §3.1): whatever Python code
built the model, ``torch.export`` reduces it to ATen ops, and a weight is whatever constant (a parameter, or
a function of parameters and buffers only: a transpose, a slice of a packed projection, a scaled copy) reaches
the weight input of a linear, matmul, convolution or embedding op. The analysis then gets each such weight's
curvature from that op's own input activations and output gradients, whether the model wrote
``nn.Linear``, ``F.linear(x, self.w)`` or ``nn.MultiheadAttention``.

Pure torch / ``torch.fx``: nothing here knows about ONNX.
"""

from __future__ import annotations

import dataclasses
import operator
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

aten = torch.ops.aten

# op -> (kind, index of the activation argument, index of the weight argument, weight is [in, out])
_LINEAR = {aten.linear.default: (1, False), aten.mm.default: (1, True), aten.matmul.default: (1, True)}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv1d.padding, aten.conv2d.padding,
         aten.convolution.default}
_GENERIC = {aten.conv3d.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
            aten.conv_transpose3d.input, aten.conv3d.padding}
_BATCHNORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


@dataclass(frozen=True)
class ConvSpec:
    """A 1-D or 2-D convolution's geometry, as the op was called."""

    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class WeightOp:
    """One op of the program that consumes a constant weight.

    ``kind``: ``linear`` (``x @ Wᵀ`` over the last axis; ``transposed`` when the op's weight tensor is
    ``[in, out]``, as for ``mm``/``matmul``/``addmm``), ``conv`` (1-D/2-D, any ``groups``), ``embedding``
    (``W[ids]``) or ``generic`` (any other op: transposed and 3-D convolutions, an einsum with one constant
    operand, a matmul ``W @ x``; the analysis takes per-item vector-Jacobian products for it). ``item_axis``: the activation axis that indexes calibration items, or
    ``None`` when the exporter merged it with other axes (the analysis then treats rows as items).
    ``parameter``: the parameter's name when the weight is a bare parameter.
    """

    name: str
    kind: str
    target: object
    transposed: bool = False
    conv: ConvSpec | None = None
    item_axis: int | None = 0
    parameter: str | None = None
    numel: int | None = None        # the weight's size, when the program records its shape
    weight_index: int = 1           # einsum: the weight's place in the operand list; ``W @ x`` matmul: 0
    out_item_axis: int | None = None  # the output's item axis where it differs from the activation's (einsum)

    def operands(self, args: tuple):
        """``(activation, weight)`` of one call of this op with ``args``."""
        if self.target == aten.einsum.default:
            ops = args[1]
            return ops[1 - self.weight_index], ops[self.weight_index]
        if self.target in _LINEAR and self.weight_index == 0:
            return args[1], args[0]
        return operands(self.target, args)

    def call(self, x: torch.Tensor, w: torch.Tensor, args: tuple) -> torch.Tensor:
        """The op on activation ``x`` and weight ``w``, its other arguments as in ``args``."""
        if self.target == aten.einsum.default:
            pair = [w, x] if self.weight_index == 0 else [x, w]
            return self.target(args[0], pair)
        if self.target in _LINEAR and self.weight_index == 0:
            return self.target(w, x, *args[2:])
        if self.target == aten.embedding.default:
            return self.target(w, x, *args[2:])
        if self.target == aten.addmm.default:
            return self.target(args[0], x, w, *args[3:])
        return self.target(x, w, *args[2:])


def export_program(module: torch.nn.Module, example: tuple[torch.Tensor, ...], dynamic_shapes) -> fx.GraphModule:
    """``torch.export`` of ``module`` (eval mode) as a runnable ``GraphModule`` with parameters as attributes."""
    program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes, strict=False)
    gm = program.module()
    # train()/eval() mean nothing for a traced program (its dropout and BatchNorm modes were fixed when it was
    # traced), and the exported module refuses them; let callers that switch modes run it as it is
    gm.train = types.MethodType(lambda self, mode=True: self, gm)
    return gm


def fold_batchnorm(gm: fx.GraphModule) -> tuple[int, int]:
    """Fold every inference-mode BatchNorm that directly follows a convolution into it, in place.

    ``y = γ (W*x + b − m) / √(v + ε) + β`` is the convolution with ``W' = s·W`` (per output channel) and
    ``b' = (b − m)·s + β``, ``s = γ / √(v + ε)``. Folded when the conv's output feeds only the BatchNorm and
    its weight (and bias) are parameters no other op reads. Returns ``(folded, BatchNorms in the program)``.
    """
    graph = gm.graph
    norms = [n for n in graph.nodes if n.op == "call_function" and n.target in _BATCHNORM]
    folded = 0
    for bn in norms:
        found = _foldable_conv(bn)
        if found is None:
            continue
        conv, w_node, b_node, params = found
        eps = bn.args[7] if bn.target == aten.batch_norm.default else bn.args[-1]
        weight = _get(gm, w_node.target)
        bias = _get(gm, b_node.target) if b_node is not None else None
        new_w, new_b = _folded(weight, bias, *(None if p is None else _get(gm, p.target).detach() for p in params),
                               eps)
        _set(gm, w_node.target, torch.nn.Parameter(new_w, requires_grad=weight.requires_grad))
        _bypass_batchnorm(gm, bn, conv, w_node, b_node, params, torch.nn.Parameter(new_b.to(weight.dtype)))
        folded += 1
    if folded:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return folded, len(norms)


def _foldable_conv(bn: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, list] | None:
    """``(conv, its weight node, its bias node or None, the BatchNorm's γ, β, mean, var nodes)`` when ``bn``
    folds into the convolution before it (:func:`fold_batchnorm`), else ``None``."""
    conv = bn.args[0]
    if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in _CONV | {aten.conv3d.default}
            and len(conv.users) == 1 and not _conv_transposed(conv)):
        return None
    if bn.target == aten.batch_norm.default and bn.args[5]:
        return None  # training-mode statistics: nothing constant to fold
    if bn.target != aten.batch_norm.default and not all(
            u.target is operator.getitem and u.args[1] == 0 for u in bn.users):
        return None  # a tuple result whose statistics are read too: the BatchNorm must stay
    w_node = conv.args[1]
    b_node = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    params = [bn.args[i] for i in range(1, 5)]
    if not (_is_attr(w_node) and len(w_node.users) == 1 and (b_node is None or (_is_attr(b_node) and len(b_node.users) == 1))
            and all(p is None or _is_attr(p) for p in params)):
        return None
    return conv, w_node, b_node, params


def _folded(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None, beta: torch.Tensor | None,
            mean: torch.Tensor, var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·W, (b − m)·s + β)`` with ``s = γ / √(v + ε)`` per output channel, computed in float64: ``W'`` in
    the weight's dtype, ``b'`` in float64 (``b``, ``γ``, ``β`` absent: 0, 1, 0)."""
    with torch.no_grad():
        s = torch.rsqrt(var.double() + eps)
        if gamma is not None:
            s = s * gamma.double()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        new_w = (weight.double() * s.reshape(shape)).to(weight.dtype)
        b = bias.double() if bias is not None else torch.zeros_like(s)
        new_b = (b - mean.double()) * s + (beta.double() if beta is not None else 0.0)
    return new_w, new_b


def _bypass_batchnorm(gm: fx.GraphModule, bn: fx.Node, conv: fx.Node, w_node: fx.Node, b_node: fx.Node | None,
                      params: list, new_bias: torch.nn.Parameter) -> None:
    """Give ``conv`` the folded bias (a new attribute when it had none), read ``conv`` where ``bn`` was read,
    and remove ``bn`` and its parameters that nothing else reads."""
    graph = gm.graph
    if b_node is not None:
        _set(gm, b_node.target, new_bias)
    else:
        owner = w_node.target.rpartition(".")[0]
        target = _free_name(gm, f"{owner}.bias" if owner else "bias")
        _set(gm, target, new_bias)
        with graph.inserting_before(conv):
            b_node = graph.get_attr(target)
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[2] = b_node
        conv.args = tuple(args)
    if bn.target == aten.batch_norm.default:
        bn.replace_all_uses_with(conv)
    else:  # a tuple whose first element (the output) is all that is read
        for u in list(bn.users):
            u.replace_all_uses_with(conv)
            graph.erase_node(u)
    graph.erase_node(bn)
    for p in params:
        if p is not None and not p.users:
            graph.erase_node(p)
            _delete(gm, p.target)


def weight_ops(gm: fx.GraphModule) -> list[WeightOp]:
    """Every op of ``gm`` whose weight argument is a constant (a function of attributes only), in graph order."""
    batch = _batch_symbol(gm)
    constant: dict[fx.Node, bool] = {}
    out = []
    for node in gm.graph.nodes:
        constant[node] = node.op == "get_attr" or (
            node.op == "call_function" and bool(node.all_input_nodes)
            and all(constant.get(a, False) for a in node.all_input_nodes))
        if node.op != "call_function":
            continue
        op = _classify(node, constant, batch)
        if op is not None:
            out.append(op)
    return out


def operands(target, args: tuple):
    """The (activation, weight) arguments of a weight op ``target`` called with ``args`` (graph nodes while
    tracing, tensors while running)."""
    if target == aten.embedding.default:
        return args[1], args[0]
    if target == aten.addmm.default:
        return args[1], args[2]
    return args[0], args[1]


class _Recorder:
    """The callback of the taps currently in a program (see :func:`insert_taps`)."""

    record: Callable | None = None


def _tap(key: str, out, args):
    """Identity on ``out``, the result of the op named ``key`` called with ``args``; hands both to the
    active recorder first."""
    if _Recorder.record is not None and isinstance(out, torch.Tensor):
        _Recorder.record(key, out, args)
    return out


def insert_taps(program: fx.GraphModule, names, record: Callable) -> list[fx.Node]:
    """After each op named in ``names``, in place, a node that calls ``record(name, output, args)`` on every
    run and passes the output on unchanged; :func:`remove_taps` undoes it."""
    nodes = {n.name: n for n in program.graph.nodes}
    taps = []
    for key in names:
        node = nodes[key]
        with program.graph.inserting_after(node):
            tap = program.graph.call_function(_tap, (key, node, tuple(node.args)))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
        taps.append(tap)
    program.recompile()
    _Recorder.record = record
    return taps


def remove_taps(program: fx.GraphModule, taps: list[fx.Node]) -> None:
    _Recorder.record = None
    for tap in taps:
        tap.replace_all_uses_with(tap.args[1])
        program.graph.erase_node(tap)
    program.recompile()


def _classify(node: fx.Node, constant: dict, batch) -> WeightOp | None:
    t = node.target
    if t == aten.einsum.default or (t in (aten.mm.default, aten.matmul.default) and len(node.args) >= 2
                                     and _is_const(node.args[0], constant) and not _is_const(node.args[1], constant)):
        return _classify_generic(node, t, constant, batch)
    if t not in _LINEAR and t not in _CONV and t not in _GENERIC and t not in (aten.embedding.default, aten.addmm.default):
        return None
    if len(node.args) < 2 or (t == aten.addmm.default and len(node.args) < 3):
        return None
    x, w = operands(t, node.args)
    if not isinstance(w, fx.Node) or not constant.get(w, False) or not isinstance(x, fx.Node) or constant.get(x, False):
        return None
    shape = _shape(w)
    parameter = w.target if w.op == "get_attr" else None
    numel = None
    if shape is not None and all(isinstance(d, int) for d in shape):
        numel = 1
        for d in shape:
            numel *= d
    op = _classify_kind(node, t, x, shape, parameter, batch)
    return None if op is None else dataclasses.replace(op, numel=numel)


def _is_const(a, constant: dict) -> bool:
    return isinstance(a, fx.Node) and constant.get(a, False)


def _classify_generic(node: fx.Node, t, constant: dict, batch) -> WeightOp | None:
    """A two-operand einsum with one constant operand, or a matmul ``W @ x`` (constant first): a ``generic``
    op (per-item vector-Jacobian products) whose weight is the constant operand."""
    if t == aten.einsum.default:
        pair = node.args[1] if len(node.args) > 1 else None
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return None
        flags = [_is_const(a, constant) for a in pair]
        if flags.count(True) != 1 or not all(isinstance(a, fx.Node) for a in pair):
            return None
        index = flags.index(True)
        x, w = pair[1 - index], pair[index]
        equation = str(node.args[0]).replace(" ", "")
        lhs, _, out = equation.partition("->")
        terms = lhs.split(",")
        item = _item_axis(x, batch)
        if "." in equation or len(terms) != 2 or not out or item is None or item >= len(terms[1 - index]) \
                or terms[1 - index][item] not in out:
            return None
        out_axis = out.index(terms[1 - index][item])
        op = WeightOp(node.name, "generic", t, item_axis=item, parameter=w.target if w.op == "get_attr" else None,
                      weight_index=index, out_item_axis=out_axis)
        return dataclasses.replace(op, numel=_numel(_shape(w)))
    else:
        index, x, w = 0, node.args[1], node.args[0]
        if _shape(w) is not None and len(_shape(w)) != 2:
            return None
    return WeightOp(node.name, "generic", t, item_axis=_item_axis(x, batch),
                    parameter=w.target if w.op == "get_attr" else None, numel=_numel(_shape(w)), weight_index=index)


def _numel(shape) -> int | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
    return n


def _classify_kind(node: fx.Node, t, x: fx.Node, shape, parameter, batch) -> WeightOp | None:
    if t == aten.embedding.default:
        return WeightOp(node.name, "embedding", t, parameter=parameter)
    if t in _LINEAR or t == aten.addmm.default:
        if shape is not None and len(shape) != 2:
            return None  # a batched matmul against a constant: not a weight layout we quantize
        transposed = t != aten.linear.default
        return WeightOp(node.name, "linear", t, transposed=transposed, item_axis=_item_axis(x, batch),
                        parameter=parameter)
    if t in _CONV and not _conv_transposed(node) and shape is not None and len(shape) in (3, 4):
        a = list(node.args) + [None] * 7
        if t == aten.convolution.default:
            stride, padding, dilation, groups = a[3], a[4], a[5], a[8]
        else:
            stride, padding, dilation, groups = a[3], a[4], a[5], a[6]
        nd = len(shape) - 2
        spec = ConvSpec(_tuple(stride, 1, nd), padding if isinstance(padding, str) else _tuple(padding, 0, nd),
                        _tuple(dilation, 1, nd), int(groups or 1))
        return WeightOp(node.name, "conv", t, conv=spec, item_axis=_item_axis(x, batch), parameter=parameter)
    return WeightOp(node.name, "generic", t, item_axis=_item_axis(x, batch), parameter=parameter)


def _tuple(v, default: int, nd: int) -> tuple[int, ...]:
    if v is None:
        return (default,) * nd
    v = tuple(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))
    return v * nd if len(v) == 1 else v


def _conv_transposed(node: fx.Node) -> bool:
    return node.target == aten.convolution.default and bool(node.args[6])


def _shape(node: fx.Node):
    val = node.meta.get("val")
    return tuple(val.shape) if val is not None and hasattr(val, "shape") else None


def _batch_symbol(gm: fx.GraphModule):
    """The symbolic size of the first input's axis 0 (the item axis), if the program has one."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape and isinstance(shape[0], torch.SymInt):
                return str(shape[0])
            return None
    return None


def _item_axis(x: fx.Node, batch) -> int | None:
    shape = _shape(x)
    if shape is None:
        return 0
    if batch is None:
        return 0 if shape else None
    for axis, size in enumerate(shape):
        if str(size) == batch:
            return axis
    return None


def _is_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), leaf


def _get(gm: torch.nn.Module, target: str) -> torch.Tensor:
    owner, leaf = _owner(gm, target)
    return getattr(owner, leaf)


def _set(gm: torch.nn.Module, target: str, value: torch.nn.Parameter) -> None:
    owner, leaf = _owner(gm, target)
    if leaf in owner._parameters or not hasattr(owner, leaf):
        owner.register_parameter(leaf, value)
    else:
        setattr(owner, leaf, value)


def _delete(gm: torch.nn.Module, target: str) -> None:
    owner, leaf = _owner(gm, target)
    for store in (owner._parameters, owner._buffers):
        store.pop(leaf, None)
    if leaf in owner.__dict__:
        delattr(owner, leaf)


def _free_name(gm: torch.nn.Module, target: str) -> str:
    owner, leaf = _owner(gm, target)
    name, k = leaf, 0
    while getattr(owner, name, None) is not None:
        k += 1
        name = f"{leaf}_{k}"
    path = target.rpartition(".")[0]
    return f"{path}.{name}" if path else name
