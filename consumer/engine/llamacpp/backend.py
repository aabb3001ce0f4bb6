"""The CPU engine: a GGUF model run by llama-cpp-python."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from llama_cpp import LogitsProcessorList

from consumer.engine.base import (
    BatchObserver,
    ChatMessage,
    EngineError,
    EngineInfo,
    Generation,
    GenerationRequest,
    Scores,
)

log = logging.getLogger(__name__)


class LlamaCppEngine:
    """One llama.cpp context; calls are queued on a single worker thread.

    A llama.cpp context is not safe for concurrent use, so concurrency here is a
    queue, not a batch; the GPU engine is the one that batches.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        repack_weights: bool = False,
    ) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.perf_counter()
        with _model_params(use_extra_bufts=repack_weights):
            self._llama = Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_batch=n_batch,
                seed=seed,
                logits_all=False,
                verbose=False,
            )
        self._model_name = model_path.stem
        self._n_ctx = n_ctx
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise EngineError(f"{model_path.name} has no chat template", retryable=False)
        eos_id = self._llama.token_eos()
        bos_id = self._llama.token_bos()
        self._eos_text = self._token_text(eos_id)
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._eos_text,
            bos_token=self._token_text(bos_id) if bos_id >= 0 else "",
            add_generation_prompt=True,
        )
        end_of_turn = self._llama.tokenize(b"<|im_end|>", add_bos=False, special=True)
        self._end_of_turn = end_of_turn[0] if len(end_of_turn) == 1 else eos_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._closed = False
        self.on_batch: BatchObserver | None = None
        log.info(
            "engine_loaded",
            extra={
                "backend": "llamacpp",
                "model": self._model_name,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            backend="llamacpp",
            model=self._model_name,
            loaded=not self._closed,
            details={"n_ctx": self._n_ctx, "device": "cpu"},
        )

    def count_tokens(self, text: str) -> int:
        return len(self._tokens(text))

    def _tokens(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    async def generate(self, request: GenerationRequest) -> Generation:
        return await self._run(self._generate_sync, request)

    async def score(self, messages: tuple[ChatMessage, ...], candidates: tuple[str, ...]) -> Scores:
        return await self._run(self._score_sync, messages, candidates)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self._llama.close()

    async def _run(self, func: Any, *args: Any) -> Any:
        if self._closed:
            raise EngineError("engine is closed", retryable=True)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_alone, func, *args)

    def _run_alone(self, func: Any, *args: Any) -> Any:
        # The worker thread runs one request at a time: every call is a batch of one.
        if self.on_batch is not None:
            self.on_batch(1)
        return func(*args)

    def _token_text(self, token_id: int) -> str:
        text = self._llama._model.token_get_text(token_id)
        return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)

    def _prompt_tokens(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        chat: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
        rendered = self._formatter(messages=chat)
        tokens = self._llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)
        return list(tokens)

    def _check_fits(self, prompt_tokens: int, extra: int) -> None:
        if prompt_tokens + extra > self._n_ctx:
            raise EngineError(
                f"prompt of {prompt_tokens} tokens plus {extra} more exceeds the context "
                f"window of {self._n_ctx} tokens",
                retryable=False,
            )

    def _generate_sync(self, request: GenerationRequest) -> Generation:
        tokens = self._prompt_tokens(request.messages)
        max_tokens = min(request.max_tokens, self._n_ctx - len(tokens))
        self._check_fits(len(tokens), 1)
        started = time.perf_counter()
        first_token_at: list[float] = []

        def mark_first_token(_ids: Any, logits: Any) -> Any:
            # Called before each sampling step; the first call ends the prefill.
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            return logits

        completion: Any = self._llama.create_completion(
            prompt=tokens,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop),
            seed=request.seed,
            logits_processor=LogitsProcessorList([mark_first_token]),
        )
        choice = completion["choices"][0]
        usage = completion["usage"]
        return Generation(
            text=choice["text"],
            finish_reason="length" if choice["finish_reason"] == "length" else "stop",
            input_tokens=int(usage["prompt_tokens"]),
            output_tokens=int(usage["completion_tokens"]),
            first_token_ms=(first_token_at[0] - started) * 1000 if first_token_at else None,
        )

    def _score_sync(self, messages: tuple[ChatMessage, ...], candidates: tuple[str, ...]) -> Scores:
        prompt = self._prompt_tokens(messages)
        continuations = [[*self._tokens(c), self._end_of_turn] for c in candidates]
        self._check_fits(len(prompt), max(len(c) for c in continuations))
        llama = self._llama
        # Evaluate the shared prompt once; its last logits predict every candidate's first token.
        llama.reset()
        llama.eval(prompt)
        n_vocab = llama.n_vocab()
        first = _log_softmax(np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(n_vocab,)))
        logprobs: list[float] = []
        scored = 0
        for tokens in continuations:
            total = float(first[tokens[0]])
            if len(tokens) > 1:
                # One decode per candidate with logits for every position; llama-cpp-python's
                # public eval() keeps only the last row unless the whole model has logits_all.
                llama._ctx.kv_cache_seq_rm(-1, len(prompt), -1)
                llama._batch.set_batch(batch=tokens[:-1], n_past=len(prompt), logits_all=True)
                llama._ctx.decode(llama._batch)
                rows = np.ctypeslib.as_array(
                    llama._ctx.get_logits(), shape=((len(tokens) - 1) * n_vocab,)
                ).reshape(len(tokens) - 1, n_vocab)
                for row, next_token in zip(rows, tokens[1:], strict=True):
                    total += float(_log_softmax(row)[next_token])
            logprobs.append(total)
            scored += len(tokens)
        llama._ctx.kv_cache_seq_rm(-1, len(prompt), -1)
        return Scores(logprobs=tuple(logprobs), input_tokens=len(prompt), scored_tokens=scored)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - float(np.log(np.exp(shifted).sum()))


_MODEL_PARAMS_LOCK = threading.Lock()


@contextmanager
def _model_params(*, use_extra_bufts: bool) -> Iterator[None]:
    """Load models with llama.cpp's weight repacking ("extra buffer types") on or off.

    `Llama()` does not take the option, so its default model params are adjusted while
    one model loads. Off by default: the repacked layouts use the fastest instructions the
    CPU advertises, and some VMs (Firecracker on Sapphire Rapids, measured here) advertise
    AMX but fault on its tile instructions (SIGILL in `ggml_backend_amx_mul_mat`).
    """
    import llama_cpp.llama_cpp as native

    original = native.llama_model_default_params

    def adjusted() -> Any:
        params = original()
        params.use_extra_bufts = use_extra_bufts
        return params

    with _MODEL_PARAMS_LOCK:
        native.llama_model_default_params = adjusted
        try:
            yield
        finally:
            native.llama_model_default_params = original
