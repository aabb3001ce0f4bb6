"""The GPU engine's settings (`Settings.engine.exllamav2`): model, cache, batching and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CacheMode = Literal["fp16", "q8", "q6", "q4"]
BatchingSetting = Literal["auto", "paged", "static"]
StaticAttention = Literal["sdpa", "matmul"]

# exllamav2's paged cache is allocated in pages of this many tokens.
PAGE_TOKENS = 256
DEFAULT_PREFILL_CHUNK_TOKENS = 2048
DEFAULT_SCORE_MAX_SEQ_LEN = 4096


class ExLlamaV2Settings(BaseModel):
    """How to load an EXL2 model and batch requests on the GPU.

    Env: the app nests this model, so each field is OPSTREAM_<path>__EXLLAMAV2__<FIELD>,
    e.g. OPSTREAM_ENGINE__EXLLAMAV2__MAX_BATCH_SIZE=8 when nested under `engine`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_dir: Path | None = Field(
        default=None, description="EXL2 model directory (config.json, *.safetensors, tokenizer)"
    )
    model_name: str | None = Field(
        default=None, description="Name reported in replies and health; default: the folder name"
    )
    max_seq_len: int = Field(
        default=16384, ge=256, description="Longest prompt + completion of one request, in tokens"
    )
    cache_mode: CacheMode = Field(default="q4", description="KV cache precision")
    batching_mode: BatchingSetting = Field(
        default="auto",
        description="auto: paged when flash-attn runs on this GPU (sm_80+), else static",
    )
    max_batch_size: int = Field(
        default=8, ge=1, le=256, description="Sequences decoded together in one forward pass"
    )
    cache_tokens: int | None = Field(
        default=None,
        ge=PAGE_TOKENS,
        description="Paged mode: KV cache pool in tokens (default max_seq_len * max_batch_size)",
    )
    prefill_chunk_tokens: int = Field(
        default=DEFAULT_PREFILL_CHUNK_TOKENS,
        ge=PAGE_TOKENS,
        description="Tokens per forward pass while ingesting prompts (sizes scratch buffers); "
        "at most max_seq_len (unset: 2048, or max_seq_len's whole pages if that is less)",
    )
    score_batch_size: int = Field(
        default=8, ge=1, le=64, description="Candidate labels scored per forward pass"
    )
    score_max_seq_len: int = Field(
        default=DEFAULT_SCORE_MAX_SEQ_LEN,
        ge=256,
        description="Longest classify prompt + label, in tokens; at most max_seq_len "
        "(unset: 4096, or max_seq_len if that is less)",
    )
    attention_budget_mb: int = Field(
        default=1024,
        ge=64,
        description="Static mode: working memory for masked attention (bounds prefill chunks)",
    )
    static_attention: StaticAttention = Field(
        default="sdpa",
        description="Static mode: sdpa = torch SDPA over grouped KV heads (no K/V copies); "
        "matmul = exllamav2 0.3.2's own masked attention (repeats K/V for every query head)",
    )
    max_dq_elements: int = Field(
        default=512 * 1024**2,
        ge=16 * 1024**2,
        description="exllamav2 max_dq_size: weights dequantized at once for long inputs",
    )
    gpu_split: list[float] | None = Field(
        default=None, description="GiB of weights per GPU; None = autosplit across visible GPUs"
    )
    vram_reserve_mb: int = Field(
        default=512, ge=0, description="VRAM kept free per GPU beyond the estimate"
    )
    progress_bar: bool = Field(default=True, description="Show a progress bar while loading")

    @model_validator(mode="before")
    @classmethod
    def _defaults_follow_max_seq_len(cls, data: Any) -> Any:
        """Unset lengths shrink with a short max_seq_len; values given explicitly are checked."""
        if not isinstance(data, dict) or "max_seq_len" not in data:
            return data
        try:
            max_seq_len = int(data["max_seq_len"])
        except (TypeError, ValueError):
            return data  # field validation reports it
        data = dict(data)
        if "score_max_seq_len" not in data:
            data["score_max_seq_len"] = min(DEFAULT_SCORE_MAX_SEQ_LEN, max_seq_len)
        if "prefill_chunk_tokens" not in data:
            whole_pages = max(max_seq_len // PAGE_TOKENS, 1) * PAGE_TOKENS
            data["prefill_chunk_tokens"] = min(DEFAULT_PREFILL_CHUNK_TOKENS, whole_pages)
        return data

    @model_validator(mode="after")
    def _check_sizes(self) -> ExLlamaV2Settings:
        if self.prefill_chunk_tokens % PAGE_TOKENS:
            raise ValueError(f"prefill_chunk_tokens must be a multiple of {PAGE_TOKENS}")
        if self.cache_tokens is not None and self.cache_tokens < self.max_seq_len:
            raise ValueError("cache_tokens must hold at least one max_seq_len sequence")
        # exllamav2 sizes its RoPE tables by max_seq_len and its kernel does not bound-check
        # positions, so a longer scoring cache would read past the table.
        if self.score_max_seq_len > self.max_seq_len:
            raise ValueError(
                f"score_max_seq_len ({self.score_max_seq_len}) must not exceed max_seq_len "
                f"({self.max_seq_len}): lower score_max_seq_len or raise max_seq_len"
            )
        # load_autosplit caps the model's max_input_len at max_seq_len, and the paged
        # generator then asserts max_chunk_size <= max_input_len.
        if self.prefill_chunk_tokens > self.max_seq_len:
            raise ValueError(
                f"prefill_chunk_tokens ({self.prefill_chunk_tokens}) must not exceed "
                f"max_seq_len ({self.max_seq_len}): lower prefill_chunk_tokens"
            )
        return self

    @property
    def paged_cache_tokens(self) -> int:
        """The paged pool size, rounded up to whole pages."""
        tokens = self.cache_tokens or self.max_seq_len * self.max_batch_size
        return -(-tokens // PAGE_TOKENS) * PAGE_TOKENS
