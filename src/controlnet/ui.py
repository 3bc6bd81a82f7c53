"""The web UI (``controlnet ui``): the original gradio demos' controls and up to three ControlNet units in one page.

Two layers, so the logic is testable without a browser or even without gradio:

- :class:`UiBackend` holds the loaded :class:`~controlnet.pipeline.Pipeline` and implements the page's actions
  (generate, preview a condition) on plain Python values. Bad input never escapes as a traceback: a
  :class:`~controlnet.errors.UserError` (wrong file, wrong family, missing image...) becomes the one-line message
  shown in the page's status box.
- :func:`build_app` lays the page out with gradio and wires the widgets to the backend; :func:`launch` serves it.

gradio is an optional dependency (``pip install 'controlnet-kit[ui]'``), imported only inside the functions that
need it. The server binds to 127.0.0.1 unless told otherwise, and sends nothing to the network (gradio's
analytics and the Hugging Face Hub's telemetry are switched off before gradio is imported).

What a client can reach (:class:`UiConfig`): the PNGs the UI wrote, in a folder it created for this run (never
the rest of ``--outputs``); models by bundled name, hub id (from the Hugging Face cache) or path inside a
``--models-dir`` (any path only with ``--allow-any-path``), regular files only, and the same message whether or
not a refused path exists (:mod:`controlnet.untrusted`); ``<lora:NAME>`` tags only by name in the first
``--models-dir``; no annotator parameter that names a file. Bounded: request bodies (:class:`RequestSizeLimit`),
generations (one at a time, each refused before it starts or stopped at a step boundary when it would pass
``--timeout``), LoRAs kept loaded for prompt tags (:data:`MAX_PROMPT_LORAS`). A ``--host`` other than loopback
is announced with a warning, and ``--auth USER:PASSWORD`` asks for a login. docs/security.md has the whole list.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from controlnet.defaults import (
    CONTROL_MODES, DEFAULT_DENOISE, DEFAULT_GUIDANCE, DEFAULT_HIRES_DENOISE, DEFAULT_HIRES_SCALE,
    DEFAULT_INPAINT_PADDING, DEFAULT_MASK_BLUR, DEFAULT_SCHEDULER, DEFAULT_STEPS, HIRES_UPSCALERS, MAX_NUM_IMAGES,
    SCHEDULERS,
)
from controlnet.errors import UserError
from controlnet.hub import spelled_as_hub_id
from controlnet.untrusted import resolve_untrusted_input

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # local only; pass --host 0.0.0.0 to serve the network
DEFAULT_PORT = 7860  # gradio's customary port
MAX_UNITS = 3  # ControlNet units on the page (the A1111 extension's default "multi ControlNet" count)
NO_ANNOTATOR = "none"
SEED_RANDOM = -1
SEED_MAX = 2**31 - 1  # seeds drawn for SEED_RANDOM lie in [0, SEED_MAX]; any seed in 0..2**63-1 is allowed
FLOW_SCHEDULER = "flow-matching Euler"  # a Flux or SD3 base's one sampler, as the scheduler dropdown shows it
DEFAULT_TIMEOUT = 600.0  # seconds a generation may run before it is stopped (--timeout)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "50mb"  # largest upload gradio accepts (a condition image; 50 MB holds any photo)
MAX_UPLOAD_BODY = 50 * 1000**2 + 2**20  # bytes of an upload request: MAX_UPLOAD (gradio counts 1 MB = 10**6) + 1 MiB
MAX_REQUEST_BODY = 2**20  # bytes of any other request: the page sends text and settings; images travel as uploads
UPLOAD_ROUTE = "/gradio_api/upload"  # gradio's upload endpoint (gradio.route_utils.API_PREFIX + "/upload")
MAX_PROMPT_LORAS = 8  # LoRAs named by prompt tags kept loaded between generations (least recently used go first)

# The demos' n_prompt (used for real bases; the embedded model gets none, as controlnet.demo).
DEFAULT_NEGATIVE = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
                    "worst quality, low quality")
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_STRENGTH = 2.0  # the demos' "Control Strength" slider goes to 2.0
MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 2048, 8  # sizes must be multiples of the VAE's 8x downsampling

INSTALL_HINT = "pip install 'controlnet-kit[ui]'"

ProgressFn = Callable[[float, str], None]  # (fraction done in [0, 1], description)


# --------------------------------------------------------------------------- the page's values


@dataclass
class UnitInput:
    """What one ControlNet unit's widgets hold (in the order the page passes them)."""

    enabled: bool = False
    model: str | None = None  # a bundled ControlNet name (the dropdown)
    model_path: str = ""  # a file or folder on the server; overrides ``model`` when given
    image: Any = None  # PIL image / array / path, or None when nothing was uploaded
    annotator: str = NO_ANNOTATOR
    annotator_params: str = ""  # "key=value, key=value" (see split_params)
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: str = "balanced"
    control_type: str = ""  # a union ControlNet's condition type ("depth", ...); empty for other models


UNIT_FIELDS = tuple(f.name for f in dataclasses.fields(UnitInput))


@dataclass
class ImageToImageInput:
    """The "Image to image / inpaint" tab: a picture (with a mask drawn over it, or uploaded) and its settings."""

    enabled: bool = False
    picture: Any = None  # gradio ImageEditor value {"background", "layers", "composite"}, or an image
    mask: Any = None  # an uploaded mask (white = repaint); else the strokes drawn on the picture
    denoise: float = DEFAULT_DENOISE
    mask_blur: float = DEFAULT_MASK_BLUR
    mask_invert: bool = False
    full_res: bool = False
    padding: int = DEFAULT_INPAINT_PADDING


@dataclass
class HiresInput:
    """The hires fix options (text-to-image)."""

    enabled: bool = False
    scale: float = DEFAULT_HIRES_SCALE
    denoise: float = DEFAULT_HIRES_DENOISE
    steps: int = 0  # 0: the generation's steps
    upscaler: str = "latent"


IMAGE_FIELDS = tuple(f.name for f in dataclasses.fields(ImageToImageInput))
HIRES_FIELDS = tuple(f.name for f in dataclasses.fields(HiresInput))


@dataclass
class GenerateRequest:
    """The page's global settings and its units."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = SEED_RANDOM
    width: int = 512
    height: int = 512
    num_images: int = 1
    guess_mode: bool = False
    units: list[UnitInput] = dataclasses.field(default_factory=list)
    img2img: ImageToImageInput = dataclasses.field(default_factory=ImageToImageInput)
    hires: HiresInput = dataclasses.field(default_factory=HiresInput)


GLOBAL_FIELDS = tuple(f.name for f in dataclasses.fields(GenerateRequest) if f.name not in ("units", "img2img", "hires"))


@dataclass
class GenerateOutcome:
    """What the page shows after Generate: saved PNG paths (with captions), the seed used, a status line."""

    images: list[tuple[str, str]]  # (path, caption)
    files: list[str]
    seed: int | None
    status: str
    ok: bool
    conditions: dict[int, Any] = dataclasses.field(default_factory=dict)  # unit index → condition used (PIL)


@dataclass
class Example:
    """A one-click example: a prompt and a condition image for unit 1 with its ControlNet and guidance."""

    prompt: str
    image: str  # path of the condition image
    controlnet: str
    guidance: float


def request_from_values(values: Sequence[Any], num_units: int = MAX_UNITS) -> GenerateRequest:
    """A :class:`GenerateRequest` from the flat widget values the page sends (globals, then each unit's fields)."""
    n_global, n_unit = len(GLOBAL_FIELDS), len(UNIT_FIELDS)
    if len(values) != n_global + num_units * n_unit:
        raise ValueError(f"expected {n_global} + {num_units} x {n_unit} values, got {len(values)}")
    request = GenerateRequest(**dict(zip(GLOBAL_FIELDS, values[:n_global])))
    for i in range(num_units):
        chunk = values[n_global + i * n_unit : n_global + (i + 1) * n_unit]
        request.units.append(UnitInput(**dict(zip(UNIT_FIELDS, chunk))))
    return request


def editor_picture_and_mask(value: Any) -> tuple[Any, Any]:
    """(picture, mask) of the img2img tab's editor: its background, and where anything was drawn on its layers
    (any alpha) as a white-on-black ``(H, W)`` uint8 mask, or None when nothing was drawn."""
    import numpy as np

    if not isinstance(value, dict):
        return value, None
    picture = value.get("background")
    drawn = None
    for layer in value.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA") if hasattr(layer, "convert") else layer)[..., 3] > 0
        drawn = alpha if drawn is None else drawn | alpha
    if drawn is None or not drawn.any():
        return picture, None
    return picture, (drawn * 255).astype(np.uint8)


def split_params(text: str | None) -> list[str]:
    """The parameters box's ``"low_threshold=100, high_threshold=200"`` as ``key=value`` strings (separated by
    commas or semicolons), for :func:`controlnet.annotators.parse_params`."""
    return [item.strip() for item in (text or "").replace(";", ",").split(",") if item.strip()]


def annotator_params(annotator: str | None, text: str | None) -> dict[str, Any]:
    """The typed parameters of ``annotator`` from the parameters box (each value parsed by the annotator's
    declared type, as ``controlnet annotate`` and ``generate --annotator-param`` parse theirs)."""
    pairs = split_params(text)
    if annotator is None:
        if pairs:
            raise UserError("annotator parameters are given but no annotator is chosen; choose one or clear the box")
        return {}
    from controlnet import annotators

    _refuse_path_params(annotator, pairs)
    return annotators.parse_params(annotator, pairs)


# Why the page refuses each kind of file parameter, and what to do instead.
_PATH_PARAM_HINTS = {
    "json": "the page writes no files for an annotator; run `controlnet annotate --json` on the server instead",
    "mask": "for inpainting, upload or draw the mask in the 'Image to image / inpaint' tab",
    "keypoints": "run `controlnet generate --annotator pose_json` on the server instead",
}
_WEIGHTS_HINT = "the annotator uses the weights the server is configured with; leave it out"


def _refuse_path_params(annotator: str, pairs: Sequence[str]) -> None:
    """A :class:`UserError` for any ``key=value`` of ``pairs`` that names a file on the server: a browser may
    neither read nor write the server's files through an annotator, whatever the value."""
    from controlnet import annotators

    refused = annotators.path_params(annotator)
    for pair in pairs:
        key = pair.partition("=")[0].strip().replace("-", "_")
        if key in refused:
            hint = _WEIGHTS_HINT if key.endswith("weights") else _PATH_PARAM_HINTS.get(key, "leave it out")
            raise UserError(f"{annotator}: parameter {key}= names a file on the server, which the page does not take "
                            f"from a browser; {hint}")


def _checked_size(width: Any, height: Any, generating: bool = True) -> tuple[int, int]:
    """The page's width and height as whole numbers in 1..MAX_SIZE; to generate, also multiples of SIZE_STEP and at
    least MIN_SIZE."""
    width, height = _as_int(width, "width"), _as_int(height, "height")
    if generating and (width % SIZE_STEP or height % SIZE_STEP or width < MIN_SIZE or height < MIN_SIZE):
        raise UserError(f"size {width}x{height}: width and height must be multiples of {SIZE_STEP}, "
                        f"at least {MIN_SIZE}")
    if not (0 < width <= MAX_SIZE and 0 < height <= MAX_SIZE):
        raise UserError(f"size {width}x{height}: width and height must be in 1..{MAX_SIZE}")
    return width, height


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact: a float would round 2**63 - 1
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if number != int(number):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    return int(number)


# --------------------------------------------------------------------------- the backend (no gradio)


class UiBackend:
    """The page's actions on plain values: generate images, preview a unit's condition.

    ``pipeline`` is a loaded :class:`controlnet.pipeline.Pipeline` (or any object with its call signature);
    PNGs go to ``output_dir`` with the generation settings as PNG text chunks.
    """

    def __init__(self, pipeline: Any, output_dir: str | os.PathLike, base_label: str = "embedded tiny-sd",
                 examples: Sequence[Example] = (), negative_prompt: str = DEFAULT_NEGATIVE,
                 model_roots: Sequence[str | os.PathLike] | None = None, timeout: float | None = None,
                 controlnets: Mapping[str, Path] | None = None):
        self.pipeline = pipeline
        # The model dropdown's names → folders (an embedded base's own ControlNets); None: the bundled names.
        self.controlnets = None if controlnets is None else dict(controlnets)
        # Folders a model path may lie in (None: any path; the library's default, not the server's).
        self.model_roots = None if model_roots is None else [Path(os.path.realpath(r)) for r in model_roots]
        self.timeout = timeout  # seconds a generation may take (None: no limit)
        self.negative_prompt = negative_prompt  # the page's default negative prompt
        self.output_dir = Path(output_dir)
        self.base_label = base_label
        self.examples = list(examples)  # one-click settings shown under the page (the embedded model's)
        self._counter = itertools.count()
        self._lock = threading.Lock()  # one generation at a time: the model is shared
        # Seconds one sampling step takes per pixel and image, as this server measured it (None: not yet).
        self.seconds_per_pixel_step: float | None = None
        self._prompt_loras: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU order, oldest first

    # -- choices shown in the page

    def controlnet_choices(self) -> list[str]:
        """Names of the ControlNets the model dropdown offers: the base's own, else the bundled ones."""
        from controlnet.embedded import bundled_controlnets

        return list(bundled_controlnets() if self.controlnets is None else self.controlnets)

    @property
    def is_flow(self) -> bool:
        """Whether the base is a Flux or SD3 transformer (flow-matching Euler: no scheduler choice)."""
        return hasattr(self.pipeline, "transformer")

    @staticmethod
    def annotator_choices() -> list[str]:
        """``"none"`` followed by the registered annotators."""
        try:
            from controlnet.annotators import list_annotators
        except ImportError:  # the annotators package is optional for the page
            return [NO_ANNOTATOR]
        return [NO_ANNOTATOR, *[name for name in list_annotators() if name != NO_ANNOTATOR]]

    @staticmethod
    def annotator_help(name: str | None) -> tuple[str, str]:
        """(placeholder, help line) for the parameters box of annotator ``name``: its parameters and defaults."""
        if not name or name == NO_ANNOTATOR:
            return "", "no annotator: the uploaded image is the condition"
        try:
            from controlnet import annotators

            annotator = annotators.get(name)
        except (ImportError, UserError) as err:
            return "", str(err)
        shown = [p for p in annotator.params if not p.is_path]  # files: never from the page
        if not shown:
            return "", f"{name}: {annotator.description}; no parameters"
        defaults = ", ".join(f"{p.name}={'...' if p.required else p.default}" for p in shown)
        return defaults, f"{name}: {annotator.description}"

    def scheduler_choices(self) -> list[str]:
        """Schedulers the pipeline accepts, the base family's default first (DDIM, the original's, for SD1.x); a
        Flux or SD3 base's one sampler alone."""
        first = self.default_sampler()[1]
        if self.is_flow:
            return [first]
        return [first, *[name for name in SCHEDULERS if name != first]]

    def default_sampler(self) -> tuple[float, str]:
        """(guidance, scheduler) the page starts with: the base family's, as ``controlnet generate`` uses them
        (:data:`controlnet.defaults.FAMILY_DEFAULTS`; 5.0 for the embedded model and SDXL)."""
        defaults = getattr(self.pipeline, "defaults", None)
        if defaults is None:  # a stand-in pipeline without a family
            return DEFAULT_GUIDANCE, DEFAULT_SCHEDULER
        return defaults.guidance, getattr(defaults, "scheduler", FLOW_SCHEDULER)

    def default_size(self) -> int:
        """The base model's native resolution (UNet sample size x VAE factor: 512 for SD1.5, 128 embedded)."""
        return int(getattr(self.pipeline, "native_size", 512))

    # -- actions

    def generate(self, request: GenerateRequest, progress: ProgressFn | None = None) -> GenerateOutcome:
        """Run the pipeline for ``request``; errors come back as the outcome's status line, never raised."""
        seed = None
        try:
            seed = self._resolve_seed(request.seed)
            enabled = [i for i, unit in enumerate(request.units) if unit.enabled]
            units = [self._allowed_model(i, request.units[i]) for i in enabled]
            controls = [self._control_unit(i, unit) for i, unit in zip(enabled, units)]
            config = self._config(request, seed)
            kwargs = config.keywords()
            self._check_time_budget(kwargs)
            if progress is not None:
                progress(0.0, "starting")
            # A Flux or SD3 base samples the images (and their hires passes) one after another: the callback
            # counts all their steps.
            steps = flow_steps(config) if self.is_flow else config.steps
            with self._lock, self._bounded_prompt_loras() as used_loras:
                pace_of = dict(kwargs, steps=steps, num_images=1) if self.is_flow else kwargs  # one image a step
                callback = self._with_deadline(self._step_callback(progress, steps), pace_of)
                if self.is_flow:  # TransformerPipeline.generate: the config as it is (checked for its family)
                    result = self.pipeline.generate(request.prompt or "", controls, config, progress=False,
                                                    callback=callback)
                else:
                    result = self.pipeline(prompt=request.prompt or "", controls=controls, callback=callback,
                                           progress=False, output_type="pil", **kwargs)
                used_loras.update(result.settings.get("loras", {}))
            used_seed = int(result.seed)
            paths = self._save(result)
        except UserError as err:
            return GenerateOutcome([], [], seed, f"Error: {err}", ok=False)
        except Exception as err:  # noqa: BLE001 - the page shows one line; the server log keeps the traceback
            log.exception("generation failed")
            message = " ".join(str(err).split())[:300]
            status = f"Error: {type(err).__name__}: {message} (details in the server log)"
            return GenerateOutcome([], [], seed, status, ok=False)
        n = len(paths)
        # The pipeline seeds image k with seed + k: each image can be made again alone.
        captions = [f"seed {used_seed + k}" for k in range(n)]
        hires = result.settings.get("hires") or {}  # with a hires fix, "size" is the first pass's
        size = hires.get("size") or result.settings.get("size", f"{request.width}x{request.height}")
        status = f"Done: {n} image{'s' if n != 1 else ''} at {size}, seed {used_seed}"
        status += f" (+0..{n - 1})." if n > 1 else "."
        conditions = dict(zip(enabled, result.conditions))
        return GenerateOutcome(list(zip(map(str, paths), captions)), [str(p) for p in paths], used_seed, status,
                               ok=True, conditions=conditions)

    def preview(self, unit: UnitInput, width: Any, height: Any) -> tuple[Any, str]:
        """The condition a unit would feed its ControlNet at ``width`` x ``height``: the image resized as the
        pipeline resizes it (cover, then centre-crop), then the annotator's output if one is chosen.

        Returns ``(uint8 (H, W, 3) array or None, status line)``; errors come back as the status line.
        """
        try:
            if unit.image is None:
                raise UserError("no input image: upload one to preview its condition")
            from controlnet.conditions import resize_cover
            from controlnet.images import load_image

            width, height = _checked_size(width, height, generating=False)
            image = resize_cover(load_image(unit.image), width, height)  # (H, W, 3) uint8, as the pipeline's
            if not unit.annotator or unit.annotator == NO_ANNOTATOR:
                return image, f"No annotator: the image (resized to {width}x{height}) is the condition."
            from controlnet import annotators

            params = annotator_params(unit.annotator, unit.annotator_params)
            annotated = annotators.get(unit.annotator)(image, **params)
            condition = resize_cover(load_image(annotated), width, height)
            return condition, f"Condition from {unit.annotator} at {width}x{height}."
        except UserError as err:
            return None, f"Error: {err}"
        except Exception as err:  # noqa: BLE001
            log.exception("preview failed")
            return None, f"Error: {type(err).__name__}: {' '.join(str(err).split())[:300]} (details in the server log)"

    # -- helpers

    @staticmethod
    def _resolve_seed(seed: Any) -> int:
        value = SEED_RANDOM if seed is None or seed == "" else _as_int(seed, "seed")
        if value == SEED_RANDOM:
            return secrets.randbelow(SEED_MAX + 1)
        return value  # in range: GenerationConfig.check

    def _allowed_model(self, index: int, unit: UnitInput) -> UnitInput:
        """``unit`` with its model as the server may load it, or a :class:`UserError`: with ``model_roots`` set, a
        bundled name, a path inside a root, or a hub id found in the Hugging Face cache (never downloaded); a
        regular file or a folder of them. A refused path gets the same message whether it exists or not."""
        text = (unit.model_path or "").strip() or (unit.model or "").strip()
        if self.model_roots is None or not text or text in self.controlnet_choices():
            return unit
        name = f"ControlNet unit {index + 1}"
        try:
            path = resolve_untrusted_input(text, self.model_roots, f"{name}: model path", folders=True,
                                           hint="put the model in a --models-dir folder, or choose a bundled one")
        except UserError:
            if not spelled_as_hub_id(text):
                raise
            path = _cached_hub_model(text, name)
        _check_folder_files(path, f"{name}: {text}")
        return dataclasses.replace(unit, model_path=str(path))

    def _check_time_budget(self, kwargs: dict[str, Any]) -> None:
        """Refuse, before it starts, a generation whose size (:func:`sampling_work`) at the step cost this server
        measured (:attr:`seconds_per_pixel_step`) would take longer than :attr:`timeout`."""
        if self.timeout is None or self.seconds_per_pixel_step is None:
            return
        estimate = sampling_work(kwargs) * self.seconds_per_pixel_step
        if estimate > self.timeout:
            raise UserError(f"this request would take about {estimate:.0f} s, more than the server's --timeout of "
                            f"{self.timeout:g} s; use fewer steps, fewer images or a smaller size")

    def _with_deadline(self, callback: Callable[..., None] | None,
                       kwargs: dict[str, Any]) -> Callable[..., None] | None:
        """``callback`` after a check, at every step boundary, that stops the generation once it has run
        :attr:`timeout` seconds or once the steps left, at the pace of those run, would end past it. The pace is
        kept as :attr:`seconds_per_pixel_step` for :meth:`_check_time_budget`."""
        start, steps = time.monotonic(), int(kwargs["steps"])
        size = kwargs.get("size") or getattr(kwargs.get("init_image"), "size", None)
        pixel_images = None if size is None or kwargs.get("hires") else size[0] * size[1] * kwargs["num_images"]
        stamps: list[float] = []

        def on_step(*args: Any) -> None:
            now = time.monotonic()
            stamps.append(now)
            if len(stamps) >= 2:
                pace = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # seconds per step, the first one excluded
                if pixel_images:
                    self.seconds_per_pixel_step = pace / pixel_images
                ends = now + pace * max(steps - len(stamps), 0)
                if self.timeout is not None and ends > start + self.timeout and now <= start + self.timeout:
                    raise UserError(f"generation stopped: at {pace:.2f} s a step it would end after "
                                    f"{ends - start:.0f} s, past the server's --timeout of {self.timeout:g} s; use "
                                    "fewer steps, fewer images or a smaller size")
            if self.timeout is not None and now > start + self.timeout:
                raise UserError(f"generation stopped after {self.timeout:g} s (the server's --timeout); use fewer "
                                "steps or a smaller size")
            if callback is not None:
                callback(*args)

        return on_step

    @contextlib.contextmanager
    def _bounded_prompt_loras(self) -> Iterator[dict[str, Any]]:
        """Around a generation: the LoRAs it used (the caller fills the dict: the result's ``settings["loras"]``)
        become the most recent, and the prompt-tag LoRAs beyond :data:`MAX_PROMPT_LORAS` are unloaded, least
        recently used first (also after a failed generation, which may have loaded some)."""
        used: dict[str, Any] = {}
        try:
            yield used
        finally:
            from controlnet.lora import adapters_in

            parts = ("unet", "transformer", "text_encoder", "text_encoder_2")
            loaded = {n for part in parts for n in adapters_in(getattr(self.pipeline, part, None))}
            loaded -= set(getattr(self.pipeline, "loras", {}))  # loaded by the server's own configuration: kept
            for name in [n for n in self._prompt_loras if n not in loaded]:
                del self._prompt_loras[name]
            for name in sorted(loaded - set(self._prompt_loras)) + [n for n in used if n in loaded]:
                self._prompt_loras[name] = None
                self._prompt_loras.move_to_end(name)
            while len(self._prompt_loras) > MAX_PROMPT_LORAS:
                self.pipeline.unload_lora(self._prompt_loras.popitem(last=False)[0])

    def _control_unit(self, index: int, unit: UnitInput) -> Any:
        name = f"ControlNet unit {index + 1}"
        model = (unit.model_path or "").strip() or (unit.model or "").strip()
        if not (unit.model_path or "").strip() and self.controlnets is not None and model in self.controlnets:
            model = str(self.controlnets[model])  # the base's own ControlNet, by its folder
        if not model:
            raise UserError(f"{name}: choose a ControlNet model or give a path, or untick 'enable'")
        if unit.image is None:
            raise UserError(f"{name}: no input image; upload a condition image or untick 'enable'")
        annotator = None if not unit.annotator or unit.annotator == NO_ANNOTATOR else unit.annotator
        from controlnet.pipeline import ControlUnit

        try:  # ControlUnit checks strength, start <= end
            return ControlUnit(
                controlnet=model, image=unit.image, strength=float(unit.strength), start=float(unit.start),
                end=float(unit.end), annotator=annotator, control_mode=unit.control_mode or "balanced",
                control_type=(unit.control_type or "").strip() or None,
                annotator_params=annotator_params(annotator, unit.annotator_params),
            )
        except UserError as err:
            raise UserError(f"{name}: {err}") from None

    def _config(self, request: GenerateRequest, seed: int) -> Any:
        """The page's settings as a checked :class:`~controlnet.generation_config.GenerationConfig` (on a Flux or
        SD3 base without a scheduler: it has one sampler)."""
        from controlnet.generation_config import GenerationConfig

        width, height = _checked_size(request.width, request.height)
        image, hires = _image_settings(request)
        return GenerationConfig(
            negative_prompt=request.negative_prompt or "", steps=_as_int(request.steps, "steps"),
            guidance=_as_number(request.guidance, "guidance"), scheduler=None if self.is_flow else request.scheduler,
            seed=seed,
            size=None if image.init_image is not None else (width, height),  # an init image's own size wins
            num_images=_as_int(request.num_images, "number of images"), guess_mode=bool(request.guess_mode),
            image=image, hires=hires,
        ).check()

    @staticmethod
    def _step_callback(progress: ProgressFn | None, steps: int) -> Callable[..., None] | None:
        """The pipeline's ``callback(i, t, latents)`` as page progress (the sampler runs ``steps`` steps)."""
        if progress is None:
            return None

        def on_step(i: int, *_: Any) -> None:
            progress(min(1.0, (int(i) + 1) / steps), f"step {int(i) + 1}/{steps}")

        return on_step

    def _save(self, result: Any) -> list[Path]:
        """Each image as a PNG whose text chunks are the generation's settings (the pipeline's own metadata)."""
        from controlnet.images import png_metadata, save_png

        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for k, image in enumerate(result.images):
            seed_k = int(result.seed) + k
            path = self.output_dir / f"{stamp}-{next(self._counter):04d}-seed{seed_k}.png"
            paths.append(save_png(path, image, png_metadata(result.settings, k)))
        return paths


def _image_settings(request: GenerateRequest) -> tuple[Any, Any]:
    """The image-to-image part and the hires fix of the page's img2img tab and hires options."""
    from controlnet.generation_config import HiresFix, ImageToImage

    image, hires = request.img2img, request.hires
    settings = ImageToImage()
    if image.enabled:
        picture, drawn = editor_picture_and_mask(image.picture)
        if picture is None:
            raise UserError("image to image: no picture; upload one in the 'Image to image / inpaint' tab or untick it")
        mask = image.mask if image.mask is not None else drawn
        settings = ImageToImage(init_image=picture, denoise=_as_number(image.denoise, "denoise"))
        if mask is not None:
            settings = dataclasses.replace(settings, mask=mask, mask_blur=_as_number(image.mask_blur, "mask blur"),
                                           mask_invert=bool(image.mask_invert), inpaint_full_res=bool(image.full_res),
                                           inpaint_padding=_as_int(image.padding, "padding"))
    fix = None
    if hires.enabled:
        fix = HiresFix(_as_number(hires.scale, "hires scale"), _as_number(hires.denoise, "hires denoise"),
                       _as_int(hires.steps, "hires steps") or None, hires.upscaler)
    return settings, fix


def _as_number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {str(value)[:40]!r}") from None


def flow_steps(config: Any) -> int:
    """The sampling steps a Flux or SD3 generation of ``config`` runs in all: each image's, then its hires pass's
    (the last denoise x steps of its steps, halves rounded up, as image-to-image runs them)."""
    hires = config.hires
    second = 0 if hires is None else math.floor(hires.denoise * (hires.steps or config.steps) + 0.5)
    return (config.steps + second) * config.num_images


def sampling_work(kwargs: dict[str, Any]) -> float:
    """Pixels x images x sampling steps of a generation (the hires pass's at its size): what its time grows with.
    An init image's own size counts where it replaces the page's size."""
    size = kwargs.get("size") or getattr(kwargs.get("init_image"), "size", None) or (MAX_SIZE, MAX_SIZE)
    pixels, images, steps = size[0] * size[1], int(kwargs["num_images"]), int(kwargs["steps"])
    work = float(pixels * images * steps)
    hires = kwargs.get("hires")
    if hires is not None:
        work += pixels * float(hires.scale) ** 2 * images * (hires.steps or steps)
    return work


def _cached_hub_model(text: str, name: str) -> Path:
    """The real path of hub id ``text`` (``org/name`` or ``org/name/file``) if it is in the Hugging Face cache;
    nothing is downloaded on a client's request."""
    from controlnet import hub

    parts = text.split("/")
    repo_id = "/".join(parts[:2])
    try:
        if len(parts) == 2:
            return Path(os.path.realpath(hub.hub_folder(repo_id, cached_only=True)))
        return Path(os.path.realpath(hub.hub_file(repo_id, "/".join(parts[2:]), cached_only=True)))
    except UserError:  # not cached, or not a valid id: one message either way
        raise UserError(f"{name}: {text} is not a bundled name, a path in the server's model folders, or a hub id "
                        "in its Hugging Face cache") from None


def _check_folder_files(path: Path, label: str) -> None:
    """Refuse a model folder holding something other than regular files and folders (a FIFO would block the one
    generation slot)."""
    from controlnet.safe_io import check_regular_file

    if path.is_dir():
        for entry in os.scandir(path):
            if not entry.is_dir():  # follows symlinks, as the loader will
                try:
                    check_regular_file(Path(entry.path))
                except UserError:
                    raise UserError(f"{label}: {entry.name} in it is not a regular file (a FIFO, a device, ...); "
                                    "give a model file or folder") from None


# --------------------------------------------------------------------------- gradio


@dataclass
class UiConfig:
    """How ``controlnet ui`` serves the page."""

    base: str | None = None  # a diffusers SD folder; None = the embedded tiny model
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # Generated PNGs go to a new folder the UI makes inside this one (None: a new temporary folder); only that
    # folder is served.
    output_dir: str | None = None
    models_dirs: Sequence[str] = ()  # folders the model-path field may name (with the bundled names, the hub cache)
    allow_any_path: bool = False  # let the model-path field name any file on the server
    auth: tuple[str, str] | None = None  # (user, password) asked by the page
    timeout: float | None = DEFAULT_TIMEOUT  # seconds a generation may run
    max_pixels: int | None = None  # the output limit (controlnet.limits); None: from the device's memory

    def check(self) -> None:
        """Refuse bad settings in one line before anything is loaded, bound or written."""
        if not 0 < int(self.port) < 65536:
            raise UserError(f"--port must be in 1..65535, got {self.port}")
        if self.output_dir is not None and Path(self.output_dir).expanduser().exists() \
                and not Path(self.output_dir).expanduser().is_dir():
            raise UserError(f"--outputs {self.output_dir} is a file; give a folder")
        for folder in self.models_dirs:
            if not Path(folder).expanduser().is_dir():
                raise UserError(f"--models-dir {folder} is not a folder; give an existing folder of models")
        if self.auth is not None and (len(self.auth) != 2 or not all(self.auth)):
            raise UserError("--auth must be USER:PASSWORD, both non-empty")
        if self.timeout is not None and not self.timeout > 0:
            raise UserError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.max_pixels is not None and int(self.max_pixels) < 1:
            raise UserError(f"--max-pixels must be a positive number of pixels, got {self.max_pixels}")

    def model_roots(self) -> list[Path] | None:
        """Where model paths may point: the --models-dir folders, the bundled ControlNets, the Hugging Face cache
        (None with ``allow_any_path``)."""
        if self.allow_any_path:
            return None
        from huggingface_hub import constants

        from controlnet.embedded import assets_dir

        return [Path(folder).expanduser() for folder in self.models_dirs] + [assets_dir() / "controlnets",
                                                                             Path(constants.HF_HUB_CACHE)]


class RequestSizeLimit:
    """ASGI middleware: a request whose body is larger than ``max_bytes`` (``upload_bytes`` on ``upload_path``) is
    answered 413 and its body dropped, never kept nor logged. A Content-Length over the bound is refused before
    the body is read; a chunked body (no length) is read up to the bound first, then passed on or refused."""

    def __init__(self, app: Any, max_bytes: int = MAX_REQUEST_BODY, upload_bytes: int = MAX_UPLOAD_BODY,
                 upload_path: str = UPLOAD_ROUTE):
        self.app, self.max_bytes, self.upload_bytes, self.upload_path = app, max_bytes, upload_bytes, upload_path

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        bound = self.upload_bytes if path.rstrip("/").endswith(self.upload_path) else self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:  # the server delivers no more than a declared length
            if not declared.isdigit() or int(declared) > bound:
                await self._refuse(send, path, bound)
            else:
                await self.app(scope, receive, send)
            return
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > bound:
                await self._refuse(send, path, bound)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Callable, path: str, bound: int) -> None:
        log.warning("refused a request to %s: its body is over %d bytes", path[:200], bound)
        body = f"request body too large: at most {bound} bytes\n".encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def body_limit_middleware() -> Any:
    """:class:`RequestSizeLimit` as the ``middleware=`` entry of gradio's FastAPI app."""
    from starlette.middleware import Middleware

    return Middleware(RequestSizeLimit)


def check_port_free(host: str, port: int) -> None:
    """Refuse, in one line, an address this machine cannot bind (the port taken, the host not ours)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:
        cause = err.strerror or str(err)
        raise UserError(f"cannot serve on {host}:{port} ({cause}): the port is taken or the address is not this "
                        "machine's; pass another --port or --host") from None


def own_output_folder(output_dir: str | None) -> Path:
    """A new folder for the PNGs of this run, inside ``output_dir`` (or the system's temporary folder)."""
    if output_dir is None:
        return Path(tempfile.mkdtemp(prefix="controlnet-ui-"))
    parent = Path(output_dir).expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("ui-%Y%m%d-%H%M%S-"), dir=parent))


def import_gradio() -> Any:
    """Import gradio with its network features off; a one-line :class:`UserError` naming the extra if missing."""
    # No network: gradio's usage analytics / version check and the Hub's telemetry stay off.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        raise UserError(f"the web UI needs gradio, which is not installed; run: {INSTALL_HINT}") from None
    return gradio


def build_app(backend: UiBackend, num_units: int = MAX_UNITS) -> Any:
    """The gradio Blocks page wired to ``backend`` (not launched)."""
    gr = import_gradio()
    controlnets, annotators = backend.controlnet_choices(), backend.annotator_choices()

    with gr.Blocks(title="ControlNet", analytics_enabled=False) as app:
        gr.Markdown(
            "# ControlNet\nSpatial control for text-to-image diffusion (Zhang, Rao, Agrawala, ICCV 2023). "
            f"Base model: **{backend.base_label}**. Upload a condition image to a unit, write a prompt, press Generate."
        )
        with gr.Row():
            with gr.Column(scale=1):
                page = {  # the GLOBAL_FIELDS widgets by name
                    "prompt": gr.Textbox(label="Prompt", lines=2, elem_id="prompt"),
                    "negative_prompt": gr.Textbox(label="Negative prompt", value=backend.negative_prompt, lines=2,
                                                  elem_id="negative"),
                }
                units: list[dict[str, Any]] = []
                with gr.Tabs():
                    for i in range(num_units):
                        with gr.Tab(f"ControlNet {i + 1}", id=f"unit{i + 1}"):
                            units.append(_unit_widgets(gr, i, controlnets, annotators))
                with gr.Tab("Image to image / inpaint", id="img2img"):
                    img2img = _image_widgets(gr)
                page.update(_settings_widgets(gr, backend.default_size(), backend.scheduler_choices(),
                                              backend.default_sampler()[0]))
                hires = _hires_widgets(gr)
            with gr.Column(scale=1):
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="Results", columns=2, height="auto",
                                     elem_id="gallery", buttons=["download", "fullscreen"])
                status = gr.Textbox("Ready.", label="Status", interactive=False, elem_id="status")  # plain text
                seed_used = gr.Number(None, label="Seed used (image k: seed + k)", precision=0, interactive=False,
                                      elem_id="seed-used")
                files = gr.File(label="Download PNGs (settings in the PNG text chunks)", file_count="multiple",
                                interactive=False, elem_id="files")
                if backend.examples:
                    first = units[0]
                    gr.Examples(
                        [[ex.prompt, ex.image, True, ex.controlnet, ex.guidance] for ex in backend.examples],
                        inputs=[page["prompt"], first["image"], first["enabled"], first["model"], page["guidance"]],
                        label="Examples (unit 1 with the bundled 'fill' ControlNet)", cache_examples=False,
                        elem_id="examples",
                    )

        for unit in units:
            _wire_unit(gr, backend, unit, page["width"], page["height"])
        inputs = [page[name] for name in GLOBAL_FIELDS] + [unit[name] for unit in units for name in UNIT_FIELDS]
        conditions = [unit["condition"] for unit in units]

        # A set of inputs makes gradio pass one dict {component: value}, so `progress` can be a positional
        # parameter with a gr.Progress() default (how gradio finds where to inject its progress tracker).
        def on_generate(data: dict[Any, Any], progress: Any = gr.Progress()) -> tuple[Any, ...]:
            request = request_from_values([data[widget] for widget in inputs], num_units)
            request.img2img = ImageToImageInput(**{name: data[img2img[name]] for name in IMAGE_FIELDS})
            request.hires = HiresInput(**{name: data[hires[name]] for name in HIRES_FIELDS})
            outcome = backend.generate(request, progress=lambda frac, desc: progress(frac, desc=desc))
            # Each enabled unit's preview shows the condition its ControlNet got; the others keep theirs.
            shown = [outcome.conditions.get(i, gr.skip()) for i in range(num_units)]
            return (outcome.images, outcome.files, outcome.seed, outcome.status, *shown)

        extra = [img2img[name] for name in IMAGE_FIELDS] + [hires[name] for name in HIRES_FIELDS]
        generate.click(on_generate, inputs=set(inputs + extra), outputs=[gallery, files, seed_used, status, *conditions],
                       concurrency_limit=1, show_progress_on=[gallery])
    return app


def _settings_widgets(gr: Any, size: int, schedulers: list[str], guidance: float = DEFAULT_GUIDANCE) -> dict[str, Any]:
    """The "Settings" accordion: the sampler, seed, size and batch widgets, by their :data:`GLOBAL_FIELDS` name."""
    w: dict[str, Any] = {}
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            w["steps"] = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="steps")
            w["guidance"] = gr.Slider(0.0, MAX_GUIDANCE, value=guidance, step=0.1, label="Guidance scale",
                                      elem_id="guidance")
        with gr.Row():
            w["scheduler"] = gr.Dropdown(schedulers, value=schedulers[0], label="Scheduler", elem_id="scheduler")
            w["seed"] = gr.Number(SEED_RANDOM, precision=0, label="Seed (-1 = random)", elem_id="seed")
        with gr.Row():
            w["width"] = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=SIZE_STEP, label="Width", elem_id="width")
            w["height"] = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=SIZE_STEP, label="Height", elem_id="height")
        with gr.Row():
            w["num_images"] = gr.Slider(1, MAX_NUM_IMAGES, value=1, step=1, label="Number of images",
                                        elem_id="num-images")
            w["guess_mode"] = gr.Checkbox(False, label="Guess mode (control on the conditional branch only)",
                                          elem_id="guess-mode")
    return w


def _image_widgets(gr: Any) -> dict[str, Any]:
    """The "Image to image / inpaint" tab's widgets by their :data:`IMAGE_FIELDS` name."""
    w: dict[str, Any] = {}
    w["enabled"] = gr.Checkbox(False, label="Start from this picture", info="uploading a picture ticks it",
                               elem_id="img2img-enable")
    w["picture"] = gr.ImageEditor(label="Picture (paint over the area to repaint: inpainting)", type="pil",
                                  sources=["upload", "clipboard"], height=320, elem_id="img2img-picture")
    w["picture"].upload(None, inputs=None, outputs=w["enabled"], js="() => true")
    w["mask"] = gr.Image(label="or upload a mask (white = repaint; the picture's size)", type="pil", height=160,
                         sources=["upload", "clipboard"], elem_id="img2img-mask")
    with gr.Row():
        w["denoise"] = gr.Slider(0.0, 1.0, value=DEFAULT_DENOISE, step=0.01, label="Denoising strength",
                                 elem_id="img2img-denoise")
        w["mask_blur"] = gr.Slider(0, 64, value=DEFAULT_MASK_BLUR, step=1, label="Mask blur (px, inward)",
                                   elem_id="img2img-mask-blur")
    with gr.Row():
        w["mask_invert"] = gr.Checkbox(False, label="Invert the mask", elem_id="img2img-mask-invert")
        w["full_res"] = gr.Checkbox(False, label="Only masked (full resolution)", elem_id="img2img-full-res")
        w["padding"] = gr.Slider(0, 256, value=DEFAULT_INPAINT_PADDING, step=4, label="Only masked padding (px)",
                                 elem_id="img2img-padding")
    return w


def _hires_widgets(gr: Any) -> dict[str, Any]:
    """The "Hires fix" accordion's widgets by their :data:`HIRES_FIELDS` name."""
    w: dict[str, Any] = {}
    with gr.Accordion("Hires fix (text-to-image)", open=False):
        with gr.Row():
            w["enabled"] = gr.Checkbox(False, label="Hires fix", elem_id="hires-enable")
            w["upscaler"] = gr.Dropdown(list(HIRES_UPSCALERS), value="latent", label="Upscaler",
                                        elem_id="hires-upscaler")
        with gr.Row():
            w["scale"] = gr.Slider(1.0, 4.0, value=DEFAULT_HIRES_SCALE, step=0.05, label="Upscale by",
                                   elem_id="hires-scale")
            w["denoise"] = gr.Slider(0.0, 1.0, value=DEFAULT_HIRES_DENOISE, step=0.01, label="Denoising strength",
                                     elem_id="hires-denoise")
            w["steps"] = gr.Slider(0, MAX_STEPS, value=0, step=1, label="Hires steps (0: same)", elem_id="hires-steps")
    return w


def _wire_unit(gr: Any, backend: UiBackend, unit: dict[str, Any], width: Any, height: Any) -> None:
    """A unit's events: an upload enables it, the annotator shows its parameters, Preview shows the condition."""
    # Uploading an image enables its unit (what a user means nine times out of ten); this runs in the browser.
    unit["image"].upload(None, inputs=None, outputs=unit["enabled"], js="() => true")

    def annotator_help_update(name: str) -> Any:
        placeholder, info = backend.annotator_help(name)
        return gr.update(placeholder=placeholder, info=info)

    unit["annotator"].change(annotator_help_update, inputs=unit["annotator"], outputs=unit["annotator_params"])
    unit["preview"].click(
        lambda img, ann, par, w, h: backend.preview(UnitInput(True, None, "", img, ann, par), w, h),
        inputs=[unit["image"], unit["annotator"], unit["annotator_params"], width, height],
        outputs=[unit["condition"], unit["preview_status"]],
    )


def _unit_widgets(gr: Any, i: int, controlnets: list[str], annotators: list[str]) -> dict[str, Any]:
    """One unit's widgets by name: the :data:`UNIT_FIELDS` plus its condition preview and preview button."""
    n = i + 1
    w: dict[str, Any] = {}
    w["enabled"] = gr.Checkbox(False, label="Enable", info="uploading an image enables the unit",
                               elem_id=f"unit{n}-enable")
    with gr.Row():
        w["model"] = gr.Dropdown(controlnets, value=controlnets[0] if controlnets else None, label="Model (bundled)",
                                 elem_id=f"unit{n}-model")
        w["model_path"] = gr.Textbox(label="or a control model file/folder on the server (ControlNet, Union, "
                                     "Control-LoRA, T2I-Adapter)",
                                     placeholder="/path/to/control_v11p_sd15_canny.safetensors",
                                     elem_id=f"unit{n}-model-path")
    with gr.Row():
        w["image"] = gr.Image(label="Input image", type="pil", image_mode=None, height=256,
                              sources=["upload", "clipboard"], elem_id=f"unit{n}-image")
        w["condition"] = gr.Image(label="Condition", type="pil", format="png", height=256, interactive=False,
                                  elem_id=f"unit{n}-condition")
    with gr.Row():
        w["annotator"] = gr.Dropdown(annotators, value=NO_ANNOTATOR, label="Annotator", elem_id=f"unit{n}-annotator")
        w["annotator_params"] = gr.Textbox(label="Annotator parameters", placeholder="key=value, ...",
                                           info="empty: the defaults", elem_id=f"unit{n}-params")
        w["preview"] = gr.Button("Preview condition", size="sm", elem_id=f"unit{n}-preview")
    with gr.Row():
        w["strength"] = gr.Slider(0.0, MAX_STRENGTH, value=1.0, step=0.05, label="Strength",
                                  elem_id=f"unit{n}-strength")
        w["start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Start", elem_id=f"unit{n}-start")
        w["end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="End", elem_id=f"unit{n}-end")
    w["control_mode"] = gr.Radio(list(CONTROL_MODES), value="balanced", label="Control mode",
                                 info="prompt: my prompt is more important; controlnet: ControlNet is more important",
                                 elem_id=f"unit{n}-control-mode")
    w["control_type"] = gr.Textbox(label="Control type (union models)", placeholder="depth, openpose, canny, ...",
                                   info="for a Union/ProMax ControlNet only: the condition's type",
                                   elem_id=f"unit{n}-control-type")
    w["preview_status"] = gr.Textbox("", show_label=False, interactive=False, container=False,
                                     placeholder="(preview messages)", elem_id=f"unit{n}-preview-status")
    return w


def embedded_examples(folder: Path, count: int = 3, controlnets: Mapping[str, Path] | None = None,
                      guidance: float | None = None) -> list[Example]:
    """Examples for an embedded model: the demo's first fill conditions (circle outlines) and prompts, written as
    PNGs into ``folder``, with ``guidance`` (default: the demo's); none when its ``fill`` ControlNet is missing from
    ``controlnets`` (default: the bundled ones)."""
    from controlnet import demo
    from controlnet.embedded import bundled_controlnets
    from controlnet.images import save_png

    if demo.FILL_CONTROLNET not in (bundled_controlnets() if controlnets is None else controlnets):
        return []
    examples = []
    for k, sample in enumerate(demo.DEMO_SAMPLES[:count]):
        path = save_png(folder / f"fill-example-{k}.png", sample.condition)
        examples.append(Example(sample.prompt, str(path), demo.FILL_CONTROLNET,
                                demo.DEMO_GUIDANCE if guidance is None else guidance))
    return examples


def create_backend(config: UiConfig) -> UiBackend:
    """Load the pipeline for ``config.base`` (a one-line UserError if it cannot) and make the backend: a Flux or
    SD3 folder gets :class:`controlnet.transformer_pipeline.TransformerPipeline`, anything else
    :class:`controlnet.pipeline.Pipeline`."""
    from controlnet.embedded import base_controlnets
    from controlnet.loading import base_folder_family

    config.check()
    if base_folder_family(config.base) == "unet":
        from controlnet.pipeline import Pipeline

        pipeline = Pipeline.from_pretrained(base=config.base)
    else:
        from controlnet.transformer_pipeline import TransformerPipeline

        pipeline = TransformerPipeline.from_pretrained(config.base)
    pipeline.max_pixels = config.max_pixels
    # <lora:NAME> tags name files in the first --models-dir (controlnet.lora.find_tag_lora); none without one.
    pipeline.lora_dir = Path(config.models_dirs[0]).expanduser() if config.models_dirs else None
    output_dir = own_output_folder(config.output_dir)
    limits = dict(model_roots=config.model_roots(), timeout=config.timeout, controlnets=base_controlnets(config.base))
    if config.base is None:
        size = pipeline.native_size
        # The tiny model knows only its fill prompts: no negative prompt, as controlnet.demo generates.
        return UiBackend(pipeline, output_dir, base_label=f"embedded tiny-sd ({size}x{size})",
                         examples=embedded_examples(output_dir / "examples"), negative_prompt="", **limits)
    own = base_controlnets(config.base)  # an embedded base's own ControlNets (tiny-flux's fill): its examples
    if own is not None:
        examples = embedded_examples(output_dir / "examples", controlnets=own, guidance=pipeline.defaults.guidance)
        return UiBackend(pipeline, output_dir, base_label=f"embedded {config.base}", examples=examples,
                         negative_prompt="", **limits)
    # Flux runs no CFG: a negative prompt is refused.
    no_negative = getattr(pipeline, "family", None) == "flux"
    return UiBackend(pipeline, output_dir, base_label=str(config.base), **limits,
                     **(dict(negative_prompt="") if no_negative else {}))


def launch(config: UiConfig, block: bool = True, quiet: bool = False) -> Any:
    """Serve the page at ``config.host:config.port``; returns the running gradio app.

    ``block=False`` returns at once with the server running in a thread (tests; close it with ``app.close()``).
    """
    import_gradio()  # fail on a missing extra before loading the model
    config.check()
    check_port_free(config.host, config.port)  # before anything is loaded or written
    if config.host not in LOOPBACK_HOSTS:
        login = "a login (--auth) is asked" if config.auth else "no login is asked: add --auth USER:PASSWORD"
        print(f"warning: serving on {config.host}: anyone who can reach port {config.port} can use this page and "
              f"this machine's compute; {login}", file=sys.stderr, flush=True)
    backend = create_backend(config)
    app = build_app(backend)
    app.queue(default_concurrency_limit=1)
    if not quiet:
        print(f"controlnet ui: serving http://{config.host}:{config.port}; PNGs are saved in {backend.output_dir}; "
              "press Ctrl+C to stop", flush=True)
    try:
        # quiet=True always: gradio's own banner suggests share=True in launch(), which a CLI user cannot act on.
        app.launch(
            server_name=config.host, server_port=config.port, share=False, inbrowser=False,
            prevent_thread_lock=not block, quiet=True, show_error=False, ssr_mode=False,
            allowed_paths=[str(backend.output_dir)], mcp_server=False, auth=config.auth,
            max_file_size=MAX_UPLOAD, app_kwargs={"middleware": [body_limit_middleware()]},
        )
    except OSError:  # gradio: "Cannot find empty port"; the OS: address not available
        raise UserError(f"cannot serve on {config.host}:{config.port}: the port is taken or the address is not this "
                        "machine's; pass another --port or --host") from None
    return app
