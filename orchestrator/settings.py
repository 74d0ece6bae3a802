"""Settings of the orchestrator: every default of ``orch run`` and the plan, in one class.

``ORCH_*`` variables set them (``ORCH_CONTEXT_TOKENS=4096``), ``orch run`` flags override
them, and their defaults are the engine's and the sampler's own (``orchcore.config``,
``orchcore.sampling``), so a value has one default whether it comes from the CLI, the
plan or a worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchcore.codecs import CODEC_NAMES
from orchcore.config import (
    MAX_BATCH_TOKENS,
    MAX_CONTEXT_TOKENS,
    MAX_OUTPUT_ROWS,
    MAX_SESSIONS,
    EngineConfig,
)
from orchcore.errors import InvalidSettingError, describe_validation
from orchcore.sampling import MAX_REPEAT_LAST_N, MAX_TOP_K, RANDOM_SEED, SamplingParams
from orchcore.speculation.mode import DEFAULT_K, SpeculationMode, parse_mode
from orchestrator.planning.plan import DEFAULT_HORIZON_TOKENS, Objective, PlanOptions

_ENGINE = EngineConfig()
_SAMPLING = SamplingParams()


class OrchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="forbid", frozen=True)

    # --- the plan and each stage's engine ----------------------------------------------
    fetch: Literal["auto", "workers", "orchestrator"] = Field(
        "auto", description="Where the bytes of a model given by URL, hf:// or registry name "
        "come from when this machine lacks the file: auto = each worker fetches only its own "
        "slice from the source, and workers that cannot reach it get their shard from here; "
        "workers = only that; orchestrator = download the whole file here first")
    codec: str = Field("f32", description="Hidden states on the wire: f32 (exact), f16 "
                                          "(half the bytes), q8_0 (3.8x fewer bytes).")
    context_tokens: int = Field(_ENGINE.context_tokens, ge=16, le=MAX_CONTEXT_TOKENS,
                                description="Context length of a session, in tokens.")
    max_sessions: int = Field(_ENGINE.max_sessions, ge=1, le=MAX_SESSIONS,
                              description="Sessions each stage holds a KV cache for at once.")
    batch_tokens: int = Field(_ENGINE.batch_tokens, ge=1, le=MAX_BATCH_TOKENS,
                              description="Prompt tokens per chunk sent down the pipeline.")
    logprob_rows: int = Field(_ENGINE.output_rows, ge=1, le=MAX_OUTPUT_ROWS,
                              description="Most prompt rows one chunk asks the last stage "
                                          "to score (prompt logprobs) or return "
                                          "(embeddings): a prompt asking for them goes in "
                                          "chunks of at most this many tokens.")
    objective: Objective = Field("latency", description="What the plan optimises: latency "
                                 "(one stream's time per token; may leave slow workers out) "
                                 "or throughput (the slowest stage, for many sessions).")
    replan: bool = Field(False, description="Cut the model anew even when the cut the "
                                            "workers hold is the better deal (sends their "
                                            "shards again).")
    replan_horizon_tokens: int = Field(
        DEFAULT_HORIZON_TOKENS, ge=0, le=1 << 40, description="Tokens a plan is expected to "
        "serve: a new cut that moves shards must win back their transfer within them.")
    probe: bool = Field(True, description="Time each listed or discovered worker on a few "
                                          "of the model's layers before planning (cached "
                                          "per worker and shape).")
    threads: int = Field(0, ge=0, le=1024,
                         description="llama.cpp threads per worker; 0 = all its cores (local "
                                     "workers: this machine's cores shared among them).")
    local_workers: int = Field(2, ge=1, le=16, description="Worker processes to start on "
                                                           "this machine without --workers.")
    token: SecretStr | None = Field(None, description="Cluster token of the workers.")
    plaintext: bool = Field(
        False, description="Accept workers that answer without TLS (started with "
                           "ORCH_WORKER_PLAINTEXT) beyond loopback. Only on a network you "
                           "trust: the token and all data then cross it in the clear.")
    discovery: str = Field("auto", description="Find workers with zeroconf: auto (LAN "
                           "interfaces, never containers or bridges), off, or an interface "
                           "name (eth0, wlan0, lo).")
    discovery_timeout_s: float = Field(2.0, gt=0, le=60, description="How long to listen "
                                       "for workers' announcements.")

    # --- generation ----------------------------------------------------------------------
    max_tokens: int = Field(256, ge=1, le=1 << 20, description="Most tokens to generate.")
    token_ring: bool = Field(True, description="The last stage sends each sampled token "
                             "straight to stage 0 and this machine only listens (one hop "
                             "less per token); off: every token goes through here.")
    speculate: str = Field("off", description="Speculative decoding: off; ngram (or "
                           "ngram:K) drafts K tokens per pass by prompt lookup and the last "
                           "stage verifies them in one batch; auto picks K per answer from "
                           "measured batch costs and acceptance, off when it would not pay; "
                           f"draft:MODEL drafts {DEFAULT_K} per pass with a small model of "
                           "the same vocabulary (a .gguf file or a known model's name) run on "
                           "this machine; early:K drafts the same way with the model's own "
                           "first K layers and its head (cut here once).")
    speculate_ahead: bool = Field(True, description="With --speculate and the token ring: "
                                  "the last stage sends the next pass to stage 0 before its "
                                  "verdict on the current one, betting that every draft is "
                                  "kept, so the stages work at once (a lost bet costs only "
                                  "work the idle stages did); off: one pass at a time.")
    temperature: float = Field(_SAMPLING.temperature, ge=0.0, description="0 = greedy.")
    top_k: int = Field(_SAMPLING.top_k, ge=0, le=MAX_TOP_K, description="0 = off.")
    top_p: float = Field(_SAMPLING.top_p, gt=0.0, le=1.0, description="1 = off.")
    min_p: float = Field(_SAMPLING.min_p, ge=0.0, le=1.0, description="0 = off.")
    repeat_penalty: float = Field(_SAMPLING.repeat_penalty, gt=0.0, description="1 = off.")
    repeat_last_n: int = Field(_SAMPLING.repeat_last_n, ge=0, le=MAX_REPEAT_LAST_N,
                               description="Tokens the repeat penalty looks back on.")
    seed: int = Field(_SAMPLING.seed, ge=0, le=RANDOM_SEED,
                      description=f"Sampling seed; {RANDOM_SEED} = a random one (each "
                                  f"answer records the seed it used).")

    # --- orch serve ----------------------------------------------------------------------
    serve_host: str = Field("127.0.0.1", description="Address orch serve listens on; "
                            "0.0.0.0 for every interface (then set an API key).")
    serve_port: int = Field(8080, ge=1, le=65535, description="Port of orch serve.")
    api_key: SecretStr | None = Field(None, description="Key clients of orch serve must "
                                      "send (Authorization: Bearer KEY); none = open.")
    serve_queue: int = Field(16, ge=0, le=10_000, description="Requests that may wait for "
                             "a free session; more are refused with 429.")
    serve_queue_wait_s: float = Field(30.0, gt=0, le=3600, description="Longest a request "
                                      "waits for a free session before it gets 429.")
    serve_tls: Literal["self-signed"] | None = Field(
        None, description="self-signed: serve HTTPS with a certificate made once and kept in "
                          "orch's cache (its fingerprint is printed for clients to pin).")
    serve_tls_cert: Path | None = Field(None, description="Serve HTTPS with this PEM "
                                        "certificate (chain); needs --tls-key.")
    serve_tls_key: Path | None = Field(None, description="The PEM private key of "
                                       "--tls-cert.")
    serve_max_body_bytes: int = Field(4 << 20, ge=1024, le=1 << 30, description="Largest "
                                      "request body orch serve reads, in bytes; a bigger one "
                                      "gets 413 unread.")

    # --- deadlines -----------------------------------------------------------------------
    info_deadline_s: float = Field(5.0, gt=0, description="Deadline of a worker's Info call.")
    load_deadline_s: float = Field(300.0, gt=0, description="Deadline of loading a shard.")
    upload_min_mib_s: float = Field(1.0, gt=0, description="Slowest accepted shard upload; "
                                                           "sets the upload deadline.")
    step_deadline_s: float = Field(600.0, gt=0, description="Longest wait for one step's "
                                   "result while every worker still answers.")
    probe_interval_s: float = Field(1.0, gt=0, description="How often a waiting step checks "
                                                           "that every worker is alive.")
    subscribe_deadline_s: float = Field(10.0, gt=0, description="Longest wait for the last "
                                        "stage to open its results stream.")
    probe_deadline_s: float = Field(2.0, gt=0, description="Deadline of each liveness probe.")
    cleanup_deadline_s: float = Field(2.0, gt=0, description="Deadline of each call that "
                                      "tidies workers up after a run or a failure.")
    lease_renew_s: float = Field(5.0, gt=0, le=25, description="How often the orchestrator "
                                 "renews its lease on each stage (leases lapse after 30 s).")
    start_deadline_s: float = Field(60.0, gt=0, description="Longest wait for local workers "
                                                            "to start.")

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value not in CODEC_NAMES:
            raise ValueError(f"unknown codec {value!r}; choose one of {', '.join(CODEC_NAMES)}")
        return value

    @field_validator("speculate")
    @classmethod
    def _known_speculation(cls, value: str) -> str:
        try:
            parse_mode(value)
        except InvalidSettingError as exc:
            raise ValueError(str(exc)) from None
        return value

    @classmethod
    def load(cls, flags: Mapping[str, str] | None = None, **given: object) -> OrchSettings:
        """Environment, then the values ``given`` (None = not given); typed errors that name
        a given value by its flag (``flags``: field -> flag; else the field) and any other
        by its variable."""
        given = {k: v for k, v in given.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            names = {field: (flags or {}).get(field, field) if field in given
                     else f"ORCH_{field.upper()}" for field in cls.model_fields}
            raise InvalidSettingError(describe_validation(exc, names)) from None

    def engine(self, threads: int | None = None) -> EngineConfig:
        return EngineConfig(context_tokens=self.context_tokens, max_sessions=self.max_sessions,
                            batch_tokens=self.batch_tokens,
                            threads=self.threads if threads is None else threads,
                            output_rows=self.logprob_rows)

    def local_threads(self, cores: int) -> int:
        """llama.cpp threads of each local worker on a machine of ``cores``: ``threads`` if
        set, else the cores shared among the workers (more threads than cores in all only
        make the workers wait for each other)."""
        return self.threads or max(1, cores // self.local_workers)

    def plan_options(self, *, use_all: bool = False) -> PlanOptions:
        return PlanOptions(codec=self.codec, engine=self.engine(), objective=self.objective,
                           use_all=use_all, horizon_tokens=self.replan_horizon_tokens,
                           replan=self.replan)

    def speculation(self) -> SpeculationMode:
        return parse_mode(self.speculate)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                              repeat_last_n=self.repeat_last_n, seed=self.seed)

    @property
    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token else None


def parse_workers(text: str) -> tuple[str, ...]:
    """``--workers`` as validated ``HOST:PORT`` addresses, in order, each listed once;
    ``@FILE`` reads them from a cluster file (one per line, ``#`` comments)."""
    if text.startswith("@"):
        try:
            lines = Path(text[1:]).expanduser().read_text().splitlines()
        except OSError as exc:
            raise InvalidSettingError(f"--workers {text}: cannot read the cluster file "
                                      f"({exc.strerror})") from None
        text = ",".join(line.split("#", 1)[0].strip() for line in lines
                        if line.split("#", 1)[0].strip())
    entries = [e.strip() for e in text.split(",")]
    if not any(entries):
        raise InvalidSettingError("--workers is empty; give HOST:PORT,HOST:PORT")
    seen: set[str] = set()
    for entry in entries:
        if not entry:
            raise InvalidSettingError(f"--workers {text!r} has an empty entry; give "
                                      f"HOST:PORT,HOST:PORT with no stray commas")
        host, sep, port = entry.rpartition(":")
        if not sep or not host or host in ("[", "[]") or not port.isdigit():
            raise InvalidSettingError(f"--workers: {entry!r} is not HOST:PORT (an IPv6 host "
                                      f"goes in brackets: [::1]:50151)")
        if not 1 <= int(port) <= 65535:
            raise InvalidSettingError(f"--workers: port {port} of {entry!r} is outside "
                                      f"1..65535")
        if entry in seen:
            raise InvalidSettingError(f"--workers: {entry} is listed twice; each worker "
                                      f"runs one stage")
        seen.add(entry)
    return tuple(entries)
