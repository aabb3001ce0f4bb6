"""llama-cpp-python's own `Llama`, loaded the way these machines need (for baselines)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def repacking_off() -> Iterator[None]:
    """Models loaded inside get llama.cpp's weight repacking off, as the consumer loads them:
    repacked layouts use the widest instructions the CPU advertises, and VMs that advertise
    AMX but fault on it die with SIGILL."""
    import llama_cpp.llama_cpp as native

    original = native.llama_model_default_params

    def adjusted() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = adjusted
    try:
        yield
    finally:
        native.llama_model_default_params = original
