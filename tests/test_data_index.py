"""The shard index kept beside the tars (NAME.tar.idx.npz): written with the shards, used at start-up
instead of reading tar headers, rebuilt when a tar changed, and optional where the directory is read-only;
held as arrays, and a training rank opens only its own shards' index files."""

from __future__ import annotations

import builtins
import gc
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
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
        with np.load(index_path(tar)) as doc:
            stamp = doc["tar"].tolist()
        st = tar.stat()
        assert stamp == [st.st_size, st.st_mtime_ns]
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
    assert read_index(tars[1], tars[1].stat()).keys == before.index[0].keys  # rewritten
    opened.clear()
    st = tars[2].stat()
    os.utime(tars[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, touched
    loader(data, shards=copy)
    assert opened == ["00002.tar"]


def test_a_damaged_index_is_not_trusted(data, copy, opened):
    tars = resolve_shards(copy)
    index_path(tars[0]).write_text("{not an npz")
    with np.load(index_path(tars[1])) as z:
        doc = dict(z)
    np.savez(index_path(tars[1]), **(doc | {"text": doc["text"][:-1]}))  # offsets and keys disagree
    with np.load(index_path(tars[2])) as z:
        np.savez(index_path(tars[2]), **(dict(z) | {"version": np.int64(999)}))
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

    monkeypatch.setattr(shards, "atomic_path", refuse)  # root ignores directory permissions: refuse as they would
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


@pytest.fixture
def opened_files(monkeypatch):
    """Every file opened through open() or io.open() (index files, stats, tars read for samples), by name."""
    seen: list[str] = []
    real = builtins.open

    def watching(file, *args, **kwargs):
        seen.append(os.path.basename(str(file)))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watching)
    monkeypatch.setattr(io, "open", watching)  # pathlib opens through io.open
    return seen


@pytest.mark.parametrize("world", [2, 3])
def test_a_training_rank_opens_only_its_own_shards_index_files(data, world, opened_files):
    """Shard i belongs to rank i mod W; a rank counts the others from their stats files, never their index."""
    root, _, _ = data
    names = [t.name for t in resolve_shards(root)]
    for rank in range(world):
        opened_files.clear()
        ld = loader(data, shards=root, rank=rank, world_size=world, batch_size=4)
        take(iter(ld), 3)
        mine = names[rank::world]
        assert sorted(n for n in opened_files if ".idx." in n) == [n + shards.INDEX_SUFFIX for n in mine]
        assert {n for n in opened_files if n.endswith(".tar")} == set(mine)  # samples read from its shards only
        assert [s.path for s in ld.index] == [str(root / n) for n in mine]


def test_index_memory_is_read_only_arrays_not_objects_per_sample(tmp_path):
    """A rank's index: a few objects per shard whatever the shard's size, <= 16 bytes a sample, and
    arrays nothing writes to (a forked worker shares their pages)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_index

    grown = []
    for per_shard in (1_000, 20_000):
        d = tmp_path / str(per_shard)
        d.mkdir()
        paths = bench_index.build(d, 4 * per_shard, per_shard)
        gc.collect()
        before = len(gc.get_objects())
        index, total, per_rank = shards.rank_index(paths, 0, 2)
        grown.append(len(gc.get_objects()) - before)
        assert (total, per_rank, [len(s) for s in index]) == (4 * per_shard, 2 * per_shard, [per_shard] * 2)
        for s in index:
            assert all(isinstance(a, np.ndarray) and not a.flags.writeable for a in s.arrays.values())
        del index
    assert grown[0] == grown[1]  # 20x the samples, the same number of Python objects
    assert bench_index.measure(paths, 0, 2)["bytes_per_sample"] <= 16


def test_a_version_1_json_index_is_converted_at_load(data, copy, opened):
    """Shards indexed before issue 23 (NAME.tar.idx.json, keys and [offset, size] per member) start without
    a scan; the index is kept in the new format beside them."""
    tars = resolve_shards(copy)
    reference = take(iter(loader(data, shards=copy)), 4)
    for tar in tars:
        idx, st = index_shard(tar), tar.stat()
        with tarfile.open(tar) as t:
            sizes = {m.offset_data: m.size for m in t.getmembers()}
        members = [
            {"jpg": [o, sizes[o]], "txt": [x, sizes[x]]}
            for o, x in zip(idx.arrays["image"].tolist(), idx.arrays["text"].tolist())
        ]
        doc = {
            "version": 1,
            "tar": {"size": st.st_size, "mtime_ns": st.st_mtime_ns},
            "keys": list(idx.keys),
            "members": members,
        }
        tar.with_name(tar.name + shards.LEGACY_SUFFIX).write_text(json.dumps(doc))
        index_path(tar).unlink()
    opened.clear()
    same_batches(reference, take(iter(loader(data, shards=copy)), 4))
    assert opened == []  # no tar header read
    assert all(read_index(t, t.stat()) == index_shard(t) for t in tars)  # converted and kept


def test_stats_that_overcount_a_ranks_shards_are_one_line(data, copy):
    stats = copy / "00001_stats.json"
    stats.write_text(json.dumps({"count": 1000, "successes": 1000}))
    (copy / "00000_stats.json").write_text(json.dumps({"count": 1000, "successes": 1000}))
    (copy / "00002_stats.json").write_text(json.dumps({"count": 1000, "successes": 1000}))
    with pytest.raises(shards.UserError, match="fewer than their stats files count") as e:
        loader(data, shards=copy, rank=1, world_size=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("stop", [3, 7])
def test_a_rank_of_two_resumes_exactly_with_any_worker_count(data, stop):
    full = take(iter(loader(data, rank=1, world_size=2, batch_size=4)), 12)  # rank 1: shard 1, 20 samples
    first = loader(data, rank=1, world_size=2, batch_size=4, workers=2)
    it = iter(first)
    head = take(it, stop)
    state = first.state_dict()
    resumed = loader(data, rank=1, world_size=2, batch_size=4, workers=1)
    resumed.load_state_dict(state)
    same_batches(head + take(iter(resumed), 12 - stop), full)
    with pytest.raises(shards.UserError, match="version 1"):
        resumed.load_state_dict(state | {"version": 1})


def test_a_state_resumed_on_another_rank_count_keeps_its_share_of_the_epoch(data):
    """DCP resumes on another data-parallel size; with shards split over ranks no order can give the new
    ranks the same samples, so the loader resumes at the same share of the same epoch."""
    from vltrain.checkpoint import remap_loader_state

    two = loader(data, rank=0, world_size=2, batch_size=4)
    take(iter(two), 3)
    state = two.state_dict()
    assert (state["epoch"], state["position"], state["per_rank"]) == (0, 12, 20)  # 60 samples, 3 shards of 20
    three = loader(data, rank=2, world_size=3, batch_size=4)
    three.load_state_dict(remap_loader_state(state, 2, 3))
    assert (three.epoch, three.position) == (0, 12 * 20 // 20)
    one = loader(data, rank=0, world_size=1, batch_size=4)
    one.load_state_dict(remap_loader_state(state, 0, 1))
    assert (one.epoch, one.position) == (0, 12 * 60 // 20)
    with pytest.raises(shards.UserError, match="world_size"):  # not remapped: refused
        one.load_state_dict(state)


def test_the_planners_index_bytes_match_a_loaded_rank(tmp_path):
    """vltrain.data.index_math (clusterctl plan's loader index) against what a rank really holds
    (tracemalloc over rank_index): 16 shards of img2dataset's 10,000 samples on 4 ranks."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_index

    from vltrain.data.index_math import index_host_bytes

    got = bench_index.measure(bench_index.build(tmp_path, 160_000, 10_000), 0, 4)
    held = got["bytes_per_sample"] * got["rank_samples"]
    assert got["rank_samples"] == 40_000 and got["index_files_opened"] == 4
    assert held == pytest.approx(index_host_bytes(160_000, 4), rel=0.2)
