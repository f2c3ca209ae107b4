"""`webbody report DIR`: one self-contained static HTML page about a bundle (and its build when known).

No scripts and no network: charts are inline SVG, thumbnails are base64 JPEG data URIs, and a Content Security
Policy forbids anything else, so the page renders the same from a laptop, a CI artifact or a Prefect link.
Everything comes from stats.json and index.parquet; gallery images are read straight from the shards at the
indexed offsets, through the bundle's output writer (no scan of a shard).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path
from string import Template

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipeline.bundle.layout import listed_tars
from pipeline.bundle.store import Store, as_store
from pipeline.bundle.writers import OutputWriter, writer_of
from pipeline.shards import atomic_write_bytes

KEPT = "#2f6fdf"
PALETTE = ["#e4572e", "#f3a712", "#a8c686", "#669bbc", "#8e6c8a", "#d1495b", "#00798c", "#edae49", "#66a182",
           "#bc4b51", "#5b8e7d", "#8d5a97"]
COCO_NAMES = ["nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow",
              "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle"]
SKELETON = [(5, 7), (7, 9), (6, 8), (8, 10), (5, 6), (5, 11), (6, 12), (11, 12), (11, 13), (13, 15), (12, 14),
            (14, 16), (0, 1), (0, 2), (1, 3), (2, 4)]


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def funnel_rows(bundle: str | Path | Store, build_root: str | Path | Store | None) -> list[dict]:
    """Stages in pipeline order with rows in/out/drops: the build's funnel when given, else the bundle's own."""
    stats = as_store(bundle).read_json("stats.json")
    stages: list[dict] = []
    build = as_store(build_root) if build_root is not None else None
    if build is not None and build.exists("stats.json"):
        stages = [s for s in build.read_json("stats.json").get("stages", []) if s.get("stage") != "bundle"]
    if not stages:
        stages = list(stats.get("funnel", []))
    stages.append({"stage": "bundle", "rows_in": stats.get("rows_in"), "rows_out": stats.get("rows_out"),
                   "drops": stats.get("drops", {})})
    return stages


def funnel_chart(stages: list[dict], width: int = 900) -> tuple[str, str, str]:
    reasons = sorted({r for s in stages for r in (s.get("drops") or {})})
    colour = {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(reasons)}
    top = max([int(s.get("rows_in") or 0) for s in stages] + [1])
    label_w, bar_w, row_h = 90, width - 90 - 150, 30
    parts = [f'<svg id="funnel-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{row_h * len(stages) + 10}" role="img" aria-label="funnel">']
    for i, s in enumerate(stages):
        y = 5 + i * row_h
        x = label_w
        parts.append(f'<text x="0" y="{y + 18}" font-size="13">{_e(s["stage"])}</text>')
        segs = [("kept", int(s.get("rows_out") or 0), KEPT)]
        segs += [(r, int(n), colour[r]) for r, n in sorted((s.get("drops") or {}).items())]
        for name, n, col in segs:
            w = bar_w * n / top
            if w <= 0:
                continue
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 8}" fill="{col}">'
                         f'<title>{_e(s["stage"])}: {_e(name)} {n}</title></rect>')
            x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 18}" font-size="12" fill="#444">{s.get("rows_out")} / '
                     f'{s.get("rows_in")}</text>')
    parts.append("</svg>")
    legend = f'<span><i style="background:{KEPT}"></i>kept</span>' + "".join(
        f'<span><i style="background:{colour[r]}"></i>{_e(r)}</span>' for r in reasons)
    rows = "".join(
        f"<tr><td>{_e(s['stage'])}</td><td>{s.get('rows_in')}</td><td>{s.get('rows_out')}</td><td style='text-align:left'>"
        + _e(", ".join(f"{k}: {v}" for k, v in sorted((s.get("drops") or {}).items())) or "-") + "</td></tr>"
        for s in stages)
    table = f"<table><tr><th>stage</th><th>in</th><th>out</th><th style='text-align:left'>drops</th></tr>{rows}</table>"
    return "".join(parts), legend, table


def bar_chart(chart_id: str, labels: list[str], values: list[float], title: str, width: int = 560,
              height: int = 200, fmt: str = "{:.0f}") -> str:
    top = max(values + [1e-9])
    n = max(len(values), 1)
    plot_h, base = height - 50, height - 30
    bw = (width - 40) / n
    parts = [f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{_e(title)}"><text x="0" y="14" font-size="13">{_e(title)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values)):
        h = plot_h * v / top
        x = 30 + i * bw
        parts.append(f'<rect class="bar" x="{x + 1:.1f}" y="{base - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                     f'fill="{KEPT}"><title>{_e(lab)}: {fmt.format(v)}</title></rect>')
        if n <= 20 or i % max(1, n // 10) == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{base + 14}" font-size="10" text-anchor="middle">{_e(lab)}</text>')
    parts.append(f'<line x1="30" y1="{base}" x2="{width - 10}" y2="{base}" stroke="#999"/>')
    parts.append(f'<text x="0" y="{base - plot_h + 4}" font-size="10">{fmt.format(top)}</text></svg>')
    return "".join(parts)


def images_per_identity(index: list[dict]) -> str:
    counts = Counter(r["identity"] for r in index)
    hist = Counter(counts.values())
    if not hist:
        return "<p>No samples.</p>"
    hi = max(hist)
    if hi <= 30:
        labels = [str(k) for k in range(1, hi + 1)]
        values = [float(hist.get(k, 0)) for k in range(1, hi + 1)]
    else:  # log-spaced bins for large builds
        edges = sorted({int(round(v)) for v in np.geomspace(1, hi + 1, 16)})
        labels, values = [], []
        for lo, up in zip(edges[:-1], edges[1:]):
            labels.append(f"{lo}-{up - 1}" if up - 1 > lo else str(lo))
            values.append(float(sum(n for k, n in hist.items() if lo <= k < up)))
    return bar_chart("ipi-chart", labels, values, "identities by number of images")


def keypoint_charts(index: list[dict]) -> tuple[str, str]:
    masks = [r["kp_visible"] for r in index]
    n = max(len(masks), 1)
    frac = [sum(1 for m in masks if m >> i & 1) / n for i in range(17)]
    per_kp = bar_chart("kp-chart", [c.split("_")[-1][:4] if "_" in c else c[:4] for c in COCO_NAMES], frac,
                       "fraction of samples where each keypoint is visible", fmt="{:.2f}")
    nvis = Counter(bin(m).count("1") for m in masks)
    per_n = bar_chart("kpn-chart", [str(k) for k in range(18)], [float(nvis.get(k, 0)) for k in range(18)],
                      "samples by number of visible keypoints")
    return per_kp, per_n


def draw_thumbnail(jpg: bytes, meta: dict, size: int = 128) -> str:
    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    full = img.shape[0]
    s = size / full
    thumb = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    pts = meta["keypoints"]
    for a, b in SKELETON:
        if pts[a][2] >= 0.5 and pts[b][2] >= 0.5:
            cv2.line(thumb, (int(pts[a][0] * s), int(pts[a][1] * s)), (int(pts[b][0] * s), int(pts[b][1] * s)),
                     (60, 200, 60), 1, cv2.LINE_AA)
    for x, y, v in pts:
        if v >= 0.5:
            cv2.circle(thumb, (int(x * s), int(y * s)), 2, (0, 230, 255), -1, cv2.LINE_AA)
    if meta.get("face_box"):
        x1, y1, x2, y2 = (int(v * s) for v in meta["face_box"])
        cv2.rectangle(thumb, (x1, y1), (x2, y2), (255, 0, 255), 1)
    for x, y in meta.get("face_landmarks") or []:
        cv2.circle(thumb, (int(x * s), int(y * s)), 1, (0, 0, 255), -1)
    ok, buf = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


def galleries(bundle: str | Path | Store, index: list[dict], max_identities: int = 12, per_identity: int = 8,
              writer: OutputWriter | None = None) -> str:
    store = as_store(bundle)
    writer = writer or writer_of(None)
    by_id: dict[str, list[dict]] = {}
    for r in index:
        by_id.setdefault(r["identity"], []).append(r)
    chosen = sorted(by_id, key=lambda i: (-len(by_id[i]), i))[:max_identities]
    out = []
    for ident in chosen:
        rows = sorted(by_id[ident], key=lambda r: r["key"])[:per_identity]
        figs = []
        for r in rows:
            jpg = writer.read_member(store, r, "jpg")  # ranged reads by the index, not whole shards
            meta = json.loads(writer.read_member(store, r, "json"))
            figs.append(f'<figure><img src="{draw_thumbnail(jpg, meta)}" alt="{_e(r["key"])}">'
                        f'<figcaption>{_e(r["role"])}</figcaption></figure>')
        first = rows[0]
        out.append(f'<div class="identity"><h3>{_e(first["name"])} <span class="split">({_e(ident)}, '
                   f'{_e(first["split"])}, {len(by_id[ident])} images)</span></h3>'
                   f'<div class="gallery">{"".join(figs)}</div></div>')
    return "".join(out) or "<p>No samples.</p>"


def split_table(stats: dict) -> str:
    rows = []
    for split, info in (stats.get("splits") or {}).items():
        rows.append(f"<tr><td>{_e(split)}</td><td>{info.get('identities')}</td><td>{info.get('samples')}</td>"
                    f"<td>{info.get('shards')}</td><td>{info.get('queries', '-')}</td><td>{info.get('gallery', '-')}</td></tr>")
    plan = stats.get("split_plan", {})
    subsets = ", ".join(f"{k}: {v} identities" for k, v in (plan.get("subset_identities") or {}).items())
    note = (f"<p class='note'>seed {_e(plan.get('seed'))}; test identities requested "
            f"{_e(plan.get('test_identities_requested'))}, eligible {_e(plan.get('test_identities_eligible'))}; "
            f"train subsets: {_e(subsets or '-')}</p>")
    return ("<table><tr><th>split</th><th>identities</th><th>samples</th><th>shards</th><th>queries</th>"
            f"<th>gallery</th></tr>{''.join(rows)}</table>{note}")


def render_report(bundle: str | Path | Store, build_root: str | Path | Store | None = None) -> str:
    bundle = as_store(bundle)
    stats = bundle.read_json("stats.json")
    index = pq.read_table(io.BytesIO(bundle.read_bytes("index.parquet"))).to_pylist()
    stages = funnel_rows(bundle, build_root)
    chart, legend, table = funnel_chart(stages)
    kp, kpn = keypoint_charts(index)
    cards = "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in [
        ("samples", stats.get("rows_out")), ("identities", stats.get("identities")),
        ("shards", len(listed_tars(stats))), ("MB", round(stats.get("bytes", 0) / 1e6, 1)),
        ("removed (opt-out)", (stats.get("removals") or {}).get("samples", 0))])
    meta = (f"pipeline {_e(stats.get('pipeline_version'))} &middot; config {_e(stats.get('config_hash'))} &middot; "
            f"image {_e(stats.get('image_size'))} px")
    page = Template((Path(__file__).parent / "report.html").read_text()).substitute(
        title=_e(bundle.parent().uri.rstrip("/").rsplit("/", 1)[-1] or bundle.uri), meta=meta, cards=cards, funnel_chart=chart,
        funnel_legend=legend, funnel_table=table, split_table=split_table(stats), ipi_chart=images_per_identity(index),
        kp_chart=kp, kpn_chart=kpn, galleries=galleries(bundle, index, writer=writer_of(stats)))
    return page


def write_report(bundle: str | Path, build_root: str | Path | None = None,
                 output: str | Path | None = None) -> Path | str:
    """Write `<bundle>/report.html` (or `output`), local or on an object store, and return where."""
    store = as_store(bundle)
    if build_root is None and store.parent().exists("stats.json"):
        build_root = store.parent().uri
    page = render_report(store, build_root).encode()
    if output is not None:
        atomic_write_bytes(Path(output), page)
        return Path(output)
    store.write_bytes("report.html", page)
    return Path(store.url("report.html")) if store.local else store.url("report.html")


def report_main(bundle: str | Path, output: str | Path | None = None) -> int:
    store = as_store(str(bundle))
    files = store.listing()
    for need in ("stats.json", "index.parquet"):
        if need not in files:
            print(f"error: {store.url(need)} not found: is {bundle} a bundle directory?")
            return 2
    path = write_report(str(bundle), output=output)
    print(f"report: {path}")
    return 0
