"""Download path without the network: local tar, checksum, atomic extraction, offline message."""

import hashlib
import io
import shutil
import tarfile
import urllib.error

import pytest

from adtrain.data import MVTecDataModule
from adtrain.data import download as dl
from adtrain.data.testing import write_mvtec_tree
from adtrain.errors import DataError


def _tar(tmp_path, wrap: str | None = None):
    """A tar.xz of a tiny MVTec tree (optionally wrapped in one top folder); returns (path, md5)."""
    src = write_mvtec_tree(tmp_path / "src", "bottle", n_train=3, n_test_good=1)
    archive = tmp_path / "mvtec.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(src / "bottle", arcname=f"{wrap}/bottle" if wrap else "bottle")
    shutil.rmtree(src)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.mark.parametrize("wrap", [None, "mvtec_anomaly_detection"])
def test_download_verify_extract_with_local_archive(tmp_path, monkeypatch, wrap):
    archive, md5 = _tar(tmp_path, wrap)
    spec = dl.ArchiveSpec("MVTec AD", "https://example.invalid/mvtec.tar.xz", md5, "mvtec.tar.xz")
    monkeypatch.setattr(MVTecDataModule, "archive", spec)
    calls = []
    monkeypatch.setattr(dl, "fetch_url", lambda url, dest: (calls.append(url), shutil.copy(archive, dest)))
    root = tmp_path / "data"
    dm = MVTecDataModule(root=str(root), category="bottle", download=True, image_size=[32, 32])
    dm.setup()
    assert calls == [spec.url]
    assert len(dm.train_samples) + len(dm.val_samples) == 3
    assert not (root / "mvtec.tar.xz").exists()  # archive removed after extraction
    assert [p.name for p in root.iterdir()] == ["bottle"]  # no temp dir or .part left behind
    # present now: no second download
    MVTecDataModule(root=str(root), category="bottle", download=True).setup()
    assert len(calls) == 1
    # a misspelt category: no download (that could never bring it; a sweep repeated it per job), a clear word
    for _ in range(2):
        with pytest.raises(DataError, match="'botle' is not one of MVTec AD's categories.*none was started"):
            MVTecDataModule(root=str(root), category="botle", download=True).setup()
    with pytest.raises(DataError, match="'botle' is none of them: check data.category") as e:
        MVTecDataModule(root=str(root), category="botle").setup()
    assert "data.download=true" not in str(e.value)  # a download would not help
    assert len(calls) == 1


def test_a_release_unpacked_into_its_top_folder_is_pointed_at_not_downloaded_again(tmp_path, monkeypatch):
    write_mvtec_tree(tmp_path / "data" / "mvtec_anomaly_detection", "bottle", n_train=3, n_test_good=1)
    calls = []
    monkeypatch.setattr(dl, "fetch_url", lambda url, dest: calls.append(url))
    for download in (False, True):
        with pytest.raises(DataError, match="one folder down: set data.root=.*mvtec_anomaly_detection") as e:
            MVTecDataModule(root=str(tmp_path / "data"), category="bottle", download=download).setup()
        assert "data.download=true" not in str(e.value)
    assert calls == []


def test_visa_refuses_a_misspelt_object_before_downloading(tmp_path, monkeypatch):
    import adtrain.data.visa as visa

    calls = []
    monkeypatch.setattr(dl, "fetch_url", lambda url, dest: calls.append(url))
    with pytest.raises(DataError, match="'candel' is not one of VisA's objects.*none was started"):
        visa.VisADataModule(root=str(tmp_path / "visa"), category="candel", download=True).setup()
    assert calls == []


def test_checksum_mismatch_deletes_archive(tmp_path, monkeypatch):
    archive, _ = _tar(tmp_path)
    spec = dl.ArchiveSpec("MVTec AD", "https://example.invalid/x", "0" * 32, "mvtec.tar.xz")
    monkeypatch.setattr(dl, "fetch_url", lambda url, dest: shutil.copy(archive, dest))
    root = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch") as e:
        dl.download_dataset(spec, root, "<category>/train/good")
    assert e.value.path == str(root / "mvtec.tar.xz")
    assert not (root / "mvtec.tar.xz").exists() and not (root / "bottle").exists()


def test_offline_failure_says_where_to_put_files(tmp_path, monkeypatch):
    def offline(url, dest):
        dest.write_bytes(b"partial")
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(dl, "fetch_url", offline)
    root = tmp_path / "mvtec"
    with pytest.raises(DataError) as e:
        MVTecDataModule(root=str(root), category="bottle", download=True).setup()
    msg = str(e.value)
    assert "cannot download MVTec AD" in msg and "by hand" in msg
    assert dl.MVTEC_AD.url in msg and f"{root}/<category>/train/good" in msg
    assert not any(root.iterdir())  # the partial file is gone


def test_extract_is_atomic_on_corrupt_archive(tmp_path):
    archive, _ = _tar(tmp_path)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    root = tmp_path / "root"
    with pytest.raises(DataError, match="cannot extract archive"):
        dl.extract_archive(archive, root)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("has_filter", [True, False])
def test_extract_refuses_paths_outside_root(tmp_path, monkeypatch, has_filter):
    """Refused with tarfile's "data" filter and without it (Python 3.11 before 3.11.4 has none)."""
    if not has_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DataError):
        dl.extract_archive(evil, tmp_path / "root")
    assert not (tmp_path / "escaped.txt").exists()
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("data/out")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../outside"
        tar.addfile(info)
    with pytest.raises(DataError, match="refusing to extract member 'data/out'"):
        dl.extract_archive(link, tmp_path / "root2")


def _visa_tar(tmp_path):
    """A plain .tar of a tiny VisA tree (one category + split_csv), as the official archive is laid out."""
    from adtrain.data.testing import write_visa_tree

    src = write_visa_tree(tmp_path / "visa_src", ("candle",), n_train=3, n_test_normal=1, n_test_anomaly=1)
    archive = tmp_path / "VisA_20220922.tar"
    with tarfile.open(archive, "w") as tar:
        for entry in ("candle", "split_csv"):
            tar.add(src / entry, arcname=entry)
    shutil.rmtree(src)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_visa_spec_has_the_published_checksum():
    assert dl.VISA.checksum == "ef908989b6dc701fc218f643c127a4de"  # as published with anomalib's VisA loader
    assert dl.VISA.filename == "VisA_20220922.tar"


@pytest.mark.parametrize("good", [True, False])
def test_visa_download_is_checksummed(tmp_path, monkeypatch, good):
    import adtrain.data.visa as visa

    archive, md5 = _visa_tar(tmp_path)
    spec = dl.ArchiveSpec("VisA", "https://example.invalid/VisA_20220922.tar", md5 if good else "f" * 32,
                          "VisA_20220922.tar")
    monkeypatch.setattr(visa, "VISA", spec)
    monkeypatch.setattr(dl, "fetch_url", lambda url, dest: shutil.copy(archive, dest))
    root = tmp_path / "visa"
    dm = visa.VisADataModule(root=str(root), category="candle", download=True, image_size=[32, 32])
    if good:
        dm.setup()
        assert len(dm.train_samples) + len(dm.val_samples) == 3
        assert sorted(p.name for p in root.iterdir()) == ["candle", "split_csv"]
    else:
        with pytest.raises(DataError, match="checksum mismatch") as e:
            dm.setup()
        assert e.value.path == str(root / "VisA_20220922.tar")
        assert sorted(p.name for p in root.iterdir()) == []  # nothing extracted, archive deleted


def test_archive_without_checksum_is_refused(tmp_path):
    archive, _ = _visa_tar(tmp_path)
    with pytest.raises(DataError, match="no checksum"):
        dl.verify_checksum(archive, "")
