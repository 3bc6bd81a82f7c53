"""`controlnet data examples DIR`: first inputs for the README's examples, which the embedded model takes as they
are."""

from __future__ import annotations

import numpy as np
from PIL import Image

from controlnet.cli import main
from controlnet.data.fill import COLOURS, condition_disk, fill_iou
from controlnet.defaults import FILL_SIZE
from controlnet.errors import EXIT_BAD_INPUT


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_examples_are_a_condition_its_picture_a_photo_and_a_mask_over_the_photos_circle(tmp_path, capsys):
    from controlnet.commands.data import EXAMPLE_CIRCLE, EXAMPLE_FILES, EXAMPLE_PHOTO

    folder = tmp_path / "examples"
    assert main(["data", "examples", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXAMPLE_FILES)
    circle, picture, photo, mask = (_read(folder / n) for n in ("circle.png", "picture.png", "photo.png", "mask.png"))
    assert circle.shape == picture.shape == photo.shape == (FILL_SIZE, FILL_SIZE, 3) and mask.shape == (FILL_SIZE,) * 2
    assert fill_iou(picture, circle, "red circle with yellow background") > 0.95  # the picture the condition draws
    yy, xx = np.mgrid[:FILL_SIZE, :FILL_SIZE]
    centre = condition_disk(circle)[EXAMPLE_CIRCLE["cy"], EXAMPLE_CIRCLE["cx"]]
    assert centre  # the outline closes around its centre
    photo_disk = (xx - EXAMPLE_PHOTO["cx"]) ** 2 + (yy - EXAMPLE_PHOTO["cy"]) ** 2 <= EXAMPLE_PHOTO["radius"] ** 2
    assert (mask[photo_disk] == 255).all() and set(np.unique(mask)) == {0, 255}
    assert (photo[photo_disk] == COLOURS["blue"]).all(axis=-1).mean() > 0.95  # a blue circle ...
    assert (photo[~(mask > 0)] == COLOURS["white"]).all()  # ... on white, all of it under the mask
    jpg = _read(folder / "photo.jpg").astype(int)
    assert np.abs(jpg - photo).mean() < 2  # the same photo, as JPEG
    capsys.readouterr()
    assert main(["data", "examples", str(folder)]) == EXIT_BAD_INPUT  # nothing is overwritten
    assert "already holds circle.png" in capsys.readouterr().err


def test_the_embedded_model_inpaints_the_example_photo_under_the_example_condition(tmp_path):
    folder, out = tmp_path / "examples", tmp_path / "out"
    assert main(["data", "examples", str(folder), "-q"]) == 0
    assert main(["generate", "--prompt", "red circle with yellow background", "--init-image", str(folder / "photo.png"),
                 "--mask", str(folder / "mask.png"), "--controlnet", "fill", "--control", str(folder / "circle.png"),
                 "--steps", "2", "--out", str(out), "-q"]) == 0
    with Image.open(out / "00000-0.png") as im:
        assert im.size == (FILL_SIZE, FILL_SIZE)
