"""SmolLM2-135M-Instruct: the Q4_1 GGUF dequantized to a float32 Hugging Face directory.

transformers reads the GGUF but gets SmolLM2's special tokens wrong (it prepends
``<|im_start|>`` as a BOS and uses it as eos). The conversion rebuilds the tokenizer with
no BOS added, eos ``<|im_end|>`` and pad ``<|endoftext|>``, sets the same ids on the model,
and checks the saved directory (files, special ids, tokenizer round trip, and that the model
finds English far likelier than scrambled English). Caching is done by
:mod:`pocketzo.export.assets`. torch/transformers are imported lazily.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pocketzo.errors import AssetError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

RECIPE = 1  # bump when the conversion below changes: old model dirs are then rebuilt
MODEL_FILES = (  # every one must be saved (the cache marker lists all files actually saved)
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
BOS_TOKEN, BOS_ID = "<|im_start|>", 1
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
# The vocab has <|endoftext|> at id 0 (also the unk token), so it is the pad token: a pad
# distinct from eos keeps "mask the pad positions" code from also masking the real <|im_end|>.
PAD_TOKEN, PAD_ID = "<|endoftext|>", 0
UNK_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 8192
_ROUND_TRIP_TEXT = "Review: a quietly moving film, 10/10 — would watch again.\nSentiment: positive"
_ENGLISH_TEXT = (
    "The museum opens at nine in the morning and closes at five in the evening. "
    "Visitors can buy tickets at the front desk, and children under twelve get in for free. "
    "On rainy days the galleries are crowded, so most people prefer to come early."
)
_MIN_NLL_GAP = 1.0  # nats/token the model must prefer the English text over its word-reversed copy


def convert_gguf(gguf_path: Path, out_dir: Path, *, quiet: bool = False) -> None:
    """Dequantize the SmolLM2 GGUF to a float32 HF dir in ``out_dir``, fix its tokenizer, check it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_quiet(quiet):
        gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    tokenizer = _fixed_tokenizer(gguf_tokenizer, gguf_path)
    _fix_model_special_ids(model, vocab_size=len(tokenizer), gguf_path=gguf_path)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_saved_files(out_dir)
    _check_saved_tokenizer(out_dir / "tokenizer.json")
    check_model_reads_english(model, out_dir / "tokenizer.json")


@contextlib.contextmanager
def transformers_quiet(quiet: bool) -> Iterator[None]:
    """Silence transformers' warnings and progress bars while loading, if asked to."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- fixes


def _fixed_tokenizer(gguf_tokenizer: PreTrainedTokenizerFast, gguf_path: Path) -> PreTrainedTokenizerFast:
    """A plain fast tokenizer with SmolLM2's real special tokens and no BOS added.

    transformers builds the GGUF tokenizer as a LlamaTokenizerFast whose post-processor (a
    TemplateProcessing) prepends ``<|im_start|>`` to every encoding and whose eos is
    ``<|im_start|>``. SmolLM2 uses no BOS and ends turns with ``<|im_end|>``. The rebuilt
    tokenizer has no post-processor at all, so ``tokenizer.json`` alone encodes correctly.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    spec["post_processor"] = None
    backend = Tokenizer.from_str(json.dumps(spec))
    for token, token_id in ((PAD_TOKEN, PAD_ID), (BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)):
        if backend.token_to_id(token) != token_id:
            raise AssetError(
                f"{gguf_path}: the tokenizer maps {token} to {backend.token_to_id(token)}, "
                f"expected {token_id}; delete the cache directory and run again"
            )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = gguf_tokenizer.chat_template
    return tokenizer


def _fix_model_special_ids(model: PreTrainedModel, *, vocab_size: int, gguf_path: Path) -> None:
    from transformers import GenerationConfig

    if model.config.vocab_size != vocab_size:
        raise AssetError(
            f"{gguf_path}: model vocab {model.config.vocab_size} != tokenizer vocab {vocab_size}; "
            "delete the cache directory and run again"
        )
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    for config in (model.config, model.generation_config):
        config.bos_token_id = BOS_ID
        config.eos_token_id = EOS_ID
        config.pad_token_id = PAD_ID


# --------------------------------------------------------------------------- checks


def conversion_failed(out_dir: Path, problem: str) -> AssetError:
    return AssetError(
        f"converted model in {out_dir} failed its check: {problem}; delete the cache directory "
        "and run again (if it persists, the transformers/tokenizers versions changed the conversion)"
    )


def _check_saved_files(out_dir: Path) -> None:
    missing = [name for name in MODEL_FILES if not (out_dir / name).is_file()]
    if missing:
        raise conversion_failed(out_dir, f"missing files {missing}")
    checks = (
        ("config.json", "eos_token_id", EOS_ID),
        ("config.json", "pad_token_id", PAD_ID),
        ("generation_config.json", "eos_token_id", EOS_ID),
        ("tokenizer_config.json", "eos_token", EOS_TOKEN),
        ("tokenizer_config.json", "pad_token", PAD_TOKEN),
    )
    for name, key, want in checks:
        try:
            got = json.loads((out_dir / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):  # unreadable, or not a JSON object
            got = None
        if got != want:
            raise conversion_failed(out_dir, f"{name} {key} is {got!r}, expected {want!r}")


def _check_saved_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    hello = tokenizer.encode("Hello").ids
    if not hello or hello[0] == BOS_ID:
        raise conversion_failed(path.parent, f"tokenizer.json encodes 'Hello' as {hello} (BOS added)")
    ids = tokenizer.encode(_ROUND_TRIP_TEXT).ids
    if ids != tokenizer.encode(_ROUND_TRIP_TEXT, add_special_tokens=False).ids:
        raise conversion_failed(path.parent, "tokenizer.json adds special tokens when encoding")
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    if decoded != _ROUND_TRIP_TEXT:
        raise conversion_failed(path.parent, f"tokenizer.json round trip gave {decoded!r}")
    if tokenizer.token_to_id(EOS_TOKEN) != EOS_ID or tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
        raise conversion_failed(path.parent, "tokenizer.json special token ids changed")


def check_model_reads_english(model: PreTrainedModel, tokenizer_path: Path) -> None:
    """The model must find an English paragraph far likelier than its words reversed."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    reversed_text = " ".join(reversed(_ENGLISH_TEXT.split()))
    natural = mean_nll(model, tokenizer.encode(_ENGLISH_TEXT).ids)
    scrambled = mean_nll(model, tokenizer.encode(reversed_text).ids)
    if not natural + _MIN_NLL_GAP < scrambled:
        raise conversion_failed(
            tokenizer_path.parent,
            f"mean NLL of English {natural:.2f} vs reversed words {scrambled:.2f} nats/token "
            f"(needs a gap of {_MIN_NLL_GAP}): the weights or tokenizer are wrong",
        )


def mean_nll(model: PreTrainedModel, ids: Sequence[int]) -> float:
    import torch

    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=input_ids).loss
    return float(loss)
