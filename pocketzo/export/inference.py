"""Export a Hugging Face causal LM to an inference directory for generation on a device.

1. load the model in fp32 with eager attention (the attention that exports);
2. wrap it so the KV cache is plain tensors: one ``past_key_values.{i}.key/.value`` input and one
   ``present.{i}.key/.value`` output per layer, a transformers ``DynamicCache`` built inside, and
   the logits of the last position only, the only ones generation reads (models whose forward
   takes ``logits_to_keep``, as Llama's does, then project one position of a prompt, not all;
   OPT's projects all and the wrapper slices);
3. ``torch.onnx.export(dynamo=True)`` with dynamic batch, sequence and past axes (traced with a
   non-empty past; a zero-length past, the prompt run, works and is checked);
4. write model.onnx, the tokenizer and ``inference.json`` into a temp dir, check a prompt run and
   a cached decode step against transformers through the device ``Generator``, then rename
   (``_io.atomic_dir``).

The format is described in ``pocketzo.runtime.generate``.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from pocketzo import __version__
from pocketzo._io import atomic_dir, write_json
from pocketzo.errors import ExportError
from pocketzo.runtime.generate import (
    MANIFEST,
    MODEL,
    WEIGHTS,
    Generator,
    InferenceManifest,
    past_names,
    present_names,
)
from pocketzo.runtime.session import SessionConfig

# Max |logit| difference, ONNX Runtime vs PyTorch, relative above a logit scale of 1: SmolLM2-135M's
# logits (|l| up to ~20) differ by ~5e-5 from fp32 accumulation order alone, and deeper models by more.
PARITY_TOLERANCE = 1e-4
SAMPLE_TEXT = "Hello world, this is a test."  # checks that tokenizer.json tokenizes as the HF tokenizer


def _say(msg: str) -> None:
    print(f"[export-inference] {msg}", file=sys.stderr, flush=True)


class _CachedLM(torch.nn.Module):
    """``(input_ids, attention_mask, *past) -> (last logits, *present)`` with plain-tensor caches.

    ``past`` holds 2 x layers tensors, key then value per layer, each (B, H, P, D).
    """

    def __init__(self, net: torch.nn.Module, num_layers: int):
        super().__init__()
        self.net, self.num_layers = net, num_layers
        takes_keep = "logits_to_keep" in inspect.signature(net.forward).parameters
        self.keep_last = {"logits_to_keep": 1} if takes_keep else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        p, t = past[0].shape[2], input_ids.shape[1]
        # Positions as generate() makes them: count real tokens, padding gets 1; keep the new ones.
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, p:]  # (B, T)
        out = self.net(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       past_key_values=cache, cache_position=torch.arange(p, p + t), use_cache=True,
                       **self.keep_last)
        present = [x for layer in out.past_key_values.layers for x in (layer.keys, layer.values)]
        return (out.logits[:, -1], *present)  # (B, V), then (B, H, P+T, D) each


def export_inference(model_dir: Path, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write an inference directory for the causal LM in ``model_dir`` at ``out``; return its manifest."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; choose another output directory or pass overwrite=True")
    if out.exists() and not (out / MANIFEST).is_file():
        raise ExportError(f"{out}: exists and is not an inference directory (no {MANIFEST}); refusing to "
                          "overwrite it")
    _say(f"loading {model_dir}")
    net, tokenizer = _load(model_dir)
    num_layers, kv_heads, head_dim, vocab = _geometry(net)
    wrapper = _CachedLM(net, num_layers)
    with atomic_dir(out) as tmp:  # the directory appears complete, after its parity check, or not at all
        _say(f"tracing one decoding step with torch.onnx (dynamo): {num_layers} layers, {kv_heads} kv heads "
             f"x {head_dim}")
        proto = _trace(wrapper, num_layers, kv_heads, head_dim, vocab)
        # Weights in a side file, always: ONNX Runtime maps it instead of parsing a copy out of the protobuf
        # (SmolLM2-135M: 730 MB peak RSS instead of 850-1150 MB), and protobuf stops at 2 GB anyway.
        onnx.save_model(proto, str(tmp / MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=WEIGHTS, size_threshold=1024)
        tokenizer.save_pretrained(tmp)  # tokenizer.json for the device, the HF files for desktop users
        manifest = InferenceManifest(
            num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
            eos_token_ids=_eos_ids(net, tokenizer), bos_token_id=tokenizer.bos_token_id,
            prepend_bos=_prepend_bos(tokenizer, tmp / "tokenizer.json"),
            max_positions=getattr(net.config, "max_position_embeddings", None),
            inputs=_io_shapes(proto.graph.input), outputs=_io_shapes(proto.graph.output),
            source={"name": model_dir.name, "model_type": net.config.model_type},
            export={"pocketzo": __version__, "torch": torch.__version__},
        )
        write_json(tmp / MANIFEST, manifest.to_json())
        _say("checking parity: ONNX Runtime vs PyTorch (prompt, then one cached step)")
        parity = _check_parity(tmp, net, vocab)
        manifest = dataclasses.replace(manifest, export={**manifest.export, "parity": parity})
        write_json(tmp / MANIFEST, manifest.to_json())
    _say(f"wrote {out} (parity error {max(parity['prompt'], parity['step']):.2e})")
    return manifest.to_json()


def _load(model_dir: Path):
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:  # an unreadable or unknown config
        raise ExportError(f"{model_dir}: transformers cannot read config.json ({_first_line(e)})") from None
    if config.is_encoder_decoder or (config.architectures
                                     and not any(a.endswith("ForCausalLM") for a in config.architectures)):
        raise ExportError(f"{model_dir}: not a decoder-only causal LM (architectures {config.architectures}); "
                          "generation needs one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, TypeError, ValueError) as e:
        raise ExportError(f"{model_dir}: no usable tokenizer ({type(e).__name__}); generation needs the "
                          "model's tokenizer.json next to its weights") from None
    if not tokenizer.is_fast:
        raise ExportError(f"{model_dir}: no fast tokenizer (tokenizer.json) could be built; the device needs one")
    try:
        net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as e:  # what transformers raises for unusable or non-causal models
        raise ExportError(f"{model_dir}: transformers cannot load it as a causal LM ({_first_line(e)})") from None
    return net.eval(), tokenizer


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


@torch.no_grad()
def _geometry(net: torch.nn.Module) -> tuple[int, int, int, int]:
    """(layers, kv heads, head dim, vocab) read off one real forward, whatever the config calls them."""
    out = net(input_ids=torch.tensor([[1, 2]]), past_key_values=DynamicCache(), use_cache=True)
    layers = out.past_key_values.layers
    shapes = {tuple(x.shape[1::2]) for layer in layers for x in (layer.keys, layer.values)}  # {(H, D)}
    if not layers or len(shapes) != 1:
        raise ExportError(f"{net.config.model_type}: layers cache keys/values of different shapes {shapes}; "
                          "only a uniform cache is supported")
    (kv_heads, head_dim), = shapes
    return len(layers), kv_heads, head_dim, out.logits.shape[-1]


def _trace(wrapper: _CachedLM, num_layers: int, kv_heads: int, head_dim: int, vocab: int) -> onnx.ModelProto:
    b, t, p = 2, 3, 4  # sizes >= 2 on every dynamic axis: torch.export specializes sizes 0 and 1
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, p + t, dtype=torch.int64)
    past = tuple(torch.zeros(b, kv_heads, p, head_dim) for _ in range(2 * num_layers))
    batch, seq, past_seq = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past_seq")
    # The mask's length is past_seq + seq, which a Dim cannot say: AUTO, then named below.
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO},
               tuple({0: batch, 2: past_seq} for _ in past))
    with warnings.catch_warnings():  # the exporter's deprecation and axis-naming chatter
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper, (ids, mask, *past), dynamo=True, verbose=False, dynamic_shapes=dynamic,
                input_names=["input_ids", "attention_mask", *past_names(num_layers)],
                output_names=["logits", *present_names(num_layers)])
        except Exception as e:  # torch.export raises many unrelated types
            raise ExportError(f"torch.onnx could not export the cached decoding step ({_first_line(e)})") from None
    proto = program.model_proto
    proto.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "past_seq + seq"
    return proto


def _io_shapes(values) -> dict[str, list[int | str]]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _eos_ids(net: torch.nn.Module, tokenizer) -> tuple[int, ...]:
    """What ``generate()`` stops at: the generation config's EOS ids, else the tokenizer's."""
    eos = getattr(net.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        _say("warning: the model names no EOS token; generation stops only at max_new_tokens")
    return tuple(int(i) for i in ids)


def _prepend_bos(tokenizer, tokenizer_json: Path) -> bool:
    """Whether the device must prepend BOS itself: HF tokenizers may add it outside tokenizer.json."""
    from tokenizers import Tokenizer

    hf = tokenizer(SAMPLE_TEXT)["input_ids"]
    raw = Tokenizer.from_file(str(tokenizer_json)).encode(SAMPLE_TEXT).ids
    if hf == raw:
        return False
    if tokenizer.bos_token_id is not None and hf == [tokenizer.bos_token_id, *raw]:
        return True
    raise ExportError(f"tokenizer.json tokenizes {SAMPLE_TEXT!r} as {raw[:8]}..., the HF tokenizer as {hf[:8]}...; "
                      "the device could not reproduce the model's input")


@torch.no_grad()
def _check_parity(directory: Path, net: torch.nn.Module, vocab: int) -> dict[str, Any]:
    """Max |logit| error of a prompt run (empty past) and of one decode step on its cache, checked
    against ``PARITY_TOLERANCE x max(1, max |logit|)``."""
    generator = Generator(directory, SessionConfig(threads=1))
    prompt = torch.randint(0, vocab, (1, 7), generator=torch.Generator().manual_seed(1))  # (1, T)
    want = net(input_ids=prompt, use_cache=True)
    logits, present = generator.forward(prompt.numpy(), np.ones((1, 7), np.int64), generator.empty_cache())
    err_prompt = float(np.abs(logits - want.logits[:, -1].numpy()).max())
    step = torch.tensor([[int(want.logits[0, -1].argmax())]])  # (1, 1)
    want_step = net(input_ids=step, past_key_values=want.past_key_values, use_cache=True,
                    attention_mask=torch.ones(1, 8, dtype=torch.int64))
    logits, _ = generator.forward(step.numpy(), np.ones((1, 8), np.int64), present)
    err_step = float(np.abs(logits - want_step.logits[:, -1].numpy()).max())
    scale = float(max(want.logits[:, -1].abs().max(), want_step.logits[:, -1].abs().max()))
    bound = PARITY_TOLERANCE * max(1.0, scale)
    if not max(err_prompt, err_step) <= bound:
        raise ExportError(f"the exported logits differ from PyTorch's by {err_prompt:.2e} (prompt) and "
                          f"{err_step:.2e} (cached step), above {bound:.2g}; this architecture is not "
                          "supported as exported")
    return {"prompt": err_prompt, "step": err_step, "max_abs_logit": scale, "bound": bound}
