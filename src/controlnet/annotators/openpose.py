"""OpenPose from a photo: body keypoints (``openpose``) and hands (``openpose_hand``), as ControlNet 1.1 finds them.

The networks are in :mod:`controlnet.annotators.networks.openpose`; this module is the rest of the original
annotator (ControlNet-v1-1-nightly ``annotator/openpose``: ``body.py``, ``hand.py``, ``util.handDetect``), in
numpy and OpenCV:

1. The photo is resized so that its short side is ``detect_resolution`` (sides rounded to multiples of 64, as
   the 1.1 demos' ``resize_image``; :func:`controlnet.annotators.detectors.resize_for_detection`), in BGR.
2. Body: heatmaps and part affinity fields at the image's size (``networks.openpose.body_maps``),
   Gaussian-smoothed heatmap peaks (:func:`find_peaks`), limb candidates scored by the line integral of the PAF
   between two peaks (:func:`connect_limbs`), and a greedy grouping of limbs into people (:func:`group_people`).
3. Hands (``openpose_hand``): a square box beyond each wrist sized from the forearm and upper arm
   (:func:`hand_boxes`), the hand network on each crop at four scales, and per keypoint the maximum of the
   strongest connected region of the smoothed heatmap (:func:`hand_keypoints`).
4. The keypoints are scaled back to the photo's size and drawn by our skeleton renderer
   (:mod:`controlnet.annotators.pose`); ``json=PATH`` also writes them as OpenPose JSON (``people[]`` with
   ``pose_keypoints_2d`` in COCO-18 order, ``hand_left/right_keypoints_2d``; ``canvas_width/height``), which the
   ``pose_json`` annotator draws again identically.

Differences from the original, all in the drawing: we draw at the photo's size instead of drawing at the detect
size and resizing the picture, and a keypoint whose confidence (its raw heatmap value) is below the renderer's
threshold (0.05) is not drawn, where the original draws every found keypoint.
"""

from __future__ import annotations

import json as jsonlib
import math
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from controlnet.annotators import pose as render
from controlnet.annotators.detectors import DETECT_RESOLUTION, resize_for_detection, weights_file
from controlnet.annotators.registry import Param
from controlnet.annotators.weights import ANNOTATORS_REPO, weights_status

BODY_FILE = "body_pose_model.pth"
HAND_FILE = "hand_pose_model.pth"
PARTS = 18  # COCO-18 body parts (the 19th heatmap is the background)

# body.py constants
PEAK_SIGMA = 3.0  # gaussian_filter(heatmap, sigma=3) before peak finding (body.py and hand.py)
PEAK_THRESHOLD = 0.1  # thre1: a peak's smoothed heatmap value must exceed this
PAF_THRESHOLD = 0.05  # thre2: a PAF sample counts when its projection on the limb exceeds this
PAF_SAMPLES = 10  # mid_num: points sampled along a candidate limb
PAF_MIN_FRACTION = 0.8  # more than 80 % of the samples must count
MIN_PARTS = 4  # a person needs at least 4 parts ...
MIN_MEAN_SCORE = 0.4  # ... and a mean score (peak + limb scores / parts) of at least 0.4
# The 19 limbs searched (body.py limbSeq, 0-based COCO-18 indices): the 17 drawn ones (pose.LIMBS), then
# shoulder-ear on both sides. A limb's PAF is the channel pair below (body.py mapIdx minus 19).
LIMB_PARTS = render.LIMBS + ((2, 16), (5, 17))
LIMB_PAF = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11),
    (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
NEW_PERSON_LIMBS = 17  # only the first 17 limbs may start a new person (body.py: `elif not found and k < 17`)

# util.handDetect constants (from CMU OpenPose handDetector.cpp)
HAND_WRIST_ELBOW_RATIO = 0.33  # the box centre is this far beyond the wrist, along elbow → wrist
HAND_BOX_SCALE = 1.5  # box side = 1.5 * max(forearm, 0.9 * upper arm)
HAND_UPPER_ARM_FACTOR = 0.9
MIN_HAND_BOX = 20  # px: smaller boxes are skipped
ARMS = ((True, (5, 6, 7)), (False, (2, 3, 4)))  # (is_left, shoulder/elbow/wrist); left first, as handDetect
# hand.py
HAND_THRESHOLD = 0.05  # smoothed hand heatmap threshold
HAND_KEYPOINTS = 21


def gaussian_smooth(values: np.ndarray, sigma: float = PEAK_SIGMA, radius: int | None = None) -> np.ndarray:
    """2-D Gaussian smoothing as ``scipy.ndimage.gaussian_filter(values, sigma, radius=radius)`` computes it: a
    normalised kernel of radius ``int(4 sigma + 0.5)`` unless given, and half-sample symmetric borders (OpenCV's
    BORDER_REFLECT)."""
    radius = int(4.0 * sigma + 0.5) if radius is None else radius
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * x * x / (sigma * sigma))
    kernel /= kernel.sum()
    return cv2.sepFilter2D(values.astype(np.float64), cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT)


def find_peaks(heatmaps: np.ndarray, threshold: float = PEAK_THRESHOLD) -> list[np.ndarray]:
    """Per body part, its peaks as ``(n, 4)`` rows ``x, y, score, id`` (body.py).

    A peak is a pixel of the smoothed heatmap that is >= its four neighbours and > ``threshold``; its score is the
    unsmoothed heatmap there. Ids number all peaks in order: part by part, then row by row.
    """
    peaks, next_id = [], 0
    for part in range(PARTS):
        raw = heatmaps[:, :, part]
        smooth = gaussian_smooth(raw)
        padded = np.pad(smooth, 1, constant_values=0.0)  # missing neighbours count as 0, as in body.py
        centre = padded[1:-1, 1:-1]
        is_peak = (
            (centre >= padded[:-2, 1:-1]) & (centre >= padded[2:, 1:-1])
            & (centre >= padded[1:-1, :-2]) & (centre >= padded[1:-1, 2:]) & (centre > threshold)
        )  # fmt: skip
        ys, xs = np.nonzero(is_peak)
        ids = np.arange(next_id, next_id + len(xs))
        peaks.append(np.stack([xs, ys, raw[ys, xs], ids], axis=1).astype(np.float64).reshape(-1, 4))
        next_id += len(xs)
    return peaks


def limb_scores(a: np.ndarray, b: np.ndarray, paf_x: np.ndarray, paf_y: np.ndarray,
                image_height: int) -> tuple[np.ndarray, np.ndarray]:
    """The scores of every limb from a peak of ``a`` (``(n, 2+)``, x y first) to a peak of ``b`` (``(m, 2+)``), and
    whether each passes body.py's criteria: two ``(n, m)`` arrays.

    Ten points evenly spaced from a to b (``np.linspace``'s arithmetic) sample the PAF (nearest pixel, halves
    rounded to even as Python's ``round``); each sample's projection on the unit vector a → b is a vote. Score =
    mean vote + ``min(0.5 * image_height / length - 1, 0)`` (a penalty for limbs longer than half the image). The
    limb passes when more than 80 % of the votes exceed 0.05 and the score is positive. All pairs at once: body.py
    loops over them in Python, which dominates its run time when a part has many peaks.
    """
    start, stop = a[:, None, :2], b[None, :, :2]  # (n, 1, 2), (1, m, 2)
    vec = stop - start  # (n, m, 2)
    norm = np.maximum(0.001, np.sqrt(vec[..., 0] * vec[..., 0] + vec[..., 1] * vec[..., 1]))  # (n, m)
    unit = vec / norm[..., None]
    k = np.arange(PAF_SAMPLES, dtype=np.float64)[:, None, None, None]  # (10, 1, 1, 1)
    points = k * (vec / (PAF_SAMPLES - 1)) + start  # (10, n, m, 2), as np.linspace(a, b, 10)
    points[-1] = np.broadcast_to(stop, vec.shape)  # linspace ends exactly at b
    xs, ys = np.round(points[..., 0]).astype(int), np.round(points[..., 1]).astype(int)
    votes = paf_x[ys, xs] * unit[..., 0] + paf_y[ys, xs] * unit[..., 1]  # (10, n, m)
    scores = votes.mean(axis=0) + np.minimum(0.5 * image_height / norm - 1, 0)
    counted = np.count_nonzero(votes > PAF_THRESHOLD, axis=0) > PAF_MIN_FRACTION * PAF_SAMPLES
    return scores, counted & (scores > 0)


def limb_score(a: np.ndarray, b: np.ndarray, paf_x: np.ndarray, paf_y: np.ndarray,
               image_height: int) -> tuple[float, bool]:
    """:func:`limb_scores` of one limb from peak ``a`` to peak ``b`` (``(x, y)``): (score, passes)."""
    scores, ok = limb_scores(np.asarray(a, np.float64)[None], np.asarray(b, np.float64)[None], paf_x, paf_y,
                             image_height)
    return float(scores[0, 0]), bool(ok[0, 0])


def connect_limbs(peaks: list[np.ndarray], paf: np.ndarray, image_height: int) -> list[np.ndarray | None]:
    """Per limb of :data:`LIMB_PARTS`, the chosen connections as ``(m, 5)`` rows ``id_a, id_b, score, i, j``
    (``i``/``j`` index the two parts' peak lists); ``None`` when either part has no peak (body.py).

    Candidates that pass :func:`limb_scores` are taken best score first, each peak used at most once per limb,
    until one side runs out of peaks.
    """
    connections: list[np.ndarray | None] = []
    for (part_a, part_b), (cx, cy) in zip(LIMB_PARTS, LIMB_PAF):
        cand_a, cand_b = peaks[part_a], peaks[part_b]
        if len(cand_a) == 0 or len(cand_b) == 0:
            connections.append(None)
            continue
        scores, ok = limb_scores(cand_a, cand_b, paf[:, :, cx], paf[:, :, cy], image_height)  # (n, m) each
        candidates = [(i, j, float(scores[i, j])) for i, j in zip(*np.nonzero(ok))]  # row-major, as body.py
        candidates.sort(key=lambda c: c[2], reverse=True)  # stable, as Python's sorted in body.py
        chosen: list[list[float]] = []
        used_a, used_b = set(), set()
        for i, j, score in candidates:
            if i in used_a or j in used_b:
                continue
            chosen.append([cand_a[i, 3], cand_b[j, 3], score, i, j])
            used_a.add(i)
            used_b.add(j)
            if len(chosen) >= min(len(cand_a), len(cand_b)):
                break
        connections.append(np.array(chosen, dtype=np.float64).reshape(-1, 5))
    return connections


def _extend(person: np.ndarray, part: int, peak_id: float, gain: float) -> None:
    """Give ``person`` (a row of :func:`group_people`) peak ``peak_id`` as ``part``, adding ``gain`` to its score."""
    person[part] = peak_id
    person[PARTS + 1] += 1
    person[PARTS] += gain


def _add_limb(people: np.ndarray, row: np.ndarray, scores: np.ndarray, limb: int) -> np.ndarray:
    """Add one connection ``row`` (id_a, id_b, score, i, j) of limb ``limb`` to ``people`` (body.py's rules)."""
    part_a, part_b = LIMB_PARTS[limb]
    id_a, id_b, score = row[0], row[1], row[2]
    owners = [p for p in range(len(people)) if people[p, part_a] == id_a or people[p, part_b] == id_b][:2]
    if len(owners) == 2:
        p1, p2 = owners
        if not ((people[p1, :PARTS] >= 0) & (people[p2, :PARTS] >= 0)).any():
            # Two disjoint partial people joined by this limb: merge the second into the first.
            people[p1, :PARTS] += people[p2, :PARTS] + 1
            people[p1, PARTS:] += people[p2, PARTS:]
            people[p1, PARTS] += score
            return np.delete(people, p2, axis=0)
        _extend(people[p1], part_b, id_b, scores[int(id_b)] + score)  # overlapping: the first one, as body.py
    elif len(owners) == 1:
        if people[owners[0], part_b] != id_b:
            _extend(people[owners[0]], part_b, id_b, scores[int(id_b)] + score)
    elif limb < NEW_PERSON_LIMBS:
        new = -np.ones(PARTS + 2)
        new[part_a], new[part_b] = id_a, id_b
        new[PARTS] = scores[int(id_a)] + scores[int(id_b)] + score
        new[PARTS + 1] = 2
        people = np.vstack([people, new])
    return people


def group_people(peaks: list[np.ndarray], connections: list[np.ndarray | None]) -> np.ndarray:
    """People as ``(P, 20)`` rows: per COCO-18 part the id of its peak (-1: none), the total score and the number
    of parts (body.py's ``subset``). Limbs are added in :data:`LIMB_PARTS` order; a connection extends the person
    who has either end, merges two disjoint people it joins, or starts a new one. People with fewer than 4 parts
    or a mean score below 0.4 are dropped."""
    scores = np.concatenate([p[:, 2] for p in peaks]) if peaks else np.zeros(0)
    people = -np.ones((0, PARTS + 2))
    for limb, found in enumerate(connections):
        for row in found if found is not None else ():
            people = _add_limb(people, row, scores, limb)
    keep = (people[:, PARTS + 1] >= MIN_PARTS) & (people[:, PARTS] / people[:, PARTS + 1] >= MIN_MEAN_SCORE)
    return people[keep]


def body_keypoints(peaks: list[np.ndarray], people: np.ndarray) -> np.ndarray:
    """``(P, 18, 3)`` keypoints ``x, y, confidence`` of each person; a missing part is ``0, 0, 0``."""
    candidates = np.concatenate(peaks) if peaks else np.zeros((0, 4))
    out = np.zeros((len(people), PARTS, 3))
    for p, person in enumerate(people):
        for part in range(PARTS):
            if person[part] >= 0:
                out[p, part] = candidates[int(person[part]), :3]
    return out


def hand_boxes(body: np.ndarray, found: np.ndarray, width: int, height: int) -> list[tuple[int, int, int, bool]]:
    """Square hand boxes ``(x, y, side, is_left)`` of one person (util.handDetect): centred 0.33 forearm beyond the
    wrist, side 1.5 x max(forearm, 0.9 x upper arm), clipped to the image; sides under 20 px are skipped.
    ``body`` is ``(18, 3)`` keypoints, ``found`` which parts were detected."""
    boxes = []
    for is_left, (shoulder, elbow, wrist) in ARMS:
        if not found[[shoulder, elbow, wrist]].all():
            continue
        (x1, y1), (x2, y2), (x3, y3) = body[shoulder, :2], body[elbow, :2], body[wrist, :2]
        x = x3 + HAND_WRIST_ELBOW_RATIO * (x3 - x2)
        y = y3 + HAND_WRIST_ELBOW_RATIO * (y3 - y2)
        forearm = math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2)
        upper_arm = math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
        side = HAND_BOX_SCALE * max(forearm, HAND_UPPER_ARM_FACTOR * upper_arm)
        x, y = max(x - side / 2, 0), max(y - side / 2, 0)
        side = min(side, width - x, height - y)
        if side >= MIN_HAND_BOX:
            boxes.append((int(x), int(y), int(side), is_left))
    return boxes


def hand_keypoints(heatmaps: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """``(21, 3)`` hand keypoints ``x, y, confidence`` in crop pixels from ``(128, 128, 22)`` heatmaps (hand.py).

    Per keypoint: smooth, keep pixels above 0.05, take the 8-connected region with the largest sum of the raw
    heatmap, and its raw maximum (first in row-major order) scaled to the crop (truncated to whole pixels). As in
    the original, a keypoint with nothing above the threshold, or one landing on the crop's top row or left
    column (coordinate 0, which the original reads as "missing"), is missing (``0, 0, 0``).
    """
    out = np.zeros((HAND_KEYPOINTS, 3))
    size = heatmaps.shape[0]
    for k in range(HAND_KEYPOINTS):
        raw = heatmaps[:, :, k]
        binary = (gaussian_smooth(raw) > HAND_THRESHOLD).astype(np.uint8)
        count, labels = cv2.connectedComponents(binary, connectivity=8)
        if count <= 1:
            continue
        sums = [raw[labels == i].sum() for i in range(1, count)]
        region = np.where(labels == int(np.argmax(sums)) + 1, raw, 0.0)
        row, col = np.unravel_index(int(np.argmax(region)), region.shape)
        y = int(float(row) * float(crop_height) / float(size))
        x = int(float(col) * float(crop_width) / float(size))
        if x > 0 and y > 0:
            out[k] = (x, y, region[row, col])
    return out


def _hand_weights_file(weights: str, hand_weights: str) -> Path:
    """The hand file: ``hand_weights`` if given, else ``hand_pose_model.pth`` of the same hub repository, folder,
    or beside the ``weights`` file, else the default hub file."""
    from controlnet import hub

    if not hand_weights and weights and (hub.is_repo_id(weights) or hub.split_file_id(weights)):
        repo = weights if hub.is_repo_id(weights) else hub.split_file_id(weights)[0]
        return weights_file("openpose_hand", repo)
    if not hand_weights and weights:
        local = Path(weights).expanduser()
        beside = local / HAND_FILE if local.is_dir() else local.with_name(HAND_FILE)
        if beside.is_file():
            return beside
    return weights_file("openpose_hand", hand_weights)


def _net(name: str, path: Path, device: str) -> Any:
    from controlnet.annotators.networks import load_network
    from controlnet.devices import resolve_device

    return load_network(name, path, resolve_device(None if device == "auto" else device))


def _detect_people(bgr: np.ndarray, body_file: Path, hand_file: Path | None, device: str) -> list[dict[str, Any]]:
    """People found in a BGR image: ``{"body": (18, 3), "hand_left"/"hand_right": (21, 3) or None}``, in the
    image's pixels."""
    from controlnet.annotators.networks import openpose as networks

    h, w = bgr.shape[:2]
    body_net = _net("openpose_body", body_file, device)
    hand_net = _net("openpose_hand", hand_file, device) if hand_file is not None else None  # a bad file fails early
    heat, paf = networks.body_maps(body_net, bgr)
    peaks = find_peaks(heat)
    grouped = group_people(peaks, connect_limbs(peaks, paf, h))
    bodies = body_keypoints(peaks, grouped)
    people = []
    for body, person in zip(bodies, grouped):
        entry: dict[str, Any] = {"body": body, "hand_left": None, "hand_right": None, "face": None}
        if hand_net is not None:
            for x, y, side, is_left in hand_boxes(body, person[:PARTS] >= 0, w, h):
                crop = bgr[y : y + side, x : x + side]
                points = hand_keypoints(networks.hand_heatmaps(hand_net, crop), crop.shape[0], crop.shape[1])
                points[:, 0] += np.where(points[:, 2] > 0, x, 0)
                points[:, 1] += np.where(points[:, 2] > 0, y, 0)
                entry["hand_left" if is_left else "hand_right"] = points
        people.append(entry)
    return people


def _scaled(points: np.ndarray | None, sx: float, sy: float) -> np.ndarray | None:
    if points is None:
        return None
    out = points.copy()
    found = out[:, 2] > 0
    out[found, 0] *= sx
    out[found, 1] *= sy
    return out


def people_json(people: list[dict[str, np.ndarray]], width: int, height: int) -> dict[str, Any]:
    """OpenPose JSON of ``people`` (COCO-18 ``pose_keypoints_2d``, hands when found) on a ``width`` x ``height``
    canvas; :func:`controlnet.annotators.pose.parse_people` reads it back."""
    out = []
    for person in people:
        entry = {"pose_keypoints_2d": [round(float(v), 3) for v in person["body"].reshape(-1)]}
        for key in ("hand_left", "hand_right"):
            if person.get(key) is not None:
                entry[f"{key}_keypoints_2d"] = [round(float(v), 3) for v in person[key].reshape(-1)]
        out.append(entry)
    return {"people": out, "canvas_width": int(width), "canvas_height": int(height)}


def detect_pose(image: np.ndarray, detect_resolution: int = DETECT_RESOLUTION, weights: str = "",
                hand_weights: str = "", hands: bool = False, device: str = "cpu") -> dict[str, Any]:
    """OpenPose JSON (see :func:`people_json`) of an RGB uint8 photo, in the photo's pixels."""
    body_file = weights_file("openpose_body", weights)
    hand_file = _hand_weights_file(weights, hand_weights) if hands else None
    small = resize_for_detection(image, detect_resolution)
    people = _detect_people(np.ascontiguousarray(small[:, :, ::-1]), body_file, hand_file, device)  # RGB → BGR
    sx, sy = image.shape[1] / small.shape[1], image.shape[0] / small.shape[0]
    for person in people:
        for key in ("body", "hand_left", "hand_right"):
            person[key] = _scaled(person[key], sx, sy)
    return people_json(people, image.shape[1], image.shape[0])


def render_people(image: np.ndarray, doc: dict[str, Any], json: Any = None, hands: bool = False,
                  stick_width: int = render.STICK_WIDTH, joint_radius: int = render.JOINT_RADIUS) -> np.ndarray:
    """The people of OpenPose JSON ``doc`` drawn on black at ``image``'s size; ``json`` (a path) also receives
    ``doc`` (written atomically)."""
    if json:
        from controlnet.fileio import atomic_write_text

        atomic_write_text(Path(json), jsonlib.dumps(doc, indent=1) + "\n")
    canvas = np.zeros_like(image)
    return render.draw_people(canvas, render.parse_people(doc), stick_width=stick_width, joint_radius=joint_radius,
                              hands=hands)


def openpose(image: np.ndarray, weights: str = "", detect_resolution: int = DETECT_RESOLUTION, json: Any = None,
             stick_width: int = render.STICK_WIDTH, joint_radius: int = render.JOINT_RADIUS,
             device: str = "cpu") -> np.ndarray:
    """The COCO-18 body skeletons of every person in ``image`` (RGB uint8), drawn on black at the image's size;
    ``json`` (a path) also receives the keypoints as OpenPose JSON."""
    doc = detect_pose(image, detect_resolution, weights, hands=False, device=device)
    return render_people(image, doc, json, False, stick_width, joint_radius)


def openpose_hand(image: np.ndarray, weights: str = "", hand_weights: str = "",
                  detect_resolution: int = DETECT_RESOLUTION, json: Any = None, stick_width: int = render.STICK_WIDTH,
                  joint_radius: int = render.JOINT_RADIUS, device: str = "cpu") -> np.ndarray:
    """As :func:`openpose`, plus the 21 keypoints of each hand found beyond a detected wrist."""
    doc = detect_pose(image, detect_resolution, weights, hand_weights, hands=True, device=device)
    return render_people(image, doc, json, True, stick_width, joint_radius)


def _status(*files: str) -> Callable[[], str]:
    """``--list`` line: whether the default weights files are in the hub cache (no network)."""

    def status() -> str:
        from controlnet import hub

        if len(files) == 1:
            return weights_status(ANNOTATORS_REPO, files[0])
        missing = [f for f in files if not hub.is_cached(ANNOTATORS_REPO, f)]
        if not missing:
            return f"weights cached ({ANNOTATORS_REPO}: {', '.join(files)})"
        return f"weights not cached: `hf download {ANNOTATORS_REPO} {' '.join(missing)}` or --weights FILE"

    return status


def register_photo_detectors(register: Callable[..., Any]) -> None:
    """Register ``openpose`` and ``openpose_hand`` with ``register`` (:func:`controlnet.annotators.register`)."""
    weights = Param("weights", str, "", f"{BODY_FILE}, a folder holding it, or a hub id "
                    f"(default: {ANNOTATORS_REPO}/{BODY_FILE})")
    hand_weights = Param("hand_weights", str, "", f"{HAND_FILE}, a folder or a hub id (default: beside the body "
                         f"weights, else {ANNOTATORS_REPO}/{HAND_FILE})")
    common = [
        Param("detect_resolution", int, DETECT_RESOLUTION, "short side the network sees (rounded to 64)",
              minimum=64, maximum=4096),
        Param("json", Path, None, "also write the keypoints to this file as OpenPose JSON (pose_json reads it)"),
        Param("stick_width", int, render.STICK_WIDTH, "limb half-width (px)", minimum=1, maximum=64),
        Param("joint_radius", int, render.JOINT_RADIUS, "joint circle radius (px)", minimum=1, maximum=64),
        Param("device", str, "cpu", "torch device: cpu, cuda, cuda:N, mps or auto"),
    ]
    register("openpose", openpose, "OpenPose body keypoints from a photo, COCO-18 skeletons (openpose ControlNets)",
             [weights] + common, weights=_status(BODY_FILE))
    register("openpose_hand", openpose_hand, "OpenPose body and hand keypoints from a photo (openpose ControlNets)",
             [weights, hand_weights] + common, weights=_status(BODY_FILE, HAND_FILE))
