"""Encodes prompts with a T5 checkpoint and saves the embeddings.

    python -m imagen_jax.text.encode --t5 google/flan-t5-xxl --prompts_file prompts.txt --out emb.npz

--t5 is a Hugging Face folder or a hub id in the local cache. --prompts_file: .txt (one prompt per line;
an empty line is the unconditional prompt), .csv (a `prompt` column, e.g. DrawBench) or .json (a list of
strings). The .npz holds prompts [N] (str), embeddings [N, L, D] (padding zeroed) and mask [N, L] (bool),
with L trimmed to the longest prompt unless --no_trim. --fsdp shards the encoder over all devices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from imagen_jax import cli
from imagen_jax.data.prompts import read_prompt_file


def encode_prompts(
    text_encoder, prompts: Sequence[str], batch_size: int = 32, trim: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, L, D] float32, mask [N, L]) in batches; L trimmed to the longest prompt if `trim`."""
    embs, masks = [], []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        pad = batch_size - len(batch)  # one static shape: one compilation
        emb, mask = text_encoder.encode(batch + [""] * pad)
        embs.append(np.asarray(emb)[: len(batch)])
        masks.append(np.asarray(mask)[: len(batch)])
    emb, mask = np.concatenate(embs), np.concatenate(masks)
    if trim:
        length = max(1, int(mask.sum(1).max()))
        emb, mask = emb[:, :length], mask[:, :length]
    return emb, mask


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t5", required=True, help="Hugging Face T5 folder or cached hub id")
    parser.add_argument("--prompts_file", required=True)
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's; 'byte'; a spiece.model")
    parser.add_argument("--max_length", type=cli.number(int, minimum=2), default=128)
    parser.add_argument("--batch_size", type=cli.number(int, minimum=1), default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameter and compute dtype")
    parser.add_argument("--out_dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--no_trim", action="store_true", help="keep max_length positions")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters over all devices")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    from imagen_jax.parallel import axes
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.text.hf_loader import load_t5_encoder

    prompts = read_prompt_file(args.prompts_file, keep_blank=True)
    if not prompts:
        parser.error(f"{args.prompts_file} holds no prompts")
    mesh = rules = None
    if args.fsdp:
        mesh = mesh_lib.make_mesh([("data", -1)])
        rules = mesh_lib.preset_rules("dp", [(axes.EMBED, "data")])
    start = time.perf_counter()
    te = load_t5_encoder(args.t5, dtype=args.dtype, mesh=mesh, rules=rules, max_length=args.max_length,
                         tokenizer=args.tokenizer)
    loaded = time.perf_counter()
    emb, mask = encode_prompts(te, prompts, args.batch_size, trim=not args.no_trim)
    done = time.perf_counter()
    emb = emb.astype(args.out_dtype)
    np.savez(args.out, prompts=np.asarray(prompts, dtype=str), embeddings=emb, mask=mask)
    print(f"{len(prompts)} prompts -> {args.out}: embeddings {emb.shape} {args.out_dtype}; "
          f"load {loaded - start:.1f}s, encode {done - loaded:.1f}s")
    return 0


if __name__ == "__main__":
    cli.run_argparse(main)
