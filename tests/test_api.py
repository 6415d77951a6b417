"""The Python API contract of design.md: names importable from ``vismlp_deploy``."""
import torch

import vismlp_deploy as vd
import vismlp_deploy.verification.stats  # noqa: F401 - importing a submodule must not shadow the function


def test_public_names_are_callables():
    for name in ("load_checkpoint", "create_model", "reparameterize", "export_onnx", "build_engine", "verify", "bench"):
        assert callable(getattr(vd, name)), name


def test_create_model_train_form_in_eval_mode_with_overrides():
    model = vd.create_model("resmlp_12", num_classes=7)
    assert not model.training
    assert model.arch == "timm-resmlp"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)
