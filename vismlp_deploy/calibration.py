"""Calibration inputs for INT8: a folder of images or an array of preprocessed inputs.

``--calib PATH`` is either

- a directory of images, flat or with one sub-folder per class (ImageFolder layout), read
  with the same preprocessing as ``verify`` (:func:`~vismlp_deploy.verification.images.preprocess`:
  resize, centre crop, ``--mean``/``--std``), or
- a ``.npy`` file, or a ``.npz`` with one array (or one called ``input``), of already
  preprocessed inputs (N, C, H, W), cast to float32.

Which samples are used is seeded: the files (or rows) are shuffled with ``seed`` and the
first ones taken, so a folder sorted by class still gives a mix of classes and the same
call always gives the same samples. :func:`load_calibration_split` also keeps samples the
calibration never saw, on which the accuracy guard of :mod:`vismlp_deploy.export.quantize`
measures agreement with the fp32 model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError, VisMLPWarning
from .verification.images import EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, preprocess

DEFAULT_COUNT = 256  # calibration samples (ONNX Runtime's examples use 100-500)
DEFAULT_HOLDOUT = 1000  # held-out samples for the guard: at a 99 % target, <= 4 disagreements pass
_CHUNK = 64  # images decoded and preprocessed at a time (bounded memory for large folders)


@dataclass
class CalibrationSplit:
    """Calibration inputs and held-out inputs (disjoint), float32 (N, C, H, W) each."""

    calibration: np.ndarray
    holdout: np.ndarray
    source: str  # what was read, for reports

    def to_dict(self) -> dict:
        return {"source": self.source, "calibration": len(self.calibration), "holdout": len(self.holdout)}


def load_calibration(path: str | Path, input_size: tuple[int, int, int], count: int | None = DEFAULT_COUNT,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0) -> np.ndarray:
    """``count`` inputs (all when None) from ``path`` as float32 (N, C, H, W); seeded selection.

    ``input_size`` (C, H, W) is the model's; images are preprocessed to it, arrays must have
    it. Empty, unreadable or wrong-shape input is a UserError; fewer samples than ``count``
    is a warning (all of them are used).
    """
    return _load(Path(path), tuple(input_size), count, mean, std, seed)[0]


def load_calibration_split(path: str | Path, input_size: tuple[int, int, int], count: int = DEFAULT_COUNT,
                           holdout: int = DEFAULT_HOLDOUT, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                           seed: int = 0) -> CalibrationSplit:
    """``count`` calibration inputs and ``holdout`` other inputs of ``path`` (seeded, disjoint).

    With fewer than ``count + holdout`` samples (a warning), both parts shrink in proportion,
    each keeping at least one sample where there are two or more.
    """
    if count < 1 or holdout < 0:
        raise UserError(f"calibration count must be >= 1 and held-out count >= 0 (got {count}, {holdout})")
    x, source = _load(Path(path), tuple(input_size), count + holdout, mean, std, seed,
                      wanted=f"{count} + {holdout} held out")
    if len(x) >= count + holdout or not holdout:
        n_cal = min(count, len(x))
    else:  # both parts shrink in proportion, each keeping one sample where there are two or more
        n_cal = max(1, min(len(x) - 1, round(len(x) * count / (count + holdout))))
    return CalibrationSplit(x[:n_cal], x[n_cal:], source)


def _load(path: Path, input_size: tuple[int, ...], count: int | None, mean, std, seed: int,
          wanted: str | None = None) -> tuple[np.ndarray, str]:
    if count is not None and count < 1:
        raise UserError(f"calibration count must be >= 1 (got {count})")
    if path.is_dir():
        files = image_files(path)
        order = np.random.default_rng(seed).permutation(len(files))[:count]
        x = np.concatenate([preprocess(_open([files[i] for i in order[j:j + _CHUNK]]), input_size, mean, std).numpy()
                            for j in range(0, len(order), _CHUNK)])
        source = f"{len(x)} of {len(files)} images in {path}"
    elif path.is_file():
        x = read_array(path, input_size)
        total = len(x)
        x = x[np.random.default_rng(seed).permutation(total)[:count]]
        source = f"{len(x)} of {total} preprocessed inputs in {path}"
    else:
        raise UserError(f"{path}: no such calibration directory or array file")
    if count is not None and len(x) < count:
        warnings.warn(f"{path}: {len(x)} calibration samples, fewer than asked ({wanted or count}); using all of them",
                      VisMLPWarning, stacklevel=3)
    return np.ascontiguousarray(x, dtype=np.float32), source


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` and in its sub-folders (one per class), sorted."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files += sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise UserError(f"{folder}: no image files ({', '.join(EXTENSIONS)}) in it or in its sub-folders")
    return files


def _open(files: list[Path]) -> list:
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                images.append(img.copy())
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"{f}: not a readable image ({type(e).__name__})") from None
    return images


def read_array(path: Path, input_size: tuple[int, ...]) -> np.ndarray:
    """The (N, C, H, W) array of a ``.npy`` / ``.npz`` file, checked against ``input_size``."""
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if len(names) != 1 and "input" not in names:
                    raise UserError(f"{path}: {len(names)} arrays ({', '.join(names[:5])}); "
                                    "give one array, or name the inputs 'input'")
                x = z["input" if "input" in names else names[0]]
        else:
            raise UserError(f"{path}: calibration data must be a directory of images, a .npy or a .npz file")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the array ({type(e).__name__}: {str(e)[:120]})") from None
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_size):
        raise UserError(f"{path}: array shape {tuple(x.shape)}, expected (N, {', '.join(map(str, input_size))})")
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{path}: array dtype {x.dtype}; calibration arrays hold preprocessed float inputs")
    if len(x) == 0:
        raise UserError(f"{path}: the array holds no samples")
    if not np.isfinite(x).all():
        raise UserError(f"{path}: the array holds NaN or infinite values")
    return x
