"""data_sources.py: names to folders, a local copy used as it is, downloads from a loopback server (files and archives,
resumed, checked, resized), and each way it fails in one line."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_sources
from conftest import SHARED_ASL, encode, noise, requires_shared

REPO, COMMIT = "someone/asl-photos", "c0ffee" * 6 + "abcd"
TOP = f"asl-photos-{COMMIT}/"


class Server:
    """A tiny HTTP server on 127.0.0.1 that serves `files` (path -> bytes), answers Range requests (unless
    `honour_range` is off: then the whole file, as servers that ignore Range do), and cuts the connection after
    `cut[path]` bytes the first time that path is asked for. `requests` records (path, Range header)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.honour_range = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.unquote(self.path)
                asked = self.headers.get("Range")
                server.requests.append((path, asked))
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and server.honour_range else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = server.cut.pop(path, None)
                self.wfile.write(data[start:] if cut is None else data[start:start + cut])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def photo(seed: int, size=(60, 40)) -> bytes:
    return encode(Image.fromarray(noise(*size, seed=seed)), "PNG")


SOURCES = {f"data/{letter}/{n}.png": photo(10 * k + n) for k, letter in enumerate("AB") for n in range(2)}


def make_catalog(tmp_path: Path, base_url: str, sources: dict[str, bytes] = SOURCES) -> Path:
    """Two folders cut from one repository (the second with its top rows painted grey) and a Kaggle folder."""
    def files(prefix: str) -> list[dict]:
        return [{"file": f"{source.split('/')[1]}/{prefix}{Path(source).stem}.jpg", "class": source.split("/")[1],
                 "source": source, "sha256": hashlib.sha256(data).hexdigest()} for source, data in sources.items()]

    common = {"repository": REPO, "commit": COMMIT, "licence": "MIT", "taken": "all", "resize_to": 30,
              "jpeg_quality": 90}
    catalog = {
        "about": "a test catalog",
        "urls": {"file": base_url + "/raw/{repository}/{commit}/{source}",
                 "archive": base_url + "/archive/{repository}/{commit}.zip"},
        "sets": {"everyone": ["kag", "signers/ann", "signers/bob"], "signers": ["signers/ann", "signers/bob"]},
        "folders": {
            "kag": {"kaggle": "someone/frames", "path": "frames/frames", "licence": "see Kaggle", "taken": "all",
                    "files": [{"file": "A/A1.jpg", "class": "A"}, {"file": "B/B1.jpg", "class": "B"}]},
            "signers/ann": {**common, "files": files("a")},
            "signers/bob": {**common, "grey_top_rows": 10, "files": files("b")},
        },
    }
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(catalog))
    return path


def serve_files(server: Server, sources: dict[str, bytes] = SOURCES) -> None:
    server.files.update({f"/raw/{REPO}/{COMMIT}/{source}": data for source, data in sources.items()})


def archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


ARCHIVE_PATH = f"/archive/{REPO}/{COMMIT}.zip"


def stored(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_files_are_downloaded_checked_and_stored_as_the_catalog_says(tmp_path, server, caplog):
    serve_files(server)
    catalog = make_catalog(tmp_path, server.url)
    caplog.set_level("INFO", "data_sources")
    folders = data_sources.resolve(["signers"], tmp_path / "data", catalog)
    assert folders == [tmp_path / "data" / "signers" / "ann", tmp_path / "data" / "signers" / "bob"]
    assert stored(folders[0]) == ["A/a0.jpg", "A/a1.jpg", "B/a0.jpg", "B/a1.jpg"]
    with Image.open(folders[0] / "A" / "a0.jpg") as im:
        assert (im.format, im.size) == ("JPEG", (30, 20))  # longer side 60 -> 30
    bob = np.asarray(Image.open(folders[1] / "A" / "b0.jpg").convert("RGB")).astype(int)
    # 10 source rows painted grey are 5 stored rows (JPEG and resizing blur the edge)
    assert np.abs(bob[:3] - 128).mean() < 6 and np.abs(bob[7:] - 128).mean() > 40
    licences = [r.getMessage() for r in caplog.records if "licence" in r.getMessage()]
    assert len(licences) == 1 and "MIT" in licences[0]  # one source, told once
    assert not list((tmp_path / "data" / data_sources.DOWNLOADS).rglob("*.part"))


def test_a_folder_that_holds_its_files_is_used_without_a_request(tmp_path, server):
    catalog = make_catalog(tmp_path, server.url)
    for entry in json.loads(catalog.read_text())["folders"]["signers/ann"]["files"]:
        (tmp_path / "copy" / "signers" / "ann" / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "copy" / "signers" / "ann" / entry["file"]).write_bytes(b"re-encoded elsewhere")
    assert data_sources.resolve(["ann"], tmp_path / "copy", catalog) == [tmp_path / "copy" / "signers" / "ann"]
    assert server.requests == []


def error_lines(capsys) -> list[str]:
    """What a command's main() logged as errors (its logging writes to stderr, beside tqdm's bars)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]


def test_a_wrong_checksum_is_named_and_not_kept_and_the_others_are(tmp_path, server, capsys):
    serve_files(server)
    server.files[f"/raw/{REPO}/{COMMIT}/data/B/1.png"] = photo(99)
    catalog = make_catalog(tmp_path, server.url)
    assert data_sources.main(["get", "ann", "--data_dir", str(tmp_path / "data"), "--catalog", str(catalog)]) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1
    assert "B/a1.jpg (SHA-256" in errors[0] and "run the same command again" in errors[0]
    assert stored(tmp_path / "data" / "signers" / "ann") == ["A/a0.jpg", "A/a1.jpg", "B/a0.jpg"]
    assert not list((tmp_path / "data" / data_sources.DOWNLOADS).rglob("*.part"))  # a wrong file is not resumed


@pytest.mark.parametrize("honour_range", [True, False], ids=["206", "range-ignored"])
def test_an_interrupted_download_is_resumed_by_the_rerun(tmp_path, server, honour_range):
    serve_files(server)
    server.honour_range = honour_range
    path = f"/raw/{REPO}/{COMMIT}/data/A/0.png"
    server.cut[path] = 100
    catalog = make_catalog(tmp_path, server.url)
    with pytest.raises(data_sources.DataError, match=r"A/a0\.jpg \(cut short after 100 bytes; run again to resume"):
        data_sources.resolve(["ann"], tmp_path / "data", catalog)
    assert (tmp_path / "data" / data_sources.DOWNLOADS / "signers" / "ann" / "A" / "a0.jpg.part").stat().st_size == 100
    server.requests.clear()
    data_sources.resolve(["ann"], tmp_path / "data", catalog)
    assert server.requests == [(path, "bytes=100-")]  # only the missing file, from where it stopped
    assert stored(tmp_path / "data" / "signers" / "ann") == ["A/a0.jpg", "A/a1.jpg", "B/a0.jpg", "B/a1.jpg"]


def test_an_archive_serves_every_folder_of_its_repository_once(tmp_path, server):
    server.files[ARCHIVE_PATH] = archive({TOP + source: data for source, data in SOURCES.items()}
                                         | {TOP + "README.md": b"not taken"})
    catalog = make_catalog(tmp_path, server.url)
    folders = data_sources.resolve(["signers"], tmp_path / "data", catalog, via="archive")
    assert [stored(f) for f in folders] == [["A/a0.jpg", "A/a1.jpg", "B/a0.jpg", "B/a1.jpg"],
                                             ["A/b0.jpg", "A/b1.jpg", "B/b0.jpg", "B/b1.jpg"]]
    assert server.requests == [(ARCHIVE_PATH, None)]
    assert list((tmp_path / "data" / data_sources.DOWNLOADS).iterdir()) == []  # deleted once both folders are done


def test_a_truncated_archive_is_named_and_deleted(tmp_path, server):
    whole = archive({TOP + source: data for source, data in SOURCES.items()})
    server.files[ARCHIVE_PATH] = whole[: len(whole) // 2]
    catalog = make_catalog(tmp_path, server.url)
    with pytest.raises(data_sources.DataError, match=r"archive .*\.zip from .* is damaged .* run the command again"):
        data_sources.resolve(["ann"], tmp_path / "data", catalog, via="archive")
    assert list((tmp_path / "data" / data_sources.DOWNLOADS).iterdir()) == []


def test_archive_members_that_climb_out_are_refused(tmp_path, server, caplog):
    evil = {TOP + "../../../evil.jpg": b"x", "/tmp/evil-abs.jpg": b"x", TOP + "data/A/../../../up.jpg": b"x"}
    server.files[ARCHIVE_PATH] = archive({TOP + source: data for source, data in SOURCES.items()} | evil)
    catalog = make_catalog(tmp_path, server.url)
    data_sources.resolve(["ann"], tmp_path / "data" / "inner", catalog, via="archive")
    assert sorted(p.name for p in tmp_path.rglob("*.jpg")) == ["a0.jpg", "a0.jpg", "a1.jpg", "a1.jpg"]
    assert "Refused 3 member(s)" in caplog.text


def test_a_catalog_path_that_leads_outside_is_refused(tmp_path, server):
    catalog = make_catalog(tmp_path, server.url)
    cat = json.loads(catalog.read_text())
    cat["folders"]["signers/ann"]["files"][0]["file"] = "../../escaped.jpg"
    catalog.write_text(json.dumps(cat))
    with pytest.raises(data_sources.DataError, match=r"'\.\./\.\./escaped\.jpg', which leads outside"):
        data_sources.resolve(["ann"], tmp_path / "data", catalog)


def test_names_are_sets_or_folders_and_an_unknown_one_lists_them(tmp_path, capsys):
    catalog = make_catalog(tmp_path, "http://127.0.0.1:9")
    cat = data_sources.load_catalog(catalog)
    assert data_sources.folder_names(cat, ["bob", "everyone"]) == ["signers/bob", "kag", "signers/ann"]
    assert data_sources.folder_names(cat, ["signers/ann"]) == ["signers/ann"]
    assert data_sources.main(["get", "carol", "--catalog", str(catalog)]) == 2
    (error,) = error_lines(capsys)
    assert error.startswith("ERROR No data named 'carol'") and "everyone, signers" in error and "kag, ann, bob" in error


def test_offline_is_one_line_naming_the_host_and_the_copy(tmp_path, caplog):
    catalog = make_catalog(tmp_path, "http://127.0.0.1:9")  # the discard port: nothing listens, connection refused
    for via in data_sources.VIA:
        with pytest.raises(data_sources.DataError) as err:
            data_sources.resolve(["ann"], tmp_path / "data", catalog, via=via)
        assert str(err.value).startswith("Could not reach 127.0.0.1 (ConnectionRefusedError")
        assert "--data_dir ../shared/asl" in str(err.value) and "\n" not in str(err.value)


def test_a_data_folder_that_cannot_be_written_is_one_line(tmp_path, server):
    serve_files(server)
    catalog = make_catalog(tmp_path, server.url)
    (tmp_path / "a-file").write_text("")  # a folder under a file cannot be made, even by root
    with pytest.raises(data_sources.DataError, match=r"Cannot write the data into .*a-file.* give another --data_dir"):
        data_sources.resolve(["ann"], tmp_path / "a-file" / "data", catalog)
    assert server.requests == []


def test_kaggle_folders_come_from_kagglehub(tmp_path, monkeypatch):
    import kagglehub

    download = tmp_path / "kaggle-cache"
    for name in ("A/A1.jpg", "B/B1.jpg", "B/B2.jpg"):
        (download / "frames" / "frames" / name).parent.mkdir(parents=True, exist_ok=True)
        (download / "frames" / "frames" / name).write_bytes(name.encode())
    asked = []
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: asked.append(handle) or str(download))
    catalog = make_catalog(tmp_path, "http://127.0.0.1:9")
    (folder,) = data_sources.resolve(["kag"], tmp_path / "data", catalog)
    assert asked == ["someone/frames"] and stored(folder) == ["A/A1.jpg", "B/B1.jpg"]  # the catalog's files only
    assert (folder / "B" / "B1.jpg").read_bytes() == b"B/B1.jpg"  # no size in the catalog: copied as they are

    def offline(handle):
        raise ConnectionError("Failed to resolve 'www.kaggle.com'\n(more)")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(data_sources.DataError) as err:
        data_sources.resolve(["kag"], tmp_path / "elsewhere", catalog)
    assert str(err.value).startswith("Could not download someone/frames from Kaggle (ConnectionError: Failed to")
    assert "with no internet, point --data_dir at a folder" in str(err.value) and "\n" not in str(err.value)


def test_list_names_the_sets_folders_and_licences(tmp_path, capsys):
    catalog = make_catalog(tmp_path, "http://127.0.0.1:9")
    assert data_sources.main(["list", "--catalog", str(catalog), "--data_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "everyone: 3 folders, 10 photos" in out
    assert f"signers/ann: 4 photos, github.com/{REPO} at {COMMIT[:12]}, licence: MIT (to download)" in out


def test_the_sets_train_in_the_quick_starts_order():
    cat = data_sources.load_catalog()
    signers = [f for f in cat["folders"] if f.startswith("signers/")]
    # as the shell glob ../shared/asl/signers/* gave them: the seeded split and the batches depend on the order
    assert cat["sets"]["everyone"] == ["train", *sorted(signers)] and cat["sets"]["signers"] == sorted(signers)
    assert set(cat["urls"]) == {"file", "archive"}


@requires_shared
def test_the_shared_copy_holds_every_folder_of_the_catalog():
    cat = data_sources.load_catalog()
    for folder, entry in cat["folders"].items():
        assert data_sources.missing_files(SHARED_ASL / folder, entry) == [], folder
    assert data_sources.resolve(["everyone", "test"], SHARED_ASL) == [SHARED_ASL / f for f in
                                                                 [*cat["sets"]["everyone"], "test"]]


@requires_shared
def test_the_catalog_matches_the_shared_manifest_file_for_file():
    cat = data_sources.load_catalog()
    manifest = json.loads((SHARED_ASL / "manifest.json").read_text())
    for name, recorded in manifest["signers"].items():
        entry = cat["folders"][f"signers/{name}"]
        assert (entry["repository"], entry["commit"]) == (recorded["repository"], recorded["commit"]), name
        assert [{k: f[k] for k in ("file", "class", "source", "sha256")} for f in entry["files"]] == \
            [{k: f[k] for k in ("file", "class", "source", "sha256")} for f in recorded["files"]], name
    assert cat["folders"]["train"]["kaggle"] == cat["folders"]["test"]["kaggle"] == manifest["kaggle"]["handle"]
