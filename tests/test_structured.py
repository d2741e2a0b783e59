"""Constrained decoding: sampled answers always satisfy the request's schema, regex or choices; bad ones are refused."""
import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

import lora
from lora.cli import main
from lora.engine import Engine, SamplingParams
from lora.errors import LoraError
from lora.evaluate import evaluate, json_valid
from lora.structured import (
    Constraint,
    apply_masks,
    check_response_schema,
    guide,
    load_response_schema,
    request_constraint,
)
from tests.conftest import finetune_argv, make_adapter, write_task

EXTRACTION = Path(__file__).resolve().parent.parent / "examples" / "extraction"
SCHEMA = {"type": "object",
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 20},
                         "ok": {"type": "boolean"}},
          "required": ["color", "n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model, tokenizer = lora.load_model(tiny_llama)
    return model.eval(), tokenizer


def compiled(tokenizer, body, default_schema=None):
    return guide(tokenizer).compile(request_constraint(body, default_schema))


@torch.no_grad()
def generate(model, tokenizer, matchers, max_tokens, temperature=1.0, seed=0):
    """Decode one row per matcher (None: a free row) with the model's KV cache, masks and torch.multinomial.

    Returns (answers, complete): a row is complete when its grammar is finished or it sampled eos.
    """
    prompt = tokenizer("### Response:\n")["input_ids"]
    rows = len(matchers)
    generator = torch.Generator().manual_seed(seed)
    out = model(input_ids=torch.tensor([prompt] * rows), use_cache=True)
    answers, live = [[] for _ in range(rows)], [True] * rows
    for _ in range(max_tokens):
        logits = out.logits[:, -1].float()
        apply_masks(logits, [m if alive else None for m, alive in zip(matchers, live)])
        if temperature:
            tokens = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]
        else:
            tokens = logits.argmax(-1)
        for i, token in enumerate(tokens.tolist()):
            if not live[i]:
                continue
            if token == tokenizer.eos_token_id:
                live[i] = False
                continue
            answers[i].append(token)
            if matchers[i] is not None:
                matchers[i].advance(token)
                live[i] = not matchers[i].is_finished()
        if not any(live):
            break
        out = model(input_ids=tokens[:, None], cache=out.cache, use_cache=True)
    return [tokenizer.decode(a) for a in answers], [not alive for alive in live]


@pytest.fixture(scope="module")
def mt(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured-adapters")
    return lora.MultiTaskModel(tiny_llama, {"qa": make_adapter(tiny_llama, root / "qa", ["q_proj", "v_proj"], 0),
                                            "sum": make_adapter(tiny_llama, root / "sum", "all-linear", 1)})


@pytest.mark.long
def test_a_thousand_answers_sampled_at_temperature_1_through_the_engine_all_validate_against_the_schema(mt):
    grammar = compiled(mt.tokenizer, {"response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "x", "schema": SCHEMA}}})
    ids = mt.tokenizer("### Response:\n")["input_ids"]
    sampling = [SamplingParams(max_tokens=60, temperature=1.0, seed=i, grammar=grammar) for i in range(1000)]
    outputs = Engine(mt, max_num_seqs=128).generate([ids] * 1000, ["qa", None, "sum", "qa"] * 250, sampling)
    assert all(out.finish_reason == "stop" for out in outputs), {out.finish_reason for out in outputs}
    validator = jsonschema.Draft202012Validator(SCHEMA)  # built once: jsonschema.validate builds one per call
    for out in outputs:
        validator.validate(json.loads(out.text))
    assert len({out.text for out in outputs}) > 50  # sampled, not one forced answer (126 answers are possible)


def test_a_constrained_request_in_a_mixed_batch_answers_as_alone_and_leaves_its_neighbours_unchanged(mt):
    grammar = compiled(mt.tokenizer, {"guided_json": SCHEMA})
    prompts = [mt.tokenizer(f"What colour is the {thing}?")["input_ids"] for thing in ("tiger", "lamp", "apple")]
    tasks = ["qa", "sum", None]
    free = SamplingParams(max_tokens=20, min_tokens=20, temperature=1.0, seed=7)
    constrained = SamplingParams(max_tokens=60, temperature=1.0, seed=7, grammar=grammar)
    settings = [free, constrained, free]
    together = Engine(mt, max_num_seqs=3, mode="mixed").generate(prompts, tasks, settings)
    for ids, task, sampling, out in zip(prompts, tasks, settings, together):
        alone = Engine(mt, max_num_seqs=1).generate([ids], [task], sampling)[0]
        assert out.new_token_ids == alone.new_token_ids
    jsonschema.validate(json.loads(together[1].text), SCHEMA)
    assert together[1].finish_reason == "stop"
    unconstrained = Engine(mt, max_num_seqs=1).generate([prompts[1]], ["sum"], dataclasses.replace(
        constrained, grammar=None))[0]
    assert unconstrained.new_token_ids != together[1].new_token_ids  # the mask did change what was sampled


def test_max_tokens_ends_a_constrained_answer_with_length_and_min_tokens_yields_to_the_grammar(mt):
    grammar = compiled(mt.tokenizer, {"guided_json": SCHEMA})
    ids = mt.tokenizer("### Response:\n")["input_ids"]
    cut = Engine(mt).generate([ids], ["qa"], SamplingParams(max_tokens=3, grammar=grammar))[0]
    assert cut.finish_reason == "length" and cut.num_tokens == 3
    choice = compiled(mt.tokenizer, {"guided_choice": ["yes", "no"]})
    out = Engine(mt).generate([ids], ["qa"], SamplingParams(max_tokens=30, min_tokens=20, grammar=choice))[0]
    assert out.finish_reason == "stop" and out.text in ("yes", "no")


def test_a_sampling_grammar_must_be_compiled(mt):
    with pytest.raises(LoraError, match="grammar=.* compile the constraint with lora.structured.guide"):
        Engine(mt).add_request([1, 2], None, SamplingParams(grammar=SCHEMA))


def test_regex_choice_and_json_object_constrain_every_sampled_answer(tiny):
    model, tokenizer = tiny
    cases = [({"guided_regex": r"[a-c]{2}-[0-9]{1,2}"}, lambda a: re.fullmatch(r"[a-c]{2}-[0-9]{1,2}", a)),
             ({"guided_choice": ["yes", "no", "maybe so"]}, lambda a: a in ("yes", "no", "maybe so")),
             ({"structured_outputs": {"choice": ["up", "down"]}}, lambda a: a in ("up", "down")),
             ({"guided_json": json.dumps({"type": "array", "items": {"type": "boolean"}, "maxItems": 3})},
              lambda a: isinstance(json.loads(a), list) and len(json.loads(a)) <= 3)]
    for body, valid in cases:
        grammar = compiled(tokenizer, body)
        answers, complete = generate(model, tokenizer, [grammar.matcher() for _ in range(50)], max_tokens=40, seed=1)
        assert all(complete) and all(valid(a) for a in answers), (body, answers)
    # json_object: any JSON object; a random model may write one longer than the budget, so check what finished
    grammar = compiled(tokenizer, {"response_format": {"type": "json_object"}})
    answers, complete = generate(model, tokenizer, [grammar.matcher() for _ in range(50)], max_tokens=40, seed=2)
    assert any(complete)
    assert all(isinstance(json.loads(a), dict) for a, done in zip(answers, complete) if done)


def test_apply_masks_masks_only_the_constrained_rows(tiny):
    model, tokenizer = tiny
    grammar = compiled(tokenizer, {"guided_json": SCHEMA})
    logits = torch.randn(3, model.config.vocab_size)
    masked = logits.clone()
    matcher = grammar.matcher()
    apply_masks(masked, [None, matcher, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = matcher.allowed_mask(model.config.vocab_size)
    assert torch.equal(masked[1].isfinite(), allowed) and 0 < allowed.sum() < allowed.numel()
    assert torch.equal(masked[1][allowed], logits[1][allowed])


def test_a_token_the_grammar_forbids_fails_only_its_own_request(tiny_tokenizer):
    grammar = compiled(tiny_tokenizer, {"guided_choice": ["red", "blue"]})
    broken, fine = grammar.matcher(), grammar.matcher()
    forbidden = int((~broken.allowed_mask(len(tiny_tokenizer))).nonzero()[0])
    with pytest.raises(LoraError, match=f"token {forbidden} breaks the request's grammar"):
        broken.advance(forbidden)
    assert broken.error
    logits = torch.randn(3, len(tiny_tokenizer))
    masked = logits.clone()
    assert apply_masks(masked, [broken, fine, None]) == [0]
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert torch.equal(masked[1].isfinite(), fine.allowed_mask(len(tiny_tokenizer)))


def test_the_task_default_schema_applies_unless_the_request_asks_otherwise():
    task_schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert request_constraint({}, task_schema).schema == task_schema
    assert request_constraint({}) is None
    assert request_constraint({"response_format": {"type": "text"}}, task_schema) is None
    assert request_constraint({"guided_regex": "x+"}, task_schema) == Constraint("regex", "x+")
    assert request_constraint({"response_format": {"type": "json_object"}}).schema == {"type": "object"}
    # property order is the order the answer writes them in: two orders are two grammars
    first, second = (request_constraint({"guided_json": {"properties": dict(p)}})
                     for p in ([("a", {}), ("b", {})], [("b", {}), ("a", {})]))
    assert first != second


def test_a_grammar_is_compiled_once_per_schema_and_tokenizer(tiny_tokenizer):
    one = compiled(tiny_tokenizer, {"guided_json": SCHEMA})
    assert compiled(tiny_tokenizer, {"guided_json": json.dumps(SCHEMA)}) is one
    assert compiled(tiny_tokenizer, {"guided_json": {**SCHEMA, "required": ["n"]}}) is not one


@pytest.mark.parametrize("body, message", [
    ({"guided_json": {"type": "strnig"}}, "guided_json: the JSON schema cannot be compiled: Invalid type: strnig"),
    ({"guided_json": {"type": "string", "minLength": 5, "maxLength": 2}}, "Unsatisfiable schema"),
    ({"guided_json": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}, "does not exist"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
    ({"guided_json": [1, 2]}, "guided_json must be a JSON schema object, got list"),
    ({"guided_regex": "(a"}, "guided_regex: the regex cannot be compiled"),
    ({"guided_choice": []}, "guided_choice must be a non-empty list"),
    ({"guided_grammar": "start: ("}, "guided_grammar: the grammar cannot be compiled"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, '"schema": {...}'),
    ({"response_format": {"type": "xml"}}, "response_format must be"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "gives response_format and guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "gives regex and choice"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "unsupported keys ['whitespace_pattern']"),
])
def test_a_bad_constraint_is_refused_with_a_message_naming_the_problem(tiny_tokenizer, body, message):
    with pytest.raises(LoraError, match=re.escape(message)):
        compiled(tiny_tokenizer, body)


def test_a_task_response_schema_is_checked_when_stored(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    assert load_response_schema(str(path)) == SCHEMA
    path.write_text('{"type": "integer", "minimum": 5, "maximum": 1}')
    with pytest.raises(LoraError, match=r"--response_schema .*schema.json: the JSON schema cannot be compiled"):
        load_response_schema(str(path))
    path.write_text("{")
    with pytest.raises(LoraError, match="is not valid JSON"):
        load_response_schema(str(path))
    with pytest.raises(LoraError, match="does not exist"):
        load_response_schema(str(tmp_path / "missing.json"))
    with pytest.raises(LoraError, match="lora_task.json: response_schema must be a JSON schema object"):
        check_response_schema("string", "lora_task.json: response_schema")


def test_the_extraction_example_schema_accepts_every_answer_in_its_data():
    validator = jsonschema.Draft202012Validator(load_response_schema(str(EXTRACTION / "schema.json")))
    for split in ("train", "validation", "test"):
        for record in json.loads((EXTRACTION / f"{split}.json").read_text(encoding="utf-8")):
            validator.validate(json.loads(record["output"]))


# ---------------------------------------------------------------- lora eval: json_valid and schema_valid

class ScriptedModel:
    """Answers each instruction as scripted; its one task has `meta` as lora_task.json."""

    def __init__(self, answers, meta):
        self.answers, self.meta = answers, meta

    def generate_responses(self, requests, batch_size=16):
        return [self.answers[r["instruction"]] for r in requests]

    def task_meta(self, name):
        return self.meta


ANSWERS = {"valid": '{"color": "red", "n": 3, "ok": true}', "other json": '{"color": "pink", "n": 3, "ok": true}',
           "fenced": '```json\n{"color": "red", "n": 3, "ok": true}\n```', "prose": "The colour is red."}


def test_lora_eval_scores_json_validity_and_validity_against_the_tasks_schema():
    records = [{"instruction": k, "input": "", "output": ANSWERS["valid"]} for k in ANSWERS]
    mt = ScriptedModel(ANSWERS, {"response_schema": SCHEMA})
    kwargs = dict(max_new_tokens=8)
    assert evaluate(mt, "t", records, "json_valid", **kwargs)["score"] == 2 / 4
    result = evaluate(mt, "t", records, "schema_valid", **kwargs)
    assert [p["score"] for p in result["predictions"]] == [1, 0, 0, 0]
    assert evaluate(mt, None, records, "schema_valid", schema={"type": "object"}, **kwargs)["score"] == 2 / 4
    with pytest.raises(LoraError, match="the base model has no response_schema in lora_task.json"):
        evaluate(mt, None, records, "schema_valid", **kwargs)
    with pytest.raises(LoraError, match="not a valid JSON schema"):
        evaluate(mt, "t", records, "schema_valid", schema={"type": 5}, **kwargs)


def test_a_response_schema_added_to_lora_task_json_constrains_the_tasks_answers_unless_a_request_says_otherwise(
        tiny_llama, tmp_path, capsys):
    make_adapter(tiny_llama, tmp_path / "t", ["q_proj"], seed=0)
    task_file = tmp_path / "t" / "lora_task.json"
    task_file.write_text(json.dumps({**json.loads(task_file.read_text()), "response_schema": SCHEMA}))
    mt = lora.MultiTaskModel(tiny_llama, {"t": str(tmp_path / "t")})
    assert mt.response_schema("t") == SCHEMA and mt.response_schema(None) is None
    asks = [{"downstream": "t", "instruction": f"Describe the {thing}.", "temperature": 1.0, "seed": seed,
             "max_new_tokens": 60} for seed, thing in enumerate(["tiger", "lamp", "piano", "cloud"])]
    for answer in mt.generate_responses(asks):
        jsonschema.validate(json.loads(answer), SCHEMA)
    free = mt.generate_responses([{**a, "response_format": {"type": "text"}} for a in asks])
    assert not any(json_valid(a) for a in free)  # a random model's free answers are not JSON
    assert set(mt.generate_responses([{**a, "guided_choice": ["yes", "no"]} for a in asks])) <= {"yes", "no"}
    regex = mt.generate_responses([{**a, "downstream": None, "guided_regex": "[ab]{4}"} for a in asks])
    assert all(re.fullmatch("[ab]{4}", a) for a in regex)
    with pytest.raises(LoraError, match="guided_json: the JSON schema cannot be compiled"):
        mt.generate_responses([{**asks[0], "guided_json": {"type": "strnig"}}])
    with pytest.raises(LoraError, match="unknown generation setting 'guided_xml'"):
        mt.generate_responses([{**asks[0], "guided_xml": "<a/>"}])

    # lora eval: with the schema (as served) and without
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"instruction": f"Describe the {thing}.", "input": "",
                                 "output": '{"color": "red", "n": 3, "ok": true}'} for thing in ("tiger", "lamp")]))
    mapper = tmp_path / "mapper.json"
    mapper.write_text(json.dumps({"t": str(tmp_path / "t")}))
    common = ["eval", "--model", tiny_llama, "--mapper", str(mapper), "--task", "t", "--test_data_path", str(test),
              "--metric", "schema_valid", "--device", "cpu", "--max_new_tokens", "60"]
    assert main(common) == 0
    assert "schema_valid 1.000 on 2 examples" in capsys.readouterr().out
    assert main([*common, "--no-constrained", "--output", str(tmp_path / "free.json")]) == 0
    printed = capsys.readouterr().out
    assert "schema_valid 0.000 on 2 examples" in printed and "without its response_schema" in printed
    assert json.loads((tmp_path / "free.json").read_text())["constrained"] is False

    task_file.write_text(json.dumps({**json.loads(task_file.read_text()), "response_schema": {"type": "strnig"}}))
    with pytest.raises(LoraError, match="lora_task.json: response_schema: the JSON schema cannot be compiled"):
        lora.MultiTaskModel(tiny_llama, {"t": str(tmp_path / "t")}).adapter("t")


def test_finetune_stores_the_response_schema_and_refuses_a_bad_one_before_training(tiny_llama, tmp_path, capsys):
    task = write_task(tmp_path / "task")
    (task / "schema.json").write_text(json.dumps(SCHEMA))
    argv = finetune_argv(tiny_llama, task, tmp_path / "c", "--max_steps", 1, "--response_schema", task / "schema.json")
    assert main(["finetune", *argv]) == 0
    assert json.loads((tmp_path / "c" / "final" / "lora_task.json").read_text())["response_schema"] == SCHEMA
    (task / "schema.json").write_text('{"type": "integer", "minimum": 5, "maximum": 1}')
    argv = finetune_argv(tiny_llama, task, tmp_path / "d", "--max_steps", 1, "--response_schema", task / "schema.json")
    assert main(["finetune", *argv]) == 2
    assert "--response_schema" in capsys.readouterr().err and not (tmp_path / "d").exists()
