"""The operations of the contract, one module each, found by name (`operation_of`).

Names are imported from their modules on first use (PEP 562), so importing the package
stays cheap.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "OPERATIONS_BY_NAME": "consumer.operations.registry",
    "AnyRequest": "consumer.operations.base",
    "Operation": "consumer.operations.base",
    "Prompt": "consumer.operations.base",
    "Result": "consumer.operations.base",
    "Served": "consumer.operations.base",
    "operation_of": "consumer.operations.registry",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
