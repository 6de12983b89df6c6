"""Known pretrained weights: architecture -> tag -> WeightSource (where, checksum, format, preprocessing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UnknownModelError
from ..image.preprocess import PreprocessConfig
from .spec import did_you_mean

__all__ = [
    "WeightFormat",
    "WeightSource",
    "architectures",
    "default_tag",
    "get_source",
    "sources",
    "tags",
]

# "openai": TorchScript archive or plain state dict with OpenAI keys; QuickGELU.
# "open_clip": plain state dict (.bin / .safetensors) with OpenAI-style keys, or an open_clip training
# checkpoint ({"epoch", "name", "state_dict": {"module.<key>": ...}, ...}: its GitHub releases);
# GELU unless the entry says otherwise.
# "hf": transformers CLIPModel folder. "clipengine": our own folder (config.json + model.safetensors).
WeightFormat = Literal["openai", "open_clip", "hf", "clipengine"]

_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{filename}"
_HF_URL = "https://huggingface.co/{repo}/resolve/main/{filename}"
_GITHUB_URL = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/{filename}"
_OPEN_CLIP_FILE = "open_clip_pytorch_model.bin"
_INCEPTION_MEAN_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class WeightSource:
    """One downloadable (or packaged) set of weights and the preprocessing it was trained with."""

    arch: str  # architecture config name, e.g. "ViT-B-32"
    tag: str  # pretrained tag, e.g. "openai"
    url: str | None  # where to download from; None for weights shipped inside the package
    # Expected SHA-256 of the file (hex), or its leading hex digits where only those are published
    # (open_clip's GitHub releases end their file names in 8, and open_clip checks just those);
    # None = unknown (verified only when known).
    sha256: str | None
    filename: str  # file name inside the cache folder (or the package folder)
    format: WeightFormat
    quick_gelu: bool  # activation the weights were trained with (cannot be read from shapes)
    preprocess: PreprocessConfig
    package_dir: str | None = None  # folder inside the clipengine package, for shipped weights

    @property
    def key(self) -> str:
        """The name users pass to `clipengine download`: ARCH@TAG."""
        return f"{self.arch}@{self.tag}"


def _openai(arch: str, sha256: str, filename: str, image_size: int = 224) -> WeightSource:
    return WeightSource(
        arch=arch,
        tag="openai",
        url=_OPENAI_URL.format(sha256=sha256, filename=filename),
        sha256=sha256,  # OpenAI's URLs embed the file's SHA-256
        filename=filename,
        format="openai",
        quick_gelu=True,
        preprocess=PreprocessConfig(image_size=image_size),
    )


def _laion(arch: str, tag: str, repo: str, inception_norm: bool = False) -> WeightSource:
    norm = {"mean": _INCEPTION_MEAN_STD, "std": _INCEPTION_MEAN_STD} if inception_norm else {}
    return WeightSource(
        arch=arch,
        tag=tag,
        url=_HF_URL.format(repo=repo, filename=_OPEN_CLIP_FILE),
        sha256=None,  # not published; the checksum is verified only for entries that carry one
        filename=_OPEN_CLIP_FILE,
        format="open_clip",
        quick_gelu=False,
        preprocess=PreprocessConfig(image_size=224, **norm),  # type: ignore[arg-type]
    )


def _open_clip_release(arch: str, tag: str, filename: str, *, quick_gelu: bool) -> WeightSource:
    """A training checkpoint from open_clip's GitHub release `v0.2-weights`.

    `quick_gelu` is stated per entry, never guessed: open_clip names the file `...-quickgelu-...` and
    registers the tag with `quick_gelu=True` when the weights were trained with QuickGELU.
    """
    return WeightSource(
        arch=arch,
        tag=tag,
        url=_GITHUB_URL.format(filename=filename),
        sha256=filename.rsplit(".", 1)[0].rsplit("-", 1)[1],  # "...-d867053b.pt": the SHA-256's first 8 digits
        filename=filename,
        format="open_clip",
        quick_gelu=quick_gelu,
        preprocess=PreprocessConfig(image_size=224),
    )


_SOURCES: tuple[WeightSource, ...] = (
    _openai("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    _openai("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    _openai("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt", 288),
    _openai("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt", 384),
    _openai("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt", 448),
    _openai("ViT-B-32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    _openai("ViT-B-16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    _openai("ViT-L-14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    _openai(
        "ViT-L-14-336",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        "ViT-L-14-336px.pt",
        336,
    ),
    _laion("ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    _laion("ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    # This one was trained with Inception normalisation (mean = std = 0.5), per open_clip's registry.
    _laion("ViT-L-14", "laion2b_s32b_b82k", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", inception_norm=True),
    _laion("ViT-H-14", "laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    _laion("ViT-g-14", "laion2b_s34b_b88k", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"),
    _laion("ViT-bigG-14", "laion2b_s39b_b160k", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
    # The rest of open_clip's plain-CLIP weights for these architectures (src/open_clip/pretrained.py).
    # DataComp-XL (GELU, OpenAI normalisation).
    _laion("ViT-B-32", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    _laion("ViT-B-16", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    _laion("ViT-L-14", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
    _laion("ViT-g-14", "laion2b_s12b_b42k", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"),
    # GitHub releases. QuickGELU: the YFCC-15M / CC-12M ResNets and the LAION-400M ViT-B-32 (file names
    # say "quickgelu"; open_clip registers them with quick_gelu=True and, in older releases, under the
    # "-quickgelu" architecture names; its maintainer on QuickGELU, open_clip issue #510: "one mistake on
    # the initial laion400m B/32 that used it instead of nn.GELU"). The LAION-400M ViT-B-16 / ViT-L-14 and
    # LAION-2B ViT-B-32 e16 runs used GELU (no "quickgelu" in their names, registered without the flag).
    _open_clip_release("RN50", "yfcc15m", "rn50-quickgelu-yfcc15m-455df137.pt", quick_gelu=True),
    _open_clip_release("RN50", "cc12m", "rn50-quickgelu-cc12m-f000538c.pt", quick_gelu=True),
    _open_clip_release("RN101", "yfcc15m", "rn101-quickgelu-yfcc15m-3e04b30e.pt", quick_gelu=True),
    _open_clip_release("ViT-B-32", "laion400m_e31", "vit_b_32-quickgelu-laion400m_e31-d867053b.pt", quick_gelu=True),
    _open_clip_release("ViT-B-32", "laion400m_e32", "vit_b_32-quickgelu-laion400m_e32-46683a32.pt", quick_gelu=True),
    _open_clip_release("ViT-B-32", "laion2b_e16", "vit_b_32-laion2b_e16-af8dbd0c.pth", quick_gelu=False),
    _open_clip_release("ViT-B-16", "laion400m_e31", "vit_b_16-laion400m_e31-00efa78f.pt", quick_gelu=False),
    _open_clip_release("ViT-B-16", "laion400m_e32", "vit_b_16-laion400m_e32-55e67d44.pt", quick_gelu=False),
    _open_clip_release("ViT-L-14", "laion400m_e31", "vit_l_14-laion400m_e31-69988bb6.pt", quick_gelu=False),
    _open_clip_release("ViT-L-14", "laion400m_e32", "vit_l_14-laion400m_e32-3d133497.pt", quick_gelu=False),
    # Tiny model trained on synthetic data and shipped in the package (its config.json is authoritative).
    WeightSource(
        arch="tiny-synth",
        tag="synthetic",
        url=None,
        sha256=None,
        filename="model.safetensors",
        format="clipengine",
        quick_gelu=False,  # unused: the folder's config.json says
        preprocess=PreprocessConfig(image_size=32),  # unused: the folder's config.json says
        package_dir="weights/tiny-synth",
    ),
)

_BY_ARCH: dict[str, dict[str, WeightSource]] = {}
for _s in _SOURCES:
    _BY_ARCH.setdefault(_s.arch, {})[_s.tag] = _s


def architectures() -> list[str]:
    """Architectures that have at least one registered set of weights, in registry order."""
    return list(_BY_ARCH)


def tags(arch: str) -> list[str]:
    """Pretrained tags for `arch` (empty if none are registered)."""
    return list(_BY_ARCH.get(arch, {}))


def sources() -> list[WeightSource]:
    """Every registered WeightSource, in registry order."""
    return list(_SOURCES)


def _no_weights(arch: str) -> UnknownModelError:
    return UnknownModelError(
        f"no pretrained weights registered for {arch!r}{did_you_mean(arch, architectures())}; "
        f"known: {', '.join(architectures())} "
        "(or pass a checkpoint path)"
    )


def default_tag(arch: str) -> str:
    """The tag used when none is given: "openai" if present, else the first registered one.

    Raises:
        UnknownModelError: no weights are registered for `arch`.
    """
    known = tags(arch)
    if not known:
        raise _no_weights(arch)
    return "openai" if "openai" in known else known[0]


def get_source(arch: str, tag: str | None = None) -> WeightSource:
    """The WeightSource for `arch@tag` (default tag when `tag` is None).

    Raises:
        UnknownModelError: unknown architecture or tag; the message lists the valid ones.
    """
    by_tag = _BY_ARCH.get(arch)
    if not by_tag:
        raise _no_weights(arch)
    tag = tag or default_tag(arch)
    if tag not in by_tag:
        raise UnknownModelError(
            f"unknown pretrained tag {tag!r} for {arch}{did_you_mean(tag, by_tag)}; available: {', '.join(by_tag)}"
        )
    return by_tag[tag]
