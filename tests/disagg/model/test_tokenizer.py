from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from jinja2.exceptions import TemplateError

from disagg.errors import InvalidRequestError
from disagg.model.tokenizer import (
    IncrementalDetokenizer,
    StopStringMatcher,
    TextStream,
    apply_chat_template,
    encode_prompt,
)

ENGLISH = "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?"
CODE = 'def f(x):\n    if x:\n        return "  spaced  "\n\treturn None\n'
MULTIBYTE = "你好，世界！ こんにちは 🎉🚀 naïve café — 東京タワー 👩‍👩‍👧"


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's real tokenizer (a byte-level BPE, so CJK splits across tokens)."""
    from transformers import AutoTokenizer

    from disagg.model.loader import convert_gguf, resolve_model_path

    path, _ = resolve_model_path("default")
    return AutoTokenizer.from_pretrained(convert_gguf(path))


def _ids_from_template_result(result) -> list[int]:
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def _deltas(detokenizer: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    deltas = [detokenizer.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detokenizer.flush()]


# --- IncrementalDetokenizer -------------------------------------------------------------


@pytest.mark.parametrize("text", [ENGLISH, CODE, MULTIBYTE], ids=["english", "code", "multibyte"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenization_equals_full_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    deltas = _deltas(IncrementalDetokenizer(tokenizer), ids, chunk)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_text_really_splits_characters_across_tokens(tokenizer):
    # Guards the test above: it only means something if single tokens decode to U+FFFD.
    ids = tokenizer.encode(MULTIBYTE)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_leading_spaces_survive_token_by_token_decoding(tokenizer):
    ids = tokenizer.encode("Hello big world")
    deltas = _deltas(IncrementalDetokenizer(tokenizer), ids)
    assert deltas[:3] == ["Hello", " big", " world"]


def test_sentencepiece_style_leading_space_needs_left_context():
    # A Metaspace decoder (Llama 2 / Mistral style) strips the space of the first token it
    # decodes, so decoding each token alone would glue words together.
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581big": 2, "\u2581world": 3, "!": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace()
    sentencepiece_like = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert sentencepiece_like.decode([3]) == "world"
    deltas = _deltas(IncrementalDetokenizer(sentencepiece_like), [1, 2, 3, 4])
    assert deltas == ["Hello", " big", " world", "!", ""]


def test_partial_character_is_held_then_released_by_flush(tokenizer):
    first = tokenizer.encode("你")[0]
    assert tokenizer.decode([first]) == "\ufffd"
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(first) == ""
    assert detokenizer.flush() == "\ufffd"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_flag(tokenizer, skip):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer.encode("Hi there"), end, *tokenizer.encode(" again")]
    text = "".join(_deltas(IncrementalDetokenizer(tokenizer, skip_special_tokens=skip), ids))
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


def test_decode_window_stays_small_for_long_sequences(tokenizer):
    decoded_lengths: list[int] = []

    class Recording:
        def decode(self, ids, **kwargs):
            decoded_lengths.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer.encode((ENGLISH + " " + MULTIBYTE + "\n") * 20)
    assert len(ids) > 500
    text = "".join(_deltas(IncrementalDetokenizer(Recording()), ids))
    assert text == tokenizer.decode(ids)
    assert max(decoded_lengths) <= 8


# --- StopStringMatcher ------------------------------------------------------------------


def _run_stops(stop, deltas: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stop)
    out, is_stopped = [], False
    for delta in deltas:
        text, is_stopped = matcher.push(delta)
        out.append(text)
        if is_stopped:
            break
    out.append(matcher.flush())
    return out, is_stopped


def test_stop_string_cuts_just_before_it_and_ends_the_stream():
    matcher = StopStringMatcher(["END"])
    assert matcher.push("Hello END world") == ("Hello ", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_string_split_across_deltas_is_never_leaked():
    out, is_stopped = _run_stops(["END"], ["Hel", "lo E", "N", "D more"])
    assert is_stopped
    assert out == ["Hel", "lo ", "", "", ""]


def test_earliest_of_several_stop_strings_wins():
    out, is_stopped = _run_stops(["world", "lo"], ["Hello world"])
    assert is_stopped and "".join(out) == "Hel"


def test_partial_stop_prefix_is_held_back_then_released_by_flush():
    matcher = StopStringMatcher(["User:"])
    assert matcher.push("the answer\nUs") == ("the answer\n", False)
    assert matcher.flush() == "Us"


def test_held_back_prefix_is_released_once_it_cannot_match():
    out, is_stopped = _run_stops(["END"], ["a E", "N", "X b"])
    assert not is_stopped
    assert out == ["a ", "", "ENX b", ""]


def test_self_overlapping_stop_string_is_found():
    out, is_stopped = _run_stops(["aab"], list("aaab"))
    assert is_stopped and "".join(out) == "a"


def test_no_stop_strings_is_a_pass_through():
    deltas = ["Hel", "", "lo ", "wor", "ld"]
    out, is_stopped = _run_stops((), deltas)
    assert out == [*deltas, ""] and not is_stopped


def test_single_string_is_one_stop_and_empty_stop_is_rejected():
    assert StopStringMatcher("ab").push("xaby") == ("x", True)
    with pytest.raises(InvalidRequestError) as info:
        StopStringMatcher(["ok", ""])
    assert info.value.param == "stop"


def test_random_streams_match_reference_and_never_leak():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 5)))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[: min(hits)] if hits else text
        out, is_stopped = _run_stops(stops, deltas)
        assert "".join(out) == expected and is_stopped == bool(hits)
        for n in range(len(out)):
            emitted = "".join(out[:n])
            assert expected.startswith(emitted)  # nothing emitted is ever taken back
            assert not any(s in emitted for s in stops)


# --- TextStream ------------------------------------------------------------------------


def _stream(tokenizer, text: str, stop) -> tuple[TextStream, list[str], bool]:
    stream = TextStream(tokenizer, stop=stop)
    deltas, is_stopped = [], False
    for token_id in tokenizer.encode(text):
        delta, is_stopped = stream.push([token_id])
        deltas.append(delta)
        if is_stopped:
            break
    deltas.append(stream.finish())
    return stream, deltas, is_stopped


def test_text_stream_stops_on_stop_string_in_generated_tokens(tokenizer):
    stream, deltas, is_stopped = _stream(tokenizer, "The answer is 42.\nUser: next?", ["\nUser:"])
    assert is_stopped and stream.text == "The answer is 42."
    assert not any("\n" in d for d in deltas)
    assert stream.push(tokenizer.encode(" more")) == ("", True)


def test_text_stream_stops_inside_multibyte_text(tokenizer):
    stream, deltas, is_stopped = _stream(tokenizer, "你好世界！再见", ["世界"])
    assert is_stopped and stream.text == "你好"
    assert not any("\ufffd" in d for d in deltas)


def test_text_stream_without_stop_reproduces_full_text(tokenizer):
    stream, deltas, is_stopped = _stream(tokenizer, MULTIBYTE + CODE, ())
    assert not is_stopped and stream.text == "".join(deltas) == MULTIBYTE + CODE


def test_text_stream_finish_releases_unresolved_stop_prefix(tokenizer):
    stream, deltas, is_stopped = _stream(tokenizer, "Hello Us", ["User"])
    assert not is_stopped
    assert not "".join(deltas[:-1]).endswith("Us")
    assert deltas[-1].endswith("Us") and stream.text == "Hello Us"


# --- chat template and prompts ---------------------------------------------------------


def test_chat_template_matches_tokenizer_and_contains_user_text(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = apply_chat_template(tokenizer, messages)
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert ids == _ids_from_template_result(expected)
    assert all(isinstance(i, int) for i in ids)
    text = tokenizer.decode(ids)
    assert "What is 2+2?" in text and text.endswith("<|im_start|>assistant\n")


def test_chat_template_without_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.decode(apply_chat_template(tokenizer, messages, add_generation_prompt=False))
    assert "Be brief." in text and not text.endswith("<|im_start|>assistant\n")


def test_list_of_text_parts_equals_plain_string(tokenizer):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    as_parts = apply_chat_template(tokenizer, [{"role": "user", "content": parts}])
    as_string = apply_chat_template(tokenizer, [{"role": "user", "content": "Hello there"}])
    assert as_parts == as_string


@pytest.mark.parametrize(
    "result", [[5, 6, 7], {"input_ids": [5, 6, 7]}, {"input_ids": [[5, 6, 7]]}]
)
def test_chat_template_result_shapes_all_give_a_flat_list(result):
    # transformers 4 returns a list, transformers 5 a BatchEncoding; both may be batched.
    tokenizer = SimpleNamespace(chat_template="t", apply_chat_template=lambda *a, **k: result)
    assert apply_chat_template(tokenizer, [{"role": "user", "content": "x"}]) == [5, 6, 7]


def test_developer_and_tool_roles_are_accepted(tokenizer):
    messages = [{"role": "developer", "content": "dev"}, {"role": "tool", "content": "42"}]
    text = tokenizer.decode(apply_chat_template(tokenizer, messages))
    assert "<|im_start|>developer\ndev" in text and "<|im_start|>tool\n42" in text


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        ["not a message"],
    ],
    ids=["empty", "no-content", "no-role", "bad-role", "int", "image", "no-text", "str"],
)
def test_bad_messages_are_invalid_requests(tokenizer, messages):
    with pytest.raises(InvalidRequestError) as info:
        apply_chat_template(tokenizer, messages)
    assert info.value.param == "messages"


def test_missing_chat_template_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="no chat template") as info:
        apply_chat_template(SimpleNamespace(chat_template=None), [{"role": "user", "content": "x"}])
    assert info.value.param == "messages"


def test_template_errors_become_invalid_requests():
    def raising(*args, **kwargs):
        raise TemplateError("roles must alternate")

    tokenizer = SimpleNamespace(chat_template="{{ x }}", apply_chat_template=raising)
    with pytest.raises(InvalidRequestError, match="roles must alternate") as info:
        apply_chat_template(tokenizer, [{"role": "user", "content": "x"}])
    assert info.value.param == "messages"


def test_encode_prompt_matches_tokenizer_call(tokenizer):
    ids = encode_prompt(tokenizer, ENGLISH)
    assert ids == list(tokenizer(ENGLISH)["input_ids"])
    assert tokenizer.decode(ids) == ENGLISH  # SmolLM2 adds no BOS to plain prompts
    with pytest.raises(InvalidRequestError) as info:
        encode_prompt(tokenizer, ["not", "text"])
    assert info.value.param == "prompt"
