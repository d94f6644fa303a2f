"""Dataset formats: read files, check every row, turn rows into canonical records.

Canonical records are plain dicts, whatever the file looked like:

* conversation (``alpaca``, ``sharegpt``, ``messages``):
  ``{"messages": [{"role", "content"[, "input"]}, ...], "loc": "file:line"}``
* preference: ``{"prompt": [...messages], "chosen": [...], "rejected": [...], "loc": ...}``
  where ``chosen``/``rejected`` hold the assistant turn(s) that follow the shared prompt
* prompts: ``{"messages": [...], "fields": {...}, "loc": ...}`` ending with a user turn;
  ``fields`` holds the row's other fields (such as ``answer``) for reward functions

Every record also carries ``group`` (the value of ``data.eval_group_by``, if set). A format
is a reader function in :data:`FORMATS`; problems are collected per row and reported
together, naming file, line (or row) and field.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["FORMATS", "MAX_REPORTED", "iter_rows", "read_records"]

MAX_REPORTED = 10
_EXTS = (".jsonl", ".json", ".csv", ".parquet")
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
}


class RowError(Exception):
    """A problem with one row: ``field`` names the (remapped) field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in _EXTS:
            raise UserError(
                f"data.path {path}: unsupported file type {path.suffix!r}; use "
                f"{', '.join(_EXTS)}, a folder of them, or a datasets save_to_disk folder."
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _EXTS)
    if not files:
        raise UserError(f"data.path {path}: the folder has no {', '.join(_EXTS)} files.")
    return files


_BOM = b"\xef\xbb\xbf"
_NOT_TEXT = "not UTF-8 text{}; save the file as UTF-8 (is it a data file at all?)"


def _decode_error(e: UnicodeDecodeError) -> str:
    return _NOT_TEXT.format(f" (byte 0x{e.object[e.start]:02x} at column {e.start + 1})")


def _iter_jsonl(f: Path):
    """JSON Lines as editors save them: UTF-8 with or without a BOM, LF or CRLF line ends."""
    with open(f, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if n == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # Another encoding or not text at all: every later line would say the same.
                raise UserError(f"{f}:{n}: {_decode_error(e)}. A .jsonl file is UTF-8 text, one "
                                "JSON object per line.") from None
            if not line.strip():
                continue
            try:
                yield f"{f}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{f}:{n}", RowError("", f"not valid JSON ({e.msg}, column {e.colno})")
            except RecursionError:
                yield f"{f}:{n}", RowError("", "JSON nested too deeply to read")


def _iter_json(f: Path):
    try:
        data = json.loads(f.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{f}: {_decode_error(e)}.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{f}:{e.lineno}: not valid JSON ({e.msg}).") from None
    except RecursionError:
        raise UserError(f"{f}: JSON nested too deeply to read.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{f}: a .json data file must hold a list of records (a JSON array).")
    for n, row in enumerate(data, 1):
        yield f"{f}:row {n}", row


def _iter_csv(f: Path):
    import csv

    try:
        text = f.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise UserError(f"{f}:{line}: {_NOT_TEXT.format('')}.") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if None in row:  # more cells than header names
                yield f"{f}:{reader.line_num}", RowError("", "has more cells than the header row")
                continue
            yield f"{f}:{reader.line_num}", dict(row)
    except csv.Error as e:
        raise UserError(f"{f}:{reader.line_num}: not valid CSV ({e}).") from None


def _iter_parquet(f: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(f).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{f}: not a readable Parquet file ({e}).") from None
    for n, row in enumerate(rows, 1):
        yield f"{f}:row {n}", row


_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv,
            ".parquet": _iter_parquet}


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yield ``(location, row)`` for every row of a file, folder or cached dataset.

    Locations are ``file:line`` for JSONL and CSV, ``file:row N`` otherwise. A JSONL line that
    is not valid JSON yields a :class:`RowError` as its row so the caller can report it with
    the others; a file that is not UTF-8 text, or cannot be read at all, raises
    :class:`UserError` naming the file (and line).
    """
    p = Path(path).expanduser()
    if not p.exists():
        yield from _iter_hub(str(path))
        return
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                       or (p / "dataset_dict.json").exists()):
        yield from _iter_saved(p)
        return
    for f in _files(p):
        yield from _READERS[f.suffix](f)


def _iter_saved(p: Path):
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"data.path {p}: a DatasetDict without a 'train' split.")
        ds = ds["train"]
    for n, row in enumerate(ds, 1):
        yield f"{p}:row {n}", row


def _iter_hub(name: str):
    if "/" not in name or name.startswith((".", "/", "~")):
        raise UserError(f"data.path {name}: no such file or folder.")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - any failure means it is not available offline
        raise UserError(
            f"data.path {name}: no such file or folder, and not a dataset in the local "
            f"Hugging Face cache (llamatune never downloads): {type(e).__name__}."
        ) from None
    for n, row in enumerate(ds, 1):
        yield f"{name}:row {n}", row


def _get(row: dict, fields: dict, name: str, required: bool = True, kind=str):
    key = fields.get(name, name)
    if not isinstance(row, dict):
        raise RowError("", "a record must be a JSON object")
    if key not in row or row[key] is None:
        if required:
            raise RowError(key, "is missing")
        return None
    val = row[key]
    if kind is str and not isinstance(val, str):
        raise RowError(key, f"must be a string, got {type(val).__name__}")
    if kind is list and not isinstance(val, list):
        raise RowError(key, f"must be a list, got {type(val).__name__}")
    return val


def _nonempty(row, fields, name) -> str:
    val = _get(row, fields, name)
    if not val.strip():
        raise RowError(fields.get(name, name), "is empty")
    return val


def _alpaca(row, fields) -> dict:
    instruction = _nonempty(row, fields, "instruction")
    inp = _get(row, fields, "input", required=False) or ""
    output = _nonempty(row, fields, "output")
    msgs = []
    system = _get(row, fields, "system", required=False)
    if system:
        msgs.append({"role": "system", "content": system})
    user = {"role": "user", "content": instruction}
    if inp.strip():
        user["input"] = inp
    msgs += [user, {"role": "assistant", "content": output}]
    return {"messages": msgs}


def _check_turns(msgs: list[dict], key: str, need_answer: bool = True) -> list[dict]:
    """Roles alternate user/assistant after an optional system turn; no empty answers."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RowError(key, f"turn {i + 1} is {m['role']!r}; expected {want!r} "
                                "(turns alternate user/assistant, after an optional system turn)")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(key, f"turn {i + 1} is an empty assistant response")
    if need_answer:
        if not body or body[-1]["role"] != "assistant":
            raise RowError(key, "must end with an assistant turn")
    return msgs


def _sharegpt(row, fields) -> dict:
    conv = _get(row, fields, "conversations", kind=list)
    key = fields.get("conversations", "conversations")
    fk, vk = fields.get("from", "from"), fields.get("value", "value")
    msgs = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or fk not in turn or vk not in turn:
            raise RowError(key, f"turn {i + 1} needs {fk!r} and {vk!r}")
        role = _SHAREGPT_ROLES.get(str(turn[fk]).lower())
        if role is None:
            raise RowError(key, f"turn {i + 1} has unknown {fk} {turn[fk]!r} "
                                "(use system, human or gpt)")
        if not isinstance(turn[vk], str):
            raise RowError(key, f"turn {i + 1}: {vk} must be a string")
        msgs.append({"role": role, "content": turn[vk]})
    if not msgs:
        raise RowError(key, "is empty")
    return {"messages": _check_turns(msgs, key)}


def _message_list(val, key, rk="role", ck="content") -> list[dict]:
    if not isinstance(val, list) or not val:
        raise RowError(key, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(val):
        if not isinstance(m, dict) or rk not in m or ck not in m:
            raise RowError(key, f"message {i + 1} needs {rk!r} and {ck!r}")
        if m[rk] not in ("system", "user", "assistant"):
            raise RowError(key, f"message {i + 1} has role {m[rk]!r} (system, user or assistant)")
        if not isinstance(m[ck], str):
            raise RowError(key, f"message {i + 1}: {ck} must be a string")
        out.append({"role": m[rk], "content": m[ck]})
    return out


def _messages(row, fields) -> dict:
    key = fields.get("messages", "messages")
    val = _get(row, fields, "messages", kind=list)
    msgs = _message_list(val, key, fields.get("role", "role"), fields.get("content", "content"))
    return {"messages": _check_turns(msgs, key)}


def _as_messages(val, key, role) -> list[dict]:
    if isinstance(val, str):
        return [{"role": role, "content": val}]
    return _message_list(val, key)


def _preference(row, fields) -> dict:
    ck, rk = fields.get("chosen", "chosen"), fields.get("rejected", "rejected")
    chosen_raw = row.get(ck) if isinstance(row, dict) else None
    rejected_raw = row.get(rk) if isinstance(row, dict) else None
    if chosen_raw is None:
        raise RowError(ck, "is missing")
    if rejected_raw is None:
        raise RowError(rk, "is missing")
    prompt_raw = _get(row, fields, "prompt", required=False, kind=object)
    chosen = _as_messages(chosen_raw, ck, "assistant")
    rejected = _as_messages(rejected_raw, rk, "assistant")
    if prompt_raw is None:
        # Full-transcript form: chosen and rejected share the conversation up to the answer.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise RowError(fields.get("prompt", "prompt"),
                           "is missing, and chosen/rejected share no prompt turns")
    else:
        prompt = _as_messages(prompt_raw, fields.get("prompt", "prompt"), "user")
    for key, side in ((ck, chosen), (rk, rejected)):
        if not side or side[0]["role"] != "assistant":
            raise RowError(key, "must continue the prompt with an assistant answer")
        if not any(m["content"].strip() for m in side if m["role"] == "assistant"):
            raise RowError(key, "is an empty response")
    _check_turns(prompt + chosen, ck)
    _check_turns(prompt + rejected, rk)
    if chosen == rejected:
        raise RowError(ck, f"is identical to {rk}; the pair teaches nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompts(row, fields) -> dict:
    key = fields.get("prompt", "prompt")
    val = _get(row, fields, "prompt", kind=object)
    msgs = _as_messages(val, key, "user")
    if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        raise RowError(key, "must end with a non-empty user turn")
    # The row's other fields (an expected answer, say) go to reward functions as they are.
    extra = {k: v for k, v in row.items() if k != key}
    return {"messages": _check_turns(msgs, key, need_answer=False), "fields": extra}


FORMATS: dict[str, Callable[[dict, dict], dict]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "preference": _preference,
    "prompts": _prompts,
}


def read_records(
    path: str | os.PathLike,
    fmt: str,
    fields: dict | None = None,
    group_by: str | None = None,
    key: str = "data.path",
    hint: str | None = None,
) -> list[dict]:
    """Read and validate every row of a data source.

    Args:
        path: File, folder, ``save_to_disk`` folder or cached hub dataset name.
        fmt: A key of :data:`FORMATS`.
        fields: Canonical field name to the name used in the file.
        group_by: Row field copied into each record's ``group`` (for grouped eval splits).
        key: The recipe key that named ``path``, for error messages.
        hint: What to tell the user about bad rows (default: fix them or map ``data.fields``).

    Returns:
        Canonical records, in file order.

    Raises:
        UserError: Listing up to :data:`MAX_REPORTED` bad rows (file, line, field), or the
            file is missing, or nothing is left.
    """
    if fmt not in FORMATS:
        raise UserError(f"data.format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if not Path(path).expanduser().exists() and "/" not in str(path):
        raise UserError(f"{key} {path}: no such file or folder.")
    reader = FORMATS[fmt]
    fields = fields or {}
    records, errors = [], []
    for loc, row in iter_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            if not isinstance(row, dict):
                raise RowError("", f"a record must be a JSON object, got {_kind(row)}")
            rec = reader(row, fields)
            rec["group"] = _group(row, group_by)
            if isinstance(row.get("topic"), (str, int)):
                rec["topic"] = str(row["topic"])
        except RowError as e:
            where = f"field {e.field!r} " if e.field else ""
            errors.append(f"{loc}: {where}{e.message}")
            continue
        rec["loc"] = loc
        records.append(rec)
    if errors:
        shown = "; ".join(errors[:MAX_REPORTED])
        more = f" (and {len(errors) - MAX_REPORTED} more)" if len(errors) > MAX_REPORTED else ""
        hint = hint or ("Fix the rows, or map your field names with data.fields (e.g. "
                        "data.fields={output: response}).")
        if group_by and all(f"field {group_by!r} is missing" in e for e in errors):
            hint = (f"data.eval_group_by={group_by} holds out whole groups named by that field, "
                    "so every row needs it; add it, or hold out rows instead by removing "
                    "data.eval_group_by.")
        raise UserError(f"{len(errors)} bad row(s) in {key} ({fmt} format): {shown}{more}. {hint}")
    if not records:
        p = Path(path).expanduser()
        what = "is empty" if p.is_file() and p.stat().st_size == 0 else "holds no records"
        raise UserError(f"{key} {path} {what}; point it at a file with at least one {fmt} "
                        "record.")
    return records


def _kind(value) -> str:
    return {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _group(row: dict, group_by: str | None) -> str | None:
    """The row's ``data.eval_group_by`` value: whole groups are held out, so it is required."""
    if not group_by:
        return None
    value = row.get(group_by)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError(group_by, "is missing")
    if isinstance(value, (dict, list)):
        raise RowError(group_by, f"must be a string or number to group by, got {_kind(value)}")
    return str(value)
