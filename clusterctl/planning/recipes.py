"""Recipes: the train configs shipped with clusterctl (one per seed setup, its reduced twin, the demo).

They live in the repository's configs/ (`clusterctl/configs` is a link to it, a real directory in an
installed wheel). A profile names its recipe (`recipe = "seed-002"`), so `clusterctl submit
--profile a100x64` runs the paper's setup; `--config`, `--model` and `--set` override it.
"""

from __future__ import annotations

import re
from pathlib import Path

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
    if "/" in name_or_path or name_or_path.endswith(".toml"):
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
    """The first comment line of a recipe: what it is."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""
