"""Edge-like annotators from an RGB image: Canny edges, straight lines, soft edges and synthetic scribbles.

All return white (255) structure on black (0), three equal channels, the convention of the canny, mlsd, hed/
softedge and scribble ControlNets.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Canny hysteresis thresholds of the original canny annotator and demo (gradio_canny2image: low 100, high 200).
CANNY_LOW, CANNY_HIGH = 100, 200

# Peak of the scale-normalised derivative of a blurred unit step: sigma * max|d/dx (G_sigma * step)| = 1/sqrt(2 pi).
# Dividing by it makes a full-contrast step edge score 1.0 at every scale.
STEP_EDGE_PEAK = 1.0 / math.sqrt(2.0 * math.pi)
# Sobel with ksize 3 scales a unit-slope ramp by 8 (weights 1, 2, 1 times the central difference 2).
SOBEL3_GAIN = 8.0

# ControlNet 1.1 softedge "safe" mode quantises the soft edge map into few levels (step 2) so that hidden
# details of the source image cannot leak through faint gradients.
SAFE_STEPS = 2


def _white_on_black(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool/uint8 -> ``(H, W, 3)`` uint8 with 255 where set."""
    grey = np.where(mask > 0, 255, 0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def canny(image: np.ndarray, low_threshold: int = CANNY_LOW, high_threshold: int = CANNY_HIGH) -> np.ndarray:
    """Canny edges (OpenCV, 3x3 Sobel, L1 gradient) of the RGB image, white on black.

    As the original annotator, the colour image goes to ``cv2.Canny`` directly (OpenCV takes the strongest
    channel's gradient at each pixel).
    """
    edges = cv2.Canny(np.ascontiguousarray(image), low_threshold, high_threshold)  # (H, W) 0/255
    return _white_on_black(edges)


# --- straight lines (M-LSD stand-in) -------------------------------------------------------------------------


# Segments within this angle (degrees) whose endpoints lie within ``merge_distance`` of each other's line are one
# line: LSD reports the two sides of a thin stroke as two parallel edges; M-LSD draws its centre line once.
MERGE_ANGLE_DEG = 2.0


def merge_parallel(segments: np.ndarray, max_distance: float, max_angle: float = MERGE_ANGLE_DEG) -> np.ndarray:
    """Merge nearly parallel, overlapping segments ``(N, 4)`` lying within ``max_distance`` px of each other's
    line into one centre line (longest first: each segment joins the longest one it matches)."""
    if len(segments) < 2 or max_distance <= 0:
        return segments
    starts = segments[:, :2].astype(np.float64)  # (N, 2)
    ends = segments[:, 2:].astype(np.float64)
    lengths = np.hypot(*(ends - starts).T)
    units = (ends - starts) / np.maximum(lengths, 1e-9)[:, None]  # (N, 2) directions
    cos_limit = math.cos(math.radians(max_angle))
    used = lengths == 0
    merged = []
    for i in np.argsort(-lengths, kind="stable"):
        if used[i]:
            continue
        p, direction = starts[i], units[i]
        normal = np.array([-direction[1], direction[0]])
        off_a, off_b = (starts - p) @ normal, (ends - p) @ normal  # (N,) perpendicular offsets
        at_a, at_b = (starts - p) @ direction, (ends - p) @ direction  # (N,) positions along segment i
        group = (
            ~used
            & (np.abs(units @ direction) >= cos_limit)
            & (np.maximum(np.abs(off_a), np.abs(off_b)) <= max_distance)
            & (np.maximum(at_a, at_b) >= -max_distance)  # overlaps segment i (collinear but apart: separate)
            & (np.minimum(at_a, at_b) <= lengths[i] + max_distance)
        )
        group[i] = True
        used |= group
        along = np.concatenate([at_a[group], at_b[group]])
        offset = float(np.mean(np.concatenate([off_a[group], off_b[group]])))
        start = p + direction * along.min() + normal * offset
        end = p + direction * along.max() + normal * offset
        merged.append([start[0], start[1], end[0], end[1]])
    return np.asarray(merged, dtype=np.float32).reshape(-1, 4)


def detect_segments(
    image: np.ndarray,
    min_length: float = 20.0,
    detector: str = "lsd",
    max_gap: float = 5.0,
    merge_distance: float = 4.0,
) -> np.ndarray:
    """Straight segments ``(N, 4)`` float32 ``x1, y1, x2, y2`` (pixel coordinates) of at least ``min_length`` px.

    ``detector="lsd"`` uses OpenCV's line segment detector (von Gioi et al., 2012) when this OpenCV build has it,
    else falls back to ``"hough"``: probabilistic Hough on Canny edges (segments closer than ``max_gap`` joined).
    Parallel segments closer than ``merge_distance`` px (the two sides of a thin stroke) become one centre line.
    """
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    segments = None
    if detector == "lsd" and hasattr(cv2, "createLineSegmentDetector"):
        try:
            lsd = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD)
            found = lsd.detect(grey)[0]
            segments = np.zeros((0, 4), np.float32) if found is None else found.reshape(-1, 4)
        except cv2.error:  # builds compiled without the (once patent-encumbered) LSD raise here
            segments = None
    if segments is None:
        edges = cv2.Canny(grey, CANNY_LOW, CANNY_HIGH)
        found = cv2.HoughLinesP(
            edges, rho=1, theta=np.pi / 180, threshold=max(10, int(min_length // 2)),
            minLineLength=max(1, int(min_length)), maxLineGap=max(0, int(max_gap)),
        )
        segments = np.zeros((0, 4), np.float32) if found is None else found.reshape(-1, 4).astype(np.float32)
    # Short pieces go first (they are noise, and merging is quadratic in their number), then again after merging.
    lengths = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])
    segments = merge_parallel(segments[lengths >= min_length].astype(np.float32), merge_distance)
    lengths = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])
    return segments[lengths >= min_length].astype(np.float32)


def lines(
    image: np.ndarray,
    min_length: float = 20.0,
    merge_distance: float = 4.0,
    detector: str = "lsd",
    max_gap: float = 5.0,
    thickness: int = 1,
) -> np.ndarray:
    """Straight line segments drawn white on black, as the M-LSD ControlNet expects (1 px lines by default)."""
    h, w = image.shape[:2]
    canvas = np.zeros((h, w), dtype=np.uint8)
    for x1, y1, x2, y2 in detect_segments(image, min_length, detector, max_gap, merge_distance):
        p1 = (int(round(float(x1))), int(round(float(y1))))
        p2 = (int(round(float(x2))), int(round(float(y2))))
        cv2.line(canvas, p1, p2, 255, thickness, lineType=cv2.LINE_8)
    return _white_on_black(canvas)


# --- soft edges (HED / PiDiNet stand-in) ---------------------------------------------------------------------


def soft_edge_map(image: np.ndarray, scales: int = 3, sigma: float = 1.0, gain: float = 2.0) -> np.ndarray:
    """``(H, W)`` float32 in [0, 1]: the strongest scale-normalised colour gradient over ``scales`` octaves.

    At octave k the image is blurred with sigma * 2**k; the gradient magnitude (largest over R, G, B) is multiplied
    by that sigma (Lindeberg's scale normalisation) and divided by :data:`STEP_EDGE_PEAK`, so a black/white step
    scores 1 at every scale; ``gain`` then brightens weaker edges before clipping to 1. Fine texture responds
    only at the small scale, object outlines at all, so their maximum looks like HED's thick soft contours.
    """
    rgb = image.astype(np.float32) / 255.0  # (H, W, 3)
    strongest = np.zeros(image.shape[:2], dtype=np.float32)
    for octave in range(scales):
        s = sigma * (2.0**octave)
        blurred = cv2.GaussianBlur(rgb, (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)
        gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT) / SOBEL3_GAIN
        gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT) / SOBEL3_GAIN
        magnitude = np.sqrt(gx * gx + gy * gy)
        if magnitude.ndim == 3:
            magnitude = magnitude.max(axis=2)  # strongest channel
        strongest = np.maximum(strongest, magnitude * s / STEP_EDGE_PEAK)
    return np.clip(strongest * gain, 0.0, 1.0)


def softedge(image: np.ndarray, scales: int = 3, sigma: float = 1.0, gain: float = 2.0, safe: bool = False) -> np.ndarray:
    """Soft edge map (white edges of varying strength on black), a model-free stand-in for HED / PiDiNet."""
    edge = soft_edge_map(image, scales, sigma, gain)
    if safe:
        edge = np.floor(edge * (SAFE_STEPS + 1)) / SAFE_STEPS  # ControlNet 1.1 "safe" quantisation
        edge = np.clip(edge, 0.0, 1.0)
    grey = np.round(edge * 255.0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


# --- synthetic scribbles -------------------------------------------------------------------------------------

# Smoothing before the stroke edges are found (px): keeps outlines, drops texture, as a person scribbling would.
SCRIBBLE_SMOOTH_SIGMA = 2.0
# Range of the random Canny low threshold; the high threshold is twice the low one (the canny annotator's ratio).
SCRIBBLE_LOW_RANGE = (30, 80)
# Strokes are dropped as whole connected pieces of at most this length (px) so a long outline loses a part.
SCRIBBLE_PIECE = 48
# Spacing (px) of the control points of the random smooth displacement field that makes lines wobble.
SCRIBBLE_WOBBLE_CELL = 32


def scribble(
    image: np.ndarray,
    seed: int = 0,
    width: int = 5,
    drop: float = 0.2,
    jitter: float = 2.0,
) -> np.ndarray:
    """A human-like scribble synthesised from the image's edges (white strokes on black), seeded.

    As the paper made training scribbles from boundary maps with strong augmentation: edges at a random threshold
    (random hysteresis thresholds on the smoothed image), strokes cut into pieces of which a fraction ``drop``
    is removed at random, a smooth random wobble of up to ``jitter`` px, and thickening to ``width`` px with a
    random ±1 px variation. The same ``seed`` gives the same scribble.
    """
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    smooth = cv2.GaussianBlur(np.ascontiguousarray(image), (0, 0), SCRIBBLE_SMOOTH_SIGMA)
    low = int(rng.integers(*SCRIBBLE_LOW_RANGE))
    edges = cv2.Canny(smooth, low, 2 * low) > 0  # (H, W) thin strokes; colour edges as the canny annotator

    # Cut strokes into pieces (a grid of SCRIBBLE_PIECE cells splits long outlines) and drop some of them.
    ys, xs = np.mgrid[0:h, 0:w]
    cell = (ys // SCRIBBLE_PIECE) * ((w + SCRIBBLE_PIECE - 1) // SCRIBBLE_PIECE) + xs // SCRIBBLE_PIECE
    count, pieces = cv2.connectedComponents(edges.astype(np.uint8), connectivity=8)
    piece_id = pieces.astype(np.int64) * (cell.max() + 1) + cell  # a component within one cell
    ids, inverse = np.unique(piece_id[edges], return_inverse=True)
    keep_id = rng.random(len(ids)) >= drop
    kept = np.zeros((h, w), dtype=bool)
    kept[edges] = keep_id[inverse]

    # Wobble: a smooth random displacement field (bicubic upsampling of random offsets on a coarse grid).
    if jitter > 0:
        gh, gw = h // SCRIBBLE_WOBBLE_CELL + 2, w // SCRIBBLE_WOBBLE_CELL + 2
        offsets = rng.uniform(-jitter, jitter, size=(2, gh, gw)).astype(np.float32)
        dx = cv2.resize(offsets[0], (w, h), interpolation=cv2.INTER_CUBIC)
        dy = cv2.resize(offsets[1], (w, h), interpolation=cv2.INTER_CUBIC)
        map_x = (xs + dx).astype(np.float32)
        map_y = (ys + dy).astype(np.float32)
        kept = cv2.remap(kept.astype(np.uint8), map_x, map_y, cv2.INTER_NEAREST, borderValue=0) > 0

    stroke = max(1, int(width) + int(rng.integers(-1, 2)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (stroke, stroke))
    thick = cv2.dilate(kept.astype(np.uint8), kernel)
    return _white_on_black(thick)
