r"""The paper's 64x64 base stage: a ~2.1B-parameter U-Net conditioned on frozen T5-XXL embeddings.

Variants (`--config configs/imagen_base64.py:<variant>`):

  paper  (default) the paper's recipe: T5-XXL from a Hugging Face folder, 128 tokens, Adafactor at 1e-4 with
         10k warm-up steps, batch 2048, 2.5M steps, bf16 compute with fp32 master weights. Point
         `--config.data.folder` (images + captions) and `--config.text.encoder` (the T5 folder) at your
         copies; parameters, EMA and optimizer state are split over every device (FSDP).
  bench  the same U-Net on synthetic 4096-wide text (a seeded one-layer stand-in for T5-XXL, so nothing is
         downloaded) and the procedural shapes data at 64x64, for the GPU training benchmark:

  python benchmarks/train_step.py --config configs/imagen_base64.py:bench --config.train.batch_size=32

U-Net (IMAGEN_NOTES.md, "Base U-Net"): width 512, multipliers 1,2,3,4 (512/1024/1536/2048 channels at
64/32/16/8), 3 residual blocks per level, self- and text cross-attention at 32, 16 and 8 with 64 channels per
head, FiLM conditioning from a 4x-width (2048) noise/pooled-text vector, text projected to 512 (imagen-
pytorch's layout: text to the model width, time to 4x). 2,121,910,275 parameters.
"""

import ml_collections

from configs import shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "paper"
    if variant not in ("paper", "bench"):
        raise ValueError(f"configs/imagen_base64.py variant {variant!r}: use 'paper' or 'bench'.")
    c = shapes.get_config("demo")
    # bf16 compute: on CPU the YNNPACK fusion options crash XLA with bf16 (config_checks), so none there.
    c.xla_options.cpu = ""

    # 2.1B parameters with fp32 Adafactor state and EMA do not fit replicated on a 16 GB chip: split the
    # parameters, EMA and optimizer state over every device (the batch too); on one device it is plain.
    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
    c.sharding.preset = "fsdp"

    c.data.resolution = 64
    c.text.max_length = 128  # the paper gives none; one DrawBench prompt exceeds 128 T5 tokens (warns)
    c.text.train_jointly = False
    c.text.embedding_cache = True
    c.text.dtype = "bfloat16"
    c.model.update(
        dict(
            channels=512,
            channel_mults=(1, 2, 3, 4),
            num_res_blocks=3,
            self_attention=(False, True, True, True),
            cross_attention=(False, True, True, True),
            head_dim=64,
            num_heads=0,
            cond_dim=2048,
            text_dim=512,
            text_positions=False,  # T5-XXL encodes word order itself
            image_positions=False,  # the paper's U-Net
            norm_groups=32,
            patch_size=1,
            remat=False,
            # True compiles 28 level blocks as 17 loop bodies (the SR stages' 44 as 12), but XLA:CPU ran
            # the scanned backward pass many times slower; the GPU/TPU step is untimed (PHASES=scan).
            scan_blocks=False,
            dtype="bfloat16",
            param_dtype="float32",
        )
    )
    c.diffusion.schedule = "cosine"
    c.optim.update(
        dict(
            name="adafactor",
            learning_rate=1e-4,
            warmup_steps=10_000,
            decay="constant",
            weight_decay=0.0,
            grad_clip=1.0,
            ema_decay=0.9999,
            stack_by_shape=True,  # the per-parameter work (Adafactor, EMA, clipping) compiled once per shape
        )
    )
    c.train.update(
        dict(
            batch_size=2048,
            num_steps=2_500_000,
            time_budget_minutes=0.0,
            log_every=100,
            checkpoint_every=5_000,
            keep_checkpoints=3,
            sample_every=20_000,
        )
    )
    c.train.sample_prompts = (
        "A brown and white corgi sitting in a field of flowers.",
        "A red cube on top of a blue sphere.",
        "A photo of a teddy bear made of water.",
        "",
    )
    c.sample.sampler = "dpmpp2m"
    c.sample.num_steps = 25
    c.sample.time_grid = "quadratic"
    c.sample.guidance = 5.0
    c.eval.guidance_weights = (1.35, 5.0)  # best FID / best-looking range (IMAGEN_NOTES.md)

    if variant == "paper":
        c.data.name = "folder"
        c.data.folder = ""  # set --config.data.folder=/path/to/images (with captions.tsv or captions.jsonl)
        c.text.encoder = "google/t5-v1_1-xxl"  # a Hugging Face folder / hub id in the local cache
        c.text.tokenizer = ""  # "" = the encoder folder's own tokenizer
    else:
        # A seeded one-layer T5 of T5-XXL's width: the U-Net sees 4096-wide text as it would from the cache.
        c.text.encoder = "random"
        c.text.tokenizer = "byte"
        c.text.t5.update(d_model=4096, d_kv=64, num_heads=4, num_layers=1)
        c.train.batch_size = 32
        c.train.num_steps = 1_000
        c.optim.warmup_steps = 100
        c.train.checkpoint_every = 500
        c.train.sample_every = 0
    return c
