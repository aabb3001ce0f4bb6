"""llama.cpp through its C API (llama-cpp-python's ctypes bindings): a model, and a context
holding several sequences that one `llama_decode` advances together.

`llama_cpp.Llama` is not used: its constructor ignores `n_seq_max` and `kv_unified`, so its
context holds one sequence. Here the context is built directly, with a split KV cache (every
sequence has `n_ctx` cells of its own) and flash attention; with both, a sequence's logits do
not depend on what else is in the batch (measured: batched greedy output equals sequential
output token for token), which a unified cache or flash attention off does not give.

Flash attention on the CPU computes attention at a different precision than the unfused
path `Llama` takes by default: on SmolLM2-135M Q4_1 the same prompt's log-probabilities differ
by up to ~0.4 between the two (neither is the f32 result; the model is that sensitive).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from consumer.engine.base import EngineError

log = logging.getLogger(__name__)


def _native() -> Any:
    import llama_cpp.llama_cpp as native

    # llama.cpp logs through llama-cpp-python's callback; below ERROR it would print every
    # tensor it loads to stderr (what Llama(verbose=False) does too).
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return native


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return cores or os.cpu_count() or 1


def model_params(*, repack_weights: bool) -> Any:
    """llama.cpp's default model params, with weight repacking ("extra buffer types") on or off.

    Off by default: the repacked layouts use the fastest instructions the CPU advertises, and
    some VMs (Firecracker on Sapphire Rapids, measured here) advertise AMX but fault on its tile
    instructions (SIGILL in `ggml_backend_amx_mul_mat`).
    """
    params = _native().llama_model_default_params()
    params.use_extra_bufts = repack_weights
    return params


class Model:
    """A loaded GGUF: weights, vocabulary and metadata.

    Tokenizing and reading token texts only read the vocabulary: safe from any thread while
    another decodes.
    """

    def __init__(self, path: Path, *, repack_weights: bool = False) -> None:
        native = _native()
        native.llama_backend_init()
        handle = native.llama_model_load_from_file(
            str(path).encode("utf-8"), model_params(repack_weights=repack_weights)
        )
        if not handle:
            raise EngineError(f"llama.cpp could not load {path.name}", retryable=False)
        self.handle: Any = handle
        self._vocab: Any = native.llama_model_get_vocab(handle)
        self._native = native
        self.n_vocab: int = native.llama_vocab_n_tokens(self._vocab)
        self.eos: int = native.llama_vocab_eos(self._vocab)
        self.bos: int = native.llama_vocab_bos(self._vocab)

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of `text`, no BOS added; `special` parses special tokens (<|im_end|>)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            tokens = (self._native.llama_token * capacity)()
            count = self._native.llama_tokenize(
                self._vocab, data, len(data), tokens, capacity, False, special
            )
            if count >= 0:
                return list(tokens[:count])
            capacity = -count

    def piece(self, token: int) -> bytes:
        """The bytes `token` stands for in generated text (special tokens render as nothing)."""
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            count = self._native.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
            if count >= 0:
                return buffer.raw[:count]
            size = -count

    def token_text(self, token: int) -> str:
        """A token's text in the vocabulary (special tokens as written: "<|im_end|>")."""
        text = self._native.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._native.llama_vocab_is_eog(self._vocab, token))

    def end_of_generation_tokens(self) -> list[int]:
        """Every token llama.cpp ends a generation at (EOS, EOT and the like; a scan of the
        vocabulary, ~30 ms for 49k tokens)."""
        return [t for t in range(self.n_vocab) if self.is_end_of_generation(t)]

    def single_token(self, text: str) -> int | None:
        """The id of `text` when it is exactly one token (special tokens parsed), else None."""
        tokens = self.tokenize(text, special=True)
        return tokens[0] if len(tokens) == 1 else None

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string (None when absent)."""
        size = 1024
        while True:
            buffer = ctypes.create_string_buffer(size)
            count = self._native.llama_model_meta_val_str(
                self.handle, key.encode("utf-8"), buffer, size
            )
            if count < 0:
                return None
            if count < size:
                return buffer.value.decode("utf-8", "replace")
            size = count + 1

    def close(self) -> None:
        if self.handle:
            self._native.llama_model_free(self.handle)
            self.handle = None


@dataclass(frozen=True, slots=True)
class Token:
    """One token of a batch: which sequence, at which position, and whether its logits are read."""

    token: int
    pos: int
    seq: int
    logits: bool


class Context:
    """A llama.cpp context of `n_seq` sequences, each with `n_ctx` KV cells of its own.

    Not thread-safe: one thread (the scheduler's) decodes, reads logits and frees sequences.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
        n_threads: int | None,
        flash_attn: bool = True,
    ) -> None:
        native = _native()
        params = native.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_seq_max = n_seq
        params.kv_unified = False  # split: each sequence gets n_ctx / n_seq_max cells
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        # Every core for one token as for a batch (llama-cpp-python's `Llama` uses half the
        # cores for one token: measured here, 2 threads decode one sequence ~1.35x faster);
        # `set_threads` changes it between decodes (see `threads.ThreadTuner`).
        params.n_threads = n_threads or usable_cores()
        params.n_threads_batch = params.n_threads
        params.flash_attn_type = (
            native.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else native.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        handle = native.llama_init_from_model(model.handle, params)
        if not handle:
            raise EngineError("llama.cpp could not create a context", retryable=False)
        self._native = native
        self.handle: Any = handle
        self.n_vocab = model.n_vocab
        self.n_seq: int = native.llama_n_seq_max(handle)
        self.n_ctx_seq: int = native.llama_n_ctx_seq(handle)
        self.flash_attn = flash_attn
        self.threads: int = params.n_threads
        self.capacity = n_batch
        self._memory: Any = native.llama_get_memory(handle)
        self._batch: Any = native.llama_batch_init(n_batch, 0, 1)
        self._has_batch = True
        if self.n_seq < n_seq or self.n_ctx_seq < n_ctx:
            self.close()
            raise EngineError(
                f"llama.cpp made a context of {self.n_seq} sequences of {self.n_ctx_seq} tokens, "
                f"not {n_seq} of {n_ctx}",
                retryable=False,
            )

    def decode(self, tokens: Sequence[Token]) -> None:
        """Run one `llama_decode` over `tokens`; EngineError (retryable) if it fails."""
        if not 0 < len(tokens) <= self.capacity:
            raise ValueError(f"a batch holds 1 to {self.capacity} tokens, not {len(tokens)}")
        batch = self._batch
        for i, entry in enumerate(tokens):
            batch.token[i] = entry.token
            batch.pos[i] = entry.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = entry.seq
            batch.logits[i] = entry.logits
        batch.n_tokens = len(tokens)
        status = self._native.llama_decode(self.handle, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}", retryable=True)

    def set_threads(self, threads: int) -> None:
        """Decode with `threads` threads from the next `decode` on (prompt and generation)."""
        if threads != self.threads:
            self._native.llama_set_n_threads(self.handle, threads, threads)
            self.threads = threads

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        """The logits of the `index`-th token of the last batch (a view: read it before the
        next decode)."""
        row = self._native.llama_get_logits_ith(self.handle, index)
        if not row:
            raise EngineError(f"llama.cpp has no logits for batch token {index}", retryable=True)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,))

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop sequence `seq`'s cells from position `start` on (all of them by default)."""
        self._native.llama_memory_seq_rm(self._memory, seq, start if start > 0 else -1, -1)

    def close(self) -> None:
        if self._has_batch:
            self._native.llama_batch_free(self._batch)
            self._has_batch = False
        if self.handle:
            self._native.llama_free(self.handle)
            self.handle = None
