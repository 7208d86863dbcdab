"""Where the gradient graph's backward pass lives: in one If, switched by ``compute_gradients``, so the same
session trains (true) and evaluates (false), and what the If reads from the forward pass.

The If's then-branch reads the forward's values from the outer scope, and ONNX Runtime keeps each of those
alive until the If has run. For activations that is the price of a backward pass; for values the forward
derives from frozen weights alone it is a full copy of the weights held for nothing. The joint graph
transposes every linear weight for the forward (``Transpose(W)``) and transposes that again in the
backward, so SmolLM2's gradient graph held 211 transposed weights (538 MB, all of them) through every step.
``gate_backward`` therefore gives the branch its own copies of such weight views, recomputed where they are
used (a Transpose of a Transpose that undoes it reads the weight itself), and the forward's Transpose has
its MatMul as sole reader, which ONNX Runtime fuses away.
"""

from __future__ import annotations

import numpy as np
import onnx

from pocketzo.errors import ExportError
from pocketzo.runtime.manifest import GRADIENT_SWITCH as SWITCH

BRANCH = "then/"  # prefix of the then-branch's own names: a branch may not reuse a name of the outer graph


def gate_backward(graph: onnx.GraphProto, forward_outputs: tuple[str, ...]) -> None:
    """Move every node the forward outputs do not need into the then-branch of one If on the boolean
    input ``compute_gradients``: fed false, ONNX Runtime runs the forward alone (it does not prune a graph
    to the requested outputs) and every gradient output is empty. The input has no default (an
    initializer would be): onnxruntime 1.2x's IOBinding cannot bind an overridable initializer."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ExportError("the gradient graph already has subgraphs (If / Loop); cannot gate its backward pass")
    producer = {o: node for node in graph.node for o in node.output}
    needed: set[int] = set()
    stack = list(forward_outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    forward = [n for n in graph.node if id(n) in needed]
    backward = [n for n in graph.node if id(n) not in needed]
    grads = [o.name for o in graph.output if o.name not in forward_outputs]
    inner = {g: BRANCH + g for g in grads}
    for node in backward:
        node.input[:] = [inner.get(i, i) for i in node.input]
        node.output[:] = [inner.get(o, o) for o in node.output]
    backward = _drop_inverse_transposes(_own_weight_views(forward, backward, graph), set(inner.values()))
    made = {o for node in backward for o in node.output}
    moved = [v for v in graph.value_info if v.name in made]
    kept = [v for v in graph.value_info if v.name not in made]
    float_out = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in grads]
    then = onnx.helper.make_graph(backward, "backward", [], [_renamed(v, inner[v.name]) for v in float_out],
                                  value_info=moved)
    empty = onnx.numpy_helper.from_array(np.zeros((0,), np.float32))
    skip = onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["else/" + g], value=empty) for g in grads],
                                  "no_backward", [], [_renamed(v, "else/" + v.name) for v in float_out])
    gate = onnx.helper.make_node("If", [SWITCH], grads, name="backward_gate", then_branch=then, else_branch=skip)
    del graph.node[:]
    graph.node.extend([*forward, gate])
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for out in graph.output:  # empty when not computed: the shape is the tensor's or (0,)
        if out.name in inner:
            out.type.tensor_type.ClearField("shape")
    graph.input.append(onnx.helper.make_tensor_value_info(SWITCH, onnx.TensorProto.BOOL, []))


def _own_weight_views(forward: list[onnx.NodeProto], backward: list[onnx.NodeProto],
                      graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``backward`` with a copy, under branch names, of every chain of forward nodes that computes a value it
    reads from frozen weights and constants alone (nothing that depends on a graph input)."""
    fixed = {i.name for i in graph.initializer}
    derived: dict[str, onnx.NodeProto] = {}  # value -> the forward node that derives it from weights
    for node in forward:  # topological order
        if node.op_type == "Constant":
            fixed.update(node.output)
        elif node.input and all(i in fixed or i in derived for i in node.input if i):
            derived.update({o: node for o in node.output})
    read = [i for n in backward for i in n.input if i in derived]
    if not read:
        return backward
    chain: set[int] = set()
    stack = [derived[v] for v in read]
    while stack:
        node = stack.pop()
        if id(node) not in chain:
            chain.add(id(node))
            stack.extend(derived[i] for i in node.input if i in derived)
    copies = []
    for node in forward:
        if id(node) in chain:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [BRANCH + i if i in derived else i for i in node.input]
            copy.output[:] = [BRANCH + o for o in node.output]
            copy.name = BRANCH + node.name if node.name else ""
            copies.append(copy)
    for node in backward:
        node.input[:] = [BRANCH + i if i in derived else i for i in node.input]
    return copies + backward


def _drop_inverse_transposes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Remove each ``Transpose(Transpose(x, p), q)`` whose two permutations cancel (its readers read ``x``),
    then every node left without a reader."""
    made = {o: n for n in nodes for o in n.output}
    rename: dict[str, str] = {}
    for node in nodes:
        first = made.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        if first is None or first.op_type != "Transpose" or node.output[0] in outputs:
            continue
        p, q = _perm(first), _perm(node)
        if p is not None and q is not None and len(p) == len(q) and all(p[q[j]] == j for j in range(len(q))):
            rename[node.output[0]] = rename.get(first.input[0], first.input[0])
    for node in nodes:
        node.input[:] = [rename.get(i, i) for i in node.input]
    kept = [n for n in nodes if n.output[0] not in rename]
    while True:  # drop the nodes nothing reads any more (the first Transposes of the cancelled pairs)
        read = {i for n in kept for i in n.input} | outputs
        pruned = [n for n in kept if any(o in read for o in n.output)]
        if len(pruned) == len(kept):
            return kept
        kept = pruned


def _perm(node: onnx.NodeProto) -> list[int] | None:
    """A Transpose's permutation (None: the default, which reverses the axes of an input of unknown rank)."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _renamed(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = name
    return copy


def default_domain_only(model: onnx.ModelProto) -> None:
    """Refuse operators outside the default ONNX domain (e.g. com.microsoft), in the graph and its branches:
    a phone's build may lack them."""
    other = sorted({f"{n.domain}::{n.op_type}" for n in every_node(model.graph) if n.domain not in ("", "ai.onnx")})
    if other or model.functions:
        found = other or [f.name for f in model.functions]
        raise ExportError(f"the gradient graph uses operators outside the default ONNX domain: {found[:5]}")


def every_node(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
                yield from every_node(sub)
