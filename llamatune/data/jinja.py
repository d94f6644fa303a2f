"""A template as a Jinja chat template (for export): :func:`to_jinja`."""

from __future__ import annotations

import json

from llamatune.data.templates import Template, bos_token_id, get_template

__all__ = ["to_jinja"]


def _jinja_text(fmt: str, var: str, strip: bool) -> str:
    """A format string as Jinja: literal text with ``{content}`` etc. as expressions."""
    out = fmt
    for name, expr in (("{content}", f"{var}['content']"), ("{input}", f"{var}['input']"),
                       ("{system}", "system_message")):
        value = "{{ " + expr + (" | trim" if strip and name != "{system}" else "") + " }}"
        out = out.replace(name, value)
    return out


def to_jinja(tokenizer, template: Template | str, system: str | None = None) -> str:
    """A Jinja chat template that renders exactly what :func:`~llamatune.data.templates.render` renders.

    Saved with the tokenizer in run directories and merged models, so
    ``tokenizer.apply_chat_template`` reproduces the training format without llamatune.

    Args:
        tokenizer: The tokenizer (its BOS convention decides whether the template adds BOS).
        template: A :class:`Template` or its name.
        system: The run's ``data.system``: the system prompt of conversations without one
            (``None``: the template's default, as in ``render``).
    """
    tpl = get_template(template) if isinstance(template, str) else template
    if tpl.name == "tokenizer":
        return tokenizer.chat_template
    if tpl.llama2:
        default = "''" if not system else (
            "'<<SYS>>\\n' + " + _jinja_str(system) + " + '\\n<</SYS>>\\n\\n'")
        return (
            "{% if messages[0]['role'] == 'system' %}"
            "{% set loop_messages = messages[1:] %}"
            "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + "
            "'\\n<</SYS>>\\n\\n' %}"
            "{% else %}{% set loop_messages = messages %}"
            "{% set system_message = " + default + " %}"
            "{% endif %}"
            "{% for message in loop_messages %}"
            "{% if message['role'] == 'user' %}"
            "{% set content = (system_message + message['content']) if loop.first "
            "else message['content'] %}"
            "{{ " + _jinja_str(tokenizer.convert_ids_to_tokens(bos_token_id(tokenizer, tpl)))
            + " }}[INST] {{ content | trim }} [/INST]"
            "{% elif message['role'] == 'assistant' %}"
            " {{ message['content'] | trim }} {{ eos_token }}"
            "{% endif %}"
            "{% endfor %}"
        )
    bos_id = bos_token_id(tokenizer, tpl)
    bos = "" if bos_id is None else "{{ " + _jinja_str(tokenizer.convert_ids_to_tokens(bos_id)) + " }}"
    end = "{{ eos_token }}" if tpl.end == "eos" else tpl.end
    parts = [
        "{% if messages[0]['role'] == 'system' %}",
        "{% set system_message = messages[0]['content'] %}",
        "{% set loop_messages = messages[1:] %}",
        "{% else %}",
        "{% set loop_messages = messages %}",
    ]
    if system is not None:
        parts.append(f"{{% set system_message = {_jinja_str(system)} %}}")
    elif tpl.default_system_with_input:
        parts.append(
            "{% if loop_messages and loop_messages[0].get('input') %}"
            f"{{% set system_message = {_jinja_str(tpl.default_system_with_input)} %}}"
            "{% else %}"
            f"{{% set system_message = {_jinja_str(tpl.default_system or '')} %}}"
            "{% endif %}"
        )
    else:
        parts.append(f"{{% set system_message = {_jinja_str(tpl.default_system or '')} %}}")
    parts.append("{% endif %}")
    parts.append(bos)
    if tpl.system:
        parts.append("{% if system_message %}" + _jinja_text(tpl.system, "", False)
                     + "{% endif %}")
    user = _jinja_text(tpl.user, "message", tpl.strip)
    if tpl.user_with_input:
        user = ("{% if message.get('input') %}"
                + _jinja_text(tpl.user_with_input, "message", tpl.strip)
                + "{% else %}" + user + "{% endif %}")
    answer = _jinja_text(tpl.answer, "message", tpl.strip)
    parts += [
        "{% for message in loop_messages %}",
        "{% if message['role'] == 'user' %}" + user,
        "{% elif message['role'] == 'assistant' %}"
        + tpl.assistant_prefix + answer + end + tpl.after_end,
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}" + tpl.assistant_prefix + "{% endif %}",
    ]
    return "".join(parts)


def _jinja_str(s: str) -> str:
    return json.dumps(s)
