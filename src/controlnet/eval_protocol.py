"""The settings of ControlNet++'s evaluation protocol (Li et al. ECCV 2024), as ``controlnet evaluate`` defaults.

Light on purpose (no numpy, no torch): ``controlnet evaluate --help`` shows these values.
"""

from __future__ import annotations

# liming-ai/ControlNet_Plus_Plus eval/eval.py: num_inference_steps 20, guidance_scale 7.5, batch_size 4 images
# per condition, UniPC (its default unless --ddim), negative prompt "worst quality, low quality".
PROTOCOL_STEPS = 20
PROTOCOL_GUIDANCE = 7.5
PROTOCOL_PER_EXAMPLE = 4
PROTOCOL_SCHEDULER = "unipc"
PROTOCOL_NEGATIVE_PROMPT = "worst quality, low quality"
# ControlNet++'s eval/eval_clip.py: CLIPScore(model_name_or_path="openai/clip-vit-base-patch16").
DEFAULT_CLIP_WEIGHTS = "openai/clip-vit-base-patch16"
# The value of --clip-weights / --fid-weights that turns the score off.
NO_WEIGHTS = "none"
