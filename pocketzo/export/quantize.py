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

Both tools only quantize ``MatMul(A, B)`` with B an initializer, so the graph's frozen Linears are first
brought into that form (``linear_form``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from pocketzo.errors import ExportError
from pocketzo.export.config import QuantRecipe
from pocketzo.export.linear_form import (
    drop_unused,
    fold_weight_transposes,
    frozen_matmuls,
    frozen_weights,
    gemm_to_matmul,
)
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
                tables = quantize_embeddings(out.graph, frozen_weights(out.graph), recipe)
                drop_unused(out.graph, set(tables["tables"]))
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
    fold_weight_transposes(model.graph)
    gemm_to_matmul(model.graph)
    targets = frozen_matmuls(model.graph)
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
