"""The engine section: which backend runs the model, its files and the scheduler above it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from consumer.settings.exllamav2 import ExLlamaV2Settings


class LlamaCppSettings(BaseModel):
    """The CPU engine: a GGUF file, given as a path or a Hugging Face repo + file."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path | None = None
    hf_repo: str | None = Field(default=None, description="e.g. Qwen/Qwen2.5-7B-Instruct-GGUF")
    hf_file: str | None = Field(default=None, description="e.g. qwen2.5-7b-instruct-q4_k_m.gguf")
    n_ctx: int = Field(default=4096, ge=256, description="Context window of one sequence.")
    slots: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Sequences decoded together in one batch per step. Unset: 4 per core, 4 to 16.",
    )
    n_threads: int | None = Field(default=None, ge=1, description="Unset: every core.")
    n_batch: int = Field(default=512, ge=8)
    prefill_chunk_tokens: int = Field(
        default=128,
        ge=1,
        description="Prompt tokens one decode step takes at most (chunked prefill): bounds "
        "how long a step, and so every running sequence's next token, can take.",
    )
    seed: int = 0
    repack_weights: bool = Field(
        default=False,
        description="Let llama.cpp repack weights for the CPU's widest instructions (AMX, "
        "AVX-512). Off: some VMs advertise AMX but fault on it (SIGILL).",
    )


class SchedulerSettings(BaseModel):
    """The scheduler above every backend: its queue and how it weighs tenants' tokens."""

    model_config = ConfigDict(extra="forbid")

    max_queued: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Requests waiting for a slot. Unset: 16x the backend's slots, at least 64.",
    )
    output_weight: float = Field(
        default=2.0,
        gt=0,
        le=100,
        description="Fairness: a generated token counts this many prompt tokens.",
    )
    fair_preemption: bool = Field(
        default=True,
        description="When every slot is busy, a tenant below its fair share of the slots "
        "pauses the latest work of the tenant most above it (backends that can resume work: "
        "llama.cpp). Off: newcomers wait for a slot to free.",
    )
    stall_after_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Open work that makes no progress this long is a stall: /health says "
        "degraded and opstream_scheduler_stalls counts it.",
    )


class EngineSettings(BaseModel):
    """Which backend runs the model."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "llamacpp", "exllamav2"] = Field(
        default="auto", description="auto: exllamav2 when CUDA is usable, else llamacpp."
    )
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)
    exllamav2: ExLlamaV2Settings = Field(default_factory=ExLlamaV2Settings)
