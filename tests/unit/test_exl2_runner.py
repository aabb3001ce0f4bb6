"""Static batches and prefix-shared scoring against a CPU stand-in for exllamav2's model API.

The stand-in keeps exllamav2's contract (cache.current_seq_len advances by the input width,
the additive input_mask hides padded columns, position_offsets shift RoPE positions, rows of
the cache are addressed [:batch]) and makes each logit depend on every visible token and its
position, so wrong padding, masks, offsets or prefix copies change the output. Skipped where
torch is not installed (CI); the GPU suite runs the real thing.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from consumer.engine.base import ChatMessage, GenerationRequest  # noqa: E402
from consumer.engine.exllamav2.batching import PAD_BIAS  # noqa: E402
from consumer.engine.exllamav2.runner import (  # noqa: E402
    GenTicket,
    ScoreTicket,
    StaticBatch,
    score_candidates,
)
from consumer.engine.exllamav2.sampling import RowSampling, sample_rows, top_p_filter  # noqa: E402

VOCAB = 31
STOP = 30
MESSAGES = (ChatMessage("user", "x"),)


class FakeCache:
    def __init__(self, batch_size: int, max_seq_len: int) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.current_seq_len = 0
        self.tokens = torch.full((batch_size, max_seq_len), -1, dtype=torch.long)

    def all_tensors(self) -> list[Any]:
        return [self.tokens]


class FakeModel:
    """logits[token] peak at a hash of (visible token, position) pairs; pads are invisible."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def forward(
        self,
        input_ids: Any,
        cache: FakeCache,
        input_mask: Any = None,
        preprocess_only: bool = False,
        last_id_only: bool = False,
        position_offsets: Any = None,
    ) -> Any:
        batch, width = input_ids.shape
        self.calls.append((batch, width))
        past = cache.current_seq_len
        assert past + width <= cache.max_seq_len
        cache.tokens[:batch, past : past + width] = input_ids
        logits = torch.zeros((batch, width, VOCAB), dtype=torch.float16)
        for row in range(batch):
            offset = 0 if position_offsets is None else int(position_offsets[row])
            for i in range(width):
                col = past + i
                acc = 0
                for c in range(col + 1):
                    hidden = (
                        input_mask is not None
                        and c < input_mask.shape[-1]
                        and float(input_mask[row, c]) <= PAD_BIAS
                    )
                    if not hidden:
                        acc += (int(cache.tokens[row, c]) + 3) * (c + offset + 7)
                peak = acc % (VOCAB - 1)  # never the stop token by accident
                distance = (torch.arange(VOCAB) - peak).abs().float()
                logits[row, i] = (-distance).half()
        cache.current_seq_len += width
        if preprocess_only:
            return None
        if last_id_only:
            return logits[:, -1:, :]
        return logits


def ticket(ids: list[int], max_tokens: int = 6, **kw: Any) -> GenTicket:
    request = GenerationRequest(messages=MESSAGES, max_tokens=max_tokens, **kw)
    return GenTicket(ids=ids, request=request, deliver=lambda _: None)


def decode(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def run(tickets: list[GenTicket], stop_ids: frozenset[int] = frozenset()) -> list[Any]:
    batch = StaticBatch(
        FakeModel(), FakeCache(8, 64), tickets, pad_id=0, stop_ids=stop_ids, decode=decode
    )
    batch.prefill()
    for _ in range(64):
        if batch.finished:
            break
        batch.step()
    assert batch.finished
    return [g for _, g in batch.results()]


def test_each_row_of_a_padded_batch_generates_what_it_would_alone() -> None:
    prompts = [[4, 5, 6, 7, 8], [9, 2], [3, 3, 3]]
    together = run([ticket(p) for p in prompts])
    alone = [run([ticket(p)])[0] for p in prompts]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(g.output_tokens == 6 and g.finish_reason == "length" for g in together)
    assert [g.input_tokens for g in together] == [5, 2, 3]


def test_without_the_mask_padding_would_change_the_output() -> None:
    # Guards the stand-in itself: padding must be visible to it when unmasked.
    short = [9, 2]
    padded_unmasked = FakeModel().forward(
        torch.tensor([[0, 0, *short]]), FakeCache(1, 8), position_offsets=torch.tensor([-2])
    )
    alone = FakeModel().forward(torch.tensor([short]), FakeCache(1, 8))
    assert not torch.equal(padded_unmasked[0, -1], alone[0, -1])


def test_rows_stop_on_stop_token_and_on_max_tokens_independently() -> None:
    prompts = [[4, 5, 6], [1, 2, 3, 4]]
    free = run([ticket(p, max_tokens=5) for p in prompts])
    first_token = int(free[0].text.split()[0][1:])
    stopped = run([ticket(p, max_tokens=5) for p in prompts], stop_ids=frozenset({first_token}))
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].output_tokens == 0 and stopped[0].text == ""
    second_tokens = [int(t[1:]) for t in free[1].text.split()]
    if first_token in second_tokens:
        cut = second_tokens.index(first_token)
        assert stopped[1].output_tokens == cut
    else:
        assert stopped[1].text == free[1].text


def test_stop_string_cuts_the_text_and_ends_the_row() -> None:
    free = run([ticket([4, 5, 6], max_tokens=5)])[0]
    words = free.text.split()
    stop = " " + words[2]
    result = run([ticket([4, 5, 6], max_tokens=5, stop=(stop,))])[0]
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.find(stop)]
    assert result.output_tokens == 3


def test_a_cancelled_row_is_dropped_and_the_rest_finish() -> None:
    tickets = [ticket([4, 5]), ticket([6, 7, 8])]
    tickets[0].cancelled = True
    results = run(tickets)
    assert len(results) == 1 and results[0].input_tokens == 3


def test_a_batch_that_cannot_fit_a_cache_row_is_refused() -> None:
    with pytest.raises(ValueError):
        StaticBatch(
            FakeModel(),
            FakeCache(2, 8),
            [ticket([1, 2, 3], max_tokens=6)],
            pad_id=0,
            stop_ids=frozenset(),
            decode=decode,
        )


def reference_logprob(prompt: list[int], candidate: list[int], eot: int) -> float:
    """Score one candidate the slow way: one unbatched forward over prompt + candidate."""
    ids = torch.tensor([prompt + candidate])
    logits = FakeModel().forward(ids, FakeCache(1, 64)).float()
    lp = torch.log_softmax(logits[0], dim=-1)
    targets = [*candidate, eot]
    start = len(prompt) - 1
    return sum(float(lp[start + k, t]) for k, t in enumerate(targets))


@pytest.mark.parametrize("cache_rows", [1, 2, 8])
def test_prefix_shared_scoring_equals_scoring_each_candidate_alone(cache_rows: int) -> None:
    prompt = [5, 1, 4, 2]
    candidates = [[7], [7, 8], [], [3, 9, 11]]
    model = FakeModel()
    got = score_candidates(
        model,
        FakeCache(cache_rows, 32),
        ScoreTicket(prompt, candidates, deliver=lambda _: None),
        end_of_turn_id=STOP,
        pad_id=0,
    )
    want = [reference_logprob(prompt, c, STOP) for c in candidates]
    assert got == pytest.approx(want, abs=1e-4)
    # The prompt ran once, as one row, however many candidates there were.
    assert model.calls[0] == (1, len(prompt))
    assert all(batch <= cache_rows for batch, _ in model.calls)


def test_scoring_refuses_prompts_longer_than_its_cache() -> None:
    with pytest.raises(ValueError):
        score_candidates(
            FakeModel(),
            FakeCache(2, 6),
            ScoreTicket([1, 2, 3, 4, 5], [[1, 2]], deliver=lambda _: None),
            end_of_turn_id=STOP,
            pad_id=0,
        )


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 0.0, 0.0]])
    rows = [RowSampling(0.0, 1.0), RowSampling(1.0, 1.0, seed=7)]
    first = sample_rows(logits, rows)
    again = sample_rows(logits, [RowSampling(0.0, 1.0), RowSampling(1.0, 1.0, seed=7)])
    assert first[0] == 1
    assert first == again


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = top_p_filter(probs, 0.7)
    assert kept.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
    assert math.isclose(float(top_p_filter(probs, 1.0).sum()), 1.0)
