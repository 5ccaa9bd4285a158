"""`vltrain data import`: users' images and captions (an image-folder tree or a table) as shards.

The output is what the trainer reads everywhere else: img2dataset's layout (KEY.jpg|png|webp, KEY.txt,
KEY.json, and KEY.cls with classes.json for labelled data), written with ShardWriter (index and
_stats.json beside each tar). A user's data is never clean, so a bad sample (an image that is missing,
truncated or not an image; a caption that is empty, not text, not UTF-8 or too long) is counted, named
in DIR/import_report.json and skipped: it never stops the import. What does stop it (a flag, an
unreadable table, nothing usable at all) leaves nothing behind: everything is written in a hidden
directory beside --out and renamed to it at the end.

Images are copied byte for byte when the loader reads their format (JPEG, PNG, WebP) and no resize or
EXIF rotation is asked of them, so nothing is lost to a second JPEG encoding; other formats (BMP, GIF,
TIFF, ...), rotated photos and, with --image-size S, images whose shorter side exceeds S are decoded and
re-encoded as JPEG at quality 95 (img2dataset's default), the shorter side down to S (img2dataset's
keep_ratio). Every image is decoded in full either way: that is how a truncated file is found.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vltrain.common.atomic import atomic_write
from vltrain.common.errors import UserError
from vltrain.data.import_sources import Listing, Record, folder_records, table_records

DEFAULT_TEMPLATE = "a photo of a {}."
MAX_CAPTION_CHARS = 1000
COPY_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # what the loader reads as it is
JPEG_QUALITY = 95
REPORT = "import_report.json"
STDERR_EXAMPLES = 5
_ORIENTATION = 0x0112  # EXIF tag: 1 = upright


class BadSample(Exception):
    """Why one sample is skipped ('image: ...' or 'caption: ...'); never reaches the user as an error."""


@dataclass(frozen=True)
class ImportOptions:
    holdout: int = 0
    image_size: int | None = None
    shard_size: int = 1000
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    max_caption_chars: int = MAX_CAPTION_CHARS
    seed: int = 0


def parse_image_size(text: str | None) -> int | None:
    """--image-size: 'none' (keep every image's size) or a side of 16 to 4096 pixels."""
    if text is None or text.strip().lower() == "none":
        return None
    try:
        size = int(text)
    except ValueError:
        size = 0
    if not 16 <= size <= 4096:
        raise UserError(f"--image-size: {text!r}; allowed: none (keep sizes) or 16 to 4096 pixels")
    return size


def check_options(opts: ImportOptions) -> None:
    if opts.holdout < 0:
        raise UserError(f"--holdout: {opts.holdout}; allowed: 0 or more samples")
    if opts.shard_size < 1:
        raise UserError(f"--shard-size: {opts.shard_size}; allowed: 1 or more samples a shard")
    if opts.max_caption_chars < 1:
        raise UserError(f"--max-caption-chars: {opts.max_caption_chars}; allowed: 1 or more")
    for t in opts.templates:
        if t.count("{}") != 1 or not t.replace("{}", "").strip():
            raise UserError(f"--caption-template: {t!r}; allowed: text with one {{}} for the class name")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError):
            raise UserError(f"--caption-template: {t!r}; allowed: text with one {{}} and no other braces") from None


def check_caption(value: Any, max_chars: int) -> str:
    """The caption as one line of UTF-8 text (whitespace runs, newlines included, become one space), or
    BadSample saying why not."""
    if isinstance(value, bytes):  # a Parquet binary column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample(f"caption: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(value, str):
        missing = value is None or (isinstance(value, float) and value != value)
        raise BadSample(
            "caption: empty" if missing else f"caption: not a string ({type(value).__name__} {value!r:.40})"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: bytes of the table that were not UTF-8
        raise BadSample("caption: not UTF-8") from None
    text = " ".join(value.split())
    if not text:
        raise BadSample("caption: empty")
    if len(text) > max_chars:
        raise BadSample(f"caption: too long ({len(text)} characters; allowed: at most {max_chars})")
    return text


def read_image_file(path: str) -> bytes:
    if not path:
        raise BadSample("image: no path in the image column")
    if "://" in path:
        raise BadSample("image: a URL, not a local file (download it with img2dataset)")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSample("image: missing file") from None
    except OSError as e:
        raise BadSample(f"image: cannot be read ({e.strerror or type(e).__name__})") from None


def prepare_image(data: bytes, size: int | None) -> tuple[str, bytes, dict[str, int]]:
    """(extension, bytes to store, sizes) for one image file's bytes, or BadSample: decoded in full (a
    truncated file fails here), copied as it is where the loader reads it unchanged, else re-encoded."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on large or odd images; failures raise below
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.DecompressionBombError:
        raise BadSample(
            f"image: over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels (PIL's decompression-bomb limit)"
        ) from None
    except Image.UnidentifiedImageError:
        raise BadSample("image: not an image PIL reads") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadSample(f"image: truncated or damaged ({str(e)[:80] or type(e).__name__})") from None
    width, height = img.size
    sizes = {"original_width": width, "original_height": height, "width": width, "height": height}
    rotated = img.getexif().get(_ORIENTATION, 1) not in (1, None)
    shrink = size is not None and min(width, height) > size
    if img.format in COPY_FORMATS and not rotated and not shrink:
        return COPY_FORMATS[img.format], data, sizes
    rgb = ImageOps.exif_transpose(img).convert("RGB")
    if size is not None and min(rgb.size) > size:
        scale = size / min(rgb.size)
        rgb = rgb.resize(
            (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "jpg", buf.getvalue(), sizes | {"width": rgb.width, "height": rgb.height}


def template_for(templates: tuple[str, ...], seed: int, index: int) -> str:
    """The caption template of sample `index`: a seeded draw per sample (independent of the others)."""
    import numpy as np

    return templates[int(np.random.default_rng([seed, index]).integers(len(templates)))]


def make_sample(
    rec: Record, key: str, index: int, classes: list[str] | None, opts: ImportOptions
) -> tuple[dict[str, Any], bool]:
    """One sample in img2dataset's layout (plus .cls when labelled) and whether its image is the file's
    own bytes, or BadSample; the caption is checked first (cheap), then the image is read and decoded."""
    raw = rec.caption if rec.caption is not None else template_for(opts.templates, opts.seed, index).format(rec.label)
    text = check_caption(raw, opts.max_caption_chars)
    data = read_image_file(rec.path)
    ext, image, sizes = prepare_image(data, opts.image_size)
    meta: dict[str, Any] = {"key": key, "caption": text, "status": "success", **sizes, "source": rec.source}
    meta["sha256"] = hashlib.sha256(data).hexdigest()  # of the file as found (img2dataset hashes the original)
    sample = {"__key__": key, ext: image, "txt": text.encode()}
    if classes is not None and rec.label is not None:
        meta |= {"label": classes.index(rec.label), "class": rec.label}
        sample["cls"] = str(meta["label"]).encode()
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return sample, image is data


class _Split:
    """Shards {00000..}.tar in one directory, `size` samples each, opened as samples come."""

    def __init__(self, out: Path, size: int):
        self.out, self.size, self.count = out, size, 0
        self.paths: list[Path] = []
        self._writer: Any = None

    def write(self, sample: dict[str, Any]) -> None:
        from vltrain.data.shards import ShardWriter

        if self._writer is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._writer = ShardWriter(self.out / f"{len(self.paths):05d}.tar").__enter__()
            self.paths.append(self._writer.path)
        self._writer.write(sample)
        self.count += 1
        if self._writer.count == self.size:
            self.close()

    def close(self, failed: BaseException | None = None) -> None:
        if self._writer is not None:
            w, self._writer = self._writer, None
            w.__exit__(type(failed) if failed else None, failed, None)


@dataclass
class _Result:
    train: _Split
    eval: _Split
    bad: list[dict[str, str]] = field(default_factory=list)
    copied: int = 0


def _write_samples(listing: Listing, staging: Path, opts: ImportOptions) -> _Result:
    """Every record in a seeded random order (a shard mixes classes and rows), the first `holdout` good
    ones to staging/eval, the rest to staging; bad ones listed with their key, source and reason."""
    import numpy as np

    n = len(listing.records)
    width = max(9, len(str(n - 1)))
    listed = dict(listing.skipped)
    res = _Result(_Split(staging, opts.shard_size), _Split(staging / "eval", opts.shard_size))
    try:
        for i in np.random.default_rng(opts.seed).permutation(n).tolist():
            rec, key = listing.records[i], f"{i:0{width}d}"
            try:
                if i in listed:
                    raise BadSample(listed[i])
                sample, copied = make_sample(rec, key, i, listing.classes, opts)
            except BadSample as e:
                res.bad.append({"key": key, "source": rec.source, "reason": str(e)})
                continue
            res.copied += copied
            (res.eval if res.eval.count < opts.holdout else res.train).write(sample)
    except BaseException as e:
        res.train.close(e)
        res.eval.close(e)
        raise
    res.train.close()
    res.eval.close()
    return res


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; allowed: a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out: {out} is not empty; allowed: a new or empty directory")


def _list(folder: Path | None, table: Path | None, columns: dict[str, str | None], opts: ImportOptions) -> Listing:
    """The records of --folder or --table (exactly one of them), after the flags are checked."""
    if (folder is None) == (table is None):
        raise UserError("--folder/--table: give exactly one; allowed: --folder ROOT (class folders) or --table FILE")
    check_options(opts)
    if folder is not None:
        given = [k for k, v in columns.items() if v is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')}: names a table's column; allowed: with --table only")
        listing = folder_records(folder)
    else:
        listing = table_records(
            table,  # type: ignore[arg-type]  # not None: exactly one of the two is given
            columns.get("image_column") or "image",
            columns.get("caption_column") or "caption",
            columns.get("label_column"),
        )
    if opts.holdout and opts.holdout >= len(listing.records):
        n = len(listing.records)
        raise UserError(f"--holdout: {opts.holdout} of {n} samples; allowed: 0 to {max(n - 1, 0)}")
    return listing


def _classes_json(classes: list[str], templates: tuple[str, ...]) -> str:
    return json.dumps({"classes": classes, "templates": list(templates)}, indent=1, ensure_ascii=False) + "\n"


def _finish(
    staging: Path, listing: Listing, res: _Result, opts: ImportOptions, source: Path, flag: str
) -> dict[str, Any]:
    """Refuse an import with nothing to train on; write classes.json and the report into staging; the summary."""
    n_eval, n_train = res.eval.count, res.train.count
    res.bad.sort(key=lambda b: b["key"])  # in source order (they were met in the shuffled order)
    first = f" (first: {res.bad[0]['source']}: {res.bad[0]['reason']})" if res.bad else ""
    if n_eval + n_train == 0:
        raise UserError(
            f"{flag}: {source} has no usable sample among {len(listing.records)}{first}; allowed: images with captions"
        )
    if n_eval < opts.holdout or n_train == 0:
        good = n_eval + n_train
        raise UserError(f"--holdout: {opts.holdout} of {good} usable samples; allowed: 0 to {good - 1}")
    if listing.classes is not None:
        text = _classes_json(listing.classes, opts.templates)
        for d in (staging, staging / "eval") if n_eval else (staging,):
            atomic_write(d / "classes.json", text, mode=None)
    reasons: dict[str, int] = {}
    for b in res.bad:
        kind = b["reason"].split(" (")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    summary = {
        "source": str(source),
        "kind": flag[2:],
        "samples": len(listing.records),
        "written": n_train + n_eval,
        "train": n_train,
        "eval": n_eval,
        "skipped": len(res.bad),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "copied": res.copied,
        "reencoded": n_train + n_eval - res.copied,
        "image_size": opts.image_size,
        "classes": None if listing.classes is None else len(listing.classes),
        "shards": [p.name for p in res.train.paths],
        "eval_shards": [f"eval/{p.name}" for p in res.eval.paths],
    }
    atomic_write(
        staging / REPORT, json.dumps(summary | {"bad": res.bad}, indent=1, ensure_ascii=False) + "\n", mode=None
    )
    return summary | {"bad": res.bad[:STDERR_EXAMPLES]}


def import_data(
    out: str | Path,
    folder: str | Path | None = None,
    table: str | Path | None = None,
    opts: ImportOptions | None = None,
    **columns: str | None,
) -> dict[str, Any]:
    """Write --folder's or --table's samples as shards in `out` (new or empty), `holdout` of them in
    out/eval; return the summary (its "bad" holds the first few skipped samples, the report all of them).
    `columns`: image_column, caption_column, label_column (tables only)."""
    opts = opts or ImportOptions()
    out = Path(out)
    _check_out(out)
    src = Path(folder) if folder is not None else None
    tab = Path(table) if table is not None else None
    listing = _list(src, tab, columns, opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".import", dir=out.parent))
    try:
        res = _write_samples(listing, staging, opts)
        flag, source = ("--folder", src) if src is not None else ("--table", tab)
        summary = _finish(staging, listing, res, opts, source, flag)  # type: ignore[arg-type]
        _check_out(out)  # still empty: nobody wrote there meanwhile
        if out.is_dir():
            out.rmdir()
        os.chmod(staging, 0o777 & ~_umask())
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary | {"out": str(out), "report": str(out / REPORT)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def summary_lines(s: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(stdout lines, stderr lines) of an import's summary: counts, then the first skipped samples."""
    where = f"{s['train']} samples in {len(s['shards'])} shards to {s['out']}"
    held = f", {s['eval']} held out in {s['out']}/eval" if s["eval"] else ""
    classes = f", {s['classes']} classes (classes.json)" if s["classes"] is not None else ""
    images = f"images: {s['copied']} copied as they are, {s['reencoded']} re-encoded as JPEG"
    out = [f"wrote {where}{held}{classes}", images]
    err = [f"skipped {b['key']} ({b['source']}): {b['reason']}" for b in s["bad"]]
    if s["skipped"]:
        by = ", ".join(f"{n} {k}" for k, n in s["skipped_by_reason"].items())
        err.append(f"skipped {s['skipped']} of {s['samples']} samples ({by}); all listed in {s['report']}")
    return out, err
