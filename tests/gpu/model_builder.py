"""Build random Qwen2 checkpoints with a ChatML tokenizer and quantize them to EXL2.

Used by the GPU tests (a tiny model) and the benchmark (a Qwen2.5-7B-shaped one). Needs
torch (CUDA for the converter), transformers, tokenizers and exllamav2; nothing is downloaded:
the tokenizer is trained on the calibration text that ships inside exllamav2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
    """Model dimensions; exllamav2's kernels want multiples of 128."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int


TINY = Qwen2Dims(512, 1536, 2, 4, 4, 2048)
QWEN25_7B = Qwen2Dims(3584, 18944, 28, 28, 4, 152064)


def _calibration_text() -> list[str]:
    import exllamav2.conversion

    data = Path(exllamav2.conversion.__file__).parent / "standard_cal_data"
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
        vocab_size=min(vocab_size, 8192),
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
    write_tokenizer(out, dims.vocab_size)
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
    """Run exllamav2's converter (needs a CUDA GPU) and return the compiled model folder."""
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
        "6",
        "-l",
        str(length),
        "-ml",
        str(length),
        "-nr",
    ]
    work_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, check=True)
    if not (out_dir / "config.json").is_file():
        raise RuntimeError(f"converter produced no model in {out_dir}")
    return out_dir
