"""Get an EXL2 Qwen2.5-7B-Instruct for the exllamav2 engine: download a ready quant or make one.

    # Download a published quant (needs internet; huggingface_hub is a core dependency):
    python ops/models/prepare_exl2.py download --out /models/qwen2.5-7b-instruct-exl2-4.5bpw

    # Quantize from the original HF weights with exllamav2's converter (needs a CUDA GPU,
    # the `gpu` extra, ~16 GB of RAM and about 20-60 minutes for a 7B model):
    python ops/models/prepare_exl2.py quantize --bits 4.5 \\
        --hf Qwen/Qwen2.5-7B-Instruct --out /models/qwen2.5-7b-instruct-exl2-4.5bpw

Then point the engine at it: OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR=/models/... (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from consumer.engine.exllamav2.convert import converter_command, run_converter

DEFAULT_REPO = "turboderp/Qwen2.5-7B-Instruct-exl2"
DEFAULT_REVISION = "4.5bpw"  # turboderp publishes one branch per bitrate
BASE_MODEL = "Qwen/Qwen2.5-7B-Instruct"
REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json")


def check_model_dir(path: Path) -> None:
    """Fail loudly unless `path` holds what the engine loads."""
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if not list(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise SystemExit(f"{path} is not a usable EXL2 model: missing {', '.join(missing)}")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not config.get("chat_template") and not (path / "chat_template.jinja").is_file():
        raise SystemExit(f"{path}: tokenizer_config.json has no chat_template")
    quant = json.loads((path / "config.json").read_text(encoding="utf-8")).get(
        "quantization_config", {}
    )
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1024**3
    print(f"ok: {path} ({size:.2f} GiB of safetensors, quantization_config={quant or 'n/a'})")


def download(repo: str, revision: str, out: Path, token: str | None) -> None:
    from huggingface_hub import list_repo_refs, snapshot_download
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        snapshot_download(
            repo_id=repo,
            revision=revision,
            local_dir=out,
            token=token,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"],
        )
    except RevisionNotFoundError:
        branches = sorted(ref.name for ref in list_repo_refs(repo, token=token).branches)
        raise SystemExit(
            f"{repo} has no revision {revision!r}; branches: {', '.join(branches)}"
        ) from None
    check_model_dir(out)


def quantize(
    hf: str, bits: float, head_bits: int, out: Path, work: Path, token: str | None
) -> None:
    source = Path(hf)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(
            snapshot_download(
                repo_id=hf,
                token=token,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"],
            )
        )
    work.mkdir(parents=True, exist_ok=True)
    command = converter_command(source, work, out, bits=bits, head_bits=head_bits)
    # The converter runs with EXLLAMA_NO_SDPA=1: exllamav2 0.3.2's SDPA path would calibrate
    # with bidirectional attention on GPUs without flash-attn (a T4).
    print("running: EXLLAMA_NO_SDPA=1", " ".join(command))
    run_converter(command, os.environ)
    # The converter copies config and tokenizer files; keep the chat template file if the
    # source ships it separately (newer HF repos do).
    jinja = source / "chat_template.jinja"
    if jinja.is_file() and not (out / jinja.name).exists():
        shutil.copy2(jinja, out / jinja.name)
    check_model_dir(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token", help="Hugging Face token (or set HF_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True)

    get = commands.add_parser("download", help="download a ready EXL2 quant")
    get.add_argument("--repo", default=DEFAULT_REPO)
    get.add_argument("--revision", default=DEFAULT_REVISION, help="branch, e.g. 4.5bpw")
    get.add_argument("--out", type=Path, required=True)

    make = commands.add_parser("quantize", help="quantize HF weights with exllamav2 (GPU)")
    make.add_argument("--hf", default=BASE_MODEL, help="HF repo id or local folder")
    make.add_argument("--bits", type=float, default=4.5, help="target bits per weight")
    make.add_argument("--head-bits", type=int, default=6, help="bits for the LM head")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--work", type=Path, help="converter scratch folder (resumable)")

    check = commands.add_parser("check", help="check that a folder is loadable")
    check.add_argument("path", type=Path)

    args = parser.parse_args()
    if args.command == "download":
        download(args.repo, args.revision, args.out, args.token)
    elif args.command == "quantize":
        work = args.work or args.out.with_name(args.out.name + ".work")
        quantize(args.hf, args.bits, args.head_bits, args.out, work, args.token)
    else:
        check_model_dir(args.path)


if __name__ == "__main__":
    main()
