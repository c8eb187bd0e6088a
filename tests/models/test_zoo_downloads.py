"""Zoo downloads through pooch against a local HTTP server (127.0.0.1, files from tmp_path).

The server misbehaves on request: it truncates a response, dies mid-transfer
(connection reset), serves other bytes than published, or trickles the file so
that two real processes download it at the same time. EfficientSAM entries
have no published hash: their first download is recorded and trusted from then
on, and a zip archive is unpacked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from napari_sam.errors import DownloadError
from napari_sam.models import download, zoo
from napari_sam.models.zoo import ModelInfo

# ---------------------------------------------------------------------------------------
# local HTTP server: serves the files of a folder, each path in a mode


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        srv.requests.append(self.path)
        file = srv.root / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404, "Not Found")
            return
        body = file.read_bytes()
        mode = srv.modes.get(self.path, "good")
        if mode == "wrong":  # other bytes than the published file, same length
            body = bytes(b ^ 0x5A for b in body)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if mode == "truncate":  # the response ends (cleanly) before its Content-Length
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            elif mode == "die":  # half the file, then the connection is reset
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(0.2)
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
            elif mode == "slow":  # about 3 s for the test payload
                for start in range(0, len(body), 2**15):
                    self.wfile.write(body[start : start + 2**15])
                    time.sleep(0.03)
            else:
                self.wfile.write(body)
        except OSError:  # the client went away
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.root = tmp_path / "served"
    srv.root.mkdir()
    srv.requests, srv.modes = [], {}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"

    def serve(name: str, data: bytes, mode: str = "good") -> str:
        (srv.root / name).write_bytes(data)
        srv.modes["/" + name] = mode
        return f"{srv.url}/{name}"

    srv.serve = serve
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def payload() -> bytes:
    """3 MB of random bytes (a checkpoint's stand-in)."""
    return os.urandom(3 * 2**20)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _register(monkeypatch, url: str, hash_: str, filename: str = "tiny.pth",
              unzip: bool = False) -> ModelInfo:
    info = ModelInfo("tiny", "", url, hash_, filename, 3.0, "test model", unzip=unzip)
    monkeypatch.setitem(zoo.ZOO, "tiny", info)
    return info


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _src_env() -> dict[str, str]:
    """Environment for a child Python that imports this checkout's napari_sam."""
    import napari_sam

    src = str(Path(napari_sam.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return env


# ---------------------------------------------------------------------------------------
# published hashes


def test_a_good_file_is_downloaded_checked_and_cached(server, cache, monkeypatch, payload,
                                                      capsys):
    url = server.serve("tiny.pth", payload)
    _register(monkeypatch, url, _sha(payload))
    path = zoo.download_checkpoint("tiny", progress=True)
    assert path == cache / "tiny.pth" and path.read_bytes() == payload
    err = capsys.readouterr().err
    assert f"Downloading tiny.pth from {url} to {path}" in err
    assert "100%" in err  # pooch's tqdm progress bar
    # no lock, staging folder or temporary file left; the stamp records the verified file
    assert _listing(cache) == ["tiny.pth", "tiny.pth.verified"]
    stamp = json.loads((cache / "tiny.pth.verified").read_text())
    assert stamp["hash"] == _sha(payload) and stamp["size"] == len(payload)
    assert zoo.download_checkpoint("tiny", progress=False) == path
    assert server.requests == ["/tiny.pth"]  # the second call used the cache


@pytest.mark.parametrize("mode", ["good", "wrong"])
def test_a_wrong_hash_is_refused_and_nothing_is_kept(server, cache, monkeypatch, payload, mode):
    # "good" bytes against a wrong published hash; "wrong" bytes against the right one
    url = server.serve("tiny.pth", payload, mode)
    published = _sha(payload) if mode == "wrong" else "sha256:" + "0" * 64
    _register(monkeypatch, url, published)
    with pytest.raises(DownloadError) as exc:
        zoo.download_checkpoint("tiny", progress=False)
    msg = str(exc.value)
    assert "tiny.pth" in msg and "published hash" in msg and published in msg
    assert str(cache / "tiny.pth") in msg and "\n" not in msg
    assert _listing(cache) == []


@pytest.mark.parametrize("mode", ["truncate", "die"])
def test_an_interrupted_transfer_leaves_nothing(server, cache, monkeypatch, payload, mode):
    url = server.serve("tiny.pth", payload, mode)
    _register(monkeypatch, url, _sha(payload))
    with pytest.raises(DownloadError) as exc:
        zoo.download_checkpoint("tiny", progress=False)
    msg = str(exc.value)
    assert "tiny.pth" in msg and url in msg and "\n" not in msg
    assert " was interrupted (" in msg and "nothing was kept. Try again" in msg
    if mode == "truncate":
        half, total = len(payload) // 2, len(payload)
        assert f"(the connection closed after {half:,} of {total:,} bytes)" in msg
    else:
        assert "Connection reset by peer)" in msg and "ConnectionResetError" not in msg
    assert _listing(cache) == []  # no partial file, ever
    server.modes["/tiny.pth"] = "good"  # the next try starts over and succeeds
    assert zoo.download_checkpoint("tiny", progress=False).read_bytes() == payload


_CLI_OFFLINE_SCRIPT = """
import dataclasses, sys
from napari_sam.cli import main
from napari_sam.models import zoo
zoo.ZOO["efficientsam_s"] = dataclasses.replace(zoo.ZOO["efficientsam_s"], url=sys.argv[1])
sys.exit(main(["models", "download", "efficientsam_s"]))
"""


def test_no_network_names_the_file_and_where_to_put_it(tmp_path):
    # what a user without network sees from `napari-sam models download efficientsam_s`
    url = f"http://127.0.0.1:{_closed_port()}/weights/efficient_sam_vits.pt.zip"
    cache = tmp_path / "cache"
    res = subprocess.run([sys.executable, "-c", _CLI_OFFLINE_SCRIPT, url], capture_output=True,
                         text=True, env=_src_env() | {"NAPARI_SAM_CACHE": str(cache)},
                         timeout=300)
    assert res.returncode == 1 and res.stdout == ""
    lines = [line for line in res.stderr.splitlines() if "Could not download" in line]
    assert len(lines) == 1, res.stderr
    msg = lines[0]
    assert f"Could not download efficient_sam_vits.pt from {url}: [Errno" in msg
    assert f"unzip it and put efficient_sam_vits.pt at {cache / 'efficient_sam_vits.pt'}" in msg
    assert "NAPARI_SAM_CACHE" in msg and "Traceback" not in res.stderr
    assert _listing(cache) == []


# ---------------------------------------------------------------------------------------
# processes sharing the cache

_DOWNLOAD_SCRIPT = """
import sys
from napari_sam.models import download, zoo
url, hash_, folder, filename, unzip = sys.argv[1:6]
zoo.ZOO["tiny"] = zoo.ModelInfo("tiny", "", url, hash_, filename, 3.0, "test",
                                unzip=unzip == "1")
print(zoo.download_checkpoint("tiny", cache_dir=folder, progress=True))
"""


def _two_downloads_at_once(args: list[str]) -> list[tuple[int, str, str]]:
    procs = [
        subprocess.Popen([sys.executable, "-c", _DOWNLOAD_SCRIPT, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_src_env())
        for _ in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            results.append((proc.returncode, out.strip(), err))
    finally:
        for proc in procs:
            proc.kill()
    return results


@pytest.mark.parametrize("repetition", range(3))
def test_two_processes_downloading_at_once_leave_the_right_file(server, tmp_path, payload,
                                                                repetition):
    # D2: two processes sharing a .part file left a wrong-hash file that was accepted
    url = server.serve("tiny.pth", payload, "slow")
    folder = tmp_path / "cache"
    results = _two_downloads_at_once([url, _sha(payload), str(folder), "tiny.pth", "0"])
    dest = folder / "tiny.pth"
    for rc, out, err in results:
        assert rc == 0, err
        assert out == str(dest)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert server.requests == ["/tiny.pth"]  # one download; the other process used its file
    assert _listing(folder) == ["tiny.pth", "tiny.pth.verified"]


def test_two_processes_unpacking_a_first_use_zip_agree(server, tmp_path, payload):
    url = server.serve("model.pt.zip", _zip({"model.pt": payload}), "slow")
    folder = tmp_path / "cache"
    results = _two_downloads_at_once([url, "", str(folder), "model.pt", "1"])
    for rc, out, err in results:
        assert rc == 0, err
        assert out == str(folder / "model.pt")
    assert (folder / "model.pt").read_bytes() == payload
    record = json.loads((folder / "model.pt.verified").read_text())
    assert record["hash"] == _sha(payload) and record["trust_on_first_use"] is True
    assert server.requests == ["/model.pt.zip"]
    assert _listing(folder) == ["model.pt", "model.pt.verified"]


_HOLD_LOCK_SCRIPT = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid {os.getpid()} on a test host".encode())
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(sys.platform.startswith("win"), reason="flock")
def test_a_stalled_lock_holder_is_reported_and_a_dead_one_does_not_block(
    server, cache, monkeypatch, payload
):
    url = server.serve("tiny.pth", payload)
    _register(monkeypatch, url, _sha(payload))
    cache.mkdir()
    lock = cache / "tiny.pth.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK_SCRIPT, str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(download, "LOCK_STALL_TIMEOUT_S", 1.0)
        with pytest.raises(DownloadError) as exc:
            zoo.download_checkpoint("tiny", progress=False)
        msg = str(exc.value)
        assert f"(pid {holder.pid} on a test host) holds {lock}" in msg
        assert "no progress for 1 s" in msg and "\n" not in msg
        assert server.requests == []
    finally:
        holder.kill()
        holder.wait(60)
    assert lock.exists()  # a lock file left by a dead process: the lock went with it
    assert zoo.download_checkpoint("tiny", progress=False).read_bytes() == payload
    assert _listing(cache) == ["tiny.pth", "tiny.pth.verified"]


def test_without_file_locks_downloads_stay_correct(server, cache, monkeypatch, payload, capsys):
    # a file system without flock: the download runs uncoordinated, in its own staging folder
    url = server.serve("tiny.pth", payload)
    _register(monkeypatch, url, _sha(payload))
    monkeypatch.setattr(download, "_try_lock", lambda fd: None)
    assert zoo.download_checkpoint("tiny", progress=True).read_bytes() == payload
    assert "no file locks here" in capsys.readouterr().err
    assert _listing(cache) == ["tiny.pth", "tiny.pth.lock", "tiny.pth.verified"]


# ---------------------------------------------------------------------------------------
# no published hash: trust on first use


def test_first_download_is_recorded_and_a_changed_file_refused(server, cache, monkeypatch,
                                                               payload):
    url = server.serve("tiny.pth", payload)
    _register(monkeypatch, url, "")
    path = zoo.download_checkpoint("tiny", progress=False)
    assert path.read_bytes() == payload
    record_file = cache / "tiny.pth.verified"
    record = json.loads(record_file.read_text())
    assert record["hash"] == _sha(payload) and record["size"] == len(payload)
    assert record["trust_on_first_use"] is True and url in record["source"]
    assert zoo.download_checkpoint("tiny", progress=False) == path
    assert server.requests == ["/tiny.pth"]

    # the same size, other bytes (a new modification time): hashed again and refused
    changed = payload[:-1] + bytes([payload[-1] ^ 1])
    path.write_bytes(changed)
    for call in (lambda: zoo.download_checkpoint("tiny", progress=False),
                 lambda: zoo.load_model("tiny", device="cpu")):
        with pytest.raises(DownloadError) as exc:
            call()
        msg = str(exc.value)
        assert msg.startswith(f"{path} is not the file first downloaded for this model")
        assert "Delete it to download it again" in msg and str(record_file) in msg
        assert "\n" not in msg
    assert path.read_bytes() == changed  # the user's file is left alone

    # deleted, and the server now serves other bytes: refused while the record exists
    path.unlink()
    server.serve("tiny.pth", changed)
    with pytest.raises(DownloadError) as exc:
        zoo.download_checkpoint("tiny", progress=False)
    msg = str(exc.value)
    assert "is not the file first downloaded" in msg and f"delete {record_file}" in msg
    assert _listing(cache) == ["tiny.pth.verified"]
    # a new release, accepted on purpose: the user deletes the record
    record_file.unlink()
    assert zoo.download_checkpoint("tiny", progress=False).read_bytes() == changed
    assert json.loads(record_file.read_text())["hash"] == _sha(changed)


def test_a_first_use_file_put_there_by_hand_is_recorded(cache, monkeypatch, payload):
    _register(monkeypatch, f"http://127.0.0.1:{_closed_port()}/tiny.pth", "")
    cache.mkdir()
    (cache / "tiny.pth").write_bytes(payload)
    assert zoo.download_checkpoint("tiny", progress=False) == cache / "tiny.pth"
    record = json.loads((cache / "tiny.pth.verified").read_text())
    assert record["hash"] == _sha(payload) and "found in the cache" in record["source"]
    # an unreadable record is not silently replaced (it would trust a changed file)
    (cache / "tiny.pth.verified").write_text("{not json")
    with pytest.raises(DownloadError, match="trust record .* is unreadable"):
        zoo.download_checkpoint("tiny", progress=False)


@pytest.mark.parametrize("member", ["model.pt", "weights/model.pt"])
def test_a_zip_archive_is_unpacked(server, cache, monkeypatch, payload, member):
    url = server.serve("model.pt.zip", _zip({member: payload, "README.txt": b"notes"}))
    _register(monkeypatch, url, "", filename="model.pt", unzip=True)
    path = zoo.download_checkpoint("tiny", progress=False)
    assert path == cache / "model.pt" and path.read_bytes() == payload
    assert _listing(cache) == ["model.pt", "model.pt.verified"]  # no archive, no .unzip
    assert json.loads((cache / "model.pt.verified").read_text())["hash"] == _sha(payload)


def test_a_bad_archive_is_refused(server, cache, monkeypatch, payload):
    url = server.serve("model.pt.zip", _zip({"other.pt": payload}))
    _register(monkeypatch, url, "", filename="model.pt", unzip=True)
    with pytest.raises(DownloadError, match="holds no model.pt .it holds other.pt"):
        zoo.download_checkpoint("tiny", progress=False)
    assert _listing(cache) == []
    server.serve("model.pt.zip", payload)  # not a zip at all
    with pytest.raises(DownloadError, match="is not a valid zip archive"):
        zoo.download_checkpoint("tiny", progress=False)
    assert _listing(cache) == []


# ---------------------------------------------------------------------------------------
# the EfficientSAM entries, through the CLI


def test_efficientsam_entries(server, tmp_path, monkeypatch, payload, capsys):
    from napari_sam.cli import main

    ti, s = zoo.model_info("efficientsam_ti"), zoo.model_info("efficientsam_s")
    assert ti.url == "https://github.com/yformer/EfficientSAM/raw/main/weights/efficient_sam_vitt.pt"
    assert s.url == ti.url.replace("vitt.pt", "vits.pt.zip")
    assert (ti.filename, ti.hash, ti.unzip) == ("efficient_sam_vitt.pt", "", False)
    assert (s.filename, s.hash, s.unzip) == ("efficient_sam_vits.pt", "", True)
    assert (ti.config_name, s.config_name) == ("efficientsam_ti", "efficientsam_s")
    # the official layout, served locally: a plain file and a zip holding the checkpoint
    url_ti = server.serve("efficient_sam_vitt.pt", payload[:2**20])
    url_s = server.serve("efficient_sam_vits.pt.zip", _zip({"efficient_sam_vits.pt": payload}))
    monkeypatch.setitem(zoo.ZOO, "efficientsam_ti", dataclasses.replace(ti, url=url_ti))
    monkeypatch.setitem(zoo.ZOO, "efficientsam_s", dataclasses.replace(s, url=url_s))
    folder = tmp_path / "cache"
    for name, file, data in (("efficientsam_ti", "efficient_sam_vitt.pt", payload[:2**20]),
                             ("efficientsam_s", "efficient_sam_vits.pt", payload)):
        assert main(["-q", "models", "download", name, "--cache-dir", str(folder)]) == 0
        assert capsys.readouterr().out.strip() == str(folder / file)
        assert (folder / file).read_bytes() == data
    assert main(["models", "list", "--json", "--cache-dir", str(folder)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["efficientsam_ti"]["cached"] and rows["efficientsam_s"]["cached"]
    assert rows["efficientsam_s"]["path"] == str(folder / "efficient_sam_vits.pt")
    # a changed file: the CLI says what to do (exit 1)
    (folder / "efficient_sam_vitt.pt").write_bytes(b"changed")
    assert main(["-q", "models", "download", "efficientsam_ti", "--cache-dir", str(folder)]) == 1
    assert "is not the file first downloaded" in capsys.readouterr().err
