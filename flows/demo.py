"""`webbody demo`: the whole build on a small corpus of real photos, served from 127.0.0.1.

The photos are public-domain pictures of real people that ship inside registry packages
(docs/offline-models.md); nothing is downloaded from the internet and nothing is committed. Only Obama has
several independent photos, so the other names get a few re-framed variants (mirrored, cropped, rescaled,
recoloured) of their photo, standing in for several photos of one person. Each name also gets photos that
must be cleaned away (another person, a group photo) and broken URLs, so the funnel shows real drops.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import yaml
from PIL import Image, ImageEnhance, ImageOps

from pipeline.assets import asset_path

DEFAULT_PORT = 18765
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

# name -> list of (asset, variant) ; variant 0 is the original photo
CORPUS: dict[str, list[tuple[str, int]]] = {
    "Barack Obama": [("obama.jpg", 0), ("obama2.jpg", 0), ("obama3.jpg", 0), ("biden.jpg", 0), ("t1.jpg", 0)],
    "Joe Biden": [("biden.jpg", 0), ("biden.jpg", 1), ("biden.jpg", 2), ("grace_hopper.jpg", 0)],
    "Grace Hopper": [("grace_hopper.jpg", 0), ("grace_hopper.jpg", 1), ("grace_hopper.jpg", 2)],
    "Eileen Collins": [("astronaut.png", 0), ("astronaut.png", 1), ("astronaut.png", 2), ("bus.jpg", 0)],
    "Zinedine Zidane": [("zidane.jpg", 0), ("zidane.jpg", 1)],
}
# URLs that must fail and be counted: a missing file and a file that is not an image.
BROKEN = {"Barack Obama": ["missing/obama4.jpg"], "Joe Biden": ["broken/not-an-image.jpg"]}


def make_variant(img: Image.Image, variant: int) -> Image.Image:
    """A deterministic re-framing of a photo: mirror + crop + rescale + colour, different per variant."""
    if variant == 0:
        return img
    img = img.convert("RGB")
    w, h = img.size
    if variant % 2 == 1:
        img = ImageOps.mirror(img)
    # crop a window holding ~80% of the photo, shifted differently per variant
    frac = 0.82 if variant == 1 else 0.9
    cw, ch = int(w * frac), int(h * frac)
    ox = (w - cw) * (variant % 3) // 2
    oy = (h - ch) * ((variant + 1) % 3) // 2
    img = img.crop((ox, oy, ox + cw, oy + ch))
    scale = 0.75 if variant == 1 else 1.2
    img = img.resize((max(32, int(cw * scale)), max(32, int(ch * scale))), Image.BICUBIC)
    img = ImageEnhance.Color(img).enhance(0.7 if variant == 1 else 1.25)
    img = ImageEnhance.Brightness(img).enhance(1.1 if variant == 1 else 0.92)
    return img.rotate(4 if variant == 1 else -5, resample=Image.BICUBIC, expand=False, fillcolor=(255, 255, 255))


def build_corpus(root: Path) -> list[tuple[str, str]]:
    """Write the corpus files under `root` and return (name, relative path) pairs in url.lst order."""
    entries: list[tuple[str, str]] = []
    for name, photos in CORPUS.items():
        slug = name.lower().replace(" ", "_")
        for asset, variant in photos:
            rel = f"{slug}/{Path(asset).stem}_v{variant}.jpg"
            target = root / rel
            if not target.exists():
                img = make_variant(Image.open(asset_path(asset)).convert("RGB"), variant)
                target.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=92)
                target.write_bytes(buf.getvalue())
            entries.append((name, rel))
        entries.extend((name, rel) for rel in BROKEN.get(name, []))
    broken = root / "broken" / "not-an-image.jpg"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("<html><body>this is not an image</body></html>")
    return entries


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def serve_directory(root: Path, port: int = 0) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1 (`port`, or a free one) for the duration of the block."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_url_list(entries: list[tuple[str, str]], base_url: str, path: Path) -> Path:
    """WebFace260M/WebBody `url.lst` format: `idx label URL` per line (label = the name, spaces as _)."""
    lines = [f"{i} {name.replace(' ', '_')} {base_url}/{rel}" for i, (name, rel) in enumerate(entries)]
    return _write_if_changed(path, "\n".join(lines) + "\n")


def _write_if_changed(path: Path, text: str) -> Path:
    """Write `text` unless the file already holds it: the query stage's config hash includes its input
    files' modification times, so rewriting an unchanged url.lst would make a resumed demo refuse its own
    finished query output."""
    if not (path.exists() and path.read_text() == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def resolve_asset_refs(node):
    """Replace `asset:NAME` strings in a config tree by the local path of that registry-shipped file."""
    if isinstance(node, dict):
        return {k: resolve_asset_refs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_asset_refs(v) for v in node]
    if isinstance(node, str) and node.startswith("asset:"):
        return str(asset_path(node[len("asset:"):]))
    return node


def prepare_demo_config(output: Path, base_url: str, executor: str = "ray",
                        template: Path = DEMO_CONFIG) -> Path:
    corpus = output / "demo_corpus"
    entries = build_corpus(corpus / "files")
    url_list = write_url_list(entries, base_url, corpus / "url.lst")
    cfg = resolve_asset_refs(yaml.safe_load(template.read_text()))
    cfg.setdefault("query", {})["inputs"] = [{"path": str(url_list), "format": "url_lst"}]
    cfg.setdefault("run", {})["executor"] = executor
    return _write_if_changed(output / "demo_config.yaml", yaml.safe_dump(cfg, sort_keys=False))


def default_work_dir(output: str) -> Path:
    """Where the corpus and config of a demo whose output is an object-store URI live on this machine.

    A fixed place per output URI (not a temporary folder): the config, including the url.lst path, is part
    of every stage's config hash, so a resumed demo must find the same files at the same path.
    """
    import hashlib
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "webbody" / "demo" / hashlib.sha256(output.encode()).hexdigest()[:16]


def run_demo(output: str = "output/demo", use_prefect: bool = True, executor: str = "ray",
             work: str | Path | None = None, port: int | None = None) -> dict:
    """Build the demo corpus into `<output>/build`; `output` is a local folder or a URI (`s3://bucket/demo`).

    The photos are served from a local folder, `work` (default: `output` itself when local, else
    `default_work_dir(output)`), which also holds the generated config. The port is kept beside the build
    (`<output>/demo_corpus/port`): URLs, hence sample ids, contain it, so a resumed demo serves on it again.
    """
    from flows.build import build_flow, build_plain, build_root
    from pipeline import storage

    root = build_root(output)
    local = storage.is_local(root)
    out = Path(work).resolve() if work is not None else (Path(root) if local else default_work_dir(root))
    files = out / "demo_corpus" / "files"
    files.mkdir(parents=True, exist_ok=True)
    port_uri = storage.join(root, "demo_corpus", "port")
    if port is None:
        port = int(storage.get_bytes(port_uri).decode()) if storage.exists(port_uri) else DEFAULT_PORT
    with serve_directory(files, port) as base_url:
        storage.put_bytes(port_uri, base_url.rsplit(":", 1)[1].encode())
        config = prepare_demo_config(out, base_url, executor)
        fn = build_flow if use_prefect else build_plain
        return fn(config_path=str(config), output=storage.join(root, "build"))
