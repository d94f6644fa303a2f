"""Memory-lean training kernels for Llama-style blocks with LoRA, in plain PyTorch.

What autograd keeps for the backward pass, not FLOPs, sets the peak memory of LoRA training
without gradient checkpointing, and on CPUs the fragmentation of glibc's heap (which hands
memory back only from its top) adds about as much again, in proportion to how many large
temporaries a step makes. Where the stock modules keep or make more than they need:

* **LoRA with dropout.** peft computes ``base(x) + B(A(dropout(x))) * s`` with one
  ``nn.Dropout`` per adapted layer: every layer keeps its own dropped fp32 copy of ``x`` plus
  the mask, although ``x`` is alive anyway (q, k and v read the same normalized hidden state),
  and makes the update and the sum as two more tensors. :class:`_LoraBranch` keeps ``x``
  (shared, not copied) and the rank-``r`` activation ``A(x)``, draws the mask from a private
  generator and draws it again from the same seed in the backward pass (neither the mask nor
  the dropped ``x`` is kept), and adds the update into the frozen layer's output in place with
  one ``addmm_``. On CPUs the mask is drawn as 16-bit uniforms, four per 64-bit random number,
  about five times cheaper than ``bernoulli_`` (which runs on one thread whatever the thread
  count); ``p`` is rounded to a multiple of 1/65536 and the rescaling uses the rounded value,
  so the expectation is exact.
* **SwiGLU.** ``act(gate(x)) * up(x)`` keeps ``gate``, ``silu(gate)``, ``up`` and the product;
  :class:`_SwiGLU` keeps ``gate`` and ``up``, and what ``down_proj`` would keep of the product
  is rebuilt from them in the backward pass.
* **Norms.** The projections after each RMSNorm keep its output; the norm keeps its input
  anyway, so the output is rebuilt from it in the backward pass. And transformers' RMSNorm
  keeps a float32 copy of a bf16 input; :class:`_RMSNorm` keeps the input and the per-row
  ``rsqrt`` only (same values).
* **LoRA on a bf16 base.** The rank-r matmuls compute in bf16 against the float32 master
  weights, as autocast would, instead of copying every adapted layer's input to float32.
* **Attention on CPU.** transformers repeats key/value heads when there is a padding mask
  and SDPA keeps the copies; torch's CPU flash kernel takes ``enable_gqa`` with a mask, so the
  repeat is skipped. And torch's CPU flash kernel is slower in bf16 than in fp32 on short
  sequences (measured on a 2-core AVX512-BF16 EPYC, 9 query / 3 key-value heads of 64,
  forward + backward: 11.1 vs 4.1 ms at batch 16 x 54 tokens, 26.4 vs 15.3 at 16 x 128, equal
  at 8 x 256, and bf16 ahead from 512), so a bf16 model's attention over at most
  :data:`FP32_ATTENTION_MAX` keys computes in fp32 there (more precise, too). Both go through
  transformers' own extension point: an attention function registered with
  ``AttentionInterface`` (:func:`_cpu_sdpa`) and selected with ``set_attn_implementation``.

All of it is exact: same forward values, same gradients (to rounding), same matmul FLOPs
(a few elementwise passes are redone in the backward pass); only the dropout random stream
differs from peft's. The kernels replace ``forward`` on the module instances of a model being
trained (:func:`install`) and fall back to the original code for anything they do not cover
(DoRA and other LoRA variants, several active adapters, merged or disabled adapters,
mixed-adapter batches, LoRA biases). The recompute tricks stand down under gradient
checkpointing, which already keeps almost nothing. Weights, state dicts and saved adapters
are untouched, so nothing downstream (merge, generate, peft loading) can tell.

**A fence.** The kernels stand in for the forwards of peft's LoRA layers and transformers'
Llama-style MLP and decoder layer as those libraries wrote them in the versions of
:data:`TESTED` (tests compare them with the stock modules). Outside that window a future
LoRA variant or a changed layer could silently get the old math, so :func:`install` leaves
the model to the stock modules and says so once. ``setup.cfg`` states the same ranges.
"""

from __future__ import annotations

import types

import torch

__all__ = ["TESTED", "install", "is_fused", "keep_mask", "lora_branch", "swiglu"]

_LEVELS = 1 << 16  # CPU mask resolution: p is rounded to a multiple of 1/65536
_ATTENTION = "llamatune_cpu_sdpa"
FP32_ATTENTION_MAX = 256
"""Longest key length at which a bf16 model's CPU attention computes in fp32 (see above)."""

TESTED = {"peft": ("0.21", "0.22"), "transformers": ("5.20", "5.25")}
"""Library versions (``[low, high)``) whose module forwards the kernels were written and tested
against; outside them :func:`install` keeps the stock modules."""
_said: set = set()


def keep_mask(x: torch.Tensor, p: float, seed: int | None = None) -> tuple[torch.Tensor, float]:
    """Draw a dropout keep-mask shaped like ``x``.

    Args:
        x: The tensor to be dropped (its shape and device are used).
        p: Drop probability, ``0 < p < 1``.
        seed: Draw from a private generator seeded with this (the same seed gives the same
            mask again); ``None`` draws from torch's global generator.

    Returns:
        ``(keep, scale)``: a bool mask, True where ``x`` is kept, and the factor that makes the
        expectation exact (``1 / (1 - p)``, with ``p`` as rounded on CPUs).
    """
    gen = None
    if seed is not None:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(seed)
    if x.device.type != "cpu":
        return torch.rand(x.shape, device=x.device, generator=gen) >= p, 1.0 / (1.0 - p)
    drop = min(_LEVELS - 1, max(1, round(p * _LEVELS)))
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=gen)
    keep = words.view(torch.int16)[:n].view(x.shape) >= drop - _LEVELS // 2
    return keep, _LEVELS / (_LEVELS - drop)


_HALF = (torch.bfloat16, torch.float16)
_CASTS: dict = {}
_CACHE_CASTS = True


def cache_casts(on: bool) -> None:
    """Switch :func:`_cast`'s cache on or off (off under FSDP2 and DeepSpeed).

    FSDP2 gathers a layer's weights into the same parameter objects each time, and
    DeepSpeed copies the updated weights back into them, both without bumping the weights'
    version, so the version no longer says when the values changed: a cached cast would keep
    the first values.
    """
    global _CACHE_CASTS
    _CACHE_CASTS = bool(on)
    _CASTS.clear()


def _cast(weight, dtype):
    """Return ``weight.to(dtype)``, cached until the weight changes.

    An optimizer step bumps the weight's version; decoding calls every adapter once per token
    with the same weights, so the cast is paid once per update instead of once per token.
    """
    if weight.dtype == dtype:
        return weight
    if not _CACHE_CASTS:
        return weight.detach().to(dtype)
    key = id(weight)
    hit = _CASTS.get(key)
    if hit is not None and hit[0] is weight and hit[1] == (weight._version, dtype):
        return hit[2]
    cast = weight.detach().to(dtype)
    _CASTS[key] = (weight, (weight._version, dtype), cast)
    return cast


class _LoraBranch(torch.autograd.Function):
    """``base + (dropout(x) @ A.T) @ B.T * s``, saving ``x`` and ``x @ A.T`` only.

    ``base`` (the frozen layer's output, which autograd does not keep) is updated in place, so
    the LoRA update never outlives the call. The dropout mask is drawn from a private generator
    with a seed taken from torch's global one, and drawn again from the same seed in the
    backward pass instead of being kept. With a half-precision base (bf16) and float32 master
    weights, the rank-r matmuls compute in the base's dtype, as autocast would (the weights
    are cast, a few KB; ``x`` is never copied to float32), and the weight gradients come back
    in float32.
    """

    @staticmethod
    def forward(ctx, x, a_weight, b_weight, scaling, p, seed, base):
        cd = x.dtype if x.dtype in _HALF else a_weight.dtype
        a, b = _cast(a_weight, cd), _cast(b_weight, cd)
        keep_scale = 1.0
        if p > 0:
            keep, keep_scale = keep_mask(x, p, seed)
            xd = x * keep
            del keep
        else:
            xd = x
        # The dropout rescaling goes on the rank-r activation, not on x: one pass over x.
        mid = xd.reshape(-1, xd.shape[-1]).to(cd) @ a.t()
        del xd
        if p > 0:
            mid.mul_(keep_scale)
        flat = base.view(-1, base.shape[-1])
        if flat.dtype == cd:
            flat.addmm_(mid, b.t(), alpha=scaling)
        else:
            flat.add_((mid @ b.t()).mul_(scaling))
        ctx.mark_dirty(base)
        ctx.save_for_backward(x, a, b, mid)
        ctx.scaling, ctx.p, ctx.seed, ctx.keep_scale = scaling, p, seed, keep_scale
        ctx.weight_dtype = a_weight.dtype
        return base

    @staticmethod
    def backward(ctx, grad):
        x, a, b, mid = ctx.saved_tensors
        s, cd, wd = ctx.scaling, a.dtype, ctx.weight_dtype
        keep = keep_mask(x, ctx.p, ctx.seed)[0] if ctx.p > 0 else None
        g = grad.reshape(-1, grad.shape[-1]).to(cd)
        grad_b = (g.t() @ mid).mul_(s).to(wd) if ctx.needs_input_grad[2] else None
        # d loss / d (dropped x @ A.T), with the dropout rescaling folded in ([tokens, r]).
        gmid = (g @ b).mul_(s * ctx.keep_scale)
        del g
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            xd = x if keep is None else x * keep
            grad_a = (gmid.t() @ xd.reshape(-1, xd.shape[-1]).to(cd)).to(wd)
            del xd
        if ctx.needs_input_grad[0]:
            grad_x = (gmid @ a).view(x.shape).to(x.dtype)
            if keep is not None:
                grad_x = grad_x.mul_(keep)
        return grad_x, grad_a, grad_b, None, None, None, grad


def lora_branch(x, a_weight, b_weight, scaling: float, p: float = 0.0, training: bool = True,
                base=None):
    """The LoRA update ``B(A(dropout(x))) * scaling`` with lean saved tensors.

    Args:
        x: Input ``[..., in]``.
        a_weight: ``lora_A`` weight ``[r, in]``.
        b_weight: ``lora_B`` weight ``[out, r]``.
        scaling: ``alpha / r`` (or the rsLoRA value).
        p: Dropout probability on ``x``.
        training: Apply dropout (``False`` in eval mode).
        base: The frozen layer's output ``[..., out]`` to add the update to, in place (it
            must not be needed by autograd, and must be contiguous); ``None`` returns the
            update alone.

    Returns:
        ``[..., out]``: ``base`` plus the update (``base`` itself when given).
    """
    if base is None:
        base = x.new_zeros(*x.shape[:-1], b_weight.shape[0])
    if not (training and p > 0):
        return _LoraBranch.apply(x, a_weight, b_weight, scaling, 0.0, None, base)
    # One draw from the global generator (replayed exactly under gradient checkpointing).
    seed = int(torch.empty((), dtype=torch.int64).random_(0, 2**62))
    return _LoraBranch.apply(x, a_weight, b_weight, scaling, p, seed, base)


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` that saves ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        dtype = gate.dtype
        if dtype in (torch.bfloat16, torch.float16):
            # Five elementwise steps: in fp32, rounded once (the stock graph rounds twice).
            gate, up, grad = gate.float(), up.float(), grad.float()
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = (grad * silu).to(dtype) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
            grad_gate = silu.mul_(1 - sig).add_(sig).mul_(grad).mul_(up).to(dtype)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for the backward pass."""
    return _SwiGLU.apply(gate, up)


def _lora_forward(self, x, *args, **kwargs):
    """Forward of a peft ``LoraLayer`` with the lean branch (the original code for anything else)."""
    adapters = self.active_adapters
    if (self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1
            or adapters[0] not in self.lora_A or adapters[0] in getattr(self, "lora_variant", {})
            or self.use_dora.get(adapters[0], False)):
        return self._llamatune_original_forward(x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if lora_a.bias is not None or lora_b.bias is not None:
        return self._llamatune_original_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
    if torch.is_autocast_enabled():
        return self._llamatune_original_forward(x, *args, **kwargs)
    if type(self.base_layer) is torch.nn.Linear and result.is_contiguous():
        # A plain frozen linear does not keep its output: add the update into it in place.
        return lora_branch(x, lora_a.weight, lora_b.weight, self.scaling[name], p,
                           self.training, base=result)
    out = lora_branch(x, lora_a.weight, lora_b.weight, self.scaling[name], p, self.training)
    return result + out.to(result.dtype)


class _Recomputed:
    """Stands in for a tensor in a saved-tensor slot; rebuilt as ``fn(*args)`` when unpacked."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args


def _unpack(value):
    if isinstance(value, _Recomputed):
        with torch.no_grad():
            return value.fn(*value.args)
    return value


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.shape, t.dtype, t.stride()


def _silu_mul(gate, up):
    return torch.nn.functional.silu(gate) * up


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    h = swiglu(gate, up)
    if not (self._llamatune_recompute and torch.is_grad_enabled()):
        return self.down_proj(h)
    # Whatever down_proj saves of h (its LoRA input) is rebuilt from gate and up, which the
    # SwiGLU node keeps anyway: one [tokens, intermediate] tensor less per layer.
    key = _key(h)

    def pack(t):
        return _Recomputed(_silu_mul, gate, up) if _key(t) == key else t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        return self.down_proj(h)


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, ``weight * (x * rsqrt(mean(x**2) + eps))``, computed in fp32.

    transformers' module keeps the float32 copy of a bf16 input for its backward pass (twice
    the input's bytes, once per norm per layer); this keeps the input as it is and the
    per-row ``rsqrt`` only, and rebuilds the rest in the backward pass. Same values, same
    rounding points.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        n32 = x.to(rstd.dtype) * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * n32.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(rstd.dtype)  # through ``weight * normed`` and the cast
            grad_x = (rstd * (g - n32 * (g * n32).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


def _rms_norm(self, x):
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def _norm_forward(self, x):
    forward = _rms_norm.__get__(self) if self._llamatune_rms else self._llamatune_original_forward
    out = forward(x)
    outputs = self._llamatune_outputs
    if outputs is not None:
        # ``out`` is held until the layer's forward ends, so no other tensor can take its
        # address (and be mistaken for it) meanwhile.
        outputs[_key(out)] = (out, forward, x)
    return out


def _is_llama_rms_norm(module) -> bool:
    """An RMSNorm whose forward is Llama's, line for line (Mistral's, Qwen2's ...)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # pragma: no cover - transformers always ships Llama
        return False
    fwd = getattr(type(module), "forward", None)
    return (hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None),
                                                              torch.nn.Parameter)
            and fwd is not None and fwd.__code__.co_code == LlamaRMSNorm.forward.__code__.co_code)


def _layer_forward(self, *args, **kwargs):
    """Decoder layer whose norm outputs are saved as "recompute from the norm input".

    The projections after each RMSNorm save its output (their LoRA input); the norm saves its
    input anyway, so the output is rebuilt from it in the backward pass (one cheap pass) instead
    of being kept: two [tokens, hidden] tensors less per layer.
    """
    if not torch.is_grad_enabled():
        return self._llamatune_original_forward(*args, **kwargs)
    return _layer_forward_recompute(self, *args, **kwargs)


def _cpu_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              is_causal=None, **kwargs):
    """The SDPA attention of transformers, with CPU specifics (see the module docstring).

    Grouped-query attention goes to torch as is on CPU, and short bf16 attention computes in
    fp32.

    Everything else (GPUs; features this function does not handle) is transformers' own
    ``sdpa`` function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    q_len, kv_len = query.shape[2], key.shape[2]
    fp32 = query.dtype == torch.bfloat16 and kv_len <= FP32_ATTENTION_MAX
    if (query.device.type != "cpu" or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions", False)
            or (attention_mask is None and q_len not in (1, kv_len))
            or not (fp32 or (groups > 1 and attention_mask is not None))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    causal = attention_mask is None and q_len > 1 and (is_causal if is_causal is not None
                                                       else getattr(module, "is_causal", True))
    dtype = query.dtype
    if fp32 and dropout == 0.0 and _FLASH_CPU is not None:
        return _Fp32FlashAttention.apply(query, key, value, attention_mask, scaling, causal), None
    if fp32:
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=causal, enable_gqa=groups > 1)
    return out.to(dtype).transpose(1, 2).contiguous(), None


_FLASH_CPU = (
    (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
     torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward") else None)
"""torch's CPU flash-attention kernels (what SDPA runs on CPU), called directly so the fp32
attention of a bf16 model can keep bf16 tensors for its backward pass."""


def _additive(mask):
    """The kernels take an fp32 additive mask (0 where attended, -inf where not)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, float("-inf"))
    return mask.float()


class _Fp32FlashAttention(torch.autograd.Function):
    """CPU flash attention on bf16 inputs, computed in fp32, keeping bf16 tensors only.

    ``scaled_dot_product_attention`` on fp32 copies would keep those copies (query, key,
    value and output: twice the bytes of the bf16 tensors) for its backward pass; this keeps
    the bf16 inputs, the bf16 output (in the layout o_proj keeps anyway) and the per-row
    log-sum-exp, and casts them up again in
    the backward pass (the output's rounding to bf16 is the only difference, in the backward's
    row sums). Grouped-query attention goes to the kernel as is.
    """

    @staticmethod
    def forward(ctx, query, key, value, mask, scale, causal):
        fwd, _ = _FLASH_CPU
        out, lse = fwd(query.float(), key.float(), value.float(), 0.0, causal,
                       attn_mask=_additive(mask), scale=scale)
        # Returned as [batch, tokens, heads, dim], the layout o_proj reads: the tensor kept
        # here is the one o_proj keeps too.
        out = out.to(query.dtype).transpose(1, 2).contiguous()
        ctx.save_for_backward(query, key, value, out, lse, mask)  # the mask as it came
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, grad):
        _, bwd = _FLASH_CPU
        query, key, value, out, lse, mask = ctx.saved_tensors
        gq, gk, gv = bwd(grad.transpose(1, 2).float().contiguous(), query.float(), key.float(),
                         value.float(), out.transpose(1, 2).float().contiguous(), lse, 0.0,
                         ctx.causal, attn_mask=_additive(mask), scale=ctx.scale)
        return gq.to(query.dtype), gk.to(key.dtype), gv.to(value.dtype), None, None, None


def _use_cpu_attention(model) -> bool:
    """Select :func:`_cpu_sdpa` for a CPU model with SDPA attention (GQA or bf16)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from llamatune.model import unwrap_model

    inner = unwrap_model(model)
    cfg = inner.config
    groups = getattr(cfg, "num_attention_heads", 1) // max(1, getattr(cfg, "num_key_value_heads",
                                                                      None) or 1)
    weight = next(inner.parameters())
    if (getattr(cfg, "_attn_implementation", "") != "sdpa" or weight.device.type != "cpu"
            or not (groups > 1 or weight.dtype == torch.bfloat16)
            or not hasattr(inner, "set_attn_implementation")):
        return False
    AttentionInterface.register(_ATTENTION, _cpu_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTENTION, sdpa_mask)
    inner.set_attn_implementation(_ATTENTION)
    return True


def _layer_forward_recompute(self, *args, **kwargs):
    outputs: dict = {}
    for norm in self._llamatune_norms:
        norm._llamatune_outputs = outputs

    def pack(t):
        hit = outputs.get(_key(t))
        return _Recomputed(*hit[1:]) if hit is not None else t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            return self._llamatune_original_forward(*args, **kwargs)
    finally:
        for norm in self._llamatune_norms:
            norm._llamatune_outputs = None


def _silu_types() -> tuple[type, ...]:
    types_: list[type] = [torch.nn.SiLU]
    try:
        from transformers.activations import SiLUActivation

        types_.append(SiLUActivation)
    except ImportError:  # older transformers use nn.SiLU
        pass
    return tuple(types_)


def _is_swiglu_mlp(module, silu_types: tuple[type, ...]) -> bool:
    """A Llama-style MLP: ``down(silu(gate(x)) * up(x))`` with a one-argument forward."""
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(module).__name__.endswith("MLP")
            and isinstance(getattr(module, "act_fn", None), silu_types)
            and type(module).forward.__code__.co_argcount == 2)


def _versions_tested() -> tuple[bool, str]:
    from importlib.metadata import version

    from packaging.version import Version

    found, ok = [], True
    for pkg, (low, high) in TESTED.items():
        v = version(pkg)
        found.append(f"{pkg} {v}")
        ok = ok and Version(low) <= Version(v) < Version(high)
    return ok, ", ".join(found)


def is_fused(model) -> bool:
    """Whether :func:`install` switched ``model`` to the lean kernels."""
    return bool(getattr(model, "_llamatune_fused", False))


def install(model) -> dict[str, int]:
    """Switch the LoRA layers, SwiGLU MLPs and decoder-layer norms of ``model`` to lean kernels.

    Only instances change (``module.forward``); calling it twice is harmless. Outside the
    library versions of :data:`TESTED` nothing changes (said once per process).

    Args:
        model: A transformers model, with or without peft LoRA layers.

    Returns:
        How many modules were switched, by kind: ``{"lora": n, "swiglu": m, "norm": k}``.
    """
    from peft.tuners.lora import LoraLayer

    counts = {"lora": 0, "swiglu": 0, "norm": 0}
    ok, found = _versions_tested()
    if not ok:
        if found not in _said:
            _said.add(found)
            tested = "; ".join(f"{k} >={lo},<{hi}" for k, (lo, hi) in TESTED.items())
            print(f"note: model.fused: the lean kernels are tested with {tested}, this is "
                  f"{found}; using peft's and transformers' own modules (same results, more "
                  "memory).", flush=True)
        return counts
    bases, silu_types = _linear_bases(), _silu_types()
    # Under gradient checkpointing the blocks save (almost) nothing, and its hooks must win.
    recompute = not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    for module in model.modules():
        if "_llamatune_original_forward" in vars(module):
            continue
        if isinstance(module, LoraLayer) and isinstance(getattr(module, "base_layer", None), bases):
            _patch(module, _lora_forward)
            counts["lora"] += 1
        elif _is_swiglu_mlp(module, silu_types):
            module._llamatune_recompute = recompute
            _patch(module, _mlp_forward)
            counts["swiglu"] += 1
        elif recompute and _is_llama_layer(module):
            module._llamatune_norms = (module.input_layernorm, module.post_attention_layernorm)
            for norm in module._llamatune_norms:
                norm._llamatune_outputs = None
                norm._llamatune_rms = _is_llama_rms_norm(norm)
                _patch(norm, _norm_forward)
            _patch(module, _layer_forward)
            counts["norm"] += 2
    model._llamatune_gqa_attention = _use_cpu_attention(model)
    model._llamatune_fused = True
    return counts


def _patch(module, forward) -> None:
    module._llamatune_original_forward = module.forward
    module.forward = types.MethodType(forward, module)


def _is_llama_layer(module) -> bool:
    """A pre-norm decoder layer with RMSNorms named as in Llama (Mistral, Qwen2, ...)."""
    norms = [getattr(module, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    return (type(module).__name__.endswith("DecoderLayer")
            and all(type(n).__name__.endswith("RMSNorm") for n in norms)
            and not any("_llamatune_original_forward" in vars(n) for n in norms))


def _linear_bases() -> tuple[type, ...]:
    """Base layer types whose LoRA wrapper computes ``base(x) + lora(x)`` (plain, 8-bit, 4-bit)."""
    bases: list[type] = [torch.nn.Linear]
    try:
        import bitsandbytes as bnb

        bases += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency, but optional at runtime
        pass
    return tuple(bases)
