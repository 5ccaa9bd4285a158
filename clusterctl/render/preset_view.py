"""`presets list` and `presets show` as rich tables (data in, console out)."""

from __future__ import annotations

from typing import Any

from clusterctl.render import output


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def print_presets(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    t = Table(title="model presets", title_justify="left", caption="clusterctl presets show NAME gives every figure")
    for col in ("name", "params", "image", "vision", "text", "decoder", "vocab", "tokens", "seed"):
        t.add_column(col, justify="right" if col in ("params", "vocab", "tokens") else "left", no_wrap=col == "name")
    for r in rows:
        t.add_row(
            r["name"],
            _params(r["params"]),
            f"{r['image_size']}/{r['patch_size']}",
            r["vision"],
            r["text"],
            r["decoder"],
            f"{r['vocab_size']:,}",
            str(r["max_text_len"]),
            r["seed"] or "",
        )
    output.console.print(t)


def print_preset(d: dict[str, Any]) -> None:
    from rich.table import Table

    m = d["model"]
    t = Table(show_header=False, title=m["name"], title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    paper = f" (the seed's paper: {_params(d['paper_params'])})" if d["paper_params"] else ""
    t.add_row("parameters", f"{d['params']:,} = {_params(d['params'])}{paper}")
    for part, n in d["params_by_part"].items():
        t.add_row(f"  {part}", f"{n:,}")
    for k, v in m.items():
        if k != "name":
            t.add_row(k, str(v))
    if d["seed"]:
        t.add_row("seed", d["seed"])
    output.console.print(t)
