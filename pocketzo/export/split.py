"""The frozen-trunk split (``export --split``): the layers below the lowest trainable tensor as a trunk
graph without trainable inputs, the rest and the loss as a head graph.

Both are the bundle's loss head traced again over views of the same model (``_cut``):

- trunk: the layer list cut to [0, s) and the final norm (OPT: and ``project_out``) made identities, so
  the base model's last hidden state is the residual stream entering layer s;
- head: the layer list cut to [s, L) and the embedding step made a pass-through (Llama-like models take
  ``inputs_embeds`` as is; OPT: no positions, no ``project_in``; BERT: the embeddings module passes its
  input on), with the trunk's output fed as ``inputs_embeds``. Masks and positions are rebuilt from
  ``attention_mask`` in the head exactly as in the whole graph.

Parameter ids map the views' names (the head's layer list starts at 0) back to the model's. A model whose
forward does more between its embeddings and its first layer than the above fails the parity check
(trunk then head against PyTorch, and against the whole graph within ``SPLIT_TOLERANCE``) and is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pocketzo.errors import ExportError
from pocketzo.export.adapters import INPUT_SIDE, layer_index
from pocketzo.export.heads import base_model
from pocketzo.export.tracing import canonical_names, lift_trainable, save_graph, trace_onnx
from pocketzo.runtime.manifest import FILE_NAMES, HIDDEN, SplitSpec, ValueSpec

TRUNK, HEAD = FILE_NAMES["trunk_model"], FILE_NAMES["head_model"]
TRUNK_DATA, HEAD_DATA = FILE_NAMES["trunk_data"], FILE_NAMES["head_data"]
# Trunk then head against the whole graph, both in ONNX Runtime: times max(1, |loss|)
SPLIT_TOLERANCE = 1e-5
STACK_NAMES = ("layers", "layer", "h", "blocks")


def layer_stack(net: nn.Module, flag: str = "--split") -> tuple[nn.Module, str]:
    """The module holding the transformer layers and the attribute naming their list (the longest such list)."""
    found = [(name, m) for name, m in net.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in STACK_NAMES]
    if not found:
        raise ExportError(f"{flag}: this model has no transformer layer list (layers, layer, h or blocks)")
    name = max(found, key=lambda item: len(item[1]))[0]
    parent, _, attr = name.rpartition(".")
    return (net.get_submodule(parent) if parent else net), attr


def split_layer(trainable: list[str], n_layers: int, requested: int | None) -> int:
    """The head's first layer: ``requested``, or (None) the lowest layer holding a trainable tensor."""
    below = [n for n in trainable if layer_index(n) is None and INPUT_SIDE.search(n)]
    if below:
        raise ExportError(f"--split: the trainable tensor {below[0]} acts below the first layer, so no layer can be "
                          "frozen below it; freeze it (--freeze) or export without --split")
    if requested is not None and requested > n_layers:
        raise ExportError(f"--split {requested}: the model has {n_layers} layers; give 1 to {n_layers}, or auto")
    lowest = min((k for k in map(layer_index, trainable) if k is not None), default=n_layers)
    if lowest == 0:
        first = next(n for n in trainable if layer_index(n) == 0)
        raise ExportError(f"--split: the trainable tensor {first} is in layer 0, so no layer is frozen below it; "
                          "train only the top layers with --trainable-layers K")
    layer = lowest if requested is None else requested
    if layer > lowest:
        first = next(n for n in trainable if layer_index(n) == lowest)
        raise ExportError(f"--split {layer}: the trainable tensor {first} is in layer {lowest}, below the split; "
                          f"use --split {lowest} or auto")
    return layer


class _Zero(nn.Module):
    """OPT's learned positions in the head: already added in the trunk."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(())


class _PassThrough(nn.Module):
    """BERT's embeddings module in the head: the trunk's hidden state is already embedded."""

    def forward(self, *args, inputs_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
        return inputs_embeds


class _Trunk(nn.Module):
    """input_ids, attention_mask -> the base model's last hidden state (under ``_cut(..., "trunk")``)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return base_model(self.head.net)(**self.head._inputs(input_ids, attention_mask)).last_hidden_state


@contextlib.contextmanager
def _cut(wrapper: nn.Module, layer: int, part: str) -> Iterator[None]:
    """Within the block, ``wrapper``'s model is the trunk's or the head's view (see the module docstring)."""
    net = wrapper.net
    owner, attr = layer_stack(net)
    layers = getattr(owner, attr)
    swaps: list[tuple[nn.Module, str, nn.Module | None]] = []
    if part == "trunk":
        swaps.append((owner, attr, layers[:layer]))
        swaps += [(owner, a, nn.Identity()) for a in ("norm", "final_layer_norm", "ln_f")
                  if isinstance(getattr(owner, a, None), nn.Module)]
        swaps += [(owner, "project_out", None)] if getattr(owner, "project_out", None) is not None else []
    else:
        swaps.append((owner, attr, layers[layer:]))
        swaps += [(owner, "embed_positions", _Zero())] if hasattr(owner, "embed_positions") else []
        swaps += [(owner, "project_in", None)] if getattr(owner, "project_in", None) is not None else []
        base = base_model(net)
        swaps += [(base, "embeddings", _PassThrough())] if isinstance(getattr(base, "embeddings", None),
                                                                     nn.Module) else []
    saved = [(module, a, getattr(module, a)) for module, a, _ in swaps]
    for module, a, value in swaps:
        setattr(module, a, value)
    wrapper.from_hidden = part == "head"
    try:
        yield
    finally:
        wrapper.from_hidden = False
        for module, a, value in reversed(saved):
            setattr(module, a, value)


def export_split(bundle_dir: Path, wrapper: nn.Module, sample: tuple[torch.Tensor, ...], trainable: list[str],
                 layer: int, n_layers: int, slots: int, label_axes: dict) -> SplitSpec:
    """Write trunk.onnx and head.onnx for ``wrapper`` split at ``layer``; return the manifest's description.

    ``label_axes``: the labels' dynamic axes of the loss graph. Their weights are in ``trunk.onnx.data`` and
    ``head.onnx.data``, not shared with model.onnx.data: quantizing rewrites that file after the split is
    written."""
    names = canonical_names(wrapper)
    ids, mask, labels = sample
    rows, seq = torch.export.Dim("rows"), torch.export.Dim("seq")
    batch = rows * slots if slots > 1 else rows  # the head's rows: P groups with P slots; the trunk's: any number
    with _cut(wrapper, layer, "trunk"), torch.no_grad():
        trunk = _Trunk(wrapper)
        hidden = trunk(ids, mask)
        proto = trace_onnx(trunk, (ids, mask), ["input_ids", "attention_mask"], [HIDDEN],
                           {"input_ids": {0: rows, 1: seq}, "attention_mask": {0: rows, 1: seq}})
        lift_trainable(proto, wrapper, [], strip="head.", names=names)
    used = [n for n in trainable if n in {i.name for i in proto.graph.initializer}]
    if used:  # e.g. a tied embedding / LM head trained: it is used below the split too
        raise ExportError(f"--split {layer}: the trainable tensor {used[0]} is used below the split (in the trunk); "
                          "freeze it (--freeze) or export without --split")
    save_graph(proto, bundle_dir / TRUNK)
    del proto
    with _cut(wrapper, layer, "head"):
        proto = trace_onnx(wrapper, (hidden, mask, labels), [HIDDEN, "attention_mask", "labels"],
                           list(wrapper.outputs), {"input_ids": {0: batch, 1: seq},
                                                   "attention_mask": {0: batch, 1: seq}, "labels": label_axes})
        lifted = lift_trainable(proto, wrapper, trainable, names=names)
    if lifted != list(trainable):
        missing = sorted(set(trainable) - set(lifted))
        raise ExportError(f"--split {layer}: the head graph does not use the trainable tensor {missing[0]}")
    save_graph(proto, bundle_dir / HEAD)
    return SplitSpec(layer, n_layers, ValueSpec(HIDDEN, "float32", ("batch", "seq", int(hidden.shape[-1]))),
                     TRUNK, HEAD)


def check_split(whole: dict, split: dict, tolerance: float = SPLIT_TOLERANCE) -> float:
    """Largest difference between the split's and the whole graph's losses (two ``parity.check`` results);
    raise ExportError above ``tolerance`` x max(1, |loss|)."""
    pairs = [(whole["loss_onnx"], split["loss_onnx"])]
    if whole.get("random_adapters"):
        pairs += zip(whole["random_adapters"]["loss_onnx"], split["random_adapters"]["loss_onnx"], strict=True)
    worst = 0.0
    for a, b in pairs:
        err = abs(a - b)
        if not err <= tolerance * max(1.0, abs(a)):
            raise ExportError(f"--split: trunk then head gives the loss {b:.6f}, the whole graph {a:.6f} (off by "
                              f"{err:.2e}); this architecture cannot be split as exported")
        worst = max(worst, err)
    return worst


