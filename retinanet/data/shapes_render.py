"""Drawing one image of the synthetic "shapes" dataset (`shapes.py` writes the dataset).

Each image shows 0..``max_objects`` non-overlapping filled shapes (by default circle, square,
triangle, star, cross; diamond, hexagon and ell on request) on a varied background (solid colour,
linear gradient, smooth noise, or thin-line clutter). Pixel ``(row i, col j)`` covers ``[j, j + 1) x [i, i + 1)``; the image spans
``[0, W] x [0, H]``. Boxes are ``(x0, y0, x1, y1)`` floats there (xyxy, no "+1"), computed from
the exact shape geometry, so they are tight: every pixel touched by a shape intersects its box,
and the shape reaches every side of the box. ``image_size`` is an int (square) or ``(h, w)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")  # the default classes
# Every drawable shape. The extra ones are opt-in (``classes``) so the default dataset keeps its bytes.
SHAPE_NAMES: tuple[str, ...] = CLASS_NAMES + ("diamond", "hexagon", "ell")
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise", "lines")

SUPERSAMPLE = 4  # anti-aliasing: coverage is estimated from SUPERSAMPLE**2 samples per pixel
EMPTY_IMAGE_PROB = 0.03  # some images without objects, to exercise pure negatives
PLACEMENT_TRIES = 50
MIN_GAP = 2.0  # px between boxes of different objects
MIN_CONTRAST = 60.0  # mean |RGB difference| between a shape and its background
COLOUR_TRIES = 100

ImageSize = Union[int, Sequence[int]]
Box = tuple[float, float, float, float]


# Shape geometry (centred on the origin; extents give the tight box)
def _regular_star(size: float, angle: float, inner_ratio: float = 0.45) -> np.ndarray:
    """5-point star whose bounding box has max side `size`.

    The inner ratio is fatter than a geometric pentagram (0.38) so that small stars
    keep visible arms instead of collapsing into a pentagon-like blob.
    """
    k = np.arange(10)
    radius = np.where(k % 2 == 0, 1.0, inner_ratio)
    theta = angle + k * math.pi / 5
    pts = np.stack([radius * np.sin(theta), -radius * np.cos(theta)], axis=1)
    return _scale_to_size(pts, size)


def _triangle(size: float, direction: int) -> np.ndarray:
    """Equilateral triangle pointing up/right/down/left (direction 0..3), max side `size`."""
    half, h = size / 2, size * math.sqrt(3) / 2
    pts = np.array([[-half, h / 2], [half, h / 2], [0.0, -h / 2]])  # apex up (y grows down)
    return _quarter_turns(pts, direction)


def _square(size: float) -> np.ndarray:
    half = size / 2
    return np.array([[-half, -half], [half, -half], [half, half], [-half, half]])


def _cross(size: float) -> np.ndarray:
    """Plus sign with arm thickness size / 3 (12-vertex polygon)."""
    a, t = size / 2, size / 6
    return np.array(
        [[-t, -a], [t, -a], [t, -t], [a, -t], [a, t], [t, t],
         [t, a], [-t, a], [-t, t], [-a, t], [-a, -t], [-t, -t]]
    )


def _diamond(size: float) -> np.ndarray:
    """Square turned 45 degrees: vertices on the midpoints of its `size` x `size` box's sides."""
    a = size / 2
    return np.array([[0.0, -a], [a, 0.0], [0.0, a], [-a, 0.0]])


def _hexagon(size: float, angle: float) -> np.ndarray:
    """Regular hexagon turned by `angle` (0: a vertex on top), box's larger side `size`."""
    theta = angle + np.arange(6) * math.pi / 3
    return _scale_to_size(np.stack([np.sin(theta), -np.cos(theta)], axis=1), size)


def _ell(size: float, direction: int) -> np.ndarray:
    """L shape (6-vertex polygon) in a `size` box, arm thickness size / 3, turned direction 0..3 quarters."""
    a, t = size / 2, size / 3
    pts = np.array([[-a, -a], [-a + t, -a], [-a + t, a - t], [a, a - t], [a, a], [-a, a]])  # "L" upright
    return _quarter_turns(pts, direction)


def _quarter_turns(pts: np.ndarray, turns: int) -> np.ndarray:
    """(N, 2) origin-centred points turned by `turns` quarter turns: the box stays axis-aligned and tight."""
    for _ in range(turns):
        pts = np.stack([-pts[:, 1], pts[:, 0]], axis=1)
    return pts


def _scale_to_size(pts: np.ndarray, size: float) -> np.ndarray:
    """Centre the polygon's box on the origin and scale its larger side to `size`."""
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (pts - (lo + hi) / 2) * (size / float((hi - lo).max()))


def _make_shape(rng: np.random.Generator, name: str, size: float) -> dict:
    """Geometry of one shape centred on the origin: a polygon or a circle radius."""
    if name == "circle":
        return {"kind": "circle", "radius": size / 2}
    if name == "square":
        pts = _square(size)
    elif name == "triangle":
        pts = _triangle(size, int(rng.integers(4)))
    elif name == "star":
        pts = _regular_star(size, float(rng.uniform(0, 2 * math.pi / 5)))
    elif name == "cross":
        pts = _cross(size)
    elif name == "diamond":
        pts = _diamond(size)
    elif name == "hexagon":
        pts = _hexagon(size, math.pi / 6 * int(rng.integers(2)))  # vertex or flat side on top
    elif name == "ell":
        pts = _ell(size, int(rng.integers(4)))
    else:  # pragma: no cover - guarded by SHAPE_NAMES
        raise ValueError(f"unknown shape {name!r}")
    return {"kind": "polygon", "points": pts}


def _shape_extent(shape: dict) -> Box:
    """Tight (x0, y0, x1, y1) extent of an origin-centred shape."""
    if shape["kind"] == "circle":
        r = shape["radius"]
        return (-r, -r, r, r)
    lo, hi = shape["points"].min(axis=0), shape["points"].max(axis=0)
    return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


# Rasterisation
def _coverage(shape: dict, centre: tuple[float, float], window: tuple[int, int, int, int]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape over the pixel window (x0, y0, x1, y1).

    Coverage is the fraction of SUPERSAMPLE x SUPERSAMPLE sample points (at sub-pixel
    centres) inside the shape. We test points exactly instead of drawing with
    ImageDraw on an upscaled canvas: Pillow truncates float vertices and fills
    inclusively, which would bias edges by up to one canvas pixel and make the
    geometric boxes less tight. Exact sampling guarantees that every pixel with
    non-zero coverage intersects the shape, hence lies inside the box.
    """
    wx0, wy0, wx1, wy1 = window
    s = SUPERSAMPLE
    xs = wx0 + (np.arange((wx1 - wx0) * s) + 0.5) / s - centre[0]
    ys = wy0 + (np.arange((wy1 - wy0) * s) + 0.5) / s - centre[1]
    if shape["kind"] == "circle":
        inside = xs[None, :] ** 2 + ys[:, None] ** 2 <= shape["radius"] ** 2
    else:
        inside = _points_in_polygon(shape["points"], xs, ys)
    h, w = wy1 - wy0, wx1 - wx0
    return inside.reshape(h, s, w, s).mean(axis=(1, 3))


def _points_in_polygon(poly: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd test of the grid xs x ys against a simple polygon -> (len(ys), len(xs)) bool."""
    inside = np.zeros((len(ys), len(xs)), dtype=bool)
    for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0)):
        if ya == yb:
            continue  # horizontal edges never cross a scanline under the half-open rule
        crosses = (ya > ys) != (yb > ys)  # per row: does this edge span the scanline?
        x_cross = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses[:, None] & (xs[None, :] < x_cross[:, None])
    return inside


def _composite(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, window) -> None:
    """Alpha-blend a flat colour into canvas[window] in place."""
    x0, y0, x1, y1 = window
    region = canvas[y0:y1, x0:x1]
    region += alpha[..., None] * (colour[None, None, :] - region)


# Backgrounds: each returns (background, reference) float32 (H, W, 3) arrays. The reference is
# what shape colours must contrast with (clutter lines are thin and ignored there, otherwise a
# line crossing a box would dominate the check).
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _bg_solid(rng, h, w):
    bg = np.broadcast_to(_random_colour(rng), (h, w, 3)).astype(np.float32)
    return bg, bg


def _bg_gradient(rng, h, w):
    c0, c1 = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    bg = c0 + t[..., None] * (c1 - c0)
    return bg.astype(np.float32), bg.astype(np.float32)


def _bg_noise(rng, h, w):
    """Smooth colour noise: a tiny random grid around a base colour, upsampled bicubically."""
    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    grid = _random_colour(rng) + rng.normal(0.0, 45.0, size=(gh, gw, 3))
    small = Image.fromarray(np.clip(np.rint(grid), 0, 255).astype(np.uint8), "RGB")
    bg = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32)
    return bg, bg


def _bg_lines(rng, h, w):
    base = _random_colour(rng)
    img = Image.new("RGB", (w, h), tuple(int(c) for c in base))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 13))):
        # Endpoints may fall outside the image so lines cross it at any position.
        x0, x1 = rng.uniform(-0.2 * w, 1.2 * w, size=2)
        y0, y1 = rng.uniform(-0.2 * h, 1.2 * h, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
    ref = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    return np.asarray(img, dtype=np.float32), ref


_BACKGROUND_FNS = {"solid": _bg_solid, "gradient": _bg_gradient, "noise": _bg_noise, "lines": _bg_lines}


# Layout and colours
def parse_image_size(image_size: ImageSize) -> tuple[int, int]:
    """int -> (s, s); (h, w) -> (h, w). Validates positivity."""
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def check_choices(chosen: Sequence[str], allowed: Sequence[str], what: str) -> None:
    """ConfigError unless `chosen` is a non-empty list of distinct names from `allowed`."""
    unknown = [c for c in chosen if c not in allowed]
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise ConfigError(f"{what} must be distinct names from {', '.join(allowed)}; got "
                          f"{', '.join(chosen) or 'none'}")


def _boxes_conflict(box: Box, others: list[Box], gap: float = MIN_GAP) -> bool:
    """True if `box` intersects any of `others` expanded by `gap` px."""
    x0, y0, x1, y1 = box
    return any(
        x0 < ox1 + gap and x1 > ox0 - gap and y0 < oy1 + gap and y1 > oy0 - gap
        for ox0, oy0, ox1, oy1 in others
    )


def _place(rng, extent: Box, h: int, w: int, taken: list[Box]) -> Optional[tuple[float, float]]:
    """Random sub-pixel centre keeping the box inside the image and clear of `taken`."""
    ex0, ey0, ex1, ey1 = extent
    for _ in range(PLACEMENT_TRIES):
        cx = rng.uniform(-ex0, w - ex1)
        cy = rng.uniform(-ey0, h - ey1)
        if not _boxes_conflict((cx + ex0, cy + ey0, cx + ex1, cy + ey1), taken):
            return cx, cy
    return None


def _contrast_samples(ref: np.ndarray, box: Box) -> np.ndarray:
    """Reference background colours at the box centre and its four corners -> (5, 3)."""
    h, w = ref.shape[:2]
    x0, y0, x1, y1 = box
    xs = [(x0 + x1) / 2, x0, x1, x0, x1]
    ys = [(y0 + y1) / 2, y0, y0, y1, y1]
    cols = np.clip(np.array(xs, dtype=int), 0, w - 1)
    rows = np.clip(np.array(ys, dtype=int), 0, h - 1)
    return ref[rows, cols]


def _pick_colour(rng: np.random.Generator, samples: np.ndarray) -> np.ndarray:
    """Random colour whose mean |RGB diff| to every background sample is >= MIN_CONTRAST.

    Checking the corners too matters on gradients/noise, where the centre alone can
    hide a low-contrast part of a large shape. Falls back to the colour opposite the
    mean background, which always contrasts strongly with it.
    """
    for _ in range(COLOUR_TRIES):
        colour = _random_colour(rng)
        if np.abs(samples - colour).mean(axis=1).min() >= MIN_CONTRAST:
            return colour
    return np.where(samples.mean(axis=0) > 127.5, 0.0, 255.0).astype(np.float32)


def _draw_num_objects(rng: np.random.Generator, max_objects: int, min_objects: int = 1) -> int:
    if max_objects <= 0 or rng.random() < EMPTY_IMAGE_PROB:
        return 0
    return int(rng.integers(min(min_objects, max_objects), max_objects + 1))


def render_image(rng: np.random.Generator, *, image_size: ImageSize, min_size: float, max_size: float,
                 max_objects: int, background: Optional[str] = None, min_objects: int = 1,
                 classes: Sequence[str] = CLASS_NAMES, backgrounds: Sequence[str] = BACKGROUNDS
                 ) -> tuple[np.ndarray, list[tuple[str, Box]]]:
    """Render one image.

    Args:
        rng: source of all randomness for this image.
        image_size: int (square) or (height, width).
        min_size, max_size: range of the object size, i.e. the longer side of its
            tight box, drawn log-uniformly. ``max_size`` is capped at the image's
            shorter side so every object fits.
        max_objects: upper bound on objects; ~3% of images are empty, the rest hold
            min_objects..max_objects objects (fewer if placement fails after 50 tries).
        background: force one of :data:`BACKGROUNDS` (tests); None picks uniformly from
            ``backgrounds``.
        min_objects: lower bound on objects of a non-empty image (default 1).
        classes: the shapes to draw from, names from :data:`SHAPE_NAMES` (default
            :data:`CLASS_NAMES`, the five original ones).
        backgrounds: the background styles to draw from, a subset of :data:`BACKGROUNDS`.

    Returns:
        ``(image, objects)``: an (H, W, 3) uint8 RGB array and a list of
        ``(class_name, (x0, y0, x1, y1))``: tight float boxes in pixels, xyxy, no +1
        (width = x1 - x0), inside ``[0, W] x [0, H]``. Boxes are >= 2 px apart.
    """
    h, w = parse_image_size(image_size)
    max_size = min(float(max_size), float(min(h, w)))
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size <= min(H, W); got {min_size}, {max_size}, {(h, w)}")
    check_choices(classes, SHAPE_NAMES, "classes")
    check_choices(backgrounds, BACKGROUNDS, "backgrounds")
    if background is None:
        background = backgrounds[int(rng.integers(len(backgrounds)))]
    canvas, ref = _BACKGROUND_FNS[background](rng, h, w)
    canvas = np.array(canvas, dtype=np.float32)  # writable copy

    objects: list[tuple[str, Box]] = []
    taken: list[Box] = []
    for _ in range(_draw_num_objects(rng, max_objects, min_objects)):
        name = classes[int(rng.integers(len(classes)))]
        size = float(math.exp(rng.uniform(math.log(min_size), math.log(max_size))))
        shape = _make_shape(rng, name, size)
        extent = _shape_extent(shape)
        centre = _place(rng, extent, h, w, taken)
        if centre is None:
            continue  # crowded image: drop this object rather than overlap
        cx, cy = centre
        box = (
            max(cx + extent[0], 0.0), max(cy + extent[1], 0.0),
            min(cx + extent[2], float(w)), min(cy + extent[3], float(h)),
        )  # clipping only guards against float round-off: placement keeps boxes inside
        window = (int(math.floor(box[0])), int(math.floor(box[1])),
                  int(math.ceil(box[2])), int(math.ceil(box[3])))
        colour = _pick_colour(rng, _contrast_samples(ref, box))
        _composite(canvas, _coverage(shape, centre, window), colour, window)
        taken.append(box)
        objects.append((name, box))

    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, objects
