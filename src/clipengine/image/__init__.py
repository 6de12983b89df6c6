"""Image side of CLIP: decoding any input to a PIL image, and preprocessing to model pixels (no torch).

The `preprocess` function is not re-exported here: it would shadow the `preprocess` submodule
(`import clipengine.image.preprocess as p` would then bind the function).
"""

from __future__ import annotations

from clipengine.image.decode import MAX_IMAGE_PIXELS, decode_image, open_image
from clipengine.image.preprocess import (
    OPENAI_MEAN,
    OPENAI_STD,
    PreprocessConfig,
    preprocess_batch,
    preprocess_image,
)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PreprocessConfig",
    "decode_image",
    "open_image",
    "preprocess_batch",
    "preprocess_image",
]
