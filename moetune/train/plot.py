"""Loss curves as a PNG with no plotting dependency.

matplotlib is used when installed (nicer axes); otherwise a small built-in rasteriser draws the
train and eval curves on a grid and writes the PNG with zlib, so every run gets its plot.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

W, H, PAD = 640, 400, 40
COLORS = {"train": (31, 119, 180), "eval": (255, 127, 14)}


def _png(pixels: list[bytearray]) -> bytes:
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _put(px: list[bytearray], x: int, y: int, color: tuple[int, int, int], size: int = 1) -> None:
    for dx in range(-size + 1, size):
        for dy in range(-size + 1, size):
            if 0 <= x + dx < W and 0 <= y + dy < H:
                px[y + dy][3 * (x + dx) : 3 * (x + dx) + 3] = bytes(color)


def _line(px, a, b, color) -> None:
    (x0, y0), (x1, y1) = a, b
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(n + 1):
        _put(px, round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), color, 2)


def _builtin(series: dict[str, list[tuple[int, float]]], out: Path) -> None:
    px = [bytearray([255] * 3 * W) for _ in range(H)]
    points = [p for s in series.values() for p in s]
    xmax = max(x for x, _ in points) or 1
    ymin, ymax = min(y for _, y in points), max(y for _, y in points)
    span = (ymax - ymin) or 1.0

    def at(x: float, y: float) -> tuple[int, int]:
        return PAD + round((W - 2 * PAD) * x / xmax), H - PAD - round((H - 2 * PAD) * (y - ymin) / span)

    for i in range(5):  # light grid, then axes
        gy = PAD + i * (H - 2 * PAD) // 4
        _line(px, (PAD, gy), (W - PAD, gy), (230, 230, 230))
    _line(px, (PAD, H - PAD), (W - PAD, H - PAD), (0, 0, 0))
    _line(px, (PAD, PAD), (PAD, H - PAD), (0, 0, 0))
    for name, pts in series.items():
        for a, b in zip(pts, pts[1:]):
            _line(px, at(*a), at(*b), COLORS.get(name, (0, 0, 0)))
        for p in pts if len(pts) == 1 or name == "eval" else []:
            _put(px, *at(*p), COLORS.get(name, (0, 0, 0)), 4)
    out.write_bytes(_png(px))


def plot_losses(series: dict[str, list[tuple[int, float]]], out: str | Path) -> Path:
    """Write a PNG of loss vs step for each named series (e.g. train, eval)."""
    out = Path(out)
    series = {k: v for k, v in series.items() if v}
    if not series:
        return out
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _builtin(series, out)
        return out
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, pts in series.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, marker="o" if name == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
