"""A projection, not a measurement: what speculation through a pipeline of four Raspberry
Pi 5s would give, from the cost model (``orchcore/speculation/cost.py``), published
per-device numbers, and the acceptance measured here.

    python bench/pi_projection.py

Inputs (``shared`` anchors, as published):

- one Pi 5 runs Llama 3.1 8B (Q4_K_M, about 4.6 bits a weight) at 2.17 tok/s, and
  Qwen3-30B-A3B at 2.70 bits a weight at 7.99 tok/s: each gives the bytes a second one Pi
  streams for that kind of model, which sets its time per token at Q4_0 (4.5 bits);
- the cost of one more row in a batch, from llama.cpp's Llama 3.2 3B on a Pi 5 (CM5):
  tg128 6.07 and pp512 15.1 tok/s, so a row past the first costs r = 6.07 / 15.1 = 0.40 of
  a step: c(n) = 1 + (n - 1) r for a dense model;
- a mixture of experts reads the experts every row picks: with 8 of 128 per token and
  independent routing (an upper bound: neighbouring tokens share experts), n rows read
  128 (1 - (1 - 8/128)^n) experts, so the expert share of the bytes grows with that;
- 1 GbE at 941 Mb/s and an assumed 0.25 ms per hop, four hops a pass (three stages on,
  and the token ring back), hidden states in q8_0 (1.06 bytes a value);
- acceptance of prompt lookup with k = 4 as measured on this project's three bench tasks
  (``docs/benchmarks.md``, "Speculation through the pipeline").

The plain pipeline takes one Pi's time for the whole model per token (the stages take
turns) plus the hops. Beside it, distributed-llama's published numbers on four Pi 5s, which
split every layer across the nodes and so use all four memory buses for one token.
"""

from __future__ import annotations

from dataclasses import dataclass

from _common import console
from rich.table import Table

from orchcore.modelgen import ModelSpec, preset
from orchcore.speculation.cost import (
    PassCosts,
    choose_draft_length,
    predicted_speedup,
)

Q4_0_BYTES = 18 / 32  # bytes a weight
ROW_COST = 6.07 / 15.1  # one more row of a batch, in steps (Pi 5, Llama 3.2 3B)
HOP_MS = 0.25  # assumed latency of one hop on a home LAN
LINK_BYTES_S = 941e6 / 8
STAGES = 4
TASKS = {"copy with an edit": 0.76, "code": 0.56, "free chat": 0.31}  # measured, k = 4


@dataclass(frozen=True)
class Shape:
    name: str
    spec: ModelSpec
    published: str  # distributed-llama on four Pi 5s
    per_pi: tuple[float, float]  # one Pi 5: tok/s at bits a weight (published)

    def params(self, rows: int = 1) -> tuple[float, float]:
        """Weights one pass of ``rows`` reads: (shared, experts), the head included."""
        s = self.spec
        attention = 2 * s.n_embd * s.n_embd + 2 * s.n_embd * s.n_embd_kv
        if s.n_expert:
            used = s.n_expert * (1 - (1 - s.n_expert_used / s.n_expert) ** rows)
            experts = s.n_layers * used * 3 * s.n_embd * s.n_ff_exp
        else:
            attention += 3 * s.n_embd * s.n_ff
            experts = 0.0
        return s.n_layers * attention + s.n_vocab * s.n_embd, experts

    def step_s(self) -> float:
        """One token through the whole model on one Pi 5, at Q4_0."""
        rate, bits = self.per_pi
        streamed = sum(self.params()) * bits / 8 * rate  # bytes a second, fitted
        return sum(self.params()) * Q4_0_BYTES / streamed

    def batch_cost(self, rows: int) -> float:
        shared, experts = self.params(1)
        grown = self.params(rows)[1] / experts if experts else 1.0
        dense = 1 + (rows - 1) * ROW_COST
        return (shared * dense + experts * max(grown, dense)) / (shared + experts)


SHAPES = [
    Shape("Llama 3.1 8B (dense)", preset("llama3.1-8b"), "4.08 (Llama 3 8B Q40)",
          (2.17, 4.6)),
    Shape("Qwen3-30B-A3B (MoE)", preset("qwen3moe-30b-a3b"), "15.1 (Q40)", (7.99, 2.70)),
]


def main() -> None:
    out = console()
    out.print("[bold]A projection from published numbers and the cost model, not a "
              "measurement[/]")
    table = Table(title=f"{STAGES} Raspberry Pi 5s in a pipeline, 1 GbE; prompt lookup")
    for col in ("model", "c(2) c(5) c(9)", "plain tok/s", "task (a)", "best K",
                "sync tok/s (same K)", "ahead tok/s", "x", "distributed-llama tok/s"):
        table.add_column(col, justify="right")
    for shape in SHAPES:
        step_ms = shape.step_s() * 1e3
        hop = HOP_MS + shape.spec.n_embd * 1.0625 / LINK_BYTES_S * 1e3
        costs = PassCosts({n: shape.batch_cost(n) for n in (2, 3, 5, 9, 17)},
                          step_ms=step_ms, link_ms=STAGES * hop)
        plain = 1e3 / (step_ms + costs.link_ms)
        for i, (task, a) in enumerate(TASKS.items()):
            k = choose_draft_length(a, costs, stages=STAGES)  # the model's best K; 0: off
            sync = plain * predicted_speedup(a, k, costs)
            ahead = plain * predicted_speedup(a, k, costs, stages=STAGES)
            table.add_row(shape.name if i == 0 else "",
                          " ".join(f"{costs.rows_cost(n):.2f}" for n in (2, 5, 9))
                          if i == 0 else "",
                          f"{plain:.2f}" if i == 0 else "", f"{task} ({a})", str(k or "off"),
                          f"{sync:.2f}", f"{ahead:.2f}", f"{ahead / plain:.2f}",
                          shape.published if i == 0 else "")
        out.print(f"{shape.name}: one Pi 5's token at Q4_0 {step_ms:.0f} ms (fitted)")
    out.print(table)


if __name__ == "__main__":
    main()
