"""Train configs shipped with clusterctl ("recipes"): `clusterctl/configs`, a link to the repository's
configs/ in a checkout, a real directory in an installed wheel."""

from __future__ import annotations

from pathlib import Path


def builtin_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def builtin_recipes() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped train config."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.toml"))}
