"""ShardCache against a real HTTP server on 127.0.0.1 serving shards written by webdataset."""

import contextlib
import fcntl
import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from loaders import DataError, Loader, Sampler, TarSource
from loaders._remote import _SHARD_FILE, ShardCache, is_remote, needs_cache
from loaders._shards import read_manifest, resolve_shards
from tests.httpserver import Server


@pytest.fixture
def served(tmp_path, request):
    """The webdataset shards of the session fixture, copied to a folder a loopback server serves."""
    folder = tmp_path / "www"
    folder.mkdir()
    for s in request.getfixturevalue("wds_shards"):
        shutil.copy(s, folder)
    server = Server(str(folder))
    yield server, sorted(os.listdir(folder))
    server.close()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def sha(path, algo="sha1"):
    return hashlib.new(algo, read(path)).hexdigest()


def test_urls_and_compressed_paths_are_told_apart():
    assert is_remote("http://h/a.tar") and is_remote("s3://b/a.tar") and is_remote("HTTPS://h/a.tar")
    assert not is_remote("/data/a.tar") and not is_remote("file:///data/a.tar") and not is_remote("a.tar")
    assert needs_cache("/data/a.tar.gz") and needs_cache("x.tgz") and not needs_cache("/data/a.tar")


def test_fetch_gives_the_same_bytes_and_fetches_once(served, tmp_path):
    server, names = served
    cache = ShardCache(tmp_path / "cache")
    url = f"{server.url}/{names[0]}"
    path = cache.fetch(url)
    assert read(path) == read(os.path.join(server.folder, names[0]))
    assert cache.fetch(url) == path and ShardCache(tmp_path / "cache").fetch(url) == path
    assert server.gets[names[0]] == 1
    assert os.path.dirname(path) == str(tmp_path / "cache") and not os.listdir(tmp_path / "cache" / ".locks")[0].startswith("/")


def test_retries_5xx_and_429_then_succeeds(served, tmp_path):
    server, names = served
    server.faults[names[0]] = {"status": [503, 429, 500]}
    path = ShardCache(tmp_path / "c", backoff=0.01).fetch(f"{server.url}/{names[0]}")
    assert sha(path) == sha(os.path.join(server.folder, names[0]))
    assert server.gets[names[0]] == 4


def test_dropped_connection_resumes_with_a_range_request(served, tmp_path):
    server, names = served
    size = os.path.getsize(os.path.join(server.folder, names[0]))
    server.faults[names[0]] = {"drop_after": size // 3}
    seen = []
    cache = ShardCache(tmp_path / "c", backoff=0.01, progress=lambda url, done, total: seen.append((done, total)))
    path = cache.fetch(f"{server.url}/{names[0]}")
    assert sha(path) == sha(os.path.join(server.folder, names[0]))
    assert server.gets[names[0]] == 2
    dones = [d for d, _ in seen]
    assert size // 3 in dones and dones == sorted(dones) and seen[-1] == (size, size)  # went on from size // 3


def test_after_the_retries_a_data_error_names_the_url_and_keeps_the_partial_file(served, tmp_path):
    server, names = served
    server.faults[names[0]] = {"truncate": 1000}
    url = f"{server.url}/{names[0]}"
    cache = ShardCache(tmp_path / "c", retries=2, backoff=0.01)
    size = os.path.getsize(os.path.join(server.folder, names[0]))
    with pytest.raises(DataError, match=rf"^{url}: download failed after 3 tries \(short body: 3000 of {size} bytes\); "
                                        r"the partial file .*\.part is kept for the next run to resume$"):
        cache.fetch(url)  # each try resumed where the last one stopped: 1000 bytes each
    assert not os.path.exists(cache.local_path(url))
    assert os.path.getsize(cache.local_path(url) + ".part") == 3000
    server.faults.clear()  # the next run resumes from byte 3000
    path = cache.fetch(url)
    assert sha(path) == sha(os.path.join(server.folder, names[0]))


def test_a_partial_download_of_another_version_is_started_over(served, tmp_path):
    server, names = served
    size = os.path.getsize(os.path.join(server.folder, names[0]))
    server.faults[names[0]] = {"drop_after": size // 2, "etags": ['"v1"', '"v2"']}  # it changes after the drop
    path = ShardCache(tmp_path / "c", backoff=0.01).fetch(f"{server.url}/{names[0]}")
    assert sha(path) == sha(os.path.join(server.folder, names[0]))
    assert server.ranges[names[0]] == [None, f"bytes={size // 2}-", None]  # the resumed answer was of v2: over
    assert sorted(os.listdir(tmp_path / "c" / ".locks")) == [os.path.basename(path) + ".lock"]  # no ETag note left


def test_404_fails_at_once(served, tmp_path):
    server, _ = served
    url = f"{server.url}/missing.tar"
    with pytest.raises(DataError, match=rf"^{url}: HTTP 404 Not Found$"):
        ShardCache(tmp_path / "c", backoff=0.01).fetch(url)
    assert server.gets["missing.tar"] == 1


def test_wrong_checksum_or_size_deletes_the_file(served, tmp_path):
    server, names = served
    url = f"{server.url}/{names[0]}"
    cache = ShardCache(tmp_path / "c")
    good = sha(os.path.join(server.folder, names[0]))
    with pytest.raises(DataError, match=rf"^{url}: downloaded file does not match: sha1 {good}, expected 0{{40}}; "
                                        "it was deleted, not used$"):
        cache.fetch(url, sha1="0" * 40)
    assert not os.path.exists(cache.local_path(url)) and not os.path.exists(cache.local_path(url) + ".part")
    with pytest.raises(DataError, match=r"downloaded file does not match: \d+ bytes, expected 5;"):
        cache.fetch(url, size=5)
    assert cache.fetch(url, sha1=good, sha256=sha(os.path.join(server.folder, names[0]), "sha256"))


def test_server_ignoring_range_starts_over(served, tmp_path):
    server, names = served
    size = os.path.getsize(os.path.join(server.folder, names[0]))
    server.faults[names[0]] = {"drop_after": size // 2, "ignore_range": True}
    path = ShardCache(tmp_path / "c", backoff=0.01).fetch(f"{server.url}/{names[0]}")
    assert sha(path) == sha(os.path.join(server.folder, names[0]))


def test_compressed_shards_are_decompressed_once(served, tmp_path):
    server, names = served
    plain = os.path.join(server.folder, names[0])
    with gzip.open(os.path.join(server.folder, "z.tgz"), "wb") as g:
        g.write(read(plain))
    local_gz = str(tmp_path / "local.tar.gz")
    shutil.copy(os.path.join(server.folder, "z.tgz"), local_gz)
    cache = ShardCache(tmp_path / "c")
    for url in (f"{server.url}/z.tgz", local_gz):
        path = cache.fetch(url)
        assert path.endswith(".tar") and sha(path) == sha(plain)
    assert server.gets["z.tgz"] == 1 and os.path.exists(local_gz)
    (tmp_path / "bad.tgz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"bad.tgz: not a valid gzip file"):
        cache.fetch(str(tmp_path / "bad.tgz"))


def test_a_compressed_shard_that_expands_too_far_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    import loaders._remote as remote

    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(b"\0" * 5 * 2**20))  # 5 MiB of zeros: 5 kB compressed
    monkeypatch.setattr(remote, "CHUNK", 2**20)
    monkeypatch.setattr(remote, "GUNZIP_LIMIT", 3 * 2**20)
    cache = ShardCache(tmp_path / "c")
    with pytest.raises(DataError) as e:
        cache.fetch(str(bomb))
    assert str(e.value) == f"{bomb}: decompresses to more than {3 * 2**20} bytes; refusing it"
    assert [n for n in os.listdir(tmp_path / "c") if not n.startswith(".")] == []  # no .part left


def test_cache_stays_under_its_limit_plus_one_shard_and_keeps_pinned(served, tmp_path):
    server, names = served
    sizes = [os.path.getsize(os.path.join(server.folder, n)) for n in names]
    limit = 2 * max(sizes)
    cache = ShardCache(tmp_path / "c", limit=limit)
    urls = [f"{server.url}/{n}" for n in names]
    cache.pin([urls[0]])
    for u in urls:
        cache.fetch(u)
        held = sum(e.stat().st_size for e in os.scandir(tmp_path / "c") if e.is_file())
        assert held <= limit + max(sizes)
    assert os.path.exists(cache.local_path(urls[0]))  # pinned: never evicted
    assert not os.path.exists(cache.local_path(urls[1]))  # the least recently used one went


def test_prefetch_runs_in_the_background_and_fetch_waits_for_it(served, tmp_path):
    server, names = served
    cache = ShardCache(tmp_path / "c", workers=2)
    urls = [f"{server.url}/{n}" for n in names]
    cache.prefetch(urls)
    paths = [cache.fetch(u) for u in urls]
    assert [sha(p) for p in paths] == [sha(os.path.join(server.folder, n)) for n in names]
    assert all(server.gets[n] == 1 for n in names)
    cache.close()


def test_plan_pins_what_fits_and_drops_what_is_no_longer_wanted(served, tmp_path):
    server, names = served
    urls = urls_of(server, names)
    sizes = {u: os.path.getsize(os.path.join(server.folder, n)) for u, n in zip(urls, names, strict=True)}
    cache = ShardCache(tmp_path / "c", limit=sizes[urls[0]] + sizes[urls[1]], workers=1)
    assert cache.plan(urls, sizes=sizes) == urls[:2]  # the first two fit; the rest wait
    assert [cache.fetch(u) for u in urls[:2]] == [cache.local_path(u) for u in urls[:2]]
    assert [server.gets[n] for n in names] == [1, 1, 0, 0, 0]
    server.faults[names[2]] = {"throttle": 8192}  # slow: the one worker is busy with it ...
    cache.plan(urls[2:4], sizes=sizes)
    time.sleep(0.05)
    cache.plan([urls[4]], sizes=sizes)  # ... when the window moves on: the queued fetch of urls[3] is dropped
    assert cache.fetch(urls[4]) == cache.local_path(urls[4])
    cache.close()
    assert [server.gets[n] for n in names] == [1, 1, 1, 0, 1]
    assert os.path.exists(cache.local_path(urls[4])) and not os.path.exists(cache.local_path(urls[3]))


def test_two_processes_sharing_a_cache_download_each_shard_once(served, tmp_path):
    server, names = served
    code = textwrap.dedent(f"""
        import sys
        from loaders._remote import ShardCache
        cache = ShardCache({str(tmp_path / "shared")!r}, workers=3)
        urls = [{server.url!r} + "/" + n for n in {names!r}]
        cache.prefetch(urls)
        print(sum(len(open(cache.fetch(u), "rb").read()) for u in urls))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    total = sum(os.path.getsize(os.path.join(server.folder, n)) for n in names)
    assert [int(o) for o in outs] == [total, total]
    assert all(server.gets[n] == 1 for n in names), dict(server.gets)
    assert np.all([p.returncode == 0 for p in procs])


# --------------------------------------------------------------------------- TarSource over the cache

FAST = {"retries": 2, "backoff": 0.01, "timeout": 10}


def urls_of(server, names):
    return [f"{server.url}/{n}" for n in names]


def batches(source, batch=32, shuffle="full", window=8, **kw):
    sampler = Sampler(len(source), batch, seed=3, shuffle=shuffle, num_epochs=1, window=window,
                      blocks=source.block_starts if shuffle == "block" else None)
    return list(Loader(source, sampler, **kw))


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def shard_files(folder):
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and _SHARD_FILE.match(e.name))


def held_bytes(folder):
    """Bytes of the files in ``folder`` (files deleted while it looks count as gone)."""
    total = 0
    with os.scandir(folder) as it:
        for e in it:
            with contextlib.suppress(FileNotFoundError):
                total += e.stat().st_size if e.is_file() else 0
    return total


@pytest.fixture
def served_plain(tmp_path, wds_shards_plain):
    folder = tmp_path / "www_plain"
    folder.mkdir()
    for s in wds_shards_plain:
        shutil.copy(s, folder)
    server = Server(str(folder))
    yield server, sorted(os.listdir(folder))
    server.close()


@pytest.mark.parametrize("kind", ["pax", "ustar"])
def test_tar_source_over_http_gives_the_batches_of_the_local_files(kind, request, tmp_path):
    server, names = request.getfixturevalue("served" if kind == "pax" else "served_plain")
    local = TarSource([os.path.join(server.folder, n) for n in names])
    remote = TarSource(urls_of(server, names), cache_dir=tmp_path / "c", fetch_options=FAST)
    assert len(remote) == len(local) and remote.shards == urls_of(server, names)
    assert_same(batches(remote), batches(local))
    assert remote.describe() == local.describe()  # the same data: a state saved on one restores on the other
    assert dict(server.gets) == {n: 1 for n in names}  # indexing downloaded each once; reading reused them
    assert remote.sample_key(5) == local.sample_key(5)
    assert remote[7]["cls"] == local[7]["cls"]


def test_a_yaml_list_of_urls_and_a_brace_pattern_name_the_same_shards(served, tmp_path):
    server, names = served
    listing = tmp_path / "streamable_train_tars.yaml"
    listing.write_text("tars:\n  seq_b:\n" + "".join(f"  - {u}\n" for u in urls_of(server, names[2:])) +
                       "  seq_a:\n" + "".join(f"  - {u}\n" for u in urls_of(server, names[:2])))
    first, last = names[0].split("-")[1][:6], names[-1].split("-")[1][:6]
    pattern = f"{server.url}/train-{{{first}..{last}}}.tar?x=*"  # a URL is never globbed
    assert expand(pattern) == [u + "?x=*" for u in urls_of(server, names)]
    from_yaml = TarSource(str(listing), cache_dir=tmp_path / "c")
    assert from_yaml.shards == urls_of(server, names[2:]) + urls_of(server, names[:2])
    order = names[2:] + names[:2]
    assert_same(batches(from_yaml, shuffle="none"), batches(TarSource([os.path.join(server.folder, n) for n in order]),
                                                            shuffle="none"))


def expand(spec):
    return resolve_shards(spec)[0]


def test_the_index_is_kept_by_url_and_etag_so_a_later_run_downloads_nothing_to_open(served, tmp_path):
    server, names = served
    urls = urls_of(server, names)
    first = TarSource(urls, cache_dir=tmp_path / "c")
    shutil.rmtree(tmp_path / "c")  # every shard evicted
    again = TarSource(urls, cache_dir=tmp_path / "c")
    assert dict(server.gets) == {n: 1 for n in names} and shard_files(tmp_path / "c") == []
    assert dict(server.heads) == {n: 2 for n in names}  # one HEAD per shard and construction: the ETag and size
    assert again._ix.folder == first._ix.folder
    # One shard changes on the server (another ETag): only that one is fetched and scanned again.
    server.faults[names[1]] = {"etag": '"v2"'}
    changed = TarSource(urls, cache_dir=tmp_path / "c")
    assert changed._ix.folder != first._ix.folder
    assert server.gets[names[1]] == 2 and sum(server.gets.values()) == len(names) + 1
    assert_same(batches(changed), batches(TarSource([os.path.join(server.folder, n) for n in names])))


def test_the_server_killed_mid_download_is_resumed_after_a_retry(served, tmp_path):
    server, names = served
    size = os.path.getsize(os.path.join(server.folder, names[0]))
    server.faults[names[0]] = {"throttle": 2048}
    part = os.path.join(tmp_path / "c", "x")
    opened, errors = [], []

    def open_source():
        try:
            opened.append(TarSource(urls_of(server, names), cache_dir=tmp_path / "c",
                                    fetch_options={"retries": 4, "backoff": 0.2, "workers": 1}))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=open_source)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        parts = [e.path for e in os.scandir(tmp_path / "c")] if os.path.isdir(tmp_path / "c") else []
        part = next((p for p in parts if p.endswith(".part") and os.path.getsize(p) > 4096), None)
        if part:
            break
        time.sleep(0.005)
    assert part, "the download never started"
    server.kill()  # mid-transfer: connections cut, nothing listening
    time.sleep(0.1)
    revived = Server(server.folder, port=server.port)
    try:
        thread.join(30)
        assert not errors and opened
        resumed = [r for r in revived.ranges[names[0]] if r]
        assert resumed and 0 < int(resumed[0].removeprefix("bytes=").rstrip("-")) < size  # went on from the part
        assert revived.gets[names[0]] == 1
        assert_same(batches(opened[0]), batches(TarSource([os.path.join(server.folder, n) for n in names])))
    finally:
        revived.close()


def test_a_server_that_stays_down_is_a_data_error_naming_the_url(served, tmp_path):
    server, names = served
    urls = urls_of(server, names)
    source = TarSource(urls, cache_dir=tmp_path / "c", fetch_options=FAST, lookahead=0)
    shutil.rmtree(tmp_path / "c")
    server.kill()
    with pytest.raises(DataError, match=rf"^{urls[0]}: download failed after 3 tries \(URLError: .*refused"):
        source.read_batch([0])


def test_a_truncated_body_is_retried_then_named(served, tmp_path):
    server, names = served
    server.faults[names[1]] = {"truncate": 5000}
    url = urls_of(server, names)[1]
    size = os.path.getsize(os.path.join(server.folder, names[1]))
    with pytest.raises(DataError, match=rf"^{url}: download failed after 3 tries \(short body: 15000 of {size} "
                                        r"bytes\); the partial file .*\.part is kept for the next run to resume$"):
        TarSource(urls_of(server, names), cache_dir=tmp_path / "c", fetch_options={**FAST, "workers": 1})
    assert server.gets[names[1]] == 3


def test_a_shard_with_the_wrong_checksum_is_deleted_and_never_read(served, tmp_path):
    server, names = served
    urls = urls_of(server, names)
    good = {n: sha(os.path.join(server.folder, n), "sha256") for n in names}
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text("".join(f"{'0' * 64 if n == names[2] else good[n]}  {n}\n" for n in names))
    with pytest.raises(DataError, match=rf"^{urls[2]}: downloaded file does not match: sha256 {good[names[2]]}, "
                                        f"expected {'0' * 64}; it was deleted, not used$"):
        TarSource(urls, cache_dir=tmp_path / "c", manifest=manifest)
    assert [f for f in os.listdir(tmp_path / "c") if names[2] in f] == []  # no shard file, no .part
    manifest.write_text("".join(f"{good[n]} *{n}\n" for n in names))  # sha256sum's binary mark
    assert len(TarSource(urls, cache_dir=tmp_path / "c", manifest=manifest)) == 300


def test_a_missing_shard_is_a_404_naming_its_url_at_construction(served, tmp_path):
    server, names = served
    missing = f"{server.url}/train-999999.tar"
    with pytest.raises(DataError, match=rf"^{missing}: HTTP 404 Not Found$"):
        TarSource([*urls_of(server, names), missing], cache_dir=tmp_path / "c")
    assert server.gets["train-999999.tar"] == 0 and server.heads["train-999999.tar"] == 1


def test_the_cache_never_holds_more_than_its_limit_plus_one_shard(served, tmp_path):
    server, names = served
    biggest = max(os.path.getsize(os.path.join(server.folder, n)) for n in names)
    limit = 2 * biggest
    folder = tmp_path / "c"
    folder.mkdir()
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], held_bytes(folder))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        source = TarSource(urls_of(server, names), cache_dir=folder, cache_limit=limit, lookahead=4)
        local = TarSource([os.path.join(server.folder, n) for n in names])
        got = batches(source, shuffle="block", window=1)  # a shard at a time: two where one gives way to the next
        with pytest.warns(RuntimeWarning, match=r"a full shuffle over [\d,]+ bytes .* shuffle='block'"):
            Loader(source, Sampler(len(source), 32, shuffle="full"))
        with pytest.warns(RuntimeWarning, match=r"a block shuffle mixes 2 shards at a time \(window=2\), .* up to "
                                                r"[\d,]+ bytes, more than the shard cache holds .* Use window=1 or less"):
            Loader(source, Sampler(len(source), 32, shuffle="block", blocks=source.block_starts, window=2))
    finally:
        stop.set()
        watcher.join()
    assert_same(got, batches(local, shuffle="block", window=1))
    assert 0 < peak[0] <= limit + biggest, (peak[0], limit, biggest)
    assert len(shard_files(folder)) < len(names)  # it did evict
    assert all(server.gets[n] <= 2 for n in names), dict(server.gets)  # indexing, then at most once in the epoch


def test_the_loader_fetches_the_shards_of_the_next_steps_ahead(served, tmp_path):
    server, names = served
    urls = urls_of(server, names)
    TarSource(urls, cache_dir=tmp_path / "c")  # indexes them (downloads each once)
    shutil.rmtree(tmp_path / "c")
    source = TarSource(urls, cache_dir=tmp_path / "c")  # the index is kept: nothing downloaded
    loader = Loader(source, Sampler(len(source), 64, shuffle="none", num_epochs=1), lookahead=2)
    assert loader.lookahead == 2 and shard_files(tmp_path / "c") == []

    def cached(k):  # shard k in the cache, waiting a little for the background fetch
        deadline = time.monotonic() + 10
        while source.shard_cache.local_if_cached(k) is None and time.monotonic() < deadline:
            time.sleep(0.002)
        return source.shard_cache.local_if_cached(k) is not None

    loader.get_batch(0)  # shard 0 (64 records a shard); shard 1 comes in the background
    assert loader._ahead.wait() and cached(1)
    time.sleep(0.05)
    assert source.shard_cache.local_if_cached(2) is None  # outside the window of 2 steps
    loader.get_batch(1)
    assert loader._ahead.wait() and cached(2)
    assert [server.gets[n] for n in names] == [2, 2, 2, 1, 1]
    assert_same(list(iter(loader)), batches(TarSource([os.path.join(server.folder, n) for n in names]), 64, "none"))
    # Each shard read fetched once more (ahead or on demand); the last one, which only the
    # remainder of the epoch reads (dropped: drop_remainder), never.
    assert [server.gets[n] for n in names] == [2, 2, 2, 2, 1]
    assert Loader(TarSource([os.path.join(server.folder, n) for n in names]),
                  Sampler(300, 64, shuffle="none")).lookahead == 0  # local files: nothing to fetch


def test_compressed_shards_local_and_remote_read_as_the_tar_inside(served, tmp_path):
    server, names = served
    gz = []
    for n in names:
        with gzip.open(os.path.join(server.folder, n.replace(".tar", ".tgz")), "wb") as g:
            g.write(read(os.path.join(server.folder, n)))
        local_gz = tmp_path / n.replace(".tar", ".tar.gz")
        shutil.copy(os.path.join(server.folder, n.replace(".tar", ".tgz")), local_gz)
        gz.append(str(local_gz))
    want = batches(TarSource([os.path.join(server.folder, n) for n in names]))
    assert_same(batches(TarSource(gz, cache_dir=tmp_path / "c")), want)
    want_key = TarSource(gz, cache_dir=tmp_path / "c").sample_key(0)
    remote = TarSource([f"{server.url}/{n.replace('.tar', '.tgz')}" for n in names], cache_dir=tmp_path / "c2")
    assert_same(batches(remote), want)
    assert remote.describe() == TarSource([os.path.join(server.folder, n) for n in names]).describe()
    # A local .tgz rewritten with other data is read anew, not from the cache's copy of the old one.
    with gzip.open(gz[0], "wb") as g:
        g.write(read(os.path.join(server.folder, names[1])))
    again = TarSource(gz, cache_dir=tmp_path / "c")
    assert again.sample_key(0) == TarSource(os.path.join(server.folder, names[1])).sample_key(0) != want_key


def test_a_list_mixing_local_remote_and_compressed_shards(served, tmp_path):
    server, names = served
    files = [os.path.join(server.folder, n) for n in names]
    gz = str(tmp_path / names[2].replace(".tar", ".tgz"))
    with gzip.open(gz, "wb") as g:
        g.write(read(files[2]))
    mixed = [files[0], f"{server.url}/{names[1]}", gz, *files[3:]]
    source = TarSource(mixed, cache_dir=tmp_path / "c", cache_limit=10 << 20)
    assert source.shards == mixed
    assert_same(batches(source, shuffle="block", window=2), batches(TarSource(files), shuffle="block", window=2))
    assert source.describe() == TarSource(files).describe()


def test_a_remote_source_and_its_loader_pickle_without_their_threads(served, tmp_path):
    server, names = served
    source = TarSource(urls_of(server, names), cache_dir=tmp_path / "c")
    loader = Loader(source, Sampler(len(source), 32, seed=1))
    first = loader.get_batch(0)  # starts the lookahead thread and the fetch pool
    copy = pickle.loads(pickle.dumps(loader))
    assert copy._ahead is None
    assert_same([copy.get_batch(0), copy.get_batch(3)], [first, loader.get_batch(3)])


def test_a_file_changed_on_the_server_after_indexing_is_refused(served, tmp_path):
    server, names = served
    urls = urls_of(server, names)
    source = TarSource(urls, cache_dir=tmp_path / "c", lookahead=0)
    shutil.rmtree(tmp_path / "c")
    server.faults[names[0]] = {"etag": '"another"'}
    with pytest.raises(DataError, match=rf"^{urls[0]}: the file changed on the server since it was indexed "
                                        r"\(ETag \"another\", expected \"[0-9a-f]{16}\"\); open the source again"):
        source.read_batch([0])


def test_torch_adapter_reads_remote_shards_and_fetches_ahead(served, tmp_path):
    pytest.importorskip("torch")
    from adapters.torch import TorchLoader

    server, names = served
    source = TarSource(urls_of(server, names), cache_dir=tmp_path / "c")
    shutil.rmtree(tmp_path / "c")
    source = TarSource(urls_of(server, names), cache_dir=tmp_path / "c")
    sampler = Sampler(len(source), 32, seed=5, num_epochs=1)
    got = [{k: v.numpy() for k, v in b.items()} for b in TorchLoader(source, sampler)]
    local = TarSource([os.path.join(server.folder, n) for n in names])
    assert_same(got, list(Loader(local, Sampler(len(local), 32, seed=5, num_epochs=1))))
    assert all(server.gets[n] == 2 for n in names)


def test_other_protocols_go_through_fsspec(served, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    server, names = served
    fs = fsspec.filesystem("memory")
    urls = []
    try:
        for n in names:
            with fs.open(f"/tandem-test/{n}", "wb") as f:
                f.write(read(os.path.join(server.folder, n)))
            urls.append(f"memory://tandem-test/{n}")
        local = TarSource([os.path.join(server.folder, n) for n in names])
        assert_same(batches(TarSource(urls, cache_dir=tmp_path / "c")), batches(local))
        with pytest.raises(DataError, match=r"^memory://tandem-test/nope.tar: not found$"):
            TarSource([*urls, "memory://tandem-test/nope.tar"], cache_dir=tmp_path / "c")
    finally:
        fs.rm("/tandem-test", recursive=True)
    with pytest.raises(DataError, match=r"^nosuchproto://b/a.tar: this protocol needs a package that is not installed"):
        TarSource(["nosuchproto://b/a.tar"], cache_dir=tmp_path / "c")


def test_cache_file_names_stay_in_the_cache_folder(tmp_path):
    cache = ShardCache(tmp_path / "c")
    for url in ["http://h/../../etc/passwd", "http://h/a/..%2F..%2Fx.tar?sig=/../y", "s3://b/.hidden", "http://h/"]:
        path = cache.local_path(url)
        assert os.path.dirname(path) == str(tmp_path / "c") and _SHARD_FILE.match(os.path.basename(path)), path
    assert cache.local_path("http://h/a.tar") != cache.local_path("http://g/a.tar")


def test_manifests_match_shards_by_their_path_end(tmp_path):
    (tmp_path / "m.json").write_text('{"seq1/shards-0000.tar": {"sha256": "' + "a" * 64 + '", "size": 5}}')
    urls = ["http://h/d/seq1/shards-0000.tar", "http://h/d/seq2/shards-0000.tar"]
    assert resolve_shards(urls, tmp_path / "m.json")[1] == {urls[0]: {"sha256": "a" * 64, "size": 5}}
    (tmp_path / "SUMS").write_text(f"{'b' * 40}  shards-0000.tar\n")
    assert read_manifest(tmp_path / "SUMS") == {"shards-0000.tar": {"sha1": "b" * 40}}
    with pytest.raises(DataError, match=r"SUMS: entry 'shards-0000.tar' matches 2 shards"):
        resolve_shards(urls, tmp_path / "SUMS")
    (tmp_path / "bad").write_text("not a checksum line\n")
    with pytest.raises(DataError, match=r"bad: line 1 is not '<sha256 or sha1 hex>  <shard name>'"):
        read_manifest(tmp_path / "bad")


def test_two_processes_reading_remote_shards_download_each_once(served, tmp_path):
    server, names = served
    code = textwrap.dedent(f"""
        import hashlib
        from loaders import Loader, Sampler, TarSource
        src = TarSource([{server.url!r} + "/" + n for n in {names!r}], cache_dir={str(tmp_path / "shared")!r})
        h = hashlib.sha256()
        for b in Loader(src, Sampler(len(src), 32, seed=2, num_epochs=1)):
            h.update(b["npy"].tobytes()); h.update(b["cls"].tobytes())
        print(h.hexdigest())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    h = hashlib.sha256()
    local = TarSource([os.path.join(server.folder, n) for n in names])
    for b in Loader(local, Sampler(len(local), 32, seed=2, num_epochs=1)):
        h.update(b["npy"].tobytes())
        h.update(b["cls"].tobytes())
    assert outs == [h.hexdigest()] * 2 and [p.returncode for p in procs] == [0, 0]
    assert dict(server.gets) == {n: 1 for n in names}


def relabel_in_place(path):
    """Change the first ``.cls`` member's digit, keeping the file's size: another version of
    the shard that a size check cannot tell apart. Returns the new label."""
    import tarfile

    with tarfile.open(path) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".cls"))
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        old = f.read(1)
        new = b"7" if old != b"7" else b"8"
        f.seek(member.offset_data)
        f.write(new)
    return int(new)


def test_a_server_without_etags_is_checked_by_last_modified(served, tmp_path):
    # python -m http.server sends Last-Modified and no ETag: a file changed there (same size) is not read.
    server, names = served
    for n in names:
        server.faults[n] = {"no_etag": True}
    urls = urls_of(server, names)
    source = TarSource(urls, cache_dir=tmp_path / "c", lookahead=0)
    shutil.rmtree(tmp_path / "c")
    path = os.path.join(server.folder, names[0])
    relabel_in_place(path)
    os.utime(path, (time.time() + 5, time.time() + 5))
    with pytest.raises(DataError, match=rf"^{urls[0]}: the file changed on the server since it was indexed "
                                        r"\(Last-Modified .* GMT, expected .* GMT\); open the source again"):
        source.read_batch([0])


def test_a_server_with_no_validator_at_all_is_checked_by_content(served, tmp_path):
    # No ETag, no Last-Modified, the same size: only the content shows the change, and reopening indexes it anew.
    server, names = served
    for n in names:
        server.faults[n] = {"no_validator": True}
    urls = urls_of(server, names)
    source = TarSource(urls, cache_dir=tmp_path / "c", lookahead=0)
    shutil.rmtree(tmp_path / "c")
    label = relabel_in_place(os.path.join(server.folder, names[0]))
    with pytest.raises(DataError, match=rf"^{urls[0]}: the file changed on the server since it was indexed \(its "
                                        r"content differs; the server sends no ETag or Last-Modified\); open the "
                                        r"source again"):
        source.read_batch([0])
    again = TarSource(urls, cache_dir=tmp_path / "c", lookahead=0)
    assert int(again[0]["cls"]) == label
    assert_same(batches(again), batches(TarSource([os.path.join(server.folder, n) for n in names])))


@pytest.mark.parametrize("fault", [{"no_validator": True}, {"no_etag": True}])
def test_a_partial_download_is_resumed_only_with_a_validator(served, tmp_path, fault):
    # Without an ETag or Last-Modified nothing says the bytes kept are of the version served now: start over.
    server, names = served
    size = os.path.getsize(os.path.join(server.folder, names[0]))
    server.faults[names[0]] = {"drop_after": size // 2, **fault}
    path = ShardCache(tmp_path / "c", backoff=0.01).fetch(f"{server.url}/{names[0]}")
    assert sha(path) == sha(os.path.join(server.folder, names[0]))
    resumed = [None, None] if "no_validator" in fault else [None, f"bytes={size // 2}-"]
    assert server.ranges[names[0]] == resumed
    assert sorted(os.listdir(tmp_path / "c" / ".locks")) == [os.path.basename(path) + ".lock"]


def test_a_body_without_content_length_cut_short_is_not_taken_for_the_whole_file(served, tmp_path):
    server, names = served
    size = os.path.getsize(os.path.join(server.folder, names[0]))
    url = f"{server.url}/{names[0]}"
    server.faults[names[0]] = {"no_length": True, "drop_after": size // 2}  # once, then whole
    path = ShardCache(tmp_path / "c", backoff=0.01).fetch(url)
    assert sha(path) == sha(os.path.join(server.folder, names[0]))
    server.faults[names[1]] = {"no_length": True, "truncate": size // 2}  # every time
    url1 = f"{server.url}/{names[1]}"
    with pytest.raises(DataError, match=rf"^{url1}: download failed after 1 try \(the server sent no length and "
                                        rf"the file does not end as a tar archive does \({size // 2} bytes\)\)"):
        ShardCache(tmp_path / "c", retries=0).fetch(url1)
    assert shard_files(tmp_path / "c") == [os.path.basename(path)]


def test_a_stalled_transfer_is_cut_and_retried(served, tmp_path):
    # A server that keeps the connection alive but sends almost nothing never trips the socket timeout.
    server, names = served
    server.faults[names[0]] = {"throttle": 16, "delay": 0.05}  # 320 bytes/s
    url = f"{server.url}/{names[0]}"
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"^{url}: download failed after 2 tries \(stalled: [0-9]+ bytes in the "
                                        r"last 0.5 s, below min_rate=10000 bytes/s\)"):
        ShardCache(tmp_path / "c", retries=1, backoff=0.01, timeout=0.5, min_rate=10_000).fetch(url)
    assert time.monotonic() - t0 < 5
    assert server.gets[names[0]] == 2


def test_signed_urls_with_a_checksum_are_cached_by_content(served, tmp_path):
    # A presigned URL changes its token every run: with a checksum known, the same file is not fetched again.
    server, names = served
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text("".join(f"{sha(os.path.join(server.folder, n), 'sha256')}  {n}\n" for n in names))
    first = TarSource([u + "?sig=aaa" for u in urls_of(server, names)], cache_dir=tmp_path / "c", manifest=manifest)
    again = TarSource([u + "?sig=bbb" for u in urls_of(server, names)], cache_dir=tmp_path / "c", manifest=manifest)
    assert_same(batches(again), batches(first))
    assert dict(server.gets) == {n: 1 for n in names} and len(shard_files(tmp_path / "c")) == len(names)


def test_background_downloads_are_bounded_by_workers(served, tmp_path):
    server, names = served
    for n in names:
        server.faults[n] = {"throttle": 4096, "delay": 0.005}
    cache = ShardCache(tmp_path / "c", workers=2)
    urls = urls_of(server, names)
    cache.prefetch(urls)
    time.sleep(0.05)
    assert server.active == 2  # two in the background, the rest queued
    cache.fetch(urls[-1])  # still queued: the reader fetches it itself, now, beside the two
    for u in urls:
        cache.fetch(u)
    assert server.peak == 3 and dict(server.gets) == {n: 1 for n in names}


def test_processes_sharing_a_cache_count_each_others_downloads_under_way(served, tmp_path):
    # Two caches on one folder stand for two processes: all they share is the folder and its file locks.
    server, names = served
    sizes = [os.path.getsize(os.path.join(server.folder, n)) for n in names[:3]]
    urls = urls_of(server, names[:3])
    limit = sum(sizes) - 1  # the three do not fit together
    server.faults[names[0]] = {"throttle": 4096, "delay": 0.02}
    a, b = ShardCache(tmp_path / "c", limit), ShardCache(tmp_path / "c", limit)
    slow = threading.Thread(target=a.fetch, args=(urls[0],), kwargs={"size": sizes[0]})
    slow.start()
    try:
        while not os.path.exists(a.local_path(urls[0]) + ".part"):
            time.sleep(0.005)
        assert b.plan(urls[1:], sizes=dict(zip(urls[1:], sizes[1:], strict=True))) == urls[1:]  # fit b's limit
        b.close()  # waits for b's background fetches
        assert server.gets[names[1]] == 1 and server.gets[names[2]] == 0  # a's download left room for one
    finally:
        slow.join()  # before the server goes
    assert held_bytes(tmp_path / "c") == sizes[0] + sizes[1] <= limit


def test_room_goes_to_planned_shards_in_reading_order_whichever_worker_asks_first(served, tmp_path):
    # Another process downloads shard 0 (1000 bytes reserved) and holds shard 1's lock, so shard 2's
    # worker asks for room first. Shard 1 is read first: shard 2 must not take the room shard 1 needs.
    server, names = served
    sizes = [os.path.getsize(os.path.join(server.folder, n)) for n in names[:3]]
    urls = urls_of(server, names[:3])
    cache = ShardCache(tmp_path / "c", limit=sizes[1] + sizes[2])  # both fit alone, not beside shard 0
    locks = tmp_path / "c" / ".locks"
    os.makedirs(locks)
    other = [open(cache._lock_path(cache.local_path(u)), "w") for u in urls[:2]]  # noqa: SIM115
    for f in other:
        fcntl.flock(f, fcntl.LOCK_EX)
    (locks / (os.path.basename(cache.local_path(urls[0])) + ".reserve")).write_text("1000")
    try:
        assert cache.plan(urls[1:], sizes=dict(zip(urls[1:], sizes[1:], strict=True))) == urls[1:]
        time.sleep(0.3)  # shard 2's worker has decided by now
        other.pop(1).close()  # shard 1's lock is let go without the file: its worker fetches it
        cache.close()  # waits for the fetches
    finally:
        for f in other:
            f.close()
    assert dict(server.gets) == {names[1]: 1}
    assert shard_files(tmp_path / "c") == [os.path.basename(cache.local_path(urls[1]))]


@pytest.mark.parametrize("ext", [".part", ".part.gz"])
def test_a_partial_file_of_a_killed_process_counts_and_is_evicted_when_room_is_needed(served, tmp_path, ext):
    server, names = served
    urls = urls_of(server, names[:2])
    size = os.path.getsize(os.path.join(server.folder, names[1]))
    cache = ShardCache(tmp_path / "c", limit=size + 100)
    os.makedirs(tmp_path / "c" / ".locks")
    stale = cache.local_path(urls[0]) + ext
    with open(stale, "wb") as f:
        f.write(b"x" * 5000)
    (tmp_path / "c" / ".locks" / (os.path.basename(cache.local_path(urls[0])) + ".reserve")).write_text("99999")
    cache.fetch(urls[1])
    assert not os.path.exists(stale) and os.listdir(tmp_path / "c" / ".locks") != []
    assert held_bytes(tmp_path / "c") == size
    assert sorted(n for n in os.listdir(tmp_path / "c" / ".locks") if not n.endswith((".lock", ".pin"))) == [".room"]


def test_waiting_on_a_process_that_hangs_holding_a_shard_lock_ends_in_an_error(served, tmp_path):
    import fcntl

    server, names = served
    url = f"{server.url}/{names[0]}"
    cache = ShardCache(tmp_path / "c", retries=0, backoff=0.01, timeout=0.3)
    lock_path = cache.local_path(url).replace(str(tmp_path / "c"), str(tmp_path / "c" / ".locks")) + ".lock"
    os.makedirs(os.path.dirname(lock_path))
    with open(lock_path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.raises(DataError, match=rf"^{url}: another process holds {lock_path} and its download has not "
                                            rf"grown for [0-9]+ s; stop that process \(`fuser {lock_path}` names it\)$"):
            cache.fetch(url)
        assert time.monotonic() - t0 < 3
    assert cache.fetch(url) and server.gets[names[0]] == 1  # once the lock is let go


def test_a_shard_another_process_pins_is_not_evicted(served, tmp_path):
    server, names = served
    urls = urls_of(server, names[:3])
    sizes = [os.path.getsize(os.path.join(server.folder, n)) for n in names[:3]]
    a, b = ShardCache(tmp_path / "c", max(sizes)), ShardCache(tmp_path / "c", max(sizes))
    assert a.plan(urls[:1]) == urls[:1]
    kept = a.fetch(urls[0])
    b.fetch(urls[1])  # no room without a's shard, which a reads: b goes over the limit by its own
    assert os.path.exists(kept) and held_bytes(tmp_path / "c") == sizes[0] + sizes[1]
    a.close()  # a lets go of its pins
    b.fetch(urls[2])
    assert not os.path.exists(kept) and shard_files(tmp_path / "c") == [os.path.basename(b.local_path(urls[2]))]


def test_relative_paths_of_a_yaml_list_are_beside_it_never_the_working_directory(served, tmp_path, monkeypatch):
    server, names = served
    shutil.copy(os.path.join(server.folder, names[0]), tmp_path / "a.tar")  # in the working directory only
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "local_train_tars.yaml").write_text("tars:\n  seq:\n  - a.tar\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'lists' / 'a.tar'}: shard not found \(listed in "
                                        r"lists/local_train_tars.yaml\)$"):
        TarSource("lists/local_train_tars.yaml")
    shutil.copy(os.path.join(server.folder, names[1]), tmp_path / "lists" / "a.tar")
    assert TarSource("lists/local_train_tars.yaml").shards == [str(tmp_path / "lists" / "a.tar")]


def test_retries_back_off_exponentially(served, tmp_path, monkeypatch):
    import types

    from loaders import _remote

    server, names = served
    server.faults[names[0]] = {"status": [503, 503, 429]}
    slept = []
    monkeypatch.setattr(_remote, "time", types.SimpleNamespace(sleep=slept.append, monotonic=time.monotonic))
    ShardCache(tmp_path / "c", backoff=0.2, retries=3).fetch(f"{server.url}/{names[0]}")
    assert len(slept) == 3 and all(b * 1.0 <= s <= b * 1.25 for s, b in zip(slept, [0.2, 0.4, 0.8], strict=True))


def test_indexing_remote_shards_shows_a_byte_progress_bar(served, tmp_path, capsys):
    server, names = served
    TarSource(urls_of(server, names), cache_dir=tmp_path / "c", progress=True)
    err = capsys.readouterr().err
    total = sum(os.path.getsize(os.path.join(server.folder, n)) for n in names)
    assert "downloading shards: 100%" in err and "indexing shards: 100%" in err
    assert 2**20 < total < 10 * 2**20 and f"| {total / 2**20:.2f}M/{total / 2**20:.2f}M [" in err  # bytes, all of them


def test_the_block_window_warning_suggests_only_what_can_work(served, tmp_path):
    server, names = served
    sizes = sorted((os.path.getsize(os.path.join(server.folder, n)) for n in names), reverse=True)
    source = TarSource(urls_of(server, names), cache_dir=tmp_path / "c", cache_limit=sizes[0])
    for window, fix in [(1, rf"Use a cache_limit of {sum(sizes[:2]):,} bytes or more$"),
                        (2, rf"Use a cache_limit of {sum(sizes[:4]):,} bytes or more \({sum(sizes[:2]):,} for "
                            r"window=1\)$")]:
        with pytest.warns(RuntimeWarning, match=rf"\(window={window}\), .*{fix}"):
            Loader(source, Sampler(len(source), 32, shuffle="block", blocks=source.block_starts, window=window))


def test_a_fork_during_a_download_does_not_keep_its_lock(served, tmp_path):
    # A DataLoader worker forked while a shard downloads gets a copy of the lock's open file: it must let go.
    import multiprocessing

    from loaders._remote import _held

    server, names = served
    server.faults[names[0]] = {"throttle": 8192, "delay": 0.01}
    url = f"{server.url}/{names[0]}"
    cache = ShardCache(tmp_path / "c", limit=10**9)
    lock = cache._lock_path(cache.local_path(url))
    fetching = threading.Thread(target=cache.fetch, args=(url,))
    fetching.start()
    while not _held(lock):
        time.sleep(0.005)
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        fetching.join()
        assert child.is_alive() and not _held(lock)
        with cache._room_lock():  # the eviction lock too: free while the child lives
            pass
    finally:
        child.terminate()
        child.join()


def test_a_body_without_length_cut_inside_zeros_is_not_taken_for_a_whole_tar(tmp_path):
    # A cut that falls in a run of zero bytes leaves a file that ends with zeros: only the headers tell.
    import webdataset as wds

    (tmp_path / "www").mkdir()
    with wds.TarWriter(str(tmp_path / "www" / "z.tar")) as w:
        w.write({"__key__": "0", "npy": np.zeros(200_000, np.uint8)})
    server = Server(str(tmp_path / "www"))
    try:
        server.faults["z.tar"] = {"no_length": True, "drop_after": 51200}
        path = ShardCache(tmp_path / "c", backoff=0.01).fetch(f"{server.url}/z.tar")
        assert read(path) == read(tmp_path / "www" / "z.tar") and server.gets["z.tar"] == 2
    finally:
        server.close()


def test_a_process_pins_a_bounded_number_of_shards_for_the_others(tmp_path):
    from loaders._remote import PIN_CAP

    cache = ShardCache(tmp_path / "c", limit=10**12, retries=0)
    urls = [f"http://127.0.0.1:9/s{k}.tar" for k in range(3 * PIN_CAP)]
    cache.plan(urls)  # nothing listens on port 9: the background fetches fail, the pins stay
    assert len(cache._pin_files) == PIN_CAP
    assert set(cache._pin_files) == {cache.local_path(u) for u in urls[:PIN_CAP]}
    cache.close()
    assert cache._pin_files == {}


def test_threads_that_ended_pin_nothing(served, tmp_path):
    # Each Loader makes its own reader threads: the shards they read last must not stay pinned (a file each).
    server, names = served
    cache = ShardCache(tmp_path / "c", limit=10**9)
    for n in names:
        t = threading.Thread(target=cache.fetch, args=(f"{server.url}/{n}",))
        t.start()
        t.join()
    cache.fetch(f"{server.url}/{names[0]}")
    assert list(cache._reading.values()) == [cache.local_path(f"{server.url}/{names[0]}")]
    assert list(cache._pin_files) == [cache.local_path(f"{server.url}/{names[0]}")]
