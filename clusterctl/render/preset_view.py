"""`presets list` and `presets show` as plain aligned text (data in, text out: render.text).

Plain text, not a rich table: a rich table squeezed into 80 columns cut every number ("266.…");
table_text never cuts a cell, and the compact cells (layers x width) keep the list within 80.
"""

from __future__ import annotations

from typing import Any

from clusterctl.render.text import say, table_text


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _compact(shape: str) -> str:
    """'12 x 768' -> '12x768', '6 + 6 fused x 768' -> '6+6x768' (the legend below the table says so)."""
    return shape.replace(" fused", "").replace(" ", "")


def print_presets(rows: list[dict[str, Any]]) -> None:
    """Every preset in one table within 80 columns, with a legend for the compact shapes."""
    heads = [["name"], ["params"], ["image"], ["vision"], ["text"], ["decoder"], ["vocab"], ["text", "len"], ["seed"]]
    columns: list[list[str]] = [[] for _ in heads]
    for r in rows:
        cells = (
            r["name"],
            _params(r["params"]),
            f"{r['image_size']}/{r['patch_size']}",
            _compact(r["vision"]),
            _compact(r["text"]),
            _compact(r["decoder"]),
            f"{r['vocab_size']:,}",
            str(r["max_text_len"]),
            r["seed"] or "",
        )
        for col, value in zip(columns, cells, strict=True):
            col.append(value)
    right = [False, True, False, False, False, False, True, True, False]
    say(table_text("model presets", heads, columns, right, gap=2).rstrip("\n"))
    say("image: size/patch; vision, decoder: layers x width;")
    say("text: layers + fused layers x width; text len: tokens")
    say("clusterctl presets show NAME gives every figure")


def print_preset(d: dict[str, Any]) -> None:
    """One preset: its parameters (by tower) and every figure of its model table."""
    m = d["model"]
    paper = f" (the seed's paper: {_params(d['paper_params'])})" if d["paper_params"] else ""
    names = ["parameters", *(f" {part}" for part in d["params_by_part"])]
    values = [f"{d['params']:,} = {_params(d['params'])}{paper}", *(f"{n:,}" for n in d["params_by_part"].values())]
    for k, v in m.items():
        if k != "name":
            names.append(k)
            values.append(str(v))
    if d["seed"]:
        names.append("seed")
        values.append(d["seed"])
    say(table_text(m["name"], [[], []], [names, values], [False, False]).rstrip("\n"))
