"""The error every checkpoint reader raises, and the message that lists what did not match."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: wrong format, corrupt, or not matching the model."""


def describe_mismatch(what: str, missing: list[str], unexpected: list[str], mismatched: list[str],
                      limit: int = 20) -> str:
    """Every missing, unexpected and mis-shaped key at once (the first ``limit`` of each)."""
    lines = [f"{what}: the checkpoint does not match the model configuration."]
    for title, items in (("missing from checkpoint", missing), ("unexpected in checkpoint", unexpected),
                         ("shape mismatch", mismatched)):
        if items:
            shown = "\n    ".join(sorted(items)[:limit])
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"  {title} ({len(items)}):\n    {shown}{more}")
    lines.append("  Check that the config.json next to the weights describes this checkpoint.")
    return "\n".join(lines)
