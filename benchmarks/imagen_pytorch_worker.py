"""The imagen-pytorch half of `vs_imagen_pytorch.py`; runs in the venv that has torch and imagen-pytorch.

    python benchmarks/imagen_pytorch_worker.py '<json spec>'    # prints one JSON line of results

Not part of the project (which never imports torch): it is a measuring instrument for the comparison.
Offline shims, both for import-time side effects of imagen-pytorch that have nothing to do with speed:
  * `torchvision` is replaced by an empty module: PyPI's torchvision does not import beside the CPU torch
    wheel, and imagen-pytorch only uses it to convert outputs to PIL images.
  * imagen-pytorch's `Unet` signature reads `google/t5-v1_1-base`'s config from the Hugging Face hub at
    import time; it is answered with a local T5Config (we pass text embeddings, no T5 runs).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import time
import types

import common  # torch-free: timing helpers shared with the JAX side


def _install_shims() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        raise SystemExit(
            "imagen_pytorch_worker: this venv has torchvision, which does not import beside the CPU torch "
            "wheel and breaks transformers' import; run `pip uninstall torchvision` in it (the worker stubs "
            "it; the venv recipe is in docs/benchmarks.md)."
        )
    import transformers  # first: it probes for torchvision and must find none

    def offline_config(cls, name, *args, **kwargs):  # noqa: ARG001 - same signature as from_pretrained
        return cls(d_model=768)

    transformers.T5Config.from_pretrained = classmethod(offline_config)
    for name in ("torchvision", "torchvision.transforms", "torchvision.utils"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # other packages probe the spec
        sys.modules[name] = module


def _timed(fn, iters: int, warmup: int) -> tuple[float, float]:
    """(median seconds after `warmup` calls, seconds of the first call, which includes any set-up)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    median, _ = common.median_seconds(fn, iters=iters, warmup=warmup - 1)
    return median, first


def run(spec: dict) -> dict:
    _install_shims()
    import torch
    import torch.utils.flop_counter
    from imagen_pytorch import Imagen, Unet

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    unet = Unet(
        dim=spec["dim"],
        dim_mults=tuple(spec["dim_mults"]),
        num_resnet_blocks=spec["num_res_blocks"],
        layer_attns=tuple(spec["self_attention"]),
        layer_cross_attns=tuple(spec["cross_attention"]),
        attn_heads=spec["heads"],
        attn_dim_head=spec["head_dim"],
        text_embed_dim=spec["text_dim"],
        max_text_len=spec["text_len"],
        cond_dim=spec["cond_dim"],
        memory_efficient=False,
    )

    def imagen(timesteps: int) -> Imagen:
        return Imagen(
            unets=(unet,),
            image_sizes=(spec["image_size"],),
            text_embed_dim=spec["text_dim"],
            timesteps=timesteps,
            cond_drop_prob=spec["caption_dropout"],
            pred_objectives="v",
            noise_schedules="cosine",
            min_snr_loss_weight=False,
        )

    b, res, length = spec["batch"], spec["image_size"], spec["text_len"]
    images = torch.rand(b, 3, res, res)
    emb = torch.randn(b, length, spec["text_dim"])
    mask = torch.arange(length)[None, :] < torch.randint(length // 2, length + 1, (b, 1))
    emb = emb * mask[..., None]

    # Training: loss, backward, clip, AdamW and an EMA update: what a train step does in either project.
    trainer = imagen(1000)
    trainer.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]

    def train_step() -> None:
        loss = trainer(images, text_embeds=emb, text_masks=mask, unet_number=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - 0.999)

    train_s, train_first = _timed(train_step, spec["train_iters"], spec["warmup"])
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:  # one more step, untimed
        train_step()

    # Sampling: imagen-pytorch's DDPM loop with `timesteps` steps; guidance as its two serial passes.
    sampler = imagen(spec["sample_steps"])
    sampler.eval()
    sb = spec["sample_batch"]

    def sample() -> None:
        with torch.no_grad():
            sampler.sample(
                text_embeds=emb[:sb], text_masks=mask[:sb], cond_scale=spec["guidance"], use_tqdm=False
            )

    sample_s, sample_first = _timed(sample, spec["sample_iters"], 1)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "train_step_seconds": train_s,
        "train_first_step_seconds": train_first,
        "train_images_per_second": b / train_s,
        # PyTorch's counter counts matrix products and convolutions only (no elementwise work).
        "train_flops_per_image": counter.get_total_flops() / b,
        "sample_seconds_per_call": sample_s,
        "sample_first_call_seconds": sample_first,
        "denoising_steps_per_second": spec["sample_steps"] / sample_s,
        "step_images_per_second": spec["sample_steps"] * sb / sample_s,
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
