"""Desktop PyTorch baselines: MeZO and backprop + AdamW, full-parameter, on a Hugging Face causal LM.

    python benchmarks/torch_baselines.py --mode mezo|adamw --model-dir DIR --json OUT.json [--lr --eps ...]

Both modes train every parameter (a tied embedding / lm_head is one parameter and is counted once) on the
same random batch (``common.make_batch``), with dropout off (``model.eval()``; autograd is unaffected).

``mezo`` re-implements the step loop of MeZO (princeton-nlp/MeZO, ``large_models/trainer.py``:
``zo_step`` + ``zo_update``) as faithfully as a speed/memory baseline needs:

* one random seed per step; ``torch.manual_seed(seed)`` and then, parameter by parameter in
  ``model.parameters()`` order, one whole-tensor ``z = torch.normal(0, 1, size)`` in the parameter's
  dtype and device: the global torch generator replays the same ``z`` every time the seed is set;
* perturb ``+1 eps``, loss1; perturb ``-2 eps``, loss2; perturb ``+1 eps`` (restore); each forward runs
  under ``torch.inference_mode`` with labels, so the loss is the model's own causal-LM loss;
* ``projected_grad = (loss1 - loss2) / (2 eps)``; the update regenerates ``z`` from the same seed once
  more: ``theta -= lr * (projected_grad * z + weight_decay * theta)``, weight decay only on parameters
  with two or more dimensions (MeZO skips names containing "bias"/"layer_norm"; deciding by
  dimensionality also skips norms named otherwise, such as Llama's RMSNorm);
* so four noise regenerations and two forwards per step, exactly like MeZO.

Two deliberate differences, neither changing the arithmetic: parameters are modified in place
(``param.data.add_``) where MeZO rebinds ``param.data = param.data + ...``, which allocates a fresh
tensor per parameter per pass; and the update applies the same formula as ``theta *= 1 - lr*wd`` (decayed
parameters, only when ``wd != 0``) followed by ``theta += -lr*projected_grad * z``, with no temporaries
beyond ``z``. The reported loss is loss1, the loss MeZO's ``zo_step`` returns.

``adamw`` is standard backprop: ``model(**batch).loss.backward()``, ``torch.optim.AdamW`` over all
parameters, ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from common import base_parser, make_batch, time_steps, write_result
from transformers import AutoModelForCausalLM, PreTrainedModel

Batch = dict[str, torch.Tensor]


def load_model(model_dir: Path) -> PreTrainedModel:
    """fp32, eager attention, every parameter trainable, dropout off."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.requires_grad_(True)
    return model


def mezo_perturb(params: list[torch.nn.Parameter], seed: int, scale: float, eps: float) -> None:
    """MeZO's ``zo_perturb_parameters``, in place: ``theta += scale * eps * z(seed)``."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0.0, std=1.0, size=p.shape, dtype=p.dtype, device=p.device)
        p.data.add_(z, alpha=scale * eps)


def mezo_update(params: list[torch.nn.Parameter], seed: int, projected_grad: float, lr: float,
                weight_decay: float) -> None:
    """MeZO's ``zo_update``: ``theta -= lr * (projected_grad * z(seed) + wd * theta)``, wd on >= 2-D only."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0.0, std=1.0, size=p.shape, dtype=p.dtype, device=p.device)
        if weight_decay != 0.0 and p.ndim >= 2:
            p.data.mul_(1.0 - lr * weight_decay)
        p.data.add_(z, alpha=-lr * projected_grad)


def mezo_step_fn(model: PreTrainedModel, batch: Batch, lr: float, eps: float, weight_decay: float,
                 seed: int) -> Callable[[], float]:
    """One MeZO step (``zo_step`` then ``zo_update``) per call; returns loss1."""
    params = list(model.parameters())
    seeds = np.random.default_rng(seed)

    def forward_loss() -> float:
        with torch.inference_mode():
            return model(**batch).loss.item()

    def step() -> float:
        step_seed = int(seeds.integers(1_000_000_000))
        mezo_perturb(params, step_seed, 1.0, eps)
        loss1 = forward_loss()
        mezo_perturb(params, step_seed, -2.0, eps)
        loss2 = forward_loss()
        mezo_perturb(params, step_seed, 1.0, eps)
        projected_grad = (loss1 - loss2) / (2 * eps)
        mezo_update(params, step_seed, projected_grad, lr, weight_decay)
        return loss1

    return step


def adamw_step_fn(model: PreTrainedModel, batch: Batch, lr: float, weight_decay: float) -> Callable[[], float]:
    """One backprop + AdamW step per call; returns the loss before the update."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("mezo", "adamw"), required=True)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-4 for mezo, 1e-5 for adamw")
    parser.add_argument("--eps", type=float, default=1e-3, help="MeZO perturbation scale")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="default: 0 for mezo, torch's AdamW default 0.01 for adamw")
    args = parser.parse_args(argv)
    lr = args.lr if args.lr is not None else {"mezo": 1e-4, "adamw": 1e-5}[args.mode]
    weight_decay = args.weight_decay if args.weight_decay is not None else {"mezo": 0.0, "adamw": 0.01}[args.mode]

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.model_dir)
    batch = {k: torch.from_numpy(v) for k, v in
             make_batch(model.config.vocab_size, args.batch_size, args.seq_len, args.seed).items()}
    n_params = sum(p.numel() for p in model.parameters())

    if args.mode == "mezo":
        step = mezo_step_fn(model, batch, lr, args.eps, weight_decay, args.seed)
    else:
        step = adamw_step_fn(model, batch, lr, weight_decay)
    losses: list[float] = []
    times = time_steps(lambda: losses.append(step()), args.steps, args.warmup)
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite loss: {losses}")

    write_result(args.json, {
        "mode": args.mode,
        "step_s_all": times,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "params": n_params,
        "model_type": model.config.model_type,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": lr,
        "eps": args.eps if args.mode == "mezo" else None,
        "weight_decay": weight_decay,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
