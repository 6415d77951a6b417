"""Every full-size schema of schemas.json is detected as its named config, from keys and shapes only.

The state_dicts are ``torch.empty`` tensors of the published shapes (no weights needed:
detection reads names and shapes). A schema whose format is not registered yet is skipped
by name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from vismlp_deploy.checkpoint.detect import CLASS_KEYS, detect_format, expected_shapes, mapped_shapes
from vismlp_deploy.errors import CheckpointError
from vismlp_deploy.models.registry import CONFIGS, FORMATS, formats

HERE = Path(__file__).parent
_shared = HERE.parent.parent / "shared" / "conformance" / "schemas.json"
SCHEMAS: dict = json.loads((_shared if _shared.is_file() else HERE / "conformance" / "schemas.json").read_text())

# Constructor arguments that no inference-time weight or op depends on: regularization,
# timm's registry name, the initial value of a layer-scale the checkpoint overwrites, and
# the branch kernels of a RepMLPNet that are folded away in its deploy form.
TRAINING_ONLY = {"timm_model_name", "drop_rate", "drop_path_rate", "dp_rate"}
IRRELEVANT_FOR = {"official-repmlpnet-deploy": {"reparam_conv_k"}}


def _state_dict(schema: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
            for k, shape in schema["keys"].items()}


def _norm(key: str, value):
    if key == "block_layer" and isinstance(value, str):  # "ResBlock(init_values=1e-5)": init only
        return re.sub(r"\(init_values=[^)]*\)", "", value)
    return json.loads(json.dumps(value))  # tuples -> lists


def _relevant(config: dict, fmt: str) -> dict:
    skip = TRAINING_ONLY | IRRELEVANT_FOR.get(fmt, set())
    return {k: _norm(k, v) for k, v in config.items() if k not in skip}


def _named_with_this_config(schema: dict) -> set[str]:
    """Named configs of the schema's format with the same arguments (class count aside)."""
    want = {k: v for k, v in _relevant(schema["config"], schema["format"]).items() if k not in CLASS_KEYS}
    return {nc.name for nc in CONFIGS.values() if nc.format == schema["format"]
            and all(_norm(k, nc.config.get(k)) == v for k, v in want.items() if k in nc.config)
            and not (set(want) - set(nc.config)) - {"in_chans", "in_channels", "deploy"}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema_detected_as_its_named_config(name: str) -> None:
    formats()
    schema = SCHEMAS[name]
    if schema["format"] not in FORMATS:
        pytest.skip(f"format {schema['format']} ({name}) not registered yet")
    sd = _state_dict(schema)
    det = detect_format(sd)
    assert det.format.name == schema["format"], det.how
    got = _relevant(det.config, schema["format"])
    want = _relevant(schema["config"], schema["format"])
    wrong = {k: (v, got.get(k, "<absent>")) for k, v in want.items() if got.get(k, "<absent>") != v}
    assert not wrong, f"{name}: (schema, detected) differ: {wrong}"
    # the detected config builds exactly the published key set and shapes (what strict loading needs)
    built = expected_shapes(det.format, det.config)
    assert built is not None and {k: v for k, v in built.items()} == mapped_shapes(det.format, sd)
    named = _named_with_this_config(schema)
    if named:
        assert det.named in named, f"{name}: named {det.named}, expected one of {named}"
    if det.named is not None:  # a named config's network has exactly these shapes
        nc = CONFIGS[det.named]
        assert FORMATS[nc.format].family == det.format.family
    assert det.confidence in ("high", "medium") and det.how


def test_every_schema_names_a_zoo_config_when_its_family_has_one() -> None:
    """A registered full-size schema without any named config is a gap in the zoo (listed here)."""
    formats()
    gaps = []
    for name, schema in SCHEMAS.items():
        fmt = FORMATS.get(schema["format"])
        if fmt is None or not any(FORMATS[c.format].family == fmt.family
                                  for c in CONFIGS.values() if c.format in FORMATS):
            continue
        if fmt.name.endswith("-deploy"):  # deploy key sets name no train-time config
            continue
        if detect_format(_state_dict(schema)).named is None:
            gaps.append(name)
    assert not gaps, f"schemas with no matching named config: {gaps}"


def test_class_count_is_read_not_matched() -> None:
    """A fine-tuned head (10 classes) is still the named network, with its own class count."""
    formats()
    schema = SCHEMAS["mixer_s16_224"]
    if schema["format"] not in FORMATS:
        pytest.skip("timm-mixer not registered yet")
    sd = _state_dict(schema)
    sd["head.weight"], sd["head.bias"] = torch.empty(10, 512), torch.empty(10)
    det = detect_format(sd)
    assert det.named == "mixer_s16" and det.config["num_classes"] == 10


def test_unknown_layout_is_refused_with_the_keys() -> None:
    with pytest.raises(CheckpointError, match="no supported key layout.*foo.weight"):
        detect_format({"foo.weight": torch.empty(3, 3), "bar.bias": torch.empty(3)})


def test_a_broken_schema_names_the_misfit() -> None:
    """Keys of a format with one tensor of a wrong shape: the reason names the key."""
    formats()
    schema = SCHEMAS["resmlp_12_224"]
    if schema["format"] not in FORMATS:
        pytest.skip("timm-resmlp not registered yet")
    sd = _state_dict(schema)
    sd["blocks.3.mlp_channels.fc2.weight"] = torch.empty(384, 1000)
    with pytest.raises(CheckpointError, match=r"blocks\.3\.mlp_channels\.fc2\.weight.*\(384, 1536\).*\(384, 1000\)"):
        detect_format(sd)


def test_assumptions_are_reported_and_lower_the_confidence(monkeypatch) -> None:
    """A format's ``assumptions`` (arguments no weight can tell) become notes; confidence drops to medium."""
    import dataclasses

    formats()
    schema = SCHEMAS["mixer_b16_224"]
    if schema["format"] not in FORMATS:
        pytest.skip("timm-mixer not registered yet")
    base = FORMATS["timm-mixer"]
    assert detect_format(_state_dict(schema)).confidence == "high"
    guessed = dataclasses.replace(base, assumptions=lambda c: {"act_layer": "not stored in the weights; timm default"})
    monkeypatch.setitem(FORMATS, "timm-mixer", guessed)
    det = detect_format(_state_dict(schema))
    assert det.confidence == "medium" and det.named == "mixer_b16"
    assert det.notes == ["act_layer=None: not stored in the weights; timm default"]
