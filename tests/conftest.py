"""Shared fixtures: a real tiny tokenizer (ChatML template) and a real tiny checkpoint on disk, built offline."""

from __future__ import annotations

import pytest

from lit_echo.tiny import build_tiny_tokenizer, save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Directory with a tiny random Qwen2 model and its tokenizer (``save_pretrained`` format)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    """The tiny checkpoint's tokenizer, loaded the way the product loads one (a test module may override it)."""
    from lit_echo import models

    return models.load_tokenizer(str(tiny_checkpoint))
