"""Probes of this machine: the visible CUDA GPUs, and whether exllamav2 can use flash-attn."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass

from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.modes import GpuFacts

log = logging.getLogger(__name__)


def flash_attn_version() -> str | None:
    """The installed flash-attn version, read from package metadata without importing it."""
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class FlashAttnProbe:
    """flash-attn as exllamav2 will see it: the installed version, and why it is unusable."""

    version: str | None
    problem: str | None = None


def probe_flash_attn() -> FlashAttnProbe:
    """Import flash-attn the way exllamav2 0.3.2 does, without letting a broken build crash us.

    exllamav2's `attn.py` imports `flash_attn` and `flash_attn_2_cuda` at import time and only
    catches ModuleNotFoundError; a wheel built for another torch raises ImportError ("undefined
    symbol") and takes `import exllamav2` down with it. Trying it here first lets start-up fall
    back to static batching (with EXLLAMA_NO_FLASH_ATTN set) and say why.
    """
    version = flash_attn_version()
    if version is None:
        return FlashAttnProbe(None)
    if "EXLLAMA_NO_FLASH_ATTN" in os.environ:
        return FlashAttnProbe(version, "EXLLAMA_NO_FLASH_ATTN is set")
    try:
        import flash_attn  # noqa: F401
        import flash_attn_2_cuda  # noqa: F401
    except Exception as exc:  # any failure means the same thing: exllamav2 cannot use it
        first_line = (str(exc).splitlines() or [""])[0][:300]
        log.warning(
            "exl2_flash_attn_unusable", extra={"version": version, "error": type(exc).__name__}
        )
        return FlashAttnProbe(version, f"fails to import ({type(exc).__name__}: {first_line})")
    return FlashAttnProbe(version)


def probe_gpus() -> list[GpuFacts]:
    """Every visible CUDA device, or an error saying there is none."""
    import torch

    if not torch.cuda.is_available():
        raise EngineConfigError(
            "exllamav2 needs an NVIDIA GPU with a CUDA build of torch; none is visible "
            f"(torch {torch.__version__}). Use the llamacpp engine on this machine."
        )
    facts = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        facts.append(
            GpuFacts(
                index=index,
                name=str(props.name),
                capability=(int(props.major), int(props.minor)),
                total_bytes=int(total),
                free_bytes=int(free),
            )
        )
    return facts
