"""Random Qwen2 checkpoints with a ChatML tokenizer, quantized to EXL2 (no download).

Shared by the GPU tests' tiny model (`tests/gpu/model_builder.py`), the GPU benchmark (a
Qwen2.5-7B-shaped one) and the unit tests of model preparation. Needs torch (CUDA for the
converter), transformers, tokenizers and exllamav2, each imported where used; the tokenizer
is trained on the calibration text that ships inside exllamav2.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from consumer.engine.exllamav2.convert import converter_command, run_converter

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2.5's ChatML template, as in its tokenizer_config.json (tool branches left out).
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Qwen2Dims:
    """Model dimensions; exllamav2's kernels want multiples of 128.

    `tokenizer_size` is the tokenizer's vocabulary, smaller than the head's `vocab_size` rows
    as in Qwen2.5 (151,665 tokens, 152,064 rows), so the untrained rows exist to be masked.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tokenizer_size: int = 8192


# Grouped KV heads (4 query heads per KV head, head_dim 128), as in Qwen2.5-7B (28/4).
QWEN25_7B = Qwen2Dims(3584, 18944, 28, 28, 4, 152064)


def calibration_dir(package: str = "exllamav2") -> Path:
    """exllamav2's bundled calibration text, found without importing exllamav2.

    In 0.3.2 `exllamav2/conversion/` has no `__init__.py`: it is a namespace package whose
    `__file__` is None. The top-level package's spec locates it without running its
    `__init__` (which would build the CUDA extension).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed")
    for location in spec.submodule_search_locations:
        data = Path(location) / "conversion" / "standard_cal_data"
        if data.is_dir():
            return data
    raise RuntimeError(f"{package} ships no conversion/standard_cal_data")


def _calibration_text() -> list[str]:
    data = calibration_dir()
    lines: list[str] = []
    for name in sorted(data.glob("*.utf8")):
        lines.extend(name.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line.strip()]


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer with the ChatML control tokens; write its configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_calibration_text(), trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "chat_template": CHATML_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "normalized": False} for t, i in ids.items()
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    (out / "generation_config.json").write_text(json.dumps(generation))


def write_random_qwen2(out: Path, dims: Qwen2Dims, *, seed: int = 0) -> Path:
    """A randomly initialised Qwen2ForCausalLM in FP16 safetensors, plus its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, min(dims.tokenizer_size, dims.vocab_size))
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    config = Qwen2Config(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=eos[1],
        eos_token_id=eos[0],
        torch_dtype="float16",
    )
    torch.manual_seed(seed)
    # FP16 from the start: a 7B-shaped model in FP32 would need 30 GB of RAM to initialise.
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained may rewrite generation_config.json; keep both stop ids.
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return out


def quantize_exl2(
    hf_dir: Path, out_dir: Path, work_dir: Path, *, bits: float, length: int = 2048
) -> Path:
    """Run exllamav2's converter (needs a CUDA GPU) and return the compiled model folder.

    The converter runs with SDPA off (`consumer.engine.exllamav2.convert`), so calibration
    attention is causal on GPUs without flash-attn too.
    """
    command = converter_command(
        hf_dir, work_dir, out_dir, bits=bits, head_bits=6, length=length, fresh=True
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    run_converter(command, os.environ)
    if not (out_dir / "config.json").is_file():
        raise RuntimeError(f"converter produced no model in {out_dir}")
    return out_dir
