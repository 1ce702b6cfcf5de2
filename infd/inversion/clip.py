"""CLIP as a differentiable judge of rendered regions, loaded only from local files.

    clip = load_clip("models/clip-vit-base-patch32")      # a transformers CLIP folder
    clip = load_clip("models/open_clip-ViT-B-32")         # an open_clip folder (open_clip_config.json)
    clip = load_clip("ViT-B-32.pt", arch="ViT-B-32")      # an open_clip checkpoint file
    loss = clip.loss(images, "a red car")                 # images (B, 3, S, S) in [0, 1] -> (B,) 1 - cosine

Three layouts are accepted, and nothing is ever downloaded:

- a transformers folder (`config.json` of a CLIPModel, its weights and tokenizer files),
  as `CLIPModel.save_pretrained` and the Hugging Face hub store it;
- an open_clip folder (`open_clip_config.json` + `open_clip_model.safetensors` or
  `open_clip_pytorch_model.bin`), the layout of open_clip models on the hub;
- an open_clip checkpoint file (.pt, .bin, .safetensors) of a built-in architecture
  named by `arch` (e.g. "ViT-B-32"); open_clip's tokenizer ships inside the package.

The network is frozen; gradients flow only into the images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from infd.errors import InfdError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

MISSING_CLIP = (
    "text conditions need CLIP weights on this machine (nothing is downloaded): pass --clip PATH to a "
    "transformers CLIP folder (config.json + weights + tokenizer files), an open_clip folder "
    "(open_clip_config.json + weights) or an open_clip checkpoint file together with --clip-arch NAME (e.g. ViT-B-32)."
)


class CLIPScorer(nn.Module):
    """A frozen CLIP model behind one interface, whatever library it came from.

    `image_size` is the side of the square images the vision tower takes. Images enter in
    [0, 1] (not clamped, so gradients survive slight overshoot) and are normalised here.
    Text embeddings are computed once per prompt and cached.
    """

    def __init__(
        self,
        model: nn.Module,
        image_features: Callable[[torch.Tensor], torch.Tensor],
        text_features: Callable[[list[str]], torch.Tensor],
        image_size: int,
        mean: tuple[float, ...] = OPENAI_MEAN,
        std: tuple[float, ...] = OPENAI_STD,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self._image_features = image_features
        self._text_features = text_features
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> CLIPScorer:
        return super().train(False)  # frozen: dropout and friends stay off

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [0, 1], S = image_size -> unit embeddings (B, D)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise InfdError(f"CLIP takes {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}.")
        pixels = (images.float() - self.mean) / self.std
        return F.normalize(self._image_features(pixels).float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, prompt: str) -> torch.Tensor:
        """Unit embedding (D,) of one prompt (cached)."""
        if prompt not in self._text_cache:
            self._text_cache[prompt] = F.normalize(self._text_features([prompt]).float(), dim=-1)[0]
        return self._text_cache[prompt].to(self.mean.device)

    def loss(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """1 - cosine similarity between each image and the prompt: (B,), 0 is a perfect match."""
        return 1 - self.embed_images(images) @ self.embed_text(prompt)


def load_clip(path: str | Path | None, arch: str | None = None, device: str | torch.device = "cpu") -> CLIPScorer:
    """A CLIPScorer from a local transformers folder, open_clip folder or open_clip checkpoint file."""
    if path is None:
        raise InfdError(MISSING_CLIP)
    path = Path(path)
    if not path.exists():
        raise InfdError(f"CLIP path '{path}' does not exist; " + MISSING_CLIP[MISSING_CLIP.index("pass") :])
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        scorer = _load_open_clip(f"local-dir:{path}", None, path)
    elif path.is_dir() and (path / "config.json").is_file():
        scorer = _load_transformers(path)
    elif path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
        if not arch:
            raise InfdError(f"'{path}' is an open_clip checkpoint file: name its architecture with --clip-arch (e.g. ViT-B-32).")
        scorer = _load_open_clip(arch, str(path), path)
    else:
        raise InfdError(f"'{path}' is not a CLIP model: " + MISSING_CLIP[MISSING_CLIP.index("pass") :])
    return scorer.to(device)


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _load_transformers(folder: Path) -> CLIPScorer:
    from transformers import AutoTokenizer, CLIPModel

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise InfdError(f"'{folder}' holds a {config.get('model_type', 'unknown')!r} model, not a CLIP model (model_type 'clip').")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # transformers raises many types for broken folders
        raise InfdError(f"could not load the CLIP model from '{folder}' ({_reason(error)}).") from None
    # transformers 5 silently builds an empty tokenizer from a folder without one: check first.
    has_tokenizer = (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    try:
        if not has_tokenizer:
            raise FileNotFoundError("no tokenizer.json, vocab.json or merges.txt")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        raise InfdError(
            f"'{folder}' has no usable CLIP tokenizer ({_reason(error)}); save the tokenizer into the same folder "
            "(tokenizer.json, or vocab.json + merges.txt)."
        ) from None
    max_length = model.config.text_config.max_position_embeddings

    def text_features(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return _pooled(model.get_text_features(**tokens.to(model.device)))

    def image_features(pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(model.get_image_features(pixel_values=pixels))

    mean, std = _transformers_normalisation(folder)
    return CLIPScorer(model, image_features, text_features, model.config.vision_config.image_size, mean, std)


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose pooler_output they are."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _transformers_normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config_file = folder / "preprocessor_config.json"
    if not config_file.is_file():
        return OPENAI_MEAN, OPENAI_STD
    config = json.loads(config_file.read_text())
    return tuple(config.get("image_mean", OPENAI_MEAN)), tuple(config.get("image_std", OPENAI_STD))


def _load_open_clip(name: str, pretrained: str | None, source: Path) -> CLIPScorer:
    import open_clip

    try:
        model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as error:  # unknown architecture, shape mismatch, unreadable file
        raise InfdError(f"could not load the open_clip model from '{source}' ({_reason(error)}).") from None
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size

    def text_features(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts).to(next(model.parameters()).device))

    return CLIPScorer(
        model, model.encode_image, text_features, size, tuple(preprocess.get("mean", OPENAI_MEAN)), tuple(preprocess.get("std", OPENAI_STD))
    )
