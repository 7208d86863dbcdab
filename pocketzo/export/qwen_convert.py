"""Qwen2.5 (a ``qwen2`` GGUF) to a float32 Hugging Face directory, one tensor at a time.

transformers reads such a GGUF, but it dequantizes every tensor into memory before it builds the model (the
1.5B file is 7.1 GB of float32), and the tokenizer it builds ends text with ``<|endoftext|>`` where the instruct
model ends its turns with ``<|im_end|>`` (the GGUF's own eos). Here the weights are dequantized by gguf's own
reference kernels and written straight into ``model.safetensors`` one tensor at a time (peak memory: the
largest tensor), under transformers' qwen2 names and shapes (no permutation: llama.cpp stores qwen2's q/k as
they are); the config comes from the GGUF's metadata, and the tokenizer keeps its byte-level BPE, chat template
and pad ``<|endoftext|>`` but takes the eos ``<|im_end|>``. The file stores an output matrix apart from the token
embedding (upstream ties them; here they were quantized differently), so the directory keeps both, untied.

Checks on the saved directory: the files, the special ids, a tokenizer round trip, and that the model finds an
English paragraph far likelier than its words reversed. torch/transformers/gguf are imported lazily.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pocketzo.errors import AssetError
from pocketzo.export.gguf_convert import check_model_reads_english, conversion_failed, transformers_quiet

RECIPE = 1  # bump when the conversion below changes: old model dirs are then rebuilt
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")
_LAYER = {  # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ROUND_TRIP_TEXT = "Review: a quietly moving film, 10/10 — would watch again.\nSentiment: positive"


def hf_name(gguf_name: str) -> str:
    """The transformers name of a qwen2 GGUF tensor, e.g. ``blk.3.attn_q.bias`` -> ``model.layers.3.self_attn.
    q_proj.bias``."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL:
        return f"{_GLOBAL[m.group(1)]}.{m.group(2)}"
    raise AssetError(f"{gguf_name}: a GGUF tensor this qwen2 conversion does not know")


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise AssetError(f"the GGUF has no {key}; it is not a qwen2 model file")
    value = field.parts[field.data[0]]
    return value.tolist()[0] if len(value) == 1 else value.tolist()


def qwen2_config(reader, eos_id: int, pad_id: int):
    """The transformers ``Qwen2Config`` the GGUF's metadata describes."""
    from transformers import Qwen2Config

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch != "qwen2":
        raise AssetError(f"the GGUF's architecture is {arch!r}, not qwen2")
    heads = _field(reader, "qwen2.attention.head_count")
    return Qwen2Config(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=_field(reader, "qwen2.embedding_length"),
        intermediate_size=_field(reader, "qwen2.feed_forward_length"),
        num_hidden_layers=_field(reader, "qwen2.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_field(reader, "qwen2.attention.head_count_kv"),
        max_position_embeddings=_field(reader, "qwen2.context_length"),
        rope_theta=float(_field(reader, "qwen2.rope.freq_base")),
        rms_norm_eps=float(_field(reader, "qwen2.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, torch_dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )


def convert_qwen_gguf(gguf_path: Path, out_dir: Path, *, quiet: bool = False) -> None:
    """Dequantize the Qwen2.5 GGUF into a float32 HF dir in ``out_dir``, fix its tokenizer, check it."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoTokenizer, GenerationConfig

    from pocketzo.runtime._safetensors import save_streamed

    reader = GGUFReader(gguf_path)
    with transformers_quiet(quiet):
        tokenizer = _fixed_tokenizer(AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name),
                                     gguf_path, reader)
    eos_id, pad_id = tokenizer.convert_tokens_to_ids([EOS_TOKEN, PAD_TOKEN])
    config = qwen2_config(reader, eos_id, pad_id)
    config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out_dir)
    tensors = {hf_name(t.name): t for t in reader.tensors}
    specs = {name: (tuple(int(n) for n in reversed(t.shape)), np.float32) for name, t in tensors.items()}

    def dequantized(name: str) -> np.ndarray:
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).reshape(specs[name][0])

    save_streamed(out_dir / "model.safetensors", specs, dequantized, {"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    _check_saved(out_dir, eos_id, pad_id)
    _check_model(out_dir)


def _fixed_tokenizer(gguf_tokenizer, gguf_path: Path, reader):
    """transformers' tokenizer from the GGUF with the GGUF's own eos (``<|im_end|>``) and pad."""
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if gguf_tokenizer.convert_ids_to_tokens(eos) != EOS_TOKEN:
        raise AssetError(f"{gguf_path}: its eos id {eos} is {gguf_tokenizer.convert_ids_to_tokens(eos)!r}, "
                         f"expected {EOS_TOKEN}; not a Qwen2.5 instruct GGUF")
    gguf_tokenizer.eos_token = EOS_TOKEN
    gguf_tokenizer.pad_token = PAD_TOKEN
    if not gguf_tokenizer.chat_template:
        raise AssetError(f"{gguf_path}: the GGUF carries no chat template")
    return gguf_tokenizer


def _check_saved(out_dir: Path, eos_id: int, pad_id: int) -> None:
    from tokenizers import Tokenizer

    missing = [name for name in MODEL_FILES if not (out_dir / name).is_file()]
    if missing:
        raise conversion_failed(out_dir, f"missing files {missing}")
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if (config.get("eos_token_id"), config.get("pad_token_id")) != (eos_id, pad_id):
        raise conversion_failed(out_dir, f"config.json eos/pad {config.get('eos_token_id')}/"
                                         f"{config.get('pad_token_id')}, expected {eos_id}/{pad_id}")
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    ids = tokenizer.encode(_ROUND_TRIP_TEXT).ids
    if ids != tokenizer.encode(_ROUND_TRIP_TEXT, add_special_tokens=False).ids:
        raise conversion_failed(out_dir, "tokenizer.json adds special tokens when encoding")
    if tokenizer.decode(ids, skip_special_tokens=False) != _ROUND_TRIP_TEXT:
        raise conversion_failed(out_dir, "tokenizer.json does not decode what it encoded")
    if tokenizer.encode("<|im_start|>user").ids[0] != tokenizer.token_to_id("<|im_start|>"):
        raise conversion_failed(out_dir, "tokenizer.json splits the chat markers")


def _check_model(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    check_model_reads_english(model, out_dir / "tokenizer.json")
    del model
