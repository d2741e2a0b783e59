"""`lora eval`, `lora generate`, `lora chat`, the metrics and the demo's report writer, on tiny models."""
import copy
import io
import json
import re

import pytest

from examples.report import write_report
from lora import MultiTaskModel
from lora.cli import main
from lora.cli.common import base_prompt_format
from lora.evaluate import evaluate, exact_match, lcs_length, rouge_l
from tests.conftest import finetune_argv, write_task


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """A task folder and a mapper with one tiny adapter, `color`."""
    root = tmp_path_factory.mktemp("demo-tools")
    task = write_task(root / "color")
    assert main(["finetune", *finetune_argv(tiny_llama, task, root / "run", "--num_epochs", 1)]) == 0
    mapper = root / "mapper.json"
    mapper.write_text(json.dumps({"color": str(root / "run" / "final")}))
    return task, str(mapper)


# ---------------------------------------------------------------- metrics

def test_exact_match_ignores_surrounding_and_repeated_whitespace_only():
    assert exact_match("  Lyon\n", "Lyon") == 1.0
    assert exact_match("New   York", "New York") == 1.0
    assert exact_match("lyon", "Lyon") == 0.0
    assert exact_match("Lyon.", "Lyon") == 0.0


def test_rouge_l_on_known_strings():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    # LCS "the cat on the mat": 5 of 6 tokens each way, so precision = recall = F1 = 5/6.
    assert rouge_l("The cat sat on the mat", "the cat is on the mat.") == pytest.approx(5 / 6)
    # LCS 2 ("a", "c"): precision 2/2, recall 2/4, F1 = 2 * 1 * 0.5 / 1.5.
    assert rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("Blue Harbor opens new factory", "Blue Harbor opens new factory") == 1.0
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("nothing shared", "at all") == 0.0


class ScriptedModel:
    """Stands in for a MultiTaskModel: answers from a table, and records the requests it got."""

    def __init__(self, answers):
        self.answers, self.requests, self.calls = answers, [], []

    def generate_responses(self, requests, batch_size=16):
        self.calls.append((len(requests), batch_size))
        self.requests += requests
        return [self.answers[r["instruction"]] for r in requests]


def test_evaluate_queues_every_record_at_once_with_the_given_prompt_format():
    records = [{"instruction": f"q{i}", "input": "", "output": "yes"} for i in range(5)]
    mt = ScriptedModel({"q0": "yes", "q1": " yes ", "q2": "no", "q3": "yes", "q4": "Yes"})
    result = evaluate(mt, None, records, "exact_match", batch_size=2, max_new_tokens=3,
                      prompt_format="Q: {instruction}")
    assert mt.calls == [(5, 2)]  # the engine runs 2 at a time and refills a slot as soon as an answer ends
    assert result["score"] == pytest.approx(3 / 5)
    assert result["task"] == "base" and result["n"] == 5
    assert [p["score"] for p in result["predictions"]] == [1, 1, 0, 1, 0]
    assert all(r["downstream"] is None and r["prompt_format"] == "Q: {instruction}" and r["max_new_tokens"] == 3
               for r in mt.requests)


# ---------------------------------------------------------------- lora eval / generate / chat

def test_lora_eval_scores_an_adapter_and_the_base_model(trained, tiny_llama, tmp_path, capsys):
    task, mapper = trained
    test_data = task / "validation.json"
    out = tmp_path / "adapter.json"
    assert main(["eval", "--model", tiny_llama, "--mapper", mapper, "--task", "color", "--test_data_path", str(test_data),
                 "--output", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "color" and result["metric"] == "exact_match" and result["n"] == 16
    assert len(result["predictions"]) == 16 and 0 <= result["score"] <= 1
    assert result["score"] == pytest.approx(sum(exact_match(p["prediction"], p["output"]) for p in result["predictions"]) / 16)
    assert "color: exact_match" in capsys.readouterr().out

    # The base model: no --task, and the task folder's own prompt format (prompt_format.txt beside the data).
    out = tmp_path / "base.json"
    assert main(["eval", "--model", tiny_llama, "--data", str(test_data), "--metric", "rouge_l",
                 "--max_new_tokens", "4", "--output", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "base" and result["metric"] == "rouge_l" and result["max_new_tokens"] == 4
    assert f"prompt format {task / 'prompt_format.txt'}" in capsys.readouterr().out


def test_lora_eval_names_an_unknown_task(trained, tiny_llama, capsys):
    task, mapper = trained
    assert main(["eval", "--model", tiny_llama, "--mapper", mapper, "--task", "nope",
                 "--test_data_path", str(task / "validation.json"), "--device", "cpu"]) == 2
    assert "unknown downstream task 'nope'" in capsys.readouterr().err


def test_lora_generate_prints_the_tasks_answer(trained, tiny_llama, capsys):
    task, mapper = trained
    assert main(["generate", "--model", tiny_llama, "--mapper", mapper, "--task", "color",
                 "--instruction", "What colour is the apple?", "--max_new_tokens", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    expected = MultiTaskModel(tiny_llama, mapper, device="cpu").generate_response(
        "color", "What colour is the apple?", max_new_tokens=5)
    assert printed == expected + "\n"


def test_lora_chat_switches_tasks_from_piped_stdin(trained, tiny_llama, monkeypatch, capsys):
    task, mapper = trained
    lines = ["/tasks", "/task color", "What colour is the apple?", "/task nope", "/input apple", "/frobnicate",
             "/task base", "/tasks", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", tiny_llama, "--mapper", mapper, "--max_new_tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "*base  color"
    assert re.fullmatch(r"switched to color in [\d.]+ ms \(read from disk first in \d+ ms\)", out[1])
    assert out[3].startswith("error: unknown downstream task 'nope'")
    assert out[4] == "input set (1 word)"
    assert out[5].startswith("unknown command /frobnicate")
    assert re.fullmatch(r"switched to base in [\d.]+ ms", out[6])
    assert out[7] == "*base  color"
    assert len(out) == 8


def test_the_base_model_is_asked_through_its_chat_template(tiny_tokenizer):
    assert base_prompt_format(tiny_tokenizer) is None  # no template: MultiTaskModel's plain default
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert base_prompt_format(tokenizer) == "<user>{instruction}\n\n{input}</user><assistant>"


# ---------------------------------------------------------------- report

def test_report_has_the_tables_and_both_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    tasks = []
    for i, (task, metric) in enumerate([("question_answering", "exact_match"), ("summarization", "rouge_l")]):
        metrics = tmp_path / f"{task}.jsonl"
        metrics.write_text("".join(json.dumps(row) + "\n" for row in [
            {"step": 1, "epoch": 0.5, "loss": 2.0}, {"step": 2, "epoch": 1.0, "loss": 1.0},
            {"step": 2, "epoch": 1, "val_loss": 1.2, "val_perplexity": 3.3}]))
        tasks.append({"task": task, "metric": metric, "base_score": 0.1 + i / 10, "adapter_score": 0.9, "n": 60,
                      "adapter_parameters": 2_442_240, "adapter_bytes": 9_800_000, "train_seconds": 75.0 if i else None,
                      "metrics_path": str(metrics), "data_format": ["alpaca", "messages"][i],
                      "example": {"instruction": "Who | won?", "input": "Ana won.", "output": "Ana", "base": "Ana won.",
                                  "adapter": "Ana"},
                      "structured": {"unconstrained_score": 0.8, "parse": 1.0, "unconstrained_parse": 0.75} if i else None})
    summary = {"model": "tiny", "base_parameters": 134_515_008, "base_bytes": 538_060_032, "threads": 2,
               "wall_seconds": 400.0, "tasks": tasks,
               "switches": [{"task": t["task"], "switch_ms": ms, "answer_seconds": 0.5, "instruction": "Who | won?",
                             "input": "", "answer": "Ana"} for t, ms in zip(tasks * 2, [2.0, 3.0, 4.0, 10.0])],
               "exports": [{"task": "summarization", "adapter_gguf_bytes": 9_800_000,
                            "command": "ollama create smollm2-summarization -f runs/demo/ollama/summarization/Modelfile"}]}
    report = write_report(tmp_path / "out", summary)
    text = open(report, encoding="utf-8").read()
    assert "| question_answering | exact match | 0.10 | **0.90** | 60 |" in text
    assert "| summarization | ROUGE-L F1 | 0.20 | **0.90** | 60 |" in text
    assert "| question_answering adapter | 2.44 M | 9.8 MB | 1.82% |" in text
    assert "median switch time **3.5 ms** (max 10.0 ms)" in text
    assert "| question_answering | alpaca | 2 | reused | 2.000 -> 1.000 | 1.200 -> 1.200 |" in text
    assert "| summarization | messages | 2 | 75 s |" in text
    assert "| Who \\| won? | Ana |" in text  # a bare | inside a cell would end it
    assert "| summarization | ROUGE-L F1 | **0.90** | 0.80 | 100% | 75% |" in text  # with and without its schema
    assert "| question_answering | exact match | **0.90** |" not in text
    assert "| summarization | 9.8 MB | `ollama create smollm2-summarization -f runs/demo/ollama/summarization/Modelfile` |" \
        in text
    assert "6.7 min" in text and "![base model vs adapter](metrics.png)" in text and "(loss.png)" in text
    for picture in ("loss.png", "metrics.png"):
        assert (tmp_path / "out" / picture).stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["tasks"][0]["adapter_score"] == 0.9
