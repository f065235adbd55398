"""Prompts of distinct requests for the executor's runs and recordings: Python function heads like
the shipped model's training text (the Python standard library).
"""
from __future__ import annotations



DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"

# prompts of distinct requests: Python function heads like the model's training text (its stdlib)
PROMPT_HEADS = [
    ("parse_header(line)", "Split an HTTP header line into a name and a value."),
    ("merge_sorted(a, b)", "Merge two sorted lists into one sorted list."),
    ("read_config(path)", "Read an INI file and return its sections as a dict."),
    ("flatten(items)", "Yield the leaves of a nested list, depth first."),
    ("word_count(text)", "Count how often each word occurs in the text."),
    ("is_prime(n)", "Return True if n is a prime number."),
    ("to_snake_case(name)", "Convert a CamelCase name to snake_case."),
    ("chunked(seq, size)", "Split a sequence into lists of at most size items."),
    ("median(values)", "Return the median of a non-empty list of numbers."),
    ("unique_lines(path)", "Return the distinct lines of a file, in order."),
    ("retry(func, attempts)", "Call func until it succeeds, at most attempts times."),
    ("quote_arg(arg)", "Quote a shell argument if it contains spaces."),
]

def prompt_texts(requests: int, seed: int = 0) -> list[str]:
    """`requests` distinct prompts: the default one first, then function heads in a seeded order."""
    import numpy as np
    order = np.random.default_rng(seed).permutation(len(PROMPT_HEADS))
    texts = [DEFAULT_PROMPT]
    for i in range(requests - 1):
        head, doc = PROMPT_HEADS[order[i % len(order)]]
        if i >= len(order):                       # more requests than heads: number the copies
            name, _, rest = head.partition("(")
            head = f"{name}_{i // len(order) + 1}({rest}"
        texts.append(f'def {head}:\n    """{doc}"""\n')
    return texts

def prompt_tokens(prompt: str | None, tok, vocab: int, requests: int, seed: int = 0):
    """[requests, P] token ids: `prompt` for every request, else distinct prompts cut to the
    shortest one's length (requests decode in lockstep)."""
    import torch
    texts = [prompt] * requests if prompt else prompt_texts(requests, seed)
    ids = [tok.encode(t) if tok is not None else [b % vocab for b in t.encode()] for t in texts]
    width = min(map(len, ids))
    return torch.tensor([row[:width] for row in ids], dtype=torch.long)
