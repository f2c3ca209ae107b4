"""`webbody report`: a self-contained HTML page, checked in headless Chromium (Debian's `chromium` package:
`apt-get install -y chromium`) through the DevTools protocol on loopback: the page loads with no console
errors, exceptions or CSP violations, and a screenshot shows the funnel chart and the galleries."""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.bundle import run
from pipeline.bundle.report import write_report
from tests.bundle_support import make_build, small_config
from tests.servers import stop_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = make_build(root, n_ids=6, per_id=5)
    # an upstream funnel as the build writes it, so the chart has drop reasons
    (root / "stats.json").write_text(json.dumps({"stages": [
        {"stage": "download", "rows_in": 80, "rows_out": 70, "drops": {"timeout": 6, "http_404": 4}},
        {"stage": "persons", "rows_in": 70, "rows_out": 66, "drops": {"no_person": 4}},
        {"stage": "faces", "rows_in": 66, "rows_out": 33, "drops": {"no_face": 33}},
        {"stage": "clean", "rows_in": 33, "rows_out": 30, "drops": {"near_duplicate": 3}}]}))
    run(small_config(), inputs, root / "bundle")
    return write_report(root / "bundle", build_root=root)


def test_report_is_self_contained(report):
    page = report.read_text()
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "every resource must be inline"
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "").split("<main>")[0]
    for section in ("funnel-chart", "ipi-chart", "kp-chart", "kpn-chart", 'class="gallery"'):
        assert section in page
    # every stage and every drop reason is on the chart
    for word in ("download", "persons", "faces", "clean", "bundle", "timeout", "no_face", "near_duplicate"):
        assert word in page
    assert page.count("data:image/jpeg;base64,") == 6 * 5  # 6 identities x 5 images, all drawn


class DevTools:
    """The few DevTools-protocol calls the test needs, over a loopback websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 1024 * 1024)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        end = time.time() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while time.time() < end:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.time())))
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_in_headless_chromium(report, tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run", "--disable-extensions",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-domain-reliability", "--metrics-recording-only",
         # any request that slipped through would go to a dead loopback proxy, never outside
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and len(port_file.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/json/list")
        page = next(t for t in json.loads(conn.getresponse().read()) if t["type"] == "page")
        dt = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "DOM"):
            dt.call(f"{domain}.enable")
        dt.call("Emulation.setDeviceMetricsOverride", width=1280, height=2400, deviceScaleFactor=1, mobile=False)
        dt.call("Page.navigate", url=Path(report).resolve().as_uri())
        dt.wait_event("Page.loadEventFired")
        time.sleep(0.5)  # late console messages
        shot = base64.b64decode(dt.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
        doc = dt.call("DOM.getDocument", depth=-1)["root"]["nodeId"]
        boxes = {}
        for sel in ("#funnel-chart", ".gallery img"):
            node = dt.call("DOM.querySelector", nodeId=doc, selector=sel)["nodeId"]
            assert node, f"{sel} not in the rendered page"
            quad = dt.call("DOM.getBoxModel", nodeId=node)["model"]["border"]
            boxes[sel] = (int(quad[0]), int(quad[1]), int(quad[4]), int(quad[5]))
        n_imgs = len(dt.call("DOM.querySelectorAll", nodeId=doc, selector=".gallery img")["nodeIds"])
        errors = [e for e in dt.events if e.get("method") in ("Runtime.exceptionThrown",)
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "warning"))
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning"))]
        assert errors == [], errors
        assert n_imgs == 30
        (tmp_path / "report.png").write_bytes(shot)
        img = cv2.imdecode(np.frombuffer(shot, np.uint8), cv2.IMREAD_COLOR)
        x1, y1, x2, y2 = boxes["#funnel-chart"]
        chart = img[y1:y2, x1:x2].reshape(-1, 3).astype(int)
        kept_bgr = np.array([0xDF, 0x6F, 0x2F])  # KEPT colour #2f6fdf in BGR
        assert (np.abs(chart - kept_bgr).sum(axis=1) < 30).sum() > 500, "funnel bars not visible in the screenshot"
        gx1, gy1, gx2, gy2 = boxes[".gallery img"]
        thumb = img[gy1:gy2, gx1:gx2]
        assert gx2 - gx1 >= 120 and thumb.std() > 20, "gallery thumbnail not rendered"
        # keypoint dots (yellow, BGR 0,230,255) are drawn on the thumbnail
        assert (np.abs(thumb.reshape(-1, 3).astype(int) - [0, 230, 255]).sum(axis=1) < 90).sum() > 3
    finally:
        stop_process(proc)
