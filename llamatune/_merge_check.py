"""The two sides of merge verification, built and evaluated the same way every time.

``llamatune merge`` compares the saved folder (the *merged* side) with base + adapter (the
*reference*). A check that compares two things computed differently fails at random on
correct merges: the verdict would hang on whichever kernel, dtype, thread count or dropout
draw a process happened to get. So for a full-precision base both sides are plain
``transformers`` modules (peft's LoRA layers on the reference, nothing else: no llamatune
loader, no fused kernels, no registered attention), loaded from the same float32 files, cast
to the same evaluation dtype, in eval mode with LoRA dropout removed, run one unpadded sample
at a time with autocast off, and :func:`check_plain` refuses to compare anything else.
:func:`evaluation_setup` says all of that in words for the printed report and the merge
record, with a digest of the samples' token ids, so two runs of the check can be told apart
by what they compared and not only by their figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from llamatune.errors import UserError

__all__ = ["Check", "Verification", "check_plain", "compare_models", "drop_lora_dropout",
           "evaluation_setup", "pinned_float32", "plain_reference", "samples_digest"]


@dataclass(frozen=True)
class Check:
    """The pass/fail rule verification applies."""

    kind: str
    """``logits`` (max absolute logit difference), ``perplexity`` (relative gap) or
    ``report`` (print only; fails only on NaN/inf)."""
    tolerance: float
    """The bound for ``kind``; unused for ``report``."""
    why: str
    """The reason this rule applies, for the printed report."""


@dataclass
class Verification:
    """What verification measured, how, and whether it passed."""

    check: Check
    precision: str
    """The dtype both models were evaluated in."""
    samples: int
    source: str
    """Where the samples came from (the eval split or, without one, training samples)."""
    tokens: int
    """Supervised tokens scored."""
    max_logit_diff: float
    ppl_merged: float
    ppl_reference: float
    setup: dict = dataclasses.field(default_factory=dict)
    """How each side was built and run (:func:`evaluation_setup`), and where the largest
    difference sits (``worst``: sample index and position)."""

    @property
    def ppl_gap(self) -> float:
        """Relative perplexity gap ``|merged / reference - 1|``."""
        return abs(self.ppl_merged / self.ppl_reference - 1.0)

    @property
    def passed(self) -> bool:
        """Whether the check holds (a ``report`` check passes unless the model is broken)."""
        if not (math.isfinite(self.max_logit_diff) and math.isfinite(self.ppl_merged)):
            return False  # NaN/inf logits: broken whatever the rule (overflow in float16, say)
        if self.check.kind == "logits":
            return self.max_logit_diff <= self.check.tolerance
        if self.check.kind == "perplexity":
            return self.ppl_gap <= self.check.tolerance
        return True

    def summary(self) -> str:
        """The lines printed after verification."""
        if self.check.kind == "logits":
            rule = f"max logit difference <= {self.check.tolerance:g}"
        elif self.check.kind == "perplexity":
            rule = f"perplexity gap <= {100 * self.check.tolerance:g}%"
        else:
            rule = "report only"
        verdict = "passed" if self.passed else "FAILED"
        if self.check.kind == "report" and self.passed:
            verdict = "not judged"
        s = self.setup
        where = s.get("worst")
        at = f" (sample {where[0]}, position {where[1]})" if where else ""
        return (
            f"verify: {self.samples} samples ({self.source}; token ids sha256 "
            f"{s.get('samples_sha256', '?')}), {self.tokens} supervised tokens, both sides in "
            f"{self.precision}, {s.get('run', '?')}\n"
            f"  merged                  {s.get('merged', '?')}\n"
            f"  base+adapter            {s.get('reference', '?')}\n"
            f"  max |logit difference|  {self.max_logit_diff:.3g}{at}\n"
            f"  perplexity              merged {self.ppl_merged:.4f}, base+adapter "
            f"{self.ppl_reference:.4f} (gap {100 * self.ppl_gap:.3f}%)\n"
            f"  check                   {rule} ({self.check.why}): {verdict}"
        )

    def as_dict(self) -> dict:
        """JSON-able record for ``llamatune_merge.json``."""
        return {
            "check": dataclasses.asdict(self.check), "precision": self.precision,
            "samples": self.samples, "source": self.source, "tokens": self.tokens,
            "max_logit_diff": self.max_logit_diff, "ppl_merged": self.ppl_merged,
            "ppl_reference": self.ppl_reference, "passed": self.passed, "setup": self.setup,
        }


def samples_digest(samples: list[dict]) -> str:
    """A short sha256 of the samples' token ids and labels (the same samples, the same digest)."""
    text = json.dumps([[s["input_ids"], s["labels"]] for s in samples], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def pinned_float32():
    """Float32 matmuls in full IEEE precision, autocast off, for the duration (restored after).

    Measured (``tests/test_merge.py``): a merge run under an enclosing bf16 ``torch.autocast``
    computes peft's ``B @ A`` in bf16 and fails the exact check at 0.013 on the tiny model,
    the size of the failure issue 20 saw (0.00336), while the same merge passes at 1e-5 without.

    ``torch.set_float32_matmul_precision("medium")`` (set by some libraries and scripts) lets
    oneDNN compute float32 matmuls in bf16 on CPUs with AMX, and TF32 on GPUs; the merge's
    ``B @ A`` must not depend on what an earlier import chose.
    """
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def plain_reference(folder: str, run, *, model_cfg, attn_implementation: str):
    """Base + adapter as plain transformers + peft modules, float32 weights, LoRA dropout off.

    Built by the same ``from_pretrained`` call as the merged model's base, so the two sides
    differ only by the merge. ``model_cfg`` is the run's ``model`` section (only its
    ``trust_remote_code`` is read).
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=attn_implementation)
    config = PeftConfig.from_pretrained(str(run))
    if hasattr(config, "lora_dropout"):
        config.lora_dropout = 0.0  # peft builds Identity: no dropout whatever the mode
    config.inference_mode = True
    model = PeftModel.from_pretrained(base, str(run), config=config, is_trainable=False)
    return model.eval()


def drop_lora_dropout(model) -> None:
    """Replace every LoRA dropout with ``Identity`` (eval mode already skips it; now nothing can)."""
    import torch

    for mod in model.modules():
        drops = getattr(mod, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for key in list(drops.keys()):
                drops[key] = torch.nn.Identity().train(mod.training)


def check_plain(model, dtype, side: str) -> None:
    """Refuse to compare a model that is not plain modules in ``dtype`` and eval mode.

    Raises:
        RuntimeError: A module is in training mode, has an instance-level ``forward`` (a
            patched kernel such as llamatune's fused ones), or a parameter is not ``dtype``.
    """
    import torch

    for name, mod in model.named_modules():
        if mod.training:
            raise RuntimeError(f"merge verification: {side} module {name!r} is in training mode")
        fwd = vars(mod).get("forward")
        if fwd is not None and getattr(getattr(fwd, "__func__", fwd), "__module__",
                                       "").startswith("llamatune"):
            raise RuntimeError(f"merge verification: {side} module {name!r} runs llamatune's "
                               "fused forward, not the library's")
        if isinstance(mod, torch.nn.Dropout) and mod.p > 0 and "lora" in name:
            raise RuntimeError(f"merge verification: {side} keeps LoRA dropout at {name!r}")
    odd = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype}
    if odd:
        raise RuntimeError(f"merge verification: {side} has {', '.join(sorted(odd))} parameters, "
                           f"not {dtype}")


def evaluation_setup(merged, reference, reference_how: str, samples: list[dict]) -> dict:
    """What each side ran: modules, attention kernel, dtype, threads, the samples' digest."""
    import torch

    def attention(model):
        return getattr(model.config, "_attn_implementation", None) or "default"

    return {
        "merged": f"plain transformers from the saved folder, {attention(merged)} attention",
        "reference": f"{reference_how}, {attention(reference)} attention",
        "run": f"batch 1 unpadded, autocast off, {torch.get_num_threads()} CPU threads, torch "
               f"{torch.__version__}",
        "threads": torch.get_num_threads(),
        "samples_sha256": samples_digest(samples),
    }


def _logits(model, ids, device):
    import torch

    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                    use_cache=False)
    # float64: a float32 copy would round float64 logits to ~4e-6 at magnitude 40.
    return out.logits[0].double().cpu()


def compare_models(merged, reference, samples: list[dict], reference_device: str = "cpu",
                   merged_device: str = "cpu") -> tuple[float, float, float, int, tuple]:
    """Run both models on the samples, one at a time (no padding to disagree about).

    Autocast is off on every device, so an enclosing ``torch.autocast`` cannot run one side
    (or part of it) in a lower precision.

    Returns:
        ``(max_abs_logit_diff, ppl_merged, ppl_reference, supervised_tokens, worst)``;
        ``worst`` is ``(sample index, position)`` of the largest difference.
    """
    import torch
    import torch.nn.functional as F

    max_diff, nll_m, nll_r, count, worst = 0.0, 0.0, 0.0, 0, (0, 0)
    off = [torch.autocast(d, enabled=False) for d in {"cpu", *(
        x.split(":")[0] for x in (reference_device, merged_device))}]
    with contextlib.ExitStack() as stack:
        for ctx in off:
            stack.enter_context(ctx)
        for i, s in enumerate(samples):
            ids = torch.tensor([s["input_ids"]])
            labels = torch.tensor(s["labels"][1:])
            mask = labels != -100
            lm = _logits(merged, ids, merged_device)
            lr = _logits(reference, ids, reference_device)
            per_pos = (lm - lr).abs().amax(dim=-1)
            diff = float(per_pos.max())
            if not math.isfinite(diff):
                max_diff, worst = math.inf, (i, int(per_pos.isfinite().logical_not().nonzero()[0]))
            elif diff > max_diff:  # max() would silently keep the old value against a NaN
                max_diff, worst = diff, (i, int(per_pos.argmax()))
            nll_m += float(F.cross_entropy(lm[:-1][mask], labels[mask], reduction="sum"))
            nll_r += float(F.cross_entropy(lr[:-1][mask], labels[mask], reduction="sum"))
            count += int(mask.sum())
    if count == 0:
        raise UserError("verification found no supervised tokens in the samples.")
    return max_diff, math.exp(nll_m / count), math.exp(nll_r / count), count, worst
