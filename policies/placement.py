"""Placement: where each (expert, level) of a decision point's demand computes (issue 26, item 3).

`gpu`: on the accelerator, its parts loaded into the accelerator's cache (today's only choice);
`cpu`: on the host CPU, from host RAM, where its parts are read into from storage when missing,
never copied to the accelerator. A placement policy is a small class registered by name with
declared options, asked by Policies.decide (policies/bundle.py) before the scheduler, so the
scheduler and the accelerator's cache see only the accelerator's share of the demand. It may read
the accelerator's residency (`self.cache`), the host level's (`self.lower`, policies/tiers.py) and
the cost model; an online policy never reads ctx.future.

- gpu-only: everything on the accelerator (today).
- cpu-static: llama.cpp's `--n-cpu-moe N` (`layers=N`): the experts of the first N MoE layers
  always on the CPU, every other on the accelerator; no `layers`: all of them (`--cpu-moe`).
- cpu-when-faster: Fiddler: on the CPU when getting it to the accelerator and computing there
  would take longer than computing it on the CPU. Each side pays the storage read of the parts
  not in host RAM (the CPU computes from host RAM too), so the comparison is the copy over the
  link of the parts not on the accelerator plus the accelerator's compute against the CPU's.
- hot-on-gpu: kTransformers-like: per layer, the `per_layer` experts used most so far (token
  counts of the decision points seen before this one; ties to the lower id) on the accelerator,
  the rest on the CPU. Online: the counts start at zero (the first decision points put the lowest
  ids on the accelerator).
"""
from __future__ import annotations

from policies.base import Demand, PolicyContext
from policies.options import Option

GPU, CPU = "gpu", "cpu"


class Placement:
    """Chooses GPU or CPU for each (expert, level) of a demand. `self.cache` (the accelerator's
    cache) and `self.lower` (the host level, policies/tiers.py) are set when the bundle is built."""
    name = "placement"
    options: tuple = ()
    cache = None
    lower = None

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.fmt = ctx.fmt
        self.placed = {GPU: 0, CPU: 0}      # (expert, level) computations per place, for report()

    def place(self, layer: int, demand: Demand) -> dict[tuple[int, int], str]:
        """GPU or CPU for each (expert, level) of `demand`, in its first-appearance order."""
        out = self._place(layer, demand)
        for where in out.values():
            self.placed[where] += 1
        return out

    def _place(self, layer: int, demand: Demand) -> dict[tuple[int, int], str]:
        raise NotImplementedError

    def report(self) -> dict:
        return {"placed_gpu": self.placed[GPU], "placed_cpu": self.placed[CPU]}


class GpuOnly(Placement):
    """Every expert on the accelerator (today's only choice)."""
    name = "gpu-only"

    def _place(self, layer, demand):
        return dict.fromkeys(demand.counts(), GPU)


class CpuStatic(Placement):
    """llama.cpp's --n-cpu-moe N: the experts of the first N MoE layers on the CPU, the rest on the accelerator."""
    name = "cpu-static"
    options = (Option("layers", "int", None, "the first N MoE layers' experts stay on the CPU (llama.cpp "
                                             "--n-cpu-moe N); default: every layer (--cpu-moe)", "layers"),)

    def __init__(self, ctx, layers: int | None = None):
        super().__init__(ctx)
        if layers is not None and layers < 0:
            from devices.units import ConfigError
            raise ConfigError(f"cpu-static: option layers: a number of layers >= 0, got {layers}")
        self.layers = ctx.layers if layers is None else layers

    def _place(self, layer, demand):
        return dict.fromkeys(demand.counts(), CPU if layer < self.layers else GPU)


class CpuWhenFaster(Placement):
    """Fiddler: on the CPU when copying it over the link and computing it on the accelerator would take longer than computing it on the CPU."""
    name = "cpu-when-faster"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.cost = ctx.need_cost("cpu-when-faster")

    def _place(self, layer, demand):
        fmt, cost, gpu = self.fmt, self.cost, self.cache.sizes
        out = {}
        for (expert, level), n in demand.counts().items():
            copy = sum(cost.link_seconds(fmt.resident_bytes[p]) for p in fmt.level_parts[level]
                       if (layer, expert, p) not in gpu)
            on_gpu = copy + cost.expert_seconds(level, n)
            out[expert, level] = CPU if on_gpu > cost.cpu_expert_seconds(level, n) else GPU
        return out


class HotOnGpu(Placement):
    """kTransformers-like: per layer, the experts used most so far on the accelerator, the rest on the CPU (online counts)."""
    name = "hot-on-gpu"
    options = (Option("per_layer", "int", None, "experts of each layer on the accelerator, the most used so far; "
                                                "default: as many as the budget holds, spread evenly over the "
                                                "layers at the top level", "experts"),)

    def __init__(self, ctx, per_layer: int | None = None):
        super().__init__(ctx)
        fmt = ctx.fmt
        if per_layer is None:
            per_layer = ctx.capacity_bytes // (ctx.layers * fmt.level_bytes(fmt.levels - 1))
        self.per_layer = max(0, per_layer)
        self.uses = [[0] * ctx.experts for _ in range(ctx.layers)]

    def _place(self, layer, demand):
        uses = self.uses[layer]
        hot = set(sorted(range(len(uses)), key=lambda e: (-uses[e], e))[:self.per_layer])
        counts = demand.counts()
        for (expert, _), n in counts.items():        # seen from the next decision point on
            uses[expert] += n
        return {pair: GPU if pair[0] in hot else CPU for pair in counts}


PLACEMENT_CLASSES = {c.name: c for c in (GpuOnly, CpuStatic, CpuWhenFaster, HotOnGpu)}
