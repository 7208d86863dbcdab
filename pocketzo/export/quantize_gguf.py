"""``--quantize gguf``: the frozen weights keep the GGUF's own quantization, with no second rounding.

The float32 model a GGUF export traces is the GGUF dequantized (``qwen_convert``, or transformers reading the
file). Here each frozen weight of the loss graph goes back to the GGUF block it was dequantized from, unpacked by
``gguf_blocks`` into ONNX Runtime's block-quantized form:

- a frozen MatMul weight (in ``MatMul(x, W.T)`` form, ``linear_form``) becomes ``MatMulNBits`` over its blocks; a
  Q4_K weight's minimums are subtracted after it, as ``MatMul(block sums of x, mins.T)``: one more product of
  1/32 of the size, exact where a zero point cannot be (a sub-block with scale 0 and a minimum);
- a frozen table read by Gathers (the token embedding; a prompt head's label rows of the LM head) becomes
  ``GatherBlockQuantized`` (uint8 zero points, the only kind it takes), minus its gathered minimums for Q4_K.

Every weight is checked on the way: its blocks must dequantize to exactly the float32 initializer they replace
(the model was converted from this very file), else the export stops. Only qwen2 GGUFs are mapped (their tensor
names, ``qwen_convert.hf_name``; llama.cpp permutes a llama's q/k rows, which this does not undo).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pocketzo.errors import ExportError
from pocketzo.export.gguf_blocks import Blocks, unpack
from pocketzo.export.linear_form import drop_unused, frozen_weights
from pocketzo.export.quantize import _file_bytes, _interface, _prepare, _write
from pocketzo.export.quantize_embedding import gathered_tables
from pocketzo.export.qwen_convert import hf_name

MS_DOMAIN = "com.microsoft"


def quantize_from_gguf(model_path: Path, gguf_path: Path) -> dict:
    """Rewrite ``model_path`` in place with its frozen weights in the GGUF's blocks; returns stats."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch != "qwen2":
        raise ExportError(f"--quantize gguf maps qwen2 GGUFs only; {gguf_path} is {arch!r} (use --quantize int8)")
    tensors = {hf_name(t.name): t for t in reader.tensors}
    before = _file_bytes(model_path)
    model, targets = _prepare(model_path)
    graph, interface = model.graph, _interface(model.graph)
    frozen = frozen_weights(graph)
    nodes = {n.name: n for n in graph.node}
    kinds: dict[str, int] = {}
    replaced: set[str] = set()
    for node_name, weight in targets.items():
        if not weight.endswith(".T") or weight[:-2] not in tensors:
            raise ExportError(f"--quantize gguf: the frozen weight {weight} is not a transposed GGUF tensor")
        blocks = _blocks(tensors[weight[:-2]], numpy_helper.to_array(frozen[weight]).T, weight[:-2])
        _matmul(graph, nodes[node_name], blocks, weight[:-2])
        kinds[tensors[weight[:-2]].tensor_type.name] = kinds.get(tensors[weight[:-2]].tensor_type.name, 0) + 1
        replaced.add(weight)
    readers = {name: nodes for name, nodes in gathered_tables(graph, frozen).items() if name in tensors}
    tables = list(readers)
    for name, gathers in readers.items():
        blocks = _blocks(tensors[name], numpy_helper.to_array(frozen[name]), name)
        for gather in gathers:
            _gather(graph, gather, blocks, name)
        kinds[tensors[name].tensor_type.name] = kinds.get(tensors[name].tensor_type.name, 0) + 1
    drop_unused(graph, replaced | set(tables))
    left = [n for n, t in frozen.items() if len(t.dims) == 2 and n not in replaced | set(tables)]
    if left:
        raise ExportError(f"--quantize gguf: frozen float32 matrices are left ({left[:3]}); they have no GGUF block")
    if _interface(graph) != interface:
        raise ExportError(f"{model_path}: quantizing changed the graph's inputs or outputs; refusing to write it")
    _write(model, model_path)
    return {"mode": "gguf", "gguf": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size, "block_types": kinds,
            "quantized": len(targets), "embedding_tables": len(tables), "file_bytes_before": before,
            "file_bytes_after": _file_bytes(model_path)}


def _blocks(tensor, weight: np.ndarray, name: str) -> Blocks:
    """The GGUF tensor's blocks, checked to dequantize to ``weight`` ([rows, cols]) exactly."""
    try:
        blocks = unpack(tensor.data, tensor.tensor_type.name, weight.shape)
    except ValueError as e:
        raise ExportError(f"--quantize gguf: {name}: {e}") from None
    if not np.array_equal(blocks.dequantize(), weight):
        raise ExportError(f"--quantize gguf: {name} is not what the GGUF's blocks dequantize to; export the model "
                          "converted from this GGUF (pocketzo assets), or give --gguf the file it came from")
    return blocks


def _add(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def _zero_points(blocks: Blocks, per_block_axis: bool) -> np.ndarray:
    """uint8 zero points, one per block: MatMulNBits packs two 4-bit ones per byte along the blocks
    (``per_block_axis``), GatherBlockQuantized keeps one per trailing entry (its low nibble)."""
    rows, cols = blocks.shape
    n_blocks = cols // blocks.block_size
    zero = np.full((rows, n_blocks), blocks.zero_point, np.uint8)
    if not per_block_axis:
        return zero[..., None]
    if blocks.bits == 4:
        zero = np.pad(zero, ((0, 0), (0, n_blocks % 2)))
        zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return zero.reshape(-1)


def _insert(graph: onnx.GraphProto, at: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    k = list(graph.node).index(at)
    graph.node.remove(at)
    for i, node in enumerate(new):
        graph.node.insert(k + i, node)


def _matmul(graph: onnx.GraphProto, node: onnx.NodeProto, blocks: Blocks, name: str) -> None:
    """``MatMul(x, W.T)`` -> ``MatMulNBits(x, blocks)`` (minus ``MatMul(block sums of x, mins.T)`` for Q4_K)."""
    rows, cols = blocks.shape  # N, K
    x, out = node.input[0], node.output[0]
    inputs = [x, _add(graph, f"{name}_gguf_q{blocks.bits}", blocks.packed()),
              _add(graph, f"{name}_gguf_scales", blocks.scales.reshape(-1)),
              _add(graph, f"{name}_gguf_zero_points", _zero_points(blocks, True))]
    product = out if blocks.mins is None else f"{out}_blocks"
    new = [helper.make_node("MatMulNBits", inputs, [product], name=f"{node.name}_gguf", domain=MS_DOMAIN, K=cols,
                            N=rows, bits=blocks.bits, block_size=blocks.block_size, accuracy_level=0)]
    if blocks.mins is not None:
        n_blocks = cols // blocks.block_size
        shape = _add(graph, f"{name}_gguf_block_shape", np.array([n_blocks, blocks.block_size], np.int64))
        new += [
            helper.make_node("Shape", [x], [f"{out}_x_shape"], end=-1),
            helper.make_node("Concat", [f"{out}_x_shape", shape], [f"{out}_x_block_shape"], axis=0),
            helper.make_node("Reshape", [x, f"{out}_x_block_shape"], [f"{out}_x_blocks"]),
            helper.make_node("ReduceSum", [f"{out}_x_blocks", _add(graph, f"{name}_gguf_last", np.array([-1]))],
                             [f"{out}_x_block_sums"], keepdims=0),  # (..., blocks)
            helper.make_node("MatMul", [f"{out}_x_block_sums", _add(graph, f"{name}_gguf_mins", blocks.mins.T)],
                             [f"{out}_mins"]),
            helper.make_node("Sub", [product, f"{out}_mins"], [out]),
        ]
    _insert(graph, node, new)


def _gather(graph: onnx.GraphProto, gather: onnx.NodeProto, blocks: Blocks, name: str) -> None:
    """``Gather(W, ids)`` -> ``GatherBlockQuantized`` over the blocks (minus the gathered mins for Q4_K),
    reshaped back to (..., hidden)."""
    cols = blocks.shape[1]
    ids, out = gather.input[1], gather.output[0]
    stem = f"{out}_gguf"
    data = f"{name}_gguf_table_q{blocks.bits}"
    if data not in {i.name for i in graph.initializer}:  # a second Gather of the same table shares it
        _add(graph, data, blocks.packed())
        _add(graph, f"{name}_gguf_table_scales", blocks.scales[..., None])
        _add(graph, f"{name}_gguf_table_zero_points", _zero_points(blocks, False))
        if blocks.mins is not None:
            _add(graph, f"{name}_gguf_table_mins", blocks.mins[..., None])
    hidden = _add(graph, f"{stem}_hidden", np.array([cols], np.int64))
    new = [helper.make_node("GatherBlockQuantized", [data, ids, f"{name}_gguf_table_scales",
                                                     f"{name}_gguf_table_zero_points"], [f"{stem}_blocks"],
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=blocks.block_size,
                            bits=blocks.bits)]
    rows_out = f"{stem}_blocks"
    if blocks.mins is not None:
        new += [helper.make_node("Gather", [f"{name}_gguf_table_mins", ids], [f"{stem}_mins"], axis=0),
                helper.make_node("Sub", [f"{stem}_blocks", f"{stem}_mins"], [f"{stem}_shifted"])]
        rows_out = f"{stem}_shifted"
    new += [helper.make_node("Shape", [ids], [f"{stem}_ids_shape"]),
            helper.make_node("Concat", [f"{stem}_ids_shape", hidden], [f"{stem}_shape"], axis=0),
            helper.make_node("Reshape", [rows_out, f"{stem}_shape"], [out])]
    _insert(graph, gather, new)
