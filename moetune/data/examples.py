"""Rows -> token ids and labels.

Labels follow the model's convention: same length as ``input_ids``, shifted inside the model
(position t predicts ``labels[t+1]``). ``labels[i] = input_ids[i]`` where token i is learnt and
:data:`IGNORE` (-100) elsewhere. By default only responses are learnt:

- instruction: the output and the end of the response (eos, or the chat end-of-turn marker);
- chat: the assistant turns (content and end-of-turn marker, not the role header);
- text: every token.

``train_on_prompt`` learns every token. The first token of every example is never learnt
(nothing precedes it), which also keeps a packed example from predicting across the boundary
with the one before it.

Instruction rows go through the tokenizer's chat format as one user turn (instruction, a blank
line, input) and one assistant turn when it has one; otherwise through :data:`PROMPT` (Alpaca).
"""

from __future__ import annotations

from dataclasses import dataclass

from moetune.data.formats import ChatRow, InstructionRow, Row, RowError, TextRow
from moetune.data.tokenizer import Tokenizer

IGNORE = -100
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class Example:
    """One tokenised example.

    Attributes:
        input_ids: token ids, length T.
        labels: length T; the token id where it is learnt, else -100.
        truncated: whether tokens past ``max_length`` were cut off.
        lost_ending: whether the cut took the end of the last response (its last learnt-by-default
            token: eos or the end-of-turn marker), so this example never teaches the model to stop.
        full_length: tokens before the cut.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    lost_ending: bool = False
    full_length: int = 0

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_learnt(self) -> int:
        """How many tokens carry loss."""
        return sum(label != IGNORE for label in self.labels)


def _user_text(instruction: str, input: str) -> str:
    return f"{instruction}\n\n{input}" if input else instruction


def instruction_prompt(tokenizer: Tokenizer, instruction: str, input: str = "") -> list[int]:
    """Token ids of an instruction (and input) formatted as training formats an instruction row's
    prompt, ending where the response starts: a user turn and the assistant header in the chat
    template, or, for a tokenizer without one, :data:`PROMPT` (Alpaca) after bos. ``generate`` and
    ``eval --task --chat`` prompt with it, so an adapter is asked in the format it was trained on."""
    if tokenizer.has_chat_template:
        user = {"role": "user", "content": _user_text(instruction, input)}
        return tokenizer.encode_chat([user], add_generation_prompt=True).ids
    template = PROMPT_WITH_INPUT if input else PROMPT
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(template.format(instruction=instruction, input=input))


def _encode_instruction(row: InstructionRow, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    if tokenizer.has_chat_template:
        user = _user_text(row.instruction, row.input)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row.output}]
        chat = tokenizer.encode_chat(messages)
        return chat.ids, chat.assistant
    prompt = instruction_prompt(tokenizer, row.instruction, row.input)
    response = tokenizer.encode(row.output) + [tokenizer.eos_id]
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def encode_row(row: Row, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a row and, per token, whether it is learnt by default.

    Raises:
        DataError: the chat template cannot render the row.
    """
    if isinstance(row, InstructionRow):
        return _encode_instruction(row, tokenizer)
    if isinstance(row, ChatRow):
        chat = tokenizer.encode_chat(row.messages)
        return chat.ids, chat.assistant
    if isinstance(row, TextRow):
        bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        ids = bos + tokenizer.encode(row.text) + [tokenizer.eos_id]
        return ids, [True] * len(ids)
    raise TypeError(f"not a dataset row: {type(row).__name__}")


def tokenize_row(row: Row, tokenizer: Tokenizer, *, max_length: int, train_on_prompt: bool = False) -> Example:
    """Tokenise one row into an :class:`Example` of at most ``max_length`` tokens.

    Longer examples are cut at the end (so a long response loses its tail, and with it the
    eos / end-of-turn token: ``Example.lost_ending``).

    Raises:
        RowError: the row renders to no tokens.
        DataError: the chat template cannot render the row.
    """
    ids, learnt = encode_row(row, tokenizer)
    if not ids:
        raise RowError("the row renders to no tokens")
    full_length = len(ids)
    last = max((i for i, keep in enumerate(learnt) if keep), default=-1)
    ids, learnt = ids[:max_length], learnt[:max_length]
    labels = [token if (train_on_prompt or keep) else IGNORE for token, keep in zip(ids, learnt)]
    labels[0] = IGNORE
    return Example(
        input_ids=ids,
        labels=labels,
        truncated=full_length > max_length,
        lost_ending=last >= max_length,
        full_length=full_length,
    )
