"""The worker's shard cache: verified by hash, limited in size, least recently used first."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from orchcore.errors import CacheFullError, DiskFullError
from testkit.disks import NEEDS_ROOT, can_mount, small_disk
from worker.shardcache import ShardCache


def _put(cache: ShardCache, data: bytes, keep: set[str] = frozenset()) -> str:
    sha = hashlib.sha256(data).hexdigest()
    cache.make_room(len(data), set(keep))
    cache.store(sha, len(data), [data])
    return sha


def test_least_recently_used_shards_go_first_and_held_ones_stay(tmp_path):
    cache = ShardCache(tmp_path, max_bytes=2500)
    a = _put(cache, b"a" * 1000)
    b = _put(cache, b"b" * 1000)
    past = time.time() - 60
    os.utime(cache.path(a), (past, past))
    os.utime(cache.path(b), (past + 1, past + 1))
    cache.touch(a)  # a was used just now: b is the least recently used
    c = _put(cache, b"c" * 1000)
    assert set(cache.list()) == {a, c}
    d = _put(cache, b"d" * 1000, keep={a})  # a is loaded: c goes although a is older
    assert set(cache.list()) == {a, d}
    assert cache.used_bytes() == 2000


def test_too_big_or_all_held_is_a_clear_error(tmp_path):
    cache = ShardCache(tmp_path, max_bytes=1500)
    with pytest.raises(CacheFullError, match="--cache-max-mb"):
        cache.make_room(2000, set())
    a = _put(cache, b"a" * 1000)
    with pytest.raises(CacheFullError, match="held by loaded stages"):
        cache.make_room(1000, {a})


def test_default_limit_is_half_the_free_disk(tmp_path):
    cache = ShardCache(tmp_path)
    assert 0 < cache.max_bytes <= cache.free_bytes()


@pytest.mark.skipif(not can_mount(), reason=NEEDS_ROOT)
def test_a_shard_larger_than_the_disk_is_refused_and_leaves_nothing(tmp_path):
    with small_disk(tmp_path / "disk", 16) as disk:
        cache = ShardCache(disk, max_bytes=1 << 30)  # the limit allows it, the disk does not
        data = bytes(8 << 20)
        with pytest.raises(DiskFullError, match=r"needs 72 MiB free in .*, 16 MiB are free"):
            cache.store(hashlib.sha256(data).hexdigest(), len(data), iter([data]))
        assert list(disk.iterdir()) == [], "a partial file was left"
