"""Parse a user's model reference ("ViT-B-32@openai", "hf-hub:org/name", a path) once into a ModelSpec."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import CheckpointError, UnknownModelError

__all__ = ["CHECKPOINT_SUFFIXES", "ModelSpec", "SpecKind", "did_you_mean", "parse_spec"]

SpecKind = Literal["registry", "hf-hub", "file", "folder"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_HF_PREFIX = "hf-hub:"
_QUICKGELU_SUFFIX = "-quickgelu"
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OPENAI_SLASH_NAME = re.compile(r"^ViT-[A-Za-z]+/\d+")  # "ViT-B/32", "ViT-L/14@336px"
# OpenAI's own spelling of the 336 px model; "@336px" there is a resolution, not a pretrained tag.
_ALIASES = {"ViT-L/14@336px": "ViT-L-14-336", "ViT-L-14@336px": "ViT-L-14-336"}


@dataclass(frozen=True)
class ModelSpec:
    """What to load, decided once; downstream code never re-splits the user's string.

    Example:
        >>> parse_spec("ViT-B/32-quickgelu@laion400m_e32")
        ModelSpec(kind='registry', name='ViT-B-32', tag='laion400m_e32', path=None, quick_gelu=True, ...)
    """

    kind: SpecKind
    name: str  # architecture ("ViT-B-32"), hub repo ("org/name"), or the path as given
    tag: str | None = None  # pretrained tag ("openai", "laion2b_s34b_b79k"); registry only
    path: Path | None = None  # local file or folder; file/folder only
    quick_gelu: bool | None = None  # forced by a "-quickgelu" name; None = decided by the weights' format
    raw: str = ""  # the string the user gave, for messages

    @property
    def display(self) -> str:
        """Canonical short form: "ViT-B-32@openai", "hf-hub:org/name", or the path."""
        if self.kind == "registry":
            base = self.name + (_QUICKGELU_SUFFIX if self.quick_gelu else "")
            return f"{base}@{self.tag}" if self.tag else base
        if self.kind == "hf-hub":
            return _HF_PREFIX + self.name
        return str(self.path)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """The suffix " (did you mean 'X'?)" for the choice closest to a mistyped `word` ("vit-b-32",
    "tiny-synht"), or "" when none is close. Case is ignored: a name typed in another case is the likeliest slip.
    """
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.75)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def _looks_like_path(text: str) -> bool:
    if _OPENAI_SLASH_NAME.match(text):
        return False
    return (
        "/" in text
        or "\\" in text
        or text.startswith((".", "~"))
        or text.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def _interrupted_save(path: Path) -> str:
    """A hint when `models.saving.save_model` was killed between its two renames: the folder is gone
    and the previous save waits beside it as `.NAME.<random>.old`."""
    try:
        previous = sorted(path.parent.glob(f".{path.name}.*.old"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return ""
    if not previous:
        return ""
    return f"; a save into it was interrupted, and the previous save is in {previous[-1]}: rename it back to {path}"


def parse_spec(name_or_path: str | Path, pretrained: str | None = None) -> ModelSpec:
    """Turn a model name, `NAME@TAG`, `hf-hub:org/name` or a local path into a ModelSpec.

    Args:
        name_or_path: "ViT-B-32", "ViT-B/32" (OpenAI spelling), "ViT-B-32@laion2b_s34b_b79k",
            "ViT-B-32-quickgelu", "hf-hub:org/name", or a checkpoint file / model folder path.
        pretrained: the tag as a separate argument (open_clip style); must agree with any "@TAG".

    Raises:
        CheckpointError: the string looks like a path but nothing exists there.
        UnknownModelError: malformed hub id, empty name or tag around "@", or conflicting tags.
    """
    raw = str(name_or_path)
    text = raw.strip()
    if not text:
        raise UnknownModelError("empty model name; run `clipengine models` to list the names")
    if isinstance(name_or_path, Path) or not text.startswith(_HF_PREFIX):
        path = Path(text).expanduser()
        if path.exists():
            if pretrained is not None:
                raise UnknownModelError(
                    f"pretrained={pretrained!r} makes no sense with a local path ({path}); drop it"
                )
            return ModelSpec("folder" if path.is_dir() else "file", str(path), path=path, raw=raw)
        if isinstance(name_or_path, Path) or _looks_like_path(text):
            raise CheckpointError(f"no such checkpoint file or folder: {path}{_interrupted_save(path)}")
    if text.startswith(_HF_PREFIX):
        repo = text[len(_HF_PREFIX) :].strip("/")
        if not _HF_REPO.match(repo):
            raise UnknownModelError(f"bad hub id {text!r}: expected 'hf-hub:ORG/NAME'")
        if pretrained is not None:
            raise UnknownModelError(f"pretrained={pretrained!r} makes no sense with {text!r}; drop it")
        return ModelSpec("hf-hub", repo, raw=raw)
    name, at, given_tag = _ALIASES.get(text, text).partition("@")
    if at and not name.strip():
        raise UnknownModelError(
            f"{text!r} has no model name before '@'; write NAME@TAG, e.g. ViT-B-32@openai"
        )
    if at and not given_tag.strip():
        raise UnknownModelError(
            f"{text!r} has no tag after '@'; write NAME@TAG, or NAME alone for its default weights"
        )
    tag = given_tag.strip() or None
    if tag and pretrained and tag != pretrained:
        raise UnknownModelError(f"conflicting tags: {text!r} names {tag!r} but pretrained={pretrained!r}")
    name = name.strip().replace("/", "-")  # OpenAI spells ViT-B/32; configs use ViT-B-32
    quick_gelu = None
    if name.endswith(_QUICKGELU_SUFFIX):
        name, quick_gelu = name[: -len(_QUICKGELU_SUFFIX)], True
    return ModelSpec("registry", name, tag=tag or pretrained, quick_gelu=quick_gelu, raw=raw)
