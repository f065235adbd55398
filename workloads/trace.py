"""The routing-trace format: which experts each token selects at each MoE layer.

On disk a trace is one `.npz` (no pickle) with arrays
  experts     int32   [tokens, layers, k]   selected expert ids, router order
  scores      float32 [tokens, layers, k]   their gate scores
  request_ids int32   [tokens]              request each token belongs to
  prompt      bool    [tokens]              True for prompt (prefill) tokens
  levels      uint8   [tokens, layers, k]   optional: precision level of each selected expert
                                            (index into the format's levels; absent = not chosen)
  predicted   int32   [tokens, layers, P]   optional: experts predicted for layer l+1 from layer l's
                                            hidden state (gate lookahead), best first, -1 padded
  predicted_scores float32 [tokens, layers, P]  their predicted router probabilities
  metadata    JSON string                   model name, source, generator settings...
Tokens of one request appear in generation order; requests may be interleaved.
A loaded trace has at least one token, k distinct experts per (token, layer) and finite scores.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from devices.atomic import atomic_open
from devices.units import ConfigError


@dataclass
class RoutingTrace:
    experts: np.ndarray
    scores: np.ndarray
    request_ids: np.ndarray
    prompt: np.ndarray
    metadata: dict = field(default_factory=dict)
    levels: np.ndarray | None = None
    predicted: np.ndarray | None = None
    predicted_scores: np.ndarray | None = None

    def __post_init__(self):
        self.experts = np.asarray(self.experts, dtype=np.int32)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        if self.experts.ndim != 3:
            raise ConfigError(f"trace: experts must be [tokens, layers, k], got shape {self.experts.shape}")
        if self.scores.shape != self.experts.shape:
            raise ConfigError(f"trace: scores shape {self.scores.shape} differs from experts shape {self.experts.shape}")
        t = self.experts.shape[0]
        self.request_ids = np.zeros(t, np.int32) if self.request_ids is None else np.asarray(self.request_ids, np.int32)
        self.prompt = np.zeros(t, bool) if self.prompt is None else np.asarray(self.prompt, bool)
        for name in ("request_ids", "prompt"):
            if getattr(self, name).shape != (t,):
                raise ConfigError(f"trace: {name} must have shape ({t},), got {getattr(self, name).shape}")
        if self.levels is not None:
            self.levels = _levels_array(self.levels, self.experts.shape)
        if self.predicted is not None:
            self.predicted = np.asarray(self.predicted, np.int32)
            self.predicted_scores = np.asarray(self.predicted_scores, np.float32)
            if self.predicted.shape[:2] != self.experts.shape[:2] or self.predicted_scores.shape != self.predicted.shape:
                raise ConfigError(f"trace: predicted {self.predicted.shape} and predicted_scores "
                                  f"{self.predicted_scores.shape} must be [tokens, layers, P] like experts "
                                  f"{self.experts.shape}")

    @property
    def tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def num_experts(self) -> int:
        """Experts per layer: from the metadata if recorded, else the largest id seen + 1."""
        return int(self.metadata.get("experts", int(self.experts.max(initial=-1)) + 1))

    def requests(self) -> list[np.ndarray]:
        """Token indices of each request, in order of first appearance."""
        _, first = np.unique(self.request_ids, return_index=True)
        order = self.request_ids[np.sort(first)]
        return [np.flatnonzero(self.request_ids == r) for r in order]

    def validate(self, layers: int, experts: int, source: str = "trace") -> None:
        """Check the trace fits a model with `layers` MoE layers and `experts` experts each."""
        if self.layers != layers:
            raise ConfigError(f"{source}: trace has {self.layers} layers, the model has {layers}")
        bad = np.argwhere((self.experts < 0) | (self.experts >= experts))
        if len(bad):
            tok, layer, slot = bad[0]
            raise ConfigError(f"{source}: token {tok}, layer {layer}, slot {slot}: expert id "
                              f"{self.experts[tok, layer, slot]} out of range 0..{experts - 1}")

    def check(self, source: str = "trace") -> None:
        """Refuse what no engine can run: no tokens, an expert picked twice by one token, or a
        non-finite score. The error names the first bad (token, layer)."""
        if self.tokens == 0 or self.layers == 0 or self.top_k == 0:
            raise ConfigError(f"{source}: the trace is empty (experts shape {self.experts.shape}); "
                              f"expected at least one token, layer and expert per token")
        ids = np.sort(self.experts, axis=-1)
        dup = np.argwhere((ids[..., 1:] == ids[..., :-1]).any(-1))
        if len(dup):
            tok, layer = dup[0]
            raise ConfigError(f"{source}: token {tok}, layer {layer}: expert ids {self.experts[tok, layer].tolist()} "
                              f"repeat; a token selects {self.top_k} distinct experts")
        bad = np.argwhere(~np.isfinite(self.scores).all(-1))
        if len(bad):
            tok, layer = bad[0]
            raise ConfigError(f"{source}: token {tok}, layer {layer}: scores {self.scores[tok, layer].tolist()} "
                              f"are not all finite numbers")

    def save(self, path) -> Path:
        path = Path(path)
        arrays = dict(experts=self.experts, scores=self.scores, request_ids=self.request_ids, prompt=self.prompt,
                      metadata=np.array(json.dumps(self.metadata)))
        if self.levels is not None:
            arrays["levels"] = self.levels
        if self.predicted is not None:
            arrays["predicted"], arrays["predicted_scores"] = self.predicted, self.predicted_scores
        with atomic_open(path) as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        """Read and check a .npz trace; every problem is a ConfigError naming the file."""
        path = Path(path)
        try:
            if path.is_file() and not zipfile.is_zipfile(path):  # else numpy tries it as a pickle
                why = "empty file" if path.stat().st_size == 0 else "not a zip archive"
                raise ConfigError(f"{path}: cannot read as a .npz trace ({why}); {_EXPECTED}")
            with np.load(path, allow_pickle=False) as z:
                missing = {"experts", "scores"} - set(z.files)
                if missing:
                    raise ConfigError(f"{path}: not a moelab trace, missing arrays {sorted(missing)} "
                                      f"(expected experts, scores, request_ids, prompt, metadata)")
                meta = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
                opt = {k: z[k] if k in z.files else None
                       for k in ("request_ids", "prompt", "levels", "predicted", "predicted_scores")}
                trace = cls(z["experts"], z["scores"], opt["request_ids"], opt["prompt"], meta, opt["levels"],
                            opt["predicted"], opt["predicted_scores"])
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such trace file") from None
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg.removeprefix('trace: ')}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            # never relay numpy's advice to set allow_pickle: a trace holds plain arrays only
            raise ConfigError(f"{path}: cannot read as a .npz trace ({_short_reason(e)}); {_EXPECTED}") from None
        trace.check(str(path))
        return trace


_EXPECTED = "expected a zip of .npy arrays as written by `moelab trace synth`, `trace import` or `trace record`"


def _short_reason(e: Exception) -> str:
    if "pickle" in str(e).lower():  # numpy's message suggests allow_pickle=True: unsafe, never needed
        return "an array holds Python objects; a trace holds plain numeric arrays"
    if isinstance(e, zipfile.BadZipFile):
        return "a damaged zip archive"
    return f"{type(e).__name__}: {e}"


def _levels_array(levels, shape: tuple) -> np.ndarray:
    """levels as uint8 of the experts' shape, or a ConfigError saying what is wrong."""
    arr = np.asarray(levels)
    if arr.shape != shape:
        raise ConfigError(f"trace: levels shape {arr.shape} differs from experts shape {shape} "
                          f"(one precision level per token, layer and slot)")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255):
        raise ConfigError(f"trace: levels must be integers 0..255 (uint8), got dtype {arr.dtype}"
                          + (f" with values {arr.min()}..{arr.max()}" if np.issubdtype(arr.dtype, np.number) else ""))
    return arr.astype(np.uint8)
