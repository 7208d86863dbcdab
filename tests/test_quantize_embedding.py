"""Embedding tables block-quantized by ``export --quantize`` (GatherBlockQuantized), alone and tied to an LM head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pocketzo.export.config import QuantRecipe
from pocketzo.export.quantize import quantize_frozen

ROWS, HIDDEN = 50, 64


def _graph(tmp_path: Path, tied: bool) -> tuple[Path, np.ndarray, np.ndarray]:
    """ids -> Gather(table) -> rows; rows -> MatMul(., Transpose(head)) -> logits, as the exporter writes them.

    ``tied``: the head is the table itself (one initializer read by the Gather and the Transpose).
    """
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.5, (ROWS, HIDDEN)).astype(np.float32)
    table[3] += 2.0  # one row far from zero: a wrong zero point or scale shows as an offset
    head = table if tied else rng.normal(0, 0.5, (ROWS, HIDDEN)).astype(np.float32)
    inits = [numpy_helper.from_array(table, "embed.weight")]
    if not tied:
        inits.append(numpy_helper.from_array(head, "head.weight"))
    nodes = [
        helper.make_node("Gather", ["embed.weight", "ids"], ["rows"]),
        helper.make_node("Transpose", ["embed.weight" if tied else "head.weight"], ["head_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["rows", "head_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["B", "T", HIDDEN]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", ROWS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path, table, head


def _run(path: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(["rows", "logits"], session.run(["rows", "logits"], {"ids": ids}), strict=True))


def _block_scales(graph: onnx.GraphProto) -> np.ndarray:
    """The Gather's scales, one per (row, block)."""
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    inits = {i.name: i for i in graph.initializer}
    return numpy_helper.to_array(inits[gather.input[2]])[:, :, 0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_rows_are_the_table_within_a_step(tied, mode, symmetric, tmp_path):
    path, table, head = _graph(tmp_path, tied)
    ids = np.array([[0, 3, 7, 49], [3, 3, 1, 2]], dtype=np.int64)
    fp32 = _run(path, ids)

    stats = quantize_frozen(path, QuantRecipe(mode, block_size=16, symmetric=symmetric))
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "Gather" not in ops and ops.count("GatherBlockQuantized") == 1
    assert (stats["embedding_tables"], stats["tied_tables"]) == (1, int(tied))
    floats = [i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
              and i.dims[1] == HIDDEN]
    assert floats == []  # no float32 copy of either table is left

    out = _run(path, ids)
    assert out["rows"].shape == fp32["rows"].shape
    error = np.abs(out["rows"] - table[ids])  # (B, T, HIDDEN)
    step = np.abs(np.repeat(_block_scales(graph)[ids], 16, axis=-1))  # each value's step (symmetric: signed)
    # rounding: half a step; a symmetric grid's one clamped end (-2^(b-1)..2^(b-1)-1): up to a whole step
    assert np.all(error <= step * (1 + 1e-5)), float((error / step).max())
    assert 0 < (error / step).mean() <= 0.3  # rounding averages a quarter step; a wrong zero point is >= 1
    # the head still computes logits from its own (quantized) weights
    head_error = np.abs(out["logits"] - out["rows"] @ head.T).max()
    assert head_error <= (0.05 if mode == "int8" else 0.5) * np.abs(fp32["logits"]).max()


def test_a_tied_table_is_stored_once_at_the_heads_bits(tmp_path):
    path, _, _ = _graph(tmp_path, tied=True)
    quantize_frozen(path, QuantRecipe("int4", block_size=16, eight_bit=r"\.T$"))  # the head's name only
    graph = onnx.load(str(path)).graph
    head = next(n for n in graph.node if n.op_type == "MatMulNBits")
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert gather.input[0] == head.input[1]  # the same initializer: the table's bytes are stored once
    bits = {n.op_type: next(a.i for a in n.attribute if a.name == "bits") for n in (head, gather)}
    assert bits == {"MatMulNBits": 8, "GatherBlockQuantized": 8}
    quantized = [i for i in graph.initializer if i.data_type == TensorProto.UINT8]
    assert len(quantized) == 1


def test_a_table_read_by_two_gathers_is_quantized_once_for_both(tmp_path):
    path, table, _ = _graph(tmp_path, tied=False)
    model = onnx.load(str(path))
    model.graph.node.insert(1, helper.make_node("Gather", ["embed.weight", "ids"], ["rows2"]))
    model.graph.node.append(helper.make_node("Add", ["rows", "rows2"], ["twice"]))
    model.graph.output.append(helper.make_tensor_value_info("twice", TensorProto.FLOAT, ["B", "T", HIDDEN]))
    onnx.save(model, str(path))
    stats = quantize_frozen(path, QuantRecipe("int8", block_size=16))
    graph = onnx.load(str(path)).graph
    assert stats["embedding_tables"] == 1
    assert [n.input[0] for n in graph.node if n.op_type == "GatherBlockQuantized"] == ["embed.weight_gather_Q8"] * 2
    ids = np.array([[5, 3]], dtype=np.int64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows, twice = session.run(["rows", "twice"], {"ids": ids})
    np.testing.assert_array_equal(twice, 2 * rows)
    assert np.abs(rows - table[ids]).max() < 0.05


def test_a_table_something_else_reads_stays_float32(tmp_path):
    path, _, _ = _graph(tmp_path, tied=False)
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("ReduceSum", ["embed.weight"], ["table_sum"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("table_sum", TensorProto.FLOAT, []))
    onnx.save(model, str(path))
    stats = quantize_frozen(path, QuantRecipe("int8", block_size=16))
    assert stats["embedding_tables"] == 0
    assert "Gather" in {n.op_type for n in onnx.load(str(path)).graph.node}


def test_a_table_whose_width_is_not_a_whole_number_of_blocks_stays_float32(tmp_path):
    path, _, _ = _graph(tmp_path, tied=False)
    stats = quantize_frozen(path, QuantRecipe("int8", block_size=128))  # HIDDEN = 64 < one block
    assert stats["embedding_tables"] == 0
    assert "Gather" in {n.op_type for n in onnx.load(str(path)).graph.node}
