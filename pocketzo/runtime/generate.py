"""Text generation on the device from an inference directory, with a KV cache.

An inference directory (made on the desktop by ``pocketzo.export.inference.export_inference``)::

    inference.json   ``InferenceManifest``: format, version, graph I/O, cache geometry, special tokens
    model.onnx       one decoding step; the weights are fp32 initializers (constants, not inputs) ...
    model.onnx.data  ... stored as ONNX external data, which ONNX Runtime maps from the file
    tokenizer.json   a `tokenizers` tokenizer (+ the HF tokenizer files for desktop users)

``model.onnx`` computes one step of a causal LM over a growing cache::

    input_ids               (batch, seq)                    int64
    attention_mask          (batch, past_seq + seq)         int64, 1 = real token, 0 = padding
    past_key_values.{i}.key/.value  (batch, kv_heads, past_seq, head_dim)  float32, i = 0 .. layers-1
    ->
    logits                  (batch, vocab)                  float32, of the LAST input position only
    present.{i}.key/.value  (batch, kv_heads, past_seq + seq, head_dim)  float32

Position ids are derived inside the graph from ``attention_mask`` as ``generate()`` does, so there is
no position input. The first run takes the whole prompt with ``past_seq = 0``; each later run takes
one token and the previous run's ``present`` tensors as its ``past``.

Imports only the standard library, numpy, onnxruntime and (lazily) ``tokenizers``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pocketzo.errors import BundleError, DataError
from pocketzo.runtime.bundle import member_file
from pocketzo.runtime.session import SessionConfig

FORMAT = "pocketzo-inference"
FORMAT_VERSION = 1
MANIFEST = "inference.json"
MODEL, WEIGHTS = "model.onnx", "model.onnx.data"
CONTEXT_TOKENS = 5  # prompt tokens decoded with the first new tokens, so word boundaries come out right


def past_names(num_layers: int) -> list[str]:
    """Cache inputs in graph order: key then value, layer by layer."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Cache outputs in graph order, matching ``past_names`` one for one."""
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


@dataclass(frozen=True)
class InferenceManifest:
    """``inference.json``: everything the device needs to drive ``model.onnx``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]  # generation stops at any of them
    bos_token_id: int | None
    prepend_bos: bool  # True: tokenizer.json does not add the BOS the model expects, so the runtime prepends it
    max_positions: int | None  # the model's position limit (prompt + generated tokens), None = unknown
    inputs: dict[str, list[int | str]]  # name -> shape, in graph order; str = symbolic axis
    outputs: dict[str, list[int | str]]
    dtype: str = "float32"
    logits: str = "last"  # logits of the last input position only, (batch, vocab)
    model_file: str = MODEL
    weights_file: str = WEIGHTS  # the initializers, as ONNX external data of model_file
    tokenizer_file: str = "tokenizer.json"
    source: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise BundleError(f"{name} must be a positive integer, got {value!r}")
        if not (all(isinstance(i, int) for i in self.eos_token_ids) and isinstance(self.prepend_bos, bool)
                and isinstance(self.bos_token_id, int | None) and isinstance(self.max_positions, int | None)
                and isinstance(self.inputs, dict) and isinstance(self.outputs, dict)):
            raise BundleError("eos_token_ids, bos_token_id, prepend_bos, max_positions, inputs or outputs has "
                              "the wrong type")
        if self.dtype != "float32" or self.logits != "last":
            raise BundleError(f"dtype {self.dtype!r} / logits {self.logits!r}: only float32 / last are known")
        want_in = ["input_ids", "attention_mask", *past_names(self.num_layers)]
        want_out = ["logits", *present_names(self.num_layers)]
        if list(self.inputs) != want_in or list(self.outputs) != want_out:
            raise BundleError(f"inputs/outputs do not match {self.num_layers} layers: expected {want_in[:3]}... "
                              f"and {want_out[:2]}...")

    def to_json(self) -> dict[str, Any]:
        obj = {"format": self.format, "format_version": self.format_version}
        obj.update({k: v for k, v in self.__dict__.items() if k not in obj})
        obj["eos_token_ids"] = list(self.eos_token_ids)
        return obj

    @classmethod
    def from_json(cls, obj: Any, where: str) -> InferenceManifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise BundleError(f"{where}: not a {FORMAT} manifest")
        if obj.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{where}: format_version {obj.get('format_version')!r}, this pocketzo reads "
                              f"{FORMAT_VERSION}; re-export the model with this version")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: (tuple(v) if k == "eos_token_ids" else v) for k, v in obj.items() if k in known})
        except TypeError as e:  # a missing key or a value of the wrong type
            raise BundleError(f"{where}: {e}; re-export the model") from None
        except BundleError as e:
            raise BundleError(f"{where}: {e}") from None


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick each next token."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    seed: int = 0  # seeds the sampler; the same seed gives the same text

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


Cache = list[npt.NDArray[np.float32]]  # past_names order, each (B, H, P, D)


class Generator:
    """``Generator(dir).generate("Once upon a time", 32)`` streams text pieces."""

    def __init__(self, directory: str | Path, session_config: SessionConfig | None = None):
        self.path = Path(directory)
        self.manifest = _read_manifest(self.path)
        self.tokenizer = _load_tokenizer(self._member(self.manifest.tokenizer_file))
        model = self._member(self.manifest.model_file)
        self._member(self.manifest.weights_file)
        try:
            self.session = ort.InferenceSession(str(model), (session_config or SessionConfig()).session_options(),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own unrelated exception types
            raise BundleError(f"{model}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if graph_inputs != list(self.manifest.inputs):
            raise BundleError(f"{model}: graph inputs {graph_inputs[:3]}... do not match {MANIFEST}; re-export")
        self._past_names = past_names(self.manifest.num_layers)

    def _member(self, name: str) -> Path:
        return member_file(self.path, name, "the inference directory", MANIFEST)

    def empty_cache(self, batch: int = 1) -> Cache:
        m = self.manifest
        return [np.zeros((batch, m.num_kv_heads, 0, m.head_dim), np.float32) for _ in self._past_names]

    def forward(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64],
                past: Cache) -> tuple[npt.NDArray[np.float32], Cache]:
        """One run: ``input_ids`` (B, T), ``attention_mask`` (B, P+T), ``past`` (B, H, P, D) each
        -> last-position logits (B, V) and the grown cache (B, H, P+T, D) each."""
        feed = dict(zip(self._past_names, past, strict=True))
        feed.update(input_ids=input_ids, attention_mask=attention_mask)
        logits, *present = self.session.run(None, feed)
        return logits, present

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids
        bos = self.manifest.bos_token_id
        return [bos, *ids] if self.manifest.prepend_bos and bos is not None else ids

    def token_ids(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[int]:
        """New token ids, one per run; stops at EOS, after ``max_new_tokens`` or at the position limit."""
        limit = self.manifest.max_positions
        if not prompt_ids:
            raise DataError("the prompt is empty: there is no token to continue from")
        if limit is not None and len(prompt_ids) > limit:
            raise DataError(f"the prompt has {len(prompt_ids)} tokens; the model reads at most {limit} positions")
        return self._decode(prompt_ids, config)

    def _decode(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[int]:
        limit = self.manifest.max_positions
        rng = np.random.default_rng(config.seed)
        ids = np.asarray([prompt_ids], np.int64)  # (1, T): the prompt in one run, then one token per run
        past, seen = self.empty_cache(), 0
        for _ in range(config.max_new_tokens):
            if limit is not None and seen + ids.shape[1] > limit:
                return
            seen += ids.shape[1]
            logits, past = self.forward(ids, np.ones((1, seen), np.int64), past)  # (1, V), grown cache
            token = next_token(logits[0], config, rng)
            if token in self.manifest.eos_token_ids:
                return
            yield token
            ids = np.array([[token]], np.int64)

    def generate(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> Iterator[str]:
        """Stream the continuation of ``prompt`` as text pieces (whole characters only)."""
        prompt_ids = self.encode(prompt)
        tokens = self.token_ids(prompt_ids, GenerationConfig(max_new_tokens, temperature, top_p, seed))
        return _stream_text(tokens, TextStream(self.tokenizer, prompt_ids[-CONTEXT_TOKENS:]))


def _stream_text(tokens: Iterator[int], text: TextStream) -> Iterator[str]:
    for token in tokens:
        if piece := text.push(token):
            yield piece
    if rest := text.flush():
        yield rest


def next_token(logits: npt.NDArray[np.float32], config: GenerationConfig, rng: np.random.Generator) -> int:
    """Greedy argmax at temperature 0, else a top-p sample from ``softmax(logits / temperature)``; logits (V,)."""
    if config.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / config.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")  # (V,) most likely first
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, config.top_p * cumulative[-1])) + 1  # at least the top token
    kept = probs[order[:keep]]
    return int(order[rng.choice(keep, p=kept / kept.sum())])


class TextStream:
    """Incremental detokenization: emit only text that later tokens cannot change.

    Decodes a window of ids (a few already-emitted ones for context, so the tokenizer places
    spaces as it would in the whole text) and holds back text that ends in an incomplete UTF-8
    sequence (U+FFFD), as byte-level tokens split multi-byte characters.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        emitted = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character comes out as U+FFFD)."""
        emitted = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(emitted):] if len(text) > len(emitted) else ""


def _read_manifest(path: Path) -> InferenceManifest:
    if not path.is_dir():
        raise BundleError(f"{path}: inference directory not found")
    manifest = path / MANIFEST
    try:
        obj = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{manifest}: missing; is {path} an inference directory made by export_inference?") \
            from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest}: corrupt JSON ({e}); re-export the model") from None
    return InferenceManifest.from_json(obj, str(manifest))


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer  # lazy: importing this module should stay cheap

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a corrupt file
        raise BundleError(f"{path}: not a valid tokenizer ({e}); re-export the model") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
