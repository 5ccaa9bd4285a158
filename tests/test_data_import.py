"""`vltrain data import` (issue 26, point 2): an image-folder tree or a CSV/TSV/JSONL/Parquet table as
shards the trainer's loader reads; bad images and captions skipped and reported with their keys; a
held-out split disjoint from training; one-line errors that leave nothing behind. And img2dataset's own
WebDataset output (written here with plain tarfile, not the project's writer) read as it is."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from vltrain.common.errors import UserError
from vltrain.data.importer import ImportOptions, import_data, prepare_image
from vltrain.data.loader import ShardLoader
from vltrain.data.shards import iter_samples, resolve_shards
from vltrain.tokenizer import train_tokenizer_from_shards

WORDS = [
    "red",
    "green",
    "blue",
    "round",
    "square",
    "tall",
    "small",
    "big",
    "dark",
    "bright",
    "old",
    "new",
    "wet",
    "dry",
]


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (40, 30), **save) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


def caption(i: int) -> str:
    rng = np.random.default_rng(i)
    return "a photo of a " + " ".join(rng.choice(WORDS, 4)) + f" thing number {i}"


def all_samples(out: Path) -> dict[str, dict]:
    """Every sample of a shard directory by key: members as bytes, json decoded."""
    samples = {}
    for s in iter_samples(resolve_shards(out)):
        samples[s["__key__"]] = s | {"meta": json.loads(s["json"])}
    return samples


def read_with_loader(shards: Path, tok) -> list[tuple[str, str]]:
    """(key, caption) of every sample, read by the trainer's loader in evaluation order."""
    loader = ShardLoader(
        str(shards), rank=0, world_size=1, batch_size=4, seed=0, image_size=32,
        tokenizer=tok, max_len=32, train=False,
    )  # fmt: skip
    pairs = []
    for batch in loader:
        assert batch["images"].shape[1:] == (3, 32, 32)
        pairs += zip(batch["keys"], batch["captions"])
    return pairs


# --- an image-folder tree -------------------------------------------------------------------------------

BAD_FILES = {  # path under ROOT -> the reason the report gives
    "cat/notes.jpg": "image: not an image PIL reads",
    "cat/half.jpg": "image: truncated or damaged",
    "readme.txt": "image: not in a class folder",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/<class>/: 3 classes (one with an underscore, one nested subfolder), PNG/JPEG/WebP/BMP/GIF
    files, and the bad files above; a hidden folder and a hidden file that are not samples."""
    root = tmp_path_factory.mktemp("imgs") / "root"
    good = {}
    for c, name in enumerate(["zebra", "apple", "sea_lion"]):
        for i in range(6):
            fmt = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "PNG"][i]
            rel = f"{name}/{'sub/' if i == 5 else ''}{i}.{fmt.lower()}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(image_bytes(10 * c + i, fmt))
            good[rel] = fmt
    (root / "cat").mkdir()
    (root / "cat/notes.jpg").write_bytes(b"these are notes, not a JPEG")
    (root / "cat/half.jpg").write_bytes(image_bytes(99, "JPEG", (64, 64))[:400])
    (root / "readme.txt").write_text("about these pictures\n")
    (root / ".cache").mkdir()
    (root / ".cache/x.png").write_bytes(image_bytes(1))
    (root / "apple/.DS_Store").write_bytes(b"\0\1")
    return root, good


@pytest.fixture(scope="module")
def imported(folder, tmp_path_factory):
    root, _good = folder
    out = tmp_path_factory.mktemp("out") / "shards"
    opts = ImportOptions(holdout=4, shard_size=5, templates=("a photo of a {}.", "a picture of the {}."), seed=1)
    summary = import_data(out, folder=root, opts=opts)
    return out, summary


def test_folder_classes_captions_and_labels_follow_the_tree(folder, imported):
    _root, good = folder
    out, summary = imported
    classes = ["apple", "cat", "sea lion", "zebra"]  # ImageFolder's order: sorted folder names
    for d in (out, out / "eval"):
        assert json.loads((d / "classes.json").read_text()) == {
            "classes": classes,
            "templates": ["a photo of a {}.", "a picture of the {}."],
        }
    samples = all_samples(out) | all_samples(out / "eval")
    assert sorted(s["meta"]["source"] for s in samples.values()) == sorted(good)
    templates_used = set()
    for s in samples.values():
        name = classes[int(s["cls"])]
        assert s["meta"]["source"].split("/")[0].replace("_", " ") == name == s["meta"]["class"]
        assert s["meta"]["label"] == int(s["cls"])
        text = s["txt"].decode()
        assert text == s["meta"]["caption"] and text in (f"a photo of a {name}.", f"a picture of the {name}.")
        templates_used.add(text.split(" ")[1])
    assert templates_used == {"photo", "picture"}
    assert summary["classes"] == 4 and summary["train"] + summary["eval"] == len(good) == 18


def test_images_copied_as_they_are_unless_the_loader_cannot_read_the_format(folder, imported):
    root, good = folder
    out, summary = imported
    for s in (all_samples(out) | all_samples(out / "eval")).values():
        src = (root / s["meta"]["source"]).read_bytes()
        fmt = good[s["meta"]["source"]]
        if fmt in ("PNG", "JPEG", "WEBP"):
            ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
            assert s[ext] == src  # byte for byte
        else:  # BMP, GIF: decoded and stored as JPEG of the same size
            assert "jpg" in s and Image.open(io.BytesIO(s["jpg"])).size == Image.open(io.BytesIO(src)).size
        assert s["meta"]["sha256"] == hashlib.sha256(src).hexdigest()
    assert summary["copied"] == 12 and summary["reencoded"] == 6


def test_bad_files_are_skipped_and_reported_with_their_keys(folder, imported):
    out, _summary = imported
    report = json.loads((out / "import_report.json").read_text())
    assert {b["source"]: b["reason"].split(" (")[0] for b in report["bad"]} == BAD_FILES
    written = set(all_samples(out)) | set(all_samples(out / "eval"))
    bad_keys = {b["key"] for b in report["bad"]}
    assert not bad_keys & written and len(bad_keys) == len(BAD_FILES)
    assert [b["key"] for b in report["bad"]] == sorted(bad_keys)  # listed in source order
    assert report["samples"] == 18 + len(BAD_FILES) and report["skipped"] == len(BAD_FILES)
    assert sum(report["skipped_by_reason"].values()) == len(BAD_FILES)


def test_holdout_is_disjoint_and_the_loader_reads_both_splits(imported, tmp_path):
    out, summary = imported
    train, held = all_samples(out), all_samples(out / "eval")
    assert len(held) == summary["eval"] == 4 and len(train) == summary["train"] == 14
    assert not set(train) & set(held)
    assert not {s["meta"]["source"] for s in train.values()} & {s["meta"]["source"] for s in held.values()}
    assert [len(list(iter_samples([p]))) for p in resolve_shards(out)] == [5, 5, 4]  # --shard-size 5
    for p in resolve_shards(out):
        stats = json.loads(p.with_name(p.stem + "_stats.json").read_text())
        assert stats["successes"] == len(list(iter_samples([p])))
        assert p.with_name(p.name + ".idx.npz").is_file()
    tok = train_tokenizer_from_shards(out, 30, tmp_path / "tok.model")
    for d, samples in ((out, train), (out / "eval", held)):
        pairs = read_with_loader(d, tok)
        assert sorted(pairs) == sorted((k, s["txt"].decode()) for k, s in samples.items())


def test_same_seed_same_split_other_seed_other_split(folder, tmp_path):
    root, _ = folder

    def held(seed: int, name: str) -> set[str]:
        import_data(tmp_path / name, folder=root, opts=ImportOptions(holdout=6, seed=seed))
        return set(all_samples(tmp_path / name / "eval"))

    assert held(5, "a") == held(5, "b") != held(6, "c")


def test_image_size_shrinks_the_shorter_side_and_turns_rotated_photos_upright():
    big = image_bytes(1, "PNG", (120, 80))
    ext, data, sizes = prepare_image(big, 40)
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (60, 40)
    assert sizes == {"original_width": 120, "original_height": 80, "width": 60, "height": 40}
    small = image_bytes(2, "PNG", (30, 20))
    assert prepare_image(small, 40) == (
        "png",
        small,
        {"original_width": 30, "original_height": 20, "width": 30, "height": 20},
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored sideways
    rotated = image_bytes(3, "JPEG", (50, 30), exif=exif)
    ext, data, sizes = prepare_image(rotated, None)
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (30, 50) and sizes["width"] == 30


# --- tables ---------------------------------------------------------------------------------------------

# row -> (image file or None, caption cell, the reason it is skipped or None)
ROWS = [
    ("img/0.png", caption(0), None),
    ("img/1.jpg", caption(1), None),
    ("img/2.png", "", "caption: empty"),
    ("img/3.png", "x" * 1200, "caption: too long"),
    ("img/missing.png", caption(4), "image: missing file"),
    ("img/5.png", caption(5), None),
    ("https://example.com/6.jpg", caption(6), "image: a URL, not a local file"),
    ("img/7.png", "   \n ", "caption: empty"),
    ("img/8.webp", caption(8) + "\nsecond line", None),
    ("img/9.png", caption(9), None),
]


def write_table(d: Path, fmt: str) -> Path:
    """The ROWS as a table of format `fmt` in d (images in d/img, paths relative to the table), with
    one more bad caption per format: a number (JSONL, Parquet) or bytes that are not UTF-8 (CSV, TSV)."""
    (d / "img").mkdir(parents=True, exist_ok=True)
    for i, (path, _, _) in enumerate(ROWS):
        if path.startswith("img/") and "missing" not in path:
            (d / path).write_bytes(image_bytes(i, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[path.rsplit(".")[-1]]))
    rows = [{"image": p, "text": c, "kind": f"k{i % 3}"} for i, (p, c, _) in enumerate(ROWS)]
    (d / "img/10.png").write_bytes(image_bytes(10))
    if fmt in ("csv", "tsv"):
        import csv

        sep = "\t" if fmt == "tsv" else ","
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["image", "text", "kind"], delimiter=sep, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        raw = buf.getvalue().encode() + sep.join(["img/10.png", "caf\xe9 au lait", "k1"]).encode("latin-1") + b"\n"
        (d / f"t.{fmt}").write_bytes(raw)
    elif fmt == "jsonl":
        lines = [json.dumps(r) for r in rows] + [json.dumps({"image": "img/10.png", "text": 42, "kind": "k1"})]
        (d / "t.jsonl").write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {k: [r[k] for r in rows] for k in ("image", "text", "kind")}
        table = pa.table({"image": cols["image"] + ["img/10.png"], "kind": cols["kind"] + ["k1"],
                          "text": pa.array([c.encode() for c in cols["text"]] + [b"caf\xe9"], pa.binary())})  # fmt: skip
        pq.write_table(table, d / "t.parquet")
    return d / f"t.{fmt}"


EXTRA_REASON = {"csv": "caption: not UTF-8", "tsv": "caption: not UTF-8", "jsonl": "caption: not a string",
                "parquet": "caption: not UTF-8"}  # fmt: skip


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_table_rows_become_samples_and_bad_rows_are_reported(tmp_path, fmt):
    table = write_table(tmp_path / "src", fmt)
    out = tmp_path / "out"
    s = import_data(out, table=table, opts=ImportOptions(holdout=2, seed=3), caption_column="text")
    expected_bad = {f"{i:09d}": r for i, (_, _, r) in enumerate(ROWS) if r} | {"000000010": EXTRA_REASON[fmt]}
    report = json.loads((out / "import_report.json").read_text())
    assert {b["key"]: b["reason"].split(" (")[0] for b in report["bad"]} == expected_bad
    assert {b["source"] for b in report["bad"]} == {f"t.{fmt} row {int(k)}" for k in expected_bad}
    samples = all_samples(out) | all_samples(out / "eval")
    good = {f"{i:09d}": " ".join(c.split()) for i, (_, c, r) in enumerate(ROWS) if not r}
    assert {k: s["txt"].decode() for k, s in samples.items()} == good  # newlines folded into spaces
    assert all("cls" not in s for s in samples.values()) and not (out / "classes.json").exists()
    assert s["eval"] == 2 and s["train"] == len(good) - 2 and s["classes"] is None


def test_label_column_gives_classes_in_numeric_order(tmp_path):
    d = tmp_path / "src"
    (d / "img").mkdir(parents=True)
    labels = [10, 2, 2, None, 10, 0]
    lines = []
    for i, label in enumerate(labels):
        (d / f"img/{i}.png").write_bytes(image_bytes(i))
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": caption(i), "y": label}))
    (d / "t.jsonl").write_text("\n".join(lines) + "\n")
    import_data(tmp_path / "out", table=d / "t.jsonl", label_column="y")
    samples = all_samples(tmp_path / "out")
    classes = json.loads((tmp_path / "out/classes.json").read_text())["classes"]
    assert classes == ["0", "2", "10"]  # integers in numeric order, not as text ("10" < "2")
    assert {k: classes[int(s["cls"])] for k, s in samples.items()} == {
        f"{i:09d}": str(y) for i, y in enumerate(labels) if y is not None
    }
    report = json.loads((tmp_path / "out/import_report.json").read_text())
    assert [(b["key"], b["reason"]) for b in report["bad"]] == [("000000003", "label: empty cell in column 'y'")]


# --- errors: one line, exit 2, nothing written -----------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    "args, said",
    [
        (["--folder", "{root}", "--table", "{t}"], "--folder/--table: give exactly one"),
        ([], "--folder/--table: give exactly one"),
        (["--folder", "{empty}"], "--folder: {empty} has no usable sample among 1 (first: empty/x.txt: image: not an image"),
        (["--folder", "{root}", "--holdout", "500"], "--holdout: 500 of 21 samples; allowed: 0 to 20"),
        (["--folder", "{root}", "--image-size", "big"], "--image-size: 'big'; allowed: none"),
        (["--folder", "{root}", "--caption-template", "a photo"], "--caption-template: 'a photo'; allowed: text with one {{}}"),
        (["--folder", "{root}", "--label-column", "y"], "--label-column: names a table's column; allowed: with --table only"),
        (["--table", "{t}", "--caption-column", "nope"], "--caption-column: 'nope' is not a column of {t}; allowed: one of image, caption"),
        (["--table", "{xlsx}"], "--table: {xlsx} has the suffix '.xlsx'; allowed: .csv"),
        (["--table", "{bad}"], "--table: {bad} cannot be read as jsonl ("),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(folder, tmp_path, args, said):
    root, _ = folder
    (tmp_path / "empty/empty").mkdir(parents=True)
    (tmp_path / "empty/empty/x.txt").write_text("no image")
    (tmp_path / "t.csv").write_text("image,caption\nimg/0.png,hello\n")
    (tmp_path / "t.xlsx").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": \n')
    where = {"root": root, "empty": tmp_path / "empty", "t": tmp_path / "t.csv", "xlsx": tmp_path / "t.xlsx",
             "bad": tmp_path / "bad.jsonl"}  # fmt: skip
    r = run_cli("data", "import", "--out", str(tmp_path / "out"), *(a.format(**where) for a in args), prog="vltrain")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: {said.format(**where)}"), lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_non_empty_out_is_refused_and_left_alone(folder, tmp_path):
    root, _ = folder
    (tmp_path / "out").mkdir()
    (tmp_path / "out/mine.txt").write_text("keep me")
    r = run_cli("data", "import", "--out", str(tmp_path / "out"), "--folder", str(root), prog="vltrain")
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"error: --out: {tmp_path / 'out'} is not empty; allowed: a new or empty directory"
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_failure_midway_leaves_nothing(folder, tmp_path, monkeypatch):
    import vltrain.data.importer as importer

    root, _ = folder
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    real = importer.make_sample
    monkeypatch.setattr(importer, "make_sample", failing)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        import_data(tmp_path / "out", folder=root, opts=ImportOptions(shard_size=2))
    assert list((tmp_path / "out").iterdir()) == [] and leftovers(tmp_path) == []


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
    table = write_table(tmp_path / "src", "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet raises ImportError
    with pytest.raises(
        UserError,
        match=r"^--table: .*t\.parquet is Parquet, which needs pyarrow; allowed: pip install '\.\[realdata\]'",
    ):
        import_data(tmp_path / "out", table=table)
    assert not (tmp_path / "out").exists()


def test_cli_prints_counts_and_the_first_skipped_keys(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "out"
    r = run_cli("data", "import", "--out", str(out), "--folder", str(root), "--holdout", "3", "--image-size", "16",
                prog="vltrain")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.splitlines()[0]
        == f"wrote 15 samples in 1 shards to {out}, 3 held out in {out}/eval, 4 classes (classes.json)"
    )
    report = json.loads((out / "import_report.json").read_text())
    err = r.stderr.splitlines()
    assert err[:3] == [f"skipped {b['key']} ({b['source']}): {b['reason']}" for b in report["bad"]]
    assert err[3].startswith("skipped 3 of 21 samples (") and err[3].endswith(f"all listed in {out}/import_report.json")
    assert all(min(s["meta"]["width"], s["meta"]["height"]) == 16 for s in all_samples(out).values())
    r = run_cli("data", "import", "--out", str(tmp_path / "j"), "--folder", str(root), "--json", prog="vltrain")
    assert json.loads(r.stdout)["written"] == 18


# --- img2dataset's output, read as it is ----------------------------------------------------------------


def write_img2dataset_shard(d: Path, shard: int, n: int, failed: set[int]) -> list[tuple[str, str]]:
    """One shard as img2dataset writes it (plain tarfile here, not the project's writer): KEY.jpg, KEY.txt,
    KEY.json per successful download, keys = shard id (5 digits) + position (4 digits) with gaps where a
    download failed, NNNNN_stats.json and NNNNN.parquet (every row, failures included) beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    rows, written = [], []
    with tarfile.open(d / f"{shard:05d}.tar", "w") as tar:
        for i in range(n):
            key, url, text = f"{shard:05d}{i:04d}", f"https://example.com/{shard}/{i}.jpg", caption(100 * shard + i)
            ok = i not in failed
            jpg = image_bytes(100 * shard + i, "JPEG", (48, 36)) if ok else b""
            meta = {
                "url": url, "key": key, "status": "success" if ok else "failed_to_download",
                "error_message": None if ok else "HTTP Error 404: Not Found", "caption": text,
                "width": 48 if ok else None, "height": 36 if ok else None, "original_width": 96 if ok else None,
                "original_height": 72 if ok else None, "exif": None,
                "sha256": hashlib.sha256(jpg).hexdigest() if ok else None,
            }  # fmt: skip
            rows.append(meta)
            if not ok:
                continue
            written.append((key, text))
            for ext, data in (("jpg", jpg), ("txt", text.encode()), ("json", json.dumps(meta, indent=4).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime, info.uname, info.gname = (
                    len(data),
                    0o444,
                    1700000000,
                    "bigdata",
                    "bigdata",
                )
                tar.addfile(info, io.BytesIO(data))
    stats = {
        "count": n, "successes": n - len(failed), "failed_to_download": len(failed), "failed_to_resize": 0,
        "duration": 1.5, "bytes_downloaded": 12345, "start_time": 1700000000.0, "end_time": 1700000001.5,
        "status_dict": {"success": n - len(failed), "HTTP Error 404: Not Found": len(failed)},
    }  # fmt: skip
    (d / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    pq.write_table(pa.Table.from_pylist(rows), d / f"{shard:05d}.parquet")
    return written


def test_img2dataset_shards_are_read_as_they_are(tmp_path):
    d = tmp_path / "laion-like"
    written = write_img2dataset_shard(d, 0, 12, failed={3, 7}) + write_img2dataset_shard(d, 1, 9, failed={0})
    assert [p.name for p in resolve_shards(d)] == ["00000.tar", "00001.tar"]  # the parquet and stats are not shards
    r = run_cli("tokenizer", "train", "--shards", str(d), "--vocab-size", "60", "--out", str(tmp_path / "tok.model"),
                prog="vltrain")  # fmt: skip
    assert r.returncode == 0, r.stderr
    from vltrain.tokenizer import Tokenizer

    tok = Tokenizer.load(tmp_path / "tok.model")
    assert sorted(read_with_loader(d, tok)) == sorted(written)  # every success, no failed key, its own caption
    train = ShardLoader(str(d), rank=0, world_size=2, batch_size=3, seed=0, image_size=32, tokenizer=tok,
                        max_len=32, train=True)  # fmt: skip
    assert train.samples_per_epoch == 8  # the smallest rank's count: shard 1's 8 successes (its stats file)


@pytest.mark.slow
def test_imported_folder_trains_and_evaluates_zero_shot(imported, tmp_path):
    """A few steps of the trainer on imported shards; evaluation reads the held-out split and its classes."""
    from vltrain.common.atomic import write_toml
    from vltrain.data.digits_recipe import digits_recipe

    out, summary = imported
    cfg = digits_recipe(str(out), str(out / "eval"), image_size=32)
    cfg["model"]["vocab_size"] = 30  # the imported captions are a small corpus
    cfg |= {"steps": 3, "global_batch": 8}
    write_toml(tmp_path / "train.toml", cfg)
    r = run_cli("train", "--config", str(tmp_path / "train.toml"), "--run-dir", str(tmp_path / "run"),
                prog="vltrain", timeout=300, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["n"] == summary["eval"] == 4
    assert result["zero_shot"]["classes"] == 4 and result["zero_shot"]["n"] == 4
