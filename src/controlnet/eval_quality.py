"""Image quality and text alignment for ``controlnet evaluate``: CLIP score and a Fréchet distance of CLIP features.

* CLIP score (Hessel et al. 2021, as torchmetrics' ``CLIPScore``, which ControlNet++'s eval/eval_clip.py uses with
  openai/clip-vit-base-patch16): ``100 * max(cos(image embedding, text embedding), 0)`` per generated image and
  its caption.
* FID here is the Fréchet distance (Heusel et al. 2017) between Gaussians fitted to the CLIP image embeddings of
  the dataset's images and of the generated ones: FID in CLIP feature space, as Kynkäänniemi et al. 2023 ("The
  role of ImageNet classes in Fréchet Inception Distance") and clean-fid's ``model_name="clip_vit_b_32"`` compute
  it. Not the Inception FID of the protocol's tables (clean-fid's InceptionV3 needs torchvision, which this
  package does not use), so its values are not comparable with published FIDs; compare runs with each other.

Weights come from a local folder (``save_pretrained`` layout) or the Hugging Face cache, never downloaded here:
:func:`locate` returns None and a one-line note on how to get them when they are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from controlnet.errors import UserError

CLIP_SCORE_SCALE = 100.0  # torchmetrics' CLIPScore: 100 * cosine similarity, clamped at 0


def locate(weights: str) -> tuple[Path | None, str]:
    """(folder, "") for a local folder or a hub id already in the Hugging Face cache; (None, how to get it)
    otherwise. Nothing is downloaded."""
    from controlnet.hub import fetch_command, hub_folder, is_repo_id

    path = Path(weights).expanduser()
    if path.is_dir():
        return path, ""
    if is_repo_id(weights):
        try:
            return hub_folder(weights, cached_only=True), ""
        except UserError:
            return None, (f"{weights} is not in the Hugging Face cache; get it with `{fetch_command(weights)}` "
                          "or pass a local folder")
    return None, f"{weights} is neither a folder nor a hub id; pass a CLIP model folder or a hub id in the cache"


class ClipFeatures:
    """A transformers CLIP model (image and text towers) loaded from ``folder`` on the CPU or ``device``."""

    def __init__(self, folder: Path, device: str = "cpu"):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from controlnet.hub import quiet_loading

        try:
            with quiet_loading():
                self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
                self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{folder} is not a CLIP model folder ({str(err).splitlines()[0]}); pass a folder "
                            "saved by transformers' CLIPModel, e.g. openai/clip-vit-base-patch16") from None
        self.device = torch.device(device)

    def images(self, images: Sequence[np.ndarray], batch: int = 16) -> np.ndarray:
        """``(N, D)`` float64 image embeddings (projected, not normalised)."""
        import torch

        out = []
        for i in range(0, len(images), batch):
            pixels = self.processor(images=list(images[i : i + batch]), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                feats = _tensor(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            out.append(feats.float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` float64 text embeddings (projected, not normalised; captions cut at CLIP's 77 tokens)."""
        import torch

        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            feats = _tensor(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                         attention_mask=tokens["attention_mask"].to(self.device)))
        return feats.float().cpu().numpy().astype(np.float64)


def _tensor(output: Any) -> Any:
    """The embedding tensor of ``get_*_features``: a tensor, or an output object holding it as its pooler."""
    return output if hasattr(output, "shape") else output.pooler_output


def clip_scores(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """``(N,)``: ``100 * max(cos, 0)`` of each row pair (torchmetrics' CLIPScore per image)."""
    a = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    b = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    return CLIP_SCORE_SCALE * np.maximum((a * b).sum(axis=1), 0.0)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 sqrt(S_r S_f))`` of two ``(N, D)`` feature sets (N >= 2 each)."""
    from scipy import linalg

    if len(real) < 2 or len(fake) < 2:
        raise UserError(f"FID needs at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
    mu_r, mu_f = real.mean(axis=0), fake.mean(axis=0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = linalg.sqrtm(cov_r @ cov_f)
    root = np.real(root)  # sqrtm of a product of covariances: imaginary parts are rounding noise
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2.0 * root))
