"""Reversible residual layers: the recomputing backward equals plain autograd over the same
coupling for every registered kind, stores activations flat in depth, and `reversible=False` is
the plain model unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from memory_models.model import SequenceModel, SequenceModelConfig
from memory_models.registry import REGISTRY
from memory_models.saved_activations import saved_for_backward
from pipelines.train.loop import TrainingModule, lr_schedule, train_batch

KINDS = list(REGISTRY)
VOCAB = 37


def tiny_model(kind: str, reversible: bool = True, n_layers: int = 3, **fields) -> SequenceModel:
    torch.manual_seed(0)
    config = SequenceModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=n_layers,
        reversible=reversible,
        memory={"kind": kind, "memory_size": 8, **fields},
    )
    return config.build().double()


def training_step(model: SequenceModel, tokens: Tensor, state, weights: Tensor):
    """Logits, state, auxiliary loss and the gradients of every parameter for one segment."""
    logits, new_state = model(tokens, state)
    aux = model.auxiliary_loss()
    loss = (logits * weights).sum() + (0.0 if aux is None else aux)
    parameters = list(model.parameters())
    return logits, new_state, aux, torch.autograd.grad(loss, parameters, allow_unused=True)


@pytest.mark.parametrize("kind", KINDS)
def test_recomputed_gradients_equal_plain_autograd(kind):
    """Same weights, same warm state: with and without storing activations, outputs, states, the
    auxiliary loss and every parameter's gradient agree (float64)."""
    model = tiny_model(kind)
    with torch.no_grad():
        _, warm = model(torch.randint(0, VOCAB, (2, 11)))
    tokens = torch.randint(0, VOCAB, (2, 25))
    weights = torch.randn(2, 25, VOCAB, dtype=torch.float64)
    model.keep_activations = True
    logits, state, aux, grads = training_step(model, tokens, warm, weights)
    model.keep_activations = False
    logits_rev, state_rev, aux_rev, grads_rev = training_step(model, tokens, warm, weights)
    torch.testing.assert_close(logits_rev, logits, atol=1e-12, rtol=0)
    for layer, layer_rev in zip(state.layers, state_rev.layers, strict=True):
        for name, tensor in layer.tensors().items():
            torch.testing.assert_close(
                layer_rev.tensors()[name], tensor.detach(), atol=1e-12, rtol=0
            )
            assert not layer_rev.tensors()[name].requires_grad, name
    assert (aux is None) == (aux_rev is None)
    if aux is not None:
        torch.testing.assert_close(aux_rev, aux, atol=1e-12, rtol=0)
        assert aux_rev.requires_grad
    for (name, _), g, g_rev in zip(model.named_parameters(), grads, grads_rev, strict=True):
        assert (g is None) == (g_rev is None), name
        if g is not None:
            torch.testing.assert_close(g_rev, g, atol=1e-9, rtol=1e-9, msg=name)


def test_the_auxiliary_loss_reaches_the_compressor_through_the_recomputation():
    model = tiny_model("compressive", segment_len=8)  # 30 tokens close three segments
    tokens = torch.randint(0, VOCAB, (2, 30))
    model(tokens)[0].sum().backward()  # the logits alone: the compressor gets nothing
    assert all(b.memory.compressor.weight.grad is None for b in model.blocks)
    model.zero_grad()
    model(tokens)
    model.auxiliary_loss().backward()
    assert all(b.memory.compressor.weight.grad.abs().sum() > 0 for b in model.blocks)


@pytest.mark.parametrize("kind", ["attention", "reformer", "gru"])
def test_reversible_fast_path_matches_its_reference(kind):
    model = tiny_model(kind)
    tokens = torch.randint(0, VOCAB, (2, 20))
    state = ref_state = None
    with torch.no_grad():
        for piece in (tokens[:, :7], tokens[:, 7:]):
            fast, state = model(piece, state)
            ref, ref_state = model.reference_forward(piece, ref_state)
            torch.testing.assert_close(fast, ref, atol=1e-9, rtol=0)


def saved_bytes(model: SequenceModel, tokens: Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one training forward (distinct storages)."""
    (logits, _), held = saved_for_backward(lambda: model(tokens))
    logits.sum().backward()
    return held


@pytest.mark.parametrize("kind", ["attention", "reformer"])
def test_stored_activations_are_flat_in_depth(kind):
    tokens = torch.randint(0, VOCAB, (2, 32))
    held = {}
    for depth in (2, 6):
        model = tiny_model(kind, n_layers=depth)
        held[depth, "reversible"] = saved_bytes(model, tokens)
        model.keep_activations = True
        held[depth, "kept"] = saved_bytes(model, tokens)
    assert held[2, "reversible"] == held[6, "reversible"]
    assert held[6, "kept"] > 2 * held[2, "kept"]
    assert held[2, "reversible"] < held[2, "kept"]


def plain_model_as_it_was(model: SequenceModel, tokens: Tensor, state):
    """The non-reversible forward written out as it stood before `reversible` existed."""
    layer_states = state.layers if state is not None else [None] * len(model.blocks)
    x = model.embedding(tokens)
    new_states = []
    for block, layer_state in zip(model.blocks, layer_states, strict=True):
        mixed, layer_state = block.memory(block.memory_norm(x), layer_state)
        x = x + mixed
        x = x + block.mlp(block.mlp_norm(x))
        new_states.append(layer_state)
    return model.head(model.final_norm(x)), new_states


@pytest.mark.parametrize("kind", KINDS)
def test_reversible_false_is_the_plain_model_bit_for_bit(kind):
    model = tiny_model(kind, reversible=False)
    assert SequenceModelConfig(vocab_size=VOCAB, memory={"kind": kind}).reversible is False
    tokens = torch.randint(0, VOCAB, (2, 19))
    logits, state = model(tokens)
    expected, expected_states = plain_model_as_it_was(model, tokens, None)
    assert torch.equal(logits, expected)
    for layer, layer_expected in zip(state.layers, expected_states, strict=True):
        for name, tensor in layer.tensors().items():
            assert torch.equal(tensor, layer_expected.tensors()[name]), name
    state = state.detach()
    logits, _ = model(tokens, state)
    expected, _ = plain_model_as_it_was(model, tokens, state)
    assert torch.equal(logits, expected)
    grads = torch.autograd.grad(logits.sum(), list(model.parameters()), allow_unused=True)
    grads_expected = torch.autograd.grad(
        expected.sum(), list(model.parameters()), allow_unused=True
    )
    for g, g_expected in zip(grads, grads_expected, strict=True):
        assert (g is None and g_expected is None) or torch.equal(g, g_expected)


def test_reversible_changes_no_parameter_or_checkpoint_key():
    plain, reversible = tiny_model("attention", False), tiny_model("attention", True)
    assert plain.state_dict().keys() == reversible.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, reversible.state_dict()[name]), name
    older = {"vocab_size": VOCAB, "memory": {"kind": "attention"}}  # a config saved before
    assert SequenceModelConfig.model_validate(older).reversible is False


def test_float32_autocast_training_runs_and_agrees():
    model = tiny_model("attention").float()
    tokens = torch.randint(0, VOCAB, (2, 24))
    flat = []
    for keep in (True, False):
        model.keep_activations = keep
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = model(tokens)
        logits.float().square().mean().backward()
        flat.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.isfinite(flat[1]).all()
    assert torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0) > 0.999


@pytest.mark.parametrize("kind", ["reformer", "compressive"])
def test_the_training_loop_learns_with_reversible_layers(kind):
    """The real loop: segments with the state carried (detached), auxiliary loss, clipping."""
    model = tiny_model(kind, n_layers=2).float()
    module = TrainingModule(model)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    scheduler = lr_schedule(optimizer, warmup_steps=1, total_steps=30, kind="constant")
    inputs = torch.randint(0, VOCAB, (4, 32))
    batch = {"inputs": inputs, "labels": inputs.roll(1, dims=1)}  # recall the previous token
    losses = [
        train_batch(module, batch, optimizer, scheduler, segment_len=16, grad_clip=1.0).loss
        for _ in range(30)
    ]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.5 * losses[0]
