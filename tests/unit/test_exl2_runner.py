"""Static batches and prefix-shared scoring against a CPU stand-in for exllamav2's model API.

The stand-in keeps exllamav2's contract (cache.current_seq_len advances by the input width,
the additive input_mask hides padded columns, position_offsets shift RoPE positions, rows of
the cache are addressed [:batch]) and makes each logit depend on every visible token and its
position, so wrong padding, masks, offsets or prefix copies change the output. A second
stand-in, `TinyExl2Model`, is a real transformer (grouped KV heads, RoPE, the engine's grouped
SDPA attention) in float32, so padded batches must match each prompt alone to fp32 noise.
The GPU suite runs the same logic through exllamav2's kernels.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from consumer.engine.base import ChatMessage, GenerationRequest  # noqa: E402
from consumer.engine.exllamav2.attention import (  # noqa: E402
    CONFIG_FLAG,
    grouped_attention,
    grouped_attn_torch,
)
from consumer.engine.exllamav2.batching import PAD_BIAS, left_pad, streamable  # noqa: E402
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
    return GenTicket(ids=ids, request=request)


def decode(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def run(
    tickets: list[GenTicket], stop_ids: frozenset[int] = frozenset(), drop: tuple[int, ...] = ()
) -> list[Any]:
    batch = StaticBatch(
        FakeModel(), FakeCache(8, 64), tickets, pad_id=0, stop_ids=stop_ids, decode=decode
    )
    batch.prefill()
    for index in drop:
        batch.drop(index)
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


def test_a_dropped_row_is_left_out_and_the_rest_finish() -> None:
    results = run([ticket([4, 5]), ticket([6, 7, 8])], drop=(0,))
    assert len(results) == 1 and results[0].input_tokens == 3


def test_a_row_dropped_mid_batch_samples_no_more_and_rides_along_until_the_end() -> None:
    model = FakeModel()
    batch = StaticBatch(
        model,
        FakeCache(2, 64),
        [ticket([4, 5], max_tokens=6), ticket([6, 7, 8], max_tokens=6)],
        pad_id=0,
        stop_ids=frozenset(),
        decode=decode,
    )
    batch.prefill()
    first = batch.step()
    assert [(s.index, s.new_tokens) for s in first] == [(0, 1), (1, 1)]
    text = batch.drop(0)
    assert text == decode(batch.rows[0].tokens) and len(batch.rows[0].tokens) == 1
    while not batch.finished:
        steps = batch.step()
        assert [s.index for s in steps] == [1]  # the dropped row reports nothing more
    assert len(batch.rows[0].tokens) == 1 and len(batch.rows[1].tokens) == 6
    assert all(rows == 2 for rows, _ in model.calls)  # it kept its place in the padded batch
    assert [t.ids for t, _ in batch.results()] == [[6, 7, 8]]


def test_dropping_every_row_ends_the_batch() -> None:
    batch = StaticBatch(
        FakeModel(),
        FakeCache(2, 64),
        [ticket([4, 5])],
        pad_id=0,
        stop_ids=frozenset(),
        decode=decode,
    )
    batch.prefill()
    batch.step()
    batch.drop(0)
    assert batch.finished and batch.results() == []


def test_a_streaming_row_reports_its_text_as_it_goes_and_all_of_it_in_the_end() -> None:
    want = run([ticket([4, 5, 6], max_tokens=6)])[0]
    batch = StaticBatch(
        FakeModel(),
        FakeCache(2, 64),
        [GenTicket(ids=[4, 5, 6], request=GenerationRequest(MESSAGES, 6), stream=True)],
        pad_id=0,
        stop_ids=frozenset(),
        decode=decode,
    )
    batch.prefill()
    pieces: list[str] = []
    while not batch.finished:
        (step,) = batch.step()
        pieces.append(step.text)
    assert all(pieces[:-1]) and "".join(pieces) == want.text
    assert step.result is not None and step.result.text == want.text


def test_a_row_that_does_not_stream_reports_its_text_when_it_ends() -> None:
    batch = StaticBatch(
        FakeModel(),
        FakeCache(2, 64),
        [ticket([4, 5, 6], 3)],
        pad_id=0,
        stop_ids=frozenset(),
        decode=decode,
    )
    batch.prefill()
    steps = [batch.step()[0] for _ in range(3)]
    assert [s.text for s in steps[:2]] == ["", ""]
    assert steps[2].result is not None and steps[2].text == steps[2].result.text != ""


@pytest.mark.parametrize(
    ("text", "stops", "shown"),
    [
        ("abc", (), "abc"),
        ("ab#", ("#c",), "ab"),  # may begin a stop string
        ("ab#c#", ("#c#d", "x"), "ab"),
        ("ab#", ("x",), "ab#"),
        ("ab\ufffd", (), "ab"),  # half a character
        ("ab\ufffd#", ("#c",), "ab\ufffd"),
    ],
)
def test_streamable_holds_back_what_may_still_change(
    text: str, stops: tuple[str, ...], shown: str
) -> None:
    assert text[: streamable(text, stops)] == shown


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
        ScoreTicket(prompt, candidates),
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
            ScoreTicket([1, 2, 3, 4, 5], [[1, 2]]),
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


# -- a real (tiny) transformer with exllamav2's forward contract -----------------------------


def exllamav2_attn_mask(batch: int, seq_len: int, past_len: int, input_mask: Any) -> Any:
    """exllamav2 0.3.2 attn_params.py `Params.build_single_attn_mask`, in float32."""
    attn_mask = torch.zeros((batch, 1, seq_len, past_len + seq_len))
    triu = torch.triu(torch.full((seq_len - 1, seq_len - 1), -65504.0))
    attn_mask[:, :, : seq_len - 1, past_len + 1 : past_len + seq_len] = triu
    if input_mask is not None:
        width = min(input_mask.shape[-1], seq_len + past_len)
        part = input_mask[:, :width].float().unsqueeze(1).unsqueeze(2)
        attn_mask[:, :, :, :width] = torch.minimum(attn_mask[:, :, :, :width], part)
    return attn_mask


def exllamav2_matmul_attention(q: Any, k: Any, v: Any, mask: Any, scale: float) -> Any:
    """exllamav2 0.3.2 attn.py `_attn_torch`, matmul branch: repeat_kv, then two matmuls."""
    batch, q_len, heads, dim = q.shape
    group = heads // k.shape[2]

    def repeat_kv(states: Any) -> Any:
        b, kv_heads, length, d = states.shape
        expanded = states[:, :, None, :, :].expand(b, kv_heads, group, length, d)
        return expanded.reshape(b, kv_heads * group, length, d)

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    weights = torch.matmul(q, repeat_kv(k).transpose(-1, -2)) * scale
    if mask is not None:
        weights = weights + mask
    weights = torch.softmax(weights, dim=-1)
    out = torch.matmul(weights, repeat_kv(v))
    return out.transpose(1, 2).reshape(batch, q_len, heads * dim)


class TinyCache:
    """exllamav2's FP16 cache layout: per layer, K and V of (batch, max_seq_len, kv_heads, dim)."""

    def __init__(self, model: TinyExl2Model, batch_size: int, max_seq_len: int) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.current_seq_len = 0
        self.q_block = 0
        shape = (batch_size, max_seq_len, model.kv_heads, model.head_dim)
        self.key_states = [torch.zeros(shape) for _ in range(model.num_layers)]
        self.value_states = [torch.zeros(shape) for _ in range(model.num_layers)]

    def all_tensors(self) -> list[Any]:
        return self.key_states + self.value_states


class TinyExl2Model:
    """A 2-layer transformer with grouped KV heads and RoPE, in float32, that keeps exllamav2
    0.3.2's `model.forward` contract: K/V appended to the cache at `current_seq_len`; the
    attention mask built as exllamav2 builds it (causal, then the additive input_mask over
    the first columns); RoPE positions shifted by `position_offsets` and clamped at 0 (rope.cu
    `max(sincos_row, 0)`), never past the table; long inputs split into chunks that all see
    the same input_mask; `preprocess_only` / `last_id_only`. The head is wider than the
    tokenizer, and its untrained rows are biased up to tempt the sampler.
    """

    def __init__(
        self,
        *,
        attention: str = "grouped",
        vocab: int = 40,
        head_rows: int = 48,
        hidden: int = 32,
        heads: int = 4,
        kv_heads: int = 2,
        num_layers: int = 2,
        max_seq_len: int = 96,
        chunk: int | None = None,
        seed: int = 0,
    ) -> None:
        self.attention = attention
        self.vocab, self.head_rows = vocab, head_rows
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.num_layers, self.max_seq_len, self.chunk = num_layers, max_seq_len, chunk
        gen = torch.Generator().manual_seed(seed)

        def weight(rows: int, cols: int) -> Any:
            return torch.randn(rows, cols, generator=gen) / math.sqrt(rows)

        d = self.head_dim
        self.embed = torch.randn(head_rows, hidden, generator=gen)
        self.blocks = [
            {
                "q": weight(hidden, heads * d),
                "k": weight(hidden, kv_heads * d),
                "v": weight(hidden, kv_heads * d),
                "o": weight(heads * d, hidden),
                "up": weight(hidden, 2 * hidden),
                "down": weight(2 * hidden, hidden),
            }
            for _ in range(num_layers)
        ]
        self.head = weight(hidden, head_rows) * 4
        self.head_bias = torch.zeros(head_rows)
        self.head_bias[vocab:] = 6.0
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(max_seq_len).float(), inv)
        self.cos, self.sin = (
            torch.cat([freqs, freqs], -1).cos(),
            torch.cat([freqs, freqs], -1).sin(),
        )

    def _rope(self, x: Any, positions: Any) -> Any:
        cos = self.cos[positions].unsqueeze(2)  # (batch, q_len, 1, dim)
        sin = self.sin[positions].unsqueeze(2)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(
        self,
        input_ids: Any,
        cache: TinyCache | None = None,
        input_mask: Any = None,
        preprocess_only: bool = False,
        last_id_only: bool = False,
        position_offsets: Any = None,
    ) -> Any:
        width = input_ids.shape[1]
        step = self.chunk if cache is not None and self.chunk else width
        outputs = []
        for begin in range(0, width, step):
            out = self._forward_chunk(
                input_ids[:, begin : begin + step], cache, input_mask, position_offsets
            )
            outputs.append(out)
        if preprocess_only:
            return None
        logits = torch.cat(outputs, dim=1)
        return logits[:, -1:, :] if last_id_only else logits

    def _forward_chunk(self, ids: Any, cache: Any, input_mask: Any, offsets: Any) -> Any:
        batch, q_len = ids.shape
        past = 0 if cache is None else cache.current_seq_len
        if cache is not None:
            assert past + q_len <= cache.max_seq_len, "exceeds cache size"
        positions = (past + torch.arange(q_len)).unsqueeze(0).expand(batch, q_len)
        if offsets is not None:
            positions = positions + offsets.view(-1, 1).long()
        positions = positions.clamp(min=0)
        assert int(positions.max()) < self.max_seq_len, "RoPE table overrun"
        mask = None
        if input_mask is not None or q_len > 1:
            mask = exllamav2_attn_mask(batch, q_len, past, input_mask)
        x = self.embed[ids]
        d = self.head_dim
        for layer, w in enumerate(self.blocks):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            q = self._rope((h @ w["q"]).view(batch, q_len, self.heads, d), positions)
            k = self._rope((h @ w["k"]).view(batch, q_len, self.kv_heads, d), positions)
            v = (h @ w["v"]).view(batch, q_len, self.kv_heads, d)
            if cache is not None:
                cache.key_states[layer][:batch, past : past + q_len] = k
                cache.value_states[layer][:batch, past : past + q_len] = v
                k = cache.key_states[layer][:batch, : past + q_len]
                v = cache.value_states[layer][:batch, : past + q_len]
            attend = (
                grouped_attention if self.attention == "grouped" else exllamav2_matmul_attention
            )
            x = x + attend(q, k, v, mask, 1.0 / math.sqrt(d)) @ w["o"]
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            x = x + torch.nn.functional.silu(h @ w["up"]) @ w["down"]
        if cache is not None:
            cache.current_seq_len += q_len
        return x @ self.head + self.head_bias


PROMPTS = [[5, 9, 11, 3, 7, 2, 30, 8], [12, 4], [1, 2, 3, 4, 5]]


def padded_logits(model: TinyExl2Model, prompts: list[list[int]], *, mask: bool = True) -> Any:
    padded = left_pad(prompts, pad_id=0)
    cache = TinyCache(model, len(prompts), model.max_seq_len)
    return model.forward(
        torch.tensor(padded.ids),
        cache,
        input_mask=torch.tensor(padded.attention_bias()) if mask else None,
        position_offsets=torch.tensor(padded.position_offsets, dtype=torch.int),
    )


def alone_logits(model: TinyExl2Model, prompt: list[int]) -> Any:
    return model.forward(torch.tensor([prompt]), TinyCache(model, 1, model.max_seq_len))


@pytest.mark.parametrize("chunk", [None, 3])
def test_a_padded_batch_gives_each_row_the_logits_it_gets_alone(chunk: int | None) -> None:
    model = TinyExl2Model(chunk=chunk)
    batched = padded_logits(model, PROMPTS)
    width = max(len(p) for p in PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        alone = alone_logits(model, prompt)[0]
        torch.testing.assert_close(batched[row, width - len(prompt) :], alone, rtol=1e-5, atol=1e-5)


def test_without_the_mask_padding_changes_the_logits() -> None:
    # Guards the stand-in: padding must matter to it. (The position offsets do not change the
    # maths, since RoPE attention depends on relative positions only; they keep each row's
    # positions where the row alone would have them, inside the RoPE table.)
    model = TinyExl2Model()
    alone = alone_logits(model, PROMPTS[1])[0, -1]
    unmasked = padded_logits(model, PROMPTS, mask=False)
    assert float((unmasked[1, -1] - alone).abs().max()) > 1e-2


def test_grouped_sdpa_gives_what_exllamav2s_matmul_attention_gives() -> None:
    grouped = padded_logits(TinyExl2Model(attention="grouped", chunk=3), PROMPTS)
    matmul = padded_logits(TinyExl2Model(attention="matmul", chunk=3), PROMPTS)
    torch.testing.assert_close(grouped, matmul, rtol=1e-5, atol=1e-5)


def generate(model: TinyExl2Model, tickets: list[GenTicket], vocab_size: int | None) -> list[Any]:
    batch = StaticBatch(
        model,
        TinyCache(model, len(tickets), model.max_seq_len),
        tickets,
        pad_id=0,
        stop_ids=frozenset(),
        decode=decode,
        vocab_size=vocab_size,
    )
    batch.prefill()
    while not batch.finished:
        batch.step()
    return batch.rows


def test_a_static_batch_decodes_each_row_as_it_would_decode_alone() -> None:
    model = TinyExl2Model(chunk=4)
    lengths = [7, 3, 12]
    together = generate(model, [ticket(p, n) for p, n in zip(PROMPTS, lengths, strict=True)], 40)
    for row, prompt, n in zip(together, PROMPTS, lengths, strict=True):
        alone = generate(model, [ticket(prompt, n)], 40)[0]
        assert row.tokens == alone.tokens and len(row.tokens) == n


def test_sampling_never_picks_an_id_past_the_tokenizer_vocabulary() -> None:
    model = TinyExl2Model()
    greedy = [ticket(p, 10) for p in PROMPTS]
    sampled = [ticket(p, 10, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)]
    for tickets in (greedy, sampled):
        rows = generate(model, tickets, vocab_size=model.vocab)
        assert max(t for row in rows for t in row.tokens) < model.vocab
    # Guards the stand-in: unmasked, its untrained head rows would win.
    unmasked = generate(model, [ticket(p, 10) for p in PROMPTS], vocab_size=None)
    assert max(t for row in unmasked for t in row.tokens) >= model.vocab


def tiny_reference_logprob(
    model: TinyExl2Model, prompt: list[int], candidate: list[int], eot: int
) -> float:
    logits = alone_logits(model, prompt + candidate)[0, :, : model.vocab]
    lp = torch.log_softmax(logits, dim=-1)
    targets = [*candidate, eot]
    return sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(targets))


def test_scores_are_normalised_over_the_tokenizer_vocabulary() -> None:
    model = TinyExl2Model()
    prompt, candidates, eot = [5, 1, 4, 2, 9], [[7], [7, 8], [], [3, 9, 11]], 39
    got = score_candidates(
        model,
        TinyCache(model, 2, model.max_seq_len),
        ScoreTicket(prompt, candidates),
        end_of_turn_id=eot,
        pad_id=0,
        vocab_size=model.vocab,
    )
    want = [tiny_reference_logprob(model, prompt, c, eot) for c in candidates]
    assert got == pytest.approx(want, abs=1e-4)
    unmasked = score_candidates(
        model,
        TinyCache(model, 2, model.max_seq_len),
        ScoreTicket(prompt, candidates),
        end_of_turn_id=eot,
        pad_id=0,
    )
    assert all(u < g - 0.1 for u, g in zip(unmasked, got, strict=True))


# -- grouped SDPA as exllamav2's _attn_torch ----------------------------------------------


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (28, 4)])
@pytest.mark.parametrize(("q_len", "past"), [(1, 0), (1, 9), (6, 0), (6, 9)])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_attention_equals_repeat_kv_attention(
    heads: int, kv_heads: int, q_len: int, past: int, padded: bool
) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + q_len * 10 + past)
    batch, dim, kv_len = 3, 16, past + q_len
    q = torch.randn(batch, q_len, heads, dim, generator=gen)
    k = torch.randn(batch, kv_len, kv_heads, dim, generator=gen)
    v = torch.randn(batch, kv_len, kv_heads, dim, generator=gen)
    input_mask = None
    if padded:
        pads = [0, min(2, kv_len - 1), min(4, kv_len - 1)]
        input_mask = torch.tensor([[PAD_BIAS] * p + [0.0] * (kv_len - p) for p in pads])
    mask = None
    if input_mask is not None or q_len > 1:
        mask = exllamav2_attn_mask(batch, q_len, past, input_mask)
    got = grouped_attention(q, k, v, mask, 0.25)
    want = exllamav2_matmul_attention(q, k, v, mask, 0.25)
    assert got.is_contiguous() and got.shape == (batch, q_len, heads * dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class FakeAttentionModule:
    def __init__(self, *, sliding_window: int = 0, layer_idx: int = 0) -> None:
        self.sliding_window = sliding_window
        self.layer_idx = layer_idx
        self.scaling = 0.25


class FakeParams:
    def __init__(self, mask: Any, *, block_diag_layers: set[int] | None = None) -> None:
        self.mask = mask
        self.block_diag_layers = block_diag_layers or set()
        self.multi_cache = False

    def get_attn_mask(self, device: Any) -> Any:
        return self.mask


class FakeConfig:
    def __init__(self, *, grouped: bool = True, softcap: float = 0.0) -> None:
        self.attn_logit_softcapping = softcap
        if grouped:
            setattr(self, CONFIG_FLAG, True)


def attention_inputs(q_len: int = 4) -> tuple[Any, Any, Any, Any]:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, q_len, 8, 16, generator=gen)
    k = torch.randn(2, q_len, 2, 16, generator=gen)
    v = torch.randn(2, q_len, 2, 16, generator=gen)
    return q, k, v, exllamav2_attn_mask(2, q_len, 0, None)


def test_opted_in_plain_attention_runs_grouped_sdpa() -> None:
    original_calls: list[Any] = []
    attn = grouped_attn_torch(lambda *a: original_calls.append(a))
    q, k, v, mask = attention_inputs()
    out = attn(FakeAttentionModule(), 2, 4, q, k, v, FakeParams(mask), FakeConfig())
    assert not original_calls
    torch.testing.assert_close(out, exllamav2_matmul_attention(q, k, v, mask, 0.25))


@pytest.mark.parametrize(
    ("module", "params_kw", "config", "causal", "mask_none"),
    [
        (FakeAttentionModule(), {}, FakeConfig(grouped=False), True, False),  # not opted in
        (FakeAttentionModule(sliding_window=4), {}, FakeConfig(), True, False),
        (FakeAttentionModule(), {}, FakeConfig(softcap=30.0), True, False),
        (FakeAttentionModule(), {"block_diag_layers": {0}}, FakeConfig(), True, False),
        (FakeAttentionModule(), {}, FakeConfig(), False, False),  # non-causal (vision)
        (FakeAttentionModule(), {}, FakeConfig(), True, True),  # no mask for 4 queries
    ],
)
def test_everything_else_is_left_to_exllamav2(
    module: Any, params_kw: dict[str, Any], config: Any, causal: bool, mask_none: bool
) -> None:
    attn = grouped_attn_torch(lambda *a: "exllamav2")
    q, k, v, mask = attention_inputs()
    params = FakeParams(None if mask_none else mask, **params_kw)
    assert attn(module, 2, 4, q, k, v, params, config, causal) == "exllamav2"
