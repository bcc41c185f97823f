"""ShardCache against a real HTTP server on 127.0.0.1 serving shards written by webdataset."""

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from loaders import DataError
from loaders._remote import ShardCache, is_remote, needs_cache
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
    assert seen[0] == (size // 3, size) and seen[-1] == (size, size)  # the second request began at size // 3


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
