"""Images named in requests: a path under a configured image root, or inline as a base64 data URI.

A server never opens a path outside its roots (403), whatever ``..`` or symlinks it contains.
Decoded images are kept in a small LRU cache (bounded in count and bytes), since training asks
about the same candidates again and again.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from core.rewards.cache import LRUCache
from core.serving.paths import is_file, real_roots, resolve_under

DATA_URI_PREFIX = "data:image/"


def to_data_uri(path: str | Path) -> str:
    """An image file as a ``data:image/<type>;base64,...`` URI (to send images, not paths)."""
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    return f"data:image/{suffix};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def open_image(data: bytes, name: str) -> Image.Image:
    """Decoded RGB image from file bytes; 400 naming ``name`` if they are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{name} is not a readable image") from None


def read_image(path: str | Path) -> Image.Image:
    """The RGB image in a local file (a trusted path: dataset files, not request fields)."""
    return open_image(Path(path).read_bytes(), str(path))


class DecodedImages(dict):
    """Local images by path, each decoded on first use and kept: a warm-up's collator shows the
    same images every epoch, and decoding them again would cost more than the step's batching."""

    def __missing__(self, path: str) -> Image.Image:
        image = self[path] = read_image(path)
        return image


class ImageStore:
    """Opens images by path (only under ``roots``) or from data URIs, as RGB ``PIL`` images.

    Images are cached by the reference as sent (path or URI), up to ``cache_size`` images and
    ``cache_bytes`` of pixels: a game names its candidates again and again, and resolving a path
    under the roots costs more than the lookup. Only loads that passed the checks are cached.
    """

    def __init__(self, roots: Sequence[str | Path] = (), cache_size: int = 1024, cache_bytes: int = 512 << 20):
        self.roots = real_roots(roots)  # once: every image load checks against them
        # An entry weighs its pixels and its key (a data URI is as long as the file).
        self.cache = LRUCache(cache_size, cache_bytes, lambda entry: entry[1])

    def load(self, ref: str) -> Image.Image:
        """The image ``ref`` names; 403 outside the roots, 400 if it is not a readable image."""
        if not isinstance(ref, str) or not ref:
            raise ValueError("an image must be a path or a data:image/...;base64 URI")
        is_uri = ref.startswith(DATA_URI_PREFIX)
        if not is_uri and not self.roots:
            raise PermissionError("image paths are disabled on this server (no image roots); send a data URI")
        entry = self.cache.get(ref)
        if entry is None:
            image = self._decode(ref) if is_uri else self._read(ref)
            entry = (image, image.width * image.height * 3 + len(ref))
            self.cache.put(ref, entry)
        return entry[0]

    def _read(self, ref: str) -> Image.Image:
        path = resolve_under(ref, self.roots, "image path", "image", "; send it as a data URI instead")
        if not is_file(path, "image path"):
            raise ValueError(f"image {ref!r} not found")
        return open_image(path.read_bytes(), ref)

    def _decode(self, uri: str) -> Image.Image:
        try:
            data = base64.b64decode(uri.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error):
            raise ValueError("invalid base64 image data URI") from None
        return open_image(data, "inline image")
