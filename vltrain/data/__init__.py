"""Image-text data: WebDataset shards (img2dataset layout), a synthetic generator, dedup, the loader.

Names are imported on first use (PEP 562), so `import vltrain.data` pulls neither torch nor
webdataset; only the loader and the shard readers/writers do, when called. See docs/data.md.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "write_synthetic_shards": "vltrain.data.synth",
    "dedup_shards": "vltrain.data.dedup",
    "resolve_shards": "vltrain.data.shards",
    "ShardLoader": "vltrain.data.loader",
    "ImageTransform": "vltrain.data.transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vltrain.data' has no attribute {name!r}")
