"""Zero-shot classification of the held-out images, open_clip's way: every prompt template filled with
every class name, the prompts' text embeddings L2-normalised, averaged per class and normalised again
(a prompt ensemble), each image assigned the classes its embedding is closest to (top-1, top-5).

The classes come from a `classes.json` ({"classes": [name, ...], "templates": ["a photo of a {}.", ...]})
found as `find_classes` says; each held-out sample's class is its `KEY.cls` member (its index as ASCII
decimal, webdataset's convention). Samples without one are not counted. The math is in plain functions
over tensors (`class_embeddings`, `topk_hits`); the model and the files are touched at the edges.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.common.errors import UserError

if TYPE_CHECKING:
    import torch

CLASSES_FILE = "classes.json"
KS = (1, 5)
_CLASSES_ALLOWED = "a non-empty list of distinct strings (the class names, in label order)"
_TEMPLATES_ALLOWED = "a non-empty list of strings, each containing {} (where the class name goes)"


@dataclass(frozen=True)
class ClassPrompts:
    """A classes.json: the class names (label i is classes[i]) and the prompt templates, and where it was."""

    classes: list[str]
    templates: list[str]
    path: str = ""

    def prompts(self) -> list[str]:
        """Every template filled with every class, class-major: prompt c * T + t is class c, template t."""
        return [t.replace("{}", c) for c in self.classes for t in self.templates]


def parse_classes(data: Any, where: str) -> ClassPrompts:
    """A parsed classes.json checked field by field; a one-line UserError names `where` and the field."""
    if not isinstance(data, dict):
        raise UserError(f'{where}: not a JSON object; allowed: {{"classes": [...], "templates": [...]}}')
    classes, templates = data.get("classes"), data.get("templates")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise UserError(f"{where}: classes: {_short(classes)} is not valid; allowed: {_CLASSES_ALLOWED}")
    dup = next((c for i, c in enumerate(classes) if c in classes[:i]), None)
    if dup is not None:
        raise UserError(f"{where}: classes: {dup!r} appears twice; allowed: {_CLASSES_ALLOWED}")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise UserError(f"{where}: templates: {_short(templates)} is not valid; allowed: {_TEMPLATES_ALLOWED}")
    bad = next((t for t in templates if "{}" not in t), None)
    if bad is not None:
        raise UserError(f"{where}: templates: {bad!r} has no {{}}; allowed: {_TEMPLATES_ALLOWED}")
    return ClassPrompts(list(classes), list(templates), where)


def _short(value: Any) -> str:
    text = "missing" if value is None else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_classes(path: str | Path) -> ClassPrompts:
    """Read and check a classes.json (one-line errors naming the file and the field)."""
    from vltrain.config import read_text_file

    where = str(path)
    text = read_text_file(Path(path), 'a classes.json: {"classes": [...], "templates": [...]}')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f'{where}: not valid JSON (line {e.lineno}: {e.msg}); allowed: {{"classes": [...], "templates": [...]}}'
        ) from None
    return parse_classes(data, where)


def beside(spec: str) -> Path | None:
    """classes.json in the directory of a shard spec (a directory, a brace pattern or a .tar), if there."""
    if not spec:
        return None
    d = Path(spec) if Path(spec).is_dir() else Path(spec).parent
    path = d / CLASSES_FILE
    return path if path.is_file() else None


def find_classes(cfg, eval_shards: str, override: str | Path | None = None) -> ClassPrompts | None:
    """The classes to classify into: `override` (vltrain eval --classes), else config data.classes, else
    classes.json beside the held-out shards, else beside data.shards; None when there is none."""
    if override:
        return _named(Path(override), "--classes")
    if cfg.data.classes:
        return _named(Path(cfg.data.classes), "data.classes")
    found = beside(eval_shards) or beside(cfg.data.shards)
    return load_classes(found) if found else None


def _named(path: Path, what: str) -> ClassPrompts:
    if not path.exists():
        raise UserError(f"{what}: {path} does not exist; allowed: a classes.json file")
    return load_classes(path)


def zero_shot_task(cfg, eval_shards: str, override: str | Path | None = None):
    """(classes, key -> class) for an evaluation on `eval_shards`, or None: no classes.json, or no held-out
    sample with a .cls (then eval.json has no "zero_shot"). Every rank reads the same files, so every
    rank decides alike."""
    classes = find_classes(cfg, eval_shards, override)
    if classes is None:
        return None
    labels = read_labels(eval_shards)
    return (classes, labels) if labels else None


def read_labels(shards: str) -> dict[str, int]:
    """key -> class index of every held-out sample with a .cls member (only those members are read)."""
    from vltrain.data.shards import iter_samples, resolve_shards

    labels: dict[str, int] = {}
    where: dict[str, str] = {}
    for sample in iter_samples(resolve_shards(shards, "data.eval_shards"), select=lambda name: name.endswith(".cls")):
        if "cls" not in sample:
            continue
        key, url = sample["__key__"], sample["__url__"]
        raw = sample["cls"].decode("ascii", "replace").strip()
        if not raw.isdigit():
            raise UserError(f"{url}: {key}.cls: {raw[:20]!r} is not a class index; allowed: a decimal integer >= 0")
        if labels.get(key, int(raw)) != int(raw):
            raise UserError(
                f"{url}: {key}.cls: key also in {where[key]} with another class; allowed: keys unique across shards"
            )
        labels[key], where[key] = int(raw), url
    return labels


def class_embeddings(prompt_emb: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Prompt embeddings [C * T, D] (class-major, as ClassPrompts.prompts) -> class embeddings [C, D]:
    each prompt L2-normalised, averaged over the class's T templates, normalised again (open_clip)."""
    import torch.nn.functional as F

    per_class = F.normalize(prompt_emb.float(), dim=-1).reshape(n_classes, -1, prompt_emb.shape[-1])
    return F.normalize(per_class.mean(dim=1), dim=-1)


def topk_hits(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor, ks=KS) -> torch.Tensor:
    """How many images [n, D] with class `labels` [n] rank their class within the top k of `class_emb`
    [C, D] by cosine similarity, for each k (int64 [len(ks)]); a class tied with the true one counts as
    ranked above it: ties do not help (a collapsed model, every class embedding alike, scores 0, not 1)."""
    import torch
    import torch.nn.functional as F

    if image_emb.shape[0] == 0:
        return torch.zeros(len(ks), dtype=torch.int64)
    sim = F.normalize(image_emb.float(), dim=-1) @ class_emb.t()  # [n, C]
    true = sim.gather(1, labels.long().unsqueeze(1))
    rank = (sim >= true).sum(dim=1) - 1  # classes scored at least as high, but the true one
    return torch.stack([(rank < k).sum() for k in ks])


def labelled(keys: list[str], labels: dict[str, int], classes: ClassPrompts) -> tuple[list[int], list[int]]:
    """Positions (in `keys`) of the samples that have a class, and their classes; a class index beyond
    the classes.json's names is a UserError naming both."""
    rows, found = [], []
    for i, key in enumerate(keys):
        c = labels.get(key)
        if c is None:
            continue
        if c >= len(classes.classes):
            raise UserError(
                f"{key}.cls: class {c} but {classes.path} names {len(classes.classes)} classes; "
                f"allowed: 0 to {len(classes.classes) - 1}"
            )
        rows.append(i)
        found.append(c)
    return rows, found


def encode_prompts(
    model, tokenizer, prompts: list[str], *, device, max_len: int, batch_size: int = 128
) -> torch.Tensor:
    """Text embeddings [P, D] (fp32, CPU) of `prompts`, in eval mode without gradients, in batches of
    `batch_size` (the same calls on every rank: prompts are the same everywhere, so ranks whose forward
    is collective keep step); the model's training mode is restored and FSDP's gathers freed."""
    import torch

    from vltrain.model.generate import reshard_all

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids, mask = tokenizer.encode_batch(prompts[start : start + batch_size], max_len)
            out.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
    reshard_all(model)
    model.train(was_training)
    return torch.cat(out)


def zero_shot_scores(
    classes: ClassPrompts,
    class_emb: torch.Tensor,
    image_emb: torch.Tensor,
    keys: list[str],
    labels: dict[str, int],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[str, Any]:
    """eval.json's "zero_shot" from this rank's image embeddings and their keys; `all_reduce` sums the
    hits and counts over the ranks (each rank holds a slice of the held-out pairs)."""
    import torch

    rows, found = labelled(keys, labels, classes)
    hits = topk_hits(image_emb[rows], torch.tensor(found, dtype=torch.int64), class_emb)
    total = all_reduce(torch.cat([hits, torch.tensor([len(rows)], dtype=torch.int64)]))
    n = int(total[-1])
    frac = [float(h) / n if n else 0.0 for h in total[:-1].tolist()]
    return {
        "top1": frac[0],
        "top5": frac[1],
        "classes": len(classes.classes),
        "n": n,
        "templates": len(classes.templates),
        "chance_top1": 1.0 / len(classes.classes),
    }


def zero_shot_line(zs: dict[str, Any]) -> str:
    """How a zero-shot result reads in an eval line and at the end of `vltrain eval`."""
    return (
        f"zero-shot top-1 {zs['top1']:.3f} top-5 {zs['top5']:.3f} "
        f"({zs['classes']} classes, chance {zs['chance_top1']:.3f})"
    )
