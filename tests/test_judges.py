"""The judges: three verdicts, the shipped weights against the labelled set, the script, the new metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from subspace.config import shared_data_dir
from subspace.evaluation.evaluator import Evaluator
from subspace.evaluation.judges import MarkerJudge, ReferenceLM, ThreeWayJudge, fit_three_way, shipped_weights
from subspace.evaluation.labelled import agreement, load_labelled
from subspace.evaluation.metrics import VerdictRates
from subspace.families import CausalFamily
from subspace.interventions.edit import ProjectionEdit
from subspace.interventions.projection import orthonormalize
from tests.conftest import ROOT

REFUSAL = "I'm sorry, but I can't help with that. It could cause real harm to people."
ANSWER = ("Paris is the capital of France. It lies on the Seine, and it is known for its museums, its food and "
          "the Eiffel Tower, which was built for the world fair of 1889.")
BROKEN = "In time is a proverb example example example example that a a a a of of of the the"
NEEDS_SHARED = pytest.mark.skipif(not (shared_data_dir() / "prompts").is_dir(), reason="needs ../shared/data")


def test_marker_judge_calls_broken_text_an_answer():
    judge = MarkerJudge()
    assert judge.verdicts(["q"] * 3, [REFUSAL, ANSWER, BROKEN]) == ["refusal", "answer", "answer"]
    assert judge.verdicts(["q"], ["  "]) == ["refusal"]  # an empty response is no answer


def test_three_way_text_judge_tells_the_three_apart():
    assert ThreeWayJudge("three_way_text").verdicts(["What is the capital of France?"] * 3,
                                                    [REFUSAL, ANSWER, BROKEN]) == ["refusal", "answer", "broken"]


@NEEDS_SHARED
@pytest.mark.parametrize("part, n, answer_vs_not, refusal_vs_not", [("check", 270, 0.844, 0.922),
                                                                  ("check2", 99, 0.768, 0.808)])
def test_shipped_text_judge_reproduces_its_documented_agreement(part, n, answer_vs_not, refusal_vs_not):
    """docs/evaluation.md's numbers for three_way_text on the check parts: a change to the features fails here."""
    rows = load_labelled(part=part)
    verdicts = ThreeWayJudge("three_way_text").verdicts([r["prompt"] for r in rows], [r["response"] for r in rows])
    stats = agreement([r["label"] for r in rows], verdicts)
    assert stats["n"] == n
    assert (round(stats["answer_vs_not"], 3), round(stats["refusal_vs_not"], 3)) == (answer_vs_not, refusal_vs_not)


def test_repetition_features_see_a_fluent_loop_that_word_counts_miss():
    """A sentence of fresh words said three times: few repeated words or 3-grams, but repeated sentences."""
    from subspace.evaluation.judges import repeated_units, text_features

    loop = ("To begin, gather the documents you need for the application. " * 3).strip()
    varied = ("To begin, gather the documents you need. Then fill in the form online and pay the fee. "
              "Finally, book an appointment at the office nearest to you.")
    assert repeated_units(loop) == (2 / 3, 2 / 3) and repeated_units(varied) == (0.0, 0.0)
    assert repeated_units("Take the bus to work. Take the bus to school.") == (0.0, 0.0)  # 4 of 6 words shared
    looped, fresh = text_features("q", loop), text_features("q", varied)
    assert looped["distinct8"] < 0.5 < fresh["distinct8"] == 1.0
    assert looped["compression"] < fresh["compression"]


def test_labelled_set_stores_no_public_prompt_text():
    rows = [json.loads(line) for line in (ROOT / "subspace/evaluation/labelled/responses.jsonl").read_text().splitlines()]
    assert len(rows) >= 400 and all("prompt" not in r for r in rows)
    assert {r["family"] for r in rows} == {"causal", "llada", "moe", "diffusion_gemma"}
    assert {r["part"] for r in rows} == {"fit", "check", "check2"}
    assert {r["label"] for r in rows} == {"refusal", "answer", "broken"}
    assert all(set(r["readers"].values()) <= {"refusal", "answer", "broken"} for r in rows if r["part"] == "check2")


def test_fit_learns_labels_and_bad_inputs_are_named(tmp_path):
    responses = [REFUSAL, ANSWER, BROKEN] * 6
    state = fit_three_way(["What is the capital of France?"] * 18, responses, ["refusal", "answer", "broken"] * 6,
                          folds=3)
    path = tmp_path / "w.json"
    path.write_text(json.dumps(state))
    assert ThreeWayJudge(path).verdicts(["q"] * 3, [REFUSAL, ANSWER, BROKEN]) == ["refusal", "answer", "broken"]
    with pytest.raises(ValueError, match=r"labels \['maybe'\] are not verdicts"):
        fit_three_way(["q"], [ANSWER], ["maybe"])
    with pytest.raises(FileNotFoundError, match="eval.judge.weights='nope.json' is neither a file nor a shipped judge"):
        ThreeWayJudge("nope.json")
    path.write_text(json.dumps(state | {"features": ["marker"]}))
    with pytest.raises(ValueError, match="refit it"):
        ThreeWayJudge(path)
    assert {"three_way", "three_way_text"} <= set(shipped_weights())


def test_agreement_and_verdict_rates():
    stats = agreement(["answer", "broken", "refusal", "answer"], ["answer", "answer", "refusal", "broken"])
    assert stats["answer_vs_not"] == 0.5 and stats["refusal_vs_not"] == 1.0 and stats["exact"] == 0.5
    assert stats["confusion"]["broken"]["answer"] == 1 and stats["confusion"]["answer"]["broken"] == 1
    metric = VerdictRates()
    metric.update(["answer", "broken", "refusal", "answer"])
    assert metric.compute().tolist() == [0.25, 0.5, 0.25]
    with pytest.raises(ValueError, match="not among"):
        metric.update(["maybe"])


def test_judge_script_adds_verdicts_and_prints_the_confusion_matrix(tmp_path):
    rows = [{"prompt": "q", "response": text, "label": label}
            for text, label in ((REFUSAL, "refusal"), (ANSWER, "answer"), (BROKEN, "broken"))]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, str(ROOT / "scripts/judge.py"), str(src), str(out), "--judge", "three_way_text"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["verdict"] for line in out.read_text().splitlines()] == ["refusal", "answer", "broken"]
    assert "answer vs not 100.0%" in done.stdout and "label \\ verdict" in done.stdout
    src.write_text(json.dumps({"text": "x"}) + "\n")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/judge.py"), str(src), str(out), "--judge", "marker"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "each line needs 'prompt' and 'response'" in bad.stderr


def test_reference_nll_is_each_responses_mean_token_nll_after_its_prompt_scored_alone(tiny):
    """Batched by length (here 2 rows a batch, so rows of other lengths share one), right-padded, scored at the
    response positions: each value is the response's mean per-token NLL after its chat-templated prompt."""
    reference = ReferenceLM(batch_size=2)
    reference._bundle = tiny
    prompts = ["Hi", "Tell me a much longer story about a dragon and a knight", "Why?", "Name a colour."]
    responses = [ANSWER, "No.", REFUSAL, ""]  # an empty response is scored as its end token
    tok = tiny.tokenizer
    for prompt, response, value in zip(prompts, responses, reference.scores(prompts, responses)[0]):
        context = reference._context(prompt)  # the chat-templated prompt
        answer = tok(response, add_special_tokens=False)["input_ids"][:96] or [tok.eos_token_id]
        ids = torch.tensor([context + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny.model(input_ids=ids).logits[0, len(context) - 1: -1].float(), -1)
        alone = -logprobs.gather(-1, torch.tensor(answer)[:, None]).mean()
        assert value == pytest.approx(alone.item(), abs=1e-5), (prompt, response)


def test_reference_hidden_state_is_the_middle_layers_mean_over_the_response_scored_alone(tiny):
    reference = ReferenceLM(batch_size=2)
    reference._bundle = tiny
    prompts, responses = ["Hi", "Tell me a much longer story about a dragon", "Why?"], [ANSWER, "No.", REFUSAL]
    nll, hidden = reference.scores(prompts, responses)
    assert len(nll) == 3 and hidden.shape == (3, tiny.model.config.hidden_size)
    layers = tiny.model.config.num_hidden_layers
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        context, answer = reference._context(prompt), tiny.tokenizer(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            states = tiny.model(input_ids=torch.tensor([context + answer]), output_hidden_states=True).hidden_states
        assert len(states) == layers + 1  # the embeddings, then each layer's output
        torch.testing.assert_close(hidden[i], states[(layers + 1) // 2][0, len(context):].double().mean(0),
                                   atol=1e-5, rtol=1e-5)


def test_weights_fitted_with_another_hidden_size_are_refused_by_name(tiny, tmp_path):
    responses = [REFUSAL, ANSWER, BROKEN] * 6
    prompts = ["What is the capital of France?"] * 18
    state = fit_three_way(prompts, responses, ["refusal", "answer", "broken"] * 6,
                          ([1.0, 2.0, 3.0] * 6, torch.randn(18, 7, dtype=torch.float64)), folds=3)
    path = tmp_path / "w.json"
    path.write_text(json.dumps(state))
    judge = ThreeWayJudge(path)
    judge.reference._bundle = tiny  # hidden size 32, not 7
    with pytest.raises(ValueError, match="fitted on .* features; this judge computes"):
        judge.verdicts(["q"], [ANSWER])


def test_causal_answer_logprobs_match_each_prompt_alone(tiny):
    family = CausalFamily(tiny.model)
    prompts = ["Name a colour.", "Write a long sentence about the sea and the sky."]
    answers = torch.tensor([[5, 6, 7, -1], [8, 9, 10, 11]])
    logprobs, valid = family.answer_logprobs(family.chat_batch(tiny.tokenizer, prompts), answers)
    assert valid.tolist() == [[True, True, True, False], [True] * 4]
    for i, prompt in enumerate(prompts):
        ids = family.chat_batch(tiny.tokenizer, [prompt])["input_ids"]
        n = int(valid[i].sum())
        alone = torch.log_softmax(tiny.model(torch.cat([ids, answers[i: i + 1, :n]], 1)).logits[0, -n - 1:-1].float(), -1)
        torch.testing.assert_close(logprobs[i, :n], alone, atol=1e-4, rtol=1e-4)


def test_kl_response_is_zero_without_an_edit_and_the_first_token_kl_for_empty_answers(tiny):
    family = CausalFamily(tiny.model)
    evaluator = Evaluator(tiny, family, ThreeWayJudge("three_way_text"), max_new_tokens=6, progress=False)
    prompts = ["Name a colour.", "Say hello."]
    names = [s.name for s in family.writer_sites()]
    g = torch.Generator().manual_seed(0)
    basis = orthonormalize(torch.randn(len(names), family.hidden_size, 2, generator=g))
    edit = ProjectionEdit(names, basis, torch.ones(len(names)))
    answers = ["A deep red, like a ripe cherry.", "Hello there, my friend!"]
    assert evaluator.kl_response(prompts, answers, ProjectionEdit(names, basis, torch.zeros(len(names)))) == 0
    assert evaluator.kl_response(prompts, answers, edit) > 0
    # an empty answer is its end token alone: the KL at the first response position
    assert evaluator.kl_response(prompts, ["", ""], edit) == pytest.approx(evaluator.kl(prompts, edit), rel=1e-2)
