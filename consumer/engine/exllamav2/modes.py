"""Choose paged (flash-attn) or static (padded, masked) batching from the GPU's facts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.settings.exllamav2 import BatchingSetting

BatchingMode = Literal["paged", "static"]

# exllamav2 enables paged attention (flash_attn_with_kvcache + block tables) from this version.
MIN_PAGED_FLASH_ATTN = (2, 5, 7)
# flash-attn 2 kernels exist for Ampere (sm_80) and newer only; a T4 is sm_75.
MIN_FLASH_ATTN_CAPABILITY = (8, 0)


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """What start-up learned about one CUDA device."""

    index: int
    name: str
    capability: tuple[int, int]
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True, slots=True)
class ModeDecision:
    """The batching mode in use and why it was chosen."""

    mode: BatchingMode
    reason: str


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'2.6.3' -> (2, 6, 3); '2.5.7.post1' -> (2, 5, 7); junk or None -> None."""
    if not text:
        return None
    parts: list[int] = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts) if parts else None


def flash_attn_blocker(
    gpus: Sequence[GpuFacts], flash_attn_version: str | None, flash_attn_problem: str | None = None
) -> str | None:
    """Why paged batching cannot run here, or None if it can.

    `flash_attn_problem` says why an installed flash-attn is unusable anyway, e.g. "fails to
    import (ImportError: ...)" for a wheel built against another torch.
    """
    if not gpus:
        return "no CUDA device"
    if flash_attn_version is not None and flash_attn_problem is not None:
        return f"flash-attn {flash_attn_version} is installed but {flash_attn_problem}"
    version = parse_version(flash_attn_version)
    if version is None:
        return "flash-attn is not installed"
    if version < MIN_PAGED_FLASH_ATTN:
        wanted = ".".join(map(str, MIN_PAGED_FLASH_ATTN))
        return f"flash-attn {flash_attn_version} is older than {wanted} (no paged attention)"
    weakest = min(gpus, key=lambda g: g.capability)
    if weakest.capability < MIN_FLASH_ATTN_CAPABILITY:
        major, minor = weakest.capability
        return f"{weakest.name} is sm_{major}{minor}; flash-attn needs sm_80 or newer"
    return None


def select_batching_mode(
    requested: BatchingSetting,
    gpus: Sequence[GpuFacts],
    flash_attn_version: str | None,
    flash_attn_problem: str | None = None,
) -> ModeDecision:
    """auto: paged where flash-attn runs, else static; a forced mode is honoured or fails."""
    blocker = flash_attn_blocker(gpus, flash_attn_version, flash_attn_problem)
    if requested == "static":
        return ModeDecision("static", "forced by settings (batching_mode=static)")
    if requested == "paged":
        if blocker is not None:
            raise EngineConfigError(
                f"batching_mode=paged cannot run: {blocker}. "
                "Set OPSTREAM_ENGINE__EXLLAMAV2__BATCHING_MODE=static (or auto)."
            )
        return ModeDecision("paged", "forced by settings (batching_mode=paged)")
    if blocker is None:
        return ModeDecision("paged", f"flash-attn {flash_attn_version} usable on every GPU")
    return ModeDecision("static", blocker)
