"""exllamav2 under the scheduler, on CPU: both batching modes as backends of `SchedulerLoop`.

Failures fail only their requests, a lost GPU ends the process, both modes count and return a
generation's text the same way, and the scheduler's fairness, priority, deadlines and
cancellation hold on the GPU backends. The static backend runs `StaticBatch` on a scripted
model; the paged backend drives a stand-in for exllamav2 0.3.2's `ExLlamaV2DynamicGenerator`
whose jobs end and hold text as `ExLlamaV2DynamicJob.receive_sample` does.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from consumer.engine.base import (  # noqa: E402
    ChatMessage,
    EngineError,
    Generation,
    GenerationRequest,
    WorkCancelled,
    WorkExpired,
    WorkTag,
)
from consumer.engine.exllamav2.batching import paged_completion  # noqa: E402
from consumer.engine.exllamav2.engine import start_exllamav2_engine  # noqa: E402
from consumer.engine.exllamav2.errors import EngineConfigError  # noqa: E402
from consumer.engine.exllamav2.loader import Runtime  # noqa: E402
from consumer.engine.exllamav2.modes import ModeDecision  # noqa: E402
from consumer.engine.exllamav2.runner import GenTicket, StaticBatch  # noqa: E402
from consumer.engine.exllamav2.startup import Startup  # noqa: E402
from consumer.engine.exllamav2.vram import VramEstimate  # noqa: E402
from consumer.engine.scheduler.driver import Job, StepEvent  # noqa: E402
from consumer.engine.scheduler.engine import ScheduledEngine  # noqa: E402
from consumer.observability.health import HealthReporter  # noqa: E402
from consumer.settings.exllamav2 import ExLlamaV2Settings  # noqa: E402

PIECES = {1: "a", 2: "b", 3: "#", 4: "c", 5: "\u00e9", 9: "<|im_end|>"}
IDS = {text: token for token, text in PIECES.items()}
STOP = 9
VOCAB = 12
WAIT_S = 10.0
STICKY = "CUDA error: an illegal memory access was encountered"
MODES = ["static", "paged"]


def decode(ids: list[int]) -> str:
    return "".join(PIECES.get(i, "?") for i in ids)


class FakeTokenizer:
    """One character per token, as PIECES spells them (anything else is "a")."""

    def encode(self, text: str, encode_special_tokens: bool = False, add_bos: bool = False) -> Any:
        return torch.tensor([[IDS.get(ch, 1) for ch in text]], dtype=torch.long)

    def decode(self, ids: Any, decode_special_tokens: bool = False) -> str:
        return decode([int(i) for i in ids.tolist()])


class FakeTemplate:
    def render(self, messages: tuple[ChatMessage, ...], add_generation_prompt: bool) -> str:
        return "".join(m.content for m in messages)


class Gate:
    """Holds the scheduler's thread in the model (or generator) while closed; `delay` slows
    every pass, so a test can act between steps."""

    def __init__(self, *, closed: bool = False, delay: float = 0.0) -> None:
        self._open = threading.Event()
        if not closed:
            self._open.set()
        self.delay = delay

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def wait(self) -> None:
        if not self._open.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        if self.delay:
            time.sleep(self.delay)


class ScriptedModel:
    """Every row's next token is script[step]; forward call number `fail_at` raises `error`."""

    def __init__(
        self,
        script: list[int],
        *,
        fail_at: int | None = None,
        error: Exception | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.script = script
        self.fail_at = fail_at
        self.error = error
        self.gate = gate
        self.calls = 0
        self.steps = 0
        self.rows: list[int] = []  # batch rows of each call

    def forward(
        self,
        input_ids: Any,
        cache: Any,
        input_mask: Any = None,
        preprocess_only: bool = False,
        last_id_only: bool = False,
        position_offsets: Any = None,
    ) -> Any:
        if self.gate is not None:
            self.gate.wait()
        self.calls += 1
        self.rows.append(int(input_ids.shape[0]))
        if self.calls == self.fail_at and self.error is not None:
            raise self.error
        cache.current_seq_len += input_ids.shape[1]
        if preprocess_only:
            return None
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], VOCAB)
        logits[:, :, self.script[min(self.steps, len(self.script) - 1)]] = 1.0
        self.steps += 1
        return logits

    def unload(self) -> None:
        pass


class FakeCache:
    def __init__(self, batch_size: int = 4, max_seq_len: int = 256) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.current_seq_len = 0

    def all_tensors(self) -> list[Any]:
        return []


def runtime_for(model: Any, generator: Any = None) -> Runtime:
    return Runtime(
        model=model,
        tokenizer=FakeTokenizer(),
        gen_cache=FakeCache(),
        score_cache=FakeCache(),
        generator=generator,
        stop_ids=frozenset({STOP}),
        end_of_turn_id=STOP,
        pad_id=0,
        exllamav2_version="0.3.2",
        tokenizer_lock=threading.Lock(),
        vocab_size=10,
    )


def startup(mode: str, max_batch_size: int = 2) -> Startup:
    return Startup(
        settings=ExLlamaV2Settings(
            max_seq_len=256, max_batch_size=max_batch_size, progress_bar=False
        ),
        decision=ModeDecision(mode, "test"),  # type: ignore[arg-type]
        template=FakeTemplate(),  # type: ignore[arg-type]
        gpus=[],
        estimate=VramEstimate(0, 0, 0, 0, 0),
    )


# -- paged mode: a stand-in for exllamav2 0.3.2's dynamic generator ------------------------


class EmulatedJob:
    """`ExLlamaV2DynamicJob.receive_sample`'s endings (0.3.2): a stop token ends the job
    without emitting held text; reaching max_new_tokens or a stop string emits it first;
    text that may begin a stop string is held back."""

    def __init__(self, job: Any, script: list[int]) -> None:
        self.job = job
        self.script = iter(script)
        self.stop_tokens = {c for c in job.stop_conditions if isinstance(c, int)}
        self.stop_strings = [c for c in job.stop_conditions if isinstance(c, str)]
        self.new_tokens = 0
        self.held_text = ""
        self.held_tokens: list[int] = []
        self.full_completion = ""

    def receive(self) -> dict[str, Any]:
        token = next(self.script)
        self.new_tokens += 1
        self.held_text += PIECES.get(token, "?")
        self.held_tokens.append(token)
        result: dict[str, Any] = {
            "stage": "streaming",
            "eos": False,
            "identifier": self.job.identifier,
        }
        if token in self.stop_tokens:
            return self.end(result, "stop_token", emit_held=False)
        if self.new_tokens >= self.job.max_new_tokens:
            return self.end(result, "max_new_tokens", emit_held=True)
        for stop in self.stop_strings:
            at = self.held_text.find(stop)
            if at >= 0:
                self.held_text = self.held_text[:at]
                return self.end(result, "stop_string", emit_held=True)
        if any(
            stop.startswith(self.held_text[i:])
            for stop in self.stop_strings
            for i in range(len(self.held_text))
        ):
            return result  # held: may be the start of a stop string
        self.emit_held(result)
        return result

    def emit_held(self, result: dict[str, Any]) -> None:
        self.full_completion += self.held_text
        result["text"] = self.held_text
        self.held_text, self.held_tokens = "", []

    def end(self, result: dict[str, Any], reason: str, *, emit_held: bool) -> dict[str, Any]:
        if emit_held:
            self.emit_held(result)
        result.update(
            eos=True,
            eos_reason=reason,
            full_completion=self.full_completion,
            new_tokens=self.new_tokens,
        )
        if self.held_tokens:
            result["held"] = {
                "text": self.held_text,
                "token_ids": torch.tensor([self.held_tokens]),
            }
        return result


class FakeJob:
    """ExLlamaV2DynamicJob's constructor as the engine calls it."""

    def __init__(self, **kw: Any) -> None:
        if kw["max_new_tokens"] == 13:
            raise ValueError("unlucky job")
        self.__dict__.update(kw)


class FakeSampler:
    class Settings:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

        @staticmethod
        def greedy() -> Any:
            return FakeSampler.Settings()


class FakeGenerator:
    def __init__(
        self,
        script: list[int],
        *,
        refuse_longer_than: int = 100,
        cancel_error: Exception | None = None,
        iterate_error: Exception | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.script = script
        self.refuse_longer_than = refuse_longer_than
        self.cancel_error = cancel_error
        self.iterate_error = iterate_error
        self.gate = gate
        self.pending_jobs: list[EmulatedJob] = []
        self.active_jobs: list[EmulatedJob] = []
        self.cancelled: list[Any] = []

    def enqueue(self, job: Any) -> None:
        if job.input_ids.shape[-1] > self.refuse_longer_than:
            raise AssertionError("Job requires 9 pages (only 2 available) and cannot be enqueued")
        self.pending_jobs.append(EmulatedJob(job, self.script))

    def cancel(self, job: Any) -> None:
        self.cancelled.append(job)
        if self.cancel_error is not None:
            raise self.cancel_error
        self.pending_jobs = [j for j in self.pending_jobs if j.job is not job]
        self.active_jobs = [j for j in self.active_jobs if j.job is not job]

    def iterate(self) -> list[dict[str, Any]]:
        if self.gate is not None:
            self.gate.wait()
        if self.iterate_error is not None:
            raise self.iterate_error
        results = []
        for started in self.pending_jobs:
            results.append({"stage": "started", "identifier": started.job.identifier})
        self.active_jobs += self.pending_jobs
        self.pending_jobs = []
        for job in list(self.active_jobs):
            result = job.receive()
            results.append(result)
            if result["eos"]:
                self.active_jobs.remove(job)
        return results

    def clear_queue(self) -> None:
        self.pending_jobs, self.active_jobs = [], []


@pytest.fixture(autouse=True)
def fake_exllamav2(monkeypatch: pytest.MonkeyPatch) -> None:
    package = types.ModuleType("exllamav2")
    generator = types.ModuleType("exllamav2.generator")
    generator.ExLlamaV2DynamicJob = FakeJob  # type: ignore[attr-defined]
    generator.ExLlamaV2Sampler = FakeSampler  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exllamav2", package)
    monkeypatch.setitem(sys.modules, "exllamav2.generator", generator)


# -- the engine under test ------------------------------------------------------------------


def key_of(job: Job) -> str:
    return job.tag.key or "?"


class Harness:
    """An exllamav2 engine on a fake model, and what its backend did: `log` holds
    ("start", key), ("token", key) and ("done", key) in order; `fatal` the on_fatal reasons."""

    def __init__(
        self,
        mode: str,
        *,
        model: ScriptedModel | None = None,
        generator: FakeGenerator | None = None,
        gate: Gate | None = None,
        max_batch_size: int = 2,
        context_alive: bool = True,
        script: list[int] | None = None,
    ) -> None:
        self.gate = gate or Gate()
        script = script or [1] * 100
        if mode == "static":
            self.model = model or ScriptedModel(script, gate=self.gate)
            self.generator = None
        else:
            self.model = model or ScriptedModel([STOP])
            self.generator = generator or FakeGenerator(script, gate=self.gate)
        self.fatal: list[str] = []
        self.log: list[tuple[str, str]] = []
        runtime = runtime_for(self.model, self.generator)
        self.engine: ScheduledEngine = start_exllamav2_engine(
            startup(mode, max_batch_size),
            load=lambda _: runtime,
            on_fatal=self.fatal.append,
            context_alive=lambda: context_alive,
        )
        self._watch()

    def _watch(self) -> None:
        backend: Any = self.engine.backend
        start, step = backend.start, backend.step

        def watched_start(job: Job) -> None:
            self.log.append(("start", key_of(job)))
            start(job)

        def watched_step(budget: Mapping[Job, int]) -> list[StepEvent]:
            events: list[StepEvent] = step(budget)
            for event in events:
                if event.new_tokens:
                    self.log.append(("token", key_of(event.job)))
                if event.result is not None or event.error is not None:
                    self.log.append(("done", key_of(event.job)))
            return events

        backend.start, backend.step = watched_start, watched_step

    def starts(self) -> list[str]:
        return [k for what, k in self.log if what == "start"]

    def tokens(self, key: str) -> int:
        return self.log.count(("token", key))

    def generate(self, key: str, content: str = "ab", max_tokens: int = 4, **kw: Any) -> Any:
        return asyncio.create_task(self.engine.generate(request(key, content, max_tokens, **kw)))


def request(
    key: str,
    content: str = "ab",
    max_tokens: int = 4,
    *,
    tenant: str = "t",
    priority: str = "interactive",
    deadline: float | None = None,
    on_text: Callable[[str], None] | None = None,
    **kw: Any,
) -> GenerationRequest:
    work = WorkTag(
        tenant=tenant,
        priority=priority,  # type: ignore[arg-type]
        deadline=deadline,
        key=key,
        on_text=on_text,
    )
    return GenerationRequest(
        messages=(ChatMessage("user", content),), max_tokens=max_tokens, work=work, **kw
    )


@pytest.fixture
async def harnesses() -> AsyncIterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for harness in made:
        harness.gate.open()
        await harness.engine.close()


@pytest.fixture
def make(harnesses: list[Harness]) -> Callable[..., Harness]:
    def build(mode: str, **kw: Any) -> Harness:
        harness = Harness(mode, **kw)
        harnesses.append(harness)
        return harness

    return build


async def wait_until(condition: Callable[[], bool], within: float = WAIT_S) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Let tasks created so far run up to their await (their jobs reach the inbox)."""
    await asyncio.sleep(0.05)


# -- static mode: failures ------------------------------------------------------------------


async def test_a_failed_prefill_fails_its_batch_and_serving_continues(make: Any) -> None:
    h = make("static", model=ScriptedModel([1, 2, STOP], fail_at=1, error=ValueError("x")))
    with pytest.raises(EngineError) as failed:
        await h.generate("first")
    assert failed.value.retryable
    served = await h.generate("second")
    assert isinstance(served, Generation) and served.text == "ab"
    assert not h.fatal and h.engine.info.loaded


async def test_out_of_memory_is_retryable_and_not_fatal(make: Any) -> None:
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    h = make("static", model=ScriptedModel([1, STOP], fail_at=2, error=oom))
    with pytest.raises(EngineError) as failed:
        await h.generate("big", "abc")
    assert failed.value.retryable and "out of memory" in str(failed.value)
    assert (await h.generate("next")).text == "a"
    assert not h.fatal and h.engine.info.loaded


@pytest.mark.parametrize(
    ("error", "context_alive"),
    [
        (RuntimeError(STICKY), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"), False),  # context found dead
    ],
)
async def test_a_lost_gpu_answers_everything_open_and_calls_on_fatal(
    make: Any, error: Exception, context_alive: bool
) -> None:
    gate = Gate(closed=True)
    h = make(
        "static",
        model=ScriptedModel([1, 2, 4, STOP], fail_at=2, error=error, gate=gate),
        gate=gate,
        context_alive=context_alive,
    )
    engine = h.engine
    assert engine.info.loaded and "error" not in engine.info.details
    # max_batch_size is 2: a batch runs, the rest wait in the queue or the inbox.
    tasks = [h.generate(f"t{i}") for i in range(4)]
    await settle()
    gate.open()
    for task in tasks:
        with pytest.raises(EngineError) as lost:
            await task
        assert lost.value.retryable
    await wait_until(lambda: not engine.info.loaded)
    assert len(h.fatal) == 1 and str(error) in h.fatal[0]
    info = engine.info
    assert "engine lost" in str(info.details["error"]) and "gpus" not in info.details
    health = HealthReporter(
        started_at=0.0,
        engine_info=lambda: engine.info,
        broker_status=lambda: (True, "ok"),
        assigned_partitions=lambda: [("ops.requests.v1", 0)],
    )
    assert health.health()["status"] == "unhealthy"  # /health answers 503
    assert health.ready()[0] is False  # /ready answers 503
    with pytest.raises(EngineError) as refused:
        await engine.generate(request("after"))
    assert refused.value.retryable


async def test_a_model_that_fails_to_load_is_a_config_error() -> None:
    def broken(_: Startup) -> Runtime:
        raise RuntimeError("no weights")

    with pytest.raises(EngineConfigError, match="failed to load the model: no weights"):
        await asyncio.to_thread(start_exllamav2_engine, startup("static"), load=broken)


# -- paged mode: failures -------------------------------------------------------------------


async def test_a_request_the_generator_refuses_is_answered_and_others_run(make: Any) -> None:
    h = make("paged", generator=FakeGenerator([1, 2, STOP], refuse_longer_than=3))
    long, short = h.generate("long", "abcab"), h.generate("short", "ab")
    with pytest.raises(EngineError) as refused:
        await long
    assert not refused.value.retryable and "refused" in str(refused.value)
    assert (await short).text == "ab"


async def test_a_job_that_cannot_be_built_is_answered_and_others_run(make: Any) -> None:
    h = make("paged", generator=FakeGenerator([1, STOP]))
    unlucky, fine = h.generate("unlucky", max_tokens=13), h.generate("fine")
    with pytest.raises(EngineError) as refused:
        await unlucky
    assert not refused.value.retryable
    assert isinstance(await fine, Generation)


async def test_a_failing_cancel_does_not_stop_the_engine(make: Any) -> None:
    gate = Gate(closed=True)
    generator = FakeGenerator([1, 1, 1, 1, STOP], cancel_error=KeyError("job"), gate=gate)
    h = make("paged", generator=generator, gate=gate)
    gone = h.generate("gone", max_tokens=50)
    await wait_until(lambda: h.engine.load().running == 1)
    cancel = asyncio.create_task(h.engine.cancel("gone"))
    await settle()
    gate.open()
    assert await cancel is True
    with pytest.raises(WorkCancelled):
        await gone
    assert len(generator.cancelled) == 1
    assert (await h.generate("kept")).text == "aaaa"
    assert h.engine.info.loaded and not h.fatal


async def test_a_sticky_error_in_the_paged_generator_is_fatal(make: Any) -> None:
    generator = FakeGenerator([1, STOP], iterate_error=RuntimeError(STICKY))
    h = make("paged", generator=generator)
    for task in (h.generate("one"), h.generate("two")):
        with pytest.raises(EngineError) as lost:
            await task
        assert lost.value.retryable
    await wait_until(lambda: len(h.fatal) == 1)


# -- both modes end, count, cut and stream a generation the same way -------------------------

CASES: list[tuple[list[int], int, tuple[str, ...]]] = [
    ([1, 2, STOP], 8, ()),  # a stop token: neither text nor an output token
    ([1, 3, STOP], 8, ("#c",)),  # a stop token right after text held as a stop-string start
    ([1, 3, 4, 2], 8, ("#c",)),  # a stop string: cut where it starts, its tokens counted
    ([1, 2, 4], 3, ()),  # max_tokens
    ([5, STOP], 8, ()),
]


def static_outcome(script: list[int], max_tokens: int, stop: tuple[str, ...]) -> Any:
    request = GenerationRequest(
        messages=(ChatMessage("user", "x"),), max_tokens=max_tokens, stop=stop
    )
    batch = StaticBatch(
        ScriptedModel(script),
        FakeCache(),
        [GenTicket(ids=[1, 2], request=request)],
        pad_id=0,
        stop_ids=frozenset({STOP}),
        decode=decode,
        vocab_size=10,
    )
    batch.prefill()
    while not batch.finished:
        batch.step()
    ((_, generation),) = batch.results()
    return generation.text, generation.output_tokens, generation.finish_reason


def paged_outcome(script: list[int], max_tokens: int, stop: tuple[str, ...]) -> Any:
    job = types.SimpleNamespace(
        stop_conditions=[STOP, *stop], max_new_tokens=max_tokens, identifier="x"
    )
    emulated = EmulatedJob(job, script)
    while not (result := emulated.receive())["eos"]:
        pass
    done = paged_completion(result, decode)
    return done.text, done.output_tokens, done.reason


@pytest.mark.parametrize(("script", "max_tokens", "stop"), CASES)
def test_paged_and_static_generations_agree(
    script: list[int], max_tokens: int, stop: tuple[str, ...]
) -> None:
    assert paged_outcome(script, max_tokens, stop) == static_outcome(script, max_tokens, stop)


def test_exllamav2s_raw_stop_token_result_would_overcount_and_drop_held_text() -> None:
    # Guards the emulation: what 0.3.2 reports before paged_completion corrects it.
    job = types.SimpleNamespace(stop_conditions=[STOP, "#c"], max_new_tokens=8, identifier="x")
    emulated = EmulatedJob(job, [1, 3, STOP])
    while not (result := emulated.receive())["eos"]:
        pass
    assert (result["full_completion"], result["new_tokens"]) == ("a", 3)
    assert static_outcome([1, 3, STOP], 8, ("#c",))[:2] == ("a#", 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("script", "max_tokens", "stop"), CASES)
async def test_streamed_text_adds_up_to_the_answer_in_both_modes(
    make: Any, mode: str, script: list[int], max_tokens: int, stop: tuple[str, ...]
) -> None:
    h = make(mode, script=script)
    pieces: list[str] = []
    generation = await h.generate("s", max_tokens=max_tokens, stop=stop, on_text=pieces.append)
    await asyncio.sleep(0.01)  # the last piece hops to this loop after the answer
    want = static_outcome(script, max_tokens, stop)
    assert (generation.text, generation.output_tokens, generation.finish_reason) == want
    assert "".join(pieces) == generation.text
    assert h.tokens("s") == generation.output_tokens  # what the tenant was charged


async def test_the_paged_engine_answers_the_corrected_outcome(make: Any) -> None:
    h = make("paged", script=[1, 3, STOP])
    generation = await h.generate("held", max_tokens=8, stop=("#c",))
    assert (generation.text, generation.output_tokens) == ("a#", 2)


# -- the scheduler's rules on the GPU backends ------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_second_tenant_starts_at_the_next_free_slot_not_after_the_first_ones_backlog(
    make: Any, mode: str
) -> None:
    gate = Gate(closed=True)
    h = make(mode, gate=gate, max_batch_size=2)
    # Tenant c fills every slot; a then queues four, b one, all while c runs.
    first = [h.generate(f"c{i}", max_tokens=1, tenant="c") for i in range(2)]
    await settle()
    backlog = [h.generate(f"a{i}", max_tokens=2, tenant="a") for i in range(4)]
    await settle()
    late = h.generate("b0", max_tokens=2, tenant="b")
    await settle()
    gate.open()
    await asyncio.gather(*first, *backlog, late)
    assert h.starts()[:4] == ["c0", "c1", "a0", "b0"]  # a static batch, or two paged slots


@pytest.mark.parametrize("mode", MODES)
async def test_interactive_work_starts_before_batch_work(make: Any, mode: str) -> None:
    gate = Gate(closed=True)
    h = make(mode, gate=gate, max_batch_size=1)
    running = h.generate("c0", max_tokens=1)
    await settle()
    bulk = h.generate("x0", max_tokens=1, tenant="x", priority="batch")
    await settle()
    urgent = h.generate("i0", max_tokens=1, tenant="i")
    await settle()
    gate.open()
    await asyncio.gather(running, bulk, urgent)
    assert h.starts() == ["c0", "i0", "x0"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_request_whose_deadline_passes_in_the_queue_never_runs(
    make: Any, mode: str
) -> None:
    gate = Gate(closed=True)
    h = make(mode, gate=gate, max_batch_size=1)
    running = h.generate("c0", max_tokens=1)
    await settle()
    late = h.generate("late", max_tokens=1, deadline=time.time() + 0.1)
    await asyncio.sleep(0.3)
    gate.open()
    with pytest.raises(WorkExpired):
        await late
    await running
    assert "late" not in h.starts()


@pytest.mark.parametrize("mode", MODES)
async def test_a_cancelled_queued_request_never_runs(make: Any, mode: str) -> None:
    gate = Gate(closed=True)
    h = make(mode, gate=gate, max_batch_size=1)
    running = h.generate("c0", max_tokens=1)
    await settle()
    queued = h.generate("q0", max_tokens=1)
    await settle()
    cancel = asyncio.create_task(h.engine.cancel("q0"))
    await settle()
    gate.open()
    assert await cancel is True
    with pytest.raises(WorkCancelled) as cancelled:
        await queued
    assert (cancelled.value.input_tokens, cancelled.value.output_tokens) == (0, 0)
    await running
    assert h.starts() == ["c0"]


async def test_cancelling_a_running_paged_job_cancels_it_in_the_generator_and_frees_its_slot(
    make: Any,
) -> None:
    gate = Gate(closed=True)
    h = make("paged", gate=gate, max_batch_size=1)
    long = h.generate("long", max_tokens=50)
    await wait_until(lambda: h.starts() == ["long"])
    waiting = h.generate("next", max_tokens=2)
    cancel = asyncio.create_task(h.engine.cancel("long"))
    await settle()
    gate.open()  # one step runs, then the cancel is taken
    assert await cancel is True
    with pytest.raises(WorkCancelled) as cancelled:
        await long
    assert (cancelled.value.text, cancelled.value.output_tokens) == ("a", 1)
    assert cancelled.value.input_tokens == 2
    assert h.generator is not None and [j.identifier.tag.key for j in h.generator.cancelled] == [
        "long"
    ]
    assert (await waiting).text == "aa"  # it took the freed slot
    assert h.starts() == ["long", "next"] and h.tokens("long") == 1
    assert not h.generator.active_jobs
    await wait_until(lambda: h.engine.load().running == 0)  # refreshed after the answer


async def test_cancelling_a_running_static_row_stops_its_tokens_but_its_slot_waits_for_the_batch(
    make: Any,
) -> None:
    gate = Gate(closed=True, delay=0.005)
    h = make("static", gate=gate, max_batch_size=2)
    blocker = h.generate("c0", max_tokens=1)
    await settle()
    cancelled_row = h.generate("gone", max_tokens=40)
    kept = h.generate("kept", max_tokens=40)
    await settle()
    gate.open()
    await blocker
    await wait_until(lambda: h.tokens("gone") >= 3)
    assert await h.engine.cancel("gone") is True
    with pytest.raises(WorkCancelled) as cancelled:
        await cancelled_row
    produced = cancelled.value.output_tokens
    assert produced >= 3 and cancelled.value.text == "a" * produced  # what it had
    after = h.generate("after", max_tokens=1)
    assert (await kept).output_tokens == 40
    await after
    assert h.tokens("gone") == produced  # no token after the cancel
    # "after" waited for the padded batch to end; the dropped row rode along, fed padding.
    assert h.log.index(("start", "after")) > h.log.index(("done", "kept"))
    assert set(h.model.rows[2:-2]) == {2}


async def test_a_score_runs_between_the_decode_steps_of_a_static_batch(make: Any) -> None:
    gate = Gate(delay=0.005)
    h = make("static", gate=gate, max_batch_size=2)
    long = h.generate("long", max_tokens=60)
    await wait_until(lambda: h.tokens("long") >= 2)
    scores = await h.engine.score((ChatMessage("user", "ab"),), ("a", "bc"), WorkTag(key="s"))
    assert len(scores.logprobs) == 2 and scores.input_tokens == 2
    assert scores.scored_tokens == 2 + 3  # each label and the end-of-turn token
    assert not long.done()
    assert (await long).output_tokens == 60


@pytest.mark.parametrize("mode", MODES)
async def test_load_reports_queued_requests_and_tokens_per_priority_and_running(
    make: Any, mode: str
) -> None:
    gate = Gate(delay=0.005)
    h = make(mode, gate=gate, max_batch_size=1)
    long = h.generate("long", max_tokens=90)
    await wait_until(lambda: h.tokens("long") >= 1)
    urgent = h.generate("i0", "abc", max_tokens=4)
    bulk = h.generate("x0", "ab", max_tokens=5, priority="batch")
    await wait_until(lambda: sum(h.engine.load().queued_requests.values()) == 2)
    load = h.engine.load()
    assert load.running == 1 and load.slots == 1
    assert load.queued_requests == {"interactive": 1, "batch": 1}
    assert load.queued_tokens == {"interactive": 3 + 4, "batch": 2 + 5}
    details = h.engine.info.details
    assert details["batching_mode"] == mode and details["active_sequences"] == 1
    assert details["scheduler"]["queued_requests"] == {"interactive": 1, "batch": 1}
    assert await h.engine.cancel("long") is True
    with pytest.raises(WorkCancelled):
        await long
    await asyncio.gather(urgent, bulk)
    assert h.starts() == ["long", "i0", "x0"]
