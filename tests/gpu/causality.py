"""Is exllamav2's attention causal in this process's environment? Prints one JSON line.

    EXLLAMA_NO_SDPA=1 python -m tests.gpu.causality MODEL_DIR

Loads the model with exllamav2's default configuration (attention chosen by the EXLLAMA_*
variables, as the converter's is), runs a prompt without a cache, changes its last token and
reports how much the logits of the earlier positions moved: 0 when attention is causal.
exllamav2 reads its environment at import, so each environment needs its own process.
"""

from __future__ import annotations

import argparse
import json
import os

# Causal attention leaves earlier positions untouched (bit for bit with these kernels); a
# bidirectional one moves them by a sizeable fraction of a logit.
CAUSAL_TOLERANCE = 1e-3


def logits_change_before_last(model_dir: str, length: int = 64) -> float:
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    config = ExLlamaV2Config(model_dir)
    config.max_seq_len = 256
    config.arch_compat_overrides(quiet=True)
    model = ExLlamaV2(config)
    model.load()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, length), generator=generator)
    changed = ids.clone()
    changed[0, -1] = (int(ids[0, -1]) + 7) % 1000 + 10
    with torch.inference_mode():
        before = model.forward(ids).float()
        after = model.forward(changed).float()
    return float((before[0, :-1] - after[0, :-1]).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    args = parser.parse_args()
    change = logits_change_before_last(args.model_dir)
    flags = {k: v for k, v in os.environ.items() if k.startswith("EXLLAMA_")}
    causal = change <= CAUSAL_TOLERANCE
    print(json.dumps({"max_change_before_last": change, "causal": causal, "env": flags}))


if __name__ == "__main__":
    main()
