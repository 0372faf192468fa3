"""The SmolLM2 GGUF is dequantised once per file content; later loads read the saved float32 model."""

from __future__ import annotations

import torch

from subspace.models import gguf


def test_a_dequantised_gguf_is_saved_once_per_content_and_read_back_the_same(tmp_path, monkeypatch, tiny):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"one content")
    calls = []
    monkeypatch.setattr(gguf, "dequantised", lambda path: calls.append(path) or tiny)
    first = gguf.load_smollm2_gguf(source, tmp_path / "cache")
    second = gguf.load_smollm2_gguf(source, tmp_path / "cache")
    assert calls == [source]
    assert second.model is not first.model
    saved, loaded = first.model.state_dict(), second.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    chat = [{"role": "user", "content": "How do I bake bread?"}]
    assert (second.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
            == first.tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    assert not second.model.training and not any(p.requires_grad for p in second.model.parameters())
    assert not list((tmp_path / "cache" / "gguf").glob("*.part"))  # nothing half-written is left
    source.write_bytes(b"another content")
    gguf.load_smollm2_gguf(source, tmp_path / "cache")
    assert calls == [source, source]  # a different file is a different key
