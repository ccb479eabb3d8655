"""Fetch an official dataset archive, verify its checksum, extract it atomically into a root."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from adtrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchiveSpec:
    name: str  # dataset name for messages
    url: str
    checksum: str  # published hex digest of the archive (the one anomalib checks too): 32 digits md5, 64 sha256
    filename: str


MVTEC_AD = ArchiveSpec(
    "MVTec AD",
    "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
    "mvtec_anomaly_detection.tar.xz",
    "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
    "mvtec_anomaly_detection.tar.xz",
)
VISA = ArchiveSpec(
    "VisA",
    "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
    "ef908989b6dc701fc218f643c127a4de",
    "VisA_20220922.tar",
)
MVTEC_3D = ArchiveSpec(
    "MVTec 3D-AD",
    "https://www.mydrive.ch/shares/150646/25de33f1276dd418cd856f2f48a84cdb/download/428824485-1643299897/"
    "mvtec_3d_anomaly_detection.tar.xz",
    "d8bb2800fbf3ac88e798da6ae10dc819",
    "mvtec_3d_anomaly_detection.tar.xz",
)
MVTEC_AD2 = ArchiveSpec(
    "MVTec AD 2",
    "https://www.mydrive.ch/shares/150997/701c90d3aea6588f404936e32a674602/download/466712769-1743429042/"
    "mvtec_ad_2.tar.gz",
    "c0ded99ef32bfc8e352d52beb44515e5b292b8598cb963aadfa91ca0763505e4",
    "mvtec_ad_2.tar.gz",
)
BTAD = ArchiveSpec(
    "BTAD",
    "https://avires.dimi.uniud.it/papers/btad/btad.zip",
    "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
    "btad.zip",
)


def fetch_url(url: str, dest: Path, chunk: int = 1 << 20) -> None:
    """Download url to dest (no checks). Network errors propagate as OSError/URLError."""
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0)
        done, next_log = 0, 0
        while True:
            block = resp.read(chunk)
            if not block:
                break
            f.write(block)
            done += len(block)
            if done >= next_log:
                log.info("downloading %s: %d MiB%s", url, done >> 20, f" of {total >> 20} MiB" if total else "")
                next_log += 256 << 20


_DIGESTS = {32: "md5", 64: "sha256"}  # hex digits -> algorithm


def file_digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path, expected: str) -> None:
    """md5 or sha256, told apart by the expected digest's length."""
    algorithm = _DIGESTS.get(len(expected or ""))
    if not expected:
        raise DataError(path, "no checksum to verify this archive against: refusing to extract it")
    if algorithm is None:
        raise DataError(path, f"checksum {expected!r} is neither an md5 (32 hex digits) nor a sha256 (64)")
    got = file_digest(path, algorithm)
    if got != expected.lower():
        raise DataError(path, f"checksum mismatch ({algorithm} {got}, expected {expected}): the file is "
                              "incomplete or corrupt")


def _content_root(folder: Path, wanted: Sequence[str]) -> Path:
    """Descend through single wrapping folders until one holds a wanted entry (or none wraps)."""
    while not any((folder / w).exists() for w in wanted):
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir():
            break
        folder = entries[0]
    return folder


def _check_members(tar: tarfile.TarFile, archive: Path, dest: Path) -> None:
    """Refuse an archive with a member (or a link's target) outside ``dest``, or a device file,
    before anything is written (what tarfile's "data" filter refuses, also where it is missing)."""
    base = dest.resolve()
    for member in tar.getmembers():
        where = (base / member.name).resolve()
        if member.issym():
            link = (where.parent / member.linkname).resolve()
        elif member.islnk():
            link = (base / member.linkname).resolve()
        else:
            link = where
        if member.isdev() or not (where.is_relative_to(base) and link.is_relative_to(base)):
            raise DataError(archive, f"refusing to extract member {member.name!r}: it leaves the "
                            "extraction folder or is a device file")


def _check_zip_members(zf: zipfile.ZipFile, archive: Path, dest: Path) -> None:
    """Refuse a zip with a member outside ``dest`` or a symbolic link (zipfile would rename the
    first and write the second as a file: refused instead, as for a tar)."""
    base = dest.resolve()
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if not (base / info.filename).resolve().is_relative_to(base) or stat.S_ISLNK(mode):
            raise DataError(archive, f"refusing to extract member {info.filename!r}: it leaves the "
                            "extraction folder or is a link")


def extract_archive(archive: Path, root: Path, wanted: Sequence[str] = ()) -> list[str]:
    """Extract a tar or zip archive into root atomically: first into a temp dir inside root, then each
    top-level entry is renamed into place (entries already in root are kept). Single wrapping
    folders are skipped until one holds a `wanted` entry. Returns the names moved.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        try:
            if archive.suffix.lower() == ".zip":  # BTAD ships a zip (by its name: content sniffing can misread a tar)
                with zipfile.ZipFile(archive) as zf:
                    _check_zip_members(zf, archive, tmp)
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tar:
                    _check_members(tar, archive, tmp)  # every Python: 3.11 before 3.11.4 has no filter
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(tmp, filter="data")
                    else:
                        tar.extractall(tmp)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(archive, f"cannot extract archive: {e}") from e
        src = _content_root(tmp, wanted)
        moved = []
        for entry in sorted(src.iterdir()):
            target = root / entry.name
            if target.exists():
                continue
            os.replace(entry, target)
            moved.append(entry.name)
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def manual_instructions(spec: ArchiveSpec, root: Path, layout: str) -> str:
    return (f"download {spec.url} by hand and extract it so that {root}/{layout} exists "
            f"(or point the root setting at the extracted folder)")


def download_dataset(spec: ArchiveSpec, root: str | Path, layout: str, wanted: Sequence[str] = (),
                     keep_archive: bool = False) -> None:
    """Download spec's archive into root, verify it, extract it atomically, remove the archive.

    On network failure raises DataError saying where to put the files by hand.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec.filename
    if not archive.is_file():
        part = archive.with_name(archive.name + ".part")
        log.info("downloading %s from %s to %s", spec.name, spec.url, archive)
        try:
            fetch_url(spec.url, part)
        except (OSError, urllib.error.URLError, ValueError) as e:
            part.unlink(missing_ok=True)
            raise DataError(root, f"cannot download {spec.name} ({e}); "
                                  + manual_instructions(spec, root, layout)) from e
        os.replace(part, archive)
    try:
        verify_checksum(archive, spec.checksum)
    except DataError as e:
        archive.unlink(missing_ok=True)
        raise DataError(archive, f"{str(e).removeprefix(f'{e.path}: ')}; it was deleted: run again to "
                                 "download it again, or " + manual_instructions(spec, root, layout)) from e
    moved = extract_archive(archive, root, wanted)
    log.info("extracted %s into %s: %s", spec.name, root, ", ".join(moved) or "nothing new")
    if not keep_archive:
        archive.unlink(missing_ok=True)
