"""OpenPose (``openpose``, ``openpose_hand``): our body and hand networks, loaded from files in the released flat-key
layout, reproduce the reference outputs stored in tests/fixtures/annotators (see its README); the keypoint
extraction (peaks, PAF limb scores, grouping into people, hand boxes, hand peaks) gives known answers on
synthetic heatmaps and PAFs; the annotators write OpenPose JSON that ``pose_json`` draws identically; bad weights
are refused in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_checks import offline_hub, refused_in_one_line
from controlnet import annotators
from controlnet.annotators import openpose as op
from controlnet.annotators.networks import load_network
from controlnet.annotators.networks import openpose as nets
from controlnet.cli import main
from controlnet.errors import UserError
from fixture_weights import FIXTURES, fixture_weights, load_io, state_dict_digest

MAX_ABS = 1e-4  # the bound on raw outputs against the reference implementation


def _registered() -> None:
    if "openpose" not in annotators.REGISTRY:
        op.register_photo_detectors(annotators.register)


def write_released_openpose(annotator: str, folder: Path) -> Path:
    """Stand-in weights of ``annotator`` ("openpose": the body net; "openpose_hand": the hand net) saved as the
    released file stores them: flat layer names (fixture README, openpose_*)."""
    fixture, filename = {"openpose": ("openpose_body", op.BODY_FILE), "openpose_hand": ("openpose_hand", op.HAND_FILE)}[annotator]
    released = {nets.released_key(k): v for k, v in fixture_weights(fixture).items()}
    torch.save(released, folder / filename)
    return folder / filename


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("openpose")
    return {"openpose_body": write_released_openpose("openpose", folder),
            "openpose_hand": write_released_openpose("openpose_hand", folder)}


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    return {f: load_io(FIXTURES / f / "io.safetensors") for f in ("openpose_body", "openpose_hand")}


# --------------------------------------------------------------------------- the networks against the fixtures


@pytest.mark.parametrize("fixture", ["openpose_body", "openpose_hand"])
def test_released_layout_and_stand_in_weights(fixture, reference):
    """The recipe rebuilds the reference weights bit for bit; the flat released keys map onto the model's keys."""
    recipe = fixture_weights(fixture)
    assert state_dict_digest(recipe) == reference[fixture][1]["weights_sha256"]
    released = json.loads((FIXTURES / fixture / "released_keys.json").read_text())
    assert [nets.released_key(k) for k in recipe] == list(released)
    to_model = nets.body_state_dict if fixture == "openpose_body" else nets.hand_state_dict
    mapped = to_model({nets.released_key(k): v for k, v in recipe.items()} | {"unused.weight": torch.zeros(1)})
    assert list(mapped) == list(recipe)  # every key, in the model's order; unknown keys dropped as util.transfer
    model = nets.BodyPoseNet() if fixture == "openpose_body" else nets.HandPoseNet()
    assert list(model.state_dict()) == list(recipe)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == json.loads(
        (FIXTURES / fixture / "keys.json").read_text())


@pytest.mark.parametrize("fixture", ["openpose_body", "openpose_hand"])
def test_network_reproduces_reference_outputs(fixture, weight_files, reference):
    """Loaded from the released layout, each network holds the recipe's tensors and reproduces the raw reference
    outputs within 1e-4 (max abs)."""
    model = load_network(fixture, weight_files[fixture])
    recipe = fixture_weights(fixture)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in recipe.items())
    tensors, meta = reference[fixture]
    with torch.no_grad():
        outputs = model(tensors["input"])
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    names = meta["outputs"].split(",")
    errors = {n: (o - tensors[n]).abs().max().item() for n, o in zip(names, outputs, strict=True)}
    assert max(errors.values()) <= MAX_ABS, errors


def test_final_heatmap_relu_quirk_is_kept(reference):
    """model.py's ``no_relu_layers`` names Mconv7_stage6_L1 twice and omits Mconv7_stage6_L2: the body's final
    heatmaps go through a ReLU, its PAFs and every other branch end do not."""
    body = nets.BodyPoseNet()
    assert isinstance(body.model6_2[-1], torch.nn.ReLU) and isinstance(body.model6_1[-1], torch.nn.Conv2d)
    assert all(isinstance(getattr(body, f"model{s}_2")[-1], torch.nn.Conv2d) for s in range(1, 6))
    assert all(isinstance(getattr(nets.HandPoseNet(), f"model{s}")[-1], torch.nn.Conv2d) for s in range(2, 7))
    tensors, _ = reference["openpose_body"]
    assert tensors["heatmap"].min() >= 0 and tensors["paf"].min() < 0


def test_network_inputs_are_prepared_as_upstream(reference):
    """From the stored RGB image: body input = BGR scaled to height 184 (0.5 x 368), padded to a multiple of 8,
    / 256 - 0.5; hand input = BGR blurred (sigma 0.8) then scaled to 184 x 184. Both exactly the stored tensors."""
    body, _ = reference["openpose_body"]
    bgr = np.ascontiguousarray(body["image_rgb_u8"].numpy()[:, :, ::-1])
    h, w = bgr.shape[:2]
    scale = nets.BODY_SCALE * nets.BOX_SIZE / h
    x, pad = nets.network_input(nets.smart_resize(bgr, h * scale, w * scale))
    assert torch.equal(x, body["input"]) and list(pad) == body["pad"][2:].tolist()
    hand, _ = reference["openpose_hand"]
    blurred = nets.cv2.GaussianBlur(bgr, (0, 0), nets.HAND_BLUR_SIGMA)
    side = nets.HAND_SCALES[0] * nets.BOX_SIZE
    x, _ = nets.network_input(nets.smart_resize(blurred, side, side))
    assert torch.equal(x, hand["input"])


def test_maps_come_back_at_the_image_size(weight_files):
    """The network's stride-8 maps are brought back to the image's own size (here 100 x 150, with padding)."""
    model = load_network("openpose_body", weight_files["openpose_body"])
    rng = np.random.default_rng(0)
    heat, paf = nets.body_maps(model, rng.integers(0, 255, (100, 150, 3), dtype=np.uint8))
    assert heat.shape == (100, 150, 19) and paf.shape == (100, 150, 38) and heat.dtype == np.float64


# --------------------------------------------------------------------------- keypoints from maps, known answers

# Two people (COCO-18 x, y); the second has no left arm. Limbs are shorter than half the image height, so no
# distance penalty applies.
PERSON_A = {
    0: (90, 40), 1: (90, 70), 2: (70, 70), 3: (60, 100), 4: (55, 130), 5: (110, 70), 6: (120, 100), 7: (125, 130),
    8: (80, 130), 9: (78, 155), 10: (76, 180), 11: (100, 130), 12: (102, 155), 13: (104, 180),
    14: (85, 35), 15: (95, 35), 16: (80, 38), 17: (100, 38),
}  # fmt: skip
PERSON_B = {k: (x + 150, y + 2) for k, (x, y) in PERSON_A.items() if k not in (5, 6, 7)}
HEIGHT, WIDTH = 192, 320  # multiples of 64: the detection size of a 384 x 640 photo


def _blob(h: int, w: int, x: float, y: float, sigma: float, amplitude: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return amplitude * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def synthetic_maps(people: list[dict[int, tuple[int, int]]],
                   skip_limbs: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps ``(H, W, 19)`` with a unit Gaussian at each part, PAFs ``(H, W, 38)`` holding each limb's unit
    vector within 2 px of the segment (limbs in ``skip_limbs`` left empty)."""
    heat = np.zeros((HEIGHT, WIDTH, 19))
    paf = np.zeros((HEIGHT, WIDTH, 38))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for person in people:
        for part, (x, y) in person.items():
            heat[:, :, part] += _blob(HEIGHT, WIDTH, x, y, 3.0)
        for limb, ((a, b), (cx, cy)) in enumerate(zip(op.LIMB_PARTS, op.LIMB_PAF)):
            if limb in skip_limbs or a not in person or b not in person:
                continue
            (xa, ya), (xb, yb) = person[a], person[b]
            length = math.hypot(xb - xa, yb - ya)
            ux, uy = (xb - xa) / length, (yb - ya) / length
            t = np.clip(((xx - xa) * ux + (yy - ya) * uy) / length, 0, 1)
            near = np.hypot(xx - (xa + t * (xb - xa)), yy - (ya + t * (yb - ya))) <= 2.0
            paf[near, cx], paf[near, cy] = ux, uy
    return heat, paf


def _people(heat: np.ndarray, paf: np.ndarray) -> list[np.ndarray]:
    peaks = op.find_peaks(heat)
    grouped = op.group_people(peaks, op.connect_limbs(peaks, paf, HEIGHT))
    return sorted(op.body_keypoints(peaks, grouped), key=lambda body: body[:, 0].max())


def _expected(person: dict[int, tuple[int, int]]) -> np.ndarray:
    out = np.zeros((18, 3))
    for part, (x, y) in person.items():
        out[part] = (x, y, 1.0)
    return out


def test_peaks_are_found_at_the_blob_centres():
    heat, _ = synthetic_maps([PERSON_A, PERSON_B])
    peaks = op.find_peaks(heat)
    for part in range(18):
        want = sorted((y, x) for person in (PERSON_A, PERSON_B) if part in person for x, y in [person[part]])
        assert sorted((int(y), int(x)) for x, y in peaks[part][:, :2]) == want
        assert np.allclose(peaks[part][:, 2], 1.0)
    ids = np.concatenate([p[:, 3] for p in peaks])
    assert np.array_equal(ids, np.arange(len(ids)))  # numbered part by part, row by row


def test_two_people_are_grouped_with_exact_keypoints():
    heat, paf = synthetic_maps([PERSON_A, PERSON_B])
    people = _people(heat, paf)
    assert len(people) == 2
    np.testing.assert_allclose(people[0], _expected(PERSON_A), atol=1e-12)
    np.testing.assert_allclose(people[1], _expected(PERSON_B), atol=1e-12)


def test_limb_without_paf_support_is_not_connected():
    """No PAF along the right forearm (limb 3, elbow → wrist): both right wrists stay out of their people."""
    heat, paf = synthetic_maps([PERSON_A, PERSON_B], skip_limbs=(3,))
    people = _people(heat, paf)
    for person, body in zip((PERSON_A, PERSON_B), people):
        want = _expected({k: v for k, v in person.items() if k != 4})
        np.testing.assert_allclose(body, want, atol=1e-12)


def test_limb_score_votes_and_distance_prior():
    """A limb along a uniform PAF scores its mean projection; one longer than half the image height is penalised
    by ``0.5 H / length - 1``; votes against the PAF fail."""
    paf_x, paf_y = np.ones((200, 300)), np.zeros((200, 300))
    score, ok = op.limb_score(np.array([10.0, 50.0]), np.array([60.0, 50.0]), paf_x, paf_y, 200)
    assert ok and score == pytest.approx(1.0)
    score, ok = op.limb_score(np.array([10.0, 50.0]), np.array([260.0, 50.0]), paf_x, paf_y, 200)
    assert ok and score == pytest.approx(1.0 + 0.5 * 200 / 250 - 1)
    score, ok = op.limb_score(np.array([60.0, 50.0]), np.array([10.0, 50.0]), paf_x, paf_y, 200)
    assert not ok and score == pytest.approx(-1.0)


def test_partial_people_are_merged_through_the_ear_limbs():
    """Without a neck, arms and head start as separate partial people; the shoulder → ear limbs (searched last)
    merge them. The legs (3 parts each) are dropped."""
    person = {k: v for k, v in PERSON_A.items() if k != 1}
    heat, paf = synthetic_maps([person])
    people = _people(heat, paf)
    assert len(people) == 1
    kept = {k: v for k, v in person.items() if k not in (8, 9, 10, 11, 12, 13)}
    np.testing.assert_allclose(people[0], _expected(kept), atol=1e-12)


def test_people_with_few_parts_are_dropped():
    head = {k: PERSON_A[k] for k in (0, 14, 16)}  # nose, right eye, right ear: 3 parts
    heat, paf = synthetic_maps([PERSON_A, {k: (x + 170, y) for k, (x, y) in head.items()}])
    people = _people(heat, paf)
    assert len(people) == 1
    np.testing.assert_allclose(people[0], _expected(PERSON_A), atol=1e-12)


def test_hand_boxes_follow_handdetect():
    """Box centre 0.33 forearm beyond the wrist, side 1.5 x max(forearm, 0.9 upper arm), clipped to the image,
    skipped under 20 px; left hand first."""
    body = np.zeros((18, 3))
    body[[5, 6, 7], :2] = [(100, 100), (100, 140), (100, 180)]  # left arm, straight down: forearm 40
    body[[2, 3, 4], :2] = [(200, 100), (200, 150), (200, 160)]  # right arm: forearm 10, upper arm 50
    found = np.zeros(18, bool)
    found[[2, 3, 4, 5, 6, 7]] = True
    # left: centre (100, 193.2), side 60 → (70, 163.2); right: side 1.5 * 45 = 67.5, centre (200, 163.3)
    assert op.hand_boxes(body, found, 300, 300) == [(70, 163, 60, True), (166, 129, 67, False)]
    # near the bottom edge the box is clipped to the image: side = 200 - 163.2
    assert op.hand_boxes(body, found, 300, 200)[0] == (70, 163, 36, True)
    found[7] = False  # no left wrist: no left box
    assert [box[3] for box in op.hand_boxes(body, found, 300, 300)] == [False]
    body[[2, 3, 4], :2] = [(200, 100), (200, 108), (200, 112)]  # tiny arm: side 12 < 20
    assert op.hand_boxes(body, found, 300, 300) == []


def test_hand_keypoints_take_the_strongest_region():
    """Per keypoint: the maximum of the 8-connected region with the largest heatmap sum, scaled from 128 px to
    the crop (truncated); nothing above 0.05, or a peak on the crop's top row / left column, is missing."""
    size = nets.HAND_MAP_SIZE
    heat = np.zeros((size, size, 22))
    centres = {k: (10 + 5 * k, 20 + 4 * k) for k in range(21)}  # (col, row)
    for k, (col, row) in centres.items():
        heat[:, :, k] = _blob(size, size, col, row, 2.0)
    heat[:, :, 0] += _blob(size, size, 100, 100, 1.0, amplitude=1.5)  # higher peak, smaller region sum
    heat[:, :, 5] = 0.0  # not found
    heat[:, :, 6] = _blob(size, size, 0, 60, 2.0)  # peak on the left column
    points = op.hand_keypoints(heat, 64, 96)  # crop 64 rows x 96 columns
    for k, (col, row) in centres.items():
        if k in (5, 6):
            assert points[k].tolist() == [0, 0, 0]
        else:
            assert points[k].tolist() == [int(col * 96 / size), int(row * 64 / size), 1.0]


def test_gaussian_smoothing_matches_scipy_definition():
    """A unit impulse spreads into the normalised kernel exp(-x^2 / 2 sigma^2), radius int(4 sigma + 0.5) = 12;
    borders reflect half-sample symmetric (d c b a | a b c d)."""
    impulse = np.zeros((41, 41))
    impulse[20, 20] = 1.0
    out = op.gaussian_smooth(impulse, 3.0)
    x = np.arange(-12, 13)
    k = np.exp(-0.5 * x**2 / 9.0)
    k /= k.sum()
    np.testing.assert_allclose(out[8:33, 8:33], np.outer(k, k), atol=1e-15)
    assert out[:8].max() == 0 and out[33:].max() == 0
    edge = np.zeros((30, 30))
    edge[0, 15] = 1.0
    out = op.gaussian_smooth(edge, 3.0)
    column = out[:, 15] / k[12]  # reflected: row r gets k[r] + k[r + 1] (the mirror image sits at row -1)
    np.testing.assert_allclose(column[:12], k[12:24] + k[13:25], atol=1e-15)


# --------------------------------------------------------------------------- the annotators


@pytest.fixture(scope="module")
def photo(tmp_path_factory, reference) -> Path:
    path = tmp_path_factory.mktemp("input") / "synthetic.png"
    Image.fromarray(reference["openpose_body"][0]["image_rgb_u8"].numpy()).save(path)
    return path


def test_openpose_writes_json_that_pose_json_draws_identically(weight_files, photo, tmp_path):
    """With the stand-in weights the people are meaningless, but the plumbing is exact: the skeleton picture
    equals the pose_json drawing of the written JSON, in the photo's pixels."""
    _registered()
    out, doc_path = tmp_path / "pose.png", tmp_path / "pose.json"
    args = ["annotate", "openpose", str(photo), str(out), "--weights", str(weight_files["openpose_body"]),
            "--detect_resolution", "128", "--json", str(doc_path), "-q"]
    assert main(args) == 0
    doc = json.loads(doc_path.read_text())
    assert doc["canvas_width"] == 256 and doc["canvas_height"] == 256 and len(doc["people"]) >= 1
    assert all(len(p["pose_keypoints_2d"]) == 54 for p in doc["people"])
    again = annotators.get("pose_json")(str(photo), keypoints=str(doc_path))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), again)
    assert np.asarray(Image.open(out)).any()


def test_openpose_hand_places_hands_in_photo_pixels(monkeypatch, tmp_path):
    """The body and hand maps mocked at the network boundary (one synthetic person, one hand blob per keypoint):
    the hand keypoints land in the box beyond each wrist, scaled back to the photo's size."""
    person = dict(PERSON_A)
    heat, paf = synthetic_maps([person])
    size = nets.HAND_MAP_SIZE
    hand_heat = np.zeros((size, size, 22))
    for k in range(21):
        hand_heat[:, :, k] = _blob(size, size, 40 + 2 * k, 50 + k, 2.0)
    monkeypatch.setattr(nets, "body_maps", lambda net, bgr: (heat, paf))
    monkeypatch.setattr(nets, "hand_heatmaps", lambda net, crop: hand_heat)
    monkeypatch.setattr(op, "_net", lambda name, path, device: name)
    monkeypatch.setattr(op, "weights_file", lambda name, weights: Path(name))
    photo = np.zeros((HEIGHT * 2, WIDTH * 2, 3), np.uint8)  # detection at half size (200 x 320)
    doc = op.detect_pose(photo, detect_resolution=HEIGHT, hands=True)
    (p,) = doc["people"]
    body = np.array(p["pose_keypoints_2d"]).reshape(18, 3)
    np.testing.assert_allclose(body, _expected(person) * [2, 2, 1])
    boxes = op.hand_boxes(_expected(person), np.ones(18, bool), WIDTH, HEIGHT)
    for x, y, side, is_left in boxes:
        hand = np.array(p["hand_left_keypoints_2d" if is_left else "hand_right_keypoints_2d"]).reshape(21, 3)
        want = [[2 * (x + int((40 + 2 * k) * side / size)), 2 * (y + int((50 + k) * side / size)), 1.0]
                for k in range(21)]
        np.testing.assert_allclose(hand, want)
    assert len(boxes) == 2


def _bad(args: list[str], capsys, out: Path) -> str:
    return refused_in_one_line(main(["annotate", *args, "-q"]), capsys, out)


def test_wrong_or_corrupt_weights_are_refused_in_one_line(weight_files, photo, tmp_path, capsys):
    _registered()
    out, doc = tmp_path / "out.png", tmp_path / "out.json"
    err = _bad(["openpose", str(photo), str(out), "--weights", str(weight_files["openpose_hand"]),
                "--json", str(doc)], capsys, out)
    assert "OpenPose hand file (hand_pose_model.pth)" in err and "OpenPose body weights (body_pose_model.pth)" in err
    assert not doc.exists()
    err = _bad(["openpose_hand", str(photo), str(out), "--weights", str(weight_files["openpose_body"]),
                "--hand_weights", str(weight_files["openpose_body"])], capsys, out)
    assert "OpenPose body file" in err and "OpenPose hand weights" in err
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    err = _bad(["openpose", str(photo), str(out), "--weights", str(tmp_path / "corrupt.pth")], capsys, out)
    assert "corrupt.pth" in err
    truncated = {k: v for k, v in torch.load(weight_files["openpose_body"]).items() if "stage6" not in k}
    torch.save(truncated, tmp_path / "partial.pth")
    err = _bad(["openpose", str(photo), str(out), "--weights", str(tmp_path / "partial.pth")], capsys, out)
    assert "missing" in err and "model6_1.Mconv1_stage6_L1.weight" in err


def test_missing_weights_offline_name_repo_file_and_command(photo, tmp_path, capsys, monkeypatch):
    _registered()
    offline_hub(monkeypatch, tmp_path / "empty")
    out = tmp_path / "out.png"
    err = _bad(["openpose", str(photo), str(out)], capsys, out)
    assert "`hf download lllyasviel/Annotators body_pose_model.pth`" in err


def test_default_weights_come_from_a_prepared_hub_cache_offline(weight_files, photo, tmp_path, monkeypatch,
                                                               capsys):
    """Without --weights the released files come from lllyasviel/Annotators in the hub cache; the hand file is
    taken from the same repository as a body file given by hub id; --list reports both cached."""
    from hubcache import add_to_hub_cache

    _registered()
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "lllyasviel/Annotators", {op.BODY_FILE: weight_files["openpose_body"],
                                                      op.HAND_FILE: weight_files["openpose_hand"]})
    offline_hub(monkeypatch, cache)
    out, local = tmp_path / "hub.png", tmp_path / "local.png"
    assert main(["annotate", "openpose", str(photo), str(out), "--detect_resolution", "64", "-q"]) == 0
    assert main(["annotate", "openpose", str(photo), str(local), "--detect_resolution", "64", "--weights",
                 str(weight_files["openpose_body"]), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(local)))
    hand = op._hand_weights_file("lllyasviel/Annotators/body_pose_model.pth", "")
    assert hand.name == op.HAND_FILE and hand.read_bytes() == weight_files["openpose_hand"].read_bytes()
    capsys.readouterr()
    assert main(["annotate", "--list", "openpose_hand"]) == 0
    listing = capsys.readouterr().out
    assert "weights cached (lllyasviel/Annotators: body_pose_model.pth, hand_pose_model.pth)" in listing


def test_hand_weights_are_found_beside_the_body_weights(weight_files, tmp_path):
    assert op._hand_weights_file(str(weight_files["openpose_body"]), "") == weight_files["openpose_hand"]
    assert op._hand_weights_file(str(weight_files["openpose_body"].parent), "") == weight_files["openpose_hand"]
    with pytest.raises(UserError, match="has no hand_pose_model.pth"):
        (tmp_path / "empty").mkdir()
        op._hand_weights_file(str(weight_files["openpose_body"]), str(tmp_path / "empty"))
