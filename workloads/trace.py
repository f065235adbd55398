"""The routing-trace format: which experts each token selects at each MoE layer.

On disk a trace is one `.npz` (no pickle) with arrays
  experts     int32   [tokens, layers, k]   selected expert ids, router order
  scores      float32 [tokens, layers, k]   their gate scores
  request_ids int32   [tokens]              request each token belongs to
  prompt      bool    [tokens]              True for prompt (prefill) tokens
  metadata    JSON string                   model name, source, generator settings...
Tokens of one request appear in generation order; requests may be interleaved.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from devices.units import ConfigError


@dataclass
class RoutingTrace:
    experts: np.ndarray
    scores: np.ndarray
    request_ids: np.ndarray
    prompt: np.ndarray
    metadata: dict = field(default_factory=dict)

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

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez_compressed(tmp, experts=self.experts, scores=self.scores, request_ids=self.request_ids,
                                prompt=self.prompt, metadata=np.array(json.dumps(self.metadata)))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"experts", "scores"} - set(z.files)
                if missing:
                    raise ConfigError(f"{path}: not a moelab trace, missing arrays {sorted(missing)} "
                                      f"(expected experts, scores, request_ids, prompt, metadata)")
                meta = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
                return cls(z["experts"], z["scores"], z["request_ids"] if "request_ids" in z.files else None,
                           z["prompt"] if "prompt" in z.files else None, meta)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such trace file") from None
        except (OSError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{path}: cannot read as a .npz trace ({e})") from None
