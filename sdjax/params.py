"""Print the parameter count of each network of a model, from ``jax.eval_shape`` (no memory).

    python -m sdjax.params --preset sd15          # or sd21, sdxl, sdxl_refiner: the published architectures
    python -m sdjax.params --config tiny          # a config that holds its whole model
"""

import argparse

from sdjax import configs, presets, sources
from sdjax.models.configs import ModelConfigs, abstract_params, count_params
from sdjax.training.schema import ModelSource


def param_counts(model_config: dict) -> dict[str, int]:
    tree = abstract_params(ModelConfigs.from_dicts(model_config))
    return {name: count_params(t) for name, t in tree.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(presets.PRESETS), help="a published Stable Diffusion architecture")
    which.add_argument("--config", help="a config's name or path whose `model` holds unet, vae and text_encoder")
    args = p.parse_args(argv)
    if args.preset:
        model = presets.get(args.preset)
    else:
        model = configs.load(args.config).get("model")
        try:
            model = sources.model_dicts(ModelSource(model=model.to_dict() if model is not None else {}))
        except ValueError:
            raise SystemExit(f"error: --config {args.config} does not hold a whole model (its networks come from a "
                             "checkpoint); use --preset, or a config like tiny.") from None
    counts = param_counts(model)
    print(f"{'network':<14}{'parameters':>16}")
    for name, n in counts.items():
        print(f"{name:<14}{n:>16,}")
    print(f"{'total':<14}{sum(counts.values()):>16,}")


if __name__ == "__main__":
    main()
