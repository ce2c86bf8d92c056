"""``xtoken align``: show how two tokenizers' tokens of one text pair up into chunks."""

from __future__ import annotations

import argparse
import json
import sys


def add_align_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "align",
        help="align the student's and the teacher's tokens of a text and print the chunks",
        description=(
            "Tokenize TEXT with both tokenizers and print the chunk pairs: student token span "
            "[start, end), teacher token span [start, end) and the chunk's text. A chunk with an "
            "empty span on one side is a gap (e.g. Llama-3's <|begin_of_text|>, which Qwen3 lacks)."
        ),
    )
    p.add_argument(
        "--student", required=True, help="student tokenizer: built-in name (llama3, qwen3, phi4mini, o200k) or path"
    )
    p.add_argument("--teacher", required=True, help="teacher tokenizer: built-in name or path")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to align")
    src.add_argument("--text-file", help="read the text from this file (UTF-8)")
    p.add_argument(
        "--method", choices=("auto", "exact", "dp"), default="auto", help="alignment path (default: auto = exact)"
    )
    bos = p.add_mutually_exclusive_group()
    bos.add_argument(
        "--bos",
        dest="add_bos",
        action="store_true",
        default=None,
        help="add BOS on both sides (where a tokenizer has one)",
    )
    bos.add_argument(
        "--no-bos",
        dest="add_bos",
        action="store_false",
        help="add BOS on neither side (default: each family's convention)",
    )
    p.add_argument("--eos", action="store_true", help="append each side's EOS")
    p.add_argument("--json", action="store_true", help="print a JSON list of {student, teacher, text}")
    p.set_defaults(func=run_align)
    return p


def run_align(args) -> int:
    from xtoken_nemo.align.api import align_text
    from xtoken_nemo.errors import XTokenError
    from xtoken_nemo.tokenizers import load_tokenizer

    try:
        if args.text is not None:
            text = args.text
        else:
            try:
                with open(args.text_file, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                print(f"error: cannot read --text-file {args.text_file}: {exc}", file=sys.stderr)
                return 2
        student, teacher = load_tokenizer(args.student), load_tokenizer(args.teacher)
        add_bos = args.add_bos
        s_bos = None if add_bos is None else (add_bos and "bos" in student.special_ids)
        t_bos = None if add_bos is None else (add_bos and "bos" in teacher.special_ids)
        aligned = align_text(
            text, student, teacher, method=args.method, add_bos=s_bos, add_eos=args.eos, teacher_add_bos=t_bos
        )
    except XTokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records = aligned.records()
    if args.json:
        print(json.dumps(records, ensure_ascii=False))
        return 0
    al = aligned.alignment
    print(
        f"{student.name} ({len(aligned.student_ids)} tokens) vs {teacher.name} ({len(aligned.teacher_ids)} tokens): "
        f"{len(al)} chunks, {int(al.matched_mask.sum())} matched, {al.num_gaps} gaps"
        + (f", {al.num_mismatches} mismatches" if al.num_mismatches else "")
        + f" [{al.method}]"
    )
    for k, (rec, matched) in enumerate(zip(records, al.matched_mask.tolist())):
        (s0, s1), (t0, t1) = rec["student"], rec["teacher"]
        if s0 == s1 or t0 == t1:
            ids = aligned.student_ids[s0:s1] if t0 == t1 else aligned.teacher_ids[t0:t1]
            tok = student if t0 == t1 else teacher
            label = (
                "gap "
                + " ".join(tok.token_text(i) for i in ids)
                + (" (student only)" if t0 == t1 else " (teacher only)")
            )
        elif not matched:
            label = "mismatch " + repr(rec["text"])
        else:
            label = (
                repr(rec["text"])
                if rec["text"]
                else "special "
                + student.token_text(aligned.student_ids[s0])
                + " = "
                + teacher.token_text(aligned.teacher_ids[t0])
            )
        print(f"{k:5d}  S[{s0}:{s1}]  T[{t0}:{t1}]  {label}")
    return 0
