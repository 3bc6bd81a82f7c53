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
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from controlnet.defaults import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_NUM_IMAGES, SCHEDULERS
from controlnet.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # local only; pass --host 0.0.0.0 to serve the network
DEFAULT_PORT = 7860  # gradio's customary port
MAX_UNITS = 3  # ControlNet units on the page (the A1111 extension's default "multi ControlNet" count)
NO_ANNOTATOR = "none"
SEED_RANDOM = -1
SEED_MAX = 2**31 - 1  # seeds drawn for SEED_RANDOM lie in [0, SEED_MAX]; any int the sampler accepts is allowed

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


UNIT_FIELDS = tuple(f.name for f in dataclasses.fields(UnitInput))


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


GLOBAL_FIELDS = tuple(f.name for f in dataclasses.fields(GenerateRequest) if f.name != "units")


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

    return annotators.parse_params(annotator, pairs)


def _as_int(value: Any, name: str) -> int:
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
                 examples: Sequence[Example] = (), negative_prompt: str = DEFAULT_NEGATIVE):
        self.pipeline = pipeline
        self.negative_prompt = negative_prompt  # the page's default negative prompt
        self.output_dir = Path(output_dir)
        self.base_label = base_label
        self.examples = list(examples)  # one-click settings shown under the page (the embedded model's)
        self._counter = itertools.count()
        self._lock = threading.Lock()  # one generation at a time: the model is shared

    # -- choices shown in the page

    @staticmethod
    def controlnet_choices() -> list[str]:
        """Names of the bundled ControlNets (the model dropdown)."""
        from controlnet.embedded import bundled_controlnets

        return list(bundled_controlnets())

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
        if not annotator.params:
            return "", f"{name}: {annotator.description}; no parameters"
        defaults = ", ".join(f"{p.name}={'...' if p.required else p.default}" for p in annotator.params)
        return defaults, f"{name}: {annotator.description}"

    @staticmethod
    def scheduler_choices() -> list[str]:
        """Schedulers the pipeline accepts (DDIM, the original's, first)."""
        return [DEFAULT_SCHEDULER, *[name for name in SCHEDULERS if name != DEFAULT_SCHEDULER]]

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
            controls = [self._control_unit(i, request.units[i]) for i in enabled]
            kwargs = self._pipeline_kwargs(request, seed)
            if progress is not None:
                progress(0.0, "starting")
            with self._lock:
                result = self.pipeline(controls=controls, callback=self._step_callback(progress, kwargs["steps"]),
                                       progress=False, **kwargs)
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
        size = result.settings.get("size", f"{request.width}x{request.height}")
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

            width, height = _as_int(width, "width"), _as_int(height, "height")
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
        if value < 0:
            raise UserError(f"seed must be -1 (random) or a number >= 0, got {value}")
        return value

    @staticmethod
    def _control_unit(index: int, unit: UnitInput) -> Any:
        name = f"ControlNet unit {index + 1}"
        model = (unit.model_path or "").strip() or (unit.model or "").strip()
        if not model:
            raise UserError(f"{name}: choose a ControlNet model or give a path, or untick 'enable'")
        if unit.image is None:
            raise UserError(f"{name}: no input image; upload a condition image or untick 'enable'")
        annotator = None if not unit.annotator or unit.annotator == NO_ANNOTATOR else unit.annotator
        from controlnet.pipeline import ControlUnit

        try:  # ControlUnit checks strength, start <= end
            return ControlUnit(
                controlnet=model, image=unit.image, strength=float(unit.strength), start=float(unit.start),
                end=float(unit.end), annotator=annotator,
                annotator_params=annotator_params(annotator, unit.annotator_params),
            )
        except UserError as err:
            raise UserError(f"{name}: {err}") from None

    @staticmethod
    def _pipeline_kwargs(request: GenerateRequest, seed: int) -> dict[str, Any]:
        width, height = _as_int(request.width, "width"), _as_int(request.height, "height")
        if width % SIZE_STEP or height % SIZE_STEP or width < MIN_SIZE or height < MIN_SIZE:
            raise UserError(f"size {width}x{height}: width and height must be multiples of {SIZE_STEP}, "
                            f"at least {MIN_SIZE}")
        num_images = _as_int(request.num_images, "number of images")
        if not 1 <= num_images <= MAX_NUM_IMAGES:
            raise UserError(f"number of images must be in 1..{MAX_NUM_IMAGES}, got {num_images}")
        return dict(
            prompt=request.prompt or "", negative_prompt=request.negative_prompt or "",
            steps=_as_int(request.steps, "steps"), guidance=float(request.guidance), scheduler=request.scheduler,
            seed=seed, size=(width, height), num_images=num_images,
            guess_mode=bool(request.guess_mode), output_type="pil",
        )

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


# --------------------------------------------------------------------------- gradio


@dataclass
class UiConfig:
    """How ``controlnet ui`` serves the page."""

    base: str | None = None  # a diffusers SD folder; None = the embedded tiny model
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    output_dir: str | None = None  # where generated PNGs go; None = a fresh temporary folder


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
                page.update(_settings_widgets(gr, backend.default_size(), backend.scheduler_choices()))
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
            outcome = backend.generate(request, progress=lambda frac, desc: progress(frac, desc=desc))
            # Each enabled unit's preview shows the condition its ControlNet got; the others keep theirs.
            shown = [outcome.conditions.get(i, gr.skip()) for i in range(num_units)]
            return (outcome.images, outcome.files, outcome.seed, outcome.status, *shown)

        generate.click(on_generate, inputs=set(inputs), outputs=[gallery, files, seed_used, status, *conditions],
                       concurrency_limit=1, show_progress_on=[gallery])
    return app


def _settings_widgets(gr: Any, size: int, schedulers: list[str]) -> dict[str, Any]:
    """The "Settings" accordion: the sampler, seed, size and batch widgets, by their :data:`GLOBAL_FIELDS` name."""
    w: dict[str, Any] = {}
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            w["steps"] = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="steps")
            w["guidance"] = gr.Slider(0.0, MAX_GUIDANCE, value=DEFAULT_GUIDANCE, step=0.1, label="Guidance scale",
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
        w["model_path"] = gr.Textbox(label="or a ControlNet file/folder on the server",
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
    w["preview_status"] = gr.Textbox("", show_label=False, interactive=False, container=False,
                                     placeholder="(preview messages)", elem_id=f"unit{n}-preview-status")
    return w


def embedded_examples(folder: Path, count: int = 3) -> list[Example]:
    """Examples for the embedded model: the demo's first fill conditions (circle outlines) and prompts,
    written as PNGs into ``folder``; none when the bundled ``fill`` ControlNet is missing."""
    from controlnet import demo
    from controlnet.embedded import bundled_controlnets
    from controlnet.images import save_png

    if demo.FILL_CONTROLNET not in bundled_controlnets():
        return []
    examples = []
    for k, sample in enumerate(demo.DEMO_SAMPLES[:count]):
        path = save_png(folder / f"fill-example-{k}.png", sample.condition)
        examples.append(Example(sample.prompt, str(path), demo.FILL_CONTROLNET, demo.DEMO_GUIDANCE))
    return examples


def create_backend(config: UiConfig) -> UiBackend:
    """Load the pipeline for ``config.base`` (a one-line UserError if it cannot) and make the backend."""
    from controlnet.pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(base=config.base)
    output_dir = Path(config.output_dir) if config.output_dir else Path(tempfile.mkdtemp(prefix="controlnet-ui-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.base is None:
        size = pipeline.native_size
        # The tiny model knows only its fill prompts: no negative prompt, as controlnet.demo generates.
        return UiBackend(pipeline, output_dir, base_label=f"embedded tiny-sd ({size}x{size})",
                         examples=embedded_examples(output_dir / "examples"), negative_prompt="")
    return UiBackend(pipeline, output_dir, base_label=str(config.base))


def launch(config: UiConfig, block: bool = True, quiet: bool = False) -> Any:
    """Serve the page at ``config.host:config.port``; returns the running gradio app.

    ``block=False`` returns at once with the server running in a thread (tests; close it with ``app.close()``).
    """
    import_gradio()  # fail on a missing extra before loading the model
    backend = create_backend(config)
    app = build_app(backend)
    app.queue(default_concurrency_limit=1)
    if not quiet:
        print(f"controlnet ui: PNGs are saved in {backend.output_dir}; press Ctrl+C to stop", flush=True)
    try:
        app.launch(
            server_name=config.host, server_port=config.port, share=False, inbrowser=False,
            prevent_thread_lock=not block, quiet=quiet, show_error=False, ssr_mode=False,
            allowed_paths=[str(backend.output_dir)], mcp_server=False,
        )
    except OSError:  # gradio: "Cannot find empty port"; the OS: address not available
        raise UserError(f"cannot serve on {config.host}:{config.port}: the port is taken or the address is not this "
                        "machine's; pass another --port or --host") from None
    return app
