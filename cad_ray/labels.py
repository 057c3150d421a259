"""Labels as the judges and the prompt sets compare them."""

from __future__ import annotations


def label_key(text) -> str:
    """A label or concept name with case and spaces aside: a concept is named `english_springer`, a prompt set's
    class is "English springer"."""
    return str(text).strip().lower().replace(" ", "_")
