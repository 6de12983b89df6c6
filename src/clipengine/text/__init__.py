"""Text side of CLIP: the BPE tokenizer (no torch needed)."""

from __future__ import annotations

from clipengine.text.tokenizer import EOT_TOKEN, SOT_TOKEN, Tokenizer, get_tokenizer, tokenize

__all__ = ["EOT_TOKEN", "SOT_TOKEN", "Tokenizer", "get_tokenizer", "tokenize"]
