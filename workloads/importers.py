"""Import routing traces recorded by other tools: JSON Lines, CSV (one file per layer), NumPy.

Every importer returns a RoutingTrace. Traces come from many hand-rolled recorders, so
every input error is a ConfigError naming the file, the line / row / column and what was
expected (peers.md: users ask for robustness to odd ids and extra columns).
"""
from __future__ import annotations

import csv
import inspect
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from devices.units import ConfigError
from workloads.trace import RoutingTrace

_TOKEN_COLUMNS = ("token", "token_idx", "token_id")
_REQUEST_COLUMNS = ("request", "request_id")
_INCOMPLETE = ("strict", "drop")
# score columns are named by a number, optionally after an expert-ish word: 3, e3, expert_3, score-3
_EXPERT_NAME = re.compile(r"(?:experts?|exp|e|scores?|gates?|gate_probs?|probs?|logits?)?[_\-\s]?\d+", re.I)
# bookkeeping columns: ids, indices, positions (never scores)
_BOOKKEEPING_NAME = re.compile(r".*(?:^|_|\b)(?:id|idx|index|layer|batch|pos|position|step|seq|sequence|time|"
                               r"timestamp|row|offset|length|len)s?", re.I)


# -- small checks shared by the importers ---------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt_int(value, name: str, where: str, minimum: int = 1):
    """An integer option that may arrive as a string from the command line."""
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{where}: option {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot open ({e.strerror})") from None


def _request_codes(values: list, where) -> tuple[np.ndarray, list | None]:
    """Request ids as int32: integers are kept; strings get codes in order of first appearance.

    `where(i)` names the record of values[i] for error messages.
    """
    kinds = {type(v) for v in values}
    if kinds <= {int}:
        ids = np.array(values, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= 2**31):
            i = int(np.argmax((ids < 0) | (ids >= 2**31)))
            raise ConfigError(f"{where(i)}: request id {values[i]} out of range 0..{2**31 - 1}")
        return ids.astype(np.int32), None
    if kinds <= {str}:
        codes: dict[str, int] = {}
        ids = np.array([codes.setdefault(v, len(codes)) for v in values], np.int32)
        return ids, list(codes)
    first_type = type(values[0])
    i = next(i for i, v in enumerate(values) if type(v) is not first_type)
    raise ConfigError(f"{where(i)}: request id {values[i]!r} is a {type(values[i]).__name__}, earlier ones are "
                      f"{first_type.__name__}s; use integers or strings throughout")


# -- JSON Lines ---------------------------------------------------------------------------
def _field(rec: dict, key: str, option: str, where: str):
    if key not in rec:
        raise ConfigError(f"{where}: record has no field {key!r} (fields: {', '.join(map(repr, rec))}); "
                          f"name the right one with {option}=...")
    return rec[key]


def _int_field(rec: dict, key: str, option: str, where: str) -> int:
    v = _field(rec, key, option, where)
    if not _is_int(v) or v < 0:
        raise ConfigError(f"{where}: field {key!r} must be a non-negative integer, got {v!r}")
    return v


def _list_field(rec: dict, key: str, option: str, where: str, check, what: str) -> list:
    v = _field(rec, key, option, where)
    v = [v] if not isinstance(v, list) else v          # a bare value is a top-1 record
    if not v or not all(check(x) for x in v):
        raise ConfigError(f"{where}: field {key!r} must be a non-empty list of {what}, got {v!r}")
    return v


def import_jsonl(path, *, layer_field="layer", token_field="token_idx", experts_field="experts",
                 scores_field="gating_probs", request_field=None, prompt_field=None,
                 num_experts=None, incomplete="strict") -> RoutingTrace:
    """One JSON object per line, one line per (token, layer), in any order, e.g.
    {"layer": 3, "token_idx": 7, "experts": [6, 5], "gating_probs": [0.7, 0.3]}.

    Tokens are sorted by (request, token index); requests given as strings keep their order
    of first appearance. Without a scores field every score is 1/k (noted in the metadata).
    A token without a record in some layer is an error (incomplete="strict"), or is left out
    (incomplete="drop": ragged dumps often miss a request's last tokens in some layers); the
    metadata's "dropped_tokens" counts them per request.
    """
    path = Path(path)
    num_experts = _opt_int(num_experts, "num_experts", str(path))
    if incomplete not in _INCOMPLETE:
        raise ConfigError(f"{path}: option incomplete must be one of {', '.join(_INCOMPLETE)}, got {incomplete!r}")
    fields = _JsonlFields(layer_field, token_field, experts_field, scores_field, request_field, prompt_field)
    recs = _read_jsonl(path, fields, num_experts)
    tokens = _index_tokens(path, recs, fields)
    dropped = _drop_incomplete(path, recs, tokens, incomplete)
    T, L, k = len(tokens.token_keys), len(tokens.layer_ids), recs.k
    experts = np.empty((T, L, k), np.int32)
    experts[tokens.ti, tokens.li] = np.array(recs.experts, np.int32)
    scores = np.full((T, L, k), 1.0 / k, np.float32)
    if recs.has_scores:
        scores[tokens.ti, tokens.li] = np.array(recs.scores, np.float32)
    prompt = np.zeros(T, bool)
    if prompt_field is not None:
        prompt[tokens.ti] = recs.prompts
        if (prompt[tokens.ti] != np.array(recs.prompts)).any():
            i = int(np.flatnonzero(prompt[tokens.ti] != np.array(recs.prompts))[0])
            raise ConfigError(f"{path}, line {tokens.line[i]}: {prompt_field!r} disagrees with another record of "
                              f"{tokens.token_name(tokens.ti[i])}")
    meta = _jsonl_meta(path, fields, num_experts, recs, tokens, incomplete, dropped)
    return RoutingTrace(experts, scores, tokens.token_keys[:, 0].astype(np.int32), prompt, meta)


@dataclass(frozen=True)
class _JsonlFields:
    """The field names import_jsonl reads (its *_field options)."""
    layer: str
    token: str
    experts: str
    scores: str
    request: str | None
    prompt: str | None


@dataclass
class _JsonlRecords:
    """A JSON Lines trace's records in file order, one per (token, layer)."""
    lines: list = field(default_factory=list)      # the line number of each record
    tokens: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    experts: list = field(default_factory=list)
    scores: list = field(default_factory=list)     # only with a scores field
    requests: list = field(default_factory=list)   # only with a request field
    prompts: list = field(default_factory=list)    # only with a prompt field
    k: int | None = None                           # top-k, set by the first record
    k_line: int | None = None
    has_scores: bool | None = None


def _read_jsonl(path: Path, fields: _JsonlFields, num_experts: int | None) -> _JsonlRecords:
    recs = _JsonlRecords()
    with _open_text(path) as f:
        try:
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise ConfigError(f"{where}: expected a JSON object such as {{{fields.layer!r}: 0, "
                                      f"{fields.token!r}: 0, {fields.experts!r}: [1, 4]}}, got {text.strip()[:60]}")
                _add_record(recs, rec, n, where, fields, num_experts)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
    if not recs.lines:
        raise ConfigError(f"{path}: no records; expected one JSON object per line")
    return recs


def _add_record(recs: _JsonlRecords, rec: dict, n: int, where: str, fields: _JsonlFields,
                num_experts: int | None) -> None:
    """Check the record of line n and append it to recs."""
    layer = _int_field(rec, fields.layer, "layer_field", where)
    tok = _int_field(rec, fields.token, "token_field", where)
    ex = _list_field(rec, fields.experts, "experts_field", where,
                     lambda x: _is_int(x) and x >= 0, "non-negative integer expert ids")
    if recs.k is None:
        recs.k, recs.k_line, recs.has_scores = len(ex), n, fields.scores in rec
    k, k_line, has_scores = recs.k, recs.k_line, recs.has_scores
    if len(ex) != k:
        raise ConfigError(f"{where}: {len(ex)} experts, but line {k_line} has {k}; every record needs the same top-k")
    if len(set(ex)) != k:
        raise ConfigError(f"{where}: expert ids {ex} repeat; a token selects {k} distinct experts")
    if num_experts is not None and max(ex) >= num_experts:
        raise ConfigError(f"{where}: expert id {max(ex)} out of range 0..{num_experts - 1}")
    if (fields.scores in rec) != has_scores:
        raise ConfigError(f"{where}: field {fields.scores!r} is {'missing' if has_scores else 'present'} here but "
                          f"{'present' if has_scores else 'missing'} on line {k_line}")
    if has_scores:
        sc = _list_field(rec, fields.scores, "scores_field", where, _is_number, "finite numbers")
        if len(sc) != k:
            raise ConfigError(f"{where}: {len(sc)} scores for {k} experts")
        recs.scores.append(sc)
    if fields.request is not None:
        r = _field(rec, fields.request, "request_field", where)
        if not (_is_int(r) or isinstance(r, str)):
            raise ConfigError(f"{where}: field {fields.request!r} must be an integer or a string, got {r!r}")
        recs.requests.append(r)
    if fields.prompt is not None:
        p = _field(rec, fields.prompt, "prompt_field", where)
        if not isinstance(p, bool) and p not in (0, 1):
            raise ConfigError(f"{where}: field {fields.prompt!r} must be true/false, got {p!r}")
        recs.prompts.append(bool(p))
    recs.tokens.append(tok)
    recs.layers.append(layer)
    recs.experts.append(ex)
    recs.lines.append(n)


@dataclass
class _JsonlTokens:
    """Where each record goes: token ti (tokens sorted by (request code, token index)), layer li."""
    token_keys: np.ndarray        # [T, 2]: (request code, token index)
    names: list | None            # request names, when requests are strings
    layer_ids: np.ndarray         # the input's layer ids, ascending
    ti: np.ndarray
    li: np.ndarray
    line: np.ndarray              # the line of each record
    request_field: str | None

    def token_name(self, t: int) -> str:
        r, tok = self.token_keys[t]
        if self.request_field is None:
            return f"token {tok}"
        name = self.names[r] if self.names else int(r)           # a numpy integer would show as np.int64(0)
        return f"token {tok} of request {name!r}"


def _index_tokens(path: Path, recs: _JsonlRecords, fields: _JsonlFields) -> _JsonlTokens:
    """Token and layer of every record; a second record of a (token, layer) is an error."""
    lines = recs.lines
    if fields.request is not None:
        req, names = _request_codes(recs.requests, lambda i: f"{path}, line {lines[i]}")
    else:
        req, names = np.zeros(len(lines), np.int32), None
    layer_ids, li = np.unique(np.array(recs.layers, np.int64), return_inverse=True)
    li = li.ravel()
    L = len(layer_ids)
    # token order: sorted by (request code, token index)
    token_keys, ti = np.unique(np.stack([req.astype(np.int64), np.array(recs.tokens, np.int64)], 1), axis=0,
                               return_inverse=True)
    ti = ti.ravel()
    tokens = _JsonlTokens(token_keys, names, layer_ids, ti, li, np.array(lines), fields.request)
    slot = ti * L + li
    order = np.argsort(slot, kind="stable")
    dup = np.flatnonzero(slot[order][1:] == slot[order][:-1])
    if len(dup):
        a, b = order[dup[0]], order[dup[0] + 1]
        hint = ("; records of several requests? name their request field with request_field=..."
                if fields.request is None else f" (request_field={fields.request!r})")
        raise ConfigError(f"{path}, line {tokens.line[b]}: duplicate record for {tokens.token_name(ti[b])}, layer "
                          f"{layer_ids[li[b]]} (first on line {tokens.line[a]}){hint}")
    return tokens


def _drop_incomplete(path: Path, recs: _JsonlRecords, tokens: _JsonlTokens, incomplete: str) -> dict:
    """Tokens without a record in every layer: an error (strict), or left out of recs and tokens
    (drop). Returns the tokens left out per request."""
    ti, li, line, layer_ids, L = tokens.ti, tokens.li, tokens.line, tokens.layer_ids, len(tokens.layer_ids)
    have = np.bincount(ti, minlength=len(tokens.token_keys))
    if not (have < L).any():
        return {}
    if incomplete == "strict":
        t = int(np.flatnonzero(have < L)[0])
        mine = ti == t
        missing = np.setdiff1d(layer_ids, layer_ids[li[mine]])
        raise ConfigError(f"{path}: {tokens.token_name(t)} (first record on line {line[mine].min()}) has no record for "
                          f"layer {missing[0]}; every token needs one record per layer {layer_ids.tolist()} "
                          f"(option incomplete=strict); to leave such tokens out, give incomplete=drop")
    keep = have == L
    if not keep.any():
        raise ConfigError(f"{path}: no token has a record in every layer {layer_ids.tolist()}; "
                          f"incomplete=drop would leave nothing")
    names = tokens.names
    lost, counts = np.unique(tokens.token_keys[~keep, 0], return_counts=True)
    dropped = {str(names[r] if names else r): int(n) for r, n in zip(lost, counts)}
    rec = keep[ti]                      # records of the kept tokens
    new_id = np.cumsum(keep) - 1
    tokens.ti, tokens.li, tokens.line = new_id[ti[rec]], li[rec], line[rec]
    recs.experts = [x for x, r in zip(recs.experts, rec) if r]
    recs.scores = [x for x, r in zip(recs.scores, rec) if r]       # empty without a scores field
    recs.prompts = [x for x, r in zip(recs.prompts, rec) if r]     # empty without a prompt field
    tokens.token_keys = tokens.token_keys[keep]
    print(f"{path}: incomplete=drop left out {sum(dropped.values())} token(s) lacking a layer: "
          + ", ".join(f"request {r}: {n}" for r, n in dropped.items()), file=sys.stderr)
    return dropped


def _jsonl_meta(path: Path, fields: _JsonlFields, num_experts: int | None, recs: _JsonlRecords,
                tokens: _JsonlTokens, incomplete: str, dropped: dict) -> dict:
    meta = {"format": "jsonl", "path": str(path),
            "fields": {"layer": fields.layer, "token": fields.token, "experts": fields.experts,
                       "scores": fields.scores, "request": fields.request, "prompt": fields.prompt}}
    if num_experts is not None:
        meta["experts"] = num_experts
    if not recs.has_scores:
        meta["scores"] = f"field {fields.scores!r} absent: every score filled with 1/k"
    layer_ids = tokens.layer_ids
    if not np.array_equal(layer_ids, np.arange(len(layer_ids))):
        meta["layer_ids"] = layer_ids.tolist()          # trace layer i is input layer layer_ids[i]
    if tokens.names is not None:
        meta["request_names"] = tokens.names
    if incomplete == "drop":
        meta["incomplete"] = "drop"
        meta["dropped_tokens"] = dropped    # per request: tokens left out for lacking a layer
    return meta


# -- CSV: one file per layer ----------------------------------------------------------------
def _layer_order(paths: list[Path]) -> list[Path]:
    """Sort by the last number in each file name (layer_10 after layer_2) when every name has a
    distinct one; otherwise keep the given order."""
    nums = [re.findall(r"\d+", p.stem) for p in paths]
    if all(nums):
        keys = [int(n[-1]) for n in nums]
        if len(set(keys)) == len(keys):
            return [p for _, p in sorted(zip(keys, paths))]
    return list(paths)


def _expert_columns(names: list[str], others: list[int], pattern, num_experts, path: Path) -> list[int]:
    """Which of the columns `others` hold expert scores. In order: those matching the option
    expert_columns (a regular expression); those named like experts (e3, expert_3, 3); all of
    them when none looks like bookkeeping (layer_id, batch, position...); the last num_experts.
    Anything else is ambiguous: an error that lists the columns and the options."""
    listed = [names[i] for i in others]
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{path}: option expert_columns={pattern!r} is not a regular expression ({e})") from None
        cols = [i for i in others if rx.fullmatch(names[i])]
        if not cols:
            raise ConfigError(f"{path}: option expert_columns={pattern!r} matches none of the columns {listed}")
        return cols
    named = [i for i in others if _EXPERT_NAME.fullmatch(names[i])]
    if named:
        return named
    if others and not any(_BOOKKEEPING_NAME.fullmatch(names[i]) for i in others):
        return others
    if num_experts is not None and num_experts <= len(others):
        return others[len(others) - num_experts:]      # score columns follow the bookkeeping ones
    if not others:
        raise ConfigError(f"{path}: header {names} has no expert columns")
    raise ConfigError(f"{path}: cannot tell which columns hold expert scores: {listed} (some look like "
                      f"bookkeeping, none is named like an expert, e.g. e0 or expert_0); pick them with "
                      f"option expert_columns=REGEX (e.g. --option expert_columns='s_.*'), or give "
                      f"option num_experts=N to take the last N columns")


def _read_layer_csv(path: Path, expert_columns=None, num_experts=None) -> dict:
    with _open_text(path) as f:
        try:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise ConfigError(f"{path}: empty; expected a header row with one column per expert "
                                  f"(and optionally 'token' / 'request')")
            names = [h.strip() for h in header]
            low = [h.lower() for h in names]
            tok_col = next((i for i, h in enumerate(low) if h in _TOKEN_COLUMNS), None)
            req_col = next((i for i, h in enumerate(low) if h in _REQUEST_COLUMNS), None)
            others = [i for i in range(len(names)) if i not in (tok_col, req_col)]
            ecols = _expert_columns(names, others, expert_columns, num_experts, path)
            rows, line_nums = [], []
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                if len(row) != len(names):
                    raise ConfigError(f"{path}, row {len(rows) + 1} (line {reader.line_num}): {len(row)} cells, "
                                      f"the header has {len(names)}")
                rows.append(row)
                line_nums.append(reader.line_num)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from None
        except csv.Error as e:
            raise ConfigError(f"{path}, line {reader.line_num}: cannot parse as CSV ({e})") from None
    if not rows:
        raise ConfigError(f"{path}: no data rows after the header")
    cells = [[row[c] for c in ecols] for row in rows]
    try:
        scores = np.array(cells, dtype=np.float64)      # numpy parses the strings in one pass
        bad = ~np.isfinite(scores)
    except ValueError:
        bad = None
    if bad is None or bad.any():
        # the fast path failed: find the first offending cell to name it
        for r, row in enumerate(cells):
            for j, cell in enumerate(row):
                try:
                    ok = math.isfinite(float(cell))
                except ValueError:
                    ok = False
                if not ok:
                    raise ConfigError(f"{path}, row {r + 1} (line {line_nums[r]}), column {names[ecols[j]]!r}: "
                                      f"expected a finite number (an expert score), got {cell!r}")
    def column(c):
        return None if c is None else [row[c].strip() for row in rows]
    ignored = [names[c] for c in range(len(names)) if c not in ecols and c not in (tok_col, req_col)]
    return {"path": path, "experts": [names[c] for c in ecols], "ignored": ignored, "scores": scores,
            "lines": line_nums,
            "token": column(tok_col), "token_name": None if tok_col is None else names[tok_col],
            "request": column(req_col), "request_name": None if req_col is None else names[req_col]}


def import_csv(paths, *, num_experts=None, top_k, expert_columns=None) -> RoutingTrace:
    """One CSV file per layer, one row per token, one column per expert score.

    The top_k highest scores are the selected experts (ties: the lower id first); their raw
    scores are kept, not renormalised. An optional 'token' / 'request' column orders tokens.
    Expert ids follow the order of the score columns; other columns (layer_id, batch_id,
    position...) are ignored and listed in the metadata. Score columns are the ones matching
    expert_columns (a regular expression), else those named like experts (e0, expert_0, 0),
    else all when none looks like bookkeeping, else the last num_experts (see _expert_columns).
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise ConfigError("CSV import: no files given; expected one CSV file per layer")
    top_k = _opt_int(top_k, "top_k", str(paths[0]))
    num_experts = _opt_int(num_experts, "num_experts", str(paths[0]))
    paths = _layer_order(paths)
    tables = [_read_layer_csv(p, expert_columns, num_experts) for p in paths]
    first = tables[0]
    E, T = len(first["experts"]), len(first["scores"])
    for t in tables[1:]:
        if len(t["experts"]) != E:
            raise ConfigError(f"{t['path']}: {len(t['experts'])} expert columns, {first['path']} has {E}")
        if len(t["scores"]) != T:
            raise ConfigError(f"{t['path']}: {len(t['scores'])} rows, {first['path']} has {T}; "
                              f"every layer file needs one row per token")
        for key in ("token", "request"):
            if t[key] is not None and first[key] is not None and t[key] != first[key]:
                r = next(i for i, (a, b) in enumerate(zip(t[key], first[key])) if a != b)
                raise ConfigError(f"{t['path']}, row {r + 1} (line {t['lines'][r]}), column {t[key + '_name']!r}: "
                                  f"{t[key][r]!r} differs from {first['path']} ({first[key][r]!r})")
    if num_experts is not None and num_experts != E:
        raise ConfigError(f"{first['path']}: {E} expert columns, but num_experts={num_experts}")
    if top_k > E:
        raise ConfigError(f"{first['path']}: top_k={top_k} exceeds the {E} expert columns")

    scores = np.stack([t["scores"] for t in tables], axis=1)             # [tokens, layers, experts]
    experts = np.argsort(-scores, axis=-1, kind="stable")[..., :top_k]   # stable: ties -> lower id
    top = np.take_along_axis(scores, experts, -1)

    def cell(col: str):
        return lambda i: f"{first['path']}, row {i + 1} (line {first['lines'][i]}), column {col!r}"

    req, names = np.zeros(T, np.int32), None
    if first["request"] is not None:
        vals = [int(v) if re.fullmatch(r"\d+", v) else v for v in first["request"]]
        req, names = _request_codes(vals, cell(first["request_name"]))
    order = np.arange(T)
    if first["token"] is not None:
        bad = next((i for i, v in enumerate(first["token"]) if not re.fullmatch(r"\d+", v)), None)
        if bad is not None:
            raise ConfigError(f"{cell(first['token_name'])(bad)}: expected a non-negative integer token index, "
                              f"got {first['token'][bad]!r}")
        order = np.lexsort((np.array(first["token"], np.int64), req))
    meta = {"format": "csv", "path": str(paths[0].parent), "layer_files": [str(p) for p in paths],
            "expert_names": first["experts"], "experts": E, "ignored_columns": first["ignored"],
            "scores": "raw router scores of the top-k (not renormalised)"}
    if names is not None:
        meta["request_names"] = names
    return RoutingTrace(experts[order], top[order], req[order], None, meta)


# -- NumPy --------------------------------------------------------------------------------
def _array(value, what: str) -> tuple[np.ndarray, str]:
    """An array, or one loaded from a .npy path (no pickle); also returns a name for errors."""
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            return np.load(path, allow_pickle=False), str(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (expected a .npy array of {what})") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read as a .npy array of {what} ({e})") from None
    arr = np.asarray(value)
    if arr.dtype == object:
        raise ConfigError(f"{what} array: expected numbers, got Python objects")
    return arr, f"{what} array"


def import_numpy(experts, scores=None, request_ids=None, prompt=None, metadata=None) -> RoutingTrace:
    """Arrays (or .npy paths): experts [tokens, layers, k] ints, scores the same shape (default
    1/k), request_ids [tokens], prompt [tokens] bools."""
    ex, ex_name = _array(experts, "expert ids")
    if ex.ndim != 3:
        raise ConfigError(f"{ex_name}: expected shape [tokens, layers, k], got {ex.shape}")
    if not np.issubdtype(ex.dtype, np.integer):
        if not np.issubdtype(ex.dtype, np.floating) or not np.array_equal(ex, np.round(ex)):
            raise ConfigError(f"{ex_name}: expert ids must be integers, got dtype {ex.dtype}")
    if ex.size and (ex.min() < 0 or ex.max() >= 2**31):
        idx = tuple(int(i) for i in np.argwhere((ex < 0) | (ex >= 2**31))[0])
        raise ConfigError(f"{ex_name}: expert id {ex[idx]} at [token, layer, slot] {list(idx)} is out of range")
    meta = dict(metadata or {})
    meta.setdefault("format", "numpy")
    if isinstance(experts, (str, Path)):
        meta.setdefault("path", str(experts))
    if scores is None:
        sc = np.full(ex.shape, 1.0 / max(ex.shape[2], 1), np.float32)
        meta.setdefault("scores", "absent: every score filled with 1/k")
    else:
        sc, name = _array(scores, "gate scores")
        if sc.shape != ex.shape:
            raise ConfigError(f"{name}: shape {sc.shape} differs from the expert ids' {ex.shape}")
        if not np.issubdtype(sc.dtype, np.number):   # non-finite ones: trace.check names the first
            raise ConfigError(f"{name}: gate scores must be finite numbers, got dtype {sc.dtype}")
    arrays = {}
    for key, value, what in (("request_ids", request_ids, "request ids"), ("prompt", prompt, "prompt flags")):
        if value is None:
            arrays[key] = None
            continue
        arr, name = _array(value, what)
        if arr.shape != (ex.shape[0],):
            raise ConfigError(f"{name}: expected shape ({ex.shape[0]},) (one per token), got {arr.shape}")
        if key == "request_ids" and not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"{name}: request ids must be integers, got dtype {arr.dtype}")
        if key == "prompt" and not (arr.dtype == bool or np.isin(arr, (0, 1)).all()):
            raise ConfigError(f"{name}: prompt flags must be booleans (or 0/1)")
        arrays[key] = arr
    trace = RoutingTrace(ex.astype(np.int32), sc.astype(np.float32), arrays["request_ids"], arrays["prompt"], meta)
    trace.check(ex_name)
    return trace


# -- dispatch -----------------------------------------------------------------------------
_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".npz": "npz", ".npy": "numpy"}
_ALIASES = {"jsonl": "jsonl", "json": "jsonl", "csv": "csv", "npz": "npz", "numpy": "numpy", "npy": "numpy"}


def import_trace(path, fmt=None, **options) -> RoutingTrace:
    """Read a trace, choosing the importer from `fmt` or the extension (.jsonl/.json, .csv or a
    directory of CSVs, .npz, .npy). Options may be strings (from `--option KEY=VALUE`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if fmt is None:
        fmt = "csv" if path.is_dir() else _BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise ConfigError(f"{path}: cannot tell the trace format from the extension {path.suffix!r}; "
                              f"use one of {', '.join(_BY_SUFFIX)} or a directory of CSVs, or give the format")
    elif fmt not in _ALIASES:
        raise ConfigError(f"{path}: unknown trace format {fmt!r}; known: {', '.join(_ALIASES)}")
    by_suffix = _ALIASES.get(_BY_SUFFIX.get(path.suffix.lower()), None)
    if by_suffix not in (None, _ALIASES[fmt]):        # a forced format the file's own name contradicts
        raise ConfigError(f"{path}: a {path.suffix} file is {by_suffix}, not {fmt}; drop the format (the extension "
                          f"picks the importer) or rename the file")
    fmt = _ALIASES[fmt]
    if fmt == "npz":
        if options:
            raise ConfigError(f"{path}: a .npz trace takes no options, got {', '.join(options)}")
        return RoutingTrace.load(path)
    func = {"jsonl": import_jsonl, "csv": import_csv, "numpy": import_numpy}[fmt]
    allowed = list(inspect.signature(func).parameters)[1:]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)} for the {fmt} importer; "
                          f"allowed: {', '.join(allowed)}")
    for key in ("num_experts", "top_k"):
        if key in options:
            options[key] = _opt_int(options[key], key, str(path))
    if isinstance(options.get("metadata"), str):
        try:
            options["metadata"] = json.loads(options["metadata"])
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: option metadata must be a JSON object ({e.msg})") from None
    if fmt == "csv":
        if "top_k" not in options:
            raise ConfigError(f"{path}: a CSV trace needs top_k, the number of experts each token selects "
                              f"(e.g. --option top_k=2)")
        files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
        if not files:
            raise ConfigError(f"{path}: directory holds no .csv files (expected one per layer)")
        return import_csv(files, **options)
    return func(path, **options)
