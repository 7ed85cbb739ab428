"""The traced program cut into blocks and run one block at a time, any parameter replaced by a given value
(the runner of block reconstruction, :mod:`bayesq_onnx.planning.reconstruct`). Pure torch / ``torch.fx``.

Cuts are positions in graph order where the fewest float activations are live (a residual join, or between
two layers of a plain chain); a block is the span between two cuts, merged until it holds enough weight
ops. Constants (parameters and functions of them only) are computed when a block reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import fx
from torch.fx.node import map_arg

from .bayes.likelihood import BatchDraws, pseudo_loss
from .models.base import Batch, select_output
from .traced import _get as attribute


class ReconstructUnsupported(ValueError):
    """The program cannot be run block by block (the reason says why); the compile keeps its plan."""


@dataclass
class Block:
    start: int                  # position of the cut before the block (−1: the graph inputs)
    end: int                    # position of the cut closing it
    nodes: list[fx.Node]        # the data-dependent nodes it computes, in graph order
    inputs: list[fx.Node]       # values live at its start
    outputs: list[fx.Node]      # float tensors live at its end (the objective's terms)
    live_out: list[fx.Node]     # every value live at its end (what the next block reads)
    weights: list[str] = dataclasses.field(default_factory=list)  # planned initializers it reconstructs


class Program:
    """A ``torch.export`` program run one span of its data-dependent nodes at a time, with any parameter
    replaced by a given value. Constants (parameters and functions of them only) are computed when a span
    reads them, from the replaced values."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        # a node nothing reads (torch.export's input-shape guard, a call_module) computes nothing the output needs
        self.nodes = [n for n in gm.graph.nodes if n.users or n.op in ("placeholder", "output")]
        for node in self.nodes:
            if node.op not in ("placeholder", "get_attr", "call_function", "output"):
                raise ReconstructUnsupported(f"the traced program has a {node.op} node ({node.name})")
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.output = next(n for n in self.nodes if n.op == "output")
        dependent: set[fx.Node] = set(self.placeholders)
        for node in self.nodes:
            if node.op == "call_function" and any(a in dependent for a in node.all_input_nodes):
                dependent.add(node)
        self.dependent = [n for n in self.nodes if n in dependent]  # graph order
        self.position = {n: i for i, n in enumerate(self.dependent)}
        end = len(self.dependent)
        kept = set(self.nodes)
        self.last_use = {n: max([self.position.get(u, end) for u in n.users if u in kept] or [self.position[n]])
                         for n in self.dependent}

    def parameter_targets(self) -> dict[str, tuple[int, ...]]:
        """Every parameter the program reads (a ``get_attr`` target) -> its shape."""
        out = {}
        for node in self.nodes:
            if node.op == "get_attr":
                value = attribute(self.gm, node.target)
                if isinstance(value, torch.Tensor):
                    out[node.target] = tuple(value.shape)
        return out

    def live(self, position: int) -> list[fx.Node]:
        """Data-dependent values computed at or before ``position`` and read after it, in graph order."""
        return [n for n in self.dependent[:position + 1] if self.last_use[n] > position]

    def blocks(self, weight_of: dict[str, str], min_ops: int) -> list[Block]:
        """The program cut where the fewest float tensors are live (module docstring): spans with at least
        ``min_ops`` ops reading a weight of ``weight_of`` (parameter name -> initializer)."""
        reads: dict[int, set[str]] = {}  # position -> initializers its node reads (through constants)
        for node in self.dependent:
            found = {weight_of[c.target] for c in _constant_ancestors(node, self.position) if c.op == "get_attr"
                     and c.target in weight_of}
            if found:
                reads[self.position[node]] = found
        if not reads:
            return []
        first, last = min(reads), max(reads)
        counts = {}
        for p in range(first, last):
            counts[p] = sum(1 for n in self.live(p) if _is_float_tensor(n))
        least = min(counts.values(), default=0)
        cuts = [p for p in range(first, last) if counts[p] == least] + [len(self.dependent) - 1]
        blocks, start, previous, ops, weights = [], -1, -1, 0, []
        for cut in cuts:
            span = [p for p in reads if previous < p <= cut]
            previous = cut
            new = sorted({w for p in span for w in reads[p]} - {w for b in blocks for w in b.weights} - set(weights))
            weights += new
            ops += len(span)
            if ops >= min_ops or cut == cuts[-1]:
                if ops == 0:
                    break
                blocks.append(self._block(start, cut, weights))
                start, ops, weights = cut, 0, []
        if len(blocks) > 1 and len([p for p in reads if p > blocks[-2].end]) < min_ops:
            last_block = blocks.pop()  # a short tail joins the block before it
            prev = blocks.pop()
            blocks.append(self._block(prev.start, last_block.end, prev.weights + last_block.weights))
        return blocks

    def _block(self, start: int, end: int, weights: list[str]) -> Block:
        live_out = self.live(end) if end < len(self.dependent) - 1 else [n for n in self.dependent if n in self.output.all_input_nodes]
        outputs = [n for n in live_out if _is_float_tensor(n) and n.op != "placeholder" and self.position[n] > start]
        return Block(start, end, self.dependent[start + 1:end + 1], self.live(start) if start >= 0 else list(self.placeholders),
                     outputs, live_out, list(weights))

    def tensors(self, batch: Batch, names: list[str]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names]

    def inputs_env(self, inputs: list[torch.Tensor]) -> dict[fx.Node, object]:
        return dict(zip(self.placeholders, inputs))

    def run(self, block: Block, env: dict, params: dict[str, torch.Tensor]) -> dict[fx.Node, object]:
        """The values live after ``block`` that it computes from the live values ``env``, parameters replaced
        by ``params``."""
        values = self._evaluate(block, env, params)
        return {n: values[n] for n in block.live_out if n in values and n not in env}

    def _evaluate(self, block: Block, env: dict, params: dict, hook: Callable | None = None) -> dict:
        """Every value of ``block``'s nodes computed from ``env`` (``hook(node, value)`` may replace each)."""
        values = dict(env)
        constants: dict[fx.Node, object] = {}
        for node in block.nodes:
            if node.op == "placeholder":
                continue
            args = map_arg(node.args, lambda a: self._value(a, values, constants, params))
            kwargs = map_arg(node.kwargs, lambda a: self._value(a, values, constants, params))
            value = node.target(*args, **kwargs)
            values[node] = hook(node, value) if hook is not None else value
        return values

    def _value(self, node: fx.Node, values: dict, constants: dict, params: dict):
        if node in values:
            return values[node]
        if node in constants:
            return constants[node]
        if node.op == "get_attr":
            value = params.get(node.target)
            value = attribute(self.gm, node.target).detach() if value is None else value
        elif node.op == "call_function" and node not in self.position:
            args = map_arg(node.args, lambda a: self._value(a, values, constants, params))
            kwargs = map_arg(node.kwargs, lambda a: self._value(a, values, constants, params))
            value = node.target(*args, **kwargs)
        else:
            raise ReconstructUnsupported(f"{node.name} is read before it is computed")
        constants[node] = value
        return value

    def whole(self) -> Block:
        return self._block(-1, len(self.dependent) - 1, [])

    def final_output(self, values: dict) -> torch.Tensor:
        leaves = [values[a] for a in _flat_nodes(self.output.args[0]) if a in values]
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        if not tensors:
            raise ReconstructUnsupported("the traced program returns no tensor")
        return tensors[0]

    def check_runs(self, inputs: list[torch.Tensor]) -> None:
        """Refuse a program this runner does not reproduce (its output beside the module's own forward)."""
        with torch.no_grad():
            whole = self.whole()
            mine = self.final_output(self.run(whole, self.inputs_env(inputs), {}))
            theirs = select_output(self.gm(*inputs))
        if mine.shape != theirs.shape or not torch.allclose(mine.float(), theirs.float(), rtol=1e-4, atol=1e-5):
            raise ReconstructUnsupported("running the traced program op by op does not reproduce its output")

    def fisher(self, cut_values: set[fx.Node], batches: list[list[torch.Tensor]], likelihood: str,
               seed: int, pooled: bool = True) -> dict[fx.Node, list[torch.Tensor]]:
        """Per batch, ``E[g²]`` at every value of ``cut_values`` (one target drawn per item from the model's
        predictive; the true Fisher's diagonal), normalized so each value's mean over all batches is 1."""
        whole = self.whole()
        gen = torch.Generator().manual_seed(seed)
        out: dict[fx.Node, list[torch.Tensor]] = {n: [] for n in cut_values}
        def leaf(node: fx.Node, value):
            if node in cut_values and isinstance(value, torch.Tensor):
                if value.requires_grad:
                    value.retain_grad()
                else:
                    value = value.detach().requires_grad_()
            return value

        for inputs in batches:
            values = self._evaluate(whole, self.inputs_env(inputs), {}, leaf)
            result = self.final_output(values)
            n = items_of(inputs)
            loss = pseudo_loss(result, likelihood, "true", None, BatchDraws(gen, n), 0, slice(0, n))
            loss.backward()
            for node in cut_values:
                g = values[node].grad
                out[node].append(torch.zeros_like(values[node]).detach() if g is None else (g.detach() ** 2))
        for node, parts in out.items():
            out[node] = _expected(parts) if pooled else parts
            total = sum(float(p.sum()) for p in out[node])
            count = sum(p.numel() for p in out[node])
            mean = total / count if count and total > 0 else 1.0
            out[node] = [p / mean if total > 0 else torch.ones_like(p) for p in out[node]]
        return out


def _expected(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per batch, ``E[g²]`` over all items at each element position (the items' mean, every batch the same
    where the batches' shapes agree; each batch's own mean otherwise), broadcast over a batch's items: one
    target draw per item makes a single item's ``g²`` a one-sample estimate."""
    means = [p.mean(0, keepdim=True) for p in parts]
    if all(m.shape == means[0].shape for m in means):
        weights = [p.shape[0] for p in parts]
        pooled = sum(m * w for m, w in zip(means, weights)) / sum(weights)
        return [pooled.expand_as(p) for p in parts]
    return [m.expand_as(p) for m, p in zip(means, parts)]


def _constant_ancestors(node: fx.Node, position: dict) -> list[fx.Node]:
    """The non-data-dependent nodes ``node`` reads, through other such nodes."""
    seen, stack, out = set(), [a for a in node.all_input_nodes if a not in position], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        stack.extend(a for a in n.all_input_nodes if a not in position)
    return out


def _flat_nodes(arg) -> list[fx.Node]:
    out: list[fx.Node] = []
    map_arg(arg, lambda n: out.append(n) or n)
    return out


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def items_of(inputs: list[torch.Tensor]) -> int:
    """Items in one batch of program inputs (the first input's axis 0)."""
    return int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
