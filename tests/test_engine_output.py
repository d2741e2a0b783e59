"""Output processing alone: incremental detokenizing equals decoding the whole answer, stop strings cut
where they start (also across tokens), and deltas add up to the text."""
import numpy as np
import pytest

from lora.engine import SamplingParams
from lora.engine.output import OutputProcessor
from lora.engine.request import Request

TEXT = "Héllo wörld ✓ 你好, the lamp is blue 🙂 and the river is green."


def stream(tokenizer, token_ids, sampling):
    """Feed tokens one by one as the engine does; returns the Outputs."""
    processor = OutputProcessor(tokenizer, [tokenizer.eos_token_id])
    request = Request("r", np.array([1], dtype=np.int32), None, sampling.check(), on_output=lambda out: None)
    outputs = []
    for token in token_ids:
        outputs.append(processor.append(request, token))
        if outputs[-1].finished:
            break
    return outputs


def test_deltas_of_multibyte_text_add_up_to_the_whole_decode(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT)["input_ids"]
    assert len(ids) > len(TEXT) // 2  # byte-level pieces: characters are split across tokens
    outputs = stream(tiny_tokenizer, ids, SamplingParams(max_tokens=len(ids)))
    assert outputs[-1].finish_reason == "length"
    assert "".join(o.delta for o in outputs) == outputs[-1].text == tiny_tokenizer.decode(ids)
    assert all("\ufffd" not in o.delta for o in outputs)  # half a character is never sent
    assert [o.num_tokens for o in outputs] == list(range(1, len(ids) + 1))


@pytest.mark.parametrize("stop", ["wörld", "✓ 你", "green.", "🙂"])
def test_a_stop_string_ends_the_text_where_it_starts(tiny_tokenizer, stop):
    ids = tiny_tokenizer(TEXT)["input_ids"]
    outputs = stream(tiny_tokenizer, ids, SamplingParams(max_tokens=len(ids), stop=[stop, "never there"]))
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].text == TEXT[:TEXT.find(stop)]
    assert "".join(o.delta for o in outputs) == outputs[-1].text
