"""Draw the annotators on one synthetic scene and save labelled grids.

    python scripts/annotator_grid.py [OUT_DIR]     # OUT_DIR/annotators_grid.png and OUT_DIR/detectors_grid.png

The scene is drawn in code (a house, a tree, the sun, a person on grass), with a matching 16-bit depth map, an
ADE20K label map, OpenPose keypoints for the person and an inpainting mask, so every annotator has its input.

The second grid runs every neural detector on the scene as a photo. No trained weights can be downloaded where
this script is run for the docs, so the networks get stand-in weights (the fixtures' deterministic recipe, in the
released files' layouts) and tiny random transformers models: the pictures show the plumbing (loading, pre- and
post-processing, drawing), not what the trained networks see. M-LSD tiny uses its real Apache-2.0 weights when
../shared/fixtures/annotators/real/ is beside the checkout.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from controlnet import annotators
from controlnet.images import save_png

SIZE = 256
LABEL_H = 22
# ADE20K class indices (0-based, as segmentation models predict them).
ADE_BUILDING, ADE_SKY, ADE_TREE, ADE_GRASS, ADE_PERSON, ADE_ROOF = 1, 2, 4, 9, 12, 0
HORIZON = 170

# COCO-18 keypoints of the person (x, y).
PERSON = [
    (196, 150), (196, 164), (186, 164), (180, 182), (177, 200), (206, 164), (212, 182), (215, 200),
    (190, 200), (188, 222), (186, 244), (202, 200), (204, 222), (206, 244), (193, 147), (199, 147),
    (190, 149), (202, 149),
]  # fmt: skip


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, np.ndarray]:
    """(image RGB uint8, depth uint16 in mm, ADE20K labels, OpenPose JSON, inpaint mask)."""
    rows = np.arange(SIZE)[:, None]
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:] = np.stack([120 + rows // 4, 170 + rows // 5, np.full_like(rows, 240)], axis=2)  # sky
    image[HORIZON:] = (70, 150, 60)  # grass
    labels = np.full((SIZE, SIZE), ADE_SKY, np.int32)  # int32: OpenCV draws on it
    labels[HORIZON:] = ADE_GRASS
    # depth: the grass gets nearer toward the bottom, the sky is far (20 m)
    depth = np.full((SIZE, SIZE), 20000.0)
    depth[HORIZON:] = 8000.0 - (rows[HORIZON:] - HORIZON) * 60.0

    cv2.circle(image, (40, 40), 22, (255, 220, 60), -1)  # sun

    cv2.rectangle(image, (30, 110), (120, 200), (200, 90, 70), -1)  # house
    cv2.rectangle(labels, (30, 110), (120, 200), ADE_BUILDING, -1)
    depth[110:201, 30:121] = 6000.0
    roof = np.array([[22, 112], [75, 70], [128, 112]], np.int32)
    cv2.fillPoly(image, [roof], (120, 60, 50))
    cv2.fillPoly(labels, [roof], ADE_ROOF)
    roof_mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(roof_mask, [roof], 1)
    depth[roof_mask > 0] = 6200.0
    cv2.rectangle(image, (60, 150), (85, 200), (90, 50, 30), -1)  # door
    for x in (40, 95):
        cv2.rectangle(image, (x, 125), (x + 18, 143), (230, 240, 255), -1)  # windows
        cv2.line(image, (x + 9, 125), (x + 9, 143), (90, 50, 30), 2)

    cv2.rectangle(image, (150, 150), (158, 200), (100, 70, 40), -1)  # tree trunk
    cv2.circle(image, (154, 125), 28, (40, 120, 50), -1)
    cv2.rectangle(labels, (150, 150), (158, 200), ADE_TREE, -1)
    cv2.circle(labels, (154, 125), 28, ADE_TREE, -1)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    crown = (xx - 154) ** 2 + (yy - 125) ** 2 <= 28**2
    depth[crown] = 5000.0 - 40.0 * np.sqrt(np.maximum(0, 28**2 - (xx - 154) ** 2 - (yy - 125) ** 2))[crown]
    depth[150:201, 150:159] = 5000.0

    person = np.zeros((SIZE, SIZE), np.uint8)  # a simple figure following the keypoints
    for a, b in [(1, 8), (1, 11), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (11, 12), (12, 13), (2, 5)]:
        cv2.line(person, PERSON[a], PERSON[b], 1, 6)
    cv2.circle(person, PERSON[0], 9, 1, -1)
    image[person > 0] = (230, 80, 160)
    labels[person > 0] = ADE_PERSON
    depth[person > 0] = 3000.0

    keypoints = {
        "canvas_width": SIZE,
        "canvas_height": SIZE,
        "people": [{"pose_keypoints_2d": [v for x, y in PERSON for v in (x, y, 0.95)]}],
    }
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(mask, (154, 125), 34, 255, -1)  # repaint the tree crown
    return image, np.round(depth).astype(np.uint16), labels, keypoints, mask


def tile(img: np.ndarray, label: str, font: ImageFont.ImageFont) -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE + LABEL_H), (255, 255, 255))
    canvas.paste(Image.fromarray(img), (0, LABEL_H))
    ImageDraw.Draw(canvas).text((4, 3), label, fill=(0, 0, 0), font=font)
    return canvas


def save_grid(out: Path, cells: list[tuple[str, np.ndarray]], columns: int = 4) -> None:
    font = ImageFont.load_default(size=14)
    rows = (len(cells) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (SIZE + 4), rows * (SIZE + LABEL_H + 4)), (255, 255, 255))
    for i, (label, img) in enumerate(cells):
        r, c = divmod(i, columns)
        grid.paste(tile(img, label, font), (c * (SIZE + 4), r * (SIZE + LABEL_H + 4)))
    save_png(out, grid, {"made_by": "scripts/annotator_grid.py"})
    print(f"wrote {out}")


def detector_cells(image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Every neural detector on ``image``, with stand-in weights (see the module docstring)."""
    repo = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(repo / "tests"), str(repo)]
    from fixture_weights import write_released_weights  # noqa: E402 - test helpers: the weight recipe
    from test_hf_detectors import build_tiny  # noqa: E402
    from test_openpose import write_released_openpose  # noqa: E402

    folder = Path(tempfile.mkdtemp(prefix="detector-grid-"))
    cells = [("input photo", image)]
    for name in ("hed", "pidinet", "lineart", "lineart_coarse", "mlsd"):
        cells.append((f"{name} (stand-in weights)",
                      annotators.annotate(name, image, weights=str(write_released_weights(name, folder)))))
    real_tiny = repo.parent / "shared" / "fixtures" / "annotators" / "real" / "mlsd_tiny_512_fp32.pth"
    if real_tiny.is_file():
        cells.append(("mlsd --model tiny (real weights)",
                      annotators.annotate("mlsd", image, model="tiny", weights=str(real_tiny))))
    body = write_released_openpose("openpose", folder)
    cells.append(("openpose (stand-in weights)", annotators.annotate("openpose", image, weights=str(body))))
    tiny = {name: build_tiny(name, folder / name) for name in ("dpt_hybrid", "oneformer", "vitpose", "rtdetr")}
    cells.append(("depth (tiny random DPT)", annotators.annotate("depth", image, weights=str(tiny["dpt_hybrid"]))))
    cells.append(("normal (tiny random DPT)", annotators.annotate("normal", image, weights=str(tiny["dpt_hybrid"]))))
    cells.append(("segmentation (tiny OneFormer)",
                  annotators.annotate("segmentation", image, weights=str(tiny["oneformer"]))))
    cells.append(("pose (tiny RT-DETR + ViTPose)", annotators.annotate(
        "pose", image, weights=str(tiny["vitpose"]), detector_weights=str(tiny["rtdetr"]), keypoint_threshold=0.0)))
    return cells


def main(out_dir: Path) -> None:
    image, depth_mm, labels, keypoints, mask = scene()
    depth_view = (255 - (depth_mm.astype(np.float64) - depth_mm.min()) / np.ptp(depth_mm) * 255).astype(np.uint8)
    cells = [
        ("input image", image),
        ("input: 16-bit depth (mm)", np.repeat(depth_view[..., None], 3, axis=2)),
        ("input: inpaint mask", np.repeat(mask[..., None], 3, axis=2)),
        ("canny", annotators.annotate("canny", image)),
        ("lines", annotators.annotate("lines", image)),
        ("softedge", annotators.annotate("softedge", image)),
        ("scribble (seed 0)", annotators.annotate("scribble", image, seed=0)),
        ("invert", annotators.annotate("invert", image)),
        ("shuffle (seed 0)", annotators.annotate("shuffle", image, seed=0, cell=64)),
        ("tile (8x)", annotators.annotate("tile", image)),
        ("inpaint", annotators.annotate("inpaint", image, mask=mask)),
        ("pose_json (OpenPose JSON)", annotators.annotate("pose_json", image, keypoints=keypoints)),
        ("segmentation_map (ADE20K)", annotators.annotate("segmentation_map", labels)),
        ("depth_map (near = bright)", annotators.annotate("depth_map", depth_mm)),
        ("normal_map (from depth)", annotators.annotate("normal_map", depth_mm, bg_threshold=0.05)),
        ("segmentation_map (COCO-Stuff)", annotators.annotate("segmentation_map", labels, palette="cocostuff")),
    ]
    save_grid(out_dir / "annotators_grid.png", cells)
    save_grid(out_dir / "detectors_grid.png", detector_cells(image))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs")
