"""EncoderDecoderModel: shapes, the reference path, causality, reading only through the cross
memory, pooling, forgetting, encode-once state handling and the config's JSON round trip."""

from __future__ import annotations

import pytest
import torch

from memory_models.architectures import model_config
from memory_models.encoder_decoder import (
    CrossMemoryState,
    EncoderDecoderConfig,
    EncoderDecoderModel,
    EncoderDecoderState,
)
from memory_models.model import ModelState, SequenceModel, SequenceModelConfig
from memory_models.registry import REGISTRY

VOCAB = 23


def tiny(
    kind: str = "attention",
    memory_size: int | None = None,
    forget_threshold: float = 0.0,
    dtype=torch.float64,
) -> EncoderDecoderModel:
    config = EncoderDecoderConfig(
        vocab_size=VOCAB,
        d_model=16,
        n_layers=2,
        memory={"kind": kind, "memory_size": 8} if kind != "attention" else {"kind": kind},
        encoder={"n_layers": 1, "n_heads": 2},
        cross_memory={"memory_size": memory_size, "forget_threshold": forget_threshold},
    )
    return config.build().to(dtype)


def contexts(
    batch: int = 3, width: int = 11, lengths: tuple[int, ...] = (11, 6, 3)
) -> torch.Tensor:
    """Contexts of different lengths, 0-padded (token 0 is the pad token)."""
    context = torch.randint(1, VOCAB, (batch, width))
    for row, length in enumerate(lengths[:batch]):
        context[row, length:] = 0
    return context


def test_shapes_and_state_bytes():
    model = tiny(memory_size=None, dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (3, 9))
    logits, state = model(tokens, context=contexts())
    assert logits.shape == (3, 9, VOCAB)
    assert isinstance(state, EncoderDecoderState) and isinstance(state.decoder, ModelState)
    assert state.memory.slots.shape == (3, 11, 16)
    assert state.memory.live_entries().tolist() == [11, 6, 3]
    assert state.nbytes() == state.memory.nbytes() + state.decoder.nbytes()
    assert state.nbytes_per_sequence() == model.state_size_bytes(9, context_len=11)
    assert set(state.metrics()) >= {"cross/live_entries", "cross/forgotten", "layer0/live_entries"}


@pytest.mark.parametrize(
    ("kind", "memory_size", "threshold"),
    [("attention", None, 0.0), ("gru", 4, 0.0), ("attention", None, 0.1), ("deltanet", 3, 0.3)],
)
def test_fast_path_equals_the_reference_in_pieces(kind, memory_size, threshold):
    model = tiny(kind, memory_size, threshold)
    tokens = torch.randint(0, VOCAB, (3, 10))
    context = contexts()
    context[2] = 0  # an all-padding context: no live slot
    fast_state = ref_state = None
    with torch.no_grad():
        for start, stop in [(0, 4), (4, 5), (5, 10)]:
            given = context if start == 0 else None
            piece = tokens[:, start:stop]
            fast, fast_state = model(piece, fast_state, context=given)
            ref, ref_state = model.reference_forward(piece, ref_state, context=given)
            torch.testing.assert_close(fast, ref, atol=1e-9, rtol=0)
            for name, tensor in fast_state.tensors().items():
                torch.testing.assert_close(tensor, ref_state.tensors()[name], atol=1e-9, rtol=0)


def test_the_decoder_is_causal():
    model = tiny(memory_size=4)
    tokens = torch.randint(0, VOCAB, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    context = contexts(2)
    with torch.no_grad():
        before, _ = model(tokens, context=context)
        after, _ = model(changed, context=context)
    torch.testing.assert_close(before[:, :7], after[:, :7], atol=0, rtol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_the_context_reaches_the_decoder_only_through_the_memory():
    model = tiny(memory_size=None)
    tokens = torch.randint(0, VOCAB, (3, 8))
    context, other = contexts(), contexts()
    with torch.no_grad():
        direct, state = model(tokens, context=context)
        # Encode once, then read from the state: the same outputs, and the same memory.
        stored = model.init_state(3, dtype=torch.float64).with_memory(model.encode(context))
        from_state, again = model(tokens, stored)
        elsewhere, _ = model(tokens, context=other)
    torch.testing.assert_close(direct, from_state, atol=0, rtol=0)
    torch.testing.assert_close(state.memory.slots, again.memory.slots, atol=0, rtol=0)
    assert (direct - elsewhere).abs().amax(dim=(1, 2)).min() > 1e-6, "every row reads its context"


def test_with_an_empty_memory_the_decoder_is_the_sequence_model():
    """No live slot: every cross read is exactly zero, and the decoder blocks, embedding and head
    are those of a SequenceModel (same parameter names), which gives the same logits."""
    model = tiny("gru", memory_size=5)
    config = model.config
    plain = SequenceModelConfig(
        vocab_size=VOCAB, d_model=16, n_layers=2, memory=config.memory
    ).build()
    plain = plain.to(torch.float64)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert all(k.startswith(("encoder", "pooling")) or ".cross" in k for k in unexpected)
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected, _ = plain(tokens)
        no_context, state = model(tokens)
        all_padding, _ = model(tokens, context=torch.zeros(2, 6, dtype=torch.long))
    torch.testing.assert_close(no_context, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(all_padding, expected, atol=1e-12, rtol=0)
    assert state.memory.slots.shape[1] == 0


def test_padding_does_not_change_the_memory():
    model = tiny(memory_size=3)
    context = torch.randint(1, VOCAB, (2, 7))
    wider = torch.cat([context, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        narrow, narrow_state = model(tokens, context=context)
        wide, wide_state = model(tokens, context=wider)
    torch.testing.assert_close(narrow, wide, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        narrow_state.memory.slots, wide_state.memory.slots, atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("memory_size", [1, 4, 20])
def test_pooling_gives_memory_size_slots_whatever_the_context_length(memory_size):
    model = tiny(memory_size=memory_size)
    for width in (2, 9, 31):
        memory = model.encode(torch.randint(1, VOCAB, (2, width)))
        assert memory.slots.shape == (2, memory_size, 16)
        assert memory.valid.all()
    empty = model.encode(torch.zeros(1, 5, dtype=torch.long))
    assert not empty.valid.any() and empty.slots.abs().sum() == 0
    assert sum(p.numel() for p in model.pooling.parameters()) > 0


def test_forget_threshold_drops_exactly_the_slots_under_it():
    """The same weights with a threshold too small to drop anything show every slot's share;
    with the real threshold, exactly the slots at or above it survive, in their order."""
    observer = tiny(memory_size=None, forget_threshold=1e-12)
    tokens, context = torch.randint(0, VOCAB, (3, 5)), contexts()
    with torch.no_grad():
        seen_logits, seen = observer(tokens, context=context)
    share, valid = seen.memory.share, seen.memory.valid
    threshold = float(share[valid].median())  # drops about half of the slots
    model = tiny(memory_size=None, forget_threshold=threshold)
    model.load_state_dict(observer.state_dict())
    with torch.no_grad():
        logits, state = model(tokens, context=context)
    torch.testing.assert_close(logits, seen_logits, atol=0, rtol=0)  # dropping happens after
    assert state.memory.live_entries().sum() < valid.sum()
    for row in range(3):
        keep = valid[row] & (share[row] >= threshold)
        kept = int(keep.sum())
        assert state.memory.valid[row].sum() == kept
        live = seen.memory.slots[row][keep]
        torch.testing.assert_close(state.memory.slots[row, :kept], live, atol=0, rtol=0)
        torch.testing.assert_close(state.memory.share[row, :kept], share[row][keep])
        assert state.memory.forgotten[row] == int(valid[row].sum()) - kept
    # Dropped slots stay dropped: the next call reads only the survivors.
    with torch.no_grad():
        _, later = model(tokens[:, :2], state)
    assert (later.memory.live_entries() <= state.memory.live_entries()).all()


def test_without_a_threshold_no_share_is_tracked_and_nothing_is_dropped():
    model = tiny(memory_size=None)
    _, state = model(torch.randint(0, VOCAB, (3, 6)), context=contexts())
    assert state.memory.share.abs().sum() == 0
    assert state.memory.live_entries().tolist() == [11, 6, 3]


def test_states_of_different_contexts_stack_and_split():
    model = tiny(memory_size=None)
    with torch.no_grad():
        states = [
            model(torch.randint(0, VOCAB, (1, n)), context=torch.randint(1, VOCAB, (1, c)))[1]
            for n, c in ((4, 3), (7, 12))
        ]
        stacked = EncoderDecoderState.stack(states)
        assert stacked.batch_size == 2 and stacked.memory.slots.shape[1] == 12
        step = torch.randint(0, VOCAB, (2, 3))
        batched, batched_state = model(step, stacked)
        for row, part in enumerate(stacked.split(1)):
            alone, _ = model(step[row : row + 1], part)
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-12, rtol=0)
        picked = stacked.select(torch.tensor([1]))
        torch.testing.assert_close(picked.memory.slots, stacked.memory.slots[1:], atol=0, rtol=0)
    assert [s.batch_size for s in batched_state.split([1, 1])] == [1, 1]


def test_state_tensors_round_trip():
    model = tiny("gru", memory_size=3)
    _, state = model(torch.randint(0, VOCAB, (2, 4)), context=contexts(2))
    tensors = state.tensors()
    assert {"cross.slots", "cross.valid", "decoder.0.hidden"} <= set(tensors)
    again = model.state_from_tensors(tensors)
    assert again.tensors().keys() == tensors.keys()
    assert all(torch.equal(again.tensors()[k], t) for k, t in tensors.items())
    assert isinstance(again.memory, CrossMemoryState)
    detached = state.detach().to(dtype=torch.float32)
    assert (
        detached.memory.slots.dtype == torch.float32 and detached.memory.valid.dtype == torch.bool
    )


@pytest.mark.parametrize("kind", list(REGISTRY))
def test_encode_once_then_decode_in_chunks_equals_the_full_pass(kind):
    model = tiny(kind, memory_size=4)
    tokens, context = torch.randint(0, VOCAB, (2, 11)), contexts(2)
    with torch.no_grad():
        full, _ = model(tokens, context=context)
        state = model.init_state(2, dtype=torch.float64).with_memory(model.encode(context))
        pieces = []
        for start, stop in [(0, 1), (1, 6), (6, 7), (7, 11)]:
            logits, state = model(tokens[:, start:stop], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-9, rtol=0)


def test_config_round_trips_and_builds_the_right_model():
    config = tiny(memory_size=6, forget_threshold=0.05).config
    again = model_config(config.model_dump(mode="json"))
    assert again == config and isinstance(again.build(), EncoderDecoderModel)
    assert EncoderDecoderConfig.model_validate_json(config.model_dump_json()) == config
    legacy = {"vocab_size": 8, "memory": {"kind": "gru"}}  # written before `architecture`
    assert isinstance(model_config(legacy).build(), SequenceModel)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"encoder": {"n_heads": 3}}, "encoder.n_heads"),
        ({"cross_memory": {"n_heads": 5}}, "cross_memory.n_heads"),
        ({"context_pad_token": 99}, "context_pad_token"),
        ({"cross_memory": {"forget_threshold": 1.0}}, "forget_threshold"),
        ({"architecture": "encdec"}, "architecture must be one of"),
    ],
)
def test_bad_settings_name_the_setting(change, words):
    data = {"architecture": "encoder_decoder", "vocab_size": VOCAB, "d_model": 16}
    data |= {"memory": {"kind": "gru"}} | change
    with pytest.raises(ValueError, match=words):
        model_config(data)


def test_mismatched_batches_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="context has batch 2"):
        model(torch.zeros(3, 4, dtype=torch.long), context=torch.ones(2, 5, dtype=torch.long))
    state = model.init_state(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="stack or split"):
        model(torch.zeros(3, 4, dtype=torch.long), state)
