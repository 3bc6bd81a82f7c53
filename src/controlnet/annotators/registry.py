"""The annotator registry: named callables ``(image, **params) -> (H, W, 3) uint8`` with declared parameters.

An :class:`Annotator` wraps a plain function with its description, its :class:`Param` list and the kind of input
it reads (``input_kind``). Calling it validates and completes the parameters (unknown name, wrong type or a value
out of range → :class:`UserError`), loads the input the way its kind says (see :mod:`.inputs`), runs the function
and checks that the result is an ``(H, W, 3)`` uint8 image of the input's height and width.

Parameters given as text (the command line, the web UI, a training config) have one syntax, ``key=value``;
:meth:`Annotator.parse_params` reads a list of such pairs with each value parsed by its :class:`Param` type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from controlnet.annotators import inputs
from controlnet.errors import UserError

# Parameter types an annotator may declare. ``Path`` is a file the CLI takes by name; a Python caller may also
# pass an already loaded object (an array for a mask, a dict for keypoints) and the annotator accepts both.
PARAM_TYPES = (int, float, bool, str, Path)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One declared parameter of an annotator: its name, type, default and a one-line help text.

    ``choices`` restricts a ``str`` parameter; ``minimum``/``maximum`` bound a number (inclusive); a parameter with
    ``required=True`` has no default and must be given. ``path=True`` marks a ``str`` parameter whose value names
    a file or folder (a ``weights`` file, folder or hub id); ``Path``-typed parameters are paths anyway
    (:attr:`is_path`).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    path: bool = False

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"Param {self.name!r}: type must be one of int, float, bool, str, Path; got {self.type!r}")
        if not self.name.isidentifier():
            raise ValueError(f"Param name must be a Python identifier; got {self.name!r}")

    @property
    def is_path(self) -> bool:
        """Whether the value names a file or folder on this machine (read or written): a web client or a shared
        settings file must not choose it."""
        return self.type is Path or self.path

    @property
    def type_name(self) -> str:
        return "path" if self.type is Path else self.type.__name__

    def describe(self) -> str:
        """``name (type, default X): help`` for listings."""
        default = "required" if self.required else f"default {self.default!r}"
        extra = f", one of {'/'.join(self.choices)}" if self.choices else ""
        return f"{self.name} ({self.type_name}, {default}{extra}): {self.help}"

    def parse(self, text: str, annotator: str) -> Any:
        """Convert the text of a ``key=value`` pair to this parameter's type, then :meth:`check` it."""
        flag = f"{annotator}: {self.name}"
        if self.type is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise UserError(f"{flag} expects true or false, got {text!r}")
        if self.type is int:
            try:
                value: Any = int(text)
            except ValueError:
                raise UserError(f"{flag} expects an integer, got {text!r}") from None
        elif self.type is float:
            try:
                value = float(text)
            except ValueError:
                raise UserError(f"{flag} expects a number, got {text!r}") from None
        elif self.type is Path:
            value = Path(text)
        else:
            value = text
        return self.check(value, annotator)

    def check(self, value: Any, annotator: str) -> Any:
        """Validate a Python value (numbers of the right kind, choices, bounds); return it normalised."""
        flag = f"{annotator}: parameter {self.name!r}"
        if self.type is bool:
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise UserError(f"{flag} expects True or False, got {value!r}")
        if self.type is int:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                if isinstance(value, (float, np.floating)) and float(value).is_integer():
                    value = int(value)
                else:
                    raise UserError(f"{flag} expects an integer, got {value!r}")
            value = int(value)
        elif self.type is float:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise UserError(f"{flag} expects a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{flag} must be finite, got {value!r}")
        elif self.type is str:
            if not isinstance(value, str):
                raise UserError(f"{flag} expects a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise UserError(f"{flag} must be one of {', '.join(self.choices)}; got {value!r}")
        if self.type in (int, float):
            if self.minimum is not None and value < self.minimum:
                raise UserError(f"{flag} must be >= {self.minimum:g}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise UserError(f"{flag} must be <= {self.maximum:g}, got {value!r}")
        return value


@dataclass(frozen=True)
class Annotator:
    """A registered annotator. Call it as ``annotator(image, **params)``; it returns ``(H, W, 3)`` uint8.

    ``input_kind`` says what ``image`` is and how a file is read (see :data:`controlnet.annotators.inputs.KINDS`):
    ``"image"`` (a photo/drawing, RGB), ``"depth"`` (a depth map, raw values kept), ``"labels"`` (class indices)
    or ``"keypoints"`` (the image only gives the canvas size; the keypoints come as a parameter or a JSON file).
    ``weights``, for a detector with a network, returns a one-line status of its weights for listings (e.g.
    whether they are in the hub cache, :func:`controlnet.annotators.weights.weights_status`). ``batch``, when
    given, is ``fn`` for a list of inputs (``batch(images, **params) -> list``) that runs the network on several
    images per forward; :meth:`call_batch` uses it. ``check``, given the resolved parameters, raises
    :class:`UserError` for what would make every image fail (a device this machine lacks, weights that are missing
    or of another model) without running on an image; :meth:`check_ready` calls it.
    """

    name: str
    fn: Callable[..., np.ndarray]
    description: str
    params: tuple[Param, ...] = field(default_factory=tuple)
    input_kind: str = "image"
    weights: Callable[[], str] | None = None
    batch: Callable[..., list[np.ndarray]] | None = None
    check: Callable[[dict[str, Any]], object] | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise UserError(f"{self.name}: unknown parameter {name!r} (parameters: {known})")

    def parse_params(self, pairs: Iterable[str]) -> dict[str, Any]:
        """``["low_threshold=50", "safe=true"]`` → ``{"low_threshold": 50, "safe": True}``: each value parsed by
        its declared :class:`Param` (type, choices, bounds). Dashes in keys read as underscores; an unknown key,
        a pair without ``=``, a key given twice or a bad value → :class:`UserError`. Required parameters are
        checked later, by :meth:`resolve`."""
        params: dict[str, Any] = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                example = f"{self.params[0].name}=VALUE" if self.params else "key=value"
                raise UserError(f"{self.name}: cannot read the parameter {pair.strip()!r}; write key=value, "
                                f"e.g. {example}")
            param = self.param(key)  # unknown name -> UserError naming the known ones
            if key in params:
                raise UserError(f"{self.name}: parameter {key!r} given twice")
            params[key] = param.parse(text.strip(), self.name)
        return params

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """All parameters with defaults filled in, each validated; unknown or missing ones → :class:`UserError`."""
        given = {key.replace("-", "_"): value for key, value in params.items()}
        for key in given:
            self.param(key)  # raises for an unknown name
        resolved = {}
        for p in self.params:
            if p.name in given and given[p.name] is not None:
                resolved[p.name] = given[p.name] if p.type is Path else p.check(given[p.name], self.name)
            elif p.required:
                raise UserError(f"{self.name}: parameter {p.name!r} is required ({p.help}); give {p.name}=VALUE")
            else:
                resolved[p.name] = p.default
        return resolved

    def path_params(self) -> set[str]:
        """The names of the parameters whose values are paths on this machine (:attr:`Param.is_path`)."""
        return {p.name for p in self.params if p.is_path}

    def check_ready(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` resolved (:meth:`resolve`), then checked once for what would fail every image: through
        :attr:`check`, else, for an annotator with a batch form, its batch of no images (which loads the network
        on its device). Returns the resolved parameters."""
        resolved = self.resolve(params)
        if self.check is not None:
            self.check(resolved)
        elif self.batch is not None:
            self.batch([], **resolved)
        return resolved

    def load(self, image: Any) -> np.ndarray:
        """Load ``image`` (path, PIL image or array) as this annotator's input kind expects."""
        return inputs.load(self.input_kind, image)

    def __call__(self, image: Any = None, **params: Any) -> np.ndarray:
        """Annotate ``image`` (a path, PIL image or array) with ``params``; return ``(H, W, 3)`` uint8."""
        resolved = self.resolve(params)
        if image is None:
            if self.input_kind != "keypoints":
                raise UserError(f"{self.name}: no input image given")
            array = inputs.keypoint_canvas(resolved)
        else:
            array = self.load(image)
        out = self.fn(array, **resolved)
        return _check_output(self.name, out, array.shape[:2])

    def call_batch(self, images: list[Any], **params: Any) -> list[np.ndarray]:
        """This annotator on each of ``images`` with the same ``params``: through :attr:`batch` (several images
        per network forward) when the annotator has one, else one call per image."""
        if self.batch is None:
            return [self(image, **params) for image in images]
        resolved = self.resolve(params)
        arrays = [self.load(image) for image in images]
        outs = self.batch(arrays, **resolved)
        return [_check_output(self.name, out, array.shape[:2]) for out, array in zip(outs, arrays, strict=True)]


def _check_output(name: str, out: Any, hw: tuple[int, int]) -> np.ndarray:
    out = np.asarray(out)
    if out.dtype == np.bool_:
        out = out.astype(np.uint8) * 255
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        raise UserError(f"annotator {name!r} returned {out.dtype} {out.shape}; an annotator must return (H, W, 3) uint8")
    if out.shape[:2] != tuple(hw):
        raise UserError(f"annotator {name!r} returned size {out.shape[:2]} for an input of size {tuple(hw)}")
    return np.ascontiguousarray(out)
