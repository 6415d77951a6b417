"""Generic pass on models written by others vs. the family files on the same architecture.

For each foreign model (``foreign_models``: timm, deit, locuslab, lucidrains structures) the
graph pass must leave no more per-channel vectors and norm affines than this package's family
file leaves (same weights where the keys map, same architecture otherwise), be exact to 1e-5
in float32 and 1e-10 in float64, and name every thing it left with a reason.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import foreign_models as fm
import pytest
import torch
from helpers import assert_close
from torch import nn

from vismlp_deploy import reparameterize
from vismlp_deploy.errors import UserError
from vismlp_deploy.models.convmixer import ConvMixer, _official_to_model
from vismlp_deploy.models.mixer import MlpMixer
from vismlp_deploy.models.resmlp import ResMLP, deit_to_timm_keys
from vismlp_deploy.reparam.graph import fold_graph

X = torch.randn(2, 3, 32, 32)  # 32px, patch 8 (16 tokens, dim 24) / patch 4 (ConvMixer, dim 16)


def _family(name: str, model: nn.Module) -> nn.Module | None:
    """This package's model of the same architecture, with the foreign weights where the keys map."""
    sd = model.state_dict()
    fam, keys = {
        "timm_resmlp": (lambda: ResMLP(32, 8, 3, 10, 24, 2, 4), lambda: sd),
        "deit_resmlp": (lambda: ResMLP(32, 8, 3, 10, 24, 2, 4), lambda: deit_to_timm_keys(sd)),
        "lucidrains_resmlp": (lambda: ResMLP(32, 8, 3, 10, 24, 2, 4), None),
        "timm_mixer": (lambda: MlpMixer(32, 8, 3, 10, 24, 2, (0.5, 4.0)), lambda: sd),
        "lucidrains_mixer": (lambda: MlpMixer(32, 8, 3, 10, 24, 2, (0.5, 4.0)), None),
        "timm_convmixer_gelu": (lambda: ConvMixer(16, 2, 5, 4, 3, 10, "GELU"), lambda: sd),
        "timm_convmixer_relu": (lambda: ConvMixer(16, 2, 5, 4, 3, 10, "ReLU"), lambda: sd),
        "locuslab_convmixer_gelu": (lambda: ConvMixer(16, 2, 5, 4, 3, 10, "GELU"), lambda: _official_to_model(sd)),
        "locuslab_convmixer_relu": (lambda: ConvMixer(16, 2, 5, 4, 3, 10, "ReLU"), lambda: _official_to_model(sd)),
    }.get(name, (None, None))
    if fam is None:
        return None
    family = fm.randomize_foreign_(fam(), seed=5)
    if keys is not None:
        family.load_state_dict(keys())
        with torch.no_grad():  # same weights: both deploy forms compute the same function
            assert_close(family.eval()(X), model(X))
    return family.eval()


FOREIGN = {
    "timm_resmlp": fm.timm_resmlp, "deit_resmlp": fm.deit_resmlp, "lucidrains_resmlp": fm.lucidrains_resmlp,
    "timm_mixer": fm.timm_mixer, "lucidrains_mixer": fm.lucidrains_mixer, "timm_gmlp": fm.timm_gmlp,
    "timm_convmixer_gelu": lambda: fm.timm_convmixer(act="GELU"),
    "timm_convmixer_relu": lambda: fm.timm_convmixer(act="ReLU"),
    "locuslab_convmixer_gelu": lambda: fm.locuslab_convmixer(act="GELU"),
    "locuslab_convmixer_relu": lambda: fm.locuslab_convmixer(act="ReLU"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_generic_pass_matches_the_family_file(name):
    model = fm.randomize_foreign_(FOREIGN[name](), seed=3).eval()
    before = fm.affine_census(model)
    out, rep = fm.fold_checked(model, X, seed=3)  # exact in fp32 (1e-5) and fp64 (1e-10): checked inside
    got = fm.affine_census(out)
    family = _family(name, model)
    if family is None:  # gMLP has no family file: its spatial gating units' LayerNorms are what must stay
        want = fm.Census(vectors=2 * 2, norm_affines=2, tables=0)  # gamma/beta cannot cross the gate u * v
    else:
        want = fm.affine_census(reparameterize(family, count=False))
    assert got.vectors <= want.vectors and got.norm_affines <= want.norm_affines, (got, want)
    assert got.vectors < before.vectors
    model64, x64 = copy.deepcopy(model).double(), X.double()
    out64, _ = fold_graph(model64, x64)
    with torch.no_grad():
        assert_close(out64(x64), model64(x64), 1e-10)
    _every_thing_left_is_reported(out, rep)


def _every_thing_left_is_reported(out: nn.Module, rep) -> None:
    """Each norm module with an affine and each per-channel constant still applied has a reason."""
    paths = {p for x in rep.left for p in x.path.split(",")}
    assert all(x.reason for x in rep.left)
    for name, mod in out.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) or getattr(mod, "weight", None) is not None and \
                isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            assert name in paths, (name, paths)
    for node in out.graph.nodes:
        if node.op == "get_attr" and "origin" in node.meta:
            assert set(node.meta["origin"].split(",")) <= paths, (node.meta["origin"], paths)


# ------------------------------------------------------------------ walker: timm's input size
@dataclass
class PretrainedCfg:  # shaped like timm's dataclass: attributes, no .get
    input_size: tuple = (3, 32, 32)
    num_classes: int = 10


class CfgObject:  # an object with .get (a config mapping that is not a dict)
    def __init__(self, **kw):
        self._kw = kw

    def get(self, key, default=None):
        return self._kw.get(key, default)


@pytest.mark.parametrize("attr,cfg", [
    ("pretrained_cfg", {"input_size": (3, 32, 32)}),
    ("default_cfg", PretrainedCfg()),
    ("pretrained_cfg", CfgObject(input_size=[3, 32, 32])),
])
def test_reparameterize_takes_the_input_size_from_timm_cfg(attr, cfg):
    model = fm.randomize_foreign_(fm.timm_resmlp(), seed=2).eval()
    del model.pretrained_cfg
    setattr(model, attr, cfg)
    deploy = reparameterize(model)
    rep = deploy.reparam_report
    assert rep.input_size == (3, 32, 32) and rep.folded
    assert not any("needs example_input" in x.reason for x in rep.left)
    with torch.no_grad():
        assert_close(deploy(X), model(X))


def test_reparameterize_without_any_input_size_says_what_it_needs():
    model = fm.randomize_foreign_(fm.timm_resmlp(), seed=2).eval()
    del model.pretrained_cfg
    rep = reparameterize(model).reparam_report
    assert not rep.folded and "pretrained_cfg" in rep.left[0].reason


@pytest.mark.parametrize("bad", [(3, 0, 32), ("3", 32, 32), (3, 32.5, 32), 7, ()])
def test_malformed_cfg_input_size_is_a_user_error(bad):
    model = fm.timm_mixer().eval()
    model.pretrained_cfg = {"input_size": bad}
    with pytest.raises(UserError, match="pretrained_cfg input_size"):
        reparameterize(model)
