"""``.pt`` artifacts: train checkpoints and deploy models, loadable with ``weights_only=True``.

A file holds ``{"vismlp_deploy": {...metadata...}, "state_dict": {...}}``. Metadata names
the format (``arch``), the upstream ``config``, the ``form`` (train/deploy) and the package
version, so ``load_checkpoint`` needs no ``--arch``. A deploy model is rebuilt from its
train-time structure: build -> randomize (non-trivial statistics, so that every value-
dependent refusal is taken as on real weights) -> reparameterize -> strict load.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..checkpoint.io import META_KEY, read_checkpoint
from ..checkpoint.load import check_values
from ..errors import CheckpointError, UserError
from ..models.footprint import check_footprint
from ..models.init import randomize_
from ..models.registry import get_format
from ..reparam import reparameterize


def artifact_dict(model: nn.Module, form: str, extra: dict | None = None) -> dict:
    meta = {"arch": model.arch, "config": model.config, "form": form, "version": __version__,
            "input_size": list(model.input_size), **(extra or {})}
    return {META_KEY: meta, "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}


def save_model(model: nn.Module, path: Path, form: str, extra: dict | None = None) -> None:
    """Write ``model`` (with ``arch``/``config``/``input_size`` attributes) to ``path``."""
    torch.save(artifact_dict(model, form, extra), path)


def load_deploy(path: str | Path, max_memory: int | None = None) -> nn.Module:
    """The deploy model saved by ``vismlp-deploy convert --to pt``.

    Metadata and weights are checked before the train-time skeleton is built: ``arch``, ``config`` and
    ``input_size`` present, the skeleton within ``max_memory`` bytes (None: half the available memory),
    the weights of the kind and values the deploy model takes (``check_values``).
    """
    ckpt = read_checkpoint(path)
    meta = ckpt.meta or {}
    if meta.get("form") != "deploy":
        raise CheckpointError(f"{path} is not a deploy model written by vismlp-deploy (form={meta.get('form')!r})")
    missing = [k for k in ("arch", "config", "input_size") if meta.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: the deploy model's metadata lacks {', '.join(missing)}; "
                              "re-run `vismlp-deploy convert`")
    fmt = get_format(meta["arch"])
    input_size = tuple(meta["input_size"])
    try:
        check_footprint(fmt, meta["config"], input_size, max_bytes=max_memory)
    except UserError as e:
        raise CheckpointError(f"{path}: {e}") from None
    skeleton = randomize_(fmt.build(dict(meta["config"])), seed=0).eval()
    skeleton.input_size = input_size
    deploy = reparameterize(skeleton, count=False)
    check_values(deploy.state_dict(), ckpt.state_dict)
    try:
        deploy.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: deploy weights do not fit the rebuilt deploy structure "
                              f"({str(e).splitlines()[0]})") from None
    deploy.arch, deploy.config, deploy.input_size = meta["arch"], meta["config"], input_size
    return deploy.eval()
