"""Parameter-efficient trainable sets: LoRA, prompt tuning and BitFit, with optional perturbation slots.

Every base weight stays a frozen initializer of the exported graph (prepacked, quantizable);
only the adapter tensors become graph inputs.

Perturbation slots (``slots = P > 1``): every adapter tensor gets a leading axis of P and the
rows of a batch are split into P equal groups, group k computed with slot k. One session run
then evaluates P different adapter values, e.g. theta + eps z_j and theta - eps z_j for
j = 1..P/2 (MobiZO's idea). Base weights are shared by all slots, so the extra cost is the
batch rows, not the weights.

Names follow PEFT's, so ``pocketzo merge --to-peft`` can write a PEFT adapter as is:
``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight`` (out, r), ``prompt_embeddings``
(k, hidden); a slotted tensor has shape (P, *shape).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from pocketzo.errors import ExportError

# Biases and normalisation weights (BitFit): Llama has no biases, so there it trains the norms.
BITFIT = r"(\.bias|norm\.weight|LayerNorm\.weight|layer_norm\.weight|ln_\w*\.weight)$"
# A newly initialised classification head must always train (PEFT's modules_to_save).
NEW_HEAD = r"^(classifier|score)\."
# Parameters outside the transformer layers that act below them (embeddings, OPT's project_in, virtual tokens);
# the others (final norm, LM head, classifier, pooler) act above them.
INPUT_SIDE = re.compile(r"embed|project_in|^prompt_embeddings$|(^|\.)(wte|wpe)\.")


class _Tensor(nn.Module):
    """A holder so the parameter is named ``<module>.lora_A.weight``, as PEFT names it."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(value)


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) B A x, with W and b the frozen base layer's own parameters
    (kept under their Hugging Face names) and B initialised to zero, so training starts at the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, slots: int, generator: torch.Generator):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.slots, self.scale = slots, alpha / rank
        a = torch.empty(rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)  # PEFT's default: kaiming_uniform(a=sqrt(5)) has this bound
        a.uniform_(-bound, bound, generator=generator)
        b = torch.zeros(base.out_features, rank)
        if slots > 1:
            a, b = a.expand(slots, *a.shape).clone(), b.expand(slots, *b.shape).clone()
        self.lora_A, self.lora_B = _Tensor(a), _Tensor(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)  # (N, T, out)
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.slots == 1:
            return y + (x @ a.t() @ b.t()) * self.scale
        grouped = x.reshape(self.slots, -1, x.shape[-1])  # (P, N/P * T, in): rows of slot k are contiguous
        delta = grouped @ a.transpose(1, 2) @ b.transpose(1, 2)  # (P, N/P * T, out)
        return y + delta.reshape(y.shape) * self.scale


def add_lora(net: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, slots: int, seed: int,
             first_layer: int | None = None) -> list[str]:
    """Replace the Linear layers whose last name part is in ``targets`` (with ``first_layer``: only those
    ``at_or_above`` it); return the adapter names."""
    generator = torch.Generator().manual_seed(seed)
    found = [(name, m) for name, m in net.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
             and (first_layer is None or at_or_above(name + ".", first_layer))]
    if not found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)})
        raise ExportError(f"--lora-targets {','.join(targets)} match no Linear layer; this model has {linears}")
    names = []
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, LoRALinear(module, rank, alpha, slots, generator))
        names += [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
    return names


def prompt_init(net: nn.Module, tokens: int, slots: int, seed: int, text_ids: list[int] | None = None) -> torch.Tensor:
    """Initial virtual tokens: the embeddings of ``text_ids`` repeated (or cut) to fill ``tokens``
    (``--prompt-init``), or of randomly drawn vocabulary tokens. Both are real token embeddings; a text that reads
    as part of the prompt keeps the zero-shot model closer to itself (on 400 rt dev rows: no virtual tokens
    75.0 %, 16 random ones 63.5 %, the text of benchmarks/value_rows.py 79.0 %)."""
    embed = net.get_input_embeddings()  # the module, not its table: Gemma's scales the rows by sqrt(H)
    if text_ids:
        ids = torch.tensor([text_ids[i % len(text_ids)] for i in range(tokens)])
    else:
        ids = torch.randint(0, embed.weight.shape[0], (tokens,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        init = embed(ids).clone()  # (k, H)
    return init.expand(slots, *init.shape).clone() if slots > 1 else init


def select(names: list[str], pattern: str, freeze: str | None, first_layer: int | None = None) -> list[str]:
    """Parameter names matched by ``pattern`` ("all" or a regex) and not by ``freeze``; with ``first_layer`` only
    those ``at_or_above`` it (``--trainable-layers``)."""
    chosen = [n for n in names if pattern == "all" or re.search(pattern, n)]
    chosen = [n for n in chosen if not (freeze and re.search(freeze, n))]
    return chosen if first_layer is None else [n for n in chosen if at_or_above(n, first_layer)]


def at_or_above(name: str, first_layer: int) -> bool:
    """Does the parameter or module ``name`` act at transformer layer ``first_layer`` or above? Names outside the
    layers act above them (final norm, LM head, classifier, pooler) unless they are input-side (``INPUT_SIDE``)."""
    k = layer_index(name)
    return k >= first_layer if k is not None else not INPUT_SIDE.search(name)


def layer_index(name: str) -> int | None:
    """The transformer layer a parameter belongs to (``...layers.12.``, BERT's ``...layer.12.``), or None."""
    match = re.search(r"\.(?:layers|layer|h|blocks)\.(\d+)\.", name)
    return int(match.group(1)) if match else None
