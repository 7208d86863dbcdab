"""Loss heads: torch modules wrapping a Hugging Face model so that the exported graph takes
``(input_ids, attention_mask, labels)`` and returns the losses, never the full logits.

Inputs are right-padded; ``attention_mask`` marks real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketzo.runtime.data import IGNORE


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy; ``loss`` is the mean over labelled tokens (as HF computes it)."""

    outputs = ("loss", "example_loss")

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        logits = self.net(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
        # Shift left by one, keeping T so the exporter sees no (T - 1) reshape.
        target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # (B, T)
        labelled = target != IGNORE  # (B, T)
        picked = logits.gather(2, torch.where(labelled, target, 0).unsqueeze(-1)).squeeze(-1)  # (B, T)
        # CE = logsumexp - picked logit: one ReduceLogSumExp over the logits, no (B, T, V) temporaries
        # (a transpose + log_softmax costs ~3 logits-sized buffers: 300 MB for OPT-1.3B at 8 x 64).
        counted = labelled.to(logits.dtype)  # (B, T)
        ce = (torch.logsumexp(logits, dim=-1) - picked) * counted  # (B, T)
        example_loss = ce.sum(1) / counted.sum(1).clamp(min=1.0)  # (B,)
        loss = ce.sum() / counted.sum().clamp(min=1.0)
        return loss, example_loss


class PromptClassifierLoss(nn.Module):
    """Prompt-based classification on a causal LM, as MeZO trains OPT (``train_as_classification``):
    class c scores the logit of label word c's first token at the last prompt position, and the
    loss is the cross-entropy over those C scores. Only that one position goes through the LM head."""

    outputs = ("loss", "example_loss", "candidate_loss")

    def __init__(self, net: nn.Module, label_token_ids: list[int]):
        super().__init__()
        self.net = net
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        hidden = self.net.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = (attention_mask.sum(1) - 1).clamp(min=0)  # (B,) answer position
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])  # (B, 1, H)
        h = hidden.gather(1, index).squeeze(1)  # (B, H)
        scores = self.net.get_output_embeddings()(h).float()[:, self.label_token_ids]  # (B, C)
        candidate_loss = -F.log_softmax(scores, dim=-1)  # (B, C)
        example_loss = candidate_loss.gather(1, labels.view(-1, 1)).squeeze(1)  # (B,)
        return example_loss.mean(), example_loss, candidate_loss


class SequenceClassifierLoss(nn.Module):
    """Cross-entropy of a sequence-classification head (encoders: BERT, RoBERTa, MiniLM)."""

    outputs = ("loss", "example_loss", "candidate_loss")

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        logits = self.net(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, C)
        candidate_loss = -F.log_softmax(logits, dim=-1)  # (B, C)
        example_loss = candidate_loss.gather(1, labels.view(-1, 1)).squeeze(1)  # (B,)
        return example_loss.mean(), example_loss, candidate_loss


def reference_loss(net: nn.Module, head: str, input_ids, attention_mask, labels, label_token_ids=None) -> torch.Tensor:
    """The same loss computed the plain Hugging Face way (full logits), for parity checks."""
    with torch.no_grad():
        if head in ("lm", "head"):
            return net(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        logits = net(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        rows = torch.arange(input_ids.shape[0])
        answer = logits[rows, attention_mask.sum(1) - 1]  # (B, V)
        return F.cross_entropy(answer[:, list(label_token_ids)].float(), labels)
