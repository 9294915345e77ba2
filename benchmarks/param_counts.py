"""Parameter counts of the paper-size U-Nets, from shapes alone (`jax.eval_shape`: nothing is allocated).

    python benchmarks/param_counts.py

Prints one row per paper config (base 64x64, SR 64->256, SR 256->1024) beside the paper's size. The text
width is T5-XXL's 4096 (the paper variants read it from the checkpoint, so the config does not hold it);
it sets the size of the U-Net's text projection.
"""

from __future__ import annotations

import common  # noqa: F401  (puts the project root on sys.path)
import jax
import ml_collections

from configs import imagen_base64, imagen_sr256, imagen_sr1024
from imagen_jax.models.unet import unet_from_config
from imagen_jax.stage.build import unet_input_structs

T5_XXL_WIDTH = 4096

# name, config module, the paper's size in parameters (IMAGEN_NOTES.md, "The system")
PAPER_CONFIGS = (
    ("imagen_base64", imagen_base64, 2_000_000_000),
    ("imagen_sr256", imagen_sr256, 600_000_000),
    ("imagen_sr1024", imagen_sr1024, 400_000_000),
)


def unet_param_count(config: ml_collections.ConfigDict, text_width: int = T5_XXL_WIDTH) -> int:
    """Parameters of `unet_from_config(config.model)` at the config's training shapes (batch 1).

    Super-resolution U-Nets (model.lowres_cond) also get the low-res image and its augmentation level; on
    crop-trained stages both images are the crops. Only the text width changes the count; the image and
    text lengths are given so the traced shapes are the real ones.
    """
    unet = unet_from_config(config.model)
    inputs, kwargs = unet_input_structs(config.data, config.text.max_length, text_width)
    params = jax.eval_shape(
        lambda *x, **kw: unet.init(jax.random.PRNGKey(0), *x, **kw)["params"], *inputs, **kwargs
    )
    return sum(x.size for x in jax.tree.leaves(params))


def main() -> None:
    rows = []
    for name, module, paper in PAPER_CONFIGS:
        config = module.get_config("paper")
        count = unet_param_count(config)
        rows.append(
            dict(
                config=name,
                resolution=config.data.resolution,
                parameters=f"{count:,}",
                paper=f"~{paper / 1e6:,.0f}M",
                vs_paper=f"{count / paper - 1:+.1%}",
            )
        )
    common.print_table(rows, ["config", "resolution", "parameters", "paper", "vs_paper"])


if __name__ == "__main__":
    main()
