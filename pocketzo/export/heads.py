"""Loss heads: torch modules wrapping a Hugging Face model so that the exported graph takes
``(input_ids, attention_mask, labels)`` and returns the losses, never the full logits.

Inputs are right-padded; ``attention_mask`` marks real tokens.

A head may carry trainable virtual tokens (prompt tuning: ``prompt_embeddings``, prepended to
every row's embeddings) and perturbation slots (``slots = P``, see ``adapters``): then the N rows
are P groups and every output gets a leading slot axis: ``loss`` (P,), ``example_loss`` (P, N/P).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketzo.runtime.data import IGNORE


def base_model(net: nn.Module) -> nn.Module:
    """The transformer under the LM head: ``net.base_model``, or ``net.model`` where that is the model itself
    (Gemma-3's causal LM names its base ``language_model``, as in the multimodal model, but stores it as ``model``)."""
    base = net.base_model
    return net.model if base is net and isinstance(getattr(net, "model", None), nn.Module) else base


class _Head(nn.Module):
    outputs: tuple[str, ...] = ()
    # A split's head (``split``): the first input is the trunk's hidden state (N, T, H), fed as inputs_embeds
    from_hidden: bool = False

    def __init__(self, net: nn.Module, prompt: torch.Tensor | None = None, slots: int = 1):
        super().__init__()
        self.net, self.slots = net, slots
        self.prompt_embeddings = nn.Parameter(prompt) if prompt is not None else None
        self.virtual = 0 if prompt is None else prompt.shape[-2]

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments for the HF model: ids, or embeddings with the virtual tokens in front."""
        if self.from_hidden:
            return {"inputs_embeds": input_ids, "attention_mask": attention_mask}
        if self.prompt_embeddings is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        embeds = self.net.get_input_embeddings()(input_ids)  # (N, T, H)
        n, k, h = embeds.shape[0], self.virtual, embeds.shape[-1]
        if self.slots == 1:
            prompt = self.prompt_embeddings.unsqueeze(0).expand(n, k, h)  # (N, k, H)
        else:  # slot s's tokens for its N/P rows
            per_slot = self.prompt_embeddings.unsqueeze(1)  # (P, 1, k, H)
            prompt = per_slot.expand(self.slots, n // self.slots, k, h).reshape(n, k, h)
        ones = torch.ones_like(attention_mask[:, :1]).expand(n, k)  # (N, k)
        return {"inputs_embeds": torch.cat([prompt, embeds], dim=1),
                "attention_mask": torch.cat([ones, attention_mask], dim=1)}

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        """Drop the virtual positions of a (N, k + T, ...) tensor."""
        return x[:, self.virtual:] if self.virtual else x

    def _per_slot(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (P, N/P, ...) when slotted."""
        return x if self.slots == 1 else x.reshape(self.slots, -1, *x.shape[1:])


class CausalLMLoss(_Head):
    """Next-token cross-entropy; ``loss`` is the mean over labelled tokens (as HF computes it)."""

    outputs = ("loss", "example_loss")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        logits = self._real(self.net(**self._inputs(input_ids, attention_mask)).logits).float()  # (N, T, V)
        # Shift left by one, keeping T so the exporter sees no (T - 1) reshape.
        target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # (N, T)
        labelled = target != IGNORE  # (N, T)
        picked = logits.gather(2, torch.where(labelled, target, 0).unsqueeze(-1)).squeeze(-1)  # (N, T)
        # CE = logsumexp - picked logit: one ReduceLogSumExp over the logits, no (N, T, V) temporaries
        # (a transpose + log_softmax costs ~3 logits-sized buffers: 300 MB for OPT-1.3B at 8 x 64).
        counted = labelled.to(logits.dtype)  # (N, T)
        ce = (torch.logsumexp(logits, dim=-1) - picked) * counted  # (N, T)
        example_loss = ce.sum(1) / counted.sum(1).clamp(min=1.0)  # (N,)
        if self.slots == 1:
            return ce.sum() / counted.sum().clamp(min=1.0), example_loss
        tokens = self._per_slot(counted).sum((1, 2)).clamp(min=1.0)  # (P,)
        return self._per_slot(ce).sum((1, 2)) / tokens, self._per_slot(example_loss)


class PromptClassifierLoss(_Head):
    """Prompt-based classification on a causal LM, as MeZO trains OPT (``train_as_classification``):
    class c scores the logit of label word c's first token at the last prompt position, and the
    loss is the cross-entropy over those C scores. Only that one position, and only the C label rows of the LM
    head, are computed."""

    outputs = ("loss", "example_loss", "candidate_loss")

    def __init__(self, net: nn.Module, label_token_ids: list[int], prompt: torch.Tensor | None = None,
                 slots: int = 1):
        super().__init__(net, prompt, slots)
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        hidden = base_model(self.net)(**self._inputs(input_ids, attention_mask)).last_hidden_state
        hidden = self._real(hidden)  # (N, T, H)
        last = (attention_mask.sum(1) - 1).clamp(min=0)  # (N,) answer position
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])  # (N, 1, H)
        h = hidden.gather(1, index).squeeze(1)  # (N, H)
        # Only the label words' rows of the LM head (Gemma-3's has 262,144, which a quantized base would dequantize
        # at every forward), gathered with F.embedding: an axis-0 Gather the quantizer rewrites like the input
        # embedding's, where weight[ids] exports as a Transpose of the whole table and a GatherND.
        lm_head = self.net.get_output_embeddings()
        scores = h @ F.embedding(self.label_token_ids, lm_head.weight).T  # (N, C)
        if getattr(lm_head, "bias", None) is not None:
            scores = scores + lm_head.bias[self.label_token_ids]
        scores = scores.float()
        candidate_loss = -F.log_softmax(scores, dim=-1)  # (N, C)
        example_loss = self._per_slot(candidate_loss.gather(1, labels.view(-1, 1)).squeeze(1))  # (N,) or (P, N/P)
        return example_loss.mean(-1), example_loss, self._per_slot(candidate_loss)


class SequenceClassifierLoss(_Head):
    """Cross-entropy of a sequence-classification head (encoders: BERT, RoBERTa, MiniLM)."""

    outputs = ("loss", "example_loss", "candidate_loss")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        logits = self.net(**self._inputs(input_ids, attention_mask)).logits.float()  # (N, C)
        candidate_loss = -F.log_softmax(logits, dim=-1)  # (N, C)
        example_loss = self._per_slot(candidate_loss.gather(1, labels.view(-1, 1)).squeeze(1))  # (N,) or (P, N/P)
        return example_loss.mean(-1), example_loss, self._per_slot(candidate_loss)


def reference_loss(net: nn.Module, head: str, input_ids, attention_mask, labels, label_token_ids=None,
                   prompt: torch.Tensor | None = None) -> torch.Tensor:
    """The same loss computed the plain Hugging Face way (full logits), for parity checks.

    ``prompt`` (k, H): virtual tokens put before every row, fed as ``inputs_embeds`` (prompt tuning).
    """
    with torch.no_grad():
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if prompt is not None:
            n, k = input_ids.shape[0], prompt.shape[0]
            embeds = net.get_input_embeddings()(input_ids)  # (N, T, H)
            inputs = {"inputs_embeds": torch.cat([prompt.expand(n, k, embeds.shape[-1]), embeds], dim=1),
                      "attention_mask": torch.cat([torch.ones_like(attention_mask[:, :1]).expand(n, k),
                                                   attention_mask], dim=1)}  # (N, k + T, H), (N, k + T)
            if head == "lm":  # no loss on the virtual tokens, nor on the first real one (nothing real precedes it)
                labels = torch.cat([torch.full_like(labels[:, :1], IGNORE).expand(n, k + 1), labels[:, 1:]], dim=1)
        if head in ("lm", "head"):
            return net(**inputs, labels=labels).loss
        logits = net(**inputs).logits  # (B, k + T, V)
        rows = torch.arange(input_ids.shape[0])
        answer = logits[rows, inputs["attention_mask"].sum(1) - 1]  # (B, V)
        return F.cross_entropy(answer[:, list(label_token_ids)].float(), labels)
