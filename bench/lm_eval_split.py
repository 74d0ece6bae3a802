"""A split model scores a multiple-choice task exactly as the same model on one stage.

    python bench/lm_eval_split.py                 # replays lm-evaluation-harness's requests
    python bench/lm_eval_split.py --harness       # runs lm-evaluation-harness itself

``orch serve`` runs SmolLM2-135M twice on local workers: split over two stages, and whole
on one. Each server is asked lm-evaluation-harness's ``local-completions`` loglikelihood
requests for ``bench/lm_eval/capitals.jsonl`` (12 questions, 4 choices each): the context
and one choice as token ids, ``echo: true``, ``logprobs: 1``, ``max_tokens: 1``,
``temperature: 0``; a choice's log-likelihood is the sum of ``token_logprobs[ctxlen:-1]``
and it is greedy when each of those tokens is its row's best (the harness's
``parse_logprobs``). Per item and choice, the two servers' log-likelihoods must be equal;
accuracy (``acc``, and ``acc_norm`` by the choices' byte lengths) is reported for both.

The default replays those requests (the harness's payload and parsing, with the model's own
tokenizer from its GGUF), which needs nothing beyond orch. ``--harness`` runs ``lm_eval``
with ``local-completions`` and the task in ``bench/lm_eval/capitals.yaml`` instead; it needs
``pip install lm-eval transformers`` (and torch), and a Hugging Face tokenizer folder, which
is made from the GGUF with transformers' ``gguf_file``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _common import console, get_model, print_header
from rich.table import Table

from orchestrator.serve.app import create_app
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer
from testkit.cluster import open_model, worker_server
from tests.test_serve_clients import running

HERE = Path(__file__).parent / "lm_eval"
TASK = HERE / "capitals.jsonl"


@contextmanager
def served(model: Path, stages: int, workdir: Path) -> Iterator[str]:
    """``orch serve`` over ``stages`` local workers; its base URL."""
    with contextlib.ExitStack() as stack:
        addresses = [stack.enter_context(worker_server(workdir / f"w{i}"))
                     for i in range(stages)]
        opened = stack.enter_context(open_model(model, addresses, None, workdir / "orch",
                                                codec="f32", context_tokens=256))
        yield stack.enter_context(running(create_app(opened, "smollm2", OrchSettings.load())))


def items() -> list[dict]:
    return [json.loads(line) for line in TASK.read_text().splitlines() if line.strip()]


def loglikelihood(base: str, context: list[int], continuation: list[int]
                  ) -> tuple[float, bool]:
    """One request as lm-evaluation-harness's ``local-completions`` sends it, parsed as it
    parses it."""
    payload = {"model": "smollm2", "prompt": [context + continuation], "temperature": 0,
               "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    request = urllib.request.Request(f"{base}/v1/completions", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        choice = json.load(reply)["choices"][0]["logprobs"]
    ctxlen = len(context)
    scores = choice["token_logprobs"][ctxlen:-1]
    greedy = all(score == max(top.values()) for score, top in
                 zip(scores, choice["top_logprobs"][ctxlen:-1], strict=True))
    return sum(scores), greedy


def replay(base: str, tokenizer: Tokenizer) -> list[list[float]]:
    """Every item's choices' log-likelihoods, by replaying the harness's requests: the
    context and each whole (context, a space, the choice) tokenized without BOS (the
    harness's ``add_bos_token`` is off), the continuation the whole's ids after the
    context's."""
    def tokenize(text: str) -> list[int]:
        return tokenizer.encode(text, add_special=False)

    out = []
    for item in items():
        context = f"Question: {item['question']}\nAnswer:"
        whole_ids = [tokenize(context + " " + c) for c in item["choices"]]
        context_ids = tokenize(context)
        out.append([loglikelihood(base, context_ids, ids[len(context_ids):])[0]
                    for ids in whole_ids])
    return out


def accuracy(scores: list[list[float]]) -> tuple[float, float]:
    acc = norm = 0
    for item, row in zip(items(), scores, strict=True):
        acc += max(range(len(row)), key=row.__getitem__) == item["answer"]
        lengths = [len((" " + c).encode()) for c in item["choices"]]
        norm += max(range(len(row)), key=lambda i: row[i] / lengths[i]) == item["answer"]
    return acc / len(scores), norm / len(scores)


def harness(base: str, tokenizer_dir: Path, out_dir: Path) -> dict:
    """lm-evaluation-harness itself against ``base``: its results JSON."""
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions",
                    "--model_args", f"base_url={base}/v1/completions,model=smollm2,"
                    f"tokenizer={tokenizer_dir},tokenizer_backend=huggingface,"
                    f"tokenized_requests=True,num_concurrent=1",
                    "--include_path", str(HERE), "--tasks", "orch_capitals",
                    "--log_samples", "--output_path", str(out_dir)], check=True)
    return json.loads(next(out_dir.rglob("results_*.json")).read_text())


def hf_tokenizer(model: Path, folder: Path) -> Path:
    """A Hugging Face tokenizer folder made from the GGUF (transformers' ``gguf_file``)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name).save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--harness", action="store_true",
                    help="run lm-evaluation-harness itself (needs lm-eval, transformers)")
    args = ap.parse_args()
    out = console()
    print_header(out, "lm-evaluation-harness: split against one stage")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = get_model("135m", work)
        results = {}
        for stages in (2, 1):
            with served(model.path, stages, work / f"s{stages}") as base:
                if args.harness:
                    results[stages] = harness(base, hf_tokenizer(model.path, work / "hf"),
                                              work / f"out{stages}")
                    continue
                with Tokenizer.from_gguf(model.path) as tokenizer:
                    results[stages] = replay(base, tokenizer)
        if args.harness:
            out.print_json(data={f"{k} stages": v["results"] for k, v in results.items()})
            return
        split, whole = results[2], results[1]
        table = Table("item", "split (2 stages)", "whole (1 stage)", "equal")
        for i, (a, b) in enumerate(zip(split, whole, strict=True)):
            table.add_row(str(i), " ".join(f"{x:.4f}" for x in a),
                          " ".join(f"{x:.4f}" for x in b), "yes" if a == b else "NO")
        out.print(table)
        for name, scores in (("split", split), ("whole", whole)):
            acc, norm = accuracy(scores)
            out.print(f"{name}: acc {acc:.3f}, acc_norm {norm:.3f}")
        if split != whole:
            raise SystemExit("the split model's log-likelihoods differ from one stage's")
        out.print("every log-likelihood is equal: the split is lossless on this task")



if __name__ == "__main__":
    main()
