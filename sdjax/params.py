"""Print the parameter count of each network of a config, from ``jax.eval_shape`` (no memory).

    python -m sdjax.params --config sd15
"""

import argparse

from sdjax import configs
from sdjax.models.configs import ModelConfigs, abstract_params, count_params


def param_counts(model_config: dict) -> dict[str, int]:
    tree = abstract_params(ModelConfigs.from_dicts(model_config))
    return {name: count_params(t) for name, t in tree.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a shipped config's name (sd15) or a config file's path")
    counts = param_counts(configs.load(p.parse_args(argv).config).model.to_dict())
    print(f"{'network':<14}{'parameters':>16}")
    for name, n in counts.items():
        print(f"{name:<14}{n:>16,}")
    print(f"{'total':<14}{sum(counts.values()):>16,}")


if __name__ == "__main__":
    main()
