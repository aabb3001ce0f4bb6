"""Benchmark the exllamav2 engine's batching modes on this GPU (prints numbers; not a test).

    python tests/bench/bench_exl2_gpu.py                     # build + quantize a random
                                                             # Qwen2.5-7B-shaped model (slow)
    python tests/bench/bench_exl2_gpu.py --layers 4          # same shape, fewer layers
    python tests/bench/bench_exl2_gpu.py --model-dir DIR     # an existing EXL2 folder
    python tests/bench/bench_exl2_gpu.py --model-dir DIR --json OUT.json

Prints decode tokens/s at batch 1 and 8 in each usable mode (paged needs flash-attn on
sm_80+; static always runs), prompt tokens/s, decode as a fraction of the memory-bandwidth
bound that `vram.decode_step_bytes` predicts (weights plus attention traffic per step), and
the peak VRAM torch reserved against the engine's estimate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import bench_parser  # first: puts the repository on sys.path

from consumer.engine.exllamav2.loader import load_runtime
from consumer.engine.exllamav2.modes import flash_attn_blocker
from consumer.engine.exllamav2.probes import probe_flash_attn, probe_gpus
from consumer.engine.exllamav2.startup import (
    build_vram_plan,
    prepare_startup,
    read_model_dir,
)
from consumer.engine.exllamav2.vram import GIB, decode_step_bytes
from consumer.settings.exllamav2 import ExLlamaV2Settings

# Peak DRAM bandwidth, GB/s, from the vendors' spec sheets.
BANDWIDTH_GBS = {
    "T4": 320,
    "L4": 300,
    "A10": 600,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE-40GB": 1555,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "H100 PCIe": 2000,
    "H100 80GB HBM3": 3350,
    "H200": 4800,
    "RTX 4090": 1008,
    "RTX 3090": 936,
}


def bandwidth_for(name: str, override: float | None) -> float | None:
    if override:
        return override
    matches = [(len(k), v) for k, v in BANDWIDTH_GBS.items() if k in name]
    return max(matches)[1] if matches else None


def build_model(args: argparse.Namespace) -> Path:
    from dataclasses import replace

    from tests.support.random_qwen2 import QWEN25_7B, quantize_exl2, write_random_qwen2

    root = Path(args.work_dir or tempfile.mkdtemp(prefix="exl2-bench-"))
    dims = replace(QWEN25_7B, num_layers=args.layers)
    print(f"building random Qwen2.5-7B-shaped model ({dims.num_layers} layers) in {root}")
    hf = write_random_qwen2(root / "hf", dims)
    print(f"quantizing to {args.bits} bpw (exllamav2 converter)")
    return quantize_exl2(hf, root / "exl2", root / "work", bits=args.bits, length=2048)


def synchronize() -> None:
    import torch

    torch.cuda.synchronize()


def bench_static(runtime: Any, batch: int, prompt_len: int, new_tokens: int) -> float:
    from consumer.engine.base import ChatMessage, GenerationRequest
    from consumer.engine.exllamav2.runner import GenTicket, StaticBatch

    request = GenerationRequest(messages=(ChatMessage("user", "x"),), max_tokens=new_tokens)
    tickets = [GenTicket(ids=[100 + i] * prompt_len, request=request) for i in range(batch)]
    run = StaticBatch(
        runtime.model,
        runtime.gen_cache,
        tickets,
        pad_id=runtime.pad_id,
        stop_ids=frozenset(),  # a random model emits EOS at random; measure full length
        decode=lambda ids: "",
        vocab_size=runtime.vocab_size,
    )
    run.prefill()
    run.step()  # first step outside the timing (kernel autotune, graph capture)
    synchronize()
    started = time.perf_counter()
    steps = 0
    while not run.finished:
        run.step()
        steps += 1
    synchronize()
    return batch * steps / (time.perf_counter() - started)


def bench_paged(runtime: Any, batch: int, prompt_len: int, new_tokens: int) -> float:
    import torch
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    generator = runtime.generator
    jobs = [
        ExLlamaV2DynamicJob(
            input_ids=torch.full((1, prompt_len), 100 + i, dtype=torch.long),
            max_new_tokens=new_tokens,
            gen_settings=ExLlamaV2Sampler.Settings.greedy(),
            stop_conditions=[],
        )
        for i in range(batch)
    ]
    generator.enqueue(jobs)
    while any(not j.is_prefill_done() for j in jobs):  # prefill outside the timing
        generator.iterate()
    synchronize()
    started = time.perf_counter()
    produced = 0
    while generator.num_remaining_jobs():
        for result in generator.iterate():
            ids = result.get("token_ids")
            produced += 0 if ids is None else int(ids.shape[-1])
    synchronize()
    return produced / (time.perf_counter() - started)


def bench_prompt(runtime: Any, prompt_len: int) -> float:
    import torch

    cache = runtime.score_cache if runtime.generator is not None else runtime.gen_cache
    prompt_len = min(prompt_len, cache.max_seq_len - 1)
    ids = torch.randint(100, 1000, (1, prompt_len))
    cache.current_seq_len = 0
    runtime.model.forward(ids, cache, preprocess_only=True)  # warm-up
    synchronize()
    cache.current_seq_len = 0
    started = time.perf_counter()
    runtime.model.forward(ids, cache, preprocess_only=True)
    synchronize()
    cache.current_seq_len = 0
    return prompt_len / (time.perf_counter() - started)


def peak_reserved_bytes() -> int:
    import torch

    return sum(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))


def reset_peaks() -> None:
    import torch

    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--model-dir", type=Path, help="existing EXL2 model (skip building)")
    parser.add_argument("--work-dir", type=Path, help="where to build the random model")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (7B has 28)")
    parser.add_argument("--bits", type=float, default=4.5, help="EXL2 bits per weight")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--bandwidth-gbs", type=float, help="override the card's peak GB/s")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    model_dir = args.model_dir or build_model(args)
    gpus = probe_gpus()
    modes = ["static"]
    flash_attn = probe_flash_attn()
    blocker = flash_attn_blocker(gpus, flash_attn.version, flash_attn.problem)
    if blocker is None:
        modes.insert(0, "paged")  # paged first: static sets EXLLAMA_NO_FLASH_ATTN on import
    else:
        print(f"paged mode skipped: {blocker}")

    gpu = gpus[0]
    bandwidth = bandwidth_for(gpu.name, args.bandwidth_gbs)
    print(f"GPU: {gpu.name} sm_{gpu.capability[0]}{gpu.capability[1]}, model: {model_dir}")
    report: dict[str, Any] = {
        "gpu": gpu.name,
        "capability": f"{gpu.capability[0]}.{gpu.capability[1]}",
        "bandwidth_gbs": bandwidth,
        "modes": {},
    }
    context = args.prompt_tokens + args.new_tokens // 2  # mean cached tokens while decoding
    for mode in modes:
        settings = ExLlamaV2Settings(
            model_dir=model_dir,
            batching_mode=mode,  # type: ignore[arg-type]
            max_seq_len=args.max_seq_len,
            max_batch_size=8,
            progress_bar=True,
        )
        reset_peaks()
        start = prepare_startup(settings)
        runtime = load_runtime(start)
        shape, weights = read_model_dir(model_dir)
        plan = build_vram_plan(settings, shape, weights, start.decision)
        bench = bench_paged if mode == "paged" else bench_static
        figures: dict[str, Any] = {"decode_tokens_per_s": {}, "bandwidth_bound_tokens_per_s": {}}
        for batch in (1, 8):
            rate = bench(runtime, batch, args.prompt_tokens, args.new_tokens)
            figures["decode_tokens_per_s"][str(batch)] = rate
            line = f"[{mode}] decode batch {batch}: {rate:8.1f} tokens/s"
            if bandwidth:
                traffic = decode_step_bytes(plan, batch, context)
                bound = traffic.tokens_per_second(batch, bandwidth * 1e9)
                figures["bandwidth_bound_tokens_per_s"][str(batch)] = bound
                line += f"  ({rate / bound:.0%} of the {bound:.0f} tokens/s bandwidth bound)"
            print(line)
        prompt_rate = bench_prompt(runtime, 2048)
        figures["prompt_tokens_per_s"] = prompt_rate
        print(f"[{mode}] prompt: {prompt_rate:8.1f} tokens/s (batch 1, 2048)")
        peak = peak_reserved_bytes()
        figures["peak_reserved_bytes"] = peak
        figures["estimate_bytes"] = start.estimate.total
        print(
            f"[{mode}] peak VRAM reserved by torch: {peak / GIB:.2f} GiB; "
            f"engine estimate {start.estimate.total / GIB:.2f} GiB"
        )
        report["modes"][mode] = figures
        if runtime.generator is not None:
            runtime.generator.clear_queue()
        runtime.model.unload()
        del runtime
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
