"""The GPU tests' tiny EXL2 model: a 2-layer random Qwen2, quantized to ~4.5 bpw.

Built by `tests/gpu/conftest.py` and by `ops/gpu/check.sh`:

    python -m tests.gpu.model_builder OUT_DIR     # the model lands in OUT_DIR/exl2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tests.support.random_qwen2 import Qwen2Dims, quantize_exl2, write_random_qwen2

# Grouped KV heads (4 query heads per KV head, head_dim 128) as in Qwen2.5-7B, at the smallest
# dimensions exllamav2's kernels take (multiples of 128).
TINY = Qwen2Dims(1024, 2048, 2, 8, 2, 2048, tokenizer_size=1920)


def build_tiny_exl2(root: Path) -> Path:
    """TINY quantized to ~4.5 bpw, built under `root`."""
    hf = write_random_qwen2(root / "hf", TINY)
    return quantize_exl2(hf, root / "exl2", root / "work", bits=4.5, length=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to build in; the model lands in ROOT/exl2")
    args = parser.parse_args()
    print(build_tiny_exl2(args.root))


if __name__ == "__main__":
    main()
