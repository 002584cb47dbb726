"""Data: JSONL rows -> token ids, loss masks, packing, collation, resumable batch order.

Typical use::

    tokenizer = resolve_tokenizer(cfg.data.tokenizer, cfg.model.path)
    splits = build_datasets(cfg.data, tokenizer)
    loader = make_train_loader(splits.train, batch_size=cfg.optim.batch_size,
                               max_length=cfg.data.max_length, packing=cfg.data.packing,
                               pad_id=tokenizer.pad_id, seed=cfg.seed)
    for batch, state in loader.iter_from(SamplerState.from_dict(saved) if saved else None):
        ...  # save state.to_dict() with the checkpoint to resume after this batch
"""

from moetune.data.collate import Collator
from moetune.data.dataset import DataReport, DataSplits, build_datasets, split_rows
from moetune.data.examples import IGNORE, Example, encode_row, instruction_prompt, tokenize_row
from moetune.data.formats import ChatRow, InstructionRow, LoadedRows, Row, TextRow, detect_format, load_rows
from moetune.data.packing import pack_examples, packing_efficiency
from moetune.data.sampling import BatchLoader, ResumableSampler, SamplerState, eval_batches, make_train_loader
from moetune.data.tokenizer import ByteTokenizer, ChatEncoding, Tokenizer
from moetune.data.tokenizer_loading import check_tokenizer_fits, load_tokenizer, resolve_tokenizer

__all__ = [
    "IGNORE",
    "BatchLoader",
    "ByteTokenizer",
    "ChatEncoding",
    "ChatRow",
    "Collator",
    "DataReport",
    "DataSplits",
    "Example",
    "InstructionRow",
    "LoadedRows",
    "ResumableSampler",
    "Row",
    "SamplerState",
    "TextRow",
    "Tokenizer",
    "build_datasets",
    "check_tokenizer_fits",
    "detect_format",
    "encode_row",
    "eval_batches",
    "instruction_prompt",
    "load_rows",
    "load_tokenizer",
    "make_train_loader",
    "pack_examples",
    "packing_efficiency",
    "resolve_tokenizer",
    "split_rows",
    "tokenize_row",
]
