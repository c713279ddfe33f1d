"""Versioned prompt templates (flows/prompts/*.txt). A stage puts the prompt text in its fingerprint, so editing
a prompt reruns that stage and the ones after it."""

from __future__ import annotations

from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "flows" / "prompts"


def load_prompt(name: str) -> str:
    """The text of prompt file `name`: a plain ``.txt`` file name inside flows/prompts/, never a path."""
    if Path(name).name != name or not name.endswith(".txt"):
        raise ValueError(f"prompt file {name!r} must be a plain .txt file name inside {PROMPTS_DIR}")
    path = PROMPTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    return path.read_text(encoding="utf-8")
