"""What the bundled digits are trained with: the captions' and the zero-shot prompts' templates, and the
train config `vltrain data digits` writes beside its shards (DIR/train.toml; `make demo` runs it).

Kept apart from the writer (vltrain.data.digits) because it is tuned, not derived: bench/bench_learning.py
measures it (zero-shot top-1 on held-out digits, 3 seeds) and docs/data.md says what each choice bought.
"""

from __future__ import annotations

from typing import Any

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Training captions: `{name}` is the class name, `{digit}` its numeral; one template is drawn per image.
CAPTION_TEMPLATES = [
    "a handwritten digit {name}.",
    "a scan of the number {digit} written by hand.",
    "the digit {digit}, {name}, in pen.",
    "a grey image of a handwritten {name}.",
    "a small scan of the numeral {digit}.",
    "someone wrote the number {name}.",
]

# Zero-shot prompts (open_clip's pattern: every template filled with a class name, the embeddings averaged
# into one per class); `{}` is the class name, as in open_clip's zero_shot_metadata.
PROMPT_TEMPLATES = [
    "a handwritten digit {}.",
    "a scan of the number {} written by hand.",
    "a grey image of a handwritten {}.",
]

# 16 px: the scans are 8x8, so 16 px in 4 px patches (16 patches) holds all they show; at 32 px (64
# patches) a step costs twice the time and 300 steps reached top-1 0.74 instead of 0.94 (docs/data.md,
# "Learning on the digits").
DEFAULT_IMAGE_SIZE = 16


def digits_recipe(shards: str, eval_shards: str, image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, Any]:
    """The train config for the digits at `image_size`: the tiny preset with its image size set and a
    120-piece tokenizer (the captions hold ~30 distinct words: SentencePiece fits at most ~270 pieces on
    them, not the preset's 1,000), no horizontal flip (a mirrored 2 or 5 is another glyph) and no random
    crop (a crop can cut a stroke that tells a 7 from a 1), 600 steps of 64 (~26 passes over the 1,497
    training scans: ~1 minute on 2 CPU cores). Measured by bench/bench_learning.py."""
    import dataclasses

    from vltrain.presets import get_preset

    model = {
        **dataclasses.asdict(get_preset("tiny")),
        "name": "tiny-digits",
        "image_size": image_size,
        "vocab_size": 120,
    }
    return {
        "model": model,
        "global_batch": 64,
        "steps": 600,
        "precision": "fp32",
        "seed": 0,
        "log_every": 50,
        "checkpoint_every": 0,
        "eval_every": 0,
        "data": {"shards": shards, "eval_shards": eval_shards, "hflip": False, "random_crop": False},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "weight_decay": 0.05, "warmup_steps": 30, "grad_clip": 1.0},
    }
