"""Connected workers: a client for each and what each reported about its machine; the
step from a plan to a running model (``open``).

    cluster = Cluster.connect(addresses, token, settings)   # Info, round trips
    cluster.measure_speeds(facts)                            # optional: the probe
    plan = make_plan(facts, cluster.devices, options)        # pure; show it
    model = cluster.open(plan, facts, tokenizer)             # deploy; a RunningModel

With ``failover=True`` the model gets a ``Replanner`` over every connected worker: one
that fails mid-answer is replaced by a standby (a worker the plan left out) or the model is
re-cut over the rest (``orchestrator/pipeline/failover.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from orchcore.cpu import host_id
from orchcore.devices import DeviceFacts
from orchcore.errors import InvalidInputError, MemoryBudgetError, OrchError
from orchcore.facts import ModelFacts
from orchcore.probe import layer_shape
from orchestrator.cluster.client import WorkerClient
from orchestrator.pipeline.deploy import DeployProgress, FromSource
from orchestrator.pipeline.drafting import HostDraft
from orchestrator.pipeline.embedding import pooling_of
from orchestrator.pipeline.failover import Replanner
from orchestrator.pipeline.session import RunningModel
from orchestrator.planning.plan import Plan, PlanOptions
from orchestrator.planning.speeds import SpeedBook
from orchestrator.settings import OrchSettings
from orchestrator.text.tokenizer import Tokenizer

LINK_PAYLOAD_BYTES = 256 << 10  # measures each worker's bandwidth when connecting
LOOPBACK_LINK_S = 0.001  # a worker on the orchestrator's own machine: one whole millisecond
REFINE_BEYOND = 0.25  # relative difference between a run's speed and the probe's that counts


class Cluster:
    """Connected workers: a client for each, and what each reported about its machine."""

    def __init__(self, clients: list[WorkerClient], devices: list[DeviceFacts], token: str | None,
                 settings: OrchSettings, alive: Callable[[], None] | None) -> None:
        self.clients = clients
        self.devices = devices
        self.token = token
        self.settings = settings
        self.alive = alive

    @classmethod
    def connect(cls, addresses: Sequence[str], token: str | None, settings: OrchSettings,
                alive: Callable[[], None] | None = None) -> Cluster:
        clients = [WorkerClient(a, token, settings) for a in addresses]
        here = host_id()
        try:
            devices = []
            for c in clients:
                device = c.check_protocol().device(c.address)
                if device.host_id == here:
                    # On this machine every link is the same loopback: a measurement would
                    # only add jitter, which could re-cut the model and send shards again.
                    devices.append(replace(device, link_s=LOOPBACK_LINK_S))
                    continue
                rtt, bandwidth = c.measure_link(LINK_PAYLOAD_BYTES)
                # Whole milliseconds: jitter must never reorder two workers on one switch
                # (that would re-cut the model and send shards again).
                devices.append(replace(device, link_s=math.ceil(rtt * 1e3) / 1e3,
                                       bandwidth_bytes_s=bandwidth))
        except BaseException:
            for c in clients:
                c.close()
            raise
        return cls(clients, devices, token, settings, alive)

    def measure_speeds(self, facts: ModelFacts, book: SpeedBook | None = None
                       ) -> list[OrchError]:
        """Each worker's time per layer on this model's shape: refined by earlier runs
        (``book``), else timed by the worker's probe (cached by the worker).

        A worker that cannot take the probe (too small for even one of the model's layers,
        or refusing the shape) stays untimed, as the planner takes a worker nothing measured,
        and its refusal is returned: a small worker is never the end of a run."""
        shape = layer_shape(facts)
        devices, untimed = [], []
        for device, client in zip(self.devices, self.clients, strict=True):
            try:
                probed = client.probe(shape)
            except (MemoryBudgetError, InvalidInputError) as exc:
                untimed.append(exc)
                devices.append(device)
                continue
            speed = probed.decode_s_per_layer
            known = book.speed(device, shape.key) if book else None
            # Runs refine the probe's figure only when they disagree beyond noise, so the
            # same cluster keeps the same plan (and its workers their cached shards).
            if known is not None and abs(known / speed - 1) > REFINE_BEYOND:
                speed = known
            devices.append(replace(device, decode_s_per_layer=speed,
                                   prefill_s_per_layer=probed.prefill_s_per_token_per_layer))
        self.devices = devices
        return untimed

    def open(self, plan: Plan, facts: ModelFacts, tokenizer: Tokenizer,
             progress: DeployProgress | None = None, *, force: bool = False,
             source: FromSource | None = None,
             options: PlanOptions | None = None, failover: bool = False,
             draft: HostDraft | None = None) -> RunningModel:
        """Deploy ``plan`` (made for ``self.devices`` with ``options``) and open its data
        path; with ``source``, the workers fetch their slices from it. With ``failover`` a
        worker that fails mid-answer is replaced (planning again with the same ``options``,
        default the settings'); without it the failure is the caller's error. ``draft``:
        the draft model of ``--speculate draft:MODEL`` (the caller closes it)."""
        replanner = Replanner(self.clients, self.devices, facts,
                              options or self.settings.plan_options(), self.token,
                              self.settings, self.alive, source)
        pipeline = replanner.open(plan, progress, force=force)
        return RunningModel(plan, tokenizer, pipeline.path, self.settings,
                            pipeline.deployment, replanner if failover else None,
                            pooling_of(facts), draft)

    def close(self) -> None:
        for c in self.clients:
            c.close()
