"""Trace a loss head to ONNX, name the graph's weights as Hugging Face does, make the trainable ones inputs.

``trace_onnx`` is ``torch.onnx.export(dynamo=True, optimize=False)``, which names initializers after the
traced module's parameters (with its own prefixes, and a tied embedding / LM head under one of its names).
Every graph of a bundle (loss, gradient, trunk, head) goes through ``lift_trainable``, so a tensor has the
same name in all of them and in the manifest.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from pocketzo.errors import ExportError


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (its data may live in an external file)."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize


WEIGHT_MIN_BYTES = 1024  # smaller initializers (shapes, scalars) stay inside the graph file


def save_graph(proto: onnx.ModelProto, path: Path, shared: Path | None = None) -> None:
    """Write ``proto`` at ``path`` with its weights as ONNX external data in ``<name>.data`` beside it
    (``model.onnx.data``).

    ONNX Runtime memory-maps external data, so a session's frozen weights stay page cache backed by the
    bundle's file (which the OS can drop and re-read) unless the session copies them (prepacking, constant
    folding; ``runtime.session.SessionConfig.map_weights``). With ``shared``, the path of a graph of the same
    bundle already saved this way, a weight stored there under the same name with the same bytes is referenced
    in place and the rest stays inside the graph file: the gradient graph adds no second copy of the weights.
    """
    if shared is None:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=WEIGHT_MIN_BYTES)
        return
    data_file = shared.parent / (shared.name + ".data")
    if not data_file.is_file():  # no frozen weight large enough (e.g. every weight trainable)
        onnx.save_model(proto, str(path))
        return
    stored = {t.name: t for t in onnx.load(str(shared), load_external_data=False).graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL}
    data = np.memmap(data_file, dtype=np.uint8, mode="r")
    for tensor in proto.graph.initializer:
        twin = stored.get(tensor.name)
        if twin is None or twin.data_type != tensor.data_type or list(twin.dims) != list(tensor.dims):
            continue
        where = {e.key: e.value for e in twin.external_data}
        start, length = int(where.get("offset", 0)), int(where["length"])
        if numpy_helper.to_array(tensor).tobytes() != data[start : start + length].tobytes():
            continue
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.external_data.extend(twin.external_data)
        tensor.data_location = onnx.TensorProto.EXTERNAL
    del data
    onnx.save_model(proto, str(path))


def trace_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
               dynamic_shapes: dict[str, dict[int, Any]]) -> onnx.ModelProto:
    """The ONNX graph of ``module`` on ``args`` (``dynamic_shapes`` by forward-argument name), default domain."""
    with warnings.catch_warnings():  # the exporter's deprecation and axis-naming chatter
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category=category)
        program = torch.onnx.export(module, args, dynamo=True, optimize=False, verbose=False,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes)
    return program.model_proto


def parameters(wrapper: nn.Module) -> dict[str, nn.Parameter]:
    """A loss head's parameters under Hugging Face names (the wrapped model's, without "net.")."""
    return {n.removeprefix("net."): p for n, p in wrapper.named_parameters()}


def canonical_names(wrapper: nn.Module) -> dict[int, str]:
    """id(parameter) -> its canonical name: the first of its names (a tied embedding / LM head is one tensor)."""
    first: dict[int, str] = {}
    for name, p in wrapper.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name.removeprefix("net."))
    return first


def lift_trainable(model: onnx.ModelProto, wrapper: nn.Module, trainable: list[str], strip: str = "",
                   names: dict[int, str] | None = None) -> list[str]:
    """Rename initializers to canonical HF names and make the trainable ones graph inputs; return those lifted.

    ``strip``: a prefix of the traced module's own names. ``names``: canonical names by parameter id, when
    ``wrapper`` is a view whose own names differ (a split's head, whose layer list starts at the split)."""
    graph = model.graph
    names = names if names is not None else canonical_names(wrapper)
    canonical = {name.removeprefix("net."): names[id(p)]
                 for name, p in wrapper.named_parameters(remove_duplicate=False)}
    rename = {}
    for init in graph.initializer:
        bare = init.name.removeprefix(strip).removeprefix("net.")
        rename[init.name] = canonical.get(bare, bare)
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"the exported graph has a control-flow node {node.op_type}; not supported yet")
        node.input[:] = [rename.get(i, i) for i in node.input]
    for init in graph.initializer:
        init.name = rename[init.name]
    present = {init.name: init for init in graph.initializer}
    wanted = set(trainable)
    lifted = [n for n in trainable if n in present]
    for missing in wanted - set(lifted):
        print(f"[export] warning: {missing} is not used by the loss graph; left out of the trainable set",
              file=sys.stderr, flush=True)
    kept = [init for init in graph.initializer if init.name not in wanted]
    shapes = {names[id(p)]: tuple(p.shape) for p in wrapper.parameters()}
    for name in lifted:
        init = present[name]
        if tuple(init.dims) != shapes[name] or init.data_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"graph tensor {name} is {list(init.dims)}, but the model's is {list(shapes[name])}")
        graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(init.dims)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return lifted
