"""Export a Hugging Face model (local dir or GGUF) to a pocketzo bundle.

1. load the model in fp32 and wrap it in a loss head (``heads``);
2. ``torch.onnx.export(dynamo=True, optimize=False)``: keeps HF parameter names and a tied
   embedding/lm_head as one initializer;
3. rename initializers to their canonical HF state-dict names and turn the trainable ones
   into graph inputs (frozen ones stay initializers: prepacked, quantizable);
4. write the bundle into a temp dir, check its loss through the device runtime against the
   plain PyTorch loss, at the initial and at random adapter values (``parity``), and only then
   rename it into place (``_io.atomic_dir``).
"""

from __future__ import annotations

import gc
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pocketzo import __version__
from pocketzo._io import atomic_dir, write_json
from pocketzo.errors import ExportError
from pocketzo.export import adapters, gradients, heads, parity, split
from pocketzo.export.config import ExportConfig
from pocketzo.export.loading import load_model
from pocketzo.export.ort_format import convert_to_ort
from pocketzo.export.quantize import quantize_frozen
from pocketzo.export.quantize_gguf import quantize_from_gguf
from pocketzo.export.tracing import lift_trainable, parameters, save_graph, tensor_bytes, trace_onnx
from pocketzo.runtime import _safetensors
from pocketzo.runtime.manifest import (
    FILE_NAMES,
    FORMAT_VERSION,
    MANIFEST,
    UNSPLIT_VERSION,
    HeadKind,
    Manifest,
    TaskSpec,
    ValueSpec,
    layout,
)

ORT_FORMAT_MAX_BYTES = 2_000_000_000  # a flatbuffer (the .ort file) cannot exceed 2 GB
MODEL, TRAINABLE = FILE_NAMES["model"], FILE_NAMES["trainable"]
ORT_MODEL, BASE_CONFIG = FILE_NAMES["ort_model"], FILE_NAMES["base_config"]
GRADIENT_ORT_MODEL = FILE_NAMES["gradient_ort_model"]
TRUNK_ORT_MODEL, HEAD_ORT_MODEL = FILE_NAMES["trunk_ort_model"], FILE_NAMES["head_ort_model"]
# A quantized base is checked against the fp32 PyTorch loss too, within 50 % (relative above a loss of 1):
# that catches a broken graph, not quantization error, which export.quantized.parity and the accuracy
# tables report (dynamic int8 on SmolLM2-135M is off by 0.35 on the random parity batch, loss 1.23).
QUANTIZED_TOLERANCE = 0.5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _say(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def chat_template(tokenizer, template: str) -> str:
    """``template`` as one user turn of the tokenizer's chat template, ending where the assistant's reply begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError("--chat: the model's tokenizer has no chat template; export without --chat")
    text = tokenizer.apply_chat_template([{"role": "user", "content": template}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count("{text}") != 1:
        raise ExportError(f"--chat: the chat template rendered '{{text}}' {text.count('{text}')} times")
    return text


def _task_spec(config: ExportConfig, head: HeadKind, tokenizer) -> TaskSpec:
    token_ids: tuple[int, ...] = ()
    template = config.template
    if head == "prompt":
        if template is None:
            raise ExportError('classify on a causal LM needs --template, e.g. "Review: {text}\\nSentiment:"')
        if config.chat:
            template = chat_template(tokenizer, template)
        # a label follows the template as its next word: after a space, or first in the chat reply
        lead = "" if config.chat else " "
        token_ids = tuple(tokenizer.encode(lead + name, add_special_tokens=False)[0] for name in config.labels)
        if len(set(token_ids)) != len(token_ids):
            raise ExportError(f"labels {list(config.labels)} share their first token {token_ids}; "
                              "choose label words that start differently")
        tail = template.split("{text}", 1)[1]
        if len(tokenizer.encode(tail, add_special_tokens=False)) + 2 > config.max_length:
            raise ExportError(f"--max-length {config.max_length} leaves no room for text after the template's "
                              f"tail {tail!r}")
    elif config.chat:
        raise ExportError("--chat needs a causal LM: an encoder's classification head reads no template")
    return TaskSpec(config.task, head, config.max_length, template if head == "prompt" else None,
                    tuple(config.labels) if config.task == "classify" else (), token_ids)


def _first_trainable_layer(net: torch.nn.Module, config: ExportConfig) -> int | None:
    """The lowest transformer layer that may train (``--trainable-layers K``: the last K of them); None: no limit."""
    if not config.trainable_layers:
        return None
    owner, attr = split.layer_stack(net, "--trainable-layers")
    n_layers = len(getattr(owner, attr))
    if config.trainable_layers > n_layers:
        raise ExportError(f"--trainable-layers {config.trainable_layers}: the model has {n_layers} layers")
    return n_layers - config.trainable_layers


def _wrap(net: torch.nn.Module, head: HeadKind, task: TaskSpec, config: ExportConfig, tokenizer):
    """The loss head around ``net``, with the chosen adapters added; returns it and the manifest's adapter."""
    prompt, adapter = None, None
    if config.peft == "lora":
        adapters.add_lora(net, config.lora_targets, config.lora_rank, config.lora_alpha, config.slots, config.seed,
                          _first_trainable_layer(net, config))
        adapter = {"method": "lora", "rank": config.lora_rank, "alpha": config.lora_alpha,
                   "targets": list(config.lora_targets)}
    elif config.peft == "prompt":
        text = config.prompt_init and tokenizer.encode(config.prompt_init, add_special_tokens=False)
        prompt = adapters.prompt_init(net, config.prompt_tokens, config.slots, config.seed, text or None)
        adapter = {"method": "prompt", "tokens": config.prompt_tokens, "init_text": config.prompt_init}
    elif config.peft == "bitfit":
        adapter = {"method": "bitfit"}
    kw = {"prompt": prompt, "slots": config.slots}
    if head == "head" and config.slots > 1:  # the new head trains too, and it has no slot axis
        raise ExportError("--slots with a classification head (an encoder): the new head is trained as well and "
                          "would need a copy per slot, which is not built; export without --slots")
    if head == "lm":
        return heads.CausalLMLoss(net, **kw), adapter
    if head == "head":
        return heads.SequenceClassifierLoss(net, **kw), adapter
    return heads.PromptClassifierLoss(net, list(task.label_token_ids), **kw), adapter


def _select(wrapper: torch.nn.Module, config: ExportConfig, head: HeadKind) -> list[str]:
    names = [n.removeprefix("net.") for n, _ in wrapper.named_parameters()]
    pattern = {"none": config.trainable, "lora": r"\.lora_[AB]\.weight$", "prompt": r"^prompt_embeddings$",
               "bitfit": adapters.BITFIT}[config.peft]
    if config.peft != "none" and head == "head":  # a new classification head must train
        pattern = f"({pattern})|{adapters.NEW_HEAD}"
    chosen = adapters.select(names, pattern, config.freeze, _first_trainable_layer(wrapper.net, config))
    if not chosen:
        what = f"--peft {config.peft}" if config.peft != "none" else f"--trainable {config.trainable!r}"
        layers = f" / --trainable-layers {config.trainable_layers}" if config.trainable_layers else ""
        raise ExportError(f"{what} / --freeze {config.freeze!r}{layers} select no parameter; names look like "
                          f"{names[:3]}")
    return chosen


def export_bundle(model: str | Path, out: str | Path, config: ExportConfig, overwrite: bool = False) -> Manifest:
    """Write a bundle for ``model`` at ``out`` and return its manifest."""
    model, out = Path(model), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; choose another --out or pass --overwrite")
    if out.exists() and not (out / MANIFEST).is_file():
        raise ExportError(f"{out}: exists and is not a bundle (no {MANIFEST}); refusing to overwrite it")
    gguf_file = Path(config.gguf) if config.gguf else model  # --quantize gguf: the blocks come from this file
    if config.quantize == "gguf" and (gguf_file.suffix != ".gguf" or not gguf_file.is_file()):
        raise ExportError(f"--quantize gguf: {gguf_file} is not a .gguf file; give --gguf the file the model was "
                          "converted from")
    if config.quantize == "gguf" and config.split != "none":
        raise ExportError("--quantize gguf with --split is not built yet; export without --split")
    _say(f"loading {model}")
    net, tokenizer, head, source = load_model(model, config)
    task = _task_spec(config, head, tokenizer)
    wrapper, adapter = _wrap(net, head, task, config, tokenizer)
    trainable = _select(wrapper, config, head)
    # with P slots the rows are P equal groups: trace (and check parity) on the sample repeated P times
    sample = parity.sample_batch(task, len(tokenizer), config.seed, config.slots)
    with atomic_dir(out) as tmp:  # the bundle appears complete, after its parity check, or not at all
        _say("tracing the loss graph with torch.onnx (dynamo)")
        rows, seq = torch.export.Dim("rows"), torch.export.Dim("seq")
        batch = rows * config.slots if config.slots > 1 else rows
        label_axes = {0: batch} if task.kind == "classify" else {0: batch, 1: seq}
        axes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "labels": label_axes}
        proto = trace_onnx(wrapper, sample, ["input_ids", "attention_mask", "labels"], list(wrapper.outputs), axes)
        lifted = lift_trainable(proto, wrapper, trainable)
        params = parameters(wrapper)
        specs, buffer_elements = layout([(n, tuple(params[n].shape), params[n].dim() >= 2) for n in lifted])
        frozen_bytes = sum(tensor_bytes(i) for i in proto.graph.initializer)
        if config.ort and frozen_bytes > ORT_FORMAT_MAX_BYTES:
            raise ExportError(f"--ort: the ORT format holds at most 2 GB of weights in one file and this graph "
                              f"has {frozen_bytes / 1e9:.1f} GB; export without --ort (the runtime loads .onnx too)")
        save_graph(proto, tmp / MODEL)
        _safetensors.save(tmp / TRAINABLE,
                          {s.name: params[s.name].detach().float().numpy() for s in specs},
                          {"format": "pt", "producer": "pocketzo"})
        _save_tokenizer(tokenizer, tmp)
        net.config.to_json_file(tmp / BASE_CONFIG)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        label_shape = ("batch",) if task.kind == "classify" else ("batch", "seq")
        out_shapes = {"loss": (), "example_loss": ("batch",), "candidate_loss": ("batch", len(task.labels))}
        if config.slots > 1:
            out_shapes = {k: (config.slots, *(("rows",) + v[1:] if v else ())) for k, v in out_shapes.items()}
        manifest = Manifest(
            task=task,
            inputs=(ValueSpec("input_ids", "int64", ("batch", "seq")),
                    ValueSpec("attention_mask", "int64", ("batch", "seq")),
                    ValueSpec("labels", "int64", label_shape)),
            outputs=tuple(ValueSpec(n, "float32", out_shapes[n]) for n in wrapper.outputs),
            trainable=specs, buffer_elements=buffer_elements, pad_token_id=int(pad), source=source,
            base_config_file=BASE_CONFIG, slots=config.slots, adapter=adapter,
            export={"config": asdict(config), "pocketzo": __version__, "torch": torch.__version__,
                    "onnx_opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                    "external_data": True},
        )
        manifest = _write_manifest(tmp, manifest)
        _say("checking parity: ONNX Runtime vs PyTorch, at the initial and at random adapter values")
        reference = parity.reference(wrapper, head, sample, task, config, lifted)
        checked = parity.check(tmp, reference, sample, config.parity_tolerance)
        manifest = Manifest(**{**manifest.__dict__, "export": {**manifest.export, "parity": checked}})
        n_specs, n_params = len(specs), sum(s.numel for s in specs)
        # Free the in-memory graph now and the torch model once the gradient graph is traced from it: before
        # quantizing, which holds the graph about three times over (an OPT-1.3B export was killed otherwise).
        del proto
        gc.collect()
        exact = lifted
        if config.gradients:
            if config.gradient_layers:
                exact = gradients.exact_tensors(lifted, net.config.num_hidden_layers, config.gradient_layers)
            grad_parity = gradients.export_gradients(tmp, wrapper, sample, lifted, reference.random_values, exact)
            manifest = Manifest(**{**manifest.__dict__, "gradient_file": gradients.GRADIENT_MODEL,
                                   "gradient_tensors": tuple(exact),
                                   "export": {**manifest.export, "gradient_parity": grad_parity}})
        if config.split != "none":
            manifest = _add_split(tmp, manifest, wrapper, sample, lifted, config, label_axes, reference, checked)
        grad_head = wrapper if config.gradients and config.ort else None  # the ORT-format gradients' reference
        del wrapper, net, params
        gc.collect()
        if config.quantize == "gguf":
            _say(f"quantizing the frozen MatMul weights and embedding tables to {gguf_file.name}'s own blocks")
            stats = quantize_from_gguf(tmp / MODEL, gguf_file)
            manifest = _write_manifest(tmp, manifest)
            # the same values as the float32 graph, in other kernels: the float32 tolerance holds
            error = parity.check(tmp, reference, sample, config.parity_tolerance, cause=(
                "--quantize gguf: {differs}: the GGUF's blocks compute another function than the float32 model"))
            manifest = Manifest(**{**manifest.__dict__, "export": {
                **manifest.export, "quantized": {**stats, "parity": error}}})
        elif config.quantize != "none":
            recipe = config.quant_recipe
            what = "MatMul weights and embedding tables" if recipe.weight_only else "MatMul weights"
            _say(f"quantizing the frozen {what} to {config.quantize} (ONNX Runtime's quantizer)")
            if not recipe.weight_only:
                _say("warning: int8-dynamic quantizes the activations at run time; ZO training through such a base "
                     "collapsed on the demo task (49.4 %, docs/modes.md): use it for inference, int8 for training")
            elif recipe.mode == "int4":
                _say("warning: 4 bits change the model: ZO estimates through an int4 base correlate 0.29-0.81 with "
                     "float32's (int8: 0.997; docs/quantization.md); for ZO training prefer --quantize int8")
            stats = quantize_frozen(tmp / MODEL, recipe)
            if manifest.split:  # what the quantizer did to the trunk and the head, by file
                stats["split"] = {graph: quantize_frozen(tmp / graph, recipe)
                                  for graph in manifest.split.file_names[:2]}
            manifest = _write_manifest(tmp, manifest)
            # the graph was right in float32 (checked above): a mismatch now is the recipe changing the model
            error = parity.check(tmp, reference, sample, QUANTIZED_TOLERANCE, cause=(
                f"--quantize {config.quantize}: {{differs}}: these quantized weights change the model too much; "
                "use --quantize int8, or keep more weights at 8 bits (--quant-8bit)"))
            manifest = Manifest(**{**manifest.__dict__, "export": {
                **manifest.export, "quantized": {**stats, "parity": error}}})
            if manifest.split:
                manifest = _check_split(tmp, manifest, reference, sample, QUANTIZED_TOLERANCE, error,
                                        "split_parity_quantized")
        if config.ort:
            _say("converting to ORT format (ONNX Runtime Mobile)")
            written = convert_to_ort(tmp)
            split_ort = manifest.split and replace(manifest.split, trunk_ort_file=TRUNK_ORT_MODEL,
                                                   head_ort_file=HEAD_ORT_MODEL)
            manifest = _write_manifest(tmp, replace(manifest, ort_model_file=ORT_MODEL, gradient_ort_file=(
                GRADIENT_ORT_MODEL if GRADIENT_ORT_MODEL in written else None), split=split_ort or None))
            tolerance = config.parity_tolerance if config.quantize in ("none", "gguf") else QUANTIZED_TOLERANCE
            parity_ort = parity.check(tmp, reference, sample, tolerance)
            manifest = Manifest(**{**manifest.__dict__, "export": {**manifest.export, "parity_ort": parity_ort}})
            if manifest.split:
                manifest = _check_split(tmp, manifest, reference, sample, tolerance, parity_ort, "split_parity_ort")
            if GRADIENT_ORT_MODEL in written:
                _say("checking the ORT-format gradients: ONNX Runtime vs PyTorch autograd")
                grad_ort = gradients.check_gradients(tmp / GRADIENT_ORT_MODEL, grad_head, sample, exact,
                                                     reference.random_values, trainable=lifted)
                manifest = Manifest(**{**manifest.__dict__, "export": {**manifest.export,
                                                                       "gradient_parity_ort": grad_ort}})
        manifest = _write_manifest(tmp, manifest)
    _say(f"wrote {out} ({n_specs} trainable tensors, {n_params:,} parameters; "
         f"parity error {checked['abs_error']:.2e})")
    return manifest


def _add_split(tmp: Path, manifest: Manifest, wrapper: torch.nn.Module, sample: parity.Sample, trainable: list[str],
               config: ExportConfig, label_axes: dict, reference: parity.Reference, whole: dict) -> Manifest:
    """trunk.onnx and head.onnx (``--split``), checked against PyTorch and against the whole graph (``whole``:
    its parity result); returns the manifest describing them."""
    owner, attr = split.layer_stack(wrapper.net)
    n_layers = len(getattr(owner, attr))
    layer = split.split_layer(trainable, n_layers, config.split_layer)
    _say(f"splitting at layer {layer} of {n_layers}: tracing the frozen trunk and the trainable head")
    spec = split.export_split(tmp, wrapper, sample, trainable, layer, n_layers, config.slots, label_axes)
    manifest = _write_manifest(tmp, replace(manifest, split=spec))
    return _check_split(tmp, manifest, reference, sample, config.parity_tolerance, whole, "split_parity")


def _check_split(tmp: Path, manifest: Manifest, reference: parity.Reference, sample: parity.Sample,
                 tolerance: float, whole: dict, key: str) -> Manifest:
    """Trunk then head against PyTorch (``tolerance``) and against the whole graph's ``whole`` parity result."""
    _say("checking the split: trunk then head against PyTorch and against the whole graph")
    try:
        checked = parity.check(tmp, reference, sample, tolerance, split=True)
    except ExportError as e:  # the whole graph passed this check: the split is what fails
        raise ExportError(f"--split: trunk then head fail the check the whole graph passed ({e}); this model cannot "
                          "be split as exported, export without --split") from None
    checked["whole_graph_error"] = split.check_split(whole, checked)
    return Manifest(**{**manifest.__dict__, "export": {**manifest.export, key: checked}})


def _write_manifest(bundle_dir: Path, manifest: Manifest) -> Manifest:
    """Write ``manifest`` with ``files`` naming every file now in ``bundle_dir``; return it."""
    present = {p.name for p in bundle_dir.iterdir()} - {MANIFEST}
    files = {role: name for role, name in FILE_NAMES.items() if name in present}
    unnamed = present - set(files.values())
    if unnamed:  # a client fetching the files the manifest names would miss these
        raise ExportError(f"{bundle_dir}: the export wrote {sorted(unnamed)}, which the manifest has no role for")
    version = FORMAT_VERSION if manifest.split is not None else UNSPLIT_VERSION
    manifest = replace(manifest, files=files, format_version=version)
    write_json(bundle_dir / MANIFEST, manifest.to_json())
    return manifest


def _save_tokenizer(tokenizer, bundle_dir: Path) -> None:
    """tokenizer.json for the device, plus the HF tokenizer files for desktop users."""
    staging = bundle_dir / ".tokenizer"
    tokenizer.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (staging / name).is_file():
            shutil.move(staging / name, bundle_dir / name)
    shutil.rmtree(staging)
