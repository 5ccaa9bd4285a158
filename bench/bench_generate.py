"""Greedy captioning with the KV cache (vltrain.model.generate.greedy_captions) vs VLModel.generate, which
re-runs the decoder over the whole prefix at every step (and the image's cross-attention keys/values).

Same model (seeded, random weights: no row ends early, both run all `max_len` steps), same images, eval
mode without gradients; timed in alternating rounds (ABAB...) so that load from other processes hits
both alike; prints the medians, their ratio, and the decoder tokens per row each path runs (a hook on
the first decoder block's MLP): max_len for the cache, max_len (max_len + 1) / 2 for the reference.

    OMP_NUM_THREADS=2 python bench/bench_generate.py [--preset small] [--batch 8] [--max-len 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch

    from vltrain.config import LossConfig
    from vltrain.model import VLModel
    from vltrain.model.generate import greedy_captions
    from vltrain.presets import get_preset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=0, help="caption tokens (0: the preset's max_text_len - 1)")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    cfg = get_preset(a.preset)
    steps = a.max_len or cfg.max_text_len - 1
    torch.manual_seed(0)
    model = VLModel(cfg, LossConfig()).eval()
    images = torch.randn(a.batch, 3, cfg.image_size, cfg.image_size)
    tokens: list[int] = []
    block = next(iter(model.decoder.blocks.values()))
    block.mlp.register_forward_hook(lambda _m, args, _o: tokens.append(args[0].shape[1]))
    paths = {
        "recompute (VLModel.generate)": lambda: model.generate(images, steps),
        "kv cache (greedy_captions)": lambda: greedy_captions(model, images, steps, all_done=lambda done: False),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    per_row: dict[str, int] = {}
    with torch.no_grad():
        for _ in range(a.rounds):
            for name, run in paths.items():
                tokens.clear()
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
                per_row[name] = sum(tokens)
    print(
        f"{a.preset}: batch {a.batch}, {steps} caption tokens, {a.rounds} rounds, torch threads {torch.get_num_threads()}"
    )
    for name in paths:
        print(f"  {name:30s} median {statistics.median(times[name]):8.3f} s   decoder tokens per row {per_row[name]}")
    ratio = statistics.median(times["recompute (VLModel.generate)"]) / statistics.median(
        times["kv cache (greedy_captions)"]
    )
    print(f"  speed-up {ratio:.2f}x (the vision encoder, run once per batch by both, included)")


if __name__ == "__main__":
    main()
