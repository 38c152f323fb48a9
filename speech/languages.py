"""Whisper's language codes and their English names (OpenAI's verbose_json reports the name)."""

from __future__ import annotations

from transformers.models.whisper.tokenization_whisper import LANGUAGES

LANGUAGE_NAMES: dict[str, str] = dict(LANGUAGES)
"""ISO code -> lower-case English name, e.g. "en" -> "english"."""


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)
