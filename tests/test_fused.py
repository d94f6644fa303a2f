"""The lean kernels (llamatune.fused, llamatune._head_loss) equal the modules they replace."""

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_loss_sum

from llamatune import fused
from llamatune._head_loss import _HeadCrossEntropy, head_cross_entropy_sum

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(dropout=0.0, use_dora=False, checkpointing=False, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules=TARGETS, use_dora=use_dora))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the update visible
            torch.nn.init.normal_(p, std=0.2)
    model.train()
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels[2, 8:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _loss_and_grads(model, batch, fused_loss=True, seed=123):
    torch.manual_seed(seed)
    loss, n = lm_loss_sum(model, batch, fused=fused_loss)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _max_diff(g1, g2):
    assert g1.keys() == g2.keys()
    return max(float((g1[k] - g2[k]).abs().max()) for k in g1)


def test_lora_branch_and_swiglu_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    a = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    base = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)

    def branch(p, seed):
        # base.clone(): the update goes into the frozen layer's output in place
        return lambda x, a, b, base: fused._LoraBranch.apply(x, a, b, 0.7, p, seed, base.clone())

    # dropout 0.3 with a fixed seed: the backward pass redraws the forward's mask
    assert torch.autograd.gradcheck(branch(0.3, 1234), (x, a, b, base))
    assert torch.autograd.gradcheck(branch(0.0, None), (x, a, b, base))
    keep, scale = fused.keep_mask(x, 0.3, 1234)
    expected = base + ((x * keep * scale) @ a.t() @ b.t()) * 0.7
    assert torch.allclose(branch(0.3, 1234)(x, a, b, base), expected)
    assert torch.equal(keep, fused.keep_mask(x, 0.3, 1234)[0])
    assert not torch.equal(keep, fused.keep_mask(x, 0.3, 1235)[0])
    assert torch.allclose(fused.lora_branch(x, a, b, 0.7), (x @ a.t() @ b.t()) * 0.7)
    gate = torch.randn(4, 7, dtype=torch.double, requires_grad=True)
    up = torch.randn(4, 7, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(fused.swiglu, (gate, up))
    assert torch.allclose(fused.swiglu(gate, up), F.silu(gate) * up)


def test_head_cross_entropy_matches_reference():
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.double, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda a, b: _HeadCrossEntropy.apply(a, b, y, 3), (h, w))
    h = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(5000, 64) * 0.1
    y = torch.randint(0, 5000, (300,))
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    ref.backward()
    g_ref, h.grad = h.grad.clone(), None
    got = head_cross_entropy_sum(h, w, y)
    (0.5 * got).backward()
    assert abs(float(got.detach() / ref.detach()) - 1) < 1e-5
    assert torch.allclose(h.grad, 0.5 * g_ref, atol=1e-5)


def test_fused_model_equals_peft_without_dropout():
    model = _tiny()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch, fused_loss=False)
    counts = fused.install(model)
    assert counts == {"lora": 14, "swiglu": 2, "norm": 4}
    assert fused.install(model) == {"lora": 0, "swiglu": 0, "norm": 0}  # idempotent
    loss, grads = _loss_and_grads(model, batch)
    assert abs(loss - ref_loss) < 1e-4 * abs(ref_loss)
    assert _max_diff(grads, ref_grads) < 1e-5
    # the adapter's saved state is unchanged (no new parameters or buffers)
    assert all("llamatune" not in k for k in model.state_dict())


def test_fused_model_on_a_bf16_base_is_as_accurate_as_peft():
    """The dtype policy's case: frozen bf16 base, float32 LoRA (its input never stored in fp32).

    Against the same model in float32, the lean kernels on the bf16 base err about as much as
    peft's modules on it: bf16 rounding in another order, not other math (a wrong kernel errs
    by the size of the gradients themselves).
    """
    batch = _batch()
    exact_loss, exact = _loss_and_grads(_tiny(), batch)

    def bf16_model():
        model = _tiny()
        model.to(torch.bfloat16)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        return model

    stock_loss, stock = _loss_and_grads(bf16_model(), batch)
    model = bf16_model()
    fused.install(model)
    loss, grads = _loss_and_grads(model, batch)
    assert all(g.dtype == torch.float32 for g in grads.values())

    def err(g):
        return max(float((g[k] - exact[k]).abs().max() / exact[k].abs().max()) for k in exact)

    assert err(stock) < 0.1  # bf16 rounding, not a broken model
    assert err(grads) <= err(stock) * 1.5
    assert abs(loss - exact_loss) <= abs(stock_loss - exact_loss) * 1.5 + 1e-3 * abs(exact_loss)


def test_fused_dropout_rate_and_eval_identity():
    model = _tiny(dropout=0.25)
    batch = _batch()
    model.eval()
    with torch.no_grad():
        ref = lm_loss_sum(model, batch, fused=False)[0]
    fused.install(model)
    with torch.no_grad():
        assert abs(float(lm_loss_sum(model, batch)[0] - ref)) < 1e-4
    model.train()
    with torch.no_grad():
        a = lm_loss_sum(model, batch)[0]
        b = lm_loss_sum(model, batch)[0]
    assert float(a) != float(b)  # dropout is active in training mode
    torch.manual_seed(0)
    x = torch.randn(400, 500)
    keep, scale = fused.keep_mask(x, 0.05)
    assert keep.dtype == torch.bool
    assert abs((1 - keep.float().mean().item()) - 0.05) < 0.003
    assert abs(scale * (1 - 3277 / 65536) - 1) < 1e-12


def test_fused_dropout_replays_under_gradient_checkpointing():
    batch = _batch()
    plain = _tiny(dropout=0.3)
    fused.install(plain)
    ckpt = _tiny(dropout=0.3, checkpointing=True)
    fused.install(ckpt)
    l1, g1 = _loss_and_grads(plain, batch)
    l2, g2 = _loss_and_grads(ckpt, batch)
    assert abs(l1 - l2) < 1e-4 * abs(l1)
    assert _max_diff(g1, g2) < 1e-5


def test_fused_falls_back_for_dora():
    model = _tiny(use_dora=True)
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch, fused_loss=False)
    fused.install(model)
    loss, grads = _loss_and_grads(model, batch)
    assert abs(loss - ref_loss) < 1e-4 * abs(ref_loss)
    assert _max_diff(grads, ref_grads) < 1e-5


def test_fused_keeps_less_for_backward():
    """What autograd saves for one step: peft with dropout against the fused kernels."""
    batch = _batch()

    def saved_bytes(model):
        seen = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = lm_loss_sum(model, batch, fused=getattr(model, "_fused", False))
        loss.backward()
        return sum(seen.values())

    peft_model = _tiny(dropout=0.1)
    lean = _tiny(dropout=0.1)
    fused.install(lean)
    lean._fused = True
    before, after = saved_bytes(peft_model), saved_bytes(lean)
    assert after < 0.7 * before, (before, after)


def test_fused_4bit_matches_unfused():
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.train()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch, fused_loss=False)
    assert fused.install(model)["lora"] == 7
    loss, grads = _loss_and_grads(model, batch)
    assert abs(loss - ref_loss) < 1e-4 * abs(ref_loss)
    assert _max_diff(grads, ref_grads) < 1e-4


def test_optimizer_state_made_up_front_trains_identically():
    """build_optimizer makes grads and AdamW moments at once; steps equal torch's lazy ones."""
    from llamatune.config import TrainConfig
    from llamatune.training import build_optimizer

    def run(eager):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
        tc = TrainConfig(lr=1e-2, weight_decay=0.1)
        if eager:
            opt = build_optimizer(model, tc)
            assert all(p.grad is not None for p in model.parameters())
            assert all(len(opt.state[p]) == 3 for p in model.parameters())
        else:
            opt = torch.optim.AdamW(
                [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                 {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(8, 6, generator=g)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=not eager)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_every_stage_trains_on_the_lean_kernels(stage, tmp_path, tiny_model_dir, alpaca_file):
    """Installed after every adapter exists: all LoRA layers of every stage are switched."""
    from conftest import make_recipe, write_jsonl
    from peft.tuners.lora import LoraLayer
    from test_reward import _cfg_sections, _pairs

    from llamatune.config import load_config
    from llamatune.fused import is_fused
    from llamatune.recipes import dpo, ppo, reward, sft

    if stage == "sft":
        path = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    elif stage == "ppo":
        from test_ppo import _recipe

        path = _recipe(tmp_path, tiny_model_dir)[1]
    else:
        tmp_path.mkdir(exist_ok=True)
        sections = dict(_cfg_sections(), stage=stage)
        path = make_recipe(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", _pairs()),
                           **sections)
    cls = {"sft": sft.SFTRecipe, "rm": reward.RewardRecipe, "dpo": dpo.DPORecipe,
           "ppo": ppo.PPORecipe}[stage]
    r = cls(load_config(path), str(path))
    r.setup()
    layers = [m for m in r.net.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * 7 and is_fused(r.net.model)
    assert all("_llamatune_original_forward" in vars(m) for m in layers)


def test_kernels_stand_down_outside_the_tested_versions(monkeypatch, capsys):
    model = _tiny()
    monkeypatch.setattr(fused, "TESTED", {"peft": ("0.0", "0.1"), "transformers": ("5.0", "6.0")})
    monkeypatch.setattr(fused, "_said", set())
    assert fused.install(model) == {"lora": 0, "swiglu": 0, "norm": 0}
    assert not fused.is_fused(model)
    assert fused.install(_tiny()) == {"lora": 0, "swiglu": 0, "norm": 0}
    out = capsys.readouterr().out
    assert out.count("using peft's and transformers' own modules") == 1  # said once
    from peft.tuners.lora import LoraLayer

    assert not any("_llamatune_original_forward" in vars(m) for m in model.modules()
                   if isinstance(m, LoraLayer))


def test_cpu_gqa_goes_through_a_registered_attention_function():
    """No process-wide switch: transformers' AttentionInterface, selected per model."""
    import os

    model = _tiny()
    fused.install(model)
    inner = model.get_base_model()
    assert model._llamatune_gqa_attention
    assert inner.config._attn_implementation == "llamatune_cpu_sdpa"
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    plain = _tiny()  # the same weights, transformers' own sdpa
    batch = _batch()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    assert torch.allclose(a[keep], b[keep], atol=1e-5)


def test_head_logprobs_match_log_softmax_with_temperature():
    from llamatune._head_loss import head_logprobs

    torch.manual_seed(0)
    h = torch.randn(9, 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 13, (9,))
    assert torch.autograd.gradcheck(lambda a, b: head_logprobs(a, b, y, 0.7), (h, w))
    logp, ent = head_logprobs(h, w, y, 0.7, entropy=True)
    ref = torch.log_softmax(h @ w.t() / 0.7, -1)
    assert torch.allclose(logp, ref.gather(1, y[:, None]).squeeze(1))
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1))
    with pytest.raises(ValueError):
        head_logprobs(h, w, y, 0.0)


def test_head_entropy_gradient_matches_autograd():
    """The entropy bonus's gradient (PPO ``entropy_coef``) through the chunked head."""
    from llamatune import _head_loss
    from llamatune._head_loss import head_logprobs

    torch.manual_seed(1)
    h = torch.randn(11, 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(17, 6, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 17, (11,))

    def both(a, b):
        logp, ent = head_logprobs(a, b, y, 0.8, entropy_grad=True)
        return logp, ent

    assert torch.autograd.gradcheck(both, (h, w))
    # Chunks smaller than the rows: the same values and gradients.
    gl, ge = torch.randn(11, dtype=torch.double), torch.randn(11, dtype=torch.double)
    logp, ent = both(h, w)
    ga, gb = torch.autograd.grad((logp * gl).sum() + (ent * ge).sum(), (h, w))
    before = _head_loss._CHUNK_ELEMENTS
    _head_loss._CHUNK_ELEMENTS = 17 * 3
    try:
        logp2, ent2 = both(h, w)
        ga2, gb2 = torch.autograd.grad((logp2 * gl).sum() + (ent2 * ge).sum(), (h, w))
    finally:
        _head_loss._CHUNK_ELEMENTS = before
    assert torch.allclose(ent, ent2) and torch.allclose(ga, ga2) and torch.allclose(gb, gb2)
    # A frozen head (the usual LoRA case): only the hidden states' gradient.
    h2 = h.detach().clone().requires_grad_(True)
    _, ent3 = head_logprobs(h2, w.detach(), y, 0.8, entropy_grad=True)
    (g3,) = torch.autograd.grad((ent3 * ge).sum(), (h2,))
    z = torch.log_softmax(h2 @ w.detach().t() / 0.8, -1)
    (want,) = torch.autograd.grad((-(z.exp() * z).sum(-1) * ge).sum(), (h2,))
    assert torch.allclose(g3, want)
    # Without entropy_grad the entropies stay detached.
    _, ent4 = head_logprobs(h, w, y, 0.8, entropy=True)
    assert not ent4.requires_grad


def test_net_logprobs_are_the_models_own():
    """Per-token log-probs of the supervised tokens and their per-sequence sums."""
    from llamatune.net import Net

    model = _tiny()
    fused.install(model)
    batch = _batch()
    net = Net(model)
    out = net("logprobs", batch, temperature=1.3)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lab = batch["labels"][:, 1:]
    ref = torch.log_softmax(logits[:, :-1].float() / 1.3, -1)
    mask = lab != -100
    want = ref[mask].gather(1, lab[mask][:, None]).squeeze(1)
    assert torch.allclose(out["logp"].detach(), want, atol=1e-5)
    sums = torch.stack([want[mask[:i].sum():mask[: i + 1].sum()].sum() for i in range(3)])
    assert torch.allclose(out["seq"].detach(), sums, atol=1e-4)
    assert out["count"].tolist() == mask.sum(-1).tolist()
    out["seq"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "lora_A" in n)


def test_rms_norm_and_fp32_flash_attention_match_the_stock_math():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    w = torch.randn(8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fused._RMSNorm.apply(x, w, 1e-6), (x, w))
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(8).double()
    norm.weight.data = w.detach().clone()
    assert torch.allclose(fused._RMSNorm.apply(x, w, norm.variance_epsilon), norm(x))
    if fused._FLASH_CPU is None:
        pytest.skip("this torch has no CPU flash-attention ops")
    q = torch.randn(2, 6, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.tril(torch.ones(7, 7, dtype=torch.bool))[None, None].repeat(2, 1, 1, 1)
    mask[1, 0, :, 5:] = False
    mask[1, 0, 5:, 5:] = torch.eye(2, dtype=torch.bool)
    out = fused._Fp32FlashAttention.apply(q, k, v, mask, 0.25, False)  # [batch, T, heads, dim]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=0.25,
                                         enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), g.float())
    assert torch.allclose(out.float(), ref, atol=1e-2)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.float(), b, atol=3e-2, rtol=3e-2)
