"""The data layer: formats, templates, tokenization, packing. Knows nothing of models."""

from llamatune.data.collate import pack, packed_batch, pad_batch
from llamatune.data.formats import FORMATS, read_records
from llamatune.data.prepare import (
    KINDS,
    Prepared,
    held_out_prompts,
    prepare,
    resolve_data_path,
    verification_samples,
)
from llamatune.data.split import split_records
from llamatune.data.templates import TEMPLATES, Template, get_template, render, stop_token_ids
from llamatune.data.tokenize import (
    Stats,
    tokenize_conversations,
    tokenize_preferences,
    tokenize_prompts,
)

__all__ = [
    "FORMATS",
    "KINDS",
    "Prepared",
    "TEMPLATES",
    "Stats",
    "Template",
    "get_template",
    "held_out_prompts",
    "pack",
    "packed_batch",
    "pad_batch",
    "prepare",
    "read_records",
    "render",
    "resolve_data_path",
    "split_records",
    "stop_token_ids",
    "tokenize_conversations",
    "tokenize_preferences",
    "tokenize_prompts",
    "verification_samples",
]
