"""The README's picture of the page: regions drawn on a SpotWorld test image and their answers, in Chromium.

    python -m chatspot_edge.benchmarks.serve_screenshot BUNDLE --data SPOTWORLD --record test-000048 \
        --out docs/serve-page.png

starts `chatspot-edge serve BUNDLE`, opens the page in Debian's headless Chromium (Playwright; no browser
download), uploads the record's image, clicks a point on one object, shift+clicks a triangle on another,
drags a box around a third, asks a SpotWorld-style question each time, and saves the page. The PNG is
reduced to 256 colours so it stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]


def main(argv=None) -> int:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from chatspot_edge.benchmarks.serve_load import ServerProcess

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--record", default="test-000048")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--max-tokens", type=int, default=40)
    a = p.parse_args(argv)
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    rec = next(r for r in map(json.loads, (a.data / "test.jsonl").read_text().splitlines()) if r["id"] == a.record)
    objs = sorted(rec["objects"], key=lambda o: -(o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]))
    if len(objs) < 3:
        p.error(f"{a.record} has {len(objs)} objects; pick one with 3 or more")
    W, H = rec["width"], rec["height"]
    (px1, py1, px2, py2), (tx1, ty1, tx2, ty2), box = objs[1]["box"], objs[2]["box"], objs[0]["box"]
    asks = [("point", [(px1 + px2) / 2, (py1 + py2) / 2], "What is the color of this object? Answer in one word."),
            ("polygon", [[tx1 - 4, ty2 + 4], [(tx1 + tx2) / 2, ty1 - 6], [tx2 + 4, ty2 + 4]], "What shape is this?"),
            ("box", [box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4], "Describe this object in detail.")]
    with ServerProcess(a.bundle, ["--threads", "2"]) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 660})
        page.goto(server.url + "/")
        page.set_input_files("#file", str(a.data / rec["image"]))
        page.locator("#question:enabled").wait_for()
        page.locator("#photo").wait_for(state="visible")
        page.wait_for_timeout(300)
        bb = page.locator("#overlay").bounding_box()
        at = lambda x, y: (bb["x"] + x * bb["width"] / W, bb["y"] + y * bb["height"] / H)  # noqa: E731
        for n, (kind, coords, question) in enumerate(asks, 1):
            if kind == "point":
                page.mouse.click(*at(*coords))
            elif kind == "polygon":
                page.keyboard.down("Shift")
                for x, y in coords:
                    page.mouse.click(*at(x, y))
                page.keyboard.up("Shift")
            else:
                x1, y1, x2, y2 = coords
                page.mouse.move(*at(x1, y1))
                page.mouse.down()
                page.mouse.move(*at((x1 + x2) / 2, (y1 + y2) / 2), steps=5)
                page.mouse.move(*at(x2, y2), steps=5)
                page.mouse.up()
            page.fill("#question", question)
            page.fill("#max-tokens", str(a.max_tokens))
            page.click("#ask")
            page.locator(f"#history li:nth-child({n})[data-state=done]").wait_for(timeout=300_000)
        page.mouse.move(2, 2)
        page.wait_for_timeout(200)
        tmp = a.out.with_suffix(".full.png")
        page.screenshot(path=str(tmp))
        print(page.locator("#history").inner_text())
        browser.close()
    Image.open(tmp).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(a.out, optimize=True)
    tmp.unlink()
    print(f"wrote {a.out} ({a.out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
