"""buildx's --provenance values, read once for the CLI and the coordinator."""

from __future__ import annotations

MODES = ("min", "max")
# What `polyarch build` asks for without --provenance: buildx's default when it pushes.
DEFAULT_MODE = "min"


def parse_provenance(value: str) -> str:
    """ "" (off), "min" or "max" from false|0|true|1|mode=min|mode=max[,disabled=...]; raises
    ValueError for anything else."""
    text = value.strip().lower()
    if text in ("", "false", "0"):
        return ""
    if text in ("true", "1"):
        return DEFAULT_MODE
    if text in MODES:  # as the spec and the proto carry it
        return text
    options = dict(part.partition("=")[::2] for part in text.split(","))
    if options.pop("disabled", "false") in ("true", "1"):
        return ""
    mode = options.pop("mode", DEFAULT_MODE)
    if mode not in MODES or options:
        raise ValueError(f"provenance {value!r}: expected false, true, mode=min or mode=max")
    return mode
