"""The CPU backend: a GGUF model run by llama.cpp, its running requests batched in each decode."""

from consumer.engine.llamacpp.backend import LlamaCppBackend

__all__ = ["LlamaCppBackend"]
