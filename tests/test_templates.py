"""Golden renderings, label masks, prompt/training consistency, Meta's Llama-2 construction."""

import re

import pytest

from llamatune.data.jinja import to_jinja
from llamatune.data.templates import TEMPLATES, render, stop_token_ids
from llamatune.errors import UserError

CONV = [
    {"role": "system", "content": "be helpful"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "the cat sat"},
    {"role": "user", "content": "why"},
    {"role": "assistant", "content": "because"},
]

GOLDEN = {
    "alpaca": "<s>be helpful\n\n### Instruction:\nhello\n\n### Response:\nthe cat sat</s>\n\n"
              "### Instruction:\nwhy\n\n### Response:\nbecause</s>",
    "vicuna": "<s>be helpful USER: hello ASSISTANT: the cat sat</s>USER: why ASSISTANT: because</s>",
    "llama2": "<s>[INST] <<SYS>>\nbe helpful\n<</SYS>>\n\nhello [/INST] the cat sat </s>"
              "<s>[INST] why [/INST] because </s>",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe helpful<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nthe cat sat<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nwhy<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nbecause<|eot_id|>",
    "chatml": "<|im_start|>system\nbe helpful<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
              "<|im_start|>assistant\nthe cat sat<|im_end|>\n<|im_start|>user\nwhy<|im_end|>\n"
              "<|im_start|>assistant\nbecause<|im_end|>",
}
ANSWER_TEXT = {  # what each template supervises for an answer, end token aside
    "alpaca": "{}", "vicuna": " {}", "llama2": " {} ", "llama3": "{}", "chatml": "{}",
}
END = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}


def _spans(labels):
    spans, cur = [], []
    for t in labels:
        if t != -100:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_text(tiny_tokenizer, name):
    r = render(tiny_tokenizer, name, CONV)
    assert r.text == GOLDEN[name]
    assert len(r.input_ids) == len(r.labels)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_every_answer_and_its_end_token_supervised_nothing_else(tiny_tokenizer, name):
    tok = tiny_tokenizer
    r = render(tok, name, CONV)
    spans = _spans(r.labels)
    answers = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert len(spans) == len(answers)
    end_id = tok.convert_tokens_to_ids(END[name]) if name in END else tok.eos_token_id
    for span, ans in zip(spans, answers):
        assert span[-1] == end_id
        expect = tok(ANSWER_TEXT[name].format(ans), add_special_tokens=False)["input_ids"]
        if name in END:
            expect = expect[:-1] if expect[-1] == end_id else expect
        assert span[:-1] == expect
    # System and user text never supervised.
    sup_text = tok.decode([t for t in r.labels if t != -100])
    for word in ("be helpful", "hello", "why"):
        assert word not in sup_text


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_inference_prompt_equals_training_prefix(tiny_tokenizer, name):
    full = render(tiny_tokenizer, name, CONV)
    for k in (2, 4):  # conversation cut right after each user turn
        prompt = render(tiny_tokenizer, name, CONV[:k], add_generation_prompt=True)
        assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
        assert prompt.labels == full.labels[: len(prompt.labels)]
        assert prompt.labels[-1] == -100
        # The next training token is the first supervised one: the answer starts right there.
        assert full.labels[len(prompt.input_ids)] != -100


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_saved_jinja_template_renders_the_same(tiny_tokenizer, name):
    tok = tiny_tokenizer
    jinja = to_jinja(tok, name)
    prompt = render(tok, name, CONV[:4], add_generation_prompt=True)
    out = tok.apply_chat_template(CONV[:4], tokenize=False, add_generation_prompt=True,
                                  chat_template=jinja)
    assert out == prompt.text
    full = tok.apply_chat_template(CONV, tokenize=False, chat_template=jinja)
    assert full.startswith(render(tok, name, CONV).text)


def test_alpaca_with_and_without_input(tiny_tokenizer):
    r = render(tiny_tokenizer, "alpaca", [
        {"role": "user", "content": "sum it", "input": "one two"},
        {"role": "assistant", "content": "three"}])
    assert r.text == (
        "<s>Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nsum it\n\n### Input:\none two\n\n### Response:\nthree</s>")
    r = render(tiny_tokenizer, "alpaca", [{"role": "user", "content": "hi"}],
               add_generation_prompt=True)
    assert r.text == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nhi\n\n### Response:\n")


def test_exactly_one_bos(tiny_tokenizer):
    for name in ("alpaca", "vicuna"):
        ids = render(tiny_tokenizer, name, CONV).input_ids
        assert ids[0] == tiny_tokenizer.bos_token_id
        assert ids.count(tiny_tokenizer.bos_token_id) == 1, name
    ids = render(tiny_tokenizer, "llama3", CONV).input_ids  # its own BOS, not the tokenizer's
    begin = tiny_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[0] == begin and ids.count(begin) == 1
    assert tiny_tokenizer.bos_token_id not in ids
    assert tiny_tokenizer.bos_token_id not in render(tiny_tokenizer, "chatml", CONV).input_ids
    ids = render(tiny_tokenizer, "llama2", CONV).input_ids  # one BOS per exchange, by design
    assert ids.count(tiny_tokenizer.bos_token_id) == 2


def test_tokenizer_template_locates_assistant_spans(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    r = render(tok, "tokenizer", CONV)
    chatml = render(tok, "chatml", CONV)
    assert r.text == chatml.text
    assert r.labels == chatml.labels
    assert stop_token_ids(tok, "tokenizer")[:1] == [tok.eos_token_id]
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok, "tokenizer")


def test_unknown_template_and_missing_special_tokens(llama2_tokenizer):
    with pytest.raises(UserError, match="Did you mean llama2"):
        render(llama2_tokenizer, "lama2", CONV)
    with pytest.raises(UserError, match=re.escape("<|eot_id|>")):
        render(llama2_tokenizer, "llama3", CONV)


def test_templates_are_records():
    assert set(GOLDEN) | {"tokenizer"} == set(TEMPLATES)


# --- Meta's Llama-2-Chat reference construction --------------------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_reference(sp, dialog):
    """Meta's chat_completion token construction, written from its description, on the
    SentencePiece model itself (bos=1, eos=2)."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
                  ] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [sp.bos_id()] + sp.encode(
            f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ) + [sp.eos_id()]
    if dialog[-1]["role"] == "user":
        tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")
    return tokens


DIALOGS = [
    [{"role": "user", "content": "what is the capital of france"}],
    [{"role": "system", "content": "be helpful and short"},
     {"role": "user", "content": "hello how are you"}],
    [{"role": "user", "content": " tell me a poem "},
     {"role": "assistant", "content": "the sky is blue\nthe sun is red "},
     {"role": "user", "content": "why"}],
    [{"role": "system", "content": "you are a cat"},
     {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "sure here it is"},
     {"role": "user", "content": "one two 345"},
     {"role": "assistant", "content": "yes"},
     {"role": "user", "content": "thanks"}],
]


@pytest.mark.parametrize("dialog", DIALOGS, ids=lambda d: f"{len(d)}msgs")
def test_llama2_matches_meta_reference(spm_dir, llama2_tokenizer, dialog):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    ours = render(llama2_tokenizer, "llama2", dialog, add_generation_prompt=True).input_ids
    assert ours == meta_reference(sp, dialog)
    if len(dialog) > 2:  # the training sample: every complete exchange, no open turn
        done = dialog[:-1]
        assert render(llama2_tokenizer, "llama2", done).input_ids == meta_reference(sp, done)


@pytest.mark.parametrize("post_processor", [False, True], ids=["no-bos-post", "bos-post"])
def test_llama3_always_starts_with_begin_of_text(tmp_path, post_processor):
    """Meta's format begins with <|begin_of_text|>, whatever the tokenizer.json adds."""
    from conftest import build_llama3_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build_llama3_tokenizer(tmp_path, post_processor)))
    begin = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert (tok("hello")["input_ids"][0] == begin) is post_processor
    for msgs, gen in ((CONV, False), (CONV[:2], True), (CONV[1:2], True)):
        r = render(tok, "llama3", msgs, add_generation_prompt=gen)
        assert r.input_ids[0] == begin and r.input_ids.count(begin) == 1
        assert r.text.startswith("<|begin_of_text|><|start_header_id|>")
        # The saved chat template renders the same text (so plain transformers agrees).
        tok.chat_template = to_jinja(tok, "llama3")
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == r.text
    # Templates without a BOS of their own follow the tokenizer's convention.
    alpaca = render(tok, "alpaca", CONV).input_ids
    assert (alpaca[0] == begin) is post_processor and alpaca.count(begin) == int(post_processor)
    assert begin not in render(tok, "vicuna", CONV).input_ids[1:]


def test_llama3_needs_its_begin_token(llama2_tokenizer):
    with pytest.raises(UserError, match="<\\|begin_of_text\\|>"):
        render(llama2_tokenizer, "llama3", CONV)
