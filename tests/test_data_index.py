"""The shard index kept beside the tars (NAME.tar.idx.json): written with the shards, used at start-up
instead of reading tar headers, rebuilt when a tar changed, and optional where the directory is read-only."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest

from tests.test_data import HOLDOUT, SIZE, loader, same_batches, take
from vltrain.data import shards
from vltrain.data.shards import ShardWriter, index_path, index_shard, read_index, resolve_shards, shard_index
from vltrain.data.synth import write_synthetic_shards
from vltrain.tokenizer import train_tokenizer_from_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """test_data's shards (fewer samples) and tokenizer, as its `loader` helper takes them."""
    root = tmp_path_factory.mktemp("synth")
    summary = write_synthetic_shards(root, 60, 3, seed=7, image_size=SIZE, holdout=HOLDOUT)
    return root, summary, train_tokenizer_from_shards(root, 150, root / "tok.model")


@pytest.fixture
def opened(monkeypatch):
    """The tars whose headers are read (tarfile.open), in order."""
    seen: list[str] = []
    real = tarfile.open

    def counting(name=None, *args, **kwargs):
        seen.append(os.path.basename(str(name)))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting)
    return seen


@pytest.fixture
def copy(data, tmp_path):
    """A private copy of the test shards (tars, stats and indexes), so that a test may change them."""
    root, _, _ = data
    out = tmp_path / "shards"
    out.mkdir()
    for p in root.iterdir():
        if p.is_file():
            shutil.copy2(p, out / p.name)
    return out


def test_writing_shards_writes_their_index_beside_them(data):
    root, summary, _ = data
    tars = resolve_shards(root) + resolve_shards(summary["eval_out"])
    for tar in tars:
        doc = json.loads(index_path(tar).read_text())
        st = tar.stat()
        assert doc["tar"] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        assert read_index(tar, st) == index_shard(tar)  # the same keys and member offsets as a scan
    assert [p.name for p in resolve_shards(root)] == ["00000.tar", "00001.tar", "00002.tar"]  # not a shard


def test_a_start_with_the_index_reads_no_tar_header_and_gives_the_same_batches(data, copy, opened):
    with_index = take(iter(loader(data, shards=copy)), 10)  # 80 samples: crosses an epoch boundary
    assert opened == []
    for tar in resolve_shards(copy):
        index_path(tar).unlink()
    scanned = take(iter(loader(data, shards=copy)), 10)  # no index: scans each tar once and keeps its index
    assert opened == ["00000.tar", "00001.tar", "00002.tar"]
    same_batches(with_index, scanned)
    assert all(index_path(t).is_file() for t in resolve_shards(copy))
    opened.clear()
    same_batches(with_index, take(iter(loader(data, shards=copy)), 10))
    assert opened == []


def test_a_changed_or_replaced_shard_is_indexed_again(data, copy, opened):
    before = loader(data, shards=copy)
    tars = resolve_shards(copy)
    shutil.copyfile(tars[0], tars[1])  # replaced by other samples, size and mtime changed; its index left stale
    after = loader(data, shards=copy)
    assert opened == ["00001.tar"]
    assert after.index[1].keys == before.index[0].keys != before.index[1].keys
    assert json.loads(index_path(tars[1]).read_text())["keys"] == list(before.index[0].keys)
    opened.clear()
    st = tars[2].stat()
    os.utime(tars[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, touched
    loader(data, shards=copy)
    assert opened == ["00002.tar"]


def test_a_damaged_index_is_not_trusted(data, copy, opened):
    tars = resolve_shards(copy)
    index_path(tars[0]).write_text("{not json")
    doc = json.loads(index_path(tars[1]).read_text())
    doc["keys"] = doc["keys"][:-1]  # keys and members disagree
    index_path(tars[1]).write_text(json.dumps(doc))
    doc = json.loads(index_path(tars[2]).read_text())
    doc["version"] = 999
    index_path(tars[2]).write_text(json.dumps(doc))
    got = loader(data, shards=copy)
    assert opened == ["00000.tar", "00001.tar", "00002.tar"]
    assert [s.keys for s in got.index] == [index_shard(t).keys for t in tars]
    assert all(read_index(t, t.stat()) == index_shard(t) for t in tars)  # rewritten


def test_a_read_only_directory_is_scanned_at_each_start(data, copy, opened, monkeypatch):
    reference = take(iter(loader(data, shards=copy)), 12)
    for tar in resolve_shards(copy):
        index_path(tar).unlink()

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shards, "atomic_write", refuse)  # root ignores directory permissions: refuse as they would
    os.chmod(copy, 0o555)
    try:
        for _ in range(2):
            opened.clear()
            same_batches(reference, take(iter(loader(data, shards=copy)), 12))
            assert opened == ["00000.tar", "00001.tar", "00002.tar"]
        assert not any(index_path(t).exists() for t in resolve_shards(copy))
    finally:
        os.chmod(copy, 0o755)


def test_a_shard_written_over_an_old_one_gets_a_fresh_index(copy):
    tar = resolve_shards(copy)[0]
    with ShardWriter(tar) as w:
        w.write({"__key__": "x1", "jpg": b"\xff\xd8", "txt": b"a red disk"})
    st = tar.stat()
    assert read_index(tar, st).keys == ("x1",) == shard_index(tar).keys


def test_a_missing_shard_is_one_line(tmp_path):
    with pytest.raises(shards.UserError, match="is not a readable tar"):
        shard_index(tmp_path / "00000.tar")
