"""infer.py's JSONL requests: one {"prompt", "id", "protect"} object a line; a bad line is an error record.

`read_requests` never raises on a line's content: malformed JSON, a missing or empty prompt and an invalid
"protect" list each become {"id", "line", "error"}, so the other lines are still served.
"""

from __future__ import annotations

import json


def read_requests(path: str) -> tuple[list[tuple[int, object, str, list[str]]], list[dict]]:
    """([(line number, id, prompt, protected parts)], [error records]) from a JSONL file; bad lines become errors."""
    requests, errors = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(
                    {"id": None, "line": n, "error": f"not UTF-8 text (invalid byte at column {e.start + 1})"}
                )
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append({"id": None, "line": n, "error": f"malformed JSON ({e.msg})"})
                continue
            rid = obj.get("id", n) if isinstance(obj, dict) else n
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                errors.append({"id": rid, "line": n, "error": 'expected an object with a "prompt" string'})
            elif not obj["prompt"].strip():
                errors.append({"id": rid, "line": n, "error": "the prompt is empty"})
            elif (protect := _protected_parts(obj)) is None:
                errors.append(
                    {"id": rid, "line": n, "error": '"protect" must be a list of non-empty parts of the prompt'}
                )
            else:
                requests.append((n, rid, obj["prompt"], protect))
    return requests, errors


def _protected_parts(obj: dict) -> list[str] | None:
    """The request's "protect" list (a single string is a list of one), or None when it is invalid."""
    parts = obj.get("protect", [])
    parts = [parts] if isinstance(parts, str) else parts
    if not isinstance(parts, list) or not all(isinstance(t, str) and t and t in obj["prompt"] for t in parts):
        return None
    return parts
