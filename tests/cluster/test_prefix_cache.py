"""The prefix cache on real `disagg serve` processes and the real default model (float32):
requests sharing a long system prompt, one after another and at once, get transformers' text,
the later ones from the cached prefix, and leave every block free or cached-free."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from disagg.model.tokenizer import encode_prompt
from tests.cluster_harness import ServeProcess
from tests.helpers import reference_text

pytestmark = pytest.mark.slow  # starts `disagg serve` on the default model

NEW_TOKENS = 16
SYSTEM = (
    "You are a careful assistant for a railway company. Answer in one short sentence. "
    "Timetables change twice a year, in June and in December; tickets bought before a change "
    "stay valid. Bicycles travel free outside rush hours. Dogs need a half-price ticket. "
    "Refunds are possible up to fifteen minutes before departure, minus a small fee. "
) * 3
QUESTIONS = [
    "Q: Can I take my bicycle at noon?\nA:",
    "Q: Does my dog need a ticket?\nA:",
    "Q: When do timetables change?\nA:",
    "Q: Can I get a refund ten minutes before departure?\nA:",
]


@pytest.fixture(scope="module")
def expected(default_fp32) -> dict[str, str]:
    tok = default_fp32.tokenizer
    return {
        q: reference_text(default_fp32, encode_prompt(tok, SYSTEM + q), NEW_TOKENS)
        for q in QUESTIONS
    }


def ask(serve: ServeProcess, question: str) -> dict:
    status, body = serve.completion(SYSTEM + question, max_tokens=NEW_TOKENS, temperature=0)
    assert status == 200, body
    return body


def test_a_shared_system_prompt_is_cached_and_the_text_stays_exact(expected):
    with ServeProcess() as serve:
        cold = ask(serve, QUESTIONS[0])
        warm = ask(serve, QUESTIONS[1])
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            together = list(pool.map(lambda q: ask(serve, q), QUESTIONS))
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        num_system = cold["usage"]["prompt_tokens"] - 16  # the question is under 16 tokens
        for body in (warm, *together):
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= num_system - 16
            assert body["metrics"]["kv_cached_tokens"] >= num_system - 16
        for body, question in zip([cold, warm, *together], [*QUESTIONS[:2], *QUESTIONS]):
            assert body["choices"][0]["text"] == expected[question], question
        serve.wait_all_blocks_free()
