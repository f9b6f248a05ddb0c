"""ByteLRUCache and image_key."""

import threading

import numpy as np

from samsem_plugin.cache import ByteLRUCache, image_key


def test_evicts_least_recently_used_to_stay_within_bytes():
    cache = ByteLRUCache(max_bytes=3000)
    for name in "abc":
        cache.put(name, np.zeros(1000, dtype=np.uint8))
    assert cache.get("a") is not None  # a is now most recent
    cache.put("d", np.zeros(1000, dtype=np.uint8))
    assert "b" not in cache and "a" in cache and "d" in cache
    assert cache.nbytes == 3000 and cache.evictions == 1


def test_value_larger_than_bound_is_not_stored_and_zero_disables():
    cache = ByteLRUCache(max_bytes=100)
    assert cache.put("big", np.zeros(101, dtype=np.uint8)) is False
    assert len(cache) == 0
    off = ByteLRUCache(max_bytes=0)
    off.put("x", np.zeros(1, dtype=np.uint8))
    assert off.get("x") is None and off.misses == 1


def test_replacing_a_key_accounts_bytes_once():
    cache = ByteLRUCache(max_bytes=10_000)
    cache.put("k", np.zeros(4000, dtype=np.uint8))
    cache.put("k", np.zeros(1000, dtype=np.uint8))
    assert cache.nbytes == 1000 and len(cache) == 1


def test_concurrent_puts_never_exceed_bound():
    cache = ByteLRUCache(max_bytes=50_000)

    def worker(seed: int) -> None:
        for i in range(200):
            cache.put(f"{seed}-{i}", np.zeros(1000 + seed, dtype=np.uint8))
            assert cache.nbytes <= 50_000

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes <= 50_000


def test_image_key_depends_on_content_shape_and_dtype():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    other = image.copy()
    other[0, 0, 0] = 1
    assert image_key(image) == image_key(image.copy())
    assert image_key(image) != image_key(other)
    assert image_key(image) != image_key(image.reshape(5, 4, 3))
    assert image_key(image[:, ::-1]) == image_key(np.ascontiguousarray(image[:, ::-1]))
