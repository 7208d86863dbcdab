"""Quantize the FROZEN weights of a bundle's loss graph (MatMul weights, embedding tables) with ONNX Runtime's tools.

Trainable tensors are graph inputs and stay float32 inputs: the ZO trainer edits them in place,
and a perturbation of ~1e-3 would vanish under an int8 or int4 grid. Only MatMuls whose weight
operand is an initializer are rewritten:

- ``int8``, ``int4``: ``MatMulNBitsQuantizer``, weight-only (block-wise 8 or 4 bits ->
  ``com.microsoft.MatMulNBits``); an int4 recipe may keep the weights its ``eight_bit`` regex names at 8 bits.
  The embedding tables follow, block-quantized the same way (``quantize_embedding``: ``GatherBlockQuantized``,
  a tied LM head's bytes shared);
- ``int8-dynamic``: ``quantize_dynamic`` (per-channel int8 weights; activations quantized at run time by
  ``DynamicQuantizeLinear``; ``MatMulInteger`` + rescale).

``config.QuantRecipe`` says what each option does to the function the graph computes.

Both tools only quantize ``MatMul(A, B)`` with B an initializer. The dynamo exporter
(``optimize=False``) writes a Linear as ``MatMul(x, Transpose(W))`` or ``Gemm(x, W, b, transB=1)``,
so the graph is first brought into that form (``_fold_weight_transposes``, ``_gemm_to_matmul``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from pocketzo.errors import ExportError
from pocketzo.export.config import QuantRecipe
from pocketzo.export.quantize_embedding import int_attribute, quantize_embeddings
from pocketzo.export.tracing import save_graph, tensor_bytes

QUANTIZED_OP = {"int8": "MatMulNBits", "int4": "MatMulNBits", "int8-dynamic": "MatMulInteger"}


def quantize_frozen(model_path: str | os.PathLike[str], recipe: QuantRecipe) -> dict:
    """Rewrite ``model_path`` in place with its frozen MatMul weights quantized by ``recipe``.

    Graph inputs (the trainable tensors) and outputs keep their names, types and shapes. Returns stats: the
    recipe, ``quantized`` (number of weights) and ``eight_bit`` (how many of them have 8 bits), ``embedding_tables``
    (tables whose Gathers became GatherBlockQuantized) and ``tied_tables`` (of them, reading a tied LM head's bytes),
    ``weight_bytes_fp32`` / ``weight_bytes_quantized`` and ``file_bytes_before`` / ``file_bytes_after`` (the
    graph plus its external data).
    """
    path, mode = Path(model_path), recipe.mode
    model, targets = _prepare(path)
    file_bytes_before = _file_bytes(path)
    interface = _interface(model.graph)
    before = {i.name: tensor_bytes(i) for i in model.graph.initializer}
    fp32_bytes = sum(before[w] for w in set(targets.values()))
    tables: dict = {"tables": [], "tied": 0, "fp32_bytes": 0}  # int8-dynamic leaves the embedding tables float32
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=path.parent) as tmp, _contained_ort_logging():
        try:
            if mode == "int8-dynamic":
                staged = _stage(model, Path(tmp))
                del model  # quantize_dynamic loads its own copy: ~1 GB less at peak for SmolLM2-135M
                out = _int8_dynamic(staged, list(targets))
            else:
                out = _nbits(model, targets, recipe)
                tables = quantize_embeddings(out.graph, _frozen_weights(out.graph), recipe)
                _drop_unused(out.graph, set(tables["tables"]))
        except Exception as e:  # ORT's tools raise anything from AssertionError to InferenceError
            raise ExportError(f"{path}: ONNX Runtime's {mode} quantizer failed "
                              f"({type(e).__name__}: {str(e).strip()[:300]})") from None
    ops = [n for n in out.graph.node if n.op_type == QUANTIZED_OP[mode]]
    quantized = len(ops)
    if quantized != len(targets):
        raise ExportError(f"{path}: ONNX Runtime's {mode} quantizer rewrote {quantized} of the "
                          f"{len(targets)} frozen MatMul weights")
    if _interface(out.graph) != interface:
        raise ExportError(f"{path}: quantizing changed the graph's inputs or outputs; refusing to write it")
    added = sum(tensor_bytes(i) for i in out.graph.initializer if i.name not in before)
    _write(out, path)
    eight_bit = quantized if mode == "int8-dynamic" else sum(int_attribute(n, "bits") == 8 for n in ops)
    return {"mode": mode, "recipe": asdict(recipe), "quantized": quantized, "eight_bit": eight_bit,
            "embedding_tables": len(tables["tables"]), "tied_tables": tables["tied"],
            "weight_bytes_fp32": fp32_bytes + tables["fp32_bytes"], "weight_bytes_quantized": added,
            "file_bytes_before": file_bytes_before, "file_bytes_after": _file_bytes(path)}


def _prepare(path: Path) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Load ``path`` (with its external data) and bring every frozen Linear into ``MatMul(x, W)`` form."""
    try:
        model = onnx.load(str(path))
    except (OSError, DecodeError) as e:
        raise ExportError(f"{path}: cannot load the ONNX model ({type(e).__name__}: {e})") from None
    _fold_weight_transposes(model.graph)
    _gemm_to_matmul(model.graph)
    targets = _frozen_matmuls(model.graph)
    if not targets:
        raise ExportError(f"{path}: no MatMul has a frozen (initializer) weight; nothing to quantize "
                          "(are all weights trainable?)")
    return model, targets


def _interface(graph: onnx.GraphProto) -> tuple[tuple[str, ...], ...]:
    """Names, element types and shapes of the graph's inputs and outputs."""
    return tuple(
        (v.name, str(v.type.tensor_type.elem_type), str(v.type.tensor_type.shape))
        for v in (*graph.input, *graph.output)
    )


def _frozen_weights(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
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


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers in ``names`` that no node reads any more (a tied embedding keeps its Gather)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [i for i in graph.initializer if i.name in names and i.name not in used]
    for init in dead:
        graph.initializer.remove(init)


def _fold_weight_transposes(graph: onnx.GraphProto) -> None:
    """``MatMul(x, Transpose(W))`` -> ``MatMul(x, W.T)`` with ``W.T`` a new initializer.

    Only Transposes of a frozen weight whose every consumer is a MatMul's B operand are folded:
    elsewhere a transposed copy would only add fp32 bytes. W itself is removed unless another
    node still reads it (a tied embedding / lm_head: the Gather keeps the fp32 table).
    """
    frozen = _frozen_weights(graph)
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
    _drop_unused(graph, {n.input[0] for n in folded})


def _gemm_to_matmul(graph: onnx.GraphProto) -> None:
    """``Gemm(A, W, C, transB=1)`` with a frozen W -> ``MatMul(A, W.T)`` (+ ``Add(., C)``).

    Only the plain Linear form (alpha = beta = 1, transA = 0) is rewritten; C may be a trainable
    bias (a graph input): the Add reads it as the Gemm did (C broadcasts to [M, N] either way).
    """
    frozen = _frozen_weights(graph)
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
    _drop_unused(graph, {gemm.input[1] for gemm, _ in rewritten})


def _frozen_matmuls(graph: onnx.GraphProto) -> dict[str, str]:
    """``{MatMul node name: weight name}`` for every MatMul whose B is a 2-D frozen initializer.

    Unnamed nodes get a name: ``quantize_dynamic`` selects nodes by name.
    """
    frozen = _frozen_weights(graph)
    names = Counter(n.name for n in graph.node)
    targets: dict[str, str] = {}
    for k, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in frozen or len(frozen[node.input[1]].dims) != 2:
            continue
        if not node.name or names[node.name] > 1:
            node.name = f"{node.name or 'MatMul'}_{k}"
        targets[node.name] = node.input[1]
    return targets


def _stage(model: onnx.ModelProto, workdir: Path) -> Path:
    """The prepared graph on disk, weights as external data (any size)."""
    staged = workdir / "prepared.onnx"
    onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="prepared.onnx.data", size_threshold=1024)
    return staged


def _int8_dynamic(staged: Path, nodes: list[str]) -> onnx.ModelProto:
    """Dynamic int8: per-output-channel signed weights, uint8 activations (ORT's only dynamic type).

    ``nodes_to_quantize`` pins the exact MatMuls. ORT's default ``MatMulConstBOnly`` already skips
    a MatMul whose B is not an initializer (a trainable graph input, or attention's
    activation x activation products): checked, but not relied on.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = staged.with_name("int8.onnx")
    # External data always: the result is read back and saved under the bundle's names by ``_write``.
    quantize_dynamic(staged, out, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                     per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True)
    return onnx.load(str(out))


def _nbits(model: onnx.ModelProto, targets: dict[str, str], recipe: QuantRecipe) -> onnx.ModelProto:
    """Block-wise weight-only quantization (round to nearest) -> ``MatMulNBits``, in place: 8 bits for the
    weights an int8 recipe or an int4 recipe's ``eight_bit`` regex names, then 4 bits for the rest.

    Opset 20 / IR 10 need no change: the quantizer adds the ``com.microsoft`` opset itself, and
    MatMulNBits stores packed uint8 (no INT4 tensor type, which would need opset 21). It visits
    every MatMul and skips those whose B is not an initializer, which after ``_prepare`` leaves
    exactly the frozen weights. Its ``nodes_to_include`` widens its choice rather than narrowing it,
    so each pass names the nodes it must leave in ``nodes_to_exclude``.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    eight = {node for node, weight in targets.items() if recipe.bits_for(weight) == 8}
    for bits, chosen in ((8, eight), (4, set(targets) - eight)):
        if not chosen:
            continue
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=recipe.block_size,
                                         is_symmetric=recipe.symmetric, accuracy_level=recipe.accuracy_level,
                                         nodes_to_exclude=sorted(set(targets) - chosen))
        quantizer.process()
        model = quantizer.model.model
    return model





def _external_data(path: Path) -> str:
    """A graph's external data file: model.onnx.data for model.onnx (trunk.onnx.data for a split's trunk)."""
    return path.name + ".data"


def _file_bytes(path: Path) -> int:
    data = path.parent / _external_data(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _write(model: onnx.ModelProto, path: Path) -> None:
    """Save next to ``path`` (weights in ``<name>.data``, as every graph of a bundle) and rename over it.

    The external data is renamed into place just before the graph that reads it: the one moment the pair
    is inconsistent is between two renames.
    """
    data = path.parent / _external_data(path)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        save_graph(model, staged)
        if (Path(tmp) / data.name).is_file():
            os.replace(Path(tmp) / data.name, data)
        elif data.is_file():  # no initializer large enough for external data
            data.unlink()
        os.replace(staged, path)


def _not_preprocess_advice(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _contained_ort_logging() -> Iterator[None]:
    """Keep ORT's quantization logging out of the caller's: importing ``matmul_nbits_quantizer``
    calls ``logging.basicConfig(level=INFO)`` (one INFO line per node follows), and
    ``quantize_dynamic`` warns on the root logger to run ``quant_pre_process`` first. That tool
    optimizes the graph (fusions can swallow trainable inputs): we quantize the graph as it is.
    """
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its basicConfig, undone below)

    root.setLevel(logging.WARNING)
    root.addFilter(_not_preprocess_advice)
    try:
        yield
    finally:
        root.removeFilter(_not_preprocess_advice)
        root.setLevel(level)
        root.handlers[:] = handlers
