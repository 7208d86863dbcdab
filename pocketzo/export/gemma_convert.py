"""Gemma-3-270m: the Q4_K_M GGUF dequantized to a float32 Hugging Face directory, with its tokenizer
rebuilt from the GGUF's own vocabulary.

transformers reads Gemma-3's GGUF weights correctly but builds a tokenizer that splits text into the
wrong pieces (English text then reads as noise to the model). The GGUF holds SentencePiece BPE pieces
with their scores and types, and SentencePiece's BPE joins, at each step, the adjacent pair whose
joined piece scores highest. The rebuilt tokenizer is a ``tokenizers`` BPE with the same vocabulary
whose merges are every split of a normal piece into two pieces of the vocabulary, ranked by the joined
piece's score; byte fallback for what no piece covers; spaces written as "▁" (no prefix space, as
the GGUF says); control pieces (``<pad>``, ``<bos>``, ...) special, user-defined ones (newline and
space runs, markup) matched whole; and ``<bos>`` prepended to every encoding, as Gemma expects.

The saved directory is checked (files, special ids, a round trip, BOS first, and that the model finds
English far likelier than its words reversed). Caching is done by :mod:`pocketzo.export.assets`.
torch/transformers/gguf are imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pocketzo.export.gguf_convert import check_model_reads_english, conversion_failed, transformers_quiet

RECIPE = 1  # bump when the conversion below changes: old model dirs are then rebuilt
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_IDS = {PAD_TOKEN: 0, EOS_TOKEN: 1, BOS_TOKEN: 2, UNK_TOKEN: 3}
MODEL_MAX_LENGTH = 32768
# SentencePiece piece types, as the GGUF stores them
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
SPACE = "\u2581"
_ROUND_TRIP_TEXT = "Review: a quietly moving film, 10/10 — would watch again.\nSentiment: positive  (émigré)"


def convert_gemma_gguf(gguf_path: Path, out_dir: Path, *, quiet: bool = False) -> None:
    """Dequantize the Gemma-3 GGUF to a float32 HF dir in ``out_dir`` with a rebuilt tokenizer, check it."""
    import torch
    from transformers import AutoModelForCausalLM

    tokens, scores, types = read_vocabulary(gguf_path)
    tokenizer = hf_tokenizer(build_tokenizer(tokens, scores, types))
    with transformers_quiet(quiet):
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if model.config.vocab_size != len(tokens):
        raise conversion_failed(out_dir, f"model vocab {model.config.vocab_size} != GGUF vocab {len(tokens)}")
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.eos_token_id, config.bos_token_id = (
            SPECIAL_IDS[PAD_TOKEN], SPECIAL_IDS[EOS_TOKEN], SPECIAL_IDS[BOS_TOKEN])
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_saved(out_dir)
    check_model_reads_english(model, out_dir / "tokenizer.json")


def read_vocabulary(gguf_path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The GGUF's pieces, their scores (float32) and their types (int32), by id."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    try:
        pieces, score, kind = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    except KeyError as e:
        raise conversion_failed(gguf_path.parent, f"{gguf_path.name} has no {e.args[0]}") from None
    tokens = [bytes(pieces.parts[i]).decode("utf-8") for i in pieces.data]
    scores = np.concatenate([score.parts[i] for i in score.data]).astype(np.float32)
    types = np.concatenate([kind.parts[i] for i in kind.data]).astype(np.int32)
    if not len(tokens) == len(scores) == len(types):
        raise conversion_failed(gguf_path.parent, "the GGUF's tokens, scores and types differ in length")
    return tokens, scores, types


def build_tokenizer(tokens: list[str], scores: np.ndarray, types: np.ndarray):
    """The ``tokenizers.Tokenizer`` that splits text as SentencePiece BPE does with these pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {piece: i for i, piece in enumerate(tokens)}
    mergeable = {i for i, t in enumerate(types) if t in (NORMAL, BYTE)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[i]), left, right))
    ranked.sort()
    merges = [(tokens[left], tokens[right]) for _, left, right in ranked]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, byte_fallback=True,
                                     fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types, strict=True) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, SPECIAL_IDS[BOS_TOKEN])])
    return tokenizer


def hf_tokenizer(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, model_max_length=MODEL_MAX_LENGTH,
                                   clean_up_tokenization_spaces=False)


def _check_saved(out_dir: Path) -> None:
    from tokenizers import Tokenizer

    missing = [name for name in MODEL_FILES if not (out_dir / name).is_file()]
    if missing:
        raise conversion_failed(out_dir, f"missing files {missing}")
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "gemma3_text" or config.get("pad_token_id") != SPECIAL_IDS[PAD_TOKEN]:
        raise conversion_failed(out_dir, f"config.json has model_type {config.get('model_type')!r}, "
                                         f"pad_token_id {config.get('pad_token_id')!r}")
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    for token, token_id in SPECIAL_IDS.items():
        if tokenizer.token_to_id(token) != token_id:
            raise conversion_failed(out_dir, f"tokenizer.json maps {token} to {tokenizer.token_to_id(token)}")
    ids = tokenizer.encode(_ROUND_TRIP_TEXT).ids
    if ids[0] != SPECIAL_IDS[BOS_TOKEN] or SPECIAL_IDS[UNK_TOKEN] in ids:
        raise conversion_failed(out_dir, f"tokenizer.json encodes the check text as {ids[:8]}...")
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if decoded != _ROUND_TRIP_TEXT:
        raise conversion_failed(out_dir, f"tokenizer.json round trip gave {decoded!r}")
