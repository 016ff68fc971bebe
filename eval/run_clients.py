"""The shipped pair's answers through each client people use, beside `impq eval`'s, written to
eval/results/clients.json and .md.

    python eval/run_clients.py [--per-type 10] [--llama-cpp-bin DIR]     # about a minute on 2 cores

imp-tiny is exported as its F16 GGUF pair; the first `--per-type` items of each question type of the shipped
eval split go through impq's own runner (`impq eval`), llama-cpp-python's high-level chat API
(MTMDChatHandler), llama-cpp-python's OpenAI-compatible server on 127.0.0.1 and, where llama.cpp's tools are
built (../shared/tools/build-llama-cpp-tools.sh; `--llama-cpp-bin` or IMPQ_LLAMA_CPP_BIN), llama.cpp's
llama-server and llama-mtmd-cli. Every client is sent the image file and the question alone: the GGUF's chat
template builds Imp's prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import llama_cpp

from impq import __version__
from impq.defaults import REPO, default_eval_data, default_model_dir
from impq.export.pair import export_pair
from impq.measure.clients import answers_llama_cpp_python, answers_mtmd_cli, answers_openai, openai_server
from impq.measure.vqa import GGUFAnswerer, evaluate, first_per_type, normalize_answer, read_vqa_jsonl
from impq.models.layouts import read_spec

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-type", type=int, default=10)
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("IMPQ_LLAMA_CPP_BIN"))
    args = parser.parse_args()
    items = first_per_type(read_vqa_jsonl(default_eval_data()), args.per_type)
    tools = Path(args.llama_cpp_bin) if args.llama_cpp_bin else None

    with tempfile.TemporaryDirectory() as scratch:
        pair = export_pair(read_spec(default_model_dir()), Path(scratch), "f16")
        text, mmproj = pair.text_path, pair.mmproj_path
        with GGUFAnswerer(text, mmproj) as answerer:
            report = evaluate(answerer, items, model="imp-tiny F16", dataset="eval")
        answers = {"impq eval": [r["prediction"] for r in report.items],
                   "llama-cpp-python Llama + MTMDChatHandler": answers_llama_cpp_python(text, mmproj, items)}
        with openai_server(text, mmproj) as url:
            answers["llama_cpp.server (OpenAI API)"] = answers_openai(url, items)
        if tools is not None and (tools / "llama-server").is_file():
            with openai_server(text, mmproj, llama_server=tools / "llama-server") as url:
                answers["llama.cpp llama-server (OpenAI API)"] = answers_openai(url, items)
        if tools is not None and (tools / "llama-mtmd-cli").is_file():
            answers["llama.cpp llama-mtmd-cli"] = answers_mtmd_cli(tools / "llama-mtmd-cli", text, mmproj, items)
    answers = {client: [normalize_answer(a) for a in got] for client, got in answers.items()}

    reference = answers["impq eval"]
    summary = {client: {"same_as_impq_eval": sum(a == b for a, b in zip(got, reference)),
                        "correct": sum(normalize_answer(i.answer) == a for i, a in zip(items, got)), "n": len(items)}
               for client, got in answers.items()}
    record = {"model": "imp-tiny (shipped), F16 GGUF pair", "dataset": str(default_eval_data().relative_to(REPO)),
              "items": len(items), "impq": __version__, "llama_cpp_python": llama_cpp.__version__,
              "decoding": "greedy (temperature 0), repeat penalty 1.0, at most 6 tokens", "summary": summary,
              "answers": [{"image": str(item.image.relative_to(REPO)), "question": item.question, "answer": item.answer,
                           "type": item.type, **{client: got[i] for client, got in answers.items()}}
                          for i, item in enumerate(items)]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "clients.json").write_text(json.dumps(record, indent=2) + "\n")
    clients = list(answers)
    lines = ["# The shipped pair through each client", "",
             f"imp-tiny's F16 GGUF pair, {len(items)} items of the shapes eval split ({args.per_type} per question "
             f"type); {record['decoding']}; impq {__version__}, llama-cpp-python {llama_cpp.__version__}. Every "
             "client gets the image file and the question alone; the GGUF's chat template builds the prompt. "
             "Produced by `python eval/run_clients.py`.", "",
             "| client | same answer as impq eval | correct |", "|---|---|---|"]
    for client, row in summary.items():
        lines.append(f"| {client} | {row['same_as_impq_eval']}/{row['n']} | {row['correct']}/{row['n']} |")
    lines += ["", "| question | expected | " + " | ".join(clients) + " |", "|---|---|" + "---|" * len(clients)]
    for row in record["answers"]:
        lines.append(f"| {row['question']} | {row['answer']} | " + " | ".join(row[c] for c in clients) + " |")
    (RESULTS / "clients.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(summary)]))


if __name__ == "__main__":
    main()
