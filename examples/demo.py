"""Serve the scikit-learn example, call it once, and keep serving until Ctrl-C."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flotilla
from flotilla import serve

SAMPLE = [17.99, 10.38, 122.8, 1001, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193, 25.38, 17.33, 184.6, 2019, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189]


def main() -> None:
    from examples.sklearn_app import app

    port = int(os.environ.get("FLOTILLA_PORT", "8000"))
    t0 = time.perf_counter()
    serve.start(http_options={"port": port})
    handle = serve.run(app, name="cancer", route_prefix="/")
    print(f"serve.run took {time.perf_counter() - t0:.2f}s (2 replicas, model trained at start-up)")
    url = f"http://127.0.0.1:{port}/"
    req = urllib.request.Request(url, data=json.dumps({"features": SAMPLE}).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        print("HTTP  POST", url, "->", resp.read().decode())
    print("handle .predict.remote(...) ->", handle.predict.remote(SAMPLE).result())
    print(f"\nServing at {url}  (Ctrl-C to stop). Try:\n  curl -X POST {url} -H 'content-type: application/json' "
          f"-d '{json.dumps({'features': SAMPLE})}'")
    if os.environ.get("FLOTILLA_DEMO_ONESHOT"):
        flotilla.shutdown()
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down")
    finally:
        flotilla.shutdown()


if __name__ == "__main__":
    main()
