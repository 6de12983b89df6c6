"""Weights registry: every OpenAI release with its real URL/checksum, LAION tags, and lookup errors."""

from __future__ import annotations

import re

import pytest

from clipengine.errors import UnknownModelError
from clipengine.models.config import architecture_names, get_config
from clipengine.models.registry import architectures, default_tag, get_source, sources, tags

OPENAI = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


@pytest.mark.parametrize("arch", OPENAI)
def test_openai_release_url_embeds_its_sha256(arch: str) -> None:
    src = get_source(arch, "openai")
    assert src.format == "openai" and src.quick_gelu
    assert src.url is not None and src.sha256 is not None
    assert re.fullmatch(r"[0-9a-f]{64}", src.sha256)
    assert src.url == f"https://openaipublic.azureedge.net/clip/models/{src.sha256}/{src.filename}"
    assert default_tag(arch) == "openai"


@pytest.mark.parametrize("src", [s for s in sources() if s.arch != "tiny-synth"], ids=lambda s: s.key)
def test_preprocess_size_matches_architecture(src) -> None:  # type: ignore[no-untyped-def]
    assert src.arch in architecture_names()
    assert src.preprocess.image_size == get_config(src.arch).vision.image_size


def test_laion_entries_are_gelu_hub_files_without_known_checksum() -> None:
    laion = [s for s in sources() if s.format == "open_clip" and "huggingface.co" in (s.url or "")]
    assert {s.arch for s in laion} >= {
        "ViT-B-32",
        "ViT-B-16",
        "ViT-L-14",
        "ViT-H-14",
        "ViT-g-14",
        "ViT-bigG-14",
    }
    for s in laion:
        assert not s.quick_gelu and s.sha256 is None
        assert s.url is not None and s.url.startswith("https://huggingface.co/laion/")
        assert s.url.endswith("/resolve/main/open_clip_pytorch_model.bin")
    assert get_source("ViT-L-14", "laion2b_s32b_b82k").preprocess.mean == (0.5, 0.5, 0.5)


def test_tiny_synth_is_packaged() -> None:
    src = get_source("tiny-synth")
    assert (src.tag, src.url, src.format, src.package_dir) == (
        "synthetic",
        None,
        "clipengine",
        "weights/tiny-synth",
    )
    assert "tiny-synth" in architectures() and tags("tiny-synth") == ["synthetic"]


def test_unknown_tag_lists_available_tags() -> None:
    with pytest.raises(UnknownModelError, match="available: openai, laion2b_s34b_b79k"):
        get_source("ViT-B-32", "nope")


def test_unknown_architecture_lists_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="known: RN50, RN101"):
        get_source("ViT-Q-99")


@pytest.mark.parametrize(
    ("arch", "tag", "suggestion"),
    [
        ("tiny-synht", None, "tiny-synth"),  # a typo
        ("vit-b-32", None, "ViT-B-32"),  # another case
        ("ViT-B-32", "OpenAI", "openai"),
        ("ViT-B-32", "laion2b_s34b_b79", "laion2b_s34b_b79k"),
    ],
)
def test_a_mistyped_name_or_tag_suggests_the_close_one(arch: str, tag: str | None, suggestion: str) -> None:
    with pytest.raises(UnknownModelError, match=f"did you mean '{suggestion}'"):
        get_source(arch, tag)


def test_a_name_close_to_nothing_suggests_nothing() -> None:
    with pytest.raises(UnknownModelError) as caught:
        get_source("ViT-Q-99")
    assert "did you mean" not in str(caught.value)


def test_an_unknown_architecture_config_suggests_the_close_one() -> None:
    from clipengine.models.config import get_config

    with pytest.raises(UnknownModelError, match="did you mean 'ViT-B-16'"):
        get_config("ViT-B-61")


GITHUB_RELEASES = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/"
OPEN_CLIP_RELEASES = [s for s in sources() if (s.url or "").startswith(GITHUB_RELEASES)]


GITHUB_RELEASE_KEYS = {
    "RN50@yfcc15m",
    "RN50@cc12m",
    "RN101@yfcc15m",
    "ViT-B-32@laion400m_e31",
    "ViT-B-32@laion400m_e32",
    "ViT-B-32@laion2b_e16",
    "ViT-B-16@laion400m_e31",
    "ViT-B-16@laion400m_e32",
    "ViT-L-14@laion400m_e31",
    "ViT-L-14@laion400m_e32",
}


def test_open_clip_github_releases_are_registered() -> None:
    assert {s.key for s in OPEN_CLIP_RELEASES} == GITHUB_RELEASE_KEYS


@pytest.mark.parametrize("src", OPEN_CLIP_RELEASES, ids=lambda s: s.key)
def test_open_clip_release_carries_its_names_checksum_prefix_and_activation(src) -> None:  # type: ignore[no-untyped-def]
    assert src.format == "open_clip" and src.url == GITHUB_RELEASES + src.filename
    # "vit_b_32-quickgelu-laion400m_e32-46683a32.pt": the file name ends in its SHA-256's first 8 digits
    assert re.fullmatch(r"[0-9a-f]{8}", src.sha256) and src.filename.rsplit(".", 1)[0].endswith("-" + src.sha256)
    assert src.tag in src.filename
    # QuickGELU-trained files say so in their names; a GELU build of them loses accuracy silently.
    assert src.quick_gelu == ("-quickgelu-" in src.filename)


def test_quickgelu_flags_of_the_open_clip_releases() -> None:
    quick = {s.key for s in sources() if s.quick_gelu and s.tag != "openai"}
    assert quick == {
        "RN50@yfcc15m",
        "RN50@cc12m",
        "RN101@yfcc15m",
        "ViT-B-32@laion400m_e31",
        "ViT-B-32@laion400m_e32",
    }


@pytest.mark.parametrize(
    ("arch", "repo"),
    [
        ("ViT-B-32", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
        ("ViT-B-16", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
        ("ViT-L-14", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
    ],
)
def test_datacomp_xl_entries_are_gelu_hub_files_with_openai_normalisation(arch: str, repo: str) -> None:
    src = get_source(arch, "datacomp_xl_s13b_b90k")
    assert src.url == f"https://huggingface.co/{repo}/resolve/main/open_clip_pytorch_model.bin"
    assert not src.quick_gelu and src.sha256 is None
    assert src.preprocess == get_source(arch, "openai").preprocess  # OpenAI's mean / std


def test_every_checksum_is_a_whole_sha256_or_an_8_digit_prefix() -> None:
    for src in sources():
        assert src.sha256 is None or re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{8}", src.sha256), src.key


def test_new_tags_keep_the_default_weights() -> None:
    defaults = {arch: default_tag(arch) for arch in architectures()}
    assert defaults["ViT-B-32"] == "openai" and defaults["RN50"] == "openai"
    assert defaults["ViT-g-14"] == "laion2b_s34b_b88k"  # the better g-14 stays the default


def test_the_quickgelu_spelling_of_a_laion400m_tag_resolves() -> None:
    from clipengine.models.spec import parse_spec

    spec = parse_spec("ViT-B/32-quickgelu@laion400m_e32")  # the example in ModelSpec's docstring
    src = get_source(spec.name, spec.tag)
    assert src.key == "ViT-B-32@laion400m_e32" and src.quick_gelu and spec.quick_gelu
