"""Render OpenPose keypoints as the colour-coded skeleton the openpose ControlNets were trained on.

Input: OpenPose's JSON (``{"people": [{"pose_keypoints_2d": [x0, y0, c0, x1, y1, c1, ...]}, ...]}``), body in
the COCO-18 order below (BODY_25 files are mapped to it), pixel coordinates (or [0, 1] with ``normalized``),
confidence ``c`` (0 = not detected). Optional ``hand_left/right_keypoints_2d`` (21 points) and
``face_keypoints_2d`` (70 points) are drawn with ``hands`` / ``face``.

The rendering follows the OpenPose body-18 look used by ControlNet 1.1's openpose annotator: joint k has colour
k of an 18-step hue wheel (hue = 20k degrees, full saturation and value: red nose, orange neck, ...), limb i (in
the order of :data:`LIMBS`) is a filled ellipse 2 x ``stick_width`` px across in colour i at 60 % brightness, and
joints are filled circles of radius ``joint_radius`` drawn over the limbs at full colour.
"""

from __future__ import annotations

import colorsys
import math
from typing import Any

import cv2
import numpy as np

from controlnet.annotators.inputs import read_keypoints_json
from controlnet.errors import UserError

# COCO-18 joint order written by OpenPose's COCO model.
COCO18 = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
# BODY_25 index of each COCO-18 joint (BODY_25 adds mid-hip at 8 and six foot points at 19..24).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

# The 17 limbs OpenPose renders for COCO-18, in drawing order; limb i is drawn in colour i.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip

# Hand: wrist 0, then four points per finger (thumb 1-4, index 5-8, middle 9-12, ring 13-16, little 17-20).
HAND_EDGES = tuple((0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4))

LIMB_BRIGHTNESS = 0.6  # limbs are drawn at 60 % of their colour, joints at 100 %
STICK_WIDTH = 4  # ellipse semi-minor axis (px) of a limb
JOINT_RADIUS = 4  # px
HAND_LINE_WIDTH = 2  # px
HAND_POINT_COLOUR = (0, 0, 255)
FACE_POINT_RADIUS = 3
FACE_POINT_COLOUR = (255, 255, 255)
# OpenPose's --render_threshold default: keypoints below this confidence are not drawn.
RENDER_THRESHOLD = 0.05


def _hue_colour(fraction: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(fraction % 1.0, 1.0, 1.0)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


# Colour k of the 18-step hue wheel: (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), ...
COLOURS: tuple[tuple[int, int, int], ...] = tuple(_hue_colour(k / 18.0) for k in range(18))
# Hand edge e: hue e/20 of the wheel.
HAND_COLOURS: tuple[tuple[int, int, int], ...] = tuple(_hue_colour(e / len(HAND_EDGES)) for e in range(len(HAND_EDGES)))


def _points(flat: Any, what: str) -> np.ndarray:
    """``[x0, y0, c0, ...]`` -> ``(N, 3)`` float64."""
    try:
        arr = np.asarray(flat, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"pose: {what} must be a flat list of numbers x, y, confidence") from None
    if arr.size % 3:
        raise UserError(f"pose: {what} has {arr.size} numbers; expected a multiple of 3 (x, y, confidence)")
    return arr.reshape(-1, 3)


def parse_people(doc: Any) -> list[dict[str, np.ndarray]]:
    """People from OpenPose JSON: a list of ``{"body": (18, 3), "hand_left": (21, 3)|None, ...}`` arrays."""
    data = read_keypoints_json(doc)
    people = data.get("people") if isinstance(data, dict) else data
    if not isinstance(people, list):
        raise UserError("pose: the keypoints JSON needs a 'people' list (OpenPose format)")
    parsed = []
    for i, person in enumerate(people):
        if not isinstance(person, dict):
            raise UserError(f"pose: people[{i}] must be an object with pose_keypoints_2d")
        body = _points(person.get("pose_keypoints_2d", []), f"people[{i}].pose_keypoints_2d")
        if len(body) == 25:
            body = body[list(BODY25_TO_COCO18)]
        elif len(body) == 0:
            body = np.zeros((18, 3))
        elif len(body) != 18:
            raise UserError(f"pose: people[{i}] has {len(body)} body keypoints; expected 18 (COCO) or 25 (BODY_25)")
        entry = {"body": body}
        for key, count in (("hand_left", 21), ("hand_right", 21), ("face", 70)):
            pts = person.get(f"{key}_keypoints_2d")
            pts = _points(pts, f"people[{i}].{key}_keypoints_2d") if pts else None
            if pts is not None and len(pts) != count:
                raise UserError(f"pose: people[{i}].{key}_keypoints_2d has {len(pts)} points; expected {count}")
            entry[key] = pts
        parsed.append(entry)
    return parsed


def _xy(point: np.ndarray, scale: tuple[float, float]) -> tuple[int, int]:
    return int(round(point[0] * scale[0])), int(round(point[1] * scale[1]))


def draw_people(
    canvas: np.ndarray,
    people: list[dict[str, np.ndarray]],
    threshold: float = RENDER_THRESHOLD,
    stick_width: int = STICK_WIDTH,
    joint_radius: int = JOINT_RADIUS,
    hands: bool = False,
    face: bool = False,
    normalized: bool = False,
) -> np.ndarray:
    """Draw ``people`` (from :func:`parse_people`) on ``canvas`` (``(H, W, 3)`` uint8, modified and returned)."""
    h, w = canvas.shape[:2]
    scale = (float(w), float(h)) if normalized else (1.0, 1.0)

    limbs = np.zeros_like(canvas)
    for person in people:
        body = person["body"]
        for i, (a, b) in enumerate(LIMBS):
            if body[a, 2] < threshold or body[b, 2] < threshold:
                continue
            (xa, ya), (xb, yb) = _xy(body[a], scale), _xy(body[b], scale)
            centre = (int(round((xa + xb) / 2)), int(round((ya + yb) / 2)))
            half_length = int(round(math.hypot(xb - xa, yb - ya) / 2))
            angle = int(round(math.degrees(math.atan2(yb - ya, xb - xa))))
            polygon = cv2.ellipse2Poly(centre, (half_length, stick_width), angle, 0, 360, 1)
            cv2.fillConvexPoly(limbs, polygon, COLOURS[i])
    dimmed = (limbs.astype(np.float32) * LIMB_BRIGHTNESS).astype(np.uint8)
    drawn = limbs.any(axis=2)
    canvas[drawn] = dimmed[drawn]

    for person in people:
        body = person["body"]
        for k in range(len(COCO18)):
            if body[k, 2] >= threshold:
                cv2.circle(canvas, _xy(body[k], scale), joint_radius, COLOURS[k], thickness=-1)
        if hands:
            for key in ("hand_left", "hand_right"):
                pts = person.get(key)
                if pts is None:
                    continue
                for e, (a, b) in enumerate(HAND_EDGES):
                    if pts[a, 2] >= threshold and pts[b, 2] >= threshold:
                        cv2.line(canvas, _xy(pts[a], scale), _xy(pts[b], scale), HAND_COLOURS[e], HAND_LINE_WIDTH)
                for p in pts:
                    if p[2] >= threshold:
                        cv2.circle(canvas, _xy(p, scale), joint_radius, HAND_POINT_COLOUR, thickness=-1)
        if face and person.get("face") is not None:
            for p in person["face"]:
                if p[2] >= threshold:
                    cv2.circle(canvas, _xy(p, scale), FACE_POINT_RADIUS, FACE_POINT_COLOUR, thickness=-1)
    return canvas


def pose(
    image: np.ndarray,
    keypoints: Any = None,
    threshold: float = RENDER_THRESHOLD,
    stick_width: int = STICK_WIDTH,
    joint_radius: int = JOINT_RADIUS,
    hands: bool = False,
    face: bool = False,
    normalized: bool = False,
    width: int = 0,
    height: int = 0,
) -> np.ndarray:
    """OpenPose skeletons on a black canvas of ``image``'s size (``width``/``height`` only size a canvas when
    no image is given). ``keypoints``: a JSON file path, a JSON string, or the parsed dict/list."""
    if keypoints is None:
        raise UserError("pose: keypoints are required; pass --keypoints PEOPLE.json (OpenPose JSON)")
    canvas = np.zeros((image.shape[0], image.shape[1], 3), dtype=np.uint8)
    people = parse_people(keypoints)
    return draw_people(canvas, people, threshold, stick_width, joint_radius, hands, face, normalized)
