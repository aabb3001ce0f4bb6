"""Loading the model onto the GPU: config, weights, caches, tokenizer and paged generator."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consumer.engine.chat_template import end_of_turn_token
from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.limits import static_max_attention_size
from consumer.engine.exllamav2.startup import Startup
from consumer.engine.exllamav2.vram import MIB, ModelShape

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What was loaded; the model and caches are used only from the scheduler's thread."""

    model: Any
    tokenizer: Any
    gen_cache: Any
    score_cache: Any
    generator: Any | None
    stop_ids: frozenset[int]
    end_of_turn_id: int
    pad_id: int
    exllamav2_version: str
    # The event loop encodes while the scheduler's thread decodes; exllamav2's tokenizer
    # builds lookup tables lazily, so both sides take this lock.
    tokenizer_lock: threading.Lock
    # Ids the tokenizer can produce; the model's head may be wider (Qwen2.5: 151,665 of 152,064).
    vocab_size: int | None = None


def _cache_class(mode: str) -> Any:
    import exllamav2

    return {
        "fp16": exllamav2.ExLlamaV2Cache,
        "q8": exllamav2.ExLlamaV2Cache_Q8,
        "q6": exllamav2.ExLlamaV2Cache_Q6,
        "q4": exllamav2.ExLlamaV2Cache_Q4,
    }[mode]


def load_runtime(start: Startup) -> Runtime:
    """Load model, caches, tokenizer (and the paged generator) on the calling thread."""
    settings = start.settings
    static = start.decision.mode == "static"
    if static and "exllamav2" not in sys.modules:
        # On sm_75 an installed flash-attn imports fine but fails at run time, and a broken
        # build fails exllamav2's own import; exllamav2 reads this once, at import.
        # config.no_flash_attn below covers an earlier import.
        os.environ["EXLLAMA_NO_FLASH_ATTN"] = "1"

    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2 import __version__ as exl2_version

    assert settings.model_dir is not None
    config = ExLlamaV2Config(str(settings.model_dir))
    config.max_seq_len = settings.max_seq_len
    config.max_dq_size = settings.max_dq_elements
    shape = ModelShape.from_config(json.loads((settings.model_dir / "config.json").read_text()))
    if static:
        batch = settings.max_batch_size
        config.max_batch_size = batch
        config.max_input_len = max(settings.prefill_chunk_tokens // batch, 16)
        # Masked batches need torch attention: flash-attn and xformers only take unmasked
        # (causal) batches, and 0.3.2's SDPA branch drops the mask (bidirectional attention).
        # With no_sdpa, exllamav2 falls back to its matmul attention, which applies causal +
        # padding masks; static_attention=sdpa replaces that with SDPA over grouped KV heads.
        config.no_flash_attn = True
        config.no_xformers = True
        config.no_sdpa = True
        config.max_attention_size = static_max_attention_size(
            settings.attention_budget_mb * MIB, batch, shape.num_heads
        )
        if settings.static_attention == "sdpa":
            from consumer.engine.exllamav2.attention import use_grouped_attention

            use_grouped_attention(config)
    else:
        from exllamav2.attn import has_flash_attn_with_paged

        if not has_flash_attn_with_paged:
            raise EngineConfigError(
                "flash-attn is installed but exllamav2 cannot use its paged kernels "
                "(import failed or too old); set batching_mode=static"
            )
        config.max_batch_size = 1
        config.max_input_len = settings.prefill_chunk_tokens
    config.arch_compat_overrides(quiet=True)

    model = ExLlamaV2(config)
    cache_cls = _cache_class(settings.cache_mode)
    rows, length = (
        (settings.max_batch_size, settings.max_seq_len)
        if static
        else (1, settings.paged_cache_tokens)
    )
    progress = settings.progress_bar
    callback = None if progress else _log_progress
    if settings.gpu_split is None:
        gen_cache = cache_cls(model, batch_size=rows, max_seq_len=length, lazy=True)
        model.load_autosplit(
            gen_cache,
            reserve_vram=settings.vram_reserve_mb * MIB,
            progress=progress,
            callback=callback,
        )
    else:
        model.load(settings.gpu_split, progress=progress, callback=callback)
        gen_cache = cache_cls(model, batch_size=rows, max_seq_len=length)
    score_cache = cache_cls(
        model, batch_size=settings.score_batch_size, max_seq_len=settings.score_max_seq_len
    )
    tokenizer = ExLlamaV2Tokenizer(config)

    eos = tokenizer.eos_token_id
    stop = {eos} if isinstance(eos, int) else set()
    generation_config = getattr(config, "generation_config", None) or {}
    stop.update(t for t in (generation_config.get("eos_token_id") or []) if isinstance(t, int))
    eot_id = end_of_turn_token(start.template, _single_id(tokenizer), fallback=eos)
    stop.add(eot_id)
    pad = tokenizer.pad_token_id
    pad_id = pad if isinstance(pad, int) and pad >= 0 else eot_id

    generator = None
    if not static:
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        generator = ExLlamaV2DynamicGenerator(
            model=model,
            cache=gen_cache,
            tokenizer=tokenizer,
            max_batch_size=settings.max_batch_size,
            max_seq_len=settings.max_seq_len,
            max_chunk_size=settings.prefill_chunk_tokens,
            paged=True,
        )
    return Runtime(
        model=model,
        tokenizer=tokenizer,
        gen_cache=gen_cache,
        score_cache=score_cache,
        generator=generator,
        stop_ids=frozenset(stop),
        end_of_turn_id=eot_id,
        pad_id=pad_id,
        exllamav2_version=str(exl2_version),
        tokenizer_lock=threading.Lock(),
        vocab_size=int(tokenizer.get_vocab_size()),
    )


def _single_id(tokenizer: Any) -> Callable[[str], int | None]:
    """exllamav2's `single_id`, None for text that is not one token of the vocabulary."""

    def single_id(text: str) -> int | None:
        found = tokenizer.single_id(text)
        return found if isinstance(found, int) else None

    return single_id


def _log_progress(done: int, total: int) -> None:
    if total and (done == total or done % max(total // 4, 1) == 0):
        log.info("exl2_load_progress", extra={"done": done, "total": total})
