"""Run exllamav2's EXL2 converter in a subprocess whose attention is causal on every GPU."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

# exllamav2 0.3.2 reads these at import. Its SDPA branch (`_attn_torch`) passes no causal mask
# for plain text (`get_block_diag_mask` is None without packed sequences), so on a GPU without
# flash-attn or xformers, a T4 for one, calibration would run bidirectional attention and the
# quantizer would fit the weights to the wrong activations. Without SDPA the converter takes
# the matmul path, which builds the causal mask (`Params.build_attn_mask`).
CONVERTER_ENV: Mapping[str, str] = {"EXLLAMA_NO_SDPA": "1"}


def converter_command(
    hf_dir: Path,
    work_dir: Path,
    out_dir: Path,
    *,
    bits: float,
    head_bits: int = 6,
    length: int | None = None,
    fresh: bool = False,
) -> list[str]:
    """`python -m exllamav2.conversion.convert_exl2 ...` for one quantization job.

    `length` sets both the calibration and the measurement sample length (default 2048);
    `fresh` discards an interrupted job in `work_dir` instead of resuming it.
    """
    command = [
        sys.executable,
        "-m",
        "exllamav2.conversion.convert_exl2",
        "-i",
        str(hf_dir),
        "-o",
        str(work_dir),
        "-cf",
        str(out_dir),
        "-b",
        str(bits),
        "-hb",
        str(head_bits),
    ]
    if length is not None:
        command += ["-l", str(length), "-ml", str(length)]
    if fresh:
        command.append("-nr")
    return command


def converter_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` (the caller's environment) with attention forced onto a causal path."""
    return {**base, **CONVERTER_ENV}


def run_converter(command: list[str], base_env: Mapping[str, str]) -> None:
    """Run the converter to completion; raises CalledProcessError if it fails."""
    subprocess.run(command, check=True, env=converter_env(base_env))
