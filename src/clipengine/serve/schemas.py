"""Request and response bodies of the HTTP API (pydantic models; they also feed the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ClassifyRequest",
    "ClassifyResponse",
    "EmbeddingsResponse",
    "ErrorResponse",
    "ImagesRequest",
    "InfoResponse",
    "SearchRequest",
    "SearchResponse",
    "TextsRequest",
]


class _Strict(BaseModel):
    # A misspelt field is a 422, not silently ignored; "5" or true is not an int, 1 is not a str.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextsRequest(_Strict):
    texts: list[str] = Field(min_length=1, description="Texts to embed.")


class ImagesRequest(_Strict):
    images: list[str] = Field(min_length=1, description="Base64 images (a data: URL prefix is allowed).")


class ClassifyRequest(_Strict):
    images: list[str] = Field(min_length=1, description="Base64 images.")
    labels: list[str] = Field(min_length=1, description="Candidate labels.")
    templates: list[str] | None = Field(
        default=None, description="Prompt templates with '{}' for the label, e.g. 'a photo of a {}.'"
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        description="Return only the top_k most probable labels per image (default: all; more than the "
        "labels: all). Probabilities stay the softmax over all the labels.",
    )


class SearchRequest(_Strict):
    text: str | None = Field(default=None, description="Text query (give text or image).")
    image: str | None = Field(default=None, description="Base64 image query (give text or image).")
    k: int = Field(default=10, description="Number of results.")


class EmbeddingItem(BaseModel):
    index: int
    name: str | None = None
    embedding: list[float]


class EmbeddingsResponse(BaseModel):
    model: str
    dim: int
    data: list[EmbeddingItem]
    elapsed_ms: float


class LabelProbability(BaseModel):
    label: str
    probability: float


class ClassifyResult(BaseModel):
    index: int
    name: str
    labels: list[LabelProbability] = Field(
        description="Sorted by probability, highest first: every label, or the top_k most probable "
        "(probabilities are the softmax over all the labels either way)."
    )


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassifyResult]
    elapsed_ms: float


class SearchHit(BaseModel):
    id: str = Field(description="Image path relative to one of the index's image roots.")
    score: float = Field(description="Cosine similarity.")
    thumbnail_url: str


class SearchResponse(BaseModel):
    model: str
    k: int
    results: list[SearchHit]
    elapsed_ms: float


class InfoResponse(BaseModel):
    model: str
    embed_dim: int
    image_size: int
    index: dict[str, object] | None
    fidelity: dict[str, object] | None = Field(
        default=None,
        description="null for an fp32 model; else its precision and deviation from fp32 as measured "
        "at export (min cosine per tower), or 'unmeasured' (see clipengine.report.fidelity).",
    )
    limits: dict[str, object]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
