"""First-order and hybrid training (zo_trainer.first_order): AdamW and SGD steps against torch.optim on a
tiny model, gradient clipping, decay on matrices only, state memory, an undone non-finite gradient; the
hybrid step by hand; fo and hybrid runs on exported gradient graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import resume_without_the_newest_checkpoint

from pocketzo.errors import ExportError
from pocketzo.export.gradients import exact_tensors
from pocketzo.runtime.manifest import layout
from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer import Method
from pocketzo.zo_trainer.first_order import first_order_bytes
from pocketzo.zo_trainer.noise import Perturber
from pocketzo.zo_trainer.trainer import build_first_order_trainer


class TinyNet:
    """A 4 -> 3 -> 2 classifier whose 23 weights live in a FlatParameters; its 'gradient graph' is autograd."""

    SPECS = [("w1", (3, 4), True), ("b1", (3,), False), ("w2", (2, 3), True), ("b2", (2,), False)]

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 4, generator=g)
        self.y = torch.randint(0, 2, (32,), generator=g)
        specs, n = layout(self.SPECS)
        self.params, self.gradient = FlatParameters(specs, n), FlatParameters(specs, n)
        for view in self.params.views.values():
            view[...] = torch.randn(view.shape, generator=g).numpy() * 0.5

    @staticmethod
    def loss(x, y, t: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(x @ t["w1"].T + t["b1"])
        return torch.nn.functional.cross_entropy(h @ t["w2"].T + t["b2"], y)

    def run(self, _batch=None) -> float:
        t = {k: torch.tensor(v, requires_grad=True) for k, v in self.params.views.items()}
        loss = self.loss(self.x, self.y, t)
        loss.backward()
        for k, view in self.gradient.views.items():
            view[...] = t[k].grad.numpy()
        return float(loss.detach())

    def trainer(self, method: Method):
        return build_first_order_trainer(self.params, self.gradient, self.run, method, threads=1)

    def torch_params(self) -> dict[str, torch.nn.Parameter]:
        return {k: torch.nn.Parameter(torch.tensor(v)) for k, v in self.params.views.items()}


@pytest.mark.parametrize("fields, make_optimizer", [
    (dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
     lambda decay, rest: torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": rest, "weight_decay": 0.0}], lr=1e-2)),
    (dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.05),
     None),  # torch's SGD couples decay into the gradient; ours is decoupled: checked by hand below
    (dict(optimizer="sgd", lr=0.1, momentum=0.9),
     lambda decay, rest: torch.optim.SGD(decay + rest, lr=0.1, momentum=0.9)),
    (dict(optimizer="adamw", lr=1e-2, grad_clip=0.05), "clip"),
], ids=["adamw-decay", "sgd-decoupled-decay", "sgd-momentum", "adamw-clip"])
def test_steps_match_torch(fields, make_optimizer):
    net = TinyNet()
    method = Method(steps=20, method="fo", **fields)
    ref = net.torch_params()
    decay = [ref[name] for name, _, d in TinyNet.SPECS if d]
    rest = [ref[name] for name, _, d in TinyNet.SPECS if not d]
    if make_optimizer is None:  # decoupled decay by hand: theta <- (1 - lr wd) theta, then SGD momentum
        opt = torch.optim.SGD(decay + rest, lr=0.1, momentum=0.9)
    elif make_optimizer == "clip":
        opt = torch.optim.AdamW(decay + rest, lr=1e-2, weight_decay=0.0)
    else:
        opt = make_optimizer(decay, rest)
    trainer = net.trainer(method)
    for step in range(20):
        record = trainer.step(step, None)
        opt.zero_grad()
        TinyNet.loss(net.x, net.y, ref).backward()
        if make_optimizer == "clip":
            norm = torch.nn.utils.clip_grad_norm_(decay + rest, 0.05)
            assert record.grad_norm == pytest.approx(float(norm), rel=1e-5)
        if make_optimizer is None:
            with torch.no_grad():
                for p in decay:
                    p.mul_(1 - 0.1 * 0.05)
        opt.step()
    trainer.close()
    for name, view in net.params.views.items():
        np.testing.assert_allclose(view, ref[name].detach().numpy(), rtol=0, atol=2e-6, err_msg=name)
    assert not np.allclose(net.params.views["w1"], TinyNet().params.views["w1"])  # it moved


def test_first_order_state_memory_is_as_documented():
    net = TinyNet()
    n = net.params.buffer.shape[0]
    for fields, arrays in ((dict(optimizer="adamw"), 2), (dict(optimizer="sgd", momentum=0.9), 1),
                           (dict(optimizer="sgd"), 0)):
        trainer = net.trainer(Method(steps=1, method="fo", **fields))
        state = trainer.state
        assert sum(a.nbytes for a in state.arrays().values()) == 4 * arrays * n
        assert first_order_bytes(Method(steps=1, method="fo", **fields), n, 1) == (
            4 * n * (1 + arrays) + sum(a.nbytes for a in state.scratch))


def test_a_non_finite_gradient_is_undone():
    net = TinyNet()
    before = net.params.buffer.copy()
    trainer = net.trainer(Method(steps=1, method="fo", optimizer="adamw", lr=1e-2))

    def poisoned(_batch=None) -> float:
        loss = net.run()
        net.gradient.buffer[3] = np.nan
        return loss

    trainer.evaluator._backward = poisoned
    record = trainer.step(0, None)
    assert record.status == "undone" and trainer.state.t == 0
    np.testing.assert_array_equal(net.params.buffer, before)


@pytest.mark.parametrize("bad", [dict(directions=2), dict(adaptive=True), dict(estimator="one-sided"),
                                 dict(optimizer="adamw", momentum=0.9)])
def test_zeroth_order_options_are_refused_with_fo(bad):
    with pytest.raises(ValueError, match="fo|SGD"):
        Method(steps=1, method="fo", **bad)
    with pytest.raises(ValueError, match="need --method fo"):
        Method(steps=1, optimizer="adamw")
    with pytest.raises(ValueError, match="needs --method fo or hybrid"):
        Method(steps=1, micro_batch=4)


@pytest.mark.parametrize("micro_batch", [0, 3])
def test_fo_training_on_a_gradient_bundle_learns_resumes_bit_for_bit_and_is_not_replayed(bundles, sentiment_files,
                                                                                        tmp_path, micro_batch):
    from dataclasses import replace

    from pocketzo.errors import PocketzoError
    from pocketzo.runtime import Bundle
    from pocketzo.zo_trainer import RunPolicy, replay_run, train

    bundle = bundles("llama-classify-grad")
    method = Method(steps=40, method="fo", optimizer="adamw", lr=3e-3, batch_size=8, seed=3, weight_decay=0.01,
                    micro_batch=micro_batch)
    policy = RunPolicy(threads=1, progress=False)
    ref = train(bundle, sentiment_files["train"], tmp_path / "ref", method, policy, eval_path=sentiment_files["dev"])
    assert ref["final_eval"]["loss"] < ref["initial_eval"]["loss"] - 0.1
    assert ref["forward_passes"] == 40 and ref["warnings"] == []
    weights = FlatParameters.from_bundle(Bundle(bundle), tmp_path / "ref" / "weights.safetensors").buffer
    # checkpoints hold m and v: a run that loses its newest checkpoint resumes from an older one, same bits
    resumed, _ = resume_without_the_newest_checkpoint(
        bundle, sentiment_files["train"], tmp_path / "run", method,
        replace(policy, checkpoint_every=10, keep_checkpoints=4), sentiment_files["dev"], {"threads": 2})
    assert (tmp_path / "run" / "checkpoints" / "step-00000030" / "second_moment.npy").is_file()
    assert resumed.tobytes() == weights.tobytes()
    with pytest.raises(PocketzoError, match="run with exact gradients"):
        replay_run(bundle, tmp_path / "ref")


@pytest.mark.parametrize("estimator", ["one-sided", "two-sided"])
def test_a_hybrid_step_is_the_exact_gradient_above_the_cut_and_the_zo_estimate_below(estimator):
    """w1, b1 get g z with g = (L(theta + eps z) - L(theta)) / eps (one-sided, L(theta) from the exact point)
    or (L(theta + eps z) - L(theta - eps z)) / (2 eps); w2, b2 the exact gradient; one SGD step."""
    net = TinyNet()
    theta = net.params.buffer.copy()
    split = net.params.specs[2].offset  # w2: the first tensor with an exact gradient

    def backward(_batch=None) -> float:
        loss = net.run()
        net.gradient.buffer[:split] = 0.0  # a gradient graph cut at w2 has no output below it
        return loss

    def forward(_batch=None) -> float:
        t = {k: torch.tensor(v) for k, v in net.params.views.items()}
        return float(TinyNet.loss(net.x, net.y, t))

    lr, eps = 0.1, 1e-2
    method = Method(steps=1, method="hybrid", lr=lr, eps=eps, estimator=estimator)
    trainer = build_first_order_trainer(net.params, net.gradient, backward, method, 1, forward, split)
    record = trainer.step(0, None)
    trainer.close()
    trained = net.params.buffer.copy()
    (direction,) = record.directions
    z = Perturber(np.zeros(split, np.float32), method.perturbation).noise(direction.seed)
    plus = theta.copy()
    plus[:split] += np.float32(eps) * z
    net.params.buffer[:] = plus
    assert forward() == pytest.approx(direction.loss_plus, rel=1e-6)
    net.params.buffer[:] = theta
    assert record.loss_theta == pytest.approx(backward(), rel=1e-6)
    exact = net.gradient.buffer.copy()
    g = (direction.loss_plus - record.loss_theta) / eps
    if estimator == "two-sided":
        net.params.buffer[:split] -= np.float32(eps) * z
        assert forward() == pytest.approx(direction.loss_minus, rel=1e-6)
        g = (direction.loss_plus - direction.loss_minus) / (2 * eps)
    else:
        assert direction.loss_minus is None
    assert direction.grad == pytest.approx(g, rel=1e-6)
    want = theta.copy()
    want[:split] -= np.float32(lr * g) * z
    want[split:] -= np.float32(lr) * exact[split:]
    np.testing.assert_allclose(trained, want, rtol=0, atol=1e-6)
    assert not np.array_equal(want[:split], theta[:split]) and not np.array_equal(want[split:], theta[split:])


def test_gradient_layers_cut_the_backward_at_a_layer():
    names = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up.weight",
             "model.layers.1.input_layernorm.weight", "model.layers.2.input_layernorm.weight", "model.norm.weight",
             "lm_head.weight"]
    assert exact_tensors(names, 3, 1) == names[4:]
    assert exact_tensors(names, 3, 2) == names[3:]
    assert exact_tensors(names, 3, 3) == names
    bert = ["bert.encoder.layer.0.output.dense.bias", "bert.encoder.layer.1.output.dense.bias", "classifier.weight"]
    assert exact_tensors(bert, 2, 1) == bert[1:]
    assert exact_tensors(["model.layers.0.a", "head.weight"], 4, 2) == ["head.weight"]  # only the head up there
    with pytest.raises(ExportError, match="no trainable tensor in the last 1"):
        exact_tensors(["model.layers.0.a", "model.layers.1.a"], 4, 1)
    with pytest.raises(ExportError, match=r"layers\.0\.b \(layer 0\) comes after"):
        exact_tensors(["model.layers.3.a", "model.layers.0.b"], 4, 1)


def test_hybrid_training_learns_resumes_bit_for_bit_and_needs_a_cut_graph(bundles, sentiment_files, tmp_path):
    from dataclasses import replace

    from pocketzo.runtime import Bundle
    from pocketzo.zo_trainer import RunPolicy, train

    bundle = Bundle(bundles("llama-norms-hybrid"))
    exact = bundle.manifest.gradient_tensors
    assert exact == ("model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                     "model.norm.weight")
    assert bundle.manifest.export["gradient_parity"]["max_error"] <= 1e-5
    method = Method(steps=30, method="hybrid", optimizer="adamw", lr=0.1, estimator="one-sided", batch_size=8,
                    seed=1)
    policy = RunPolicy(threads=1, progress=False)
    ref = train(bundle.path, sentiment_files["train"], tmp_path / "ref", method, policy,
                eval_path=sentiment_files["dev"])
    assert ref["final_eval"]["loss"] < ref["initial_eval"]["loss"] - 0.05
    weights = FlatParameters.from_bundle(bundle, tmp_path / "ref" / "weights.safetensors")
    initial = FlatParameters.from_bundle(bundle)
    for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):  # both parts moved
        assert not np.array_equal(weights.views[name], initial.views[name])
    resumed, _ = resume_without_the_newest_checkpoint(bundle.path, sentiment_files["train"], tmp_path / "run",
                                                      method, replace(policy, checkpoint_every=10),
                                                      sentiment_files["dev"], {"threads": 2})  # from step 20
    assert resumed.tobytes() == weights.buffer.tobytes()
    with pytest.raises(ValueError, match="train it with --method hybrid"):
        train(bundle.path, sentiment_files["train"], tmp_path / "fo", Method(steps=1, method="fo"), policy)
    with pytest.raises(ValueError, match="nothing to estimate"):
        train(bundles("llama-norms-grad"), sentiment_files["train"], tmp_path / "h", method, policy)


@pytest.mark.parametrize("micro_batch", [0, 4])
def test_a_first_order_run_over_the_memory_budget_suggests_a_micro_batch(micro_batch, bundles, sentiment_files,
                                                                          tmp_path):
    """The backward's activations follow the rows of a gradient-graph run: the refusal names --micro-batch
    unless the run already splits its batch that finely."""
    from pocketzo.errors import PocketzoError
    from pocketzo.zo_trainer import RunPolicy, train

    with pytest.raises(PocketzoError, match="more than --memory-budget 20M") as refused:
        train(bundles("llama-classify-grad"), sentiment_files["train"], tmp_path / "run",
              Method(steps=1, method="fo", micro_batch=micro_batch), RunPolicy(threads=1, progress=False,
                                                                               memory_budget="20M"))
    assert ("try --micro-batch 4" in str(refused.value)) == (micro_batch == 0)
