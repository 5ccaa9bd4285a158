"""The model presets as rows for people and scripts (pure): sizes from vltrain.model_math, the exact
count the planner uses, and the seed each paper-scale preset reproduces."""

from __future__ import annotations

import dataclasses
from typing import Any

from vltrain.model_math import param_breakdown, param_count
from vltrain.presets import PAPER_TOTALS, PRESETS, get_preset

# Presets made for a seed whose paper states no total (PAPER_TOTALS holds those that do).
SEED_OF = {"vl-seed000": "000", "vl-seed004": "004"} | {k: v[0] for k, v in PAPER_TOTALS.items()}


def preset_rows() -> list[dict[str, Any]]:
    rows = []
    for name in PRESETS:
        m = get_preset(name)
        rows.append(
            {
                "name": name,
                "params": param_count(m),
                "image_size": m.image_size,
                "patch_size": m.patch_size,
                "vision": f"{m.vision_layers} x {m.vision_width}",
                "text": f"{m.text_layers} + {m.fusion_layers} fused x {m.text_width}",
                "decoder": f"{m.decoder_layers} x {m.text_width}",
                "vocab_size": m.vocab_size,
                "max_text_len": m.max_text_len,
                "seed": SEED_OF.get(name),
                "paper_params": PAPER_TOTALS[name][1] if name in PAPER_TOTALS else None,
            }
        )
    return rows


def preset_detail(name: str) -> dict[str, Any]:
    m = get_preset(name, "NAME")
    return {
        "model": dataclasses.asdict(m),
        "params": param_count(m),
        "params_by_part": param_breakdown(m),
        "seed": SEED_OF.get(name),
        "paper_params": PAPER_TOTALS[name][1] if name in PAPER_TOTALS else None,
    }
