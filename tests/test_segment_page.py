"""`pack --with-model`: the handed-over report's page that segments the reader's own image in their browser (ONNX
Runtime Web, WebAssembly), opened from the unpacked folder in headless Chromium as a reader opens it: its mask is
the ONNX predictor's, its confidence the package's rule, nothing leaves the page, and a file the browser cannot
decode is named. Needs Debian's chromium, playwright and onnxruntime-web (`npm ci --prefix web`); CI installs all
three, so there a missing one fails instead of skipping."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from .conftest import CHROMIUM, ROOT, browser_or_skip, inside, report_copy

pytestmark = pytest.mark.slow
ORT_WEB = ROOT / "web" / "node_modules" / "onnxruntime-web" / "dist"


def _tools_or_skip():
    return browser_or_skip(("onnxruntime-web", ORT_WEB.is_dir(), "npm ci --prefix web"))


@pytest.fixture(scope="module")
def packed(built_report, tmp_path_factory):
    """The tiny report packed with task 3's model, unpacked: (its folder, the zip, the project)."""
    _tools_or_skip()
    from isic_utils.__main__ import main

    root = report_copy(built_report, tmp_path_factory.mktemp("packed"))
    os.environ["ORT_WEB_DIR"] = str(ORT_WEB)  # a user's checkout has web/ beside params/; this copy has not
    try:
        with inside(root):
            assert main(["pack", "--data", "tiny", "--with-model"]) == 0
    finally:
        del os.environ["ORT_WEB_DIR"]
    bundle = root / "outputs" / "tiny-report.zip"
    unpacked = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(unpacked)
    return unpacked / "tiny-report", bundle, root


def test_the_page_segments_the_readers_image_as_the_onnx_predictor_does(packed, tmp_path):
    from isic_utils.deploy.predictor import OnnxPredictor, map_confidence

    folder, _, root = packed
    index = (folder / "index.html").read_text()
    assert 'href="segment.html"' in index and (folder / "segment.html").is_file()
    model = root / "outputs" / "tiny" / "deploy" / "task3" / "model-int8.onnx"
    predictor = OnnxPredictor(model)
    test_image = sorted((root / "data" / "synthetic-20-6").glob("*Test_Data/*.jpg"))[0]
    picture = tmp_path / "lesion.png"  # a lossless file: both read the same pixels (JPEG: the predictor's draft)
    Image.open(test_image).convert("RGB").resize((1024, 768), Image.Resampling.BICUBIC).save(picture)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")

    sync_playwright = _tools_or_skip()
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto((folder / "segment.html").as_uri())
        page.wait_for_function("window.segmentReady !== undefined", timeout=60_000)
        assert page.evaluate("window.segmentReady"), page.inner_text("#status")
        page.set_input_files("#picture", str(picture))
        page.wait_for_function("window.segmentation && window.segmentation.name === 'lesion.png'", timeout=60_000)
        result = page.evaluate(
            "({...window.segmentation, mask: Array.from(window.segmentation.mask),"
            " probability: Array.from(window.segmentation.probability)})"
        )
        shown = {key: page.inner_text(f"#r-{key}") for key in ("image", "area", "confidence", "time")}
        download = page.get_attribute("#r-download", "download")
        page.set_input_files("#picture", str(broken))
        page.wait_for_function("window.segmentation.name === 'broken.jpg'", timeout=60_000)
        status, status_class = page.inner_text("#status"), page.get_attribute("#status", "class")
        browser.close()

    mask, confidence = predictor.predict_one(picture)
    ours = np.array(result["mask"], dtype=np.uint8).reshape(result["height"], result["width"])
    differing = int((ours != mask).sum())
    print(f"1024×768 segmented in the page in {result['ms']:.0f} ms; {differing} pixels unlike the ONNX predictor's")
    assert ours.shape == mask.shape == (768, 1024)
    assert differing <= 1e-3 * mask.size  # WebAssembly's int8 kernels are not the CPU's: a boundary pixel may flip
    probability = np.array(result["probability"], dtype=np.float32).reshape(predictor.meta["image_size"], -1)
    # the page's own steps are the package's: its confidence is map_confidence of its own probabilities
    assert result["confidence"] == pytest.approx(map_confidence(probability, predictor.meta["calibration"]), abs=1e-5)
    assert abs(result["confidence"] - confidence) < 0.05 and result["area"] == int(ours.sum())
    assert shown["image"] == "lesion.png (1024 × 768)" and shown["time"].endswith(" ms")
    assert ("no lesion found" if not ours.any() else "% of the image") in shown["area"]
    assert download == "lesion_Segmentation.png"  # the name predict gives the mask
    assert "broken.jpg cannot be decoded by this browser" in status and status_class == "error"
    assert all(url.startswith(("file:", "blob:", "data:")) for url in requests), requests  # nothing left the page


def test_packing_with_a_model_needs_onnxruntime_web_and_writes_nothing_without_it(packed, tmp_path, capsys):
    from isic_utils.__main__ import main

    _, bundle, root = packed
    before = bundle.read_bytes()
    os.environ["ORT_WEB_DIR"] = str(tmp_path / "nowhere")
    try:
        with inside(root):
            assert main(["pack", "--data", "tiny", "--with-model"]) == 1
    finally:
        del os.environ["ORT_WEB_DIR"]
    assert "npm ci --prefix web" in capsys.readouterr().err and bundle.read_bytes() == before
