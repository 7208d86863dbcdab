"""GGUF blocks unpacked for ONNX Runtime: against gguf's reference dequantization, and through the operators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pocketzo.export.gguf_blocks import SUPPORTED, unpack
from pocketzo.export.quantize_gguf import _gather, _matmul

# bytes per block, values per block, and where a block's f16 factors sit (offsets)
LAYOUT = {"Q8_0": (34, 32, (0,)), "Q5_0": (22, 32, (0,)), "Q4_0": (18, 32, (0,)), "Q6_K": (210, 256, (208,)),
          "Q4_K": (144, 256, (0, 2))}


def _random_tensor(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every field, with finite f16 factors (random f16 bits would hold inf and NaN)."""
    size, per, f16_at = LAYOUT[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    for at in f16_at:
        raw[..., at : at + 2] = rng.uniform(1e-3, 0.1, (rows, cols // per)).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", SUPPORTED)
def test_blocks_dequantize_as_gguf_does(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, cols = 6, 512
    raw = _random_tensor(kind, rows, cols)
    blocks = unpack(raw, kind, (rows, cols))
    want = dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, cols)
    assert blocks.q.max() < 2**blocks.bits and blocks.q.shape == (rows, cols)
    np.testing.assert_array_equal(blocks.dequantize(), want)


def _run(nodes, inputs: dict[str, np.ndarray], initializers: dict[str, np.ndarray], rewrite) -> np.ndarray:
    """The one-node graph ``nodes`` after ``rewrite(graph, node)``, run in ONNX Runtime."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, numpy_helper.from_array(v).data_type,
                                                                        list(v.shape)) for k, v in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    rewrite(graph, graph.node[0])
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


@pytest.mark.parametrize("kind", SUPPORTED)
def test_a_matmul_over_the_blocks_computes_the_dequantized_product(kind):
    """MatMul(x, W.T) rewritten to MatMulNBits over the blocks (Q4_K: minus its mins' product) equals x @ W.T of the
    dequantized W, to float32 rounding; on a 3-D x, as the loss graph feeds it."""
    rows, cols = 8, 512
    blocks = unpack(_random_tensor(kind, rows, cols, seed=1), kind, (rows, cols))
    x = np.random.default_rng(2).standard_normal((2, 3, cols)).astype(np.float32)
    weight = blocks.dequantize()
    got = _run([helper.make_node("MatMul", ["x", "w.T"], ["y"], name="mm")], {"x": x}, {"w.T": weight.T},
               lambda graph, node: _matmul(graph, node, blocks, "w"))
    want = x @ weight.T
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("kind", SUPPORTED)
def test_a_gather_of_the_blocks_gives_the_dequantized_rows(kind):
    rows, cols = 12, 512
    blocks = unpack(_random_tensor(kind, rows, cols, seed=3), kind, (rows, cols))
    ids = np.array([[3, 7, 0], [11, 3, 5]], np.int64)
    got = _run([helper.make_node("Gather", ["table", "ids"], ["y"], name="g")], {"ids": ids},
               {"table": blocks.dequantize()}, lambda graph, node: _gather(graph, node, blocks, "table"))
    np.testing.assert_allclose(got, blocks.dequantize()[ids], rtol=0, atol=1e-6 * np.abs(got).max())


def test_an_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="no exact ONNX Runtime form"):
        unpack(np.zeros((1, 176), np.uint8), "Q5_K", (1, 256))


def test_quantize_from_gguf_rewrites_every_frozen_matrix(tmp_path):
    """A qwen2-named graph (a Q4_K Linear, a Q6_K Linear, a Q5_0 embedding) against a GGUF holding those blocks:
    every frozen matrix becomes the blocks, the outputs stay what the float32 graph computes, and a weight that is
    not what the file's blocks dequantize to is refused."""
    import onnx
    from gguf import GGMLQuantizationType, GGUFWriter

    from pocketzo.errors import ExportError
    from pocketzo.export.quantize_gguf import quantize_from_gguf

    hidden, inner, vocab = 256, 512, 16
    specs = {"blk.0.ffn_down.weight": ("Q4_K", inner, hidden), "blk.0.ffn_up.weight": ("Q6_K", hidden, inner),
             "token_embd.weight": ("Q5_0", hidden, vocab)}  # name: type, cols (K), rows (N)
    writer = GGUFWriter(tmp_path / "m.gguf", "qwen2")
    weights = {}
    for k, (name, (kind, cols, rows)) in enumerate(specs.items()):
        raw = _random_tensor(kind, rows, cols, seed=10 + k)
        weights[name] = unpack(raw, kind, (rows, cols)).dequantize()
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def graph_file(up: np.ndarray) -> Path:
        nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", "ids"], ["h"], name="embed"),
                 helper.make_node("Transpose", ["model.layers.0.mlp.up_proj.weight"], ["up.T"], perm=[1, 0]),
                 helper.make_node("MatMul", ["h", "up.T"], ["u"], name="up"),
                 helper.make_node("Transpose", ["model.layers.0.mlp.down_proj.weight"], ["down.T"], perm=[1, 0]),
                 helper.make_node("MatMul", ["u", "down.T"], ["y"], name="down")]
        inits = {"model.embed_tokens.weight": weights["token_embd.weight"], "model.layers.0.mlp.up_proj.weight": up,
                 "model.layers.0.mlp.down_proj.weight": weights["blk.0.ffn_down.weight"]}
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()])
        path = tmp_path / "model.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
        return path

    ids = np.array([[3, 15, 0]], np.int64)
    want = weights["token_embd.weight"][ids] @ weights["blk.0.ffn_up.weight"].T @ weights["blk.0.ffn_down.weight"].T
    path = graph_file(weights["blk.0.ffn_up.weight"])
    stats = quantize_from_gguf(path, tmp_path / "m.gguf")
    assert stats["block_types"] == {"Q4_K": 1, "Q6_K": 1, "Q5_0": 1} and stats["quantized"] == 2
    model = onnx.load(path)
    assert not [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
                and "_gguf_" not in i.name]  # no float32 copy of a weight is left, only Q4_K's mins
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ExportError, match="not what the GGUF's blocks dequantize to"):
        quantize_from_gguf(graph_file(weights["blk.0.ffn_up.weight"] * 1.001), tmp_path / "m.gguf")
