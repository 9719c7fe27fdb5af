"""Compressive memory: fast path == per-query reference, FIFO + compression rules, aux loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_helpers import (
    assert_fast_matches_reference,
    assert_first_slot_is_read,
    assert_padded_batch_equals_each_alone,
    assert_refused_naming,
    assert_same_gradients,
    assert_state_is_detached,
    assert_states_close,
    randn,
    run_chunks,
    streamed_states,
    warm_state,
    warm_states,
    with_config,
)
from pydantic import ValidationError

from memory_models.compressive import (
    CompressiveConfig,
    CompressiveLayer,
    CompressiveState,
)

D_MODEL = 16
MEMORY_SIZE = 8


# Segments of one token: the memories are written after every token, so the hand-computed
# FIFO and compressed contents below hold after any chunking.
SEGMENT = 1


def make_layer(
    threshold: float = 0.0,
    memory_size: int = MEMORY_SIZE,
    d_model: int = D_MODEL,
    **fields,
) -> CompressiveLayer:
    fields = {"segment_len": SEGMENT, **fields}
    config = CompressiveConfig(memory_size=memory_size, forget_threshold=threshold, **fields)
    return config.build(d_model).double()


def compression_parameters(layer: CompressiveLayer) -> set[str]:
    return {f"compressor.{name}" for name, _ in layer.compressor.named_parameters()}


@pytest.mark.parametrize("compression", ["conv", "mean_pool"])
@pytest.mark.parametrize("threshold", [0.0, 0.1])
@pytest.mark.parametrize("length", [1, 33, 63])
def test_fast_matches_reference_outputs_state_gradients_and_aux(length, threshold, compression):
    layer = make_layer(threshold, compression=compression)
    state = warm_state(layer, 2, 11)
    x = randn(2, length, D_MODEL).requires_grad_()
    y_fast, s_fast = layer(x, state)
    aux_fast = layer.auxiliary_loss()
    y_ref, s_ref = layer.reference_forward(x, state)
    aux_ref = layer.auxiliary_loss()
    torch.testing.assert_close(y_fast, y_ref, atol=1e-9, rtol=0)
    assert_states_close(s_fast, s_ref)
    assert (aux_fast is None) == (aux_ref is None)
    if aux_fast is not None:
        torch.testing.assert_close(aux_fast, aux_ref, atol=1e-12, rtol=0)
    assert_same_gradients(y_fast, y_ref, [x, *layer.parameters()])


def test_aux_loss_gradients_match_reference():
    layer = make_layer(0.05)
    state = warm_state(layer, 3, 9)
    x = randn(3, 14, D_MODEL)
    layer(x, state)
    aux_fast = layer.auxiliary_loss()
    layer.reference_forward(x, state)
    aux_ref = layer.auxiliary_loss()
    params = list(layer.compressor.parameters())
    for g_fast, g_ref in zip(
        torch.autograd.grad(aux_fast, params), torch.autograd.grad(aux_ref, params), strict=True
    ):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("threshold", [0.0, 0.08])
def test_streaming_chunks_match_reference_on_same_chunks(threshold):
    layer = make_layer(threshold, memory_size=6, compression_rate=3, cmem_fraction=0.4)
    chunks = [1, 1, 7, 1, 13, 2, 1, 1, 1]
    x = randn(3, sum(chunks), D_MODEL)
    assert_fast_matches_reference(layer, x, chunks)


def test_fifo_and_mean_pool_compression_by_hand():
    """mem_len 4, cmem_len 4, c 2: 9 tokens leave 3 in the FIFO and 3 compressed pairs."""
    layer = make_layer(compression="mean_pool")
    x = randn(2, 9, D_MODEL)
    _, state = layer(x)
    assert torch.equal(state.mem, x[:, 6:])
    assert torch.equal(state.mem_positions, torch.arange(6, 9).expand(2, -1))
    pairs = x[:, :6].view(2, 3, 2, D_MODEL).mean(2)
    torch.testing.assert_close(state.cmem, pairs, atol=1e-15, rtol=0)
    assert torch.equal(state.cmem_positions, torch.tensor([[1, 3, 5]] * 2))
    assert torch.equal(state.compressions, torch.tensor([3, 3]))
    assert torch.equal(state.evictions, torch.tensor([0, 0]))

    _, state = layer(randn(2, 4, D_MODEL), state)
    # 7 FIFO entries: 4 leave (2 groups); cmem had 3 + 2 new, the oldest one goes.
    assert torch.equal(state.mem_positions, torch.arange(10, 13).expand(2, -1))
    assert torch.equal(state.cmem_positions, torch.tensor([[3, 5, 7, 9]] * 2))
    assert torch.equal(state.evictions, torch.tensor([1, 1]))
    assert state.metrics()["compressions"] == 5.0


def test_conv_compression_is_a_strided_convolution():
    layer = make_layer(compression_rate=2)
    x = randn(1, 9, D_MODEL)
    _, state = layer(x)
    series = x[:, :6].transpose(1, 2)  # [1, D, 6]
    expected = torch.nn.functional.conv1d(
        series, layer.compressor.weight, layer.compressor.bias, stride=2
    ).transpose(1, 2)
    torch.testing.assert_close(state.cmem, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunks", [[13], [3, 1, 9], [1] * 6 + [7], [2] * 20])
def test_state_size_bytes_counts_every_tensor_in_any_chunking(chunks):
    layer = CompressiveConfig(memory_size=MEMORY_SIZE, compression_rate=3).build(D_MODEL)
    with torch.no_grad():
        _, state = run_chunks(layer, torch.randn(2, sum(chunks), D_MODEL), None, chunks)
    assert layer.state_size_bytes(sum(chunks), torch.float32) == state.nbytes_per_sequence()


def test_memory_receives_no_gradient_and_state_is_detached():
    assert_state_is_detached(make_layer())


def test_compressed_memory_is_read():
    layer = make_layer()
    state = warm_state(layer, 1, 20)
    assert state.cmem_valid.all()
    assert_first_slot_is_read(layer, state, randn(1, 3, D_MODEL), "cmem")


def test_aux_loss_is_finite_and_trains_only_the_compression():
    layer = make_layer()
    state = warm_state(layer, 2, 6)
    x = randn(2, 5, D_MODEL).requires_grad_()
    layer(x, state)
    aux = layer.auxiliary_loss()
    assert aux is not None and aux.dim() == 0 and torch.isfinite(aux) and aux > 0
    names, params = zip(*layer.named_parameters(), strict=True)
    grads = torch.autograd.grad(aux, [x, *params], allow_unused=True)
    assert grads[0] is None
    with_grad = {name for name, g in zip(names, grads[1:], strict=True) if g is not None}
    assert with_grad == compression_parameters(layer)
    assert all(torch.isfinite(g).all() for g in grads[1:] if g is not None)


def test_aux_loss_is_none_when_nothing_was_compressed():
    layer = make_layer()
    layer(randn(2, 3, D_MODEL))
    assert layer.auxiliary_loss() is None
    mean_layer = make_layer(compression="mean_pool")
    mean_layer(randn(2, 12, D_MODEL))
    aux = mean_layer.auxiliary_loss()
    assert aux is not None and not aux.requires_grad  # mean pooling has nothing to learn


def test_training_the_compressor_on_aux_loss_lowers_it():
    torch.manual_seed(1)
    layer = make_layer(memory_size=8, compression_rate=4, cmem_fraction=0.25)
    state = warm_state(layer, 4, 6)
    x = randn(4, 4, D_MODEL)
    optimiser = torch.optim.Adam(layer.compressor.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        layer(x, state)
        loss = layer.auxiliary_loss()
        losses.append(loss.item())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    # One slot per 4 entries cannot reproduce every query's attention; it gets a good part there.
    assert losses[-1] < 0.75 * losses[0]


@settings(max_examples=12, deadline=None)
@given(
    memory_size=st.integers(2, 9),
    rate=st.integers(1, 3),
    threshold=st.sampled_from([0.0, 0.05, 0.3]),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_live_entries_never_exceed_memory_size(memory_size, rate, threshold, chunks, seed):
    torch.manual_seed(seed)
    try:
        config = CompressiveConfig(
            memory_size=memory_size, compression_rate=rate, forget_threshold=threshold, n_heads=2
        )
    except ValidationError:
        return
    layer = config.build(8).double()
    for state in streamed_states(layer, chunks, batch=2, scale=3.0):
        assert (state.live_entries() <= memory_size).all()
        assert state.mem.shape[1] <= config.mem_len
        assert state.cmem.shape[1] <= config.cmem_len


def test_threshold_drops_exactly_the_leaving_entries_attended_too_little():
    """Leaving entries under the bar are dropped, the others are compressed (mean of survivors)."""
    layer = make_layer(memory_size=64, compression="mean_pool", cmem_fraction=0.5, segment_len=40)
    x = randn(1, 40, D_MODEL)
    with torch.no_grad():
        _, everything = layer(x)
    # With no threshold the 8 oldest tokens leave in 4 groups; their shares decide under a bar.
    fifo_share = layer_shares(layer, x)
    leaving_share = fifo_share[0, :8]
    threshold = leaving_share.median().item()
    with torch.no_grad():
        _, thresholded = with_config(layer, forget_threshold=threshold)(x)
    survive = leaving_share >= threshold
    groups = survive.view(4, 2)
    made = groups.any(1)
    assert torch.equal(thresholded.cmem_valid[0], torch.ones(int(made.sum()), dtype=torch.bool))
    expected = [x[0, 2 * g : 2 * g + 2][groups[g]].mean(0) for g in range(4) if groups[g].any()]
    torch.testing.assert_close(thresholded.cmem[0], torch.stack(expected), atol=1e-12, rtol=0)
    assert torch.equal(thresholded.mem, everything.mem)
    assert int(thresholded.evictions) == int((~survive).sum())


def layer_shares(layer: CompressiveLayer, x: torch.Tensor) -> torch.Tensor:
    """Each input token's attention share in a pass from the empty state: `[B, T]`."""
    with torch.no_grad():
        big = with_config(layer, forget_threshold=0.0)
        config = big.config.model_copy(update={"memory_size": 1000})
        wide = config.build(layer.d_model).double()
        wide.load_state_dict(big.state_dict())
        _, state = wide(x)
    return state.mem_share


def test_overflowing_compressed_memory_keeps_the_most_attended_slots():
    """4 old + 2 new compressed slots compete for 4 places: FIFO order keeps the newest, a
    threshold keeps the four the chunk attended most."""
    layer = make_layer(0.001, memory_size=8, compression="mean_pool", segment_len=4)
    fifo_layer = with_config(layer, forget_threshold=0.0)
    roomy = (
        CompressiveConfig(
            memory_size=12,
            cmem_fraction=2 / 3,
            compression="mean_pool",
            forget_threshold=0.001,
            segment_len=4,
        )
        .build(D_MODEL)
        .double()
    )
    roomy.load_state_dict(layer.state_dict())
    state = warm_state(fifo_layer, 1, 12)
    assert state.cmem_valid.sum() == 4
    x = randn(1, 4, D_MODEL)
    with torch.no_grad():
        _, after = layer(x, state)
        _, fifo_order = fifo_layer(x, state)
        _, all_slots = roomy(x, state)
    assert torch.equal(fifo_order.cmem_positions[0], torch.tensor([5, 7, 9, 11]))
    assert torch.equal(all_slots.cmem_positions[0], torch.tensor([1, 3, 5, 7, 9, 11]))
    top = all_slots.cmem_share[0].topk(4).indices.sort().values
    assert torch.equal(after.cmem_positions[0], all_slots.cmem_positions[0, top])
    assert torch.equal(after.evictions, torch.tensor([2]))


@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_padded_batch_equals_each_sequence_alone(threshold):
    layer = make_layer(threshold)
    states = warm_states(layer, (2, 20, 5))
    assert len({s.cmem.shape[1] for s in states}) > 1
    step = randn(3, 4, D_MODEL)
    assert_padded_batch_equals_each_alone(layer, states, step)
    with torch.no_grad():
        stacked = CompressiveState.stack(states)
        assert_fast_matches_reference(layer, step, state=stacked)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"n_heads": 0}, "n_heads"),
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": 1}, "cmem_fraction"),
        ({"compression_rate": 0}, "compression_rate"),
        ({"memory_size": 8, "compression_rate": 5}, "compression_rate"),
        ({"cmem_fraction": 1.0}, "cmem_fraction"),
        ({"compression": "max_pool"}, "compression"),
        ({"cmem_len": 4}, "cmem_len"),
    ],
)
def test_bad_configs_name_the_field(override, field):
    assert_refused_naming(CompressiveConfig, override, field)
