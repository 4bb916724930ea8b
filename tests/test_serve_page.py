"""serve: the page in a real browser (Debian's headless Chromium driven by Playwright; no display needed).

Upload an image, click (point), drag (box), shift+click (polygon), ask each time: the answer streams in and
equals the runtime's answer for the region the page shows, and the region is drawn over the image. A
screenshot is kept as a test artifact (`serve-page.png` in the test's tmp folder, printed with -s).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("CHATSPOT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def browser():
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"  # never a browser download
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (`make test` installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def engine(varied_bundle):
    from chatspot_edge.runtime import Engine

    e = Engine.load(varied_bundle, threads=2)
    yield e
    e.close()


def _alone(engine, image: bytes, question: str, region: dict, max_tokens: int) -> str:
    s = engine.session(image)
    out = s.ask(question, max_tokens=max_tokens, stream=False, **region)
    s.close()
    return out


def _photo(path: Path, size=(320, 200)) -> bytes:
    """A picture with some structure: a gradient with three coloured shapes."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 140)], -1).astype(np.uint8)
    a[30:90, 40:120] = (230, 40, 40)
    a[120:180, 200:280] = (40, 90, 230)
    a[np.hypot(x - 250, y - 60) < 30] = (250, 220, 30)
    Image.fromarray(a).save(path)
    return path.read_bytes()


def _region(page) -> tuple[str, list]:
    el = page.locator("#region-readout")
    return el.get_attribute("data-kind"), json.loads(el.get_attribute("data-coords") or "null")


def test_page_click_drag_polygon_streamed_answers(browser, served, engine, tmp_path):
    image_path = tmp_path / "photo.png"
    image = _photo(image_path)
    origin = served.url
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    outside, problems = [], []
    page.on("request", lambda r: None if r.url.startswith(origin) or r.url.startswith(("blob:", "data:"))
            else outside.append(r.url))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(origin + "/")
    page.locator("#model").filter(has_text="LLM F32").wait_for()
    page.set_input_files("#file", str(image_path))
    page.locator("#question:enabled").wait_for()
    page.locator("#photo").wait_for(state="visible")
    box = page.locator("#overlay").bounding_box()
    sx, sy = 320 / box["width"], 200 / box["height"]  # image pixels per screen pixel
    at = lambda x, y: (box["x"] + x / sx, box["y"] + y / sy)  # noqa: E731 - image pixels -> screen

    def ask(question: str, n: int) -> tuple[str, dict]:
        page.fill("#question", question)
        page.fill("#max-tokens", "12")
        with page.expect_response(lambda r: r.url.endswith("/ask")) as resp:
            page.click("#ask")
        item = page.locator(f"#history li:nth-child({n})")
        item.and_(page.locator("[data-state=done]")).wait_for(timeout=60_000)
        r = resp.value
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text().count("event: token") > 1  # the answer came in pieces
        return item.locator(".a").text_content(), item

    # click = a point
    page.mouse.click(*at(80, 60))
    kind, coords = _region(page)
    assert kind == "point" and abs(coords[0] - 80) <= 1 and abs(coords[1] - 60) <= 1
    answer, item = ask("What is this?", 1)
    assert answer == _alone(engine, image, "What is this?", {"point": coords}, 12)
    assert "TTFT" in item.locator(".meta").inner_text() and item.get_attribute("data-prefix-reused") == "false"

    # drag = a box
    page.mouse.move(*at(195, 115))
    page.mouse.down()
    page.mouse.move(*at(240, 150), steps=4)
    page.mouse.move(*at(285, 185), steps=4)
    page.mouse.up()
    kind, coords = _region(page)
    assert kind == "box" and all(abs(c - e) <= 1 for c, e in zip(coords, [195, 115, 285, 185])), coords
    answer, item = ask("Describe this region.", 2)
    assert answer == _alone(engine, image, "Describe this region.", {"box": coords}, 12)
    assert item.get_attribute("data-prefix-reused") == "true"  # a follow-up: only the question was prefilled
    assert "image KV reused" in item.locator(".meta").inner_text()
    box_coords = coords

    # shift+clicks = a polygon
    page.keyboard.down("Shift")
    for x, y in [(220, 30), (290, 50), (250, 100)]:
        page.mouse.click(*at(x, y))
    page.keyboard.up("Shift")
    kind, coords = _region(page)
    assert kind == "polygon" and len(coords) == 3
    answer, item = ask("And this?", 3)
    assert answer == _alone(engine, image, "And this?", {"polygon": coords}, 12)
    answers = page.locator("#history .a").all_text_contents()
    assert len(set(answers)) == 3  # three regions, three answers

    # the regions are drawn over the image: the box (turn 2's colour, a blue; hovering its answer highlights
    # it) and the polygon's outline (turn 3's green)
    page.hover("#history li:nth-child(2)")
    shot = tmp_path / "canvas.png"
    page.locator("#canvas-wrap").screenshot(path=str(shot))
    canvas = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    ch, cw = canvas.shape[:2]
    fx, fy = cw / 320, ch / 200
    x1, y1, x2, y2 = box_coords
    edge = canvas[int(y1 * fy) - 3:int(y1 * fy) + 4, int((x1 + 20) * fx):int((x2 - 20) * fx)]  # its top edge
    assert _near(edge, (0x25, 0x63, 0xEB), 90).any(0).mean() > 0.9, "the box is not drawn"
    original = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    green = (0x12, 0xA1, 0x50)
    for (ax, ay), (bx, by) in zip(coords, coords[1:] + coords[:1]):  # the middle of each polygon side
        mx, my = (ax + bx) / 2, (ay + by) / 2
        patch = canvas[int(my * fy) - 3:int(my * fy) + 4, int(mx * fx) - 3:int(mx * fx) + 4]
        under = original[int(my) - 2:int(my) + 3, int(mx) - 2:int(mx) + 3]
        assert _near(patch, green, 60).any() and not _near(under, green, 60).any(), "the polygon is not drawn"

    shot = tmp_path / "serve-page.png"  # the test artifact: three regions and their answers
    page.screenshot(path=str(shot))
    artifacts = os.environ.get("CHATSPOT_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    print(f"screenshot: {shot}")

    # reset: the history goes, questions still work
    page.click("#reset")
    page.locator("#history li").first.wait_for(state="detached")
    answer, _ = ask("And this?", 1)
    assert answer == _alone(engine, image, "And this?", {"polygon": coords}, 12)

    assert outside == [], f"the page fetched from elsewhere: {outside}"
    assert problems == [], problems
    context.close()


def test_page_shows_a_refused_upload(browser, served, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    page = browser.new_page()
    page.goto(served.url + "/")
    page.set_input_files("#file", str(bad))
    err = page.locator("#error")
    err.wait_for(state="visible")
    assert "unreadable or truncated image" in err.inner_text()
    assert page.locator("#question").is_disabled()
    page.close()


def _near(pixels: np.ndarray, rgb, tol: int = 60) -> np.ndarray:
    return (np.abs(pixels - np.array(rgb)).sum(-1) < tol)
