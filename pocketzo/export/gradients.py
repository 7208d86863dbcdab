"""The gradient graph (``export --gradients``): d loss / d every trainable tensor, as an ordinary ONNX
inference graph, so a device can backpropagate with ONNX Runtime's inference package alone.

1. a module returning the loss head's ``loss`` alone, with only the trainable parameters requiring grad;
2. ``torch.export`` with dynamic batch and sequence axes, then the joint forward + backward graph
   (``_export_forward_backward``), whose signature names the parameter of every gradient output;
3. the loss and the gradients become user outputs and go through ``torch.onnx.export`` (dynamo,
   ``optimize=False``): default-domain operators, parameter names kept;
4. the graph is edited as the loss graph is (``tracing.lift_trainable``): frozen weights stay
   initializers, trainable ones become inputs under their manifest names; outputs are renamed
   ``loss`` and ``grad/<name>`` (one per trainable tensor, in manifest order);
5. ONNX Runtime's loss and gradients are checked against PyTorch autograd of the same loss, at the
   initial and at random adapter values (``gradient_parity``); a mismatch refuses the export.

Exporter bugs that scale a gradient are real (through ``aot_export_module``, ``cross_entropy(reduction=
"mean")`` came out N times too large), which is why step 5 is not optional. The loss heads form their
losses from ``log_softmax`` / ``logsumexp`` and explicit sums and means, never from ``cross_entropy``.

What the path needed (torch 2.13): a tied embedding / LM head is traced as two parameters, one unused,
which the joint graph refuses (dropped); ``aten.empty_permuted`` has no ONNX translation (made ``full``);
torch.onnx only emits user outputs (the loss and gradients are relabelled so) and renames values when it
decomposes again (outputs are matched by place).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.export import graph_signature as gs
from torch.utils import _pytree as pytree

from pocketzo.errors import ExportError
from pocketzo.export.adapters import layer_index
from pocketzo.export.backward_gate import default_domain_only, gate_backward
from pocketzo.export.gradient_parity import (
    PREFIX,
    TOLERANCE,
    USER_INPUTS,
    Sample,
    check_gradients,
    named,
    requires_grad,
)
from pocketzo.export.tracing import canonical_names, lift_trainable, save_graph
from pocketzo.runtime.manifest import FILE_NAMES

GRADIENT_MODEL = FILE_NAMES["gradient_model"]


def _say(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


class _Forward(nn.Module):
    """The head's outputs with ``loss`` first: the joint graph differentiates output 0, and the others
    (``example_loss``, ``candidate_loss``) are detached, as it requires of outputs that are not the loss."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss, *others = self.head(input_ids, attention_mask, labels)
        return (loss, *(o.detach() for o in others))


def _joint_program(head: nn.Module, sample: Sample) -> tuple[torch.export.ExportedProgram, list[str | None]]:
    """The forward + backward ExportedProgram, with the head's outputs and every gradient as user outputs;
    also, for each output in order, the parameter (as the head names it) it is the gradient of, None for
    the head's own outputs."""
    from torch.export.experimental import _export_forward_backward

    # DYNAMIC, not named Dims: with grad enabled the causal-LM head's shift adds a guard seq != 2, which a
    # named Dim refuses; the graph holds no such specialisation (tests/test_gradients_export.py runs seq 2)
    dynamic = torch.export.Dim.DYNAMIC
    labels = {0: dynamic} if sample[2].dim() == 1 else {0: dynamic, 1: dynamic}
    program = torch.export.export(_Forward(head), sample, strict=False, dynamic_shapes={
        "input_ids": {0: dynamic, 1: dynamic}, "attention_mask": {0: dynamic, 1: dynamic}, "labels": labels})
    program = _export_forward_backward(_drop_unused_parameters(program), joint_loss_index=0)
    _replace_empty_permuted(program.graph_module)
    specs = program.graph_signature.output_specs
    kinds = (gs.OutputKind.LOSS_OUTPUT, gs.OutputKind.USER_OUTPUT, gs.OutputKind.GRADIENT_TO_PARAMETER)
    if any(s.kind not in kinds or not isinstance(s.arg, gs.TensorArgument) for s in specs):
        found = sorted({f"{s.kind.name}:{type(s.arg).__name__}" for s in specs})
        raise ExportError(f"the joint graph has outputs {found}; only the head's outputs and gradient tensors "
                          "are supported")
    kept = [gs.OutputSpec(gs.OutputKind.USER_OUTPUT, s.arg, s.target) for s in specs]
    targets = [s.target.removeprefix("head.") if s.kind == gs.OutputKind.GRADIENT_TO_PARAMETER else None
               for s in specs]
    program = program._update(program.graph_module, gs.ExportGraphSignature(program.graph_signature.input_specs,
                                                                             kept))
    call = program._module_call_graph[0].signature  # the outputs a caller unflattens: now all of them
    call.out_spec = pytree.treespec_tuple([pytree.treespec_leaf() for _ in kept])
    return program, targets


def _drop_unused_parameters(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Remove parameter inputs the graph never reads: a tied embedding / LM head is traced as two
    parameters of which one is used, and the joint graph refuses a parameter without a gradient."""
    graph = program.graph_module.graph
    unused = {n.name: n for n in graph.nodes if n.op == "placeholder" and not n.users}
    drop = [s for s in program.graph_signature.input_specs
            if s.kind == gs.InputKind.PARAMETER and s.arg.name in unused]
    if not drop:
        return program
    for spec in drop:
        graph.erase_node(unused[spec.arg.name])
    program.graph_module.recompile()
    gone = {s.target for s in drop}
    inputs = [s for s in program.graph_signature.input_specs if s not in drop]
    signature = gs.ExportGraphSignature(inputs, program.graph_signature.output_specs)
    return program._update(program.graph_module, signature,
                           state_dict={k: v for k, v in program.state_dict.items() if k not in gone})


def _replace_empty_permuted(module: torch.fx.GraphModule) -> None:
    """``aten.empty_permuted`` (the joint graph makes it for ``ones_like``) has no ONNX translation; with an
    identity permutation it is an uninitialised tensor of that size, for which zeros (``full``) will do."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.empty_permuted.default:
            continue
        size, permutation = node.args
        if list(permutation) != list(range(len(permutation))):
            raise ExportError(f"the gradient graph has an empty_permuted with the layout {list(permutation)}; "
                              "not supported yet")
        with graph.inserting_before(node):
            full = graph.call_function(torch.ops.aten.full.default, (size, 0.0),
                                       {"dtype": node.kwargs.get("dtype"), "device": node.kwargs.get("device")})
        full.meta.update(node.meta)
        node.replace_all_uses_with(full)
        graph.erase_node(node)
    module.recompile()


def _to_onnx(program: torch.export.ExportedProgram, sample: Sample) -> onnx.ModelProto:
    return torch.onnx.export(program, sample, dynamo=True, optimize=False, verbose=False).model_proto


def _name_outputs(graph: onnx.GraphProto,
                  produced: list[tuple[str, str | None, tuple[int, ...] | None]]) -> None:
    """Make the graph's outputs exactly ``produced``: (name, the value holding it or None for zeros, shape or
    None to keep the exported output's type).

    A value is renamed where it is made; a value that is a graph input or initializer, or holds two
    outputs, gets an Identity; None gets a Constant of zeros (a gradient that is structurally zero)."""
    exported = {o.name: o for o in graph.output}
    fixed = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    rename: dict[str, str] = {}
    extra = []
    for name, value, shape in produced:
        if value is None:
            zeros = onnx.numpy_helper.from_array(np.zeros(shape, np.float32))
            extra.append(onnx.helper.make_node("Constant", [], [name], value=zeros))
        elif value in fixed or value in rename:
            extra.append(onnx.helper.make_node("Identity", [rename.get(value, value)], [name]))
        else:
            rename[value] = name
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
    for info in graph.value_info:
        info.name = rename.get(info.name, info.name)
    graph.node.extend(extra)
    outputs = []
    for name, value, shape in produced:
        if shape is None:
            info = onnx.ValueInfoProto()
            info.CopyFrom(exported[str(value)])
            info.name = name
        else:
            info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))
        outputs.append(info)
    del graph.output[:]
    graph.output.extend(outputs)


def _match_inputs(graph: onnx.GraphProto, model: onnx.GraphProto) -> None:
    """Give the gradient graph the loss graph's symbolic axis names ("rows", "seq"); then its inputs
    must equal the loss graph's: names, element types and shapes."""
    axes = {}
    for mine, theirs in zip(graph.input[:len(USER_INPUTS)], model.input[:len(USER_INPUTS)], strict=True):
        for a, b in zip(mine.type.tensor_type.shape.dim, theirs.type.tensor_type.shape.dim, strict=False):
            if a.dim_param and b.dim_param:
                axes[a.dim_param] = b.dim_param
    for info in (*graph.input, *graph.output, *graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param in axes:
                dim.dim_param = axes[dim.dim_param]
    if _signature(graph.input) != _signature(model.input):
        raise ExportError(f"the gradient graph's inputs {_signature(graph.input)} differ from the loss graph's "
                          f"{_signature(model.input)}")


def _signature(values: Iterable[onnx.ValueInfoProto]) -> list[tuple[str, int, tuple[str | int, ...]]]:
    """(name, element type, shape) of each graph value."""
    return [(v.name, v.type.tensor_type.elem_type,
             tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]


def export_gradients(bundle_dir: Path, head: nn.Module, sample: Sample, trainable: list[str],
                     random_values: dict[str, np.ndarray], exact: list[str] | None = None,
                     tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Write ``bundle_dir/gradients.onnx`` for ``head`` (the loss head of ``bundle_dir/model.onnx``): its
    outputs, and the gradient of the loss for each tensor of ``exact`` (default: every trainable tensor;
    autograd then stops below the lowest of them). Check it against autograd; return the check's record
    for ``export.gradient_parity``."""

    exact = list(trainable) if exact is None else exact
    _say("tracing the gradient graph (torch.export, forward + backward)")
    # A tensor the loss does not depend on differentiably gets zeros: the joint graph refuses it as a parameter
    differentiable = set(exact) - set(_without_gradient(head, sample, exact))
    try:
        with requires_grad(head, differentiable), warnings.catch_warnings():
            for category in (UserWarning, FutureWarning, DeprecationWarning):  # torch.export's and torch.onnx's
                warnings.simplefilter("ignore", category=category)
            program, targets = _joint_program(head, sample)
            proto = _to_onnx(program, sample)
    except ExportError:
        raise
    except Exception as e:  # torch.export / torch.onnx failures are long; the CLI prints one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"--gradients: the backward graph could not be exported ({first}); "
                          "rerun with --debug for the trace") from e
    del program
    lifted = lift_trainable(proto, head, trainable, strip="head.")
    if lifted != trainable:
        raise ExportError(f"--gradients: the gradient graph does not use {sorted(set(trainable) - set(lifted))}")
    _name_outputs(proto.graph, _contract_outputs(proto.graph, head, exact, targets))
    _match_inputs(proto.graph, onnx.load(bundle_dir / FILE_NAMES["model"], load_external_data=False).graph)
    gate_backward(proto.graph, head.outputs)
    default_domain_only(proto)
    save_graph(proto, bundle_dir / GRADIENT_MODEL, shared=bundle_dir / FILE_NAMES["model"])
    del proto
    _say("checking the gradients: ONNX Runtime vs PyTorch autograd")
    return check_gradients(bundle_dir / GRADIENT_MODEL, head, sample, exact, random_values, tolerance,
                           trainable)


def exact_tensors(trainable: list[str], n_layers: int, last: int) -> list[str]:
    """The trainable tensors of the last ``last`` of ``n_layers`` transformer layers and everything after them
    (final norm, head), in manifest order; they must be a suffix of ``trainable``, so that autograd stops at
    one layer and a hybrid step perturbs one contiguous stretch of the flat buffer below it."""
    if last >= n_layers:
        return list(trainable)
    first_layer = n_layers - last
    index = [layer_index(n) for n in trainable]
    start = next((i for i, k in enumerate(index) if k is not None and k >= first_layer), None)
    if start is None:  # no layer-indexed tensor up there: only tensors after the last layer (a head, a norm)
        start = max((i + 1 for i, k in enumerate(index) if k is not None), default=len(trainable))
    below = [trainable[i] for i in range(start, len(trainable)) if index[i] is not None and index[i] < first_layer]
    if below:
        raise ExportError(f"--gradient-layers {last}: {below[0]} (layer {layer_index(below[0])}) comes after tensors "
                          f"of layer >= {first_layer} in the trainable order; cannot cut the backward pass there")
    if start == len(trainable):
        raise ExportError(f"--gradient-layers {last}: no trainable tensor in the last {last} of {n_layers} layers")
    return list(trainable[start:])


def _contract_outputs(graph: onnx.GraphProto, head: nn.Module, exact: list[str],
                      targets: list[str | None]) -> list[tuple[str, str | None, tuple[int, ...] | None]]:
    """(output name, the value holding it or None, shape or None): the head's outputs (``loss``,
    ``example_loss`` ...), then ``grad/<name>`` per tensor of ``exact``.

    The exported outputs follow the program's (torch.onnx renames values when it decomposes again, so
    they are matched by place); ``targets`` names the parameter of each, None for the head's outputs."""
    values = [o.name for o in graph.output]
    n_head = len(head.outputs)
    if len(values) != len(targets) or any(t is not None for t in targets[:n_head]):
        raise ExportError(f"the gradient graph has {len(values)} outputs for {n_head} outputs and "
                          f"{len(targets) - n_head} gradients")
    canonical = _canonical(head)
    value_of: dict[str, str] = {}
    for target, value in zip(targets[n_head:], values[n_head:], strict=True):
        name = canonical[str(target).removeprefix("net.")]
        if value_of.setdefault(name, value) != value:
            raise ExportError(f"the gradient graph has two gradients for {name} (a tied tensor traced twice)")
    params = named(head)
    return ([(name, value, None) for name, value in zip(head.outputs, values, strict=False)]
            + [(PREFIX + n, value_of.get(n), tuple(params[n].shape)) for n in exact])


def _without_gradient(head: nn.Module, sample: Sample, trainable: list[str]) -> list[str]:
    """The trainable tensors autograd gives no gradient (None) on ``sample``."""
    params = named(head)
    with requires_grad(head, set(trainable)):
        grads = torch.autograd.grad(head(*sample)[0], [params[n] for n in trainable], allow_unused=True)
    return [n for n, g in zip(trainable, grads, strict=True) if g is None]


def _canonical(head: nn.Module) -> dict[str, str]:
    """Every name of every parameter -> its first name (a tied embedding / LM head is one tensor)."""
    first = canonical_names(head)
    return {n.removeprefix("net."): first[id(p)] for n, p in head.named_parameters(remove_duplicate=False)}
