"""Real images as model inputs: a folder, or a default set shipped by a dependency.

Preprocessing is the ImageNet evaluation recipe the families were trained with: resize
the shorter side to ``size / crop_pct`` (bicubic), centre-crop to the model's (H, W),
scale to [0, 1], normalize per channel. Mean/std default to ImageNet's; timm's Mixer
weights use 0.5/0.5, so they can be given.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# scikit-image's photographs of real scenes (the rest of its samples are synthetic or microscopy)
SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")


def folder_images(folder: str | Path) -> list:
    """PIL images of every image file directly in ``folder`` (sorted by name)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise UserError(f"{folder}: no image files ({', '.join(EXTENSIONS)})")
    return [Image.open(p) for p in files]


def default_images() -> tuple[list, str]:
    """(images, where from): scikit-image's sample photographs if installed, else matplotlib's sample photo."""
    from PIL import Image

    try:
        import skimage.data as data

        return [Image.fromarray(getattr(data, n)()) for n in SKIMAGE_SAMPLES], "scikit-image sample images"
    except ImportError:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return [Image.open(f).copy()], "matplotlib sample image (install scikit-image for more)"


def preprocess(images: list, input_size: tuple[int, int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD,
               crop_pct: float = 0.875) -> Tensor:
    """PIL images -> float32 (N, C, H, W) batch, resized, centre-cropped and normalized."""
    from PIL import Image

    c, h, w = input_size
    if c not in (1, 3):
        raise UserError(f"real images give 1 or 3 channels; the model expects {c}")
    out = []
    for img in images:
        img = img.convert("RGB" if c == 3 else "L")
        scale = max(h, w) / crop_pct / min(img.size)
        img = img.resize((max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))), Image.BICUBIC)
        left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
        arr = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr.reshape(h, w, c)).permute(2, 0, 1))
    x = torch.stack(out)
    m = torch.tensor(mean[:c] if c == 3 else (sum(mean) / 3,), dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std[:c] if c == 3 else (sum(std) / 3,), dtype=torch.float32).view(1, c, 1, 1)
    return (x - m) / s
