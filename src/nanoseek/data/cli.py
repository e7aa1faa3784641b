"""`nanoseek tokenizer train`, `nanoseek data corpus` and `nanoseek data chats`."""

from __future__ import annotations

import argparse

from nanoseek.data.chat import PROMPT_FORMATS
from nanoseek.errors import NanoseekError

# Task options that `data corpus` passes on when given: flag name -> task option.
TASK_FLAGS = {
    "arith": ["min_ops", "max_ops", "min_operand", "max_operand", "ops"],
    "chain": ["min_values", "max_values", "min_value", "max_value", "signed"],
    "countdown": ["min_numbers", "max_numbers", "max_number", "max_target"],
}


def register(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    train = tok_sub.add_parser(
        "train",
        help="train on text, jsonl or parquet files",
        description="Train a byte-level BPE (digits one per token) with DeepSeek's special "
        "tokens; writes tokenizer.json and tokenizer_config.json (with the chat "
        "template) that transformers.AutoTokenizer loads.",
    )
    train.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help=".txt/.md (documents split at blank lines), .jsonl or .parquet files, or directories",
    )
    train.add_argument(
        "--vocab-size", type=int, default=1024, help="vocabulary size, special tokens included (default 1024)"
    )
    train.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    train.add_argument(
        "--split-punctuation",
        action="store_true",
        help="one token per punctuation mark, as for digits (the chain task: '=-2' is '=', '-', '2')",
    )
    train.add_argument(
        "--text-field", default="text", help="field holding the text in jsonl/parquet rows (default text)"
    )
    train.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default="chat",
        help="the prompt format of the models trained with it, saved in tokenizer_config.json for "
        "chat, serve and generate: r1-zero for the `data corpus` documents (default chat)",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    train.set_defaults(func=cmd_tokenizer_train)
    tok.set_defaults(func=lambda args: _usage(tok))

    data = subparsers.add_parser("data", help="make training data")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    corpus = data_sub.add_parser(
        "corpus",
        help="write a synthetic pretraining corpus for a task",
        description="Problems in the R1-Zero template with worked, direct and terse "
        "solutions, plus plain lines of single steps (see nanoseek.data.corpus).",
    )
    corpus.add_argument("--task", default="arith", choices=sorted(TASK_FLAGS), help="task (default arith)")
    corpus.add_argument("--out", required=True, metavar="FILE", help="output .jsonl (text, kind) or .txt")
    corpus.add_argument("--docs", type=int, default=20000, help="number of documents (default 20000)")
    corpus.add_argument("--seed", type=int, default=0)
    shares = (("worked", 0.5), ("direct", 0.3), ("terse", 0.1), ("plain", 0.1), ("recall", 0.0), ("followup", 0.0))
    for kind, share in shares:
        corpus.add_argument(f"--{kind}", type=float, default=share, help=f"share of {kind} documents (default {share})")
    corpus.add_argument(
        "--preamble",
        type=float,
        default=1.0,
        help="share of problem documents that start with the R1-Zero preamble; the others start "
        "at 'User:' (default 1.0)",
    )
    _task_arguments(corpus)
    corpus.set_defaults(func=cmd_data_corpus)

    chats = data_sub.add_parser(
        "chats",
        help="write SFT conversations: a task's problems with worked solutions",
        description="jsonl rows {messages: [user, assistant]} for `nanoseek sft`: the "
        "assistant's content is the answer and its reasoning_content the worked "
        "solution (train split only).",
    )
    chats.add_argument("--task", default="arith", choices=sorted(TASK_FLAGS), help="task (default arith)")
    chats.add_argument("--out", required=True, metavar="FILE", help="output .jsonl")
    chats.add_argument("--conversations", type=int, default=2000, help="number of conversations (default 2000)")
    chats.add_argument("--seed", type=int, default=0)
    _task_arguments(chats)
    chats.set_defaults(func=cmd_data_chats)
    data.set_defaults(func=lambda args: _usage(data))


def _task_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("arith options")
    group.add_argument("--min-ops", type=int, help="fewest operations in a problem (default 2)")
    group.add_argument("--max-ops", type=int, help="most operations in a problem (default 6)")
    group.add_argument("--min-operand", type=int, help="smallest operand (default 1)")
    group.add_argument("--max-operand", type=int, help="largest operand (default 5)")
    group.add_argument("--ops", help="operators to use, from '+-*' (default '+-')")
    group = p.add_argument_group("chain options")
    group.add_argument("--min-values", type=int, help="fewest named values in a problem (default 2)")
    group.add_argument("--max-values", type=int, help="most named values in a problem (default 7)")
    group.add_argument("--min-value", type=int, help="smallest value (default 1)")
    group.add_argument("--max-value", type=int, help="largest value (default 5)")
    group.add_argument("--signed", action="store_true", default=None, help="signed values added up (a=3,b=-1. a+b)")
    group = p.add_argument_group("countdown options")
    group.add_argument("--min-numbers", type=int, help="fewest numbers to combine (default 3)")
    group.add_argument("--max-numbers", type=int, help="most numbers to combine (default 4)")
    group.add_argument("--max-number", type=int, help="largest given number (default 99)")
    group.add_argument("--max-target", type=int, help="largest target (default 100)")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_tokenizer_train(args) -> int:
    from nanoseek.data.stream import iter_documents
    from nanoseek.data.tokenizer import train_tokenizer

    texts = iter_documents(args.input, args.text_field)
    tokenizer = train_tokenizer(
        texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency, split_punctuation=args.split_punctuation
    )
    out = tokenizer.save_pretrained(args.out, prompt_format=args.prompt_format)
    print(
        f"wrote {out}/tokenizer.json and tokenizer_config.json: {tokenizer.vocab_size} tokens, "
        f"{args.prompt_format} prompt format"
    )
    return 0


def _task(args):
    """The task of `--task` with the options given on the command line."""
    from nanoseek import tasks

    chosen = {k: getattr(args, k) for k in TASK_FLAGS[args.task] if getattr(args, k) is not None}
    others = [
        k for name, flags in TASK_FLAGS.items() if name != args.task for k in flags if getattr(args, k) is not None
    ]
    if others:
        raise NanoseekError(f"--{others[0].replace('_', '-')} is an option of another task than {args.task}")
    return tasks.get(args.task, **chosen)


def cmd_data_corpus(args) -> int:
    from nanoseek.data.corpus import check_mix, corpus, write_corpus

    if args.docs < 1:
        raise NanoseekError(f"--docs {args.docs}: must be at least 1")
    task = _task(args)
    mix = {k: getattr(args, k) for k in ("worked", "direct", "terse", "plain", "recall", "followup")}
    try:  # the flags' defaults add up to 1: a share raised means another lowered
        check_mix(mix)
    except NanoseekError as e:
        raise NanoseekError(f"{e} ({' '.join(f'--{k} {v:g}' for k, v in mix.items() if v)})") from None
    mix = {k: v for k, v in mix.items() if v}
    counts = write_corpus(args.out, corpus(task, args.docs, seed=args.seed, mix=mix, preamble=args.preamble))
    print(f"wrote {sum(counts.values())} documents to {args.out}: " + ", ".join(f"{counts[k]} {k}" for k in mix))
    return 0


def cmd_data_chats(args) -> int:
    import json
    from pathlib import Path

    from nanoseek.data.corpus import worked_conversations

    if args.conversations < 1:
        raise NanoseekError(f"--conversations {args.conversations}: must be at least 1")
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise NanoseekError(f"{out}: conversations are written as .jsonl")
    task = _task(args)
    rows = list(worked_conversations(task, args.conversations, seed=args.seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} {args.task} conversations to {out}")
    return 0
