"""The guide's axolotl-key table is the generated one: it cannot drift from the loader."""

from __future__ import annotations

from pathlib import Path

from ebft.config import IGNORED_AXOLOTL_KEYS, TrainConfig
from ebft.config.reference import BEGIN, END, axolotl_keys_markdown, replace_in

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"


def test_the_guide_holds_the_current_table():
    text = GUIDE.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert replace_in(text) == text, "regenerate it: python -m ebft.config.reference docs/guide.md"


def test_the_table_names_every_key():
    table = axolotl_keys_markdown()
    assert all(f"`{key}`" in table for key in TrainConfig.model_fields)
    assert all(f"| `{key}` | ignored |" in table for key in IGNORED_AXOLOTL_KEYS)
    assert "| `flash_attention: true` | mapped | read as `attn_implementation: flash_attention_2` |" in table
    assert "| `report_to` | mapped |" in table
