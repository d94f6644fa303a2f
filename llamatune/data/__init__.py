"""The data layer: formats, templates, tokenization, packing. Knows nothing of models."""

from llamatune.data.collate import pack, packed_batch, pad_batch
from llamatune.data.formats import FORMATS, read_records
from llamatune.data.split import split_records
from llamatune.data.templates import TEMPLATES, Template, get_template, render, stop_token_ids
from llamatune.data.tokenize import Stats, tokenize_conversations, tokenize_preferences

__all__ = [
    "FORMATS",
    "TEMPLATES",
    "Stats",
    "Template",
    "get_template",
    "pack",
    "packed_batch",
    "pad_batch",
    "read_records",
    "render",
    "split_records",
    "stop_token_ids",
    "tokenize_conversations",
    "tokenize_preferences",
]
