"""Logprobs: log_softmax of the float32 logits (after the mask), prompt logprobs for echo, OpenAI's shapes."""
import json

import pytest
import torch

import lora
from lora.engine import Engine, SamplingParams
from lora.errors import LoraError
from lora.logprobs import FLOOR, TokenLogprobs, chat_logprobs, completion_logprobs, prompt_logprobs, token_logprobs
from lora.structured import apply_masks, guide, request_constraint
from tests.conftest import make_adapter


def reference_logprobs(logits):
    """log_softmax computed another way: in float64, from logsumexp."""
    logits = logits.double()
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def test_sampled_token_logprobs_and_top_logprobs_equal_log_softmax_of_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 4
    sampled = [3, 250, 17, 0]
    entries = token_logprobs(logits, sampled, top=[0, 5, 1, 20])
    expected = reference_logprobs(logits)
    assert [e.token_id for e in entries] == sampled
    for row, (entry, k) in enumerate(zip(entries, [0, 5, 1, 20])):
        assert entry.logprob == pytest.approx(expected[row, sampled[row]].item(), abs=1e-5)
        assert list(entry.top) == expected[row].topk(k).indices.tolist()  # most likely first
        for token, logprob in entry.top.items():
            assert logprob == pytest.approx(expected[row, token].item(), abs=1e-5)


def test_logprobs_after_a_mask_are_over_the_allowed_tokens(tiny_tokenizer):
    grammar = guide(tiny_tokenizer).compile(request_constraint({"guided_choice": ["red", "blue"]}))
    logits = torch.randn(2, len(tiny_tokenizer))
    apply_masks(logits, [grammar.matcher(), None])
    allowed = logits[0].isfinite()
    token = int(allowed.nonzero()[0])
    masked, free = token_logprobs(logits, [token, token], top=len(tiny_tokenizer))
    assert masked.logprob == pytest.approx(reference_logprobs(logits[0][allowed])[allowed[:token].sum()].item(), abs=1e-5)
    assert sum(torch.tensor(list(masked.top.values())).exp()) == pytest.approx(1, abs=1e-5)
    assert masked.logprob > free.logprob  # the mask moved the forbidden tokens' probability onto the allowed ones
    # forbidden tokens are -inf, which JSON cannot hold: reported as FLOOR
    shaped = completion_logprobs(tiny_tokenizer, [masked])
    json.dumps(shaped, allow_nan=False)
    assert min(shaped["top_logprobs"][0].values()) == FLOOR


@torch.no_grad()
def test_prompt_logprobs_sum_to_the_models_own_loss(tiny_llama):
    model, tokenizer = lora.load_model(tiny_llama)
    ids = tokenizer("What colour is the tiger? orange")["input_ids"]
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
    entries = prompt_logprobs(out.logits[0].float(), ids, top=2)
    assert entries[0].logprob is None and entries[0].token_id == ids[0]
    total = sum(e.logprob for e in entries[1:])
    assert total == pytest.approx(-out.loss.item() * (len(ids) - 1), abs=1e-4)
    assert [e.token_id for e in entries] == ids and all(len(e.top) == 2 for e in entries[1:])


def test_completion_logprobs_have_openais_shape(tiny_tokenizer):
    ids = tiny_tokenizer("the red apple")["input_ids"]
    torch.manual_seed(1)
    entries = prompt_logprobs(torch.randn(len(ids), len(tiny_tokenizer)), ids, top=1)
    shaped = completion_logprobs(tiny_tokenizer, entries)
    assert "".join(shaped["tokens"]) == "the red apple"
    assert shaped["text_offset"] == [sum(len(t) for t in shaped["tokens"][:i]) for i in range(len(ids))]
    assert shaped["token_logprobs"][0] is None and shaped["top_logprobs"][0] is None
    for token, logprob, top in zip(shaped["tokens"][1:], shaped["token_logprobs"][1:], shaped["top_logprobs"][1:]):
        assert top[token] == logprob and 1 <= len(top) <= 2  # the top one, and the chosen one when it is not
    assert completion_logprobs(tiny_tokenizer, entries[1:], text_offset=5)["text_offset"][0] == 5


def test_chat_logprobs_have_openais_shape_with_exact_bytes(tiny_tokenizer):
    ids = tiny_tokenizer("blue river é")["input_ids"]
    entries = token_logprobs(torch.randn(len(ids), len(tiny_tokenizer)), ids, top=3)
    content = chat_logprobs(tiny_tokenizer, entries)["content"]
    assert bytes(b for c in content for b in c["bytes"]) == "blue river é".encode()
    assert [c["logprob"] for c in content] == [e.logprob for e in entries]
    assert all(len(c["top_logprobs"]) == 3 and set(c["top_logprobs"][0]) == {"token", "logprob", "bytes"}
               for c in content)


# ---------------------------------------------------------------- through the engine

@pytest.fixture(scope="module")
def mt(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs-adapters")
    return lora.MultiTaskModel(tiny_llama, {"qa": make_adapter(tiny_llama, root / "qa", ["q_proj", "v_proj"], 0),
                                            "sum": make_adapter(tiny_llama, root / "sum", "all-linear", 1)})


@torch.no_grad()
def model_logits(mt, task, ids):
    with mt.apply_downstream(task) as model:
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_engine_logprobs_equal_log_softmax_of_the_float32_logits_after_the_mask_before_sampling(mt):
    grammar = guide(mt.tokenizer).compile(request_constraint({"guided_regex": "[a-z ]{3,30}"}))
    prompts = [mt.tokenizer(f"What colour is the {thing}?")["input_ids"] for thing in ("tiger", "lamp", "piano")]
    tasks = ["qa", "sum", None]
    settings = [SamplingParams(max_tokens=10, min_tokens=10, temperature=1.5, top_k=5, seed=1, logprobs=4),
                SamplingParams(max_tokens=30, temperature=1.0, seed=2, logprobs=2, grammar=grammar),
                SamplingParams(max_tokens=6, min_tokens=6, logprobs=0)]
    outputs = Engine(mt, max_num_seqs=3, mode="mixed").generate(prompts, tasks, settings)
    for ids, task, sampling, out in zip(prompts, tasks, settings, outputs):
        assert [e.token_id for e in out.logprobs] == out.new_token_ids and len(out.new_token_ids) > 2
        logits = model_logits(mt, task, ids + out.new_token_ids)[len(ids) - 1:-1]
        if sampling.grammar is not None:  # the reference replays the grammar over the same tokens
            matcher = sampling.grammar.matcher()
            for row, token in zip(logits, out.new_token_ids):
                apply_masks(row[None], [matcher])
                matcher.advance(token)
        expected = torch.log_softmax(logits, dim=-1)
        for j, entry in enumerate(out.logprobs):
            assert entry.logprob == pytest.approx(expected[j, entry.token_id].item(), abs=1e-5)
            assert len(entry.top) == sampling.logprobs
            for token, logprob in entry.top.items():
                assert logprob == pytest.approx(expected[j, token].item(), abs=1e-5)
            assert list(entry.top) == expected[j].topk(sampling.logprobs).indices.tolist()


@torch.no_grad()
def test_echo_prompt_logprobs_through_the_engine_sum_to_the_models_own_loss(mt):
    ids = mt.tokenizer("What colour is the tiger? The tiger is orange and black, the lamp is white.")["input_ids"]
    with mt.apply_downstream("qa") as model:
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    engine = Engine(mt, max_num_seqs=2, max_prefill_tokens=5)  # chunked prefill: the prompt takes several steps
    echo = SamplingParams(max_tokens=0, prompt_logprobs=1)
    for _ in range(2):  # the second time its prompt's K/V are in a free slot: echo must not reuse them
        out = engine.generate([ids], ["qa"], echo)[0]
        assert out.finished and out.finish_reason == "length" and out.num_tokens == 0 and out.text == ""
        entries = out.prompt_logprobs
        assert [e.token_id for e in entries] == ids and entries[0].logprob is None
        assert sum(e.logprob for e in entries[1:]) == pytest.approx(-loss * (len(ids) - 1), abs=1e-4)
        assert all(len(e.top) == 1 for e in entries[1:])

    seen = []
    engine.add_request(ids, "qa", SamplingParams(max_tokens=3, min_tokens=3, prompt_logprobs=0, logprobs=1),
                       seen.append)
    while not (seen and seen[-1].finished):
        engine.step()
    assert [len(out.prompt_logprobs or []) for out in seen] == [len(ids), 0, 0]
    assert [len(out.logprobs) for out in seen] == [1, 1, 1]
    assert [out.prompt_logprobs for out in seen[1:]] == [None, None]


@pytest.mark.parametrize("settings, message", [
    (dict(max_tokens=0), r"max_tokens=0 is out of range: .*0 only with prompt_logprobs"),
    (dict(logprobs=21), "logprobs=21 is out of range: use an integer from 0 to 20"),
    (dict(prompt_logprobs=-1), "prompt_logprobs=-1 is out of range"),
    (dict(logprobs=True), "logprobs=True is out of range"),
])
def test_logprob_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(LoraError, match=message):
        SamplingParams(**settings).check()


def test_tokens_of_the_same_text_keep_the_likeliest_logprob_so_the_greedy_token_is_the_top_one(tiny_tokenizer):
    half = [i for i in range(len(tiny_tokenizer)) if completion_logprobs(tiny_tokenizer, [
        TokenLogprobs(i, -1.0)])["tokens"] == ["\ufffd"]][:2]  # parts of one UTF-8 character: both read U+FFFD
    assert len(half) == 2
    chosen = TokenLogprobs(half[0], -1.0, {half[0]: -1.0, half[1]: -2.0})
    shaped = completion_logprobs(tiny_tokenizer, [chosen, TokenLogprobs(half[1], -3.0, {half[0]: -1.0})])
    assert shaped["top_logprobs"] == [{"\ufffd": -1.0}, {"\ufffd": -1.0}]
    assert shaped["token_logprobs"][0] == max(shaped["top_logprobs"][0].values())
