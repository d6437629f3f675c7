"""Images for GLM-4V: decoding and preprocessing against a straightforward PIL + numpy reference, bad images,
the content hash, and image_url parsing (bare base64, data: URLs, http(s) only when allowed, with limits)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from glm_serve.image import ImageError, decode_image, image_hash, parse_image_url, parse_image_url_async, preprocess


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _reference_pixels(data: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(img).astype(np.float64) / 255.0
    x = (x - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_preprocess_matches_reference(fmt):
    rng = np.random.default_rng()
    data = _encode(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), fmt)
    for size in (56, 112):
        got = preprocess(decode_image(data), size)
        assert got.shape == (3, size, size) and got.dtype == torch.float32
        assert np.abs(got.numpy() - _reference_pixels(data, size)).max() < 1e-5


def test_preprocess_constant_colour_and_other_modes():
    # A flat colour survives any resize exactly: the values are just the CLIP normalisation of it.
    rgb = (200, 30, 90)
    got = preprocess(decode_image(_encode(np.full((20, 31, 3), rgb, dtype=np.uint8), "PNG")), 28)
    want = (torch.tensor(rgb) / 255.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) \
        / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert (got - want[:, None, None]).abs().max() < 1e-5
    grey = decode_image(_encode(np.full((9, 9), 77, dtype=np.uint8), "PNG"))
    rgba = decode_image(_encode(np.full((9, 9, 4), 77, dtype=np.uint8), "PNG"))
    assert grey.mode == rgba.mode == "RGB" and grey.getpixel((4, 4)) == rgba.getpixel((4, 4)) == (77, 77, 77)


def test_decode_rejects_bad_images():
    good = _encode(np.zeros((64, 64, 3), dtype=np.uint8) + 9, "PNG")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    for bad, why in [(b"", "empty"), (b"hello, not an image" * 10, "not a readable"),
                     (good[: len(good) // 2], "truncated"), (gif.getvalue(), "GIF")]:
        with pytest.raises(ImageError, match=why):
            decode_image(bad)
    with pytest.raises(ImageError, match="pixels"):
        decode_image(good, max_pixels=64 * 64 - 1)


def test_image_hash():
    a, b = _encode(np.zeros((8, 8, 3), dtype=np.uint8), "PNG"), _encode(np.ones((8, 8, 3), dtype=np.uint8), "PNG")
    assert image_hash(a) == image_hash(bytes(a)) and image_hash(a) != image_hash(b)
    x = torch.randn(3, 14, 14)
    assert image_hash(x) == image_hash(x.clone()) and image_hash(x) != image_hash(x + 1e-3)
    assert image_hash(x) != image_hash(x.double())
    assert image_hash(torch.tensor(1.5)) != image_hash(torch.tensor(2.5))


# ---------------------------------------------------------------- image_url

PNG = _encode(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "PNG")


def test_parse_inline_forms():
    b64 = base64.b64encode(PNG).decode()
    assert parse_image_url(b64) == PNG
    assert parse_image_url("\n".join(b64[i:i + 60] for i in range(0, len(b64), 60))) == PNG  # wrapped
    assert parse_image_url(f"data:image/png;base64,{b64}") == PNG
    assert parse_image_url(base64.urlsafe_b64encode(PNG).decode().rstrip("=")) == PNG
    for bad, why in [("data:image/png,rawbytes", "base64"), ("data:text/plain;base64,aGk=", "media type"),
                     ("not base64 at all!", "neither"), ("file:///etc/passwd", "scheme"), ("", "non-empty"),
                     ("data:image/png;base64", ","), ("QUJD" * 100, "larger")]:
        with pytest.raises(ImageError, match=why):
            parse_image_url(bad, max_bytes=200)


def test_http_refused_unless_allowed():
    for url in ("http://example.com/cat.png", "HTTPS://example.com/cat.png"):
        with pytest.raises(ImageError, match="allow-image-urls"):
            parse_image_url(url)
        with pytest.raises(ImageError, match="allow-image-urls"):
            asyncio.run(parse_image_url_async(url))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/cat.png":
            body = PNG
        elif self.path == "/big":
            body = b"x" * 5000
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(20):
                    time.sleep(0.05)
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
            except OSError:  # the client gave up, as it should
                pass
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_fetch_with_limits(server):
    assert parse_image_url(f"{server}/cat.png", allow_http=True) == PNG
    assert asyncio.run(parse_image_url_async(f"{server}/cat.png", allow_http=True)) == PNG
    with pytest.raises(ImageError, match="5000 bytes"):
        parse_image_url(f"{server}/big", allow_http=True, max_bytes=1000)
    with pytest.raises(ImageError, match="404"):
        parse_image_url(f"{server}/missing.png", allow_http=True)
    with pytest.raises(ImageError, match="time"):
        parse_image_url(f"{server}/slow", allow_http=True, timeout_s=0.3)


def test_http_streamed_size_limit_without_content_length():
    def handler(request):
        return httpx.Response(200, content=iter([b"y" * 600, b"y" * 600]))  # chunked: no Content-Length

    with pytest.raises(ImageError, match="larger"):
        parse_image_url("https://img.test/a.png", allow_http=True, max_bytes=1000,
                        transport=httpx.MockTransport(handler))


def test_image_hash_of_pixels_tells_shapes_and_dtypes_apart():
    # The same bytes in another shape or dtype are other pixels: their prefix-cache keys must differ.
    assert image_hash(torch.zeros(2, 6)) != image_hash(torch.zeros(6, 2))
    assert image_hash(torch.zeros(4, dtype=torch.float32)) != image_hash(torch.zeros(16, dtype=torch.uint8))
