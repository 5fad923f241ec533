"""nanojax.data.fineweb against a local HTTP server that speaks the Hub's download routes (no internet)."""
import hashlib
import http.server
import math
import pathlib
import re
import threading

import pyarrow.parquet as pq
import pytest

from nanojax.data import fineweb

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _shard_bytes(tmp: pathlib.Path, index: int, n_docs: int = 40) -> bytes:
    path = tmp / f"src_{index}.parquet"
    fineweb.write_shard(path, [f"document {j} of shard {index}. " * (1 + j % 7) for j in range(n_docs)],
                        row_group_size=16)
    return path.read_bytes()


class HubServer:
    """Minimal Hub: HEAD/GET /datasets/{repo}/resolve/{rev}/{file} with X-Repo-Commit, ETag, Range.

    Faults per file name: `truncate[name] = k` cuts the next k GET bodies in half (connection dropped);
    `garbage[name] = k` serves k not-parquet bodies of the right length; `drop[name] = k` closes the
    connection on the next k GETs without answering (the network is gone).
    """

    def __init__(self, files: dict, repo_id: str = fineweb.REPO_ID):
        self.files, self.truncate, self.garbage, self.drop, self.log = files, {}, {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _route(self):
                m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if not m or m.group(1) != repo_id or m.group(3) not in server.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return m.group(3)

            def _headers(self, status, body, name, start=0):
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"%s"' % hashlib.sha256(server.files[name]).hexdigest())
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    total = len(server.files[name])
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                self.end_headers()

            def do_HEAD(self):
                name = self._route()
                server.log.append(("HEAD", name, None))
                if name:
                    self._headers(200, server.files[name], name)

            def do_GET(self):
                name = self._route()
                rng = self.headers.get("Range")
                server.log.append(("GET", name, rng))
                if not name:
                    return
                if server.drop.get(name):
                    server.drop[name] -= 1
                    self.close_connection = True
                    return
                data = server.files[name]
                if server.garbage.get(name):
                    server.garbage[name] -= 1
                    data = b"\0" * len(data)
                start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                body = data[start:]
                self._headers(206 if start else 200, body, name, start)
                if server.truncate.get(name):
                    server.truncate[name] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, name):
        return [r for m, n, r in self.log if m == "GET" and n == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_hub(monkeypatch, files: dict, **kw):
    """A HubServer for `files`, with huggingface_hub pointed at it (online, no telemetry) for this test."""
    import huggingface_hub.constants

    server = HubServer(files, **kw)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return server


@pytest.fixture
def hub(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    server = serve_hub(monkeypatch, {fineweb.shard_name(i): _shard_bytes(src, i) for i in (0, 1, 2, fineweb.VAL_SHARD)})
    yield server
    server.close()


def test_download_all_and_status(hub, tmp_path, capsys):
    rc = fineweb.main(["download", "-n", "3", "--workers", "3"])
    assert rc == 0
    d = fineweb.default_dir()
    for i in (0, 1, 2, fineweb.VAL_SHARD):
        name = fineweb.shard_name(i)
        assert (d / name).read_bytes() == hub.files[name]
    assert pq.ParquetFile(d / fineweb.shard_name(0)).metadata.num_rows == 40
    train, val = fineweb.train_val_split(fineweb.list_shards())
    assert val.endswith("shard_01822.parquet") and len(train) == 3
    out = capsys.readouterr().out
    assert "shards: 0..2, 1822" in out and "val: shard_01822.parquet" in out
    # A second call touches the network not at all: everything present and readable.
    n_requests = len(hub.log)
    assert fineweb.ensure_shards([0, 1, 2], d) == [d / fineweb.shard_name(i) for i in (0, 1, 2)]
    assert len(hub.log) == n_requests


def test_interrupted_transfer_resumes_with_range(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 128)  # real: 10 MB
    name = fineweb.shard_name(1)
    hub.truncate[name] = 1  # the first GET dies half-way through
    (path,) = fineweb.ensure_shards([1], tmp_path / "d", workers=1, backoff=0.01)
    assert path.read_bytes() == hub.files[name]
    gets = hub.gets(name)
    half = len(hub.files[name]) // 2
    assert len(gets) == 2 and gets[0] is None
    assert gets[1] == f"bytes={half - half % 128}-"  # resumed, not restarted


def test_failed_run_keeps_finished_shards_and_next_run_fetches_the_rest(hub, tmp_path, monkeypatch):
    import huggingface_hub.file_download

    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda s: None)  # hf's 1 s retry pauses
    d, name = tmp_path / "d", fineweb.shard_name(0)
    hub.truncate[name], hub.drop[name] = 1, 100  # half the file arrives, then the network goes away
    with pytest.raises(RuntimeError, match=r"(?s)rerun the same command.*shard_00000\.parquet.*Protocol"):
        fineweb.ensure_shards([0, 1], d, retries=1, backoff=0.01)
    assert not (d / name).exists()  # the partial file never appears under the shard's name
    assert (d / fineweb.shard_name(1)).read_bytes() == hub.files[fineweb.shard_name(1)]
    hub.drop[name] = 0
    n_gets = len(hub.log)
    fineweb.ensure_shards([0, 1], d, backoff=0.01)
    assert (d / name).read_bytes() == hub.files[name]
    assert {n for _, n, _ in hub.log[n_gets:]} == {name}  # only the missing shard is fetched again


def test_partial_file_never_taken_as_complete(hub, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    name = fineweb.shard_name(2)
    (d / name).write_bytes(hub.files[name][:1000])  # e.g. left by another tool's killed download
    (path,) = fineweb.ensure_shards([2], d, backoff=0.01)
    assert path.read_bytes() == hub.files[name]
    assert (d / (name + ".corrupt")).read_bytes() == hub.files[name][:1000]  # moved aside, not deleted
    assert fineweb.status(d)["leftovers"] == [str(d / (name + ".corrupt"))]


def test_corrupt_download_redownloaded_once_then_error(hub, tmp_path):
    d = tmp_path / "d"
    name = fineweb.shard_name(0)
    hub.garbage[name] = 1
    (path,) = fineweb.ensure_shards([0], d, backoff=0.01)
    assert path.read_bytes() == hub.files[name] and len(hub.gets(name)) == 2
    name2 = fineweb.shard_name(1)
    hub.garbage[name2] = 5
    with pytest.raises(RuntimeError, match=r"shard_00001\.parquet.*corrupt twice") as e:
        fineweb.ensure_shards([1, 2], d, backoff=0.01)
    assert "rerun the same command" in str(e.value)
    assert not (d / name2).exists() and (d / fineweb.shard_name(2)).exists()  # the good one is kept


def test_missing_remote_file_is_not_retried(hub, tmp_path):
    with pytest.raises(RuntimeError, match=r"shard_00007\.parquet.*1 attempt"):
        fineweb.ensure_shards([7], tmp_path / "d", backoff=0.01)


def test_offline_missing_shard_names_file_and_command(tmp_path):
    d = tmp_path / "d"
    with pytest.raises(FileNotFoundError) as e:
        fineweb.ensure_shards([0, 5], d)
    msg = str(e.value)
    assert "shard_00000.parquet" in msg and "shard_00005.parquet" in msg and "HF_HUB_OFFLINE" in msg
    assert f"python -m nanojax.data.fineweb download -n 6 --dir {d}" in msg
    d.mkdir()
    (d / "shard_00000.parquet").write_bytes(b"PAR1")  # corrupt, and offline: reported, left in place
    with pytest.raises(FileNotFoundError, match=r"shard_00000\.parquet \(corrupt: .*not a readable parquet"):
        fineweb.ensure_shards([0], d)
    assert (d / "shard_00000.parquet").read_bytes() == b"PAR1"


def test_empty_dir_error_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        fineweb.list_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fineweb.list_shards(tmp_path / "nope")
    assert fineweb.main(["status", "--dir", str(tmp_path)]) == 1


def test_one_listing_for_a_directory_or_a_file_and_its_texts(tmp_path):
    fineweb.write_shard(tmp_path / "shard_00001.parquet", ["b1", "", "b2"], row_group_size=1)
    fineweb.write_shard(tmp_path / "shard_00000.parquet", ["a1"])
    (tmp_path / ".hidden.parquet").write_bytes(b"x")
    files = fineweb.list_shards(tmp_path)
    assert files == [str(tmp_path / "shard_00000.parquet"), str(tmp_path / "shard_00001.parquet")]
    assert fineweb.list_shards(files[1]) == [files[1]]  # one file, as the tokenizer CLI's --data_dir allows
    assert list(fineweb.iter_parquet_texts(files)) == ["a1", "b1", "b2"]  # empty documents skipped
    with pytest.raises(FileNotFoundError, match="no .parquet files in .*the directory does not exist"):
        fineweb.list_shards(tmp_path / "shard_00002.parquet")
    with pytest.raises(ValueError, match="has no 'body' column"):
        next(fineweb.iter_parquet_texts(files, column="body"))


def test_check_shard_and_split(tmp_path):
    fineweb.write_shard(tmp_path / "a.parquet", ["x", "y"])
    assert fineweb.check_shard(tmp_path / "a.parquet") == 2
    fineweb.write_shard(tmp_path / "b.parquet", [])
    with pytest.raises(fineweb.CorruptShardError, match="b.parquet: parquet file has no rows"):
        fineweb.check_shard(tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(fineweb.CorruptShardError, match="c.parquet: not a readable parquet"):
        fineweb.check_shard(tmp_path / "c.parquet")
    assert fineweb.train_val_split(["b", "a", "c"]) == (["a", "b"], "c")  # no 1822: last file is val
    with pytest.raises(ValueError, match="at least 2"):
        fineweb.train_val_split(["a"])


def test_shards_needed(capsys):
    assert fineweb.shards_needed(11.2e9) == 216  # nanochat's d20: 11.2B tokens x 4.8 chars / 250M
    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base_d20.py"
    assert fineweb.main(["shards-needed", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "= 216 training shard(s) of fineweb" in out and out.rstrip().endswith("download -n 216")
    assert fineweb.shards_needed(1) == 1
    with pytest.raises(ValueError, match="cannot download into gs://"):
        fineweb.ensure_shards([0], "gs://bucket/fineweb")


@pytest.mark.parametrize("dataset", sorted(fineweb.DATASETS))
@pytest.mark.parametrize("tokens", [1e6, 11.2e9, 5.838e9, 7e9])
def test_shards_needed_uses_the_datasets_figures(dataset, tokens, capsys):
    info = fineweb.DATASETS[dataset]
    expected = max(1, math.ceil(tokens * info.chars_per_token / info.chars_per_shard))
    assert fineweb.shards_needed(tokens, dataset=dataset) == expected
    assert fineweb.main(["shards-needed", "--tokens", str(tokens), "--dataset", dataset]) == 0
    out = capsys.readouterr().out
    assert f"= {expected} training shard(s) of {dataset}" in out
    assert out.rstrip().endswith(f"download -n {expected}" + ("" if dataset == "fineweb" else f" --dataset {dataset}"))
    assert fineweb.shards_needed(tokens, 2.0, dataset) == max(1, math.ceil(tokens * 2.0 / info.chars_per_shard))


def test_shards_needed_figures_per_dataset():
    """The figures themselves (see DATASETS for their nanochat sources); the two datasets must differ."""
    fw, cm = fineweb.DATASETS["fineweb"], fineweb.DATASETS["climbmix"]
    assert (fw.vocab_size, fw.chars_per_token, fw.chars_per_shard) == (65536, 4.8, 250e6)
    assert (cm.vocab_size, cm.chars_per_token, cm.chars_per_shard) == (32768, 5.36, 250e6)
    assert fineweb.shards_needed(7e9, dataset="climbmix") in (150, 151)  # HEAD LOG: ~150 shards ~ 7B tokens
    assert fineweb.shards_needed(7e9, dataset="climbmix") != fineweb.shards_needed(7e9)
    with pytest.raises(ValueError, match="data.dataset='c4' is not a known pretraining dataset"):
        fineweb.shards_needed(1e9, dataset="c4")
    with pytest.raises(SystemExit):
        fineweb.main(["shards-needed", "--tokens", "1e9", "--dataset", "c4"])  # argparse names the choices
