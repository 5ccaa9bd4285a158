"""Recipes: the train configs shipped with clusterctl (one per seed setup, its reduced twin, the demo).

They live in the repository's configs/ (`clusterctl/configs` is a link to it, a real directory in an
installed wheel). A profile names its recipe (`recipe = "seed-002"`), so `clusterctl submit
--profile a100x64` runs the paper's setup; `--config`, `--model` and `--set` override it.

A recipe or profile looked up by name is found first in the working directory (./configs,
./cluster_profiles): a cloned repository can replace a shipped one. `shadowing` says so, naming both
files, on every submit and dry-run (a path given on the command line is the user's choice and is not said).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vltrain.common.errors import UserError

NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"


def builtin_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def search_dirs(cwd: Path | None = None) -> list[Path]:
    """Where recipes are looked up by name, first match wins: ./configs, then the shipped ones."""
    dirs = [(cwd or Path.cwd()) / "configs", builtin_dir()]
    return [d for i, d in enumerate(dirs) if d.resolve() not in {e.resolve() for e in dirs[:i]}]


def builtin_recipes() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped train config."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.toml"))}


def known_recipes() -> list[str]:
    return sorted({p.stem for d in search_dirs() if d.is_dir() for p in d.glob("*.toml")})


def find_recipe(name_or_path: str, flag: str) -> Path:
    """A recipe's file: a path (contains '/' or ends in .toml) as given, else by name."""
    if not is_name(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(
                f"{flag}: {name_or_path!r} does not exist; allowed: a train config file or a recipe name "
                f"({', '.join(known_recipes())})"
            )
        return path
    if not re.fullmatch(NAME, name_or_path):
        raise UserError(f"{flag}: {name_or_path!r} is not a recipe name; allowed: {', '.join(known_recipes())}")
    for d in search_dirs():
        p = d / f"{name_or_path}.toml"
        if p.is_file():
            return p
    raise UserError(f"{flag}: no recipe named {name_or_path!r}; allowed: {', '.join(known_recipes()) or 'none found'}")


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe's opening comment: what it is (whole, though its comment wraps lines).
    Only its first 64 KiB are read, and only if it is a regular file (vltrain.common.safe_read:
    NotReadable, an OSError, for a FIFO or a device); UnicodeDecodeError when a line before the summary
    is not UTF-8 (a binary file)."""
    from vltrain.common import safe_read

    lines: list[str] = []
    for raw in safe_read.read_head(path, 1 << 16).split(b"\n"):
        line = raw.decode("utf-8")
        if not line.startswith("#"):
            if line.strip() or lines:
                break
            continue
        lines.append(line.lstrip("# ").strip())
        if first_sentence(" ".join(lines)) is not None:
            break
    text = " ".join(lines).strip()
    return first_sentence(text) or text


def first_sentence(text: str) -> str | None:
    """The text up to its first full stop (a '.', '!' or '?' before a space or the end), None without one."""
    m = re.search(r"[.!?](?=\s|$)", text)
    return text[: m.end()] if m else None


def is_name(name_or_path: str) -> bool:
    """Looked up by name in the search dirs (not a path: no '/', no .toml)."""
    return "/" not in name_or_path and not name_or_path.endswith(".toml")


def shadow_line(kind: str, name: str, found: Path, shipped: Path) -> str | None:
    """One line when `found` (looked up by name) is not the shipped file of that name (pure but for resolve)."""
    if not shipped.is_file() or found.resolve() == shipped.resolve():
        return None
    flag = "--profile" if kind == "profile" else "--config"
    return (
        f"{kind} {name}: {found.absolute()} shadows the shipped {shipped} (rename or remove it to run the shipped "
        f"one; {flag} with its path says it is meant)"
    )


def shadowing(profile: str, recipe: str | None) -> list[str]:
    """The shadowing lines of a run: its profile (`--profile` as given) and the recipe the profile names
    (None when --config chose the train config), each when looked up by name and not the shipped file."""
    from clusterctl.planning import profiles

    out = []
    if is_name(profile):
        out.append(
            shadow_line("profile", profile, profiles.find_profile(profile), profiles.builtin_dir() / f"{profile}.toml")
        )
    if recipe and is_name(recipe):
        out.append(shadow_line("recipe", recipe, find_recipe(recipe, "recipe"), builtin_dir() / f"{recipe}.toml"))
    return [line for line in out if line]


@dataclass(frozen=True)
class PaperFacts:
    """What a recipe's paper states that is no setting (its [paper] table): what the recipe does not
    reproduce, and the size of the paper's run, which the plan sets beside its own estimate."""

    not_reproduced: tuple[tuple[str, str], ...]  # (what the paper states, why it is not reproduced here)
    duration_h: float | None  # the paper's stated wall-clock training duration, hours (None: not stated)
    gpus: int | None  # on how many GPUs that duration was stated
    gpu_hours: float | None  # the paper's stated GPU-hours, if any

    def items(self) -> list[dict[str, str]]:
        """not_reproduced as JSON prints it: [{"what": ..., "why": ...}]."""
        return [{"what": what, "why": why} for what, why in self.not_reproduced]

    def to_dict(self) -> dict[str, Any]:
        return {
            "duration_h": self.duration_h,
            "gpus": self.gpus,
            "gpu_hours": self.gpu_hours,
            "not_reproduced": self.items(),
        }


NO_PAPER = PaperFacts((), None, None, None)
PAPER_KEYS = ("duration_h", "gpus", "gpu_hours", "not_reproduced")
MAX_ITEMS = 64  # a paper states a handful; each is a line in the plan
MAX_TEXT = 400  # characters of one `what` or `why`


def paper_facts(path: Path) -> PaperFacts:
    """The [paper] table of a train config (a twin's comes from its `base`); NO_PAPER without one."""
    from vltrain.config import PAPER_TABLE, read_config_data

    return parse_paper(read_config_data(path).get(PAPER_TABLE), f"{path}: paper")


def parse_paper(table: Any, where: str) -> PaperFacts:
    """Validate a [paper] table (pure): one-line errors naming the key and what is allowed."""
    if table is None:
        return NO_PAPER
    if not isinstance(table, dict):
        raise UserError(f"{where}: {table!r:.40} is not a table; allowed: a [paper] table")
    unknown = [k for k in table if k not in PAPER_KEYS]
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(PAPER_KEYS)}")
    items = table.get("not_reproduced", [])
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise UserError(
            f"{where}.not_reproduced: not a list of at most {MAX_ITEMS}; allowed: [[paper.not_reproduced]] tables"
        )
    return PaperFacts(
        not_reproduced=tuple(_item(it, f"{where}.not_reproduced[{i}]") for i, it in enumerate(items)),
        duration_h=_number(table.get("duration_h"), f"{where}.duration_h", 1e6),
        gpus=_gpus(table.get("gpus"), f"{where}.gpus"),
        gpu_hours=_number(table.get("gpu_hours"), f"{where}.gpu_hours", 1e12),
    )


def _item(item: Any, where: str) -> tuple[str, str]:
    if not isinstance(item, dict) or set(item) != {"what", "why"}:
        raise UserError(f'{where}: not a table of `what` and `why`; allowed: what = "...", why = "..."')
    for key in ("what", "why"):
        text = item[key]
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT or not text.isprintable():
            raise UserError(f"{where}.{key}: not valid; allowed: one line of 1 to {MAX_TEXT} printable characters")
    return item["what"].strip(), item["why"].strip()


def _number(value: Any, where: str, high: float) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= high
    ):
        raise UserError(f"{where}: {value!r:.40} is not valid; allowed: a number above 0, at most {high:g}")
    return float(value)


def _gpus(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1_000_000:
        raise UserError(f"{where}: {value!r:.40} is not valid; allowed: an integer from 1 to 1000000")
    return value
