"""A workload: a model architecture, its routing trace batched into steps, and the
storage format of its experts. What every engine (simulator, executor, replay) is fed."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from devices.units import ConfigError
from workloads.batching import Step, batch_steps
from workloads.catalog import ModelArch
from workloads.formats import ExpertFormat
from workloads.trace import RoutingTrace


@dataclass
class Workload:
    model: ModelArch
    trace: RoutingTrace
    fmt: ExpertFormat
    batch: int = 1
    steps: list[Step] = field(init=False)

    def __post_init__(self):
        source = self.trace.metadata.get("path", "trace")
        self.trace.validate(self.model.layers, self.model.experts, source)
        if self.trace.top_k != self.model.top_k:
            raise ConfigError(f"{source}: the trace routes each token to {self.trace.top_k} experts, model "
                              f"{self.model.name} to {self.model.top_k}; give the model the trace was recorded on")
        self.steps = batch_steps(self.trace, self.batch)

    @cached_property
    def kv(self):
        """The KV cache of every step (workloads/memory.py StepKV): what attention reads and holds."""
        from workloads.memory import step_kv
        return step_kv(self.trace, self.steps, self.batch)

    def routing_arrays(self, step: Step):
        """(experts, scores, levels or None) of a step, each [layers, tokens, k], so that a
        layer's routing is a cheap view."""
        t = self.trace
        levels = getattr(t, "levels", None)
        return (t.experts[step.tokens].transpose(1, 0, 2), t.scores[step.tokens].transpose(1, 0, 2),
                None if levels is None else levels[step.tokens].transpose(1, 0, 2))
