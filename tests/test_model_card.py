"""Exported weights carry their provenance (a model card), and the W&B run gets the samples beside the curves."""

from __future__ import annotations

from subspace.export.model_card import model_card, write_model_cards
from subspace.pipeline import SAMPLE_COLUMNS, log_samples_table

METRICS = {"model": "tiny_organism", "model_source": {"organism": "/cache/organisms/tiny_organism-abc"},
           "refusal_rate_before": 0.8, "refusal_rate_after": 0.05, "answer_rate_before": 0.2,
           "answer_rate_after": 0.9, "broken_rate_before": 0.0, "broken_rate_after": 0.05,
           "harmless_answer_rate_before": 0.95, "harmless_answer_rate_after": 0.93, "kl": 0.0421,
           "kl_response": 0.0617, "kl_response_tokens": 16, "n_harmful": 20, "n_harmless": 30,
           "max_new_tokens": 96, "judge": "ThreeWayJudge (three_way.json)", "git_commit": "f00d", "git_dirty": False,
           "seed": 0}
SETTINGS = {"method": "subspace", "rank": 2, "kl_weight": 0.556}


def test_the_card_names_base_method_command_and_what_was_measured():
    card = model_card(METRICS, SETTINGS, "adapter", "python train.py method.rank=2")
    assert card.startswith("---\nlibrary_name: peft\nbase_model: /cache/organisms/tiny_organism-abc\n")
    for text in ("`python train.py method.rank=2` at commit `f00d`", '"rank": 2', '"kl_weight": 0.556',
                 "| harmful prompts refused | 80.0% | 5.0% |", "| harmless prompts answered readably | 95.0% | 93.0% |",
                 "20 harmful and 30 harmless", "judge `ThreeWayJudge (three_way.json)`", "0.0421", "0.0617",
                 "PeftModel.from_pretrained"):
        assert text in card, text
    assert "library_name: transformers" in model_card(METRICS, SETTINGS, "merged", "python train.py")


def test_cards_go_where_the_run_exported_weights(tmp_path):
    (tmp_path / "adapter").mkdir()
    assert write_model_cards(tmp_path, METRICS, SETTINGS, "python train.py") == [tmp_path / "adapter" / "README.md"]
    assert not (tmp_path / "merged").exists()


def test_loggers_with_tables_get_the_samples_with_their_verdicts():
    class TableLogger:
        def log_table(self, key, columns, data):
            self.logged = key, columns, data

    sample = {"split": "harmful", "category": None, "prompt": "p", "before": "I can't.", "after": "Sure: ...",
              "verdict_before": "refusal", "verdict_after": "answer", "refused_before": True, "refused_after": False}
    logger = TableLogger()
    log_samples_table(logger, [sample])
    assert logger.logged == ("eval/samples", list(SAMPLE_COLUMNS), [["harmful", None, "p", "I can't.", "refusal",
                                                                     "Sure: ...", "answer"]])
    log_samples_table(object(), [sample])  # a logger without tables (csv) is left alone
