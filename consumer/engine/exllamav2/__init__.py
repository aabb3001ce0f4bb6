"""The production engine: EXL2-quantized models on NVIDIA GPUs via exllamav2.

Importing this package needs neither torch nor a GPU; `load_exllamav2_engine` does. The
engine module is imported on first use, so reading the settings does not load the engine code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.settings.exllamav2 import ExLlamaV2Settings

if TYPE_CHECKING:
    from consumer.engine.exllamav2.engine import load_exllamav2_engine

__all__ = [
    "EngineConfigError",
    "ExLlamaV2Settings",
    "load_exllamav2_engine",
]


def __getattr__(name: str) -> Any:
    if name == "load_exllamav2_engine":
        from consumer.engine.exllamav2 import engine

        return getattr(engine, name)
    raise AttributeError(name)
