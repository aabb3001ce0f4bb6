"""The start-up plan: checks that fail cheaply (model folder, GPU, mode, VRAM) before loading."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from consumer.engine.chat_template import ChatTemplate, load_chat_template
from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.limits import check_plan
from consumer.engine.exllamav2.modes import GpuFacts, ModeDecision, select_batching_mode
from consumer.engine.exllamav2.probes import FlashAttnProbe, probe_flash_attn, probe_gpus
from consumer.engine.exllamav2.vram import (
    GIB,
    MIB,
    ModelShape,
    VramEstimate,
    VramPlan,
    check_fits,
    weights_bytes_on_gpu,
)
from consumer.settings.exllamav2 import ExLlamaV2Settings

log = logging.getLogger(__name__)


def read_model_dir(model_dir: Path) -> tuple[ModelShape, int]:
    """The model's shape and the bytes of its weights that go to the GPU."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EngineConfigError(f"{config_path} not found: model_dir must be an EXL2 model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    shape = ModelShape.from_config(config)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EngineConfigError(f"no *.safetensors in {model_dir}")
    return shape, weights_bytes_on_gpu(sum(f.stat().st_size for f in files), shape)


def build_vram_plan(
    settings: ExLlamaV2Settings, shape: ModelShape, weights: int, decision: ModeDecision
) -> VramPlan:
    return VramPlan(
        shape=shape,
        weights_bytes=weights,
        mode=decision.mode,
        cache_mode=settings.cache_mode,
        max_seq_len=settings.max_seq_len,
        max_batch_size=settings.max_batch_size,
        paged_cache_tokens=settings.paged_cache_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        score_batch_size=settings.score_batch_size,
        score_max_seq_len=settings.score_max_seq_len,
        attention_budget_bytes=settings.attention_budget_mb * MIB,
        max_dq_elements=settings.max_dq_elements,
        static_attention=settings.static_attention,
    )


@dataclass
class Startup:
    settings: ExLlamaV2Settings
    decision: ModeDecision
    template: ChatTemplate
    gpus: list[GpuFacts]
    estimate: VramEstimate
    flash_attn: FlashAttnProbe = FlashAttnProbe(None)  # noqa: RUF009 (frozen: safe to share)


def prepare_startup(settings: ExLlamaV2Settings) -> Startup:
    """Everything that can fail cheaply, before any weights are read: GPU, mode, template,
    settings exllamav2 would crash or hang on, VRAM."""
    if settings.model_dir is None:
        raise EngineConfigError(
            "exllamav2.model_dir is not set (OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR)"
        )
    if not settings.model_dir.is_dir():
        raise EngineConfigError(f"exllamav2.model_dir {settings.model_dir} is not a directory")
    template = load_chat_template(settings.model_dir)
    shape, weights = read_model_dir(settings.model_dir)
    gpus = probe_gpus()
    flash_attn = probe_flash_attn()
    decision = select_batching_mode(
        settings.batching_mode, gpus, flash_attn.version, flash_attn.problem
    )
    plan = build_vram_plan(settings, shape, weights, decision)
    check_plan(plan)
    reserve = settings.vram_reserve_mb * MIB
    if settings.gpu_split is None:
        available = sum(max(g.free_bytes - reserve, 0) for g in gpus)
    else:
        used = gpus[: len(settings.gpu_split)]
        available = sum(max(g.free_bytes - reserve, 0) for g in used)
    names = ", ".join(f"{g.name} ({g.free_bytes / GIB:.1f} GiB free)" for g in gpus)
    estimate = check_fits(plan, available, device_names=names)
    log.info(
        "exl2_startup",
        extra={
            "mode": decision.mode,
            "reason": decision.reason,
            "estimate_gib": round(estimate.total / GIB, 2),
            "available_gib": round(available / GIB, 2),
        },
    )
    return Startup(
        settings=settings,
        decision=decision,
        template=template,
        gpus=gpus,
        estimate=estimate,
        flash_attn=flash_attn,
    )
