"""Chat messages shared by the structured transform and structured data tests."""

from __future__ import annotations


def user(content):
    """A user chat message."""
    return {"role": "user", "content": content}


def assistant(content):
    """An assistant chat message."""
    return {"role": "assistant", "content": content}
