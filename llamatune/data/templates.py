"""Chat templates as data, and the one renderer that turns a conversation into token ids.

A template is a small record (formats, separators, end token), not a subclass. The same
:func:`render` builds training samples (``input_ids`` + ``labels``) and inference prompts,
so the prompt tokens a model sees in training are exactly the tokens generation feeds it.

How tokens are made: a conversation is cut into *units*, each tokenized on its own (no
special tokens added by the tokenizer; BOS/EOS are placed by the template). For every
template except ``llama2``, a unit never straddles a prompt/answer boundary, so a prompt
tokenizes identically whether or not an answer follows. ``llama2`` follows Meta's
reference instead: each ``[INST] ... [/INST] answer`` exchange is one unit wrapped in its
own BOS ... EOS, and the answer tokens are found from character offsets.

The same formats as Jinja chat templates, saved with run directories and merged models, come
from :func:`llamatune.data.jinja.to_jinja`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from llamatune.errors import UserError

__all__ = [
    "TEMPLATES",
    "Rendered",
    "Template",
    "bos_token_id",
    "get_template",
    "render",
    "stop_token_ids",
]

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    """A chat format. ``{content}``/``{input}``/``{system}`` are filled per message."""

    name: str
    description: str
    system: str = "{system}"
    """Text of the system block; empty for templates that fold it into the first user turn."""
    default_system: str | None = None
    """System prompt used when a conversation has none."""
    default_system_with_input: str | None = None
    """Alpaca only: the system sentence when the first instruction has an ``input``."""
    user: str = "{content}"
    """A user turn."""
    user_with_input: str | None = None
    """Alpaca only: a user turn that carries an ``input`` field."""
    assistant_prefix: str = ""
    """What opens an assistant turn; it ends the inference prompt."""
    answer: str = "{content}"
    """The supervised answer text."""
    end: str = "eos"
    """End of an answer: ``eos`` (the tokenizer's EOS id) or a special token's text."""
    after_end: str = ""
    """Unsupervised text after the end token (a newline in ChatML)."""
    bos: bool = True
    """Start with the tokenizer's BOS, if the tokenizer's own convention starts with one."""
    bos_token: str | None = None
    """The template's own BOS token (Llama-2 ``<s>``, Llama-3 ``<|begin_of_text|>``): emitted
    whatever the tokenizer's post-processor does, because the format itself begins with it."""
    strip: bool = False
    """Strip whitespace around message contents."""
    llama2: bool = False
    """Meta's Llama-2-Chat construction (system folded into the first user turn, BOS/EOS per
    exchange, each exchange tokenized whole)."""
    extra: dict = field(default_factory=dict)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            name="alpaca",
            description="Stanford Alpaca instruction prompt (with and without input)",
            system="{system}\n\n",
            default_system=ALPACA_SYSTEM,
            default_system_with_input=ALPACA_SYSTEM_INPUT,
            user="### Instruction:\n{content}\n\n",
            user_with_input="### Instruction:\n{content}\n\n### Input:\n{input}\n\n",
            assistant_prefix="### Response:\n",
            after_end="\n\n",
        ),
        Template(
            name="vicuna",
            description="Vicuna v1.1: system sentence, USER: / ASSISTANT:, EOS after each answer",
            system="{system} ",
            default_system=VICUNA_SYSTEM,
            user="USER: {content} ",
            assistant_prefix="ASSISTANT:",
            answer=" {content}",
        ),
        Template(
            name="llama2",
            description="Meta Llama-2-Chat: [INST] <<SYS>> ... [/INST], BOS/EOS per exchange",
            system="",
            llama2=True,
            strip=True,
            bos_token="<s>",
        ),
        Template(
            name="llama3",
            description="Meta Llama-3 header tokens and <|eot_id|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
            end="<|eot_id|>",
            strip=True,
            bos_token="<|begin_of_text|>",
        ),
        Template(
            name="chatml",
            description="ChatML: <|im_start|>role ... <|im_end|>",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
            end="<|im_end|>",
            after_end="\n",
            bos=False,
        ),
        Template(
            name="tokenizer",
            description="the tokenizer's own chat_template (assistant spans found by prefix rendering)",
        ),
    ]
}

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def get_template(name: str) -> Template:
    """Look up a template by name.

    Raises:
        UserError: Unknown name (the message lists the valid ones).
    """
    if name not in TEMPLATES:
        import difflib

        guess = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f" Did you mean {guess[0]}?" if guess else ""
        raise UserError(
            f"data.template {name!r} is not a known template; choose one of "
            f"{', '.join(TEMPLATES)}.{hint}"
        )
    return TEMPLATES[name]


@dataclass
class Unit:
    """A run of text tokenized in one call, with optional BOS before and end token after."""

    parts: list[tuple[str, bool]] = field(default_factory=list)
    bos: bool = False
    eos: bool = False  # append the tokenizer EOS id (supervised iff ``eos_supervised``)
    eos_supervised: bool = False

    def add(self, text: str, supervised: bool) -> None:
        """Append a piece of text."""
        if text:
            self.parts.append((text, supervised))

    @property
    def empty(self) -> bool:
        """True when the unit would produce no tokens."""
        return not self.parts and not self.bos and not self.eos


@dataclass
class Rendered:
    """A tokenized conversation."""

    input_ids: list[int]
    labels: list[int]
    """``-100`` where the token is not supervised."""
    text: str
    """The rendered text, special tokens written out."""
    bos_added: bool
    """Whether the template placed a BOS token at position 0."""
    bos_id: int | None = None
    """The BOS id the template uses (see :func:`bos_token_id`)."""


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab(tokenizer) -> dict:
    """``tokenizer.get_vocab()``, kept per tokenizer.

    A fast tokenizer rebuilds the whole dict on every call (18 ms for a 49k vocabulary), and
    rendering asks for it once per sample.
    """
    size = len(tokenizer)
    hit = _VOCABS.get(tokenizer)
    if hit is None or hit[0] != size:  # tokens added since: read it again
        hit = (size, tokenizer.get_vocab())
        _VOCABS[tokenizer] = hit
    return hit[1]


def _uses_bos(tokenizer) -> bool:
    """Whether the tokenizer's own convention starts every sequence with BOS."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def bos_token_id(tokenizer, template: Template | str) -> int | None:
    """The BOS id a template starts sequences with, or ``None`` when it starts with none.

    * Templates with a BOS of their own (``llama2``: ``<s>``, ``llama3``:
      ``<|begin_of_text|>``) always start with it, whatever the tokenizer's post-processor
      does (some published Llama-3 ``tokenizer.json`` files add none). ``llama2`` on a
      vocabulary without ``<s>`` (SmolLM2, say) uses the tokenizer's BOS in its place;
      ``llama3`` requires its token (see :func:`render`'s special-token check).
    * The others (``alpaca``, ``vicuna``) follow the tokenizer's convention: BOS exactly when
      the tokenizer itself starts sequences with one; ``chatml`` never has one, and
      ``tokenizer`` defers to the tokenizer's own chat template.
    """
    tpl = get_template(template) if isinstance(template, str) else template
    if tpl.name == "tokenizer":
        return None
    if tpl.bos_token is not None:
        vocab = _vocab(tokenizer)
        if tpl.bos_token in vocab:
            return vocab[tpl.bos_token]
        return tokenizer.bos_token_id
    return tokenizer.bos_token_id if tpl.bos and _uses_bos(tokenizer) else None


def _normalize(messages: list[dict], tpl: Template, system: str | None) -> tuple[str | None, list]:
    """Split off the system message and apply stripping."""
    msgs = list(messages)
    sys_text = None
    if msgs and msgs[0]["role"] == "system":
        sys_text = msgs[0]["content"]
        msgs = msgs[1:]
    if sys_text is None:
        sys_text = system
    if sys_text is None:
        has_input = bool(msgs and msgs[0].get("input"))
        sys_text = (
            tpl.default_system_with_input
            if has_input and tpl.default_system_with_input
            else tpl.default_system
        )
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            raise UserError(f"a system message may only come first (message {i + 2}).")
    return sys_text, msgs


def _fmt(fmt: str, content: str, inp: str = "", system: str = "") -> str:
    return fmt.replace("{content}", content).replace("{input}", inp).replace("{system}", system)


def _units_generic(tpl: Template, sys_text, msgs, add_bos, add_generation_prompt) -> list[Unit]:
    units: list[Unit] = []
    cur = Unit(bos=add_bos)
    if sys_text and tpl.system:
        cur.add(_fmt(tpl.system, "", system=sys_text.strip() if tpl.strip else sys_text), False)
    for m in msgs:
        content = m["content"].strip() if tpl.strip else m["content"]
        if m["role"] == "user":
            inp = m.get("input") or ""
            fmt = tpl.user_with_input if inp and tpl.user_with_input else tpl.user
            cur.add(_fmt(fmt, content, inp.strip() if tpl.strip else inp), False)
        elif m["role"] == "assistant":
            cur.add(tpl.assistant_prefix, False)
            units.append(cur)
            ans = Unit()
            ans.add(_fmt(tpl.answer, content), True)
            if tpl.end == "eos":
                ans.eos, ans.eos_supervised = True, True
            else:
                ans.add(tpl.end, True)
            units.append(ans)
            cur = Unit()
            cur.add(tpl.after_end, False)
        else:
            raise UserError(f"unknown role {m['role']!r}; roles are system, user, assistant.")
    if add_generation_prompt:
        cur.add(tpl.assistant_prefix, False)
        units.append(cur)
    # A training sample ends at its last end token; trailing separators teach nothing.
    return [u for u in units if not u.empty]


def _units_llama2(sys_text, msgs, add_generation_prompt) -> list[Unit]:
    msgs = [dict(m) for m in msgs]
    if sys_text:
        if not msgs:
            raise UserError("a llama2 conversation needs a user turn after the system prompt.")
        msgs[0]["content"] = B_SYS + sys_text + E_SYS + msgs[0]["content"]
    units = []
    i = 0
    while i < len(msgs):
        user = msgs[i]
        if user["role"] != "user":
            raise UserError("llama2 conversations alternate user/assistant, starting with user.")
        prompt = f"{B_INST} {user['content'].strip()} {E_INST}"
        if i + 1 < len(msgs):
            ans = msgs[i + 1]
            if ans["role"] != "assistant":
                raise UserError("llama2 conversations alternate user/assistant.")
            u = Unit(bos=True, eos=True, eos_supervised=True)
            u.add(prompt, False)
            u.add(f" {ans['content'].strip()} ", True)
            units.append(u)
            i += 2
        else:
            if add_generation_prompt:
                u = Unit(bos=True)
                u.add(prompt, False)
                units.append(u)
            i += 1
    return units


_END_CANDIDATES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|end_of_turn|>")


def _units_tokenizer(tokenizer, messages, add_generation_prompt) -> list[Unit]:
    """Units from the tokenizer's own chat template, located by prefix rendering."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "data.template is 'tokenizer' but this tokenizer has no chat_template; "
            "choose a named template such as chatml or llama2."
        )

    def show(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    ends = [tokenizer.eos_token] + [c for c in _END_CANDIDATES if c in _vocab(tokenizer)]
    units: list[Unit] = []
    done = 0  # characters already placed in units
    full = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = show(messages[:i], True)
        full = show(messages[: i + 1], False)
        if not full.startswith(prefix) or len(prefix) < done:
            raise UserError(
                "the tokenizer's chat_template does not render conversations as growing "
                "prefixes, so assistant spans cannot be located; choose a named template."
            )
        u = Unit()
        u.add(full[done : len(prefix)], False)
        units.append(u)
        span = full[len(prefix) :]
        cpos = span.find(m["content"]) if m["content"] else 0
        cpos = max(cpos, 0) + len(m["content"])
        hits = [(span.find(e, cpos), e) for e in ends if e and span.find(e, cpos) >= 0]
        if not hits:
            raise UserError(
                "the tokenizer's chat_template ends assistant turns with no end token, so the "
                "model would never learn to stop; choose a named template."
            )
        pos, tok = min(hits)
        a = Unit()
        a.add(span[: pos + len(tok)], True)
        units.append(a)
        done = len(prefix) + pos + len(tok)
    if add_generation_prompt:
        text = show(messages, True)
        u = Unit()
        u.add(text[done:], False)
        units.append(u)
    return [u for u in units if not u.empty]


def _tokenize_units(tokenizer, units: list[Unit], bos_id: int | None
                    ) -> tuple[list[int], list[int], str]:
    ids: list[int] = []
    labels: list[int] = []
    text = []
    for u in units:
        if u.bos:
            ids.append(bos_id)
            labels.append(-100)
            text.append(tokenizer.convert_ids_to_tokens(bos_id))
        body = "".join(t for t, _ in u.parts)
        if body:
            flags = {s for _, s in u.parts}
            if len(flags) == 1:
                toks = tokenizer(body, add_special_tokens=False)["input_ids"]
                sup = flags.pop()
                ids.extend(toks)
                labels.extend(toks if sup else [-100] * len(toks))
            else:
                enc = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
                ranges, pos = [], 0
                for t, s in u.parts:
                    if s:
                        ranges.append((pos, pos + len(t)))
                    pos += len(t)
                for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
                    sup = any(a <= start < b for a, b in ranges) or (
                        start == end and any(a < end <= b for a, b in ranges)
                    )
                    ids.append(tid)
                    labels.append(tid if sup else -100)
            text.append(body)
        if u.eos:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id if u.eos_supervised else -100)
            text.append(tokenizer.eos_token)
    return ids, labels, "".join(text)


def _check_special(tokenizer, tpl: Template) -> None:
    needed = [tpl.end] if tpl.end != "eos" else []
    if tpl.name == "llama3":
        needed += ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    if tpl.name == "chatml":
        needed += ["<|im_start|>"]
    vocab = _vocab(tokenizer)
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise UserError(
            f"data.template {tpl.name} needs the special token(s) {', '.join(missing)}, which "
            "this tokenizer does not have; pick a template that matches the model "
            "(or 'tokenizer' to use its own chat_template)."
        )
    if tpl.end == "eos" and tokenizer.eos_token_id is None:
        raise UserError(f"data.template {tpl.name} ends answers with EOS, but the tokenizer has none.")
    if tpl.bos_token is not None and bos_token_id(tokenizer, tpl) is None:
        raise UserError(f"data.template {tpl.name} starts with {tpl.bos_token}, which this "
                        "tokenizer has no token for (nor any BOS token); pick a template that "
                        "matches the model.")


def render(
    tokenizer,
    template: Template | str,
    messages: list[dict],
    *,
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Render and tokenize a conversation.

    Args:
        tokenizer: A Hugging Face tokenizer (fast tokenizers give offsets for ``llama2``).
        template: A :class:`Template` or its name.
        messages: ``{"role", "content"}`` dicts (user messages may carry ``input``).
        system: System prompt to use when the conversation has none (``None``: template default).
        add_generation_prompt: End with the open assistant turn (an inference prompt).

    Returns:
        The token ids, labels (``-100`` where unsupervised) and the text.
    """
    tpl = get_template(template) if isinstance(template, str) else template
    if tpl.name == "tokenizer":
        msgs = list(messages)
        if system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": system}] + msgs
        units = _units_tokenizer(tokenizer, msgs, add_generation_prompt)
        bos_id = None
    else:
        _check_special(tokenizer, tpl)
        sys_text, msgs = _normalize(messages, tpl, system)
        bos_id = bos_token_id(tokenizer, tpl)
        if tpl.llama2:
            units = _units_llama2(sys_text, msgs, add_generation_prompt)
        else:
            units = _units_generic(tpl, sys_text, msgs, bos_id is not None, add_generation_prompt)
    ids, labels, text = _tokenize_units(tokenizer, units, bos_id)
    return Rendered(input_ids=ids, labels=labels, text=text, bos_added=bos_id is not None,
                    bos_id=bos_id)


def stop_token_ids(tokenizer, template: Template | str) -> list[int]:
    """Token ids that end an assistant turn (for generation)."""
    tpl = get_template(template) if isinstance(template, str) else template
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    cands = [tpl.end] if tpl.end != "eos" else []
    if tpl.name == "tokenizer":
        cands += list(_END_CANDIDATES)
    vocab = _vocab(tokenizer)
    for c in cands:
        if c in vocab and vocab[c] not in ids:
            ids.append(vocab[c])
    return ids
