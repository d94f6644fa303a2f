"""What a training step's autograd graph saves for the backward pass, tensor by tensor.

These figures count what the autograd graph of ``transformers``' ``LlamaDecoderLayer`` (and
peft's LoRA layers) keeps for the backward pass; the tests check them byte-exactly against
``torch.autograd.graph.saved_tensors_hooks`` and the whole step against the measured peak. Per
token and per layer, in bytes, with ``p`` the activation dtype size (the weight dtype; 4 for
QLoRA, whose non-quantized weights peft's ``prepare_model_for_kbit_training`` casts to float32,
so the hidden states are float32) and ``c = 4`` the LoRA adapter dtype (peft keeps adapters in
float32):

* each RMSNorm: ``4*h + 4`` (the float32 input and its ``rsqrt``), plus ``p*h`` (the normalized
  tensor) when the norm weight trains; the first layer's input norm saves nothing under LoRA,
  whose frozen embeddings produce no gradient;
* the inputs of the linears: ``p*in`` once per input shared by trainable base weights (full
  fine-tuning); under LoRA, per adapted linear, ``c*in`` for the adapter's input (shared once
  between the linears that read the same tensor when ``p == c``; a separate float32 copy per
  adapter when ``p != c``, since peft casts the input to the adapter dtype), ``c*r`` for the
  rank-``r`` intermediate, and with LoRA dropout another ``c*in`` (the dropout output) plus
  the dropout mask (1 byte per element on CUDA, a ``c``-byte noise tensor on CPU);
* attention, SDPA (flash / memory-efficient kernels): ``p*(2*a*d + 2*k*d)`` for Q, K, V and
  the output (GQA handled natively, K/V not repeated) and ``4*a`` for the log-sum-exp; the
  ``o_proj`` input is a view of the saved output. Eager: ``3*p*a*d`` (Q, and K/V repeated to
  all heads), ``4*a*s`` for the float32 softmax probabilities (plus ``p*a*s`` for their cast
  when ``p != 4``) and a separate ``o_proj`` input;
* SwiGLU MLP: ``3*p*m`` (gate output for SiLU, SiLU output and up output for the product),
  plus the ``down_proj`` input per the linear-input rule above.

(Tensors are saved only when the gradient they serve is needed, so, e.g., a LoRA layer whose
input does not require grad saves no dropout mask.) For the default model (SmolLM2-135M, fp32,
LoRA r=16 on all linears, SDPA) this is 40,428 bytes per token per layer without dropout and
69,612 with dropout 0.05 on CPU; for Llama-2-7B in bf16, 274,504 and 310,088 on CUDA, more than
half of it the float32 copies and dropout outputs of the adapter inputs.

Outside the layers: the final norm, the RoPE cos/sin tables, the token ids (full fine-tuning)
and the loss targets. The loss buffers (``logits`` in the estimate) are three float32
``batch*seq*vocab`` tensors live at the start of the backward pass: the log-softmax output saved
by the forward, its gradient and the gradient of the logits. They are freed before the first
layer's backward, where eager attention holds ``(4 + p)*a*s`` bytes of score and probability
gradients per token beyond what the layer's MLP block has freed (SDPA's buffers stay below that
block). With gradient checkpointing (one non-reentrant checkpoint per decoder layer, as
``transformers`` does it) each layer keeps only its ``p*h`` input and one layer at a time is
recomputed, after the loss buffers are gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamatune.params.architectures import _Dims

__all__ = ["Setup", "activation_bytes"]


@dataclass(frozen=True)
class Setup:
    """What the saved activations depend on besides the model's sizes and the batch."""

    full: bool
    """Full fine-tuning (every weight trains) rather than LoRA."""
    targets: tuple[str, ...]
    """The LoRA-adapted linears (empty for full fine-tuning)."""
    p: int
    """Bytes per element of the hidden states."""
    r: int
    """The LoRA rank."""
    dropout: float
    """The LoRA dropout probability."""
    on_cuda: bool
    """Dropout masks are 1-byte booleans (CUDA) rather than float noise (CPU)."""
    eager: bool
    """Eager attention rather than SDPA."""
    repeat_kv: bool
    """SDPA gets K/V repeated to every head (batches with a padding mask)."""


def _norm_bytes(h: int, r_in: bool, full: bool, p: int) -> tuple[int, bool]:
    """Saved bytes per token of one RMSNorm, and whether its output requires grad."""
    saved = (4 * h + 4 if r_in else 0) + (p * h if full else 0)
    return saved, r_in or full


def _linear_inputs_bytes(n_in: int, x_grad: bool, names: tuple[str, ...], s: Setup,
                         input_already_saved: bool = False) -> int:
    """Saved bytes per token for the linears that read one shared input of width ``n_in``."""
    full, targets, p, r, dropout, on_cuda = s.full, s.targets, s.p, s.r, s.dropout, s.on_cuda
    c = 4  # peft keeps LoRA adapters in float32 (autocast_adapter_dtype)
    saved = 0
    shared_saved = input_already_saved
    if full and not shared_saved:
        saved += p * n_in  # the input, for the weight gradient
        shared_saved = True
    for name in names:
        if name not in targets:
            continue
        if dropout > 0:
            saved += c * n_in  # dropout output, the input of lora_A
            if x_grad:
                saved += (1 if on_cuda else c) * n_in  # bool mask (CUDA) / float noise (CPU)
        elif p != c:
            saved += c * n_in  # peft casts the input to the adapter dtype: one copy per adapter
        elif not shared_saved:
            saved += c * n_in
            shared_saved = True
        saved += c * r  # lora_A output, the input of lora_B
    return saved


def _layer_bytes(d: _Dims, seq: int, input_grad: bool, s: Setup) -> tuple[int, bool, int]:
    """Saved bytes per token of one decoder layer.

    Returns:
        The bytes, whether the layer output requires grad, and the bytes saved by the MLP
        block alone (post-attention norm onwards).
    """
    h, m, a = d.hidden, d.mlp, d.heads
    full, targets, p = s.full, s.targets, s.p
    total, r_n1 = _norm_bytes(h, input_grad, full, p)
    total += _linear_inputs_bytes(h, r_n1, ("q_proj", "k_proj", "v_proj"), s)
    r_q, r_k, r_v = (r_n1 or full or t in targets for t in ("q_proj", "k_proj", "v_proj"))
    attn_grad = r_q or r_k or r_v
    out_saved = False
    if attn_grad:
        if s.eager:
            # Q @ K^T keeps Q for K's gradient and K for Q's; softmax keeps its fp32 output;
            # probs @ V keeps V for the probabilities' gradient and the probabilities (their
            # cast copy when p != 4) for V's.
            scores = r_q or r_k
            total += p * d.q_dim * (r_k + r_q + scores) + 4 * a * seq * scores
            total += p * a * seq * r_v if p != 4 else 0
        else:
            kv = d.q_dim if s.repeat_kv else d.kv_dim
            total += p * (2 * d.q_dim + 2 * kv) + 4 * a
            out_saved = True  # o_proj's input is a view of the saved SDPA output
    total += _linear_inputs_bytes(d.q_dim, attn_grad, ("o_proj",), s,
                                  input_already_saved=out_saved)
    r_h1 = input_grad or attn_grad or full or "o_proj" in targets
    norm2, r_n2 = _norm_bytes(h, r_h1, full, p)
    mlp_block = norm2 + _linear_inputs_bytes(h, r_n2, ("gate_proj", "up_proj"), s)
    r_gate = r_n2 or full or "gate_proj" in targets
    r_up = r_n2 or full or "up_proj" in targets
    # SiLU keeps the gate output; the product keeps SiLU(gate) and up.
    mlp_block += p * m * (2 * r_gate + r_up)
    mlp_block += _linear_inputs_bytes(m, r_gate or r_up, ("down_proj",), s)
    out_grad = r_h1 or r_gate or r_up or full or "down_proj" in targets
    return total + mlp_block, out_grad, mlp_block


def activation_bytes(d: _Dims, batch: int, seq: int, s: Setup,
                     checkpointing: bool) -> tuple[int, int, int, int]:
    """Activation bytes for a batch.

    Args:
        d: The model's sizes (:func:`llamatune.params.architectures.dims`).
        batch: Sequences per micro-batch.
        seq: Tokens per sequence.
        s: The :class:`Setup` (method, precision, adapter, attention).
        checkpointing: One gradient checkpoint per decoder layer.

    Returns:
        Saved activations (loss excluded), one full layer, the loss buffers, and the backward
        workspace of one layer beyond what that layer has already freed.
    """
    tokens = batch * seq
    full, p = s.full, s.p
    # Under LoRA the frozen embeddings produce a hidden state without grad; with checkpointing
    # llamatune calls enable_input_require_grads(), so every layer input requires grad.
    first, grad, _ = _layer_bytes(d, seq, full or checkpointing, s)
    rest, _, mlp_block = _layer_bytes(d, seq, True, s)
    if d.layers > 1:
        grad = True
    if checkpointing:
        # Each layer keeps its input; one layer at a time is recomputed in the backward pass.
        layers = d.layers * p * d.hidden + max(first, rest)
    else:
        layers = first + (d.layers - 1) * rest
    final, _ = _norm_bytes(d.hidden, grad, full, p)
    if full:
        final += p * d.hidden + 8  # lm_head input; token ids for the embedding gradient
    final += 8  # the shifted targets, kept by the loss
    rope = 2 * seq * d.head_dim * p  # cos/sin, shared by all layers
    saved = tokens * (layers + final) + rope
    # The backward pass starts with three float32 batch x seq x vocab tensors: the log-softmax
    # output (saved by the forward), its gradient and the gradient of the logits.
    loss = 3 * 4 * tokens * d.vocab
    # Eager attention's backward holds the gradients of the fp32 scores and of the
    # probabilities (4 + p bytes per head and key position) once the layer's MLP block has
    # freed its saved tensors; SDPA's backward buffers are smaller than that block.
    workspace = max(0, (4 + p) * d.heads * seq - mlp_block) if s.eager else 0
    return saved, tokens * rest, loss, tokens * workspace

