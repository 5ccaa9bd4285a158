"""Exact-duplicate removal: drop samples whose image bytes hash the same as an earlier sample's.

SHA-256 of the encoded image bytes finds byte-identical copies (the common web-crawl case: one file
behind many URLs). Re-encoded or resized copies hash differently; near-duplicate detection would
need perceptual hashes or embeddings and is out of scope. The first occurrence in shard order wins;
each output shard keeps the name of the input shard its samples came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from vltrain.common.errors import UserError
from vltrain.data.shards import IMAGE_EXTS, ShardWriter, iter_samples, resolve_shards


def dedup_shards(in_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Copy the shards of in_dir to out_dir without exact-duplicate images; return what was removed."""
    paths = resolve_shards(in_dir, what="--in")
    out = Path(out_dir)
    if out.resolve() in {p.parent.resolve() for p in paths}:
        raise UserError(f"--out: {out} is where the input shards are; allowed: a different directory")
    if out.is_dir() and any(out.glob("*.tar")):
        raise UserError(f"--out: {out} already holds shards; allowed: a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    first_key: dict[str, str] = {}
    duplicates: list[dict[str, str]] = []
    total = 0
    written = []
    for path in paths:
        with ShardWriter(out / path.name) as writer:
            for sample in iter_samples([path]):
                total += 1
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    raise UserError(
                        f"--in: {path} sample {sample['__key__']} has no image; allowed: samples with one of {', '.join(IMAGE_EXTS)}"
                    )
                digest = hashlib.sha256(sample[ext]).hexdigest()
                if digest in first_key:
                    duplicates.append({"key": sample["__key__"], "same_as": first_key[digest], "shard": path.name})
                    continue
                first_key[digest] = sample["__key__"]
                writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
        written.append(str(writer.path))
    return {
        "in": str(in_dir),
        "out": str(out),
        "samples": total,
        "kept": total - len(duplicates),
        "removed": len(duplicates),
        "duplicates": duplicates,
        "shards": written,
    }
