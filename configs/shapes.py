r"""Text-to-image on a laptop CPU: the base stage at 32x32 on the procedural shapes dataset.

Train (about 30 minutes on 2 CPU cores), sample and score:

  python train.py --config configs/shapes.py --workdir runs/shapes
  python sample.py --workdir runs/shapes --prompt "a large red circle" --num 8 --out grid.png
  python -m imagen_jax.evaluation.shapes --workdir runs/shapes

Variants (`--config configs/shapes.py:<variant>`): `words` reads captions as T5's SentencePiece word
pieces instead of those learned from the captions; it needs T5's vocabulary file (`spiece.model`, in any
T5 v1.1 folder on the Hugging Face hub), given as `--config.text.tokenizer=/path/to/spiece.model`.
`tiny` is the test-size model (seconds per step on CPU).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "demo"
    if variant not in ("demo", "words", "tiny"):
        raise ValueError(f"configs/shapes.py variant {variant!r}: use 'demo', 'words' or 'tiny'.")
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Devices (imagen_jax/parallel/mesh.py): sizes of the mesh axes data, fsdp and tensor (-1 = the
    # remaining devices), the rule preset that places parameters and state on them (dp: replicated; fsdp;
    # fsdp_tp) and single-rule overrides, e.g. --config.sharding.rules="(('mlp', None),)". Tuples, not
    # lists: ml_collections overrides only tuples from the command line, e.g.
    # --config.mesh="(('data', 2), ('fsdp', 4), ('tensor', 1))" (README, Configs).
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    # Multi-slice TPU: the axes' sizes across slices, e.g. (("data", 2),); c.mesh then sizes one slice.
    c.mesh_dcn = ()
    c.sharding = ml_collections.ConfigDict(
        dict(
            preset="dp",
            rules=(),
            # Arrays smaller than this stay replicated: norm scales and biases are not worth a collective.
            min_shard_size=2**14,
        )
    )

    # XLA compiler options per backend (space-separated name=value), for the train step and the samplers.
    # CPU: only YNNPACK's fused dot and reduce graphs, not its per-op convolution and matmul kernels or
    # elementwise fusions (jax 0.10 defaults), which ran these U-Nets slower than XLA's own kernels
    # (docs/benchmarks.md). In jax 0.10.2 these fusions crash XLA's compiler on bf16 models, hence fp32 on
    # CPU (config_checks refuses the pair).
    c.xla_options = ml_collections.ConfigDict(
        dict(
            cpu="xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
            gpu="",
            tpu="",
        )
    )
    # JAX's persistent compilation cache: a resumed run, and sample.py on its workdir, load the compiled
    # train step and samplers instead of compiling again. Relative: under --workdir; "": not set here.
    c.compilation_cache_dir = "compilation_cache"
    # Programs compiled faster than this are not kept there. 0 keeps every one, so a restart compiles
    # nothing: the checkpoint digests and initialisers are dozens of small programs (JAX's default is 1 s).
    c.compilation_cache_min_compile_seconds = 0.0

    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes"  # "shapes" (procedural, no download) or "folder" (images + captions file)
    c.data.data_dir = ""  # TFDS data_dir for the shapes dataset; "" = <workdir>/data
    c.data.folder = ""  # for name="folder": the images folder with captions.tsv / captions.jsonl
    # For name="folder". Transparent pixels are composited onto this RGB colour: dropping alpha would
    # train on whatever colour they happen to hide.
    c.data.background = (255, 255, 255)
    # Centre-cropping a panorama keeps a thin slice that may not match its caption: images whose
    # long/short side ratio exceeds max_aspect are "crop"ped anyway, "pad"ded (letterboxed onto
    # background) or "skip"ped; the counts are logged when the source is built.
    c.data.aspect_policy = "crop"
    c.data.max_aspect = 2.0
    c.data.resolution = 32
    # Super-resolution stages: the input resolution (the previous stage's output; 0 = a base stage), the
    # anti-aliased filter that derives it from each training image (what the previous stage's samples
    # stand in for), and random aligned crops to train on (0 = whole images; the U-Net is convolutional,
    # so a crop-trained stage still samples whole images).
    c.data.lowres_resolution = 0
    c.data.lowres_downsample = "bicubic"
    c.data.crop_resolution = 0
    c.data.num_train = 60_000
    c.data.num_eval = 1_000
    # Two-object scenes are the hard part (binding colours to positions): train on more of them.
    c.data.two_object_prob = 0.65
    # Made-up words (random letters) in the framing of this share of training captions, 1..max_words
    # each, never inside an object or relation phrase (`data.shapes.with_made_up_words`). The run's
    # vocabulary spells a word its captions never use in pieces nothing else trains; these train them,
    # and teach the encoder and U-Net that words naming no object change nothing, so a user's own
    # framing ("this photo shows ...") is read like a known one.
    c.data.made_up_words = ml_collections.ConfigDict(dict(prob=0.3, max_words=2))
    c.data.seed = 0
    c.data.worker_count = 0  # grain worker processes; 0 = threads in this process
    c.data.prefetch = 4  # batches buffered ahead of the training step

    c.text = ml_collections.ConfigDict()
    # "pretrain": a small T5 (sized by text.t5) pretrained on the training captions at the start of the run
    # (text.pretrain, minutes), kept in <workdir>/text_encoder and then frozen like a published T5: Imagen's
    # recipe, with what a big T5 brings from its corpus (which object a caption puts where, and what each
    # word says about its object) taught by the scenes themselves. "random": the same T5 seeded, no
    # pretraining: it draws one object as asked but two in either order (docs/shapes_demo.md, per-word
    # tags). Or a Hugging Face folder / hub id.
    c.text.encoder = "pretrain"
    # "captions": a SentencePiece vocabulary learned from the training captions at the start of the run
    # (text.learned_tokenizer, seconds), so each of their words is one piece whatever frames it, with
    # nothing to download. The best self-contained choice measured, short of T5's own vocabulary (the
    # `words` variant) on framings training never shows: their new words come in letter pieces
    # (docs/shapes_demo.md, words learned from the captions). Or "byte" (ByT5), or a spiece.model path /
    # Hugging Face folder.
    c.text.tokenizer = "captions"
    c.text.learned_tokenizer = ml_collections.ConfigDict(
        dict(
            # At most this many pieces, 259 of them pad, EOS, unknown and the 256 bytes that spell any
            # character the captions never show.
            vocab_size=512,
            model_type="bpe",  # "unigram" split these captions' words into letters
            normalization="nmt_nfkc_cf",  # NFKC plus case folding: "RED" is "red"
        )
    )
    c.text.max_length = 40  # framings training never shows spell their new words in letter pieces
    c.text.seed = 1  # initialises the seeded or pretrained T5 and draws the pretraining's corruptions
    c.text.dtype = "float32"
    c.text.pretrain = ml_collections.ConfigDict(
        dict(
            num_steps=900,
            batch_size=64,
            learning_rate=2e-3,
            # A fifth of each caption goes missing, in one span of whole words for these short captions, so
            # the encoder must represent words and their roles from context.
            noise_density=0.2,
            mean_span_length=8.0,
            decoder_layers=0,  # 0 = as many as the encoder; the decoder is dropped after pretraining
            # A linear head on the encoder tags each word of a two-object caption's object phrases with
            # whether its object is the left or top one in the image, and the two facts that decide it
            # (shapes data only, `data.shapes.object_tags`; 0 = off). That is an exclusive-or of word order
            # and the relation word, which neither the U-Net nor a restating decoder learned; told per
            # word, the encoder learns it in a few hundred steps, and the U-Net then places the objects.
            # Weighted well above span corruption, whose gradients otherwise held the tags at chance for as
            # long as the seed decided (docs/shapes_demo.md, per-word tags).
            tag_weight=10.0,
            # Span corruption's share of the loss (0 = tags only, no decoder): without it the U-Net drew
            # both objects of fewer two-object captions, and in the caption's order less often.
            span_weight=1.0,
            log_every=250,
            # Pretraining stops here even before num_steps, so a demo run stays within its 30 minutes
            # (with train.time_budget_minutes lowered by as much).
            time_budget_minutes=3.0,
        )
    )
    # Frozen, as with a pretrained T5: on the demo the frozen seeded T5 beat joint training, and cached
    # embeddings make every step cheaper (docs/shapes_demo.md).
    c.text.train_jointly = False
    # Frozen encoders only: precompute T5 embeddings of every training caption once and train from them.
    c.text.embedding_cache = True
    c.text.embedding_cache_dir = ""  # "" = <workdir>/text_cache
    c.text.embedding_cache_dtype = "bfloat16"
    c.text.t5 = ml_collections.ConfigDict(
        dict(
            vocab_size=640,  # the learned vocabulary plus T5's 100 sentinels (for text.pretrain), padded
            d_model=128,
            d_kv=32,
            d_ff=256,
            num_heads=4,
            num_layers=2,
            feed_forward="gated-gelu",
        )
    )

    c.model = ml_collections.ConfigDict(
        dict(
            channels=32,
            channel_mults=(1, 2, 4),  # widths 32/64/128 at 16/8/4 (after the 2x2 patch stem)
            num_res_blocks=2,
            self_attention=(False, True, True),
            cross_attention=(True, True, True),
            head_dim=32,
            num_heads=0,
            cond_dim=256,
            text_dim=128,
            # Learned absolute text positions would tie the U-Net to where words sit in the training
            # captions; the T5's relative position bias already carries word order into its embeddings.
            text_positions=False,
            # On in the run the README's numbers come from; they did not settle which object goes where
            # (docs/shapes_demo.md, binding).
            image_positions=True,
            norm_groups=16,
            dropout=0.0,
            null_text="zero",
            efficient=False,
            out_channels=3,
            patch_size=2,  # the U-Net runs at 16x16: 4x fewer conv FLOPs, shapes stay crisp at 32x32
            lowres_cond=False,  # True for a super-resolution stage (with data.lowres_resolution)
            lowres_upsample="bicubic",  # resizes the low-res input to the noisy image's size
            remat=False,  # recompute blocks in the backward pass (saves activation memory, costs FLOPs)
            # With remat, what each block keeps for the backward pass: a jax.checkpoint_policies name
            # (models/unet.py REMAT_POLICIES); keeping matmul outputs trades memory for fewer FLOPs.
            remat_policy="nothing_saveable",
            # Consecutive identical blocks as one scan (same function, parameters stacked). Off here: with
            # two blocks a level few repeat, and XLA:CPU compiles the loop no faster and runs the scanned
            # train step many times slower (docs/benchmarks.md).
            scan_blocks=False,
            attention_impl="xla",  # self-attention kernel; "cudnn" = fused flash attention (GPU, bf16)
            # Compute dtype. "auto": float32 on CPU (fastest there with xla_options.cpu; bf16 gained
            # nothing), bfloat16 on GPU/TPU. Master weights stay float32.
            dtype="auto",
            param_dtype="float32",
        )
    )

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"
    c.diffusion.logsnr_min = -20.0
    c.diffusion.logsnr_max = 20.0
    c.diffusion.objective = "v"
    # Plain v-MSE: min-SNR-5 down-weights low-noise levels and left visible speckle in 30-minute runs.
    c.diffusion.loss_weighting = "none"
    c.diffusion.min_snr_gamma = 5.0
    # Training noise levels: log-SNR of uniformly drawn times plus this shift (< 0: more training at high
    # noise; sampling keeps the schedule). 0 = the schedule's own levels: more training where the demo's
    # layout is decided did not teach which object goes where, and cost detail (docs/shapes_demo.md).
    c.diffusion.train_logsnr_shift = 0.0
    c.diffusion.caption_dropout = 0.1
    # Super-resolution stages: noise-conditioning augmentation levels (times on this schedule) drawn
    # uniformly per training example, so the stage learns to repair a previous stage's artefacts rather
    # than copy them; sampling uses one level, sample.noise_aug_level, from inside this range.
    c.diffusion.noise_aug_range = (0.0, 0.5)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # or "adafactor"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.decay = "cosine"  # or "constant"
    c.optim.end_lr_factor = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True  # decay = min(ema_decay, (1 + step) / (10 + step))
    # Hold the weights, EMA and optimizer state as one array per group of same-shaped parameters, so the
    # clipping, optimizer and EMA run once per group rather than once per parameter: the same arithmetic in
    # a shorter program for the paper's base U-Net (Adafactor's per-parameter update is long, its
    # parameters many), no shorter for small models. It decides the checkpoint's layout, so a run resumes
    # only with the value it started with (sampling reads either).
    c.optim.stack_by_shape = False

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64
    # Micro-batches per step: the batch runs in this many slices, one optimizer update per step, so a
    # large batch fits the activation memory of a slice (batch_size / grad_accum_steps per step call).
    c.train.grad_accum_steps = 1
    # Compile the gradients and the update (clipping, optimizer, EMA) as two programs, at the same time on
    # two threads: XLA compiles each program on about one core. The step then runs them one after the
    # other, the gradients passing between them; the arithmetic is the same.
    c.train.separate_update = True
    # Multi-host runs: every this many steps the processes agree whether any was asked to stop (SIGTERM,
    # time budget), so all save the same step. Each agreement waits for the step before it; preemption
    # notices leave tens of seconds.
    c.train.stop_check_every = 5
    # On 2 CPU cores the time budget ends the run before this; num_steps sets how long the learning rate
    # takes to decay (docs/shapes_demo.md).
    c.train.num_steps = 1_800
    # Stop (and checkpoint) after this many minutes of the loop; dataset generation, the text encoder's
    # pretraining, the embedding cache and compilation come before it, so the command stays under 30
    # minutes. 0 = none.
    c.train.time_budget_minutes = 24.0
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 2
    c.train.sample_every = 500  # write a sample grid; 0 = never
    c.train.sample_prompts = (
        "a large red circle",
        "a small blue square",
        "a large green triangle",
        "a small yellow circle",
        "a red square to the left of a blue circle",
        "a green circle above a yellow triangle",
        "",
        "a large purple square",
    )

    c.sample = ml_collections.ConfigDict()
    # Ancestral sampling: the fresh noise of each step corrects this short-trained model's errors, which
    # the deterministic samplers (DDIM, DPM-Solver++ 2M) carry to the image at any step count; with it,
    # at the demo's guidance 15 steps score as 100 do (more add background grain, not accuracy); without
    # guidance they lose no more than 25 do, while 10 lose objects (docs/benchmarks.md, few-step sampling).
    # "dpmpp2m_sde" is its second-order form.
    c.sample.sampler = "ddpm"
    c.sample.num_steps = 15
    c.sample.time_grid = "uniform"  # "quadratic" (denser near t=0) for 20-25 step DPM-Solver++
    c.sample.guidance = 1.5  # 1 = no guidance; 1.5 scored best of 1/1.5/2 on the demo (docs/shapes_demo.md)
    c.sample.eta = 0.0
    c.sample.threshold = "dynamic"
    c.sample.percentile = 99.5
    # Super-resolution stages: the augmentation level of the low-res input (0 = as given: the best FID
    # in the paper; 0.1-0.3 gave its best-looking samples). Unused by a base stage.
    c.sample.noise_aug_level = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.num_captions = 256
    c.eval.two_object_prob = 0.5  # the held-out test mix, fixed whatever data.two_object_prob trains on
    c.eval.guidance_weights = (1.0, 1.5)  # 1.0 = no guidance (plain conditional), 0.0 = unconditional
    # Caption sets scored on the same scenes: the training grammar and framings training never uses
    # (imagen_jax/data/shapes.py WORDINGS).
    c.eval.wordings = ("standard", "heldout")
    c.eval.batch_size = 128
    c.eval.seed = 1234

    if variant == "words":
        # T5's own word pieces instead of those learned from the captions (docs/shapes_demo.md).
        c.text.tokenizer = "spiece.model"  # T5's vocabulary file: --config.text.tokenizer=/path/to/it
        c.text.t5.vocab_size = 32128  # T5's embedding table (32,000 pieces + 100 sentinels, padded)
        c.text.max_length = 32  # the longest caption is 18 pieces (+ EOS)
    if variant == "tiny":
        c.data.num_train = 64
        c.data.num_eval = 16
        # JAX's own setting: the tests point it at one cache for the session (tests/conftest.py), where
        # a folder per workdir would compile the same tiny programs again in every test.
        c.compilation_cache_dir = ""
        # Tests exercise the harder path: the text encoder trained jointly (its params in the train state).
        c.text.encoder = "random"
        c.text.train_jointly = True
        c.text.embedding_cache = False
        # Bytes: no vocabulary to learn first, except in the tests of that path.
        c.text.tokenizer = "byte"
        c.text.max_length = 84
        c.text.learned_tokenizer.vocab_size = 320  # fits the tiny T5's 384 ids with 64 sentinels
        c.text.t5 = ml_collections.ConfigDict(
            dict(
                vocab_size=384,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_heads=4,
                num_layers=1,
                feed_forward="gated-gelu",
            )
        )
        c.model.update(
            dict(
                channels=16,
                channel_mults=(1, 2),
                num_res_blocks=1,
                self_attention=(False, True),
                cross_attention=(False, True),
                head_dim=8,
                cond_dim=32,
                text_dim=32,
                norm_groups=4,
            )
        )
        c.optim.warmup_steps = 2
        c.train.batch_size = 16
        c.train.num_steps = 6
        c.train.time_budget_minutes = 0.0
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.train.sample_every = 0
        c.train.sample_prompts = ("a red circle", "")
        c.sample.num_steps = 4
        c.eval.num_captions = 16
        c.eval.batch_size = 16
        c.eval.guidance_weights = (1.0, 2.0)
    return c
