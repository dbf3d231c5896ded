"""Regenerate docs/dashboard.png, the README's picture of the dashboard, with the browser the
tests use: serve examples/composition.py (its tokenizer autoscaled), send a rising then falling
load for about a minute, kill one replica, and screenshot the page.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--seconds 60]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flotilla
from examples.composition import Sentiment, Tokenizer
from flotilla import serve
from tests import browser


def load(url: str, stop: threading.Event, paused: threading.Event) -> None:
    body = json.dumps({"text": "Flotilla serves models fast"}).encode()
    while not stop.is_set():
        if paused.is_set():
            time.sleep(0.05)
            continue
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10).read()
        except OSError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("docs", "dashboard.png"))
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    if browser.missing():
        sys.exit(f"cannot take the screenshot: {browser.missing()}")
    flotilla.init(num_cpus=4)
    try:
        tokenizer = Tokenizer.options(autoscaling_config={
            "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 0.5,
            "upscale_delay_s": 3, "downscale_delay_s": 10})
        serve.run(Sentiment.options(num_replicas=2).bind(tokenizer.bind()), name="sentiment", route_prefix="/")
        url = "http://127.0.0.1:8000/"
        stop = threading.Event()
        workers: list[tuple[threading.Thread, threading.Event]] = []
        start = time.monotonic()
        while (t := time.monotonic() - start) < args.seconds:
            want = int(8 * min(t, args.seconds - t) / (args.seconds / 2)) + 1  # up, then down
            while len(workers) < 8:
                paused = threading.Event()
                paused.set()
                th = threading.Thread(target=load, args=(url, stop, paused), daemon=True)
                th.start()
                workers.append((th, paused))
            for i, (_, paused) in enumerate(workers):
                if i < want:
                    paused.clear()
                else:
                    paused.set()
            if args.seconds * 0.6 <= t < args.seconds * 0.6 + 0.5:
                snap = json.load(urllib.request.urlopen(f"{flotilla.dashboard_url()}/api/flotilla/dashboard/"))
                victim = snap["applications"]["sentiment"]["deployments"]["Sentiment"]["replicas"][0]
                os.kill(victim["pid"], signal.SIGKILL)
                time.sleep(0.5)
            time.sleep(0.25)
        with browser.chrome(1400, 1000) as page:
            page.get(f"{flotilla.dashboard_url()}/")
            deadline = time.monotonic() + 20
            while not page.execute_script("return document.querySelector('svg.chart[data-max]:not([data-max=\"\"])')"):
                if time.monotonic() > deadline:
                    sys.exit("the page showed no chart within 20 s")
                time.sleep(0.2)
            time.sleep(2.5)  # a couple of polls: every figure filled in
            height = min(int(page.execute_script("return document.documentElement.scrollHeight")), 4000)
            shot = page.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1400, "height": height, "scale": 1}})
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        stop.set()
        print(f"wrote {args.out}")
    finally:
        flotilla.shutdown()


if __name__ == "__main__":
    main()
