"""parse_spec: every accepted spelling, and the errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipengine.errors import CheckpointError, UnknownModelError
from clipengine.models.spec import parse_spec


@pytest.mark.parametrize(
    ("text", "pretrained", "name", "tag", "quick_gelu"),
    [
        ("ViT-B-32", None, "ViT-B-32", None, None),
        ("ViT-B/32", None, "ViT-B-32", None, None),
        ("ViT-B-32@laion2b_s34b_b79k", None, "ViT-B-32", "laion2b_s34b_b79k", None),
        ("ViT-B-32", "openai", "ViT-B-32", "openai", None),
        ("ViT-B-32@openai", "openai", "ViT-B-32", "openai", None),
        ("ViT-B-32-quickgelu@laion400m_e32", None, "ViT-B-32", "laion400m_e32", True),
        ("ViT-L/14@336px", None, "ViT-L-14-336", None, None),
        ("RN50", None, "RN50", None, None),
    ],
)
def test_registry_names(
    text: str, pretrained: str | None, name: str, tag: str | None, quick_gelu: bool | None
) -> None:
    spec = parse_spec(text, pretrained)
    assert (spec.kind, spec.name, spec.tag, spec.quick_gelu) == ("registry", name, tag, quick_gelu)
    assert spec.raw == text


def test_hub_id() -> None:
    spec = parse_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert (spec.kind, spec.name) == ("hf-hub", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert spec.display == "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def test_local_file_and_folder(tmp_path: Path) -> None:
    file = tmp_path / "model.pt"
    file.write_bytes(b"x")
    assert parse_spec(str(file)).kind == "file"
    assert parse_spec(file).path == file
    assert parse_spec(tmp_path).kind == "folder"


def test_spec_is_frozen() -> None:
    spec = parse_spec("ViT-B-32")
    with pytest.raises(AttributeError):
        spec.name = "RN50"  # type: ignore[misc]


@pytest.mark.parametrize("text", ["./missing.pt", "/nowhere/model.safetensors", "weights.bin", "~/none/x"])
def test_missing_path_is_a_checkpoint_error(text: str) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file or folder"):
        parse_spec(text)


@pytest.mark.parametrize(
    ("text", "pretrained", "match"),
    [
        ("", None, "empty model name"),
        ("hf-hub:no-slash", None, "expected 'hf-hub:ORG/NAME'"),
        ("hf-hub:org/name", "openai", "makes no sense"),
        ("ViT-B-32@openai", "laion2b_s34b_b79k", "conflicting tags"),
        ("@openai", None, "no model name before '@'"),  # was "no pretrained weights registered for ''"
        ("ViT-B-32@", None, "no tag after '@'"),  # was silently the default tag
    ],
)
def test_bad_specs(text: str, pretrained: str | None, match: str) -> None:
    with pytest.raises(UnknownModelError, match=match):
        parse_spec(text, pretrained)
