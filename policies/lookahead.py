"""Prefetchers that use the model itself: gate lookahead (Fate, HOBBIT).

The next layer's router, applied to this layer's hidden state, predicts which experts the
next layer will pick: hidden states change little from one layer to the next. The executor
computes the prediction live (`ExpertRuntime(predict_fn=...)`, executor/record.py
`gate_lookahead`); `moelab trace record` writes the same predictions into the trace
(`RoutingTrace.predicted`, `predicted_scores`), and the simulator hands them to the prefetcher
from there: both engines issue exactly the same prefetches. The prediction reaches the
prefetcher as `Routing.predicted` (the decision point passes its routing to after_layer):
(ids [tokens, P], probabilities [tokens, P]), best first, -1 padded.

- `gate-lookahead`: per token, the top-k predicted experts (k = the router's own top-k), in
  router order;
- `gate-topk`: per token, up to `width` predicted experts (default 2 x top-k) whose predicted
  probability is at least `threshold` (default 0.1), ranked across the batch by summed
  probability (the cache admits prefetches in order while they fit, so the order matters);
- `gate-last-use`: gate-lookahead's keys, then `last-use`'s for the same decision point; at the
  last layer (no next router to ask) last-use alone, for layer 0 of the next token.

A prefetched key is loaded at the level the layer just asked of it (the highest level in this
decision point's demand): the prefetcher cannot know the next layer's allocator choice.
`prediction_accuracy` measures a trace's recorded predictions against its routing.
"""
from __future__ import annotations

import numpy as np

from policies.base import Key
from policies.options import Option
from policies.prefetch import LastUse, Prefetcher


class GateLookahead(Prefetcher):
    """The next layer's router on this layer's hidden state: each token's top-k predictions."""
    name = "gate-lookahead"
    needs_prediction = True          # the executor computes predictions for it (executor/execute.py)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.issued = 0

    def _experts(self, ids: np.ndarray, probs: np.ndarray, k: int) -> list[int]:
        return list(dict.fromkeys(int(e) for e in ids[:, :k].ravel() if e >= 0))

    def predicted_keys(self, layer, demand, routing) -> list[Key]:
        if layer + 1 >= self.ctx.layers or routing is None or routing.predicted is None:
            return []
        ids, probs = routing.predicted
        level = max(demand.max_level().values(), default=self.fmt.levels - 1)
        parts = self.fmt.parts_of(level)
        experts = self._experts(np.asarray(ids), np.asarray(probs), routing.experts.shape[1])
        return [Key(layer + 1, e, p) for e in experts for p in parts]

    def after_layer(self, layer, demand, routing=None):
        keys = self.predicted_keys(layer, demand, routing)
        self.issued += len(keys)
        return keys

    def report(self):
        return {f"{self.name}_keys_proposed": self.issued}


class GateTopK(GateLookahead):
    """Up to `width` predictions per token (default 2 x top-k), those with probability >=
    `threshold`, ranked over the batch by summed probability."""
    name = "gate-topk"
    options = (Option("width", "int", None, "predictions per token (default: 2 x top-k)"),
               Option("threshold", "float", 0.1, "lowest predicted probability prefetched"))

    def __init__(self, ctx, width: int | None = None, threshold: float = 0.1):
        super().__init__(ctx)
        self.width = None if width is None else int(width)
        self.threshold = float(threshold)
        if self.width is not None and self.width < 1 or not 0 <= self.threshold <= 1:
            from devices.units import ConfigError
            raise ConfigError(f"gate-topk: options width >= 1 and 0 <= threshold <= 1, got width={width!r}, "
                              f"threshold={threshold!r}")

    def _experts(self, ids, probs, k):
        width = self.width or 2 * k
        ids, probs = ids[:, :width], probs[:, :width]
        keep = (ids >= 0) & (probs >= self.threshold)
        score: dict[int, float] = {}
        for e, p in zip(ids[keep].tolist(), probs[keep].tolist()):
            score[e] = score.get(e, 0.0) + p
        return sorted(score, key=lambda e: (-score[e], e))


class GateLastUse(GateLookahead):
    """Gate lookahead, then what the next decision point's layer needed last time."""
    name = "gate-last-use"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.last_use = LastUse(ctx)

    def after_layer(self, layer, demand, routing=None):
        keys = self.predicted_keys(layer, demand, routing)
        keys += [k for k in self.last_use.after_layer(layer, demand) if k not in set(keys)]
        self.issued += len(keys)
        return keys


LOOKAHEAD_PREFETCHERS = (GateLookahead, GateTopK, GateLastUse)


def prediction_accuracy(trace, width: int | None = None, threshold: float = 0.0) -> dict:
    """Precision and recall of a trace's recorded next-layer predictions (layer distance 1), per
    layer and over all: per token, the first `width` predictions (default the router's top-k)
    with probability >= threshold, against the experts the next layer really selected."""
    if trace.predicted is None:
        raise ValueError("the trace has no predictions (record it with `moelab trace record`)")
    k = trace.top_k
    ids = trace.predicted[:, :-1, : width or k]
    probs = trace.predicted_scores[:, :-1, : width or k]
    actual = trace.experts[:, 1:, :]
    mask = (ids >= 0) & (probs >= threshold)
    hit = ((ids[..., None] == actual[..., None, :]).any(-1) & mask)
    per_layer = []
    for layer in range(trace.layers - 1):
        n_pred, n_hit = int(mask[:, layer].sum()), int(hit[:, layer].sum())
        per_layer.append({"layer": layer, "precision": n_hit / n_pred if n_pred else None,
                          "recall": n_hit / actual[:, layer].size})
    n_pred = int(mask.sum())
    return {"precision": int(hit.sum()) / n_pred if n_pred else None, "recall": int(hit.sum()) / actual.size,
            "per_layer": per_layer}
