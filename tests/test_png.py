"""Shard PNGs: any PNG reader gets the exact pixels back; every row carries the Up filter."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cmunet.data.png import decode_png, encode_png


def _rows(data: bytes) -> tuple[dict, np.ndarray]:
    """The IHDR fields and the filtered rows (filter byte first) of a PNG written in one IDAT."""
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == \
            zlib.crc32(kind + payload)
        chunks[kind] = payload
        pos += 12 + length
    width, height, depth = struct.unpack(">IIB", chunks[b"IHDR"][:9])
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    return {"width": width, "height": height, "depth": depth}, rows


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 517), (64, 48)])
def test_round_trip_is_exact_through_pillow(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    data = encode_png(pixels)
    with Image.open(io.BytesIO(data)) as img:  # an independent reader
        img.load()
        assert img.size == (shape[1], shape[0])
        assert img.mode == ("L" if dtype == np.uint8 else "I;16")
    back = decode_png(data)
    assert back.dtype == dtype and np.array_equal(back, pixels)


def test_every_row_is_up_filtered():
    pixels = np.add.outer(np.arange(40), np.arange(30)).astype(np.uint16) * 1000
    header, rows = _rows(encode_png(pixels))
    assert header == {"width": 30, "height": 40, "depth": 16}
    assert (rows[:, 0] == 2).all()
    # Up: each byte minus the byte above, modulo 256 (big-endian 16-bit samples)
    raw = pixels.astype(">u2").view(np.uint8).reshape(40, -1)
    assert np.array_equal(rows[1:, 1:], (raw[1:].astype(int) - raw[:-1]) % 256)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 3), np.uint8),
                                 np.zeros((0, 4), np.uint8), np.zeros((4, 4), np.int16)])
def test_other_arrays_are_refused(bad):
    with pytest.raises(ValueError, match="2-D uint8 or uint16"):
        encode_png(bad)
