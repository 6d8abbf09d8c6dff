#!/usr/bin/env python3
"""Open a qpipe report.html in headless chromium, screenshot it, and check what came out.

    tools/check_report_html.py OUT/report.html [--screenshot shot.png] [--window-size 1400,3000]

Checks (exit 1 with a line saying which failed): the page is self-contained
(no http(s) src/href, every <img> a data: PNG that decodes), chromium ran and
wrote a screenshot of the asked size, and the screenshot is not blank (has
enough distinct colors: plots, graph boxes and text, not an error page).
Exit 2 when chromium is not installed (Debian: apt-get install chromium).
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def check_html(text: str) -> list[str]:
    """Problems with the page itself: external references, images that are not decodable data: PNGs."""
    problems = []
    for m in re.finditer(r"""(?:src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I):
        problems.append(f"external reference at offset {m.start()}: {text[m.start():m.start() + 60]!r}")
    if re.search(r"<link\b|<script\b[^>]*\bsrc=", text, re.I):
        problems.append("a <link> or external <script>")
    imgs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)
    for i, src in enumerate(imgs):
        if not src.startswith("data:image/png;base64,"):
            problems.append(f"image {i} is not an inline PNG: {src[:40]!r}")
            continue
        try:
            png_size(base64.b64decode(src.split(",", 1)[1], validate=True))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"image {i} does not decode: {exc}")
    return problems


def screenshot(html_path: str, png_path: str, size: str, chromium: str, timeout: float = 90.0) -> None:
    w, h = size.split(",")
    with tempfile.TemporaryDirectory(prefix="qpipe-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={os.path.abspath(png_path)}", f"--window-size={w},{h}",
               "file://" + os.path.abspath(html_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.isfile(png_path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"chromium exited {proc.returncode}: {' | '.join(tail)}")


def check_screenshot(png_path: str, size: str) -> list[str]:
    from PIL import Image  # pillow comes with matplotlib

    with Image.open(png_path) as img:
        w, h = img.size
        colors = img.convert("RGB").resize((w // 4, h // 4)).getcolors(maxcolors=1 << 20) or []
    want = tuple(int(v) for v in size.split(","))
    problems = []
    if (w, h) != want:
        problems.append(f"screenshot is {w}x{h}, asked for {want[0]}x{want[1]}")
    if len(colors) < 50:
        problems.append(f"screenshot looks blank: {len(colors)} distinct colors")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", help="a report.html")
    p.add_argument("--screenshot", default="report-shot.png", help="where to write the screenshot (default report-shot.png)")
    p.add_argument("--window-size", default="1400,3000", help="W,H in pixels (default 1400,3000)")
    args = p.parse_args(argv)
    text = open(args.html, encoding="utf-8").read()
    problems = check_html(text)
    chromium = find_chromium()
    if chromium is None:
        print("check_report_html: chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    screenshot(args.html, args.screenshot, args.window_size, chromium)
    problems += check_screenshot(args.screenshot, args.window_size)
    for line in problems:
        print(f"check_report_html: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {args.html} is self-contained ({len(re.findall(r'<img ', text))} inline PNGs, "
          f"{text.count('<svg')} SVGs); screenshot {args.screenshot} ({args.window_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
