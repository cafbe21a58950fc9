"""Print the parameter count of each network of a config, from ``jax.eval_shape`` (no memory).

    python -m sdjax.params --config configs/sd15.py
"""

from absl import app, flags
from ml_collections import config_flags

from sdjax.models.configs import ModelConfigs, abstract_params, count_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)


def param_counts(model_config: dict) -> dict[str, int]:
    tree = abstract_params(ModelConfigs.from_dicts(model_config))
    return {name: count_params(t) for name, t in tree.items()}


def main(argv) -> None:
    del argv
    counts = param_counts(_CONFIG.value.model.to_dict())
    print(f"{'network':<14}{'parameters':>16}")
    for name, n in counts.items():
        print(f"{name:<14}{n:>16,}")
    print(f"{'total':<14}{sum(counts.values()):>16,}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
