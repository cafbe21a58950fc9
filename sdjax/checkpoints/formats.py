"""The names of the formats sdjax writes (no I/O here: config checks import this without the writers)."""

FORMATS = ("sdjax", "diffusers", "single_file")  # a whole model (checkpoints.export)
VAE_FORMATS = ("sdjax", "diffusers")  # an autoencoder alone: no single file
LORA_LAYOUTS = ("peft", "kohya")  # LoRA adapters (checkpoints.lora)


def check_format(fmt: str, formats: tuple[str, ...] = FORMATS) -> str:
    if fmt not in formats:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(formats)}.")
    return fmt
