"""Frozen Linears brought into the ``MatMul(x, W)`` form ONNX Runtime's quantizers read, with W an initializer.

The dynamo exporter (``optimize=False``) writes a Linear as ``MatMul(x, Transpose(W))`` or
``Gemm(x, W, b, transB=1)``; both tools quantize only ``MatMul(A, B)`` with B an initializer.
Every rewrite here keeps the function the graph computes, and its inputs and outputs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper


def frozen_weights(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Float32 initializers that are not also graph inputs (an input would make them overridable)."""
    inputs = {i.name for i in graph.input}
    return {i.name: i for i in graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and i.name not in inputs}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            users.setdefault(name, []).append((node, k))
    return users


def _add_transposed(graph: onnx.GraphProto, weight: onnx.TensorProto, perm: list[int]) -> str:
    """A new initializer ``weight`` transposed by ``perm``, named after it."""
    taken = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    name = f"{weight.name}.T" if perm == [1, 0] else f"{weight.name}.T{''.join(map(str, perm))}"
    if name not in taken:
        array = numpy_helper.to_array(weight)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), name))
    return name


def drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers in ``names`` that no node reads any more (a tied embedding keeps its Gather)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [i for i in graph.initializer if i.name in names and i.name not in used]
    for init in dead:
        graph.initializer.remove(init)


def fold_weight_transposes(graph: onnx.GraphProto) -> None:
    """``MatMul(x, Transpose(W))`` -> ``MatMul(x, W.T)`` with ``W.T`` a new initializer.

    Only Transposes of a frozen weight whose every consumer is a MatMul's B operand are folded:
    elsewhere a transposed copy would only add fp32 bytes. W itself is removed unless another
    node still reads it (a tied embedding / lm_head: the Gather keeps the fp32 table).
    """
    frozen = frozen_weights(graph)
    users = _consumers(graph)
    outputs = {o.name for o in graph.output}
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in frozen or node.output[0] in outputs:
            continue
        readers = users.get(node.output[0], [])
        if not readers or any(n.op_type != "MatMul" or k != 1 for n, k in readers):
            continue
        weight = frozen[node.input[0]]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(weight.dims)))[::-1])
        name = _add_transposed(graph, weight, perm)
        for reader, k in readers:
            reader.input[k] = name
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    drop_unused(graph, {n.input[0] for n in folded})


def gemm_to_matmul(graph: onnx.GraphProto) -> None:
    """``Gemm(A, W, C, transB=1)`` with a frozen W -> ``MatMul(A, W.T)`` (+ ``Add(., C)``).

    Only the plain Linear form (alpha = beta = 1, transA = 0) is rewritten; C may be a trainable
    bias (a graph input): the Add reads it as the Gemm did (C broadcasts to [M, N] either way).
    """
    frozen = frozen_weights(graph)
    rewritten: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in frozen:
            continue
        weight = node.input[1]
        b = _add_transposed(graph, frozen[weight], [1, 0]) if attrs.get("transB", 0) else weight
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes = [onnx.helper.make_node("MatMul", [node.input[0], b], [product], name=f"{node.name}_MatMul")]
        if bias:
            nodes.append(onnx.helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_Add"))
        rewritten.append((node, nodes))
    for gemm, nodes in rewritten:  # in place, keeping the topological order
        at = list(graph.node).index(gemm)
        graph.node.remove(gemm)
        for k, new in enumerate(nodes):
            graph.node.insert(at + k, new)
    drop_unused(graph, {gemm.input[1] for gemm, _ in rewritten})


def frozen_matmuls(graph: onnx.GraphProto) -> dict[str, str]:
    """``{MatMul node name: weight name}`` for every MatMul whose B is a 2-D frozen initializer.

    Unnamed nodes get a name: ``quantize_dynamic`` selects nodes by name.
    """
    frozen = frozen_weights(graph)
    names = Counter(n.name for n in graph.node)
    targets: dict[str, str] = {}
    for k, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in frozen or len(frozen[node.input[1]].dims) != 2:
            continue
        if not node.name or names[node.name] > 1:
            node.name = f"{node.name or 'MatMul'}_{k}"
        targets[node.name] = node.input[1]
    return targets
