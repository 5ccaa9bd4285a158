"""Where `vltrain data import` finds samples: an image-folder tree or a table of (image, caption[, label]).

Both give a list of Records in a fixed order (sorted folder listing, table rows), nothing read but names
and cells: whether an image decodes or a caption is usable is the importer's to find out, per sample,
so one bad row never stops an import. A record's position in the list is its key, so a report's key
leads back to the row or the file. The folder layout is torchvision ImageFolder's (class index = the
sorted folder names' order), so `.cls` indices match what ImageFolder gives the same tree.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vltrain.common.errors import UserError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


@dataclass(frozen=True)
class Record:
    """One candidate sample: where its image is, its caption (None: made from a template and the class),
    its class name (None: no label), and `source`, how the report names it (a path, or a table row)."""

    path: str
    source: str
    caption: Any = None
    label: str | None = None


@dataclass(frozen=True)
class Listing:
    records: list[Record]
    classes: list[str] | None  # class names, index = .cls; None: unlabelled
    skipped: list[tuple[int, str]]  # (record index, reason) found while listing (e.g. a label cell left empty)


def class_name(folder: str) -> str:
    """A folder name as the class name written in captions and prompts: underscores read as spaces."""
    return folder.replace("_", " ").strip()


def folder_records(root: Path) -> Listing:
    """ROOT/<class>/**/<file>: every non-hidden file under a class folder (links followed, sorted), labelled
    by its top folder; whether it is an image is found when it is read. Files directly in ROOT are not
    in a class: they are listed as skipped."""
    if not root.is_dir():
        raise UserError(f"--folder: {root} is not a directory; allowed: a folder of class folders ROOT/<class>/*.jpg")
    top = sorted(e.name for e in os.scandir(root) if not e.name.startswith("."))
    folders = [n for n in top if (root / n).is_dir()]
    if not folders:
        raise UserError(
            f"--folder: {root} holds no class folders; allowed: a folder of class folders ROOT/<class>/*.jpg"
        )
    records: list[Record] = []
    skipped: list[tuple[int, str]] = []
    for name in top:
        if name not in folders:
            skipped.append((len(records), "image: not in a class folder (ROOT/<class>/...)"))
            records.append(Record(str(root / name), name))
            continue
        seen: set[str] = set()  # real paths walked: a link back up the tree is walked once, not forever
        for d, dirs, files in os.walk(root / name, followlinks=True):
            seen.add(os.path.realpath(d))
            dirs[:] = sorted(x for x in dirs if not x.startswith(".") and os.path.realpath(Path(d) / x) not in seen)
            for f in sorted(x for x in files if not x.startswith(".")):
                path = Path(d) / f
                records.append(Record(str(path), path.relative_to(root).as_posix(), label=class_name(name)))
    names = [class_name(n) for n in folders]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"--folder: two class folders read as the class {dup!r}; allowed: distinct folder names")
    return Listing(records, names, skipped)


def read_table(path: Path) -> Any:
    """The table as a pandas DataFrame, cells as they are stored (CSV cells as strings; bytes that are not
    UTF-8 kept as surrogates for the importer to count, not a failure of the whole file)."""
    import pandas as pd  # type: ignore[import-untyped]  # no stubs installed (pandas-stubs is separate)

    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UserError(f"--table: {path} has the suffix {suffix!r}; allowed: {', '.join(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"--table: {path} does not exist; allowed: a {', '.join(TABLE_SUFFIXES)} file")
    try:
        if suffix in (".csv", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            return pd.read_csv(path, sep=sep, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")
        if suffix == ".parquet":
            return _read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False, encoding_errors="surrogateescape")
    except UserError:
        raise
    except (ValueError, OSError, UnicodeError) as e:  # pandas' parser errors are ValueErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--table: {path} cannot be read as {suffix[1:]} ({first[:200]})") from None


def _read_parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-untyped]  # pyarrow ships no py.typed
    except ImportError:
        raise UserError(
            f"--table: {path} is Parquet, which needs pyarrow; allowed: pip install '.[realdata]' (or a .csv/.jsonl table)"
        ) from None
    try:
        return pq.read_table(path).to_pandas()
    except Exception as e:  # pyarrow.ArrowInvalid and friends: not a Parquet file, damaged footer
        raise UserError(f"--table: {path} cannot be read as parquet ({str(e).splitlines()[0][:200]})") from None


def _column(df: Any, flag: str, name: str, path: Path) -> list[Any]:
    if name not in df.columns:
        have = ", ".join(map(str, df.columns[:20])) or "none"
        raise UserError(f"{flag}: {name!r} is not a column of {path}; allowed: one of {have}")
    return list(df[name])


def label_names(values: list[Any]) -> tuple[list[str | None], list[str]]:
    """Label cells as class names, and the classes in index order: integer labels keep their numeric order
    (labels 0..N-1 stay their own indices), other labels are sorted as text. Empty cells give None."""
    names: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            names.append(None)
        elif isinstance(v, float) and v.is_integer():
            names.append(str(int(v)))  # pandas reads an integer column with gaps as floats
        else:
            names.append(str(v).strip())
    present = {n for n in names if n is not None}
    integers = all(n.lstrip("-").isdigit() for n in present)
    classes = sorted(present, key=int) if integers else sorted(present)
    return names, classes


def table_records(path: Path, image_col: str, caption_col: str, label_col: str | None) -> Listing:
    """Rows of the table: image paths relative to the table's folder (or absolute), captions as stored."""
    df = read_table(path)
    images = _column(df, "--image-column", image_col, path)
    captions = _column(df, "--caption-column", caption_col, path)
    labels: list[str | None] = [None] * len(images)
    classes = None
    if label_col is not None:
        labels, classes = label_names(_column(df, "--label-column", label_col, path))
    records, skipped = [], []
    for row, (image, caption, label) in enumerate(zip(images, captions, labels)):
        source = f"{path.name} row {row}"
        if isinstance(image, str) and image.strip() and "://" not in image:  # a URL is reported as one
            image = str(path.parent / image.strip())  # an absolute path stays itself
        if label_col is not None and label is None:
            skipped.append((row, f"label: empty cell in column {label_col!r}"))
        records.append(Record(image if isinstance(image, str) else "", source, caption, label))
    return Listing(records, classes, skipped)
