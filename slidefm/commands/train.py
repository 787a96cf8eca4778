"""`slidefm train [overrides]`: the Hydra application (recipes in ``slidefm.recipes``)."""

from __future__ import annotations

import sys

CONFIG_PATH = "pkg://slidefm.recipes"


def add_parser(sub):
    p = sub.add_parser(
        "train",
        help="pretrain or fine-tune with a Hydra recipe (e.g. `slidefm train recipe=slidefm data.cohort=DIR`)",
        description="Hydra application; see `slidefm train --help` for the config groups and options.",
        add_help=False,
    )
    p.set_defaults(func=lambda args: hydra_main(sys.argv[2:]))
    return p


def hydra_main(argv: list[str]) -> int:
    import hydra

    from slidefm.config import register_configs

    register_configs()

    @hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
    def _main(cfg):
        from slidefm.train.run import train

        return train(cfg)

    saved = sys.argv
    sys.argv = ["slidefm train", *argv]
    try:
        _main()
    finally:
        sys.argv = saved
    return 0
