"""Images for GLM-4V: turning an API `image_url` into bytes, bytes into a checked RGB image, and the image into
the tower's normalised pixels; plus the content hash that keeps prefix-cache keys of different images apart.

    parse_image_url(url) -> bytes      bare base64 (what the vendor SDK sends), data: URL, or http(s) URL
                                       (fetched only when the caller allows it, with size and time limits)
    decode_image(bytes) -> PIL.Image   PNG, JPEG or WebP only; anything else is an ImageError
    resize_rgb(image, S) -> [3, S, S]  uint8: bicubic resize to S x S (aspect not kept, no crop); what the engine
                                       holds and carries (a quarter of the float32 bytes: 3.8 MB at GLM-4V's 1120)
    normalize(pixels) -> float32       [0, 1], then CLIP mean/std: the tower's input (done on the tower's device)
    preprocess(image, S)               normalize(resize_rgb(image, S))
    image_hash(bytes | pixels) -> int

Every failure is an ImageError (a ValueError) whose message can go back to the client as is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import time

import numpy as np
import torch
from PIL import Image

from glm_serve.vision_config import CLIP_MEAN, CLIP_STD

FORMATS = ("PNG", "JPEG", "MPO", "WEBP")  # MPO: the multi-picture JPEG that phone cameras write
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per image, after base64 decoding or download
MAX_PIXELS = 50_000_000  # width * height before resizing; refuses decompression bombs up front
FETCH_TIMEOUT_S = 10.0  # whole http(s) download, connect included
_MAX_REDIRECTS = 3
_B64_CHARS = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")


class ImageError(ValueError):
    """An image that cannot be used: unreadable, too big, wrong kind, or a URL we may not fetch."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes fully (so truncation is caught here) into an RGB image."""
    if not data:
        raise ImageError("image is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(f"image has more than {max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 (PIL raises several types for unknown data)
        raise ImageError("image data is not a readable PNG, JPEG or WebP image") from None
    if img.format not in FORMATS:
        raise ImageError(f"image format {img.format} is not supported (send PNG, JPEG or WebP)")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} pixels, more than the {max_pixels} allowed")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 (truncated or corrupt pixel data)
        raise ImageError(f"image data is corrupt or truncated ({type(e).__name__})") from None
    # Like the vendor's demo: alpha is dropped (not composited), palettes and grey expand to RGB.
    return img.convert("RGB")


def resize_rgb(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB image -> uint8 pixels [3, image_size, image_size], resized; normalize() makes them the tower's input."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    resized = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [..., 3, S, S] -> float32 [..., 3, S, S]: [0, 1], then CLIP mean/std, on pixels' device."""
    shape = (3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=pixels.device).view(shape)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device).view(shape)
    return (pixels.float().div_(255.0) - mean) / std


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB image -> float32 pixels [3, image_size, image_size], the tower's input."""
    return normalize(resize_rgb(image, image_size))


def load_pixels(data: bytes, image_size: int) -> torch.Tensor:
    """decode_image + resize_rgb: image bytes -> uint8 [3, image_size, image_size] (the tower normalizes them)."""
    return resize_rgb(decode_image(data), image_size)


def image_hash(x: bytes | torch.Tensor) -> int:
    """A 64-bit content hash of the image bytes or of the preprocessed pixels, for prefix-cache keys."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").contiguous()
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return int.from_bytes(h.digest(), "little")
    if isinstance(x, (bytes, bytearray, memoryview)):
        return int.from_bytes(hashlib.blake2b(bytes(x), digest_size=8).digest(), "little")
    raise TypeError(f"image_hash takes bytes or a tensor, got {type(x).__name__}")


def parse_image_url(url: str, allow_http: bool = False, max_bytes: int = MAX_IMAGE_BYTES,
                    timeout_s: float = FETCH_TIMEOUT_S, transport=None) -> bytes:
    """An `image_url.url` value -> the image's bytes (not yet decoded). Blocking when it fetches; the API
    should use `parse_image_url_async`. `transport` is an optional httpx transport (tests)."""
    data = _inline_bytes(url, allow_http, max_bytes)
    if data is not None:
        return data
    import httpx  # noqa: PLC0415 (only when a URL is actually fetched)

    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=_MAX_REDIRECTS,
                          transport=transport) as client:
            with client.stream("GET", url) as resp:
                _check_response(url, resp, max_bytes)
                chunks, size = [], 0
                for chunk in resp.iter_bytes():
                    size = _take(url, chunks, chunk, size, max_bytes, deadline)
                return b"".join(chunks)
    except httpx.HTTPError as e:
        raise ImageError(_fetch_error(url, e)) from None


async def parse_image_url_async(url: str, allow_http: bool = False, max_bytes: int = MAX_IMAGE_BYTES,
                                timeout_s: float = FETCH_TIMEOUT_S, transport=None) -> bytes:
    """parse_image_url for the event loop: the download does not block other requests."""
    data = _inline_bytes(url, allow_http, max_bytes)
    if data is not None:
        return data
    import httpx  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True, max_redirects=_MAX_REDIRECTS,
                                     transport=transport) as client:
            async with client.stream("GET", url) as resp:
                _check_response(url, resp, max_bytes)
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size = _take(url, chunks, chunk, size, max_bytes, deadline)
                return b"".join(chunks)
    except httpx.HTTPError as e:
        raise ImageError(_fetch_error(url, e)) from None


def _inline_bytes(url: str, allow_http: bool, max_bytes: int) -> bytes | None:
    """Bytes of a data: URL or bare base64; None for an http(s) URL that may be fetched."""
    if not isinstance(url, str) or not url.strip():
        raise ImageError("image_url.url must be a non-empty string")
    url = url.strip()
    head = url[:16].lower()
    if head.startswith(("http://", "https://")):
        if not allow_http:
            raise ImageError("image URLs over http(s) are not fetched by this server (it was started without "
                             "--allow-image-urls); send the image as base64 or a data: URL")
        return None
    if head.startswith("data:"):
        meta, sep, payload = url[5:].partition(",")
        if not sep:
            raise ImageError("data: URL has no ',' before its payload")
        parts = [p.strip().lower() for p in meta.split(";")]
        if "base64" not in parts[1:]:
            raise ImageError("data: URL must be base64-encoded (data:image/png;base64,...)")
        if parts[0] and not parts[0].startswith("image/"):
            raise ImageError(f"data: URL has media type {parts[0]!r}, expected image/png, image/jpeg or image/webp")
        return _b64(payload, max_bytes)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise ImageError(f"image URL scheme {url.split(':', 1)[0]!r} is not supported (use base64, data: or https)")
    return _b64(url, max_bytes)


def _b64(s: str, max_bytes: int) -> bytes:
    s = "".join(s.split())  # base64 may be wrapped over lines
    if len(s) // 4 * 3 > max_bytes + 3:
        raise ImageError(f"image is larger than {max_bytes} bytes")
    if not _B64_CHARS.fullmatch(s):
        raise ImageError("image is neither base64 data, a data: URL nor an http(s) URL")
    s += "=" * (-len(s) % 4)
    try:
        data = base64.urlsafe_b64decode(s) if ("-" in s or "_" in s) else base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image base64 data is malformed") from None
    if not data:
        raise ImageError("image is empty")
    if len(data) > max_bytes:
        raise ImageError(f"image is larger than {max_bytes} bytes")
    return data


def _check_response(url: str, resp, max_bytes: int) -> None:
    if resp.status_code != 200:
        raise ImageError(f"fetching image {url} failed: HTTP {resp.status_code}")
    length = resp.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ImageError(f"image at {url} is {length} bytes, more than the {max_bytes} allowed")


def _take(url: str, chunks: list, chunk: bytes, size: int, max_bytes: int, deadline: float) -> int:
    size += len(chunk)
    if size > max_bytes:
        raise ImageError(f"image at {url} is larger than the {max_bytes} bytes allowed")
    if time.monotonic() > deadline:
        raise ImageError(f"fetching image {url} took longer than the time limit")
    chunks.append(chunk)
    return size


def _fetch_error(url: str, e: Exception) -> str:
    import httpx  # noqa: PLC0415

    if isinstance(e, httpx.TimeoutException):
        return f"fetching image {url} timed out"
    if isinstance(e, httpx.TooManyRedirects):
        return f"fetching image {url} followed too many redirects"
    return f"fetching image {url} failed ({type(e).__name__})"
