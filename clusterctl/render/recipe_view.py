"""What a recipe does not reproduce of its paper (its [[paper.not_reproduced]]), as `plan`, `submit --dry-run`
and `recipes show` print it: what the paper states, and why the recipe does otherwise (plain text, folded to
the terminal's width so that no word is cut)."""

from __future__ import annotations

from typing import Any

from clusterctl.render.safe import printable
from clusterctl.render.text import say, styled

TITLE = "not reproduced"


def print_not_reproduced(items: list[dict[str, str]], recipe: str | None = None) -> None:
    """One line per item, 'what: why' (folded with an indent at the terminal's width); nothing without items.
    `recipe`: the recipe's name, when known."""
    from clusterctl.render.fold import fold, tell

    if not items:
        return
    whose = f"recipe {printable(recipe)}" if recipe else "this recipe"
    tell(f"{styled(TITLE, 'bold')}: what the paper states that {whose} does otherwise")
    for item in items:
        say(fold(f"- {printable(item['what'])}: {printable(item['why'])}", indent="    "))


def print_paper(paper: dict[str, Any]) -> None:
    """`recipes show`: the paper's run as the recipe states it, then what the recipe does not reproduce."""
    from clusterctl.render.fold import tell

    stated = []
    if paper["duration_h"] is not None:
        stated.append(f"{paper['duration_h']:,.0f} h")
    if paper["gpus"] is not None:
        stated.append(f"on {paper['gpus']} GPUs")
    if paper["gpu_hours"] is not None:
        stated.append(f"{paper['gpu_hours']:,.0f} GPU-hours")
    if stated:
        tell(f"{styled('the paper', 'bold')}: {', '.join(stated)} (`plan` sets it beside the run it plans)")
    if paper["not_reproduced"]:
        print_not_reproduced(paper["not_reproduced"])
    else:
        say(f"{styled(TITLE, 'bold')}: nothing listed (a recipe without a [paper] table lists nothing)")
