"""Prompt files, read the same way by every command that takes one (`sample.py --prompts_file`,
`python -m imagen_jax.text.encode --prompts_file`).

- `.csv`: the `prompt` column (DrawBench's layout: `prompt,category`).
- `.json`: a list of strings.
- anything else: UTF-8 text, one prompt per line (a BOM and CRLF line ends are fine).

Every mistake is a `UserError` naming the file and, for a bad byte, its line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os

from imagen_jax.errors import DataError, InputFileNotFoundError


def read_prompt_file(path: str | os.PathLike, *, keep_blank: bool) -> list[str]:
    """The prompts in `path`. `keep_blank`: a blank line of a text file is the empty (unconditional)
    prompt; otherwise blank lines are skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise InputFileNotFoundError(f"prompts file {path!r} {what}.")
    with open(path, "rb") as f:
        raw = f.read().removeprefix(codecs.BOM_UTF8)  # editors on Windows write one
    # Decoded line by line so that a bad byte is reported with its line, not as a bare offset.
    lines = []
    for number, line in enumerate(raw.splitlines(keepends=True), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"prompts file {path!r} line {number} is not UTF-8 (byte 0x{line[e.start]:02x} at column "
                f"{e.start + 1}); save the file as UTF-8."
            ) from None
    text = "".join(lines)
    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if "prompt" not in (reader.fieldnames or []):
            raise DataError(f"prompts file {path!r} has no 'prompt' column (columns: {reader.fieldnames}).")
        return [row["prompt"] for row in reader]
    if path.endswith(".json"):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"prompts file {path!r} is not JSON: {e}.") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DataError(f"prompts file {path!r} must hold a JSON list of strings.")
        return prompts
    prompts = [line.rstrip("\r\n") for line in lines]  # only \n, \r\n and \r end a line here
    return [p for p in prompts if keep_blank or p.strip()]
