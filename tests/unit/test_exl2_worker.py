"""The GPU worker thread on CPU: failures fail only their requests, a lost GPU ends the
process, and both batching modes count and return a generation's text the same way.

The static worker runs `StaticBatch` on a scripted model; the paged worker drives a stand-in
for exllamav2 0.3.2's `ExLlamaV2DynamicGenerator` whose jobs end and hold text as
`ExLlamaV2DynamicJob.receive_sample` does.
"""

from __future__ import annotations

import queue
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from consumer.engine.base import ChatMessage, EngineError, Generation, GenerationRequest  # noqa: E402
from consumer.engine.exllamav2.batching import paged_completion  # noqa: E402
from consumer.engine.exllamav2.engine import ExLlamaV2Engine  # noqa: E402
from consumer.engine.exllamav2.loader import Runtime  # noqa: E402
from consumer.engine.exllamav2.modes import ModeDecision  # noqa: E402
from consumer.engine.exllamav2.runner import GenTicket, StaticBatch  # noqa: E402
from consumer.engine.exllamav2.startup import Startup  # noqa: E402
from consumer.engine.exllamav2.vram import VramEstimate  # noqa: E402
from consumer.engine.exllamav2.worker import GpuWorker  # noqa: E402
from consumer.observability.health import HealthReporter  # noqa: E402
from consumer.settings.exllamav2 import ExLlamaV2Settings  # noqa: E402

PIECES = {1: "a", 2: "b", 3: "#", 4: "c", 5: "\u00e9", 9: "<|im_end|>"}
STOP = 9
VOCAB = 12
WAIT_S = 10.0
STICKY = "CUDA error: an illegal memory access was encountered"


def decode(ids: list[int]) -> str:
    return "".join(PIECES.get(i, "?") for i in ids)


class FakeTokenizer:
    def decode(self, ids: Any, decode_special_tokens: bool = False) -> str:
        return decode([int(i) for i in ids.tolist()])


class ScriptedModel:
    """Every row's next token is script[step]; forward call number `fail_at` raises `error`."""

    def __init__(
        self, script: list[int], *, fail_at: int | None = None, error: Exception | None = None
    ) -> None:
        self.script = script
        self.fail_at = fail_at
        self.error = error
        self.calls = 0
        self.steps = 0

    def forward(
        self,
        input_ids: Any,
        cache: Any,
        input_mask: Any = None,
        preprocess_only: bool = False,
        last_id_only: bool = False,
        position_offsets: Any = None,
    ) -> Any:
        self.calls += 1
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
    def __init__(self, batch_size: int = 4, max_seq_len: int = 64) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.current_seq_len = 0


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


def startup(mode: str = "static") -> Startup:
    return Startup(
        settings=ExLlamaV2Settings(max_seq_len=256, max_batch_size=2, progress_bar=False),
        decision=ModeDecision(mode, "test"),  # type: ignore[arg-type]
        template=None,  # type: ignore[arg-type]
        gpus=[],
        estimate=VramEstimate(0, 0, 0, 0, 0),
    )


class Harness:
    """A started worker plus what it reported: outcomes by ticket name, fatal reasons."""

    def __init__(self, runtime: Runtime, mode: str, *, context_alive: bool = True) -> None:
        self.outcomes: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.fatal: list[str] = []
        self.worker = GpuWorker(
            startup(mode),
            load=lambda _: runtime,
            on_fatal=self.fatal.append,
            context_alive=lambda: context_alive,
        )
        self.worker.start()
        self.worker.ready.result(timeout=WAIT_S)

    def ticket(self, name: str, ids: list[int], max_tokens: int = 4, **kw: Any) -> GenTicket:
        request = GenerationRequest(
            messages=(ChatMessage("user", name),), max_tokens=max_tokens, **kw
        )
        return GenTicket(ids=ids, request=request, deliver=lambda o: self.outcomes.put((name, o)))

    def submit(self, *tickets: GenTicket) -> None:
        for t in tickets:
            assert self.worker.submit(t)

    def results(self, count: int) -> dict[str, Any]:
        got = dict(self.outcomes.get(timeout=WAIT_S) for _ in range(count))
        return got

    def close(self) -> None:
        if self.worker.is_alive():
            self.worker.inbox.put(None)
        self.worker.join(WAIT_S)
        assert not self.worker.is_alive()


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for harness in made:
        harness.close()


def static_harness(made: list[Harness], model: ScriptedModel, **kw: Any) -> Harness:
    harness = Harness(runtime_for(model), "static", **kw)
    made.append(harness)
    return harness


# -- static mode --------------------------------------------------------------------------


def test_a_failed_prefill_fails_its_batch_and_the_worker_serves_on(
    harnesses: list[Harness],
) -> None:
    h = static_harness(harnesses, ScriptedModel([1, 2, STOP], fail_at=1, error=ValueError("x")))
    h.submit(h.ticket("first", [1, 2]))
    failed = h.results(1)["first"]
    assert isinstance(failed, EngineError) and failed.retryable
    h.submit(h.ticket("second", [1, 2]))
    served = h.results(1)["second"]
    assert isinstance(served, Generation) and served.text == "ab"
    assert not h.fatal and h.worker.is_alive()


def test_out_of_memory_is_retryable_and_not_fatal(harnesses: list[Harness]) -> None:
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    h = static_harness(harnesses, ScriptedModel([1, STOP], fail_at=2, error=oom))
    h.submit(h.ticket("big", [1, 2, 3]))
    error = h.results(1)["big"]
    assert isinstance(error, EngineError) and error.retryable and "out of memory" in str(error)
    assert not h.fatal and h.worker.is_alive()


def engine_for(h: Harness) -> ExLlamaV2Engine:
    return ExLlamaV2Engine(h.worker)


@pytest.mark.parametrize(
    ("error", "context_alive"),
    [
        (RuntimeError(STICKY), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"), False),  # context found dead
    ],
)
async def test_a_lost_gpu_answers_everything_open_and_calls_on_fatal(
    harnesses: list[Harness], error: Exception, context_alive: bool
) -> None:
    h = static_harness(
        harnesses,
        ScriptedModel([1, 2, 4, STOP], fail_at=2, error=error),
        context_alive=context_alive,
    )
    engine = engine_for(h)
    assert engine.info.loaded and "error" not in engine.info.details
    # max_batch_size is 2: two rows run, the third waits in the worker, the fourth in the inbox.
    h.submit(*(h.ticket(f"t{i}", [1, 2]) for i in range(4)))
    outcomes = h.results(4)
    assert all(isinstance(o, EngineError) and o.retryable for o in outcomes.values())
    h.worker.join(WAIT_S)
    assert len(h.fatal) == 1 and str(error) in h.fatal[0]
    assert not h.worker.submit(h.ticket("late", [1]))
    info = engine.info
    assert not info.loaded and "GPU lost" in str(info.details["error"])
    health = HealthReporter(
        started_at=0.0,
        engine_info=lambda: engine.info,
        broker_status=lambda: (True, "ok"),
        assigned_partitions=lambda: [("ops.requests.v1", 0)],
    )
    assert health.health()["status"] == "unhealthy"  # /health answers 503
    assert health.ready()[0] is False  # /ready answers 503
    with pytest.raises(EngineError) as refused:
        await engine.generate(h.ticket("after", [1]).request)
    assert refused.value.retryable


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
    ) -> None:
        self.script = script
        self.refuse_longer_than = refuse_longer_than
        self.cancel_error = cancel_error
        self.iterate_error = iterate_error
        self.pending_jobs: list[EmulatedJob] = []
        self.active_jobs: list[EmulatedJob] = []

    def enqueue(self, job: Any) -> None:
        if job.input_ids.shape[-1] > self.refuse_longer_than:
            raise AssertionError("Job requires 9 pages (only 2 available) and cannot be enqueued")
        self.pending_jobs.append(EmulatedJob(job, self.script))

    def cancel(self, job: Any) -> None:
        if self.cancel_error is not None:
            raise self.cancel_error
        self.pending_jobs = [j for j in self.pending_jobs if j.job is not job]
        self.active_jobs = [j for j in self.active_jobs if j.job is not job]

    def iterate(self) -> list[dict[str, Any]]:
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


@pytest.fixture
def fake_exllamav2(monkeypatch: pytest.MonkeyPatch) -> None:
    package = types.ModuleType("exllamav2")
    generator = types.ModuleType("exllamav2.generator")
    generator.ExLlamaV2DynamicJob = FakeJob  # type: ignore[attr-defined]
    generator.ExLlamaV2Sampler = FakeSampler  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exllamav2", package)
    monkeypatch.setitem(sys.modules, "exllamav2.generator", generator)


def paged_harness(made: list[Harness], generator: FakeGenerator, **kw: Any) -> Harness:
    harness = Harness(runtime_for(ScriptedModel([STOP]), generator), "paged", **kw)
    made.append(harness)
    return harness


@pytest.mark.usefixtures("fake_exllamav2")
def test_a_request_the_generator_refuses_is_answered_and_others_run(
    harnesses: list[Harness],
) -> None:
    h = paged_harness(harnesses, FakeGenerator([1, 2, STOP], refuse_longer_than=3))
    h.submit(h.ticket("long", [1, 2, 3, 4, 5]), h.ticket("short", [1, 2]))
    got = h.results(2)
    assert isinstance(got["long"], EngineError) and not got["long"].retryable
    assert "refused" in str(got["long"])
    assert isinstance(got["short"], Generation) and got["short"].text == "ab"


@pytest.mark.usefixtures("fake_exllamav2")
def test_a_job_that_cannot_be_built_is_answered_and_others_run(
    harnesses: list[Harness],
) -> None:
    h = paged_harness(harnesses, FakeGenerator([1, STOP]))
    h.submit(h.ticket("unlucky", [1], max_tokens=13), h.ticket("fine", [1]))
    got = h.results(2)
    assert isinstance(got["unlucky"], EngineError) and not got["unlucky"].retryable
    assert isinstance(got["fine"], Generation)


@pytest.mark.usefixtures("fake_exllamav2")
def test_a_failing_cancel_does_not_stop_the_worker(harnesses: list[Harness]) -> None:
    h = paged_harness(harnesses, FakeGenerator([1, STOP], cancel_error=KeyError("job")))
    gone = h.ticket("gone", [1])
    gone.cancelled = True
    h.submit(gone, h.ticket("kept", [1]))
    assert isinstance(h.results(1)["kept"], Generation)
    assert h.worker.is_alive() and not h.fatal


@pytest.mark.usefixtures("fake_exllamav2")
def test_a_sticky_error_in_the_paged_generator_is_fatal(harnesses: list[Harness]) -> None:
    h = paged_harness(harnesses, FakeGenerator([1, STOP], iterate_error=RuntimeError(STICKY)))
    h.submit(h.ticket("one", [1]), h.ticket("two", [2]))
    got = h.results(2)
    assert all(isinstance(o, EngineError) and o.retryable for o in got.values())
    h.worker.join(WAIT_S)
    assert len(h.fatal) == 1


# -- both modes end, count and cut a generation the same way --------------------------------

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
    ticket = GenTicket(ids=[1, 2], request=request, deliver=lambda _: None)
    batch = StaticBatch(
        ScriptedModel(script),
        FakeCache(),
        [ticket],
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


@pytest.mark.usefixtures("fake_exllamav2")
def test_the_paged_worker_delivers_the_corrected_outcome(harnesses: list[Harness]) -> None:
    h = paged_harness(harnesses, FakeGenerator([1, 3, STOP]))
    h.submit(h.ticket("held", [1], max_tokens=8, stop=("#c",)))
    generation = h.results(1)["held"]
    assert (generation.text, generation.output_tokens) == ("a#", 2)
