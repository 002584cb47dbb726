"""The inference-side subcommands: ``eval``, ``generate``, ``merge``, ``export``, ``merge-adapters``."""

from __future__ import annotations

import argparse

from .options import command, flag, fraction, model_args, non_negative_float, overwrite_arg, positive_int, probability

TEXTS = {  # subcommand: (help line, description)
    "eval": (
        "loss / perplexity, or multiple-choice accuracy, of base or base+adapter",
        "Token-weighted loss and perplexity on a JSONL dataset (instruction, chat or text rows), and/or "
        "multiple-choice accuracy by log-likelihood on task files (rows: question, choices, answer). Router "
        "statistics (expert load, entropy) are printed for MoE layers and adapter mixtures.",
    ),
    "generate": (
        "generate text from a prompt (greedy or sampled, KV cache)",
        "Continue prompts with the base model or base + adapter. Each prompt is formatted as training formats an "
        "instruction row: the tokenizer's chat template (a user turn), or, for a tokenizer without one, "
        "the lines '### Instruction:', <prompt>, '### Response:' (Alpaca); --raw sends it as it is.",
    ),
    "merge": (
        "fold an adapter into the base; write a Hugging Face checkpoint",
        "Merge an adapter into the base weights and save a plain Hugging Face checkpoint.",
    ),
    "export": (
        "re-save an adapter for a reader: PEFT, vLLM, SGLang, MoE-PEFT",
        "Write an adapter the way one reader loads it exactly (--for; docs/serving.md says what each reads): "
        "PEFT's layout (PEFT, Unsloth, axolotl, ms-swift, LLaMA-Factory), per-expert 2D keys under the family's "
        "serving names (vLLM; SGLang with the scaling folded into B), or MoE-PEFT's MixLoRA layout.",
    ),
    "merge-adapters": (
        "combine adapters of one base into a new adapter (linear, TIES, DARE, SVD ...)",
        "Merge LoRA adapters trained on the same base model into one PEFT-format adapter "
        "(PEFT's add_weighted_adapter methods; routed experts merged expert by expert).",
    ),
}


def _cmd_eval(ns: argparse.Namespace) -> None:
    from ..errors import ConfigError
    from ..workflows import EvalSetup, evaluate_file, evaluate_task_files

    if not ns.data and not ns.task:
        raise ConfigError("give --data FILE (loss/perplexity) and/or --task FILE (multiple-choice accuracy)")
    setup = EvalSetup(ns.model, ns.adapter, ns.tokenizer, ns.max_length, ns.batch_size, ns.dtype, ns.device)
    if ns.data:
        print(evaluate_file(setup, ns.data).summary())
    for result in evaluate_task_files(setup, ns.task or [], chat=ns.chat):
        print(result.summary())


def add_eval(sub) -> None:
    p = command(sub, "eval", _cmd_eval, TEXTS)
    model_args(p)
    p.add_argument("--data", help="JSONL file for loss / perplexity")
    p.add_argument(
        "--task",
        action="append",
        metavar="FILE.jsonl",
        help="multiple-choice task file (repeat for several); reports accuracy_norm (headline) and accuracy",
    )
    flag(
        p,
        "--chat",
        "--task: ask each question as training formats an instruction (instruction-tuned adapters): the chat "
        "template's user turn, or '### Instruction: ... ### Response:' for a tokenizer without one",
    )
    p.add_argument(
        "--max-length", type=positive_int, default=1024, help="tokens per row (longer rows are cut, and counted)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass")


def _cmd_generate(ns: argparse.Namespace) -> None:
    from ..workflows import generate_text

    sampling = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature, "top_p": ns.top_p, "seed": ns.seed}
    loading = {"adapter": ns.adapter, "tokenizer": ns.tokenizer, "dtype": ns.dtype, "device": ns.device}
    for text in generate_text(ns.model, ns.prompt, chat=not ns.raw, **sampling, **loading):
        print(text)


def add_generate(sub) -> None:
    p = command(sub, "generate", _cmd_generate, TEXTS)
    model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    flag(p, "--raw", "send the prompt as it is (after bos): no chat template, no '### Instruction:' format")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most per prompt")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument(
        "--top-p",
        type=probability,
        default=1.0,
        help="nucleus sampling: keep the smallest set of tokens with this much probability",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def _writing(ns: argparse.Namespace) -> dict:
    """The options of commands that load a model and write an output folder."""
    return {"dtype": ns.dtype, "device": ns.device, "overwrite": ns.overwrite}


def _cmd_merge(ns: argparse.Namespace) -> None:
    from ..workflows import merge_to_checkpoint

    out = merge_to_checkpoint(
        ns.model, ns.adapter, ns.out, tokenizer=ns.tokenizer, requantize=ns.requantize, **_writing(ns)
    )
    print(f"merged checkpoint written to {out}")


def add_merge(sub) -> None:
    p = command(sub, "merge", _cmd_merge, TEXTS)
    model_args(
        p,
        adapter_required=True,
        tokenizer="a tokenizer folder whose files are copied into the merged folder "
        "(default: the base folder's tokenizer, chat template and generation config)",
    )
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier merge's")
    flag(
        p,
        "--requantize",
        "a base released quantized (fp8, int4) is written back in its own format, scales recomputed from "
        "the merged weights (default: written dequantized); the largest error of doing so is reported",
    )
    overwrite_arg(p)


def _cmd_export(ns: argparse.Namespace) -> None:
    from ..workflows import export_adapter

    from ..workflows import export_plan

    layout, fold = export_plan(ns.layout, ns.reader, ns.fold_scaling)
    out = export_adapter(
        ns.model, ns.adapter, ns.out, layout=layout, reader=ns.reader, fold_scaling=fold, **_writing(ns)
    )
    print(f"adapter written to {out} ({layout} layout{', scaling folded into B' if fold else ''})")


def add_export(sub) -> None:
    p = command(sub, "export", _cmd_export, TEXTS)
    model_args(p, adapter_required=True, tokenizer=None)  # an adapter folder carries no tokenizer
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export's")
    overwrite_arg(p)
    p.add_argument(
        "--for",
        dest="reader",
        choices=["peft", "vllm", "sglang", "moe_peft"],
        help="the reader that will load the folder; chooses --layout and --fold-scaling (docs/serving.md)",
    )
    p.add_argument(
        "--layout",
        choices=["peft", "per_expert", "moe_peft"],
        help="peft (default): PEFT's keys; per_expert: 2D pairs per expert (vLLM, SGLang); moe_peft: MoE-PEFT's "
        "MixLoRA layout (MixLoRA adapters)",
    )
    flag(
        p,
        "--fold-scaling",
        "per_expert: fold each module's scaling (rsLoRA, rank/alpha patterns) into B and write alpha = r, "
        "for readers that scale every module by alpha/r (SGLang)",
    )


def _cmd_merge_adapters(ns: argparse.Namespace) -> None:
    from ..workflows import combine_adapters

    options = {"weights": ns.weights, "method": ns.method, "density": ns.density, "rank": ns.rank, "seed": ns.seed}
    print(combine_adapters(ns.model, ns.adapter, ns.out, overwrite=ns.overwrite, **options))


def add_merge_adapters(sub) -> None:
    from ..workflows import COMBINE_METHODS as METHODS

    p = command(sub, "merge-adapters", _cmd_merge_adapters, TEXTS)
    p.add_argument(
        "--model", required=True, help="the base model folder the adapters were trained on (only config.json is read)"
    )
    p.add_argument("--adapter", action="append", required=True, help="adapter folder (repeat, two or more)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1.0 each)")
    p.add_argument("--method", choices=METHODS, default="linear", help="merge method (default: linear)")
    p.add_argument("--density", type=fraction, help="fraction kept by ties / dare / magnitude_prune methods")
    p.add_argument(
        "--rank", type=positive_int, help="output rank of the *svd methods (default: the largest input rank)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    p.add_argument("--out", required=True, help="output adapter folder: new, empty, or an earlier adapter's")
    overwrite_arg(p)
