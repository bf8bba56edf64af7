"""`python -m larvseg_jax.demo`: the page, its API (always), and the page driven in a real
headless Chromium (when Playwright and a Chromium are installed: requirements-browser.txt)."""

import json
import os
import pathlib
import shutil
import threading
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest

from larvseg_jax import demo, inference, segment

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PHOTO = FIXTURES / "images" / "chelsea.png"
MAX_UPLOAD = 400_000  # bytes: chelsea.png (about 0.2 MB) fits, astronaut.png does not
# Set to a path to keep the browser test's screenshot (docs/demo.png in the README).
SCREENSHOT_ENV = "LARVSEG_DEMO_SCREENSHOT"


@pytest.fixture(scope="module")
def server(smoke_ca_run):
    app = demo.Demo(inference.load(str(smoke_ca_run)), MAX_UPLOAD)
    httpd = demo.serve(app, 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def _post(url: str, fields: dict[str, bytes | str], filename: str = "upload.png"):
    """A multipart/form-data POST as a browser's form sends it; (status, JSON)."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields.items():
        value = value.encode() if isinstance(value, str) else value
        extra = f'; filename="{filename}"' if name == "image" else ""
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()
        )
        body += value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{url}/api/segment",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_page_offers_the_trained_classes(server):
    app, url = server
    with urllib.request.urlopen(url) as response:
        page = response.read().decode()
    assert '<input type="file" id="file" name="image"' in page
    assert all(f'<option value="{n}">' in page for n in app.predictor.union)


def test_the_api_answers_what_segment_computes(server):
    app, url = server
    status, answer = _post(url, {"image": PHOTO.read_bytes(), "classes": "sky, water,boat"})
    assert status == 200, answer
    rgb = inference.read_rgb(str(PHOTO))
    predictor = app.predictor
    names = ("sky", "water", "boat")
    pred = predictor.segment(rgb, predictor.index(names))
    want = segment.summary(pred.labels, pred.confidence, names)
    assert [{k: c[k] for k in want[0]} for c in answer["classes"]] == want
    assert answer["overlay"].startswith("data:image/png;base64,") and answer["attention"] is None
    assert all(c["colour"].startswith("#") and len(c["colour"]) == 7 for c in answer["classes"])


@pytest.mark.parametrize(
    "fields, status, message",
    [
        (
            {"image": (FIXTURES / "bad" / "not_an_image.jpg").read_bytes()},
            400,
            "not a readable image",
        ),
        ({"image": (FIXTURES / "bad" / "truncated.jpg").read_bytes()}, 400, "not a readable image"),
        ({"image": (FIXTURES / "images" / "astronaut.png").read_bytes()}, 413, "up to 0.4 MB"),
        ({"image": PHOTO.read_bytes(), "classes": "bota"}, 400, "closest: boat"),
        ({"classes": "sky"}, 400, "choose an image file first"),
    ],
)
def test_refusals_are_messages(server, fields, status, message):
    _, url = server
    got, answer = _post(url, fields)
    assert got == status and message in answer["error"], answer


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_the_page_in_a_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install -r requirements-browser.txt"
    )
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (Debian: apt install chromium)")
    _, url = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(url)
        page.set_input_files("#file", str(PHOTO))
        page.fill("#classes", "sky, water, boat, sand")
        page.fill("#attention", "water")
        page.click("#submit")
        page.wait_for_selector("#legend li", timeout=60_000)
        shown = page.eval_on_selector_all("#legend li", "items => items.map(i => i.dataset.name)")
        _, answer = _post(url, {"image": PHOTO.read_bytes(), "classes": "sky, water, boat, sand"})
        assert shown == [c["name"] for c in answer["classes"]]
        assert page.is_visible("#overlay")
        assert page.eval_on_selector("#overlay", "img => img.naturalWidth") > 0
        page.click("#toggle")
        assert page.is_visible("#attention-map") and not page.is_visible("#overlay")
        page.click("#toggle")
        screenshot = tmp_path / "demo.png"
        page.screenshot(path=str(screenshot), full_page=True)
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copy(screenshot, os.environ[SCREENSHOT_ENV])

        page.set_input_files("#file", str(FIXTURES / "bad" / "not_an_image.jpg"))
        page.click("#submit")
        page.wait_for_function("document.getElementById('message').textContent.includes('not a')")
        assert "not a readable image" in page.text_content("#message")
        big = tmp_path / "big.png"
        big.write_bytes(b"\x89PNG" + np.zeros(MAX_UPLOAD + 10, np.uint8).tobytes())
        page.set_input_files("#file", str(big))
        page.click("#submit")
        assert "this demo takes up to 0.4 MB" in page.text_content("#message")
        browser.close()
    assert screenshot.stat().st_size > 10_000
