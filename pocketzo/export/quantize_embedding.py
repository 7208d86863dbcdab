"""Block-quantized embedding tables: ``Gather(W, ids)`` -> ``com.microsoft.GatherBlockQuantized``.

Once ``quantize._nbits`` has quantized the MatMul weights, the float32 tables that Gathers read (the token
embedding; OPT's learned positions) are the largest float32 tensors left in a weight-only bundle: SmolLM2-135M's
token table is 113 MB of its 538 MB. Each is stored as MatMulNBits stores a weight: ``block_size`` values along
the hidden axis per block, 8 or 4 bits each in uint8 bytes (4 bits: two per byte, low nibble first), one float32
scale per block and, when not symmetric, a zero point. The numbers come from ONNX Runtime's own block quantizer
(``quantize_matmul_8bits`` / ``_4bits``, the routine ``MatMulNBitsQuantizer`` calls), so a table and a MatMul
weight made from the same float32 values hold the same bytes.

That is what a tied LM head is: after ``linear_form.fold_weight_transposes`` it reads ``W.T``, which the MatMulNBits
quantizer stored as ``W.T_Q<bits>`` ([rows, blocks, bytes per block]). The Gather then reads that initializer
too, so the table is stored once, at the head's precision.

GatherBlockQuantized gathers rows of the 3-D block array and dequantizes them to [..., blocks, block_size]; a
Reshape restores [..., hidden]. Without zero points it takes 2^(bits-1) as the zero point of uint8 data, as
MatMulNBits does, so both read the bytes the same way.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from pocketzo.export.config import QuantRecipe

MS_DOMAIN = "com.microsoft"


def quantize_embeddings(graph: onnx.GraphProto, frozen: dict[str, onnx.TensorProto], recipe: QuantRecipe) -> dict:
    """Rewrite the Gathers (axis 0) of every 2-D frozen float32 table in ``graph`` as GatherBlockQuantized.

    ``frozen`` maps the graph's frozen float32 initializers by name (``linear_form.frozen_weights``). Only a table
    that axis-0 Gathers alone read is rewritten (anything else reading it would keep the float32 copy too),
    and only if its width is a whole number of ``block_size`` blocks. Its bits follow ``recipe.bits_for`` of its
    name; a table tied to a quantized LM head takes the head's bits and bytes. Returns ``{"tables": names,
    "tied": n, "fp32_bytes": n}``: the tables rewritten (the caller drops their float32 initializers), how many
    read a head's bytes, and the float32 bytes of the others.
    """
    inits = {i.name: i for i in graph.initializer}
    head_bits = {n.input[1]: int_attribute(n, "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    readers = gathered_tables(graph, frozen)
    tables = [name for name in readers if frozen[name].dims[1] % recipe.block_size == 0]
    tied = fp32_bytes = 0
    for name in tables:
        table = frozen[name]
        # a tied head reads W.T (linear_form._add_transposed), which the MatMulNBits quantizer stored as W.T_Q<bits>
        shared = next((q for b in (8, 4) if (q := f"{name}.T_Q{b}") in head_bits and head_bits[q] == b), None)
        if shared is not None:
            bits = head_bits[shared]
            blocks = _tied_blocks(graph, inits, shared, name, bits, recipe)
            tied += 1
        else:
            bits = recipe.bits_for(name)
            blocks = _quantized_blocks(graph, inits, table, bits, recipe)
            fp32_bytes += 4 * int(np.prod(table.dims))
        for gather in readers[name]:
            _replace_gather(graph, gather, blocks, int(table.dims[1]), bits, recipe.block_size)
    return {"tables": tables, "tied": tied, "fp32_bytes": fp32_bytes}


def gathered_tables(graph: onnx.GraphProto, frozen: dict[str, onnx.TensorProto]) -> dict[str, list[onnx.NodeProto]]:
    """The 2-D frozen tables that only axis-0 Gathers read (and that are no graph output), with those Gathers."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) & frozen.keys():
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    return {name: nodes for name, nodes in readers.items()
            if all(n.op_type == "Gather" and n.input[0] == name and int_attribute(n, "axis", 0) == 0 for n in nodes)
            and name not in outputs and len(frozen[name].dims) == 2}


def int_attribute(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    """The integer attribute ``name`` of ``node``, or ``default``."""
    return next((a.i for a in node.attribute if a.name == name), default)


def _tied_blocks(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], data: str, table: str, bits: int,
                 recipe: QuantRecipe) -> list[str]:
    """The Gather's inputs (data, scales[, zero points]) from a tied head's MatMulNBits initializers."""
    scales = numpy_helper.to_array(inits[f"{table}.T_scales"])
    n_blocks = int(inits[data].dims[1])
    scales = scales.reshape(-1, n_blocks)
    blocks = [data, _add(graph, inits, f"{table}_gather_scales", scales[:, :, None])]
    if not recipe.symmetric:
        points = numpy_helper.to_array(inits[f"{table}.T_zero_points"]).reshape(scales.shape[0], -1)
        blocks.append(_add(graph, inits, f"{table}_gather_zero_points", _block_zero_points(points, n_blocks, bits)))
    return blocks


def _quantized_blocks(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], table: onnx.TensorProto, bits: int,
                      recipe: QuantRecipe) -> list[str]:
    """Quantize ``table`` [rows, hidden] block-wise along hidden with ONNX Runtime's MatMulNBits routine."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, hidden = table.dims
    n_blocks, per_byte = hidden // recipe.block_size, 8 // bits
    packed = np.zeros((rows, n_blocks, recipe.block_size // per_byte), dtype=np.uint8)
    scales = np.zeros((rows, n_blocks), dtype=np.float32)
    points = np.zeros((rows, -(-n_blocks // per_byte)), dtype=np.uint8)
    quantize = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    # the routine quantizes a MatMul's B [K, N] along K: the table transposed, K = hidden
    weight = np.ascontiguousarray(numpy_helper.to_array(table).T, dtype=np.float32)
    quantize(packed, weight, scales, points, recipe.block_size, rows, hidden, recipe.symmetric)
    names = [_add(graph, inits, f"{table.name}_gather_Q{bits}", packed),
             _add(graph, inits, f"{table.name}_gather_scales", scales.reshape(rows, n_blocks, 1))]
    if not recipe.symmetric:
        names.append(_add(graph, inits, f"{table.name}_gather_zero_points",
                          _block_zero_points(points, n_blocks, bits)))
    return names


def _add(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], name: str, array: np.ndarray) -> str:
    """``array`` as a new initializer of ``graph`` (and of ``inits``, its index by name)."""
    if name in inits:
        raise ValueError(f"initializer {name!r} exists already")
    inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
    graph.initializer.append(inits[name])
    return name


def _block_zero_points(points: np.ndarray, n_blocks: int, bits: int) -> np.ndarray:
    """MatMulNBits' zero points ([rows, blocks] packed across blocks at 4 bits) as one per block, [rows, blocks, 1].

    GatherBlockQuantized packs 4-bit zero points along the last axis, which has one entry: its low nibble.
    """
    if bits == 8:
        return points[:, :n_blocks, None]
    unpacked = np.stack([points & 0x0F, points >> 4], axis=-1).reshape(points.shape[0], -1)
    return unpacked[:, :n_blocks, None].astype(np.uint8)


def _replace_gather(graph: onnx.GraphProto, gather: onnx.NodeProto, blocks: list[str], hidden: int, bits: int,
                    block_size: int) -> None:
    """``Gather(W, ids)`` -> ``Reshape(GatherBlockQuantized(blocks, ids), Concat(Shape(ids), [hidden]))``, in place."""
    ids, out = gather.input[1], gather.output[0]
    hidden_name = f"{out}_hidden"
    graph.initializer.append(numpy_helper.from_array(np.array([hidden], dtype=np.int64), hidden_name))
    stem = gather.name or out
    data, scales, *points = blocks
    make = onnx.helper.make_node
    nodes = [
        make("GatherBlockQuantized", [data, ids, scales, *points], [f"{out}_blocks"], name=f"{stem}_quantized",
             domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=block_size, bits=bits),
        make("Shape", [ids], [f"{out}_ids_shape"], name=f"{stem}_ids_shape"),
        make("Concat", [f"{out}_ids_shape", hidden_name], [f"{out}_shape"], name=f"{stem}_shape", axis=0),
        make("Reshape", [f"{out}_blocks", f"{out}_shape"], [out], name=f"{stem}_rows"),
    ]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for k, node in enumerate(nodes):
        graph.node.insert(at + k, node)
