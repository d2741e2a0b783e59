"""`lora serve` structured outputs and logprobs: response_format / guided_* / a task's schema, logprobs, echo."""
import json
import re
import shutil

import jsonschema
import openai
import pytest
import torch

from lora.multitask import MultiTaskModel
from lora.serve import create_app
from tests.serve.helpers import QUESTIONS, error_of, openai_client, post, raw_prompt, serving

SCHEMA = {"type": "object",
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 20}},
          "required": ["color", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def mapper(adapters, tmp_path_factory):
    """The color task, and a copy of it whose lora_task.json gives a response_schema."""
    paths = adapters[0]
    folder = shutil.copytree(paths["color"], tmp_path_factory.mktemp("schema") / "json")
    meta = json.loads((folder / "lora_task.json").read_text())
    (folder / "lora_task.json").write_text(json.dumps({**meta, "response_schema": SCHEMA}))
    return {"color": str(paths["color"]), "json": str(folder)}


@pytest.fixture(scope="module")
def url(chat_llama, mapper):
    app = create_app(MultiTaskModel(chat_llama, mapper), served_model_name="tiny", max_tokens_cap=64)
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def api(url):
    return openai_client(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref(chat_llama, mapper):
    return MultiTaskModel(chat_llama, mapper)


def test_response_format_and_guided_fields_constrain_chat_and_completions(api):
    schema_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    chat = api.chat.completions.create(model="color", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                       response_format=schema_format, temperature=1.0, seed=3, n=4, max_tokens=40)
    for c in chat.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert c.finish_reason == "stop"
    prompt = raw_prompt(QUESTIONS[1])
    out = api.completions.create(model="color", prompt=prompt, max_tokens=40, temperature=1.0, seed=1, n=4,
                                 extra_body={"guided_choice": ["red", "green", "sky blue"]})
    assert all(c.text in ("red", "green", "sky blue") and c.finish_reason == "stop" for c in out.choices)
    out = api.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=1.0, seed=2, n=4,
                                 extra_body={"structured_outputs": {"regex": "[ab]{3}-[0-9]"}})
    assert all(re.fullmatch("[ab]{3}-[0-9]", c.text) for c in out.choices)
    generated = post(api.base_url.join("/v1/generate").__str__(), json={
        "downstream": "color", "instruction": QUESTIONS[2], "guided_json": SCHEMA, "max_new_tokens": 40}).json()
    jsonschema.validate(json.loads(generated["response"]), SCHEMA)


def test_a_tasks_response_schema_applies_unless_the_request_says_otherwise(api):
    asked = dict(model="json", prompt=raw_prompt(QUESTIONS[0]), max_tokens=40, temperature=1.0, seed=5, n=4)
    for c in api.completions.create(**asked).choices:
        jsonschema.validate(json.loads(c.text), SCHEMA)
    free = api.completions.create(**asked, extra_body={"response_format": {"type": "text"}}).choices
    assert [c.text for c in free] != [c.text for c in api.completions.create(**asked).choices]
    chosen = api.completions.create(**asked, extra_body={"guided_choice": ["yes", "no"]}).choices
    assert {c.text for c in chosen} <= {"yes", "no"}


@pytest.mark.parametrize("fields, param, message", [
    ({"guided_json": {"type": "strnig"}}, "guided_json", "guided_json: the JSON schema cannot be compiled"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "minLength": 5, "maxLength": 2}}}}, "response_format", "Unsatisfiable schema"),
    ({"guided_regex": "(a"}, "guided_regex", "guided_regex: the regex cannot be compiled"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format must be"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format",
     "gives response_format and guided_regex"),
])
def test_a_constraint_that_cannot_be_compiled_is_a_400_naming_the_problem(api, fields, param, message):
    for create, body in ((api.completions.create, {"prompt": "hi"}),
                         (api.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}]})):
        with pytest.raises(openai.BadRequestError) as e:
            create(model="color", max_tokens=4, **body, extra_body=fields)
        error = error_of(e)
        assert error["param"] == param and message in error["message"], error
        assert error["code"] == "invalid_structured_output"


@torch.no_grad()
def test_echo_with_token_id_prompts_and_max_tokens_0_gives_the_models_own_loglikelihood(api, ref):
    prompts = [ref.tokenizer(q)["input_ids"] for q in QUESTIONS[:3]]
    out = api.completions.create(model="color", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == sum(map(len, prompts))
    with ref.apply_downstream("color") as model:
        for ids, c in zip(prompts, out.choices):
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
            assert c.text == ref.tokenizer.decode(ids) and c.finish_reason == "length"
            assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
            assert sum(c.logprobs.token_logprobs[1:]) == pytest.approx(-loss * (len(ids) - 1), abs=1e-4)
            assert "".join(c.logprobs.tokens) == c.text
    # one prompt as a list of ints; echo with a completion: the prompt's logprobs, then the completion's
    one = api.completions.create(model="color", prompt=prompts[0], max_tokens=3, echo=True, logprobs=2,
                                 extra_body={"min_tokens": 3}).choices
    assert len(one) == 1 and len(one[0].logprobs.tokens) == len(prompts[0]) + 3
    assert one[0].text.startswith(ref.tokenizer.decode(prompts[0]))
    assert one[0].logprobs.token_logprobs[1:len(prompts[0])] == out.choices[0].logprobs.token_logprobs[1:]
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="color", prompt=[5, len(ref.tokenizer) + 10], max_tokens=2)
    assert "token ids from 0 to" in error_of(e)["message"]
    with pytest.raises(openai.BadRequestError):  # max_tokens 0 is for echo with logprobs only
        api.completions.create(model="color", prompt="hi", max_tokens=0)


def test_logprobs_on_completions_and_chat_have_openais_shapes(api):
    prompt = raw_prompt(QUESTIONS[3])
    out = api.completions.create(model="color", prompt=prompt, max_tokens=6, logprobs=3,
                                 extra_body={"min_tokens": 6}).choices[0]
    lp = out.logprobs
    assert "".join(lp.tokens) == out.text and len(lp.tokens) == 6
    assert lp.text_offset == [len(prompt) + sum(map(len, lp.tokens[:i])) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 4 and top[token] == logprob <= 0
        assert logprob == max(top.values())  # greedy: the chosen token is the most likely one (lm-eval's is_greedy)

    chat = api.chat.completions.create(model="color", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                       max_tokens=6, logprobs=True, top_logprobs=2, extra_body={"min_tokens": 6})
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(c.top_logprobs) == 2 for c in content)
    assert bytes(b for c in content for b in c.bytes).decode(errors="replace").strip() == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="color", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert error_of(e)["param"] == "top_logprobs"

    streamed = api.completions.create(model="color", prompt=prompt, max_tokens=6, logprobs=1, stream=True,
                                      extra_body={"min_tokens": 6})
    tokens, text = [], ""
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
        text += chunk.choices[0].text if chunk.choices else ""
    assert "".join(tokens) == text == out.text
    streamed = api.chat.completions.create(model="color", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           max_tokens=6, logprobs=True, top_logprobs=2, stream=True,
                                           extra_body={"min_tokens": 6})
    entries = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for e in chunk.choices[0].logprobs.content]
    assert [e.token for e in entries] == [c.token for c in content]


# ---------------------------------------------------------------- lm-evaluation-harness against lora serve

def loglikelihoods(results, task):
    return [float(sample["resps"][0][0][0]) for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.long
def test_lm_evals_local_completions_against_lora_serve_equals_its_hf_model_with_peft(url, ref, mapper, chat_llama,
                                                                                       tmp_path, capsys, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    # Each run records the environment (pip list, nvidia-smi... in subprocesses: seconds); nothing here reads it.
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
    # ... and bootstraps the perplexity's standard error from 100 000 resamples in a pool of forked processes:
    # nothing here reads it either (lora eval prints no stderr).
    monkeypatch.setattr("lm_eval.api.metrics.bootstrap_stderr", lambda metric, values, iters: float("nan"))
    from lora.cli import main
    from lora.harness import custom_task, run_lm_eval, tokenizer_folder

    records = tmp_path / "test.json"
    records.write_text(json.dumps([{"instruction": q, "input": "", "output": f"It is {c}."}
                                   for q, c in zip(QUESTIONS, ["red", "blue", "grey", "brown", "green"])]))
    custom_task(ref, "color", str(records), str(tmp_path), "colors")
    served = run_lm_eval(url, "color", tokenizer_folder(ref, str(tmp_path)), ["colors"], str(tmp_path))
    hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": chat_llama, "peft": mapper["color"],
                                                         "device": "cpu", "dtype": "float32"},
                                 tasks=["colors"], log_samples=True,
                                 task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path),
                                                                        include_defaults=False))
    assert len(loglikelihoods(served, "colors")) == 5
    assert loglikelihoods(served, "colors") == pytest.approx(loglikelihoods(hf, "colors"), abs=1e-4)
    assert served["results"]["colors"]["acc,none"] == hf["results"]["colors"]["acc,none"]

    # `lora eval --lm-eval`: the same, against a server it starts itself
    mapper_file = tmp_path / "mapper.json"
    mapper_file.write_text(json.dumps(mapper))
    assert main(["eval", "--model", chat_llama, "--mapper", str(mapper_file), "--task", "color", "--lm-eval",
                 str(records), "--device", "cpu", "--output", str(tmp_path / "out.json")]) == 0
    assert "color: lm-eval lora_color_test: " in capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert loglikelihoods(saved, "lora_color_test") == pytest.approx(loglikelihoods(hf, "colors"), abs=1e-4)
    # against a running server, for the base model (its name read from /v1/models)
    assert main(["eval", "--model", chat_llama, "--lm-eval", str(records), "--base-url", url, "--limit", "2",
                 "--device", "cpu"]) == 0
    assert "base: lm-eval lora_base_test: perplexity " in capsys.readouterr().out
