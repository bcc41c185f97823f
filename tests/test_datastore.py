"""python -m loaders.datastore against a loopback HTTP server and a generated ATEK URL JSON."""

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
import yaml

from loaders import DataError, Loader, Sampler, TarSource
from loaders._remote import ShardCache
from loaders.datastore import main, pick_sequences, read_url_json, run
from tests.conftest import make_records, write_wds
from tests.httpserver import Server
from tests.test_remote import assert_same

SEQUENCES = ["seq_c", "seq_a", "seq_e", "seq_b", "seq_d", "seq_f"]
FAST = {"retries": 1, "backoff": 0.01, "progress": False}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Per sequence 1-2 webdataset shards under www/SEQUENCE/, a server for them, and ATEK's URL JSON."""
    root = tmp_path_factory.mktemp("store")
    www = root / "www"
    x, y = make_records(360, seed=4)
    for k, seq in enumerate(SEQUENCES):
        lo = k * 60
        written = write_wds(root / "raw" / seq, x[lo : lo + 60], y[lo : lo + 60], maxcount=40)
        os.makedirs(www / seq)
        for j, path in enumerate(written):
            os.rename(path, www / seq / f"shards-{j:04d}.tar")
    server = Server(str(www))
    yield server, root
    server.close()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def url_json(server, folder, path, sha1_of=None):
    """ATEK's URL JSON for the served shards (``sha1_of(seq, name)`` overrides a checksum)."""
    seqs = {}
    for seq in SEQUENCES:
        shards = {}
        for name in sorted(os.listdir(os.path.join(folder, seq))):
            data = read(os.path.join(folder, seq, name))
            sha1 = (sha1_of and sha1_of(seq, name)) or hashlib.sha1(data).hexdigest()
            shards[name.replace(".tar", "_tar")] = {
                "filename": f"ADT_ATEK_cubercnn_{seq}_{name}", "sha1sum": sha1, "file_size_bytes": len(data),
                "download_url": f"{server.url}/{seq}/{name}"}
        seqs[seq] = shards
    doc = {"raw_dataset_name": "test", "atek_data_for_all_configs": {"cubercnn": {"wds_file_urls": seqs}}}
    path.write_text(json.dumps(doc))
    return str(path)


def atek_choice(seed, k, ratio):
    """ATEK's own steps (tools/atek_wds_data_downloader.py): random.seed, sort, shuffle, first K, int(len * ratio)."""
    random.seed(seed)
    seqs = sorted(SEQUENCES)
    random.shuffle(seqs)
    seqs = seqs[:k]
    cut = int(len(seqs) * ratio)
    return seqs[:cut], seqs[cut:]


def args(json_path, out, *extra):
    return ["--config-name", "cubercnn", "--input-json-path", json_path, "--output-folder-path", str(out),
            "--no-progress", "--retries", "1", *extra]


def all_batches(source):
    return list(Loader(source, Sampler(len(source), 16, seed=7, shuffle="none", num_epochs=1, drop_remainder=False)))


def test_download_to_local_writes_atek_layout_and_lists(store, tmp_path, capsys):
    server, root = store
    www = str(root / "www")
    src = url_json(server, www, tmp_path / "urls.json")
    out = tmp_path / "out"
    assert main(args(src, out, "--max-num-sequences", "5", "--train-val-split-ratio", "0.6",
                     "--download-wds-to-local")) == 0
    train, val = atek_choice(42, 5, 0.6)
    assert pick_sequences(SEQUENCES, 42, 5) == train + val
    lists = {n: yaml.safe_load((out / f"local_{n}_tars.yaml").read_text()) for n in ("train", "validation", "all")}
    shards = {seq: sorted(os.listdir(os.path.join(www, seq))) for seq in SEQUENCES}
    assert lists["train"] == {"tars": {s: [f"{s}/{n}" for n in shards[s]] for s in train}}
    assert lists["validation"] == {"tars": {s: [f"{s}/{n}" for n in shards[s]] for s in val}}
    assert list(lists["all"]["tars"]) == sorted(train + val)  # yaml.dump's sorted keys, as ATEK writes them
    for seq in train + val:
        for name in shards[seq]:
            assert (out / seq / name).read_bytes() == read(os.path.join(www, seq, name))
    assert [s for s in SEQUENCES if (out / s).exists()] == [s for s in SEQUENCES if s in train + val]
    assert "10 shards: 10 downloaded, 0 already complete, 0 failed" in capsys.readouterr().out
    # The list reads as the same files, in its (sorted) order.
    expected = [os.path.join(www, s, n) for s in sorted(train) for n in shards[s]]
    assert_same(all_batches(TarSource(str(out / "local_train_tars.yaml"))), all_batches(TarSource(expected)))


def test_streamable_lists_are_read_through_the_shard_cache(store, tmp_path):
    server, root = store
    www = str(root / "www")
    src = url_json(server, www, tmp_path / "urls.json")
    out = tmp_path / "out"
    before, heads = sum(server.gets.values()), dict(server.heads)
    assert main(args(src, out, "--random-seed", "7")) == 0
    assert sum(server.gets.values()) == before  # nothing downloaded
    train, val = atek_choice(7, len(SEQUENCES), 0.9)
    doc = yaml.safe_load((out / "streamable_validation_tars.yaml").read_text())
    assert list(doc["tars"]) == val
    url = doc["tars"][val[0]][0]
    assert doc["checks"][url]["size"] == os.path.getsize(os.path.join(www, val[0], "shards-0000.tar"))
    source = TarSource(str(out / "streamable_validation_tars.yaml"), cache_dir=tmp_path / "cache")
    files = [os.path.join(www, s, n) for s in val for n in sorted(os.listdir(os.path.join(www, s)))]
    assert source.shards == [f"{server.url}/{s}/{n}" for s in val for n in sorted(os.listdir(os.path.join(www, s)))]
    assert_same(all_batches(source), all_batches(TarSource(files)))
    assert dict(server.heads) == heads  # no HEAD either: the list's sha1 names the content


def test_a_broken_run_is_picked_up_by_the_same_command(store, tmp_path, capsys):
    server, root = store
    www = str(root / "www")
    src = url_json(server, www, tmp_path / "urls.json")
    out = tmp_path / "out"
    train, val = atek_choice(42, 3, 0.5)
    broken = f"{train[0]}/shards-0000.tar"
    size = os.path.getsize(os.path.join(www, broken))
    cut = size // 3
    server.faults[broken] = {"truncate": cut}  # every try sends a third (resumed, the two tries get 2/3): it fails
    gets = dict(server.gets)
    try:
        code = main(args(src, out, "--max-num-sequences", "3", "--train-val-split-ratio", "0.5",
                         "--download-wds-to-local"))
    finally:
        server.faults.clear()
    err = capsys.readouterr().err
    assert code == 1
    assert f"1 shard(s) failed (the same command again retries them, resuming partial downloads):\n  {broken}: " \
           f"{server.url}/{broken}: " \
           f"download failed after 2 tries (short body: {2 * cut} of {size} bytes)" in err
    assert not (out / broken).exists() and (out / (broken + ".part")).exists()
    listed = yaml.safe_load((out / "local_train_tars.yaml").read_text())["tars"]
    assert broken not in listed[train[0]]  # the lists name only what was downloaded and checked
    fetched = {k: v - gets.get(k, 0) for k, v in server.gets.items() if v != gets.get(k, 0)}
    # Second run: the complete files are checked and kept, the partial one resumed from where it stopped.
    assert main(args(src, out, "--max-num-sequences", "3", "--train-val-split-ratio", "0.5",
                     "--download-wds-to-local")) == 0
    again = {k: v - gets.get(k, 0) - fetched.get(k, 0) for k, v in server.gets.items()}
    assert {k: v for k, v in again.items() if v} == {broken: 1}
    assert server.ranges[broken][-3:] == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]
    assert (out / broken).read_bytes() == read(os.path.join(www, broken))
    assert "0 failed" in capsys.readouterr().out
    # --overwrite fetches everything again.
    before = sum(server.gets.values())
    assert main(args(src, out, "--max-num-sequences", "3", "--train-val-split-ratio", "0.5",
                     "--download-wds-to-local", "--overwrite")) == 0
    assert sum(server.gets.values()) - before == sum(len(os.listdir(os.path.join(www, s))) for s in train + val)


def test_a_wrong_sha1_fails_that_shard_and_keeps_no_file(store, tmp_path):
    server, root = store
    www = str(root / "www")
    bad = "seq_b/shards-0001.tar"
    src = url_json(server, www, tmp_path / "urls.json",
                   sha1_of=lambda seq, name: "0" * 40 if f"{seq}/{name}" == bad else None)
    out = tmp_path / "out"
    summary = run("cubercnn", src, str(out), download_wds_to_local=True, train_val_split_ratio=1.0, **FAST)
    assert [s.relative for s, _ in summary.failed] == [bad]
    good = hashlib.sha1(read(os.path.join(www, bad))).hexdigest()
    assert summary.failed[0][1] == (f"{server.url}/{bad}: downloaded file does not match: sha1 {good}, expected "
                                    f"{'0' * 40}; it was deleted, not used")
    assert not (out / bad).exists() and not (out / (bad + ".part")).exists()
    assert len(summary.downloaded) == sum(len(os.listdir(os.path.join(www, s))) for s in SEQUENCES) - 1


def test_a_split_json_and_a_missing_shard(store, tmp_path):
    server, root = store
    www = str(root / "www")
    doc = json.loads(read(url_json(server, www, tmp_path / "urls.json")))
    doc["atek_data_for_all_configs"]["cubercnn"]["wds_file_urls"]["seq_a"]["shards-0009_tar"] = {
        "download_url": f"{server.url}/seq_a/shards-0009.tar", "sha1sum": "1" * 40, "file_size_bytes": 10}
    (tmp_path / "urls.json").write_text(json.dumps(doc))
    (tmp_path / "split.json").write_text(json.dumps({"train_sequences": ["seq_d", "seq_a", "nope"],
                                                     "val_sequences": ["seq_f"]}))
    summary = run("cubercnn", str(tmp_path / "urls.json"), str(tmp_path / "out"), download_wds_to_local=True,
                  train_val_split_json_path=str(tmp_path / "split.json"), **FAST)
    assert [(s.relative, e) for s, e in summary.failed] == [
        ("seq_a/shards-0009.tar", f"{server.url}/seq_a/shards-0009.tar: HTTP 404 Not Found")]
    lists = yaml.safe_load((tmp_path / "out" / "local_all_tars.yaml").read_text())["tars"]
    assert list(lists) == ["seq_a", "seq_d", "seq_f"] and "seq_a/shards-0009.tar" not in lists["seq_a"]


def test_bad_input_is_named(tmp_path, capsys):
    doc = {"atek_data_for_all_configs": {"cubercnn": {"wds_file_urls": {
        "../escape": {"shards-0000_tar": {"download_url": "http://127.0.0.1:9/x.tar"}}}}}}
    (tmp_path / "u.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"u.json: cubercnn/\.\./escape: the sequence name is not a safe folder name"):
        read_url_json(str(tmp_path / "u.json"), "cubercnn")
    assert main(args(str(tmp_path / "u.json"), tmp_path / "out", "--download-wds-to-local")) == 2
    assert "the sequence name is not a safe folder name" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "escape")  # nothing written
    assert main(args(str(tmp_path / "u.json"), tmp_path / "out", "--config-name", "efm")) == 2
    assert "no config 'efm'; the file has ['cubercnn']" in capsys.readouterr().err


def test_the_module_runs_as_a_program(store, tmp_path):
    server, root = store
    src = url_json(server, str(root / "www"), tmp_path / "urls.json")
    proc = subprocess.run([sys.executable, "-m", "loaders.datastore", *args(src, tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "out")) == [f"streamable_{n}_tars.yaml" for n in ("all", "train", "validation")]


def test_a_sequence_in_both_splits_is_refused(store, tmp_path):
    server, root = store
    src = url_json(server, str(root / "www"), tmp_path / "urls.json")
    (tmp_path / "split.json").write_text(json.dumps({"train_sequences": ["seq_a", "seq_b"],
                                                     "val_sequences": ["seq_c", "seq_a"]}))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'split.json'}: 'seq_a' is in both train_sequences and "
                                        r"val_sequences \(validation data would be trained on\)$"):
        run("cubercnn", src, str(tmp_path / "out"), download_wds_to_local=True,
            train_val_split_json_path=str(tmp_path / "split.json"), **FAST)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("url", ["/etc/hostname", "file:///etc/passwd", "etc/hostname", "ftp:/x"])
def test_a_download_url_that_is_not_a_remote_url_is_refused(tmp_path, url):
    doc = {"atek_data_for_all_configs": {"cubercnn": {"wds_file_urls": {
        "seq_a": {"shards-0000_tar": {"download_url": url}}}}}}
    (tmp_path / "u.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"u.json: cubercnn/seq_a/shards-0000_tar: download_url {url!r} is not a "
                                        r"URL to download \(http://, https://, s3://, ...\)$"):
        read_url_json(str(tmp_path / "u.json"), "cubercnn")
    with pytest.raises(DataError, match=rf"^{url}: not a URL to download"):
        ShardCache(tmp_path / "c").download(url, str(tmp_path / "x.tar"))
    assert not os.path.exists(tmp_path / "x.tar")


def test_two_entries_naming_one_file_are_refused(tmp_path):
    doc = {"atek_data_for_all_configs": {"cubercnn": {"wds_file_urls": {"seq_a": {
        "shards-0000_tar": {"download_url": "http://h/a.tar"}, "shards-0000.tar": {"download_url": "http://h/b.tar"}}}}}}
    (tmp_path / "u.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"u.json: cubercnn/seq_a: 'shards-0000_tar' and 'shards-0000.tar' both name "
                                        r"the file shards-0000.tar$"):
        read_url_json(str(tmp_path / "u.json"), "cubercnn")


def test_lists_are_written_with_sorted_sequences_as_atek_writes_them(store, tmp_path):
    server, root = store
    src = url_json(server, str(root / "www"), tmp_path / "urls.json")
    run("cubercnn", src, str(tmp_path / "out"), **FAST)
    text = (tmp_path / "out" / "streamable_all_tars.yaml").read_text()
    doc = yaml.safe_load(text)
    assert list(doc["tars"]) == sorted(SEQUENCES) and text == yaml.dump(doc)


def test_asking_for_more_sequences_than_there_are_says_so(store, tmp_path, capsys):
    server, root = store
    src = url_json(server, str(root / "www"), tmp_path / "urls.json")
    assert main(args(src, tmp_path / "out", "--max-num-sequences", "50")) == 0
    assert (f"note: --max-num-sequences 50, but {src} has 6 sequences of 'cubercnn': all of them are used"
            in capsys.readouterr().err)
