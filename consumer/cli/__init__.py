"""The `opstream` command line (argparse): `main.py` builds it; one module per subcommand.

Names are imported from their modules on first use (PEP 562), so importing the package
stays cheap.
"""

from __future__ import annotations

from consumer.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "build_parser": "consumer.cli.main",
    "main": "consumer.cli.main",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
