"""Downloads, resume, retries, checksums and safe extraction, all against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import re
import stat
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import universal.data.download.fetch as fetch_module
from universal.core.atomic import DiskFullError
from universal.data.catalog import load_catalog
from universal.data.download import archives
from universal.data.download.archives import safe_extract
from universal.data.download.datasets import (
    MIRROR_ENV,
    apply_mirror,
    check_manual,
    download_dataset,
    extraction_marker,
)
from universal.data.download.errors import DownloadError
from universal.data.download.fetch import checksum_record, fetch

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB, every byte value
FAST = {"backoff_s": 0.001, "timeout_s": 5}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` with optional Range support and scripted failures (see :class:`LocalServer`)."""

    server: LocalServer

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if srv.fail_first > 0:
            srv.fail_first -= 1
            self.send_error(503, "busy")
            return
        body = srv.files.get(urlsplit(self.path).path)
        if body is None:
            self.send_error(404, "no such file")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if match and not srv.ignore_range:
            start = int(match[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if srv.truncate_always or srv.drop_next:
            srv.drop_next = False
            payload = payload[: len(payload) // 2]  # announce everything, send half, close the connection
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


class LocalServer(ThreadingHTTPServer):
    """A test HTTP server: ``files`` maps URL paths to bytes; ``requests`` records (path, Range header)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.fail_first = 0
        self.drop_next = False
        self.truncate_always = False
        self.ignore_range = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 MIRROR_ENV):
        monkeypatch.delenv(name, raising=False)
    srv = LocalServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.files["/data/file.bin"] = PAYLOAD
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


# ----------------------------------------------------------------------------------------------------------
# fetch


def test_fetch_downloads_verifies_and_skips_when_present(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    assert fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("file.bin.partial").exists()
    assert not checksum_record(dest).exists()  # the checksum was known: nothing to record
    assert fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST) == dest
    assert len(server.requests) == 1  # the second call verified the file and did not download


def test_fetch_replaces_an_existing_file_that_does_not_match(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")
    fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_names_url_and_digests_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "file.bin"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as err:
        fetch(f"{server.url}/data/file.bin", dest, wrong, **FAST)
    message = str(err.value)
    assert f"{server.url}/data/file.bin" in message and wrong in message and sha256(PAYLOAD) in message
    assert list(tmp_path.iterdir()) == []


def test_resume_sends_range_and_completes_the_file(server, tmp_path):
    dest = tmp_path / "file.bin"
    half = len(PAYLOAD) // 2
    dest.with_name("file.bin.partial").write_bytes(PAYLOAD[:half])
    fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST)
    assert server.requests == [("/data/file.bin", f"bytes={half}-")]
    assert dest.read_bytes() == PAYLOAD


def test_resume_against_a_server_that_ignores_range_starts_again(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.partial").write_bytes(PAYLOAD[:1000])
    fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST)
    assert server.requests[0][1] == "bytes=1000-"
    assert dest.read_bytes() == PAYLOAD


def test_a_complete_partial_file_is_accepted_after_416(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.partial").write_bytes(PAYLOAD)
    fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_retries_after_503_with_backoff(server, tmp_path, caplog):
    server.fail_first = 2
    dest = tmp_path / "file.bin"
    with caplog.at_level(logging.WARNING, logger="universal.data.download"):
        fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 3
    assert sum("503" in r.getMessage() for r in caplog.records) == 2


def test_a_dropped_connection_is_resumed(server, tmp_path):
    server.drop_next = True
    dest = tmp_path / "file.bin"
    fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data/file.bin", None), ("/data/file.bin", f"bytes={len(PAYLOAD) // 2}-")]


def test_404_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        fetch(f"{server.url}/data/missing.bin", tmp_path / "missing.bin", None, **FAST)
    assert "not retried" in str(err.value)
    assert len(server.requests) == 1
    assert not (tmp_path / "missing.bin").exists()


def test_a_server_that_always_truncates_fails_after_the_retries(server, tmp_path):
    server.truncate_always = True
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=r"after 3 attempts.*incomplete"):
        fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), retries=2, **FAST)
    assert len(server.requests) == 3
    assert not dest.exists()


def test_unknown_checksum_is_recorded_with_a_warning_and_verified_later(server, tmp_path, caplog):
    dest = tmp_path / "file.bin"
    with caplog.at_level(logging.WARNING, logger="universal.data.download"):
        fetch(f"{server.url}/data/file.bin", dest, None, **FAST)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no checksum was known" in warnings[0] and sha256(PAYLOAD) in warnings[0]
    assert checksum_record(dest).read_text().split()[0] == sha256(PAYLOAD)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="universal.data.download"):
        fetch(f"{server.url}/data/file.bin", dest, None, **FAST)
    assert not caplog.records and len(server.requests) == 1  # verified against the record, not downloaded
    server.files["/data/file.bin"] = b"changed upstream"
    dest.unlink()
    with pytest.raises(DownloadError, match=r"checksum mismatch.*recorded in"):
        fetch(f"{server.url}/data/file.bin", dest, None, **FAST)


def test_progress_goes_to_stderr(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_module, "PROGRESS_EVERY_S", 0.0)
    fetch(f"{server.url}/data/file.bin", tmp_path / "file.bin", sha256(PAYLOAD), chunk=64 << 10, **FAST)
    assert re.search(r"file\.bin: [\d.]+ MB of [\d.]+ MB \(\d+%\), [\d.]+ MB/s", capsys.readouterr().err)


def test_apply_mirror_replaces_scheme_and_host():
    url = "https://zenodo.org/records/1/files/a%20b.zip?download=1"
    assert apply_mirror(url, None) == url
    assert apply_mirror(url, "http://127.0.0.1:8000") == "http://127.0.0.1:8000/records/1/files/a%20b.zip?download=1"
    assert apply_mirror(url, "http://mirror/pub/") == "http://mirror/pub/records/1/files/a%20b.zip?download=1"
    with pytest.raises(DownloadError):
        apply_mirror(url, "mirror.local")


# ----------------------------------------------------------------------------------------------------------
# safe_extract

GOOD = {"Task/dataset.json": b"{}", "Task/images/a.nii.gz": b"image", "Task/labels/a.nii.gz": b"label"}


def make_tar(path: Path, members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """A tar archive of files, plus ``links``: name -> (tar type, link target)."""
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return path


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zipped.writestr(info, target)
    return path


@pytest.mark.parametrize("name", ["data.tar.gz", "data.tgz", "data.tar", "data.zip"])
def test_safe_extract_extracts_a_normal_archive(tmp_path, name):
    maker = make_zip if name.endswith(".zip") else make_tar
    archive = maker(tmp_path / name, GOOD)
    target = tmp_path / "out"
    files = safe_extract(archive, target)
    assert sorted(files) == sorted(target / n for n in GOOD)
    assert {n: (target / n).read_bytes() for n in GOOD} == GOOD
    assert not (tmp_path / "out.partial").exists()


BAD_MEMBERS = {
    "parent": ({"Task/ok.txt": b"ok", "../evil": b"x"}, None, "../evil"),
    "absolute": ({"Task/ok.txt": b"ok", "/abs/path": b"x"}, None, "/abs/path"),
    "symlink": ({"Task/ok.txt": b"ok"}, {"Task/passwd": "/etc/passwd"}, "Task/passwd"),
}


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
def test_safe_extract_refuses_unsafe_members_before_writing(tmp_path, fmt, case):
    members, symlinks, offending = BAD_MEMBERS[case]
    work = tmp_path / "work"
    work.mkdir()
    if fmt == "zip":
        archive = make_zip(work / "bad.zip", members, symlinks)
    else:
        links = {n: (tarfile.SYMTYPE, t) for n, t in (symlinks or {}).items()}
        archive = make_tar(work / "bad.tar.gz", members, links)
    target = work / "out"
    with pytest.raises(DownloadError) as err:
        safe_extract(archive, target)
    assert str(archive) in str(err.value) and repr(offending) in str(err.value)
    assert sorted(p.name for p in work.iterdir()) == [archive.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


@pytest.mark.parametrize("kind", [tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_safe_extract_refuses_hard_links_and_special_files(tmp_path, kind):
    archive = make_tar(tmp_path / "bad.tar", {"ok.txt": b"ok"}, {"special": (kind, "/etc/passwd")})
    with pytest.raises(DownloadError, match="'special'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_safe_extract_refuses_a_target_with_content_and_unknown_formats(tmp_path):
    archive = make_tar(tmp_path / "a.tar", GOOD)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DownloadError, match="not an empty folder"):
        safe_extract(archive, tmp_path / "out")
    with pytest.raises(DownloadError, match="not a supported archive"):
        safe_extract(tmp_path / "out" / "keep.txt", tmp_path / "other")


def test_safe_extract_reports_a_corrupt_archive(tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"not a zip at all")
    with pytest.raises(DownloadError, match="cannot extract"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# download_dataset

CATALOG = """
datasets:
  by_hand:
    name: "A dataset downloaded by hand"
    licence: "CC0-1.0"
    source:
      kind: manual
      instructions: "Sign the data use agreement at https://example.org/by-hand and unpack it here."
      expected: [LICENSE]
    layout: {kind: pattern, image: "images/{case}.nii.gz", label: "labels/{case}.nii.gz"}
    labels: {1: Liver}
    role: train
  on_zenodo:
    name: "A dataset on Zenodo"
    licence: "CC-BY-4.0"
    source:
      kind: zenodo
      record: 123
      files:
        - {name: a.nii.gz, md5: MD5_A}
        - {name: labels.zip, md5: MD5_ZIP, archive: true}
    layout: {kind: pattern, image: "{case}.nii.gz", label: "labels/{case}.nii.gz"}
    labels: {1: Liver}
    role: train
  one_tarball:
    name: "A dataset as one tarball"
    licence: "CC0-1.0"
    source: {kind: url, url: "https://data.example.org/pub/Task.tar.gz", sha256: SHA_TAR, archive: true}
    layout: {kind: msd, root: Task}
    labels: {1: Liver}
    role: train
  unpinned_tarball:
    name: "A dataset as one tarball whose checksum nobody published"
    licence: "CC0-1.0"
    source: {kind: url, url: "https://data.example.org/pub/Unpinned.tar.gz", archive: true}
    layout: {kind: msd, root: Task}
    labels: {1: Liver}
    role: train
  in_idc:
    name: "A dataset in the Imaging Data Commons"
    licence: "CC-BY-4.0"
    source: {kind: idc, collection: pancreas_ct}
    layout: {kind: pattern, image: "{case}/ct.nii.gz", label: "{case}/seg.nii.gz"}
    labels: {1: Pancreas}
    role: train
  made_here:
    name: "Generated phantoms"
    licence: "CC0-1.0"
    source: {kind: generated}
    layout: {kind: pattern, image: "{case}/ct.nii.gz", label: "{case}/seg.nii.gz"}
    labels: {1: Liver}
    role: train
"""


@pytest.fixture
def entries(tmp_path, classes):
    def build(**digests: str):
        text = CATALOG
        for placeholder, value in digests.items():
            text = text.replace(placeholder, value)
        path = tmp_path / "catalog.yaml"
        path.write_text(text)
        return load_catalog(path, classes)

    return build


def test_manual_dataset_lists_problems_and_instructions(tmp_path, entries):
    entry = entries()["by_hand"]
    root = tmp_path / "by_hand"
    assert check_manual(entry, root) == [f"the dataset folder {root} does not exist"]
    root.mkdir()
    problems = check_manual(entry, root)
    assert any("LICENSE" in p for p in problems) and any("no cases found" in p for p in problems)
    with pytest.raises(DownloadError) as err:
        download_dataset(entry, root)
    message = str(err.value)
    assert "by_hand" in message and "LICENSE" in message
    assert "Sign the data use agreement at https://example.org/by-hand" in message


def test_manual_dataset_that_is_complete_passes(tmp_path, entries):
    entry = entries()["by_hand"]
    root = tmp_path / "by_hand"
    for name in ("LICENSE", "images/c01.nii.gz", "labels/c01.nii.gz"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    assert check_manual(entry, root) == []
    assert download_dataset(entry, root) == root


def test_zenodo_dataset_through_a_mirror_with_md5(server, tmp_path, entries):
    labels = make_zip(tmp_path / "labels.zip", {"labels/a.nii.gz": b"label"}).read_bytes()
    server.files["/records/123/files/a.nii.gz"] = PAYLOAD
    server.files["/records/123/files/labels.zip"] = labels
    md5 = {"MD5_A": hashlib.md5(PAYLOAD).hexdigest(), "MD5_ZIP": hashlib.md5(labels).hexdigest()}
    entry = entries(**md5)["on_zenodo"]
    root = tmp_path / "datasets" / "on_zenodo"
    assert download_dataset(entry, root, mirror=server.url, **FAST) == root
    assert (root / "a.nii.gz").read_bytes() == PAYLOAD
    assert (root / "labels" / "labels" / "a.nii.gz").read_bytes() == b"label"
    assert (tmp_path / "datasets" / ".downloads" / "on_zenodo" / "labels.zip").is_file()
    assert {path for path, _ in server.requests} == {"/records/123/files/a.nii.gz?download=1",
                                                      "/records/123/files/labels.zip?download=1"}
    download_dataset(entry, root, mirror=server.url, **FAST)
    assert len(server.requests) == 2  # everything present and verified: no new request


def test_zenodo_md5_mismatch_is_refused(server, tmp_path, entries, monkeypatch):
    server.files["/records/123/files/a.nii.gz"] = PAYLOAD
    entry = entries(MD5_A="f" * 32, MD5_ZIP="f" * 32)["on_zenodo"]
    monkeypatch.setenv(MIRROR_ENV, server.url)  # the environment gives the mirror
    with pytest.raises(DownloadError, match=f"expected md5 {'f' * 32}, got {hashlib.md5(PAYLOAD).hexdigest()}"):
        download_dataset(entry, tmp_path / "on_zenodo", **FAST)
    assert not (tmp_path / "on_zenodo" / "a.nii.gz").exists()


def test_url_dataset_with_an_archive_is_extracted_into_its_folder(server, tmp_path, entries):
    tarball = make_tar(tmp_path / "Task.tar.gz", GOOD).read_bytes()
    server.files["/pub/Task.tar.gz"] = tarball
    entry = entries(SHA_TAR=sha256(tarball))["one_tarball"]
    root = tmp_path / "datasets" / "one_tarball"
    download_dataset(entry, root, mirror=server.url, **FAST)
    assert {n: (root / n).read_bytes() for n in GOOD} == GOOD
    download_dataset(entry, root, mirror=server.url, **FAST)
    assert len(server.requests) == 1  # already extracted: not fetched again


def test_idc_dataset_without_idc_index_says_how_to_install_it(tmp_path, entries, monkeypatch):
    monkeypatch.setitem(sys.modules, "idc_index", None)  # makes `import idc_index` fail
    with pytest.raises(DownloadError, match="pip install idc-index"):
        download_dataset(entries()["in_idc"], tmp_path / "in_idc")


def test_generated_dataset_needs_nothing(tmp_path, entries):
    root = tmp_path / "made_here"
    assert download_dataset(entries()["made_here"], root) == root
    assert not root.exists()


LOGIN_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in - Data Portal</title></head><body>Log in</body></html>"


def test_an_html_page_instead_of_a_file_is_refused_and_not_pinned(server, tmp_path):
    server.files["/data/file.bin"] = LOGIN_PAGE
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=r"file\.bin: the server returned an HTML page \(title 'Sign in - Data "
                                            r"Portal'\) instead of file\.bin: a login.*no checksum was recorded"):
        fetch(f"{server.url}/data/file.bin", dest, None, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_html_page_pinned_by_an_earlier_run_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(LOGIN_PAGE)
    checksum_record(dest).write_text(f"{sha256(LOGIN_PAGE)}  file.bin\n")
    fetch(f"{server.url}/data/file.bin", dest, None, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert checksum_record(dest).read_text().split()[0] == sha256(PAYLOAD)


def test_an_archive_that_does_not_open_is_refused_and_not_pinned(server, tmp_path, entries):
    server.files["/pub/Unpinned.tar.gz"] = bytes(range(256)) * 8  # neither HTML nor a tar archive
    root = tmp_path / "datasets" / "unpinned"
    with pytest.raises(DownloadError, match=r"Unpinned\.tar\.gz: the download does not open as a tar archive.*"
                                            r"no checksum was recorded"):
        download_dataset(entries()["unpinned_tarball"], root, mirror=server.url, **FAST)
    downloads = tmp_path / "datasets" / ".downloads"
    assert not root.exists() and not [p for p in downloads.rglob("*") if p.is_file()]


def test_a_stray_file_does_not_mark_an_archive_extracted(server, tmp_path, entries):
    tarball = make_tar(tmp_path / "Task.tar.gz", GOOD).read_bytes()
    server.files["/pub/Task.tar.gz"] = tarball
    entry = entries(SHA_TAR=sha256(tarball))["one_tarball"]
    root = tmp_path / "datasets" / "one_tarball"
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    marker = extraction_marker(tmp_path / "datasets" / ".downloads" / "one_tarball" / "Task.tar.gz")
    with pytest.raises(DownloadError, match=rf"one_tarball already has content, but no extraction of Task\.tar\.gz "
                                            rf"into it was completed \({re.escape(str(marker))} is missing\)"):
        download_dataset(entry, root, mirror=server.url, **FAST)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"] and not server.requests

    (root / "notes.txt").unlink()
    download_dataset(entry, root, mirror=server.url, **FAST)
    assert {n: (root / n).read_bytes() for n in GOOD} == GOOD and marker.read_text() == f"{root}\n"
    (root / "Task" / "images" / "a.nii.gz").unlink()  # a partly deleted dataset keeps its marker: not re-extracted
    download_dataset(entry, root, mirror=server.url, **FAST)
    assert len(server.requests) == 1


def test_an_archive_extracted_before_its_folder_was_deleted_is_extracted_again(server, tmp_path, entries):
    tarball = make_tar(tmp_path / "Task.tar.gz", GOOD).read_bytes()
    server.files["/pub/Task.tar.gz"] = tarball
    entry = entries(SHA_TAR=sha256(tarball))["one_tarball"]
    root = tmp_path / "datasets" / "one_tarball"
    download_dataset(entry, root, mirror=server.url, **FAST)
    for path in sorted(root.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    download_dataset(entry, root, mirror=server.url, **FAST)
    assert {n: (root / n).read_bytes() for n in GOOD} == GOOD and len(server.requests) == 1


@pytest.mark.parametrize("maker, name", [(make_tar, "big.tar.gz"), (make_zip, "big.zip")])
@pytest.mark.parametrize("limit, message", [({"max_members": 2}, "refusing to extract 3 members, more than the "
                                                                  "limit of 2"),
                                            ({"max_bytes": 10}, "refusing to extract 0.0 GB, more than the limit")])
def test_archive_limits_are_checked_before_anything_is_written(tmp_path, maker, name, limit, message):
    archive = maker(tmp_path / name, GOOD)
    with pytest.raises(DownloadError, match=rf"{re.escape(name)}: {message}.*nothing was extracted"):
        safe_extract(archive, tmp_path / "out", **limit)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_an_archive_larger_than_the_free_space_is_refused(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / "a.tar", GOOD)
    usage = type("usage", (), {"free": 8})
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda _: usage)
    with pytest.raises(DownloadError, match=r"a\.tar: it unpacks to 0\.0 GB, but .* has only 0\.0 GB free"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_a_download_is_named_and_the_partial_file_kept(server, tmp_path, monkeypatch):
    def full(url, partial, **kwargs):
        partial.write_bytes(PAYLOAD[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch_module, "_download", full)
    dest = tmp_path / "file.bin"
    with pytest.raises(DiskFullError, match=r"file\.bin\.partial: cannot write it, the disk \(or the quota\) is full.*"
                                            r"kept, so the next run resumes"):
        fetch(f"{server.url}/data/file.bin", dest, sha256(PAYLOAD), **FAST)
    assert dest.with_name("file.bin.partial").stat().st_size == 1000
