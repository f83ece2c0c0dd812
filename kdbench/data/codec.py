"""Image payloads of data shards -> ``uint8 [C, H, W]`` arrays: the one decoder every reader uses.

A shard sample holds its image under an extension that names the encoding: ``pgm`` / ``ppm`` (binary
PNM, written by kdbench for sources held as arrays, decoded without a codec) or the original encoded
bytes of an image file (``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``, …, decoded with Pillow). Decoding
converts to the dataset's channel count (1: grey, 3: RGB), so a folder that mixes grey and RGB JPEGs
gives one tensor layout.
"""

from __future__ import annotations

import io

import numpy as np

PNM_EXTS = ("pgm", "ppm")
ENCODED_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
IMAGE_EXTS = PNM_EXTS + ENCODED_EXTS
"""Every sample member extension that holds an image."""


class ImageDecodeError(ValueError):
    """A payload is not a decodable image; the caller names the file and the sample key."""


def encode_pnm(img: np.ndarray) -> tuple[str, bytes]:
    """Encodes ``uint8 [H, W, C]`` as binary PGM (C = 1) or PPM (C = 3): standard, lossless, and decoded with
    no codec (webdataset's image decoder and PIL read both)."""
    h, w, c = img.shape
    ext, magic = ("pgm", b"P5") if c == 1 else ("ppm", b"P6")
    return ext, magic + f"\n{w} {h}\n255\n".encode() + np.ascontiguousarray(img).tobytes()


def decode_pnm(payload: bytes) -> np.ndarray:
    """Decodes what :func:`encode_pnm` wrote into ``uint8 [C, H, W]``."""
    magic, size, maxval, data = payload.split(b"\n", 3)
    if magic not in (b"P5", b"P6") or maxval != b"255":
        raise ImageDecodeError(f"not a binary 8-bit PGM/PPM image (header {payload[:16]!r})")
    w, h = (int(v) for v in size.split())
    c = 1 if magic == b"P5" else 3
    return np.frombuffer(data, dtype=np.uint8, count=h * w * c).reshape(h, w, c).transpose(2, 0, 1)


def decode_image(payload: bytes, ext: str, channels: int | None = None) -> np.ndarray:
    """Decodes one image payload into ``uint8 [C, H, W]``.

    Args:
        payload: The encoded bytes.
        ext: The sample member's extension (see :data:`IMAGE_EXTS`).
        channels: Convert to 1 (grey) or 3 (RGB) channels; ``None`` keeps a PNM's own and makes an encoded
            image grey if it is grey and RGB otherwise.

    Raises:
        ImageDecodeError: the payload is truncated, corrupt or not an image.
    """
    ext = ext.lower()
    if ext in PNM_EXTS:
        try:
            img = decode_pnm(payload)
        except (ValueError, IndexError) as e:
            raise ImageDecodeError(f"corrupt {ext.upper()} payload ({e})") from e
        if channels is None or img.shape[0] == channels:
            return img
        return img.repeat(3, axis=0) if channels == 3 else _grey(img)
    if ext not in ENCODED_EXTS:
        raise ImageDecodeError(f"unknown image extension {ext!r}; known: {', '.join(IMAGE_EXTS)}")
    from PIL import (  # torchvision's dependency; imported only for encoded images
        Image,
        UnidentifiedImageError,
    )

    try:
        with Image.open(io.BytesIO(payload)) as im:
            im.load()  # decodes now: a truncated file raises here, not later
            mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            arr = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or unreadable {ext.upper()} image ({e})") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def _grey(img: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of ``uint8 [3, H, W]`` (Pillow's ``convert('L')`` rule)."""
    r, g, b = img.astype(np.int32)
    y = (r * 299 + g * 587 + b * 114 + 500) // 1000
    return y.astype(np.uint8)[None]
