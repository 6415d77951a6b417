"""The input sets a comparison runs on: seeded random images, real images, or a saved ``.npz``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .images import IMAGENET_MEAN, IMAGENET_STD, default_images, folder_images, preprocess


def random_images(input_size: tuple[int, ...], batch: int = 8, seed: int = 0) -> Tensor:
    """Seeded N(0, 1) images (batch, C, H, W): the scale of normalized real images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=g)


def input_sets(input_size: tuple[int, int, int], *, batch: int = 8, seed: int = 0,
               images: str | Path | None = "default", mean=IMAGENET_MEAN, std=IMAGENET_STD,
               load: str | os.PathLike | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """({set name: (N, C, H, W) float32}, {set name: description}).

    ``load``: the sets of an ``.npz`` saved by :func:`save_npz` (every array must be
    (N, C, H, W) at ``input_size``); otherwise "random" (``batch`` seeded N(0, 1) images) and,
    unless ``images`` is None, "images" (a folder, or ``"default"``: scikit-image's samples).
    """
    if load is not None:
        sets = {k: torch.from_numpy(v) for k, v in load_npz(load).items()}
        for name, x in sets.items():
            if x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_size) or not x.is_floating_point():
                raise UserError(f"{load}: input set {name!r} has shape {tuple(x.shape)}; the model takes "
                                f"(N, {', '.join(map(str, input_size))}) floats")
        return ({k: x.float() for k, x in sets.items()},
                {k: f"{len(x)} inputs loaded from {load}" for k, x in sets.items()})
    sets = {"random": random_images(input_size, batch, seed)}
    about = {"random": f"{batch} seeded N(0, 1) images (seed {seed})"}
    if images is not None:
        imgs, where = default_images() if str(images) == "default" else (folder_images(images), str(images))
        sets["images"] = preprocess(imgs, input_size, mean, std)
        about["images"] = f"{len(imgs)} real images from {where}, resized/centre-cropped/normalized"
    return sets, about


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file (no pickled objects), or a UserError saying why not."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz file "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not arrays:
        raise UserError(f"{path}: the .npz file holds no arrays")
    return arrays


def save_npz(path: str | os.PathLike, arrays: dict[str, Tensor | np.ndarray]) -> None:
    """Write ``arrays`` (name -> tensor) as an uncompressed ``.npz`` (the caller makes it atomic)."""
    with open(path, "wb") as f:
        np.savez(f, **{k: v.detach().cpu().numpy() if isinstance(v, Tensor) else v for k, v in arrays.items()})
