"""The AUTOMATIC1111 web UI's ``parameters`` text: how A1111's "PNG Info", image sites and other tools read a
generation's settings from a PNG.

The format (AUTOMATIC1111/stable-diffusion-webui modules/processing.py ``create_infotext``, read back by
modules/infotext_utils.py ``parse_generation_parameters``)::

    <prompt, any number of lines>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DDIM, CFG scale: 9.0, Seed: 0, Size: 512x512, Model: tiny-sd, Denoising strength: 0.75,
    ControlNet 0: "Module: canny, Model: control_canny, Weight: 1.0, Guidance Start: 0.0, Guidance End: 1.0,
    Control Mode: Balanced"

The last line is one line of ``key: value`` pairs (wrapped above for reading); a value holding a comma, a colon or
a newline is written as a JSON string (A1111's ``quote``). The ControlNet entries are those of the
sd-webui-controlnet extension (Mikubill/sd-webui-controlnet, ``ControlNetUnit`` infotext). Nothing here imports
torch: the metadata is written by :func:`controlnet.images.png_metadata`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from controlnet.errors import UserError

# Our scheduler names → A1111's sampler names (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py).
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
                 "dpmpp_2m_karras": "DPM++ 2M Karras", "unipc": "UniPC", "heun": "Heun", "lms": "LMS",
                 "lms_karras": "LMS Karras", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
                 "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_karras": "DPM++ SDE Karras", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
                 "pndm": "PLMS", "lcm": "LCM", "deis": "DEIS", "tcd": "TCD"}
# Our control modes → the extension's names (its ControlMode enum).
CONTROL_MODE_NAMES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                      "controlnet": "ControlNet is more important"}
# Hires fix upscalers → A1111's names ("Latent" is its bilinear latent upscaler).
UPSCALER_NAMES = {"latent": "Latent", "lanczos": "Lanczos"}

# A1111's modules/infotext_utils.py re_param_code (``\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)``): a key
# of word characters, spaces, '-' and '/', then a quoted JSON string or anything up to a comma. Read here by
# :func:`_pairs` in one pass (the expression backtracks quadratically on a long line without a colon).
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ -/")
NEGATIVE_PREFIX = "Negative prompt:"


def quote(value: Any) -> str:
    """A value as A1111 writes it: as is, or as a JSON string when it holds a comma, a colon or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _model_name(path: str) -> str:
    """A model as A1111 names it: the file or folder name without its extension ("embedded" stays)."""
    return PurePath(path).stem if path else ""


def _controlnet_entry(unit: Mapping[str, Any]) -> str:
    fields = {
        "Module": unit.get("annotator") or "none",
        "Model": _model_name(str(unit.get("controlnet", ""))),
        "Weight": unit.get("strength", 1.0),
        "Guidance Start": unit.get("start", 0.0),
        "Guidance End": unit.get("end", 1.0),
        "Control Mode": CONTROL_MODE_NAMES.get(unit.get("control_mode", "balanced"), "Balanced"),
    }
    return ", ".join(f"{key}: {value}" for key, value in fields.items())


def parameters_text(settings: Mapping[str, Any], index: int = 0) -> str:
    """The ``parameters`` text of image ``index`` of a generation whose settings are ``settings`` (those of
    :class:`controlnet.pipeline.GenerationResult`)."""
    seeds = settings.get("seeds") or [settings.get("seed", 0)]
    fields: dict[str, Any] = {
        "Steps": settings.get("steps"),
        "Sampler": SAMPLER_NAMES.get(settings.get("scheduler", ""), settings.get("scheduler")),
        "CFG scale": settings.get("guidance"),
        "Seed": seeds[index],
        "Size": settings.get("size"),
        "Model": _model_name(str(settings.get("base", ""))),
    }
    if "denoise" in settings:
        fields["Denoising strength"] = settings["denoise"]
    if settings.get("mask"):
        fields["Mask blur"] = settings.get("mask_blur")
        if settings.get("inpaint_full_res"):
            fields.update({"Inpaint area": "Only masked", "Masked area padding": settings.get("inpaint_padding")})
    hires = settings.get("hires")
    if hires:
        fields.update({"Denoising strength": hires["denoise"], "Hires upscale": hires["scale"],
                       "Hires steps": hires["steps"], "Hires upscaler": UPSCALER_NAMES.get(hires["upscaler"])})
    for j, unit in enumerate(settings.get("controlnets", [])):
        fields[f"ControlNet {j}"] = _controlnet_entry(unit)
    lines = [str(settings.get("prompt", ""))]
    if settings.get("negative_prompt"):
        lines.append(f"{NEGATIVE_PREFIX} {settings['negative_prompt']}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value not in (None, "")))
    return "\n".join(lines)


def _key_before(text: str, start: int, colon: int) -> str | None:
    """The key that ends at ``colon``: the longest run of key characters before it that starts with a word
    character (A1111's ``\\w[\\w \\-/]+``), or None."""
    begin = colon
    while begin > start and text[begin - 1] in _KEY_CHARS:
        begin -= 1
    while begin < colon and not (text[begin].isalnum() or text[begin] == "_"):
        begin += 1
    return text[begin:colon] if colon - begin >= 2 else None


def _quoted_end(text: str, start: int) -> int:
    """The index of the quote closing the string that opens at ``start``, or -1 (one pass, escapes skipped)."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i
        else:
            i += 1
    return -1


def _pairs(line: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The ``key: value`` pairs of a ``parameters`` line, in one left-to-right pass (linear in its length), and the
    keys whose quoted value has no closing quote (read up to the next comma)."""
    pairs: list[tuple[str, str]] = []
    broken: list[str] = []
    i = 0
    while True:
        colon = line.find(":", i)
        if colon < 0:
            return pairs, broken
        key = _key_before(line, i, colon)
        j = colon + 1
        while j < len(line) and line[j] == " ":
            j += 1
        end = _quoted_end(line, j) if j < len(line) and line[j] == '"' else -1
        if j < len(line) and line[j] == '"' and (end < 0 or line[end + 1:end + 2] not in ("", ",")):
            broken.append(key or line[i:colon])  # an opening quote without its closing one
            end = -1
        if end < 0:  # unquoted: up to the next comma
            end = line.find(",", j)
            end = len(line) if end < 0 else end
            value = line[j:end].strip()
        else:
            value, end = line[j:end + 1], end + 1
        if key is not None:
            pairs.append((key, value))
        i = end + 1


def parse_parameters(text: str) -> dict[str, str]:
    """A ``parameters`` text back into ``{"Prompt": ..., "Negative prompt": ..., key: value, ...}`` (values as
    text, quoted ones unquoted), as A1111's ``parse_generation_parameters`` reads it; a quoted value that is not a
    JSON string: a one-line UserError. Linear in the text's length."""
    *head, last = text.strip("\n").split("\n")
    pairs, broken = _pairs(last)
    if len(pairs) < 3:  # A1111: a last line with fewer than 3 pairs is part of the prompt
        head, pairs = [*head, last], []
    elif broken:
        raise UserError(f"parameters: the quoted value of {broken[0][:40]!r} has no closing quote; the text is damaged")
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative, line = True, line[len(NEGATIVE_PREFIX):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                raise UserError(f"parameters: the value of {key!r} is a broken quoted string") from None
            if not isinstance(value, str):
                raise UserError(f"parameters: the value of {key!r} is not a string")
        result[key] = value
    return result


def _whole(key: str, text: str) -> int:
    if not text.strip().lstrip("-").isdigit() or len(text) > 24:
        raise UserError(f"parameters: {key} {text[:40]!r} is not a whole number")
    return int(text)


def _real(key: str, text: str) -> float:
    try:
        return float(text[:40])
    except ValueError:
        raise UserError(f"parameters: {key} {text[:40]!r} is not a number") from None


def settings_from_parameters(found: Mapping[str, str]) -> dict[str, Any]:
    """Our settings (those :meth:`controlnet.generation_config.GenerationConfig.from_settings` reads, with the
    prompt) from a parsed ``parameters`` text: prompt, negative prompt, steps, sampler, CFG, seed, size (the first
    pass's) and the hires fix. Values that are not numbers where numbers belong: a one-line UserError."""
    settings: dict[str, Any] = {"prompt": found["Prompt"], "negative_prompt": found["Negative prompt"],
                                "num_images": 1}
    for key, name, kind in (("Steps", "steps", _whole), ("CFG scale", "guidance", _real), ("Seed", "seed", _whole)):
        if key in found:
            settings[name] = kind(key, found[key])
    if "Size" in found:
        settings["size"] = found["Size"]
    samplers = {name: ours for ours, name in SAMPLER_NAMES.items()}
    if found.get("Sampler") in samplers:
        settings["scheduler"] = samplers[found["Sampler"]]
    if "Hires upscale" in found:
        upscalers = {name: ours for ours, name in UPSCALER_NAMES.items()}
        hires: dict[str, Any] = {"scale": _real("Hires upscale", found["Hires upscale"]),
                                 "upscaler": upscalers.get(found.get("Hires upscaler", "Latent"), "latent")}
        if "Hires steps" in found:
            hires["steps"] = _whole("Hires steps", found["Hires steps"])
        if "Denoising strength" in found:
            hires["denoise"] = _real("Denoising strength", found["Denoising strength"])
        settings["hires"] = hires
    return settings
