"""Backprop ceiling for the accuracy benchmark: PyTorch AdamW fine-tuning of the bundle's trainable set.

    python benchmarks/accuracy_backprop.py --bundle bundles/smollm2-sentiment \
        --model ~/.cache/pocketzo/smollm2-135m-instruct --train TRAIN.jsonl --eval DEV.jsonl \
        --steps 1000 --seed 0 --json OUT.json
    python benchmarks/accuracy_backprop.py ... --minutes 5,15 [--ood OOD.jsonl] --json OUT.json   # bench-value

It trains exactly what pocketzo's zeroth-order trainer trains (the bundle's trainable tensors, by their
names in the bundle, starting from the bundle's ``trainable.safetensors``: a new encoder head starts
from the same seeded weights; LoRA or virtual tokens are added to the model as the export added them),
on the same rows at every step (``BatchSampler`` with the same seed), with the same loss head as the
export (``PromptClassifierLoss`` for a causal LM, ``SequenceClassifierLoss`` for an encoder) and the same
accuracy (argmin of ``candidate_loss`` over the eval set), so its test accuracy is the ceiling the ZO methods
are compared against. The model stays in eval mode (no dropout), as in the exported ONNX graph.

One backprop step costs one forward plus one backward pass, so the curve's x-axis is optimizer steps,
not ZO forward passes: compare runs at equal steps, or convert the axes explicitly. With ``--minutes`` the
run is read instead at those minutes of training (the steps' own seconds), as ``benchmarks/value.py`` reads
pocketzo's runs, and the result has ``stages`` in its format.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pocketzo.export import adapters
from pocketzo.export.heads import PromptClassifierLoss, SequenceClassifierLoss
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.data import Dataset, TextEncoder
from pocketzo.zo_trainer.batches import BatchSampler
from pocketzo.zo_trainer.evaluate import label_auc, macro_f1


def with_adapter(net: torch.nn.Module, bundle: Bundle, initial: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Add the bundle's adapter to ``net`` as the export did: LoRA on the same layers, or the virtual tokens
    (returned, for the loss head to hold). Their values are set from ``initial`` with every other trainable tensor."""
    adapter = bundle.manifest.adapter or {}
    if adapter.get("method") == "lora":
        layers = [adapters.layer_index(t.name) for t in bundle.manifest.trainable]
        first = min((k for k in layers if k is not None), default=None)
        adapters.add_lora(net, tuple(adapter["targets"]), adapter["rank"], adapter["alpha"], 1, 0, first)
    elif adapter.get("method") == "prompt":
        return initial["prompt_embeddings"].clone()
    return None


def tensors(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask), torch.from_numpy(batch.labels)


@torch.no_grad()
def evaluate(head: torch.nn.Module, data: Dataset, n_labels: int, batch_size: int = 32) -> dict:
    """Loss, accuracy, macro-F1, label AUC and predicted shares over ``data`` in length-sorted batches, from
    ``candidate_loss`` with pocketzo's own metric functions, as ``pocketzo eval`` reports them."""
    order = np.argsort(data.lengths(), kind="stable")
    losses = np.empty(len(data), np.float64)
    scores = np.empty((len(data), n_labels), np.float64)
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        _, example_loss, candidate_loss = head(*tensors(data.batch(idx)))
        losses[idx] = example_loss.numpy()
        scores[idx] = candidate_loss.numpy()
    preds = scores.argmin(1)
    return {"n": len(data), "loss": float(losses.mean()), "accuracy": float(np.mean(preds == data.classes)),
            "macro_f1": macro_f1(data.classes, preds, n_labels), "auc": label_auc(scores, data.classes),
            "predicted_shares": [float(x) for x in np.bincount(preds, minlength=n_labels) / len(data)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--model", required=True, help="Hugging Face model directory the bundle was exported from")
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--eval-rows", type=int, default=0, help="use only the first N eval rows (0: all)")
    p.add_argument("--steps", type=int, default=0, help="train this many steps (or give --minutes)")
    p.add_argument("--minutes", default="", help="comma-separated readings in minutes of training (the steps' "
                   "seconds, evaluations excluded): evaluate at each, stop after the last")
    p.add_argument("--ood", help="a second labelled file, also evaluated at each reading (out of domain)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-at", default="", help="comma-separated steps to evaluate at (0 and --steps always)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    bundle = Bundle(args.bundle)
    encoder = TextEncoder(bundle)
    train, data = encoder.dataset(args.train), encoder.dataset(args.eval)
    if args.eval_rows:
        data = dataclasses.replace(data, ids=data.ids[: args.eval_rows], classes=data.classes[: args.eval_rows])

    initial = load_file(str(bundle.trainable_path))
    decay = {t.name: t.decay for t in bundle.manifest.trainable}
    if bundle.task.head == "prompt":
        net = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
        prompt = with_adapter(net, bundle, initial)
        head = PromptClassifierLoss(net, list(bundle.task.label_token_ids), prompt=prompt).eval()
    elif bundle.task.head == "head":
        net = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=len(bundle.task.labels), dtype=torch.float32, attn_implementation="eager")
        head = SequenceClassifierLoss(net, prompt=with_adapter(net, bundle, initial)).eval()
    else:
        sys.exit(f"{args.bundle}: a {bundle.task.head!r} bundle is no classifier")
    named = {n.removeprefix("net."): q for n, q in head.named_parameters()}  # the bundle's names
    params = {n: q for n, q in named.items() if n in decay}
    if set(params) != set(decay):
        sys.exit(f"trainable set mismatch: the model lacks {sorted(set(decay) - set(params))[:3]}")
    for n, q in named.items():
        q.requires_grad_(n in params)
    with torch.no_grad():
        for n, q in params.items():
            q.copy_(initial[n].reshape(q.shape))
    groups = [{"params": [q for n, q in params.items() if decay[n] == d], "weight_decay": args.weight_decay * d}
              for d in (True, False)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr)
    n_trainable = sum(q.numel() for q in params.values())

    sampler = BatchSampler(len(train), args.batch_size, args.seed)
    readings = sorted(60.0 * float(m) for m in args.minutes.split(",") if m.strip())
    if not (args.steps or readings) or (args.steps and readings):
        sys.exit("give --steps N or --minutes M[,M...]")
    ood = encoder.dataset(args.ood) if args.ood else None
    n_labels = len(bundle.task.labels)
    eval_at = {0, args.steps} | {int(s) for s in args.eval_at.split(",") if s.strip()}
    curve, stages, step_seconds = [], [], []
    step = 0
    while True:
        spent = sum(step_seconds)
        if readings and (step == 0 or spent >= readings[len(stages)]):
            if step == 0:
                zero_shot = evaluate(head, data, n_labels)
            else:  # a reading: where pocketzo's --max-train-seconds would stop
                stages.append({"minutes": round(readings[len(stages)] / 60), "train_seconds": spent, "steps": step,
                               "eval": evaluate(head, data, n_labels),
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "step_seconds_median": statistics.median(step_seconds),
                               **({"ood": evaluate(head, ood, n_labels)} if ood else {})})
                print(f"{stages[-1]['minutes']} min, step {step}: accuracy {stages[-1]['eval']['accuracy']:.4f}",
                      file=sys.stderr, flush=True)
                if len(stages) == len(readings):
                    break
        if not readings and step in eval_at:
            e = evaluate(head, data, n_labels)
            curve.append({"step": step, **e, "train_seconds": sum(step_seconds)})
            print(f"step {step}/{args.steps}: accuracy {e['accuracy']:.4f} eval loss {e['loss']:.4f} "
                  f"({len(data)} rows, {time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
            if step == args.steps:
                break
        t0 = time.perf_counter()
        loss, _, _ = head(*tensors(train.batch(sampler.indices(step))))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t0)
        step += 1

    out = {"method": "backprop-adamw", "seed": args.seed, "lr": args.lr, "steps": step,
           "batch_size": args.batch_size, "trainable_parameters": n_trainable,
           "step_seconds_median": statistics.median(step_seconds) if step_seconds else None,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "wall_seconds": time.perf_counter() - started}
    if readings:
        out |= {"zero_shot": zero_shot, "stages": stages}
    else:
        out |= {"curve": curve, "final_accuracy": curve[-1]["accuracy"]}
    path = Path(args.json)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
