"""Model engines behind one interface: llama.cpp on the CPU, exllamav2 on NVIDIA GPUs."""

from consumer.engine.base import (
    BatchObserver,
    ChatMessage,
    Engine,
    EngineError,
    EngineInfo,
    Generation,
    GenerationRequest,
    Scores,
)

__all__ = [
    "BatchObserver",
    "ChatMessage",
    "Engine",
    "EngineError",
    "EngineInfo",
    "Generation",
    "GenerationRequest",
    "Scores",
]
