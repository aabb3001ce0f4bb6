"""The production engine: EXL2-quantized models on NVIDIA GPUs via exllamav2.

Importing this package needs neither torch nor a GPU; `load_exllamav2_engine` does.
"""

from consumer.engine.exllamav2.backend import ExLlamaV2Engine, load_exllamav2_engine
from consumer.engine.exllamav2.errors import EngineConfigError
from consumer.engine.exllamav2.settings import ExLlamaV2Settings

__all__ = [
    "EngineConfigError",
    "ExLlamaV2Engine",
    "ExLlamaV2Settings",
    "load_exllamav2_engine",
]
