"""The real download code against an HTTP server on 127.0.0.1 serving archives the tests build."""

import http.server
import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isic_utils.data.sources import RELEASES, DataError, download_release, find_pairs

NAMES = {
    "train": ("ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth"),
    "test": ("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth"),
}


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def build_archives(folder: Path, counts=None, extra_members=None, release="isic2016") -> dict[str, bytes]:
    """Zips laid out like the official ones (a top folder per archive, plus macOS clutter; the later releases' image
    archives hold superpixel maps and licence files too, their masks end in ``_segmentation.png``)."""
    counts = counts or {"train": 3, "test": 2}
    names, suffix = (NAMES, "_Segmentation.png") if release == "isic2016" else (RELEASES[release].folders, None)
    suffix = suffix or RELEASES[release].mask_suffix
    archives = {}
    for split, count in counts.items():
        data_name, truth_name = names[split]
        for name, kind in ((data_name, "image"), (truth_name, "mask")):
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                for k in range(count):
                    image_id = f"ISIC_{k + {'train': 0, 'validation': 300, 'test': 500}[split]:07d}"
                    if kind == "image":
                        archive.writestr(f"{name}/{image_id}.jpg", _jpg(np.full((24, 32, 3), 120, np.uint8)))
                        if release != "isic2016":
                            archive.writestr(f"{name}/{image_id}_superpixels.png", _png(np.zeros((24, 32), np.uint8)))
                    else:
                        mask = np.zeros((24, 32), np.uint8)
                        mask[6:18, 8:24] = 255
                        archive.writestr(f"{name}/{image_id}{suffix}", _png(mask))
                if release != "isic2016" and kind == "image":
                    archive.writestr(f"{name}/LICENSE.txt", b"CC-BY-NC")
                archive.writestr(f"__MACOSX/{name}/._junk", b"junk")
                for member, payload in (extra_members or {}).get(name, []):
                    archive.writestr(member, payload)
            archives[f"{name}.zip"] = buffer.getvalue()
    for filename, payload in archives.items():
        (folder / filename).write_bytes(payload)
    return archives


class Server:
    """Serves files from a dict; ``truncate`` names files sent cut in half (a dropped connection)."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.truncate, self.requests = files, set(), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, body: bool):
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append((self.command, name))
                if name not in outer.files:
                    self.send_error(404)
                    return
                payload = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload[: len(payload) // 2] if name in outer.truncate else payload)

            def do_GET(self):
                self._send(True)

            def do_HEAD(self):
                self._send(False)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/2016"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    instance = Server(build_archives(built))
    yield instance
    instance.close()


def test_download_extract_and_verify_counts(server, tmp_path):
    root = download_release(tmp_path / "isic", base_url=server.url, expected_counts={"train": 3, "test": 2})
    assert [p.id for p in find_pairs(root, "train")] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert len(find_pairs(root, "test")) == 2
    assert not (root / "__MACOSX").exists()
    assert {name for _, name in server.requests} == {f"{n}.zip" for pair in NAMES.values() for n in pair}
    # a second call finds everything in place and asks the server for nothing
    seen = len(server.requests)
    download_release(root, base_url=server.url, expected_counts={"train": 3, "test": 2})
    assert len(server.requests) == seen


def test_interrupted_download_is_detected_and_redone(server, tmp_path):
    name = "ISBI2016_ISIC_Part1_Training_Data.zip"
    server.truncate.add(name)
    root = tmp_path / "isic"
    with pytest.raises(DataError, match=name):
        download_release(root, splits=["train"], base_url=server.url, expected_counts={"train": 3})
    assert not (root / name).exists()  # the partial file is never taken for the archive
    server.truncate.clear()
    download_release(root, splits=["train"], base_url=server.url, expected_counts={"train": 3})
    assert len(find_pairs(root, "train")) == 3


def test_partial_archive_left_by_another_tool_is_replaced(server, tmp_path):
    root = tmp_path / "isic"
    root.mkdir()
    name = "ISBI2016_ISIC_Part1_Training_Data.zip"
    (root / name).write_bytes(server.files[name][:100])
    download_release(root, splits=["train"], base_url=server.url, expected_counts={"train": 3})
    assert len(find_pairs(root, "train")) == 3


def test_corrupt_archive_gives_a_clear_error(tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    files = build_archives(built)
    name = "ISBI2016_ISIC_Part1_Training_Data.zip"
    files[name] = b"this is not a zip archive at all" * 10
    corrupt = Server(files)
    try:
        with pytest.raises(DataError, match="not a valid zip archive"):
            download_release(tmp_path / "isic", splits=["train"], base_url=corrupt.url, expected_counts={"train": 3})
    finally:
        corrupt.close()


def test_members_outside_the_target_are_refused(tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    name = "ISBI2016_ISIC_Part1_Training_Data"
    files = build_archives(built, extra_members={name: [("../escaped.txt", b"x")]})
    evil = Server(files)
    try:
        with pytest.raises(DataError, match="outside"):
            download_release(tmp_path / "isic", splits=["train"], base_url=evil.url, expected_counts={"train": 3})
    finally:
        evil.close()
    assert not (tmp_path / "escaped.txt").exists()


def test_wrong_counts_are_reported(server, tmp_path):
    with pytest.raises(DataError, match="3 train image/mask pairs after extraction, expected 900"):
        download_release(tmp_path / "isic", splits=["train"], base_url=server.url)


def test_missing_archive_names_the_url(server, tmp_path):
    with pytest.raises(DataError, match="could not download .*ISBI2016_ISIC_Part1_Test_Data.zip"):
        server.files.pop("ISBI2016_ISIC_Part1_Test_Data.zip")
        download_release(tmp_path / "isic", splits=["test"], base_url=server.url, expected_counts={"test": 2})


def test_an_extraction_killed_half_way_is_redone_not_trusted(server, tmp_path, monkeypatch):
    """A run killed while unzipping must not leave folders that a later run takes for a complete data set."""
    import zipfile

    real = zipfile.ZipFile.extract
    calls = []

    def dies_on_the_third_member(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed while extracting")
        return real(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", dies_on_the_third_member)
    root = tmp_path / "isic"
    with pytest.raises(KeyboardInterrupt):
        download_release(root, splits=["train"], base_url=server.url, expected_counts={"train": 3})
    monkeypatch.undo()
    assert not (root / NAMES["train"][0]).exists()  # nothing half-extracted under the real name
    download_release(root, splits=["train"], base_url=server.url, expected_counts={"train": 3})
    assert len(find_pairs(root, "train")) == 3


# ----------------------------------------------------------------------------- the real profile's data path


def isic_params(tmp_path, **overrides):
    from isic_utils.config import params as P

    root = Path(__file__).resolve().parents[1]
    values = {"output_dir": str(tmp_path / "out"), "image_size": 32, **overrides}
    return P.resolve("train", root / "params" / "task1.yaml", "isic2016", values, root=root)


@pytest.fixture
def download_from(server, monkeypatch):
    """prepare_data's download, pointed at the local server (the real download code; the counts of its archives)."""
    from functools import partial

    from isic_utils.training import experiments

    monkeypatch.setattr(
        experiments,
        "download_release",
        partial(download_release, base_url=server.url, expected_counts={"train": 3, "test": 2}),
    )
    return server


def test_the_real_profile_downloads_into_isic_data_dir_once(download_from, tmp_path, monkeypatch):
    from isic_utils.training.experiments import prepare_data

    monkeypatch.setenv("ISIC_DATA_DIR", str(tmp_path / "isic"))
    params = isic_params(tmp_path)
    assert params["download"] is True and not params["data_dir"]
    with pytest.warns(
        UserWarning, match=r"3 training pairs \(ISIC 2016 has 900\), 2 test pairs \(ISIC 2016 has 379\)"
    ):  # a partial copy is named
        data = prepare_data(params, progress=False)
    assert len(find_pairs(tmp_path / "isic", "train")) == 3 and data.counts()["test"] == 2
    assert data.root == tmp_path / "isic"
    asked = len(download_from.requests)
    with pytest.warns(UserWarning):
        prepare_data(params, progress=False)  # in place: nothing downloaded again
    assert len(download_from.requests) == asked and {name for _, name in download_from.requests} == {
        f"{n}.zip" for pair in NAMES.values() for n in pair
    }


def test_isic_data_dir_with_the_data_is_read_without_downloading(download_from, tmp_path, monkeypatch):
    from isic_utils.training.experiments import prepare_data

    build_archives(tmp_path)
    for name in (n for pair in NAMES.values() for n in pair):
        with zipfile.ZipFile(tmp_path / f"{name}.zip") as archive:
            archive.extractall(tmp_path / "mine", [m for m in archive.namelist() if not m.startswith("__MACOSX")])
    monkeypatch.setenv("ISIC_DATA_DIR", str(tmp_path / "mine"))
    with pytest.warns(UserWarning, match="3 training"):
        data = prepare_data(isic_params(tmp_path), progress=False)
    assert data.root == tmp_path / "mine" and download_from.requests == []


def test_no_data_and_no_download_names_the_fix(tmp_path, monkeypatch):
    from isic_utils.training.experiments import prepare_data

    monkeypatch.setenv("ISIC_DATA_DIR", str(tmp_path / "nothing"))
    with pytest.raises(DataError, match=r"no ISIC 2016 data under .*nothing.*ISIC_DATA_DIR.*download: true"):
        prepare_data(isic_params(tmp_path, download=False), progress=False)


def test_download_progress_goes_to_the_relay_and_the_notebook_gets_one_line_per_archive(
    server, tmp_path, capsys, monkeypatch
):
    """Under `report`, torchvision's download bar and the extraction bar go to the file the report relays to the
    terminal; what the chapter prints (its notebook, its page) is one line per archive, and stderr stays empty."""
    from isic_utils.base.files import PROGRESS_ENV

    relay = tmp_path / "relay.log"
    monkeypatch.setenv(PROGRESS_ENV, str(relay))
    download_release(tmp_path / "isic", base_url=server.url, expected_counts={"train": 3, "test": 2})
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert sum(line.startswith("download: ISBI2016_ISIC_Part1_") and line.endswith("MB)") for line in lines) == 4
    assert not [line for line in lines if "%|" in line or "\r" in line]
    drawn = relay.read_text()
    assert "extract ISBI2016_ISIC_Part1_Training_Data.zip" in drawn and "100%" in drawn  # torchvision's bar, then ours


@pytest.mark.parametrize("release", ["isic2017", "isic2018"])
def test_a_later_release_downloads_in_its_own_layout_and_validates_on_its_own_validation_set(
    release, tmp_path, monkeypatch
):
    """The isic2017 / isic2018 profiles: the six official archives of the release (other folder names, lower-case
    _segmentation.png masks, superpixel maps and a licence among the images) fetched from a local server, verified
    and extracted; the run validates on the release's own validation set, and the chapters name the release."""
    from functools import partial

    from isic_utils.config import params as P
    from isic_utils.training import experiments

    counts = {"train": 3, "validation": 2, "test": 2}
    built = tmp_path / "built"
    built.mkdir()
    server = Server(build_archives(built, counts, release=release))
    try:
        monkeypatch.setattr(
            experiments, "download_release", partial(download_release, base_url=server.url, expected_counts=counts)
        )
        monkeypatch.setenv("ISIC_DATA_DIR", str(tmp_path / release))
        root = Path(__file__).resolve().parents[1]
        values = {"output_dir": str(tmp_path / "out"), "image_size": 32}
        params = P.resolve("train", root / "params" / "task1.yaml", release, values, root=root)
        assert params["data_source"] == release and params["download"] is True
        with pytest.warns(UserWarning, match=rf"3 training pairs \({RELEASES[release].name} has"):
            data = experiments.prepare_data(params, progress=False)
    finally:
        server.close()
    assert data.counts() == {"train": 3, "validation": 2, "test": 2}
    assert data.val.ids == ["ISIC_0000300", "ISIC_0000301"] and data.test.ids == ["ISIC_0000500", "ISIC_0000501"]
    assert len({name for _, name in server.requests}) == 6
    said = experiments.describe_data(params)
    assert f"**{RELEASES[release].name}**" in said and "official test set and validation set" in said


def test_the_shared_later_releases_folder_reads_as_isic_2018_training_data(tmp_path):
    """The development sample of the later releases is laid out as the official ISIC 2018 Task 1 training archives."""
    import os

    sample = os.environ.get("ISIC_SAMPLE_DIR")
    folder = Path(sample or "/nonexistent") / "isic2018-additions-512"
    if not folder.is_dir():
        pytest.skip("ISIC_SAMPLE_DIR has no isic2018-additions-512")
    pairs = find_pairs(folder, "train", "isic2018")
    assert len(pairs) == 1149 and pairs[0].mask.name == f"{pairs[0].id}_segmentation.png"
