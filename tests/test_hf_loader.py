"""Hugging Face T5 checkpoints -> Flax: parity with PyTorch outputs, sharding, hub cache, bad input.

The reference outputs in tests/fixtures/t5_tiny_* come from transformers' PyTorch T5 (written once by
tests/fixtures/make_t5_fixtures.py); these tests need no torch.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import axes
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import encoder as encoder_lib
from imagen_jax.text import hf_loader
from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.t5 import T5Encoder

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
WORDS = "a cute corgi lives in house made of sushi".split()
FSDP_RULES = mesh_lib.preset_rules("dp", [(axes.EMBED, "data")])


def _expected(name):
    return np.load(FIXTURES / f"t5_tiny_{name}" / "expected.npz")


def _encode(folder, dtype=jnp.float32, mesh=None, rules=None):
    config = hf_loader.read_t5_config(folder)
    params = hf_loader.load_t5_params(folder, config, dtype, mesh, rules)
    module = T5Encoder(config, dtype=dtype, param_dtype=dtype)
    exp = _expected(folder.name.removeprefix("t5_tiny_")) if folder.parent == FIXTURES else None
    return module, params, exp


def _copy_fixture(name, tmp_path):
    dst = tmp_path / f"t5_tiny_{name}"
    shutil.copytree(FIXTURES / f"t5_tiny_{name}", dst)
    return dst


def _write_word_tokenizer(folder):
    # A tiny fast tokenizer (tokenizer.json) with T5's special ids, so the folder is a complete checkpoint.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    special = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(tokenizer_class="PreTrainedTokenizerFast",
                                                                  **special)))


@pytest.mark.parametrize("name", ["relu", "gated", "sharded"])
def test_parity_with_pytorch(name):
    module, params, exp = _encode(FIXTURES / f"t5_tiny_{name}")
    ids, mask = exp["input_ids"], exp["attention_mask"]
    out = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))
    err = np.abs(out - exp["last_hidden_state"]).max()
    assert err <= 1e-4, f"{name}: max abs error {err:.2e}"
    # encode_tokens: same values at real tokens, zeros at padding.
    emb = np.asarray(jax.jit(encoder_lib.encode_tokens, static_argnums=0)(module, params, ids, mask))
    np.testing.assert_allclose(emb[mask], exp["last_hidden_state"][mask], atol=1e-4)
    assert not emb[~mask].any()


def test_sharded_checkpoint_reads_encoder_only(monkeypatch):
    folder = FIXTURES / "t5_tiny_sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 2 and any(k.startswith("decoder.") for k in index)
    assert len({f for k, f in index.items() if k.startswith("encoder.")}) == 2  # encoder spans both
    read = []
    original = hf_loader.SafetensorsFile.read
    monkeypatch.setattr(hf_loader.SafetensorsFile, "read",
                        lambda self, name, *a: read.append(name) or original(self, name, *a))
    _encode(folder)
    assert read and not any(n.startswith(("decoder.", "lm_head")) for n in read)
    assert len(read) == 2 + 1 + 9 * 3  # shared, rel bias, final norm + 9 tensors per layer


def test_mesh_sharded_load_matches_unsharded():
    mesh = mesh_lib.make_mesh([("data", -1)])
    assert mesh.size == 8
    folder = FIXTURES / "t5_tiny_gated"
    module, sharded, exp = _encode(folder, mesh=mesh, rules=FSDP_RULES)
    _, plain, _ = _encode(folder)
    q = sharded["block_0"]["attention"]["q"]["kernel"]
    assert q.sharding == NamedSharding(mesh, P("data", None))
    assert {s.data.shape for s in q.addressable_shards} == {(4, 32)}  # d_model 32 over 8 devices
    assert sharded["block_2"]["mlp"]["wo"]["kernel"].sharding.spec == P(None, "data")
    assert sharded["shared"]["embedding"].sharding.spec == P(None, "data")
    assert sharded["final_norm"]["scale"].sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids, mask = exp["input_ids"], exp["attention_mask"]
    fn = jax.jit(encoder_lib.encode_tokens, static_argnums=0)
    # Same parameters bit for bit; outputs differ only by the order of sharded partial sums.
    np.testing.assert_allclose(np.asarray(fn(module, sharded, ids, mask)),
                               np.asarray(fn(module, plain, ids, mask)), atol=1e-5)


def test_bfloat16_load():
    module, params, exp = _encode(FIXTURES / "t5_tiny_gated", dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    out = np.asarray(jax.jit(module.apply)({"params": params}, exp["input_ids"], exp["attention_mask"]))
    assert np.abs(out - exp["last_hidden_state"]).max() < 0.1


def test_load_t5_encoder_with_folder_tokenizer_and_build(tmp_path):
    folder = _copy_fixture("gated", tmp_path)
    _write_word_tokenizer(folder)
    te = hf_loader.load_t5_encoder(folder, max_length=8)
    assert te.embed_dim == 32 and te.max_length == 8
    emb, mask = te.encode(["a cute corgi", ""])
    assert emb.shape == (2, 8, 32) and mask[0].tolist() == [True] * 4 + [False] * 4 and not mask[1].any()
    # The same ids through the raw module equal the checkpoint's outputs for them.
    ids = jnp.asarray([[3, 4, 5, 1]])
    ref = jax.jit(te.module.apply)({"params": te.params}, ids, ids > 0)
    np.testing.assert_allclose(np.asarray(emb[0, :4]), np.asarray(ref[0]), atol=1e-6)
    with pytest.raises(TypeError, match="prompt 1 is bytes"):
        te.encode(["a", b"b"])
    with pytest.raises(ValueError, match="empty"):
        te.encode([])
    # build_text_encoder dispatches on a path.
    cfg = ml_collections.ConfigDict(dict(encoder=str(folder), tokenizer="", max_length=8, dtype="float32"))
    built = build_text_encoder(cfg)
    np.testing.assert_array_equal(np.asarray(built.encode(["a cute corgi", ""])[0]), np.asarray(emb))


def test_hub_id_from_local_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--imagen-test--t5-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(FIXTURES / "t5_tiny_gated", repo / "snapshots" / commit)
    _write_word_tokenizer(repo / "snapshots" / commit)
    te = hf_loader.load_t5_encoder("imagen-test/t5-tiny", cache_dir=tmp_path / "hub", max_length=8)
    assert te.module.config.num_layers == 3
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache.*hf download imagen-test/o"):
        hf_loader.load_t5_encoder("imagen-test/other", cache_dir=tmp_path / "hub")


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder /no/such/t5 not found"):
        hf_loader.load_t5_encoder("/no/such/t5")
    folder = _copy_fixture("sharded", tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-00002.safetensors .* is missing"):
        _encode(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00002.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.*safetensors only"):
        _encode(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_loader.load_t5_encoder(folder, tokenizer="byte")
    folder = _copy_fixture("gated", tmp_path)  # no tokenizer files in the fixture
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        hf_loader.load_t5_encoder(folder)


def test_truncated_shard(tmp_path):
    folder = _copy_fixture("sharded", tmp_path)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model-00001-of-00002.safetensors is truncated.*download it again"):
        _encode(folder)
    shard.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        _encode(folder)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(d_ff=80), r"DenseReluDense.wi_0.weight has shape \(64, 32\).*implies \(80, 32\)"),
        (dict(vocab_size=100), r"shared.weight has shape \(96, 32\)"),
        (dict(feed_forward_proj="relu"), r"do not belong to a T5 encoder with feed_forward='relu'"),
        (dict(num_layers=4), r"tensors \['encoder.block.3.* missing"),
        (dict(feed_forward_proj="gated-silu"), r"config.json: feed_forward_proj='gated-silu' is not supp"),
        (dict(model_type="umt5"), r"model_type='umt5' is not supported"),
    ],
)
def test_mismatched_config(tmp_path, change, match):
    folder = _copy_fixture("gated", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        _encode(folder)


def test_rules_that_do_not_divide_leave_the_dimension_replicated():
    # 4 heads do not split over 8 devices: the relative-attention table stays whole on every device, and
    # the q/k/v/o kernels (heads x kv = 32) split by the next rule that divides.
    mesh = mesh_lib.make_mesh([("data", -1)])
    rules = mesh_lib.preset_rules("dp", [(axes.HEADS, "data"), (axes.EMBED, "data")])
    folder = FIXTURES / "t5_tiny_sharded"
    params = hf_loader.load_t5_params(folder, hf_loader.read_t5_config(folder), mesh=mesh, rules=rules)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    bias = next(v for k, v in flat.items() if k.endswith("relative_attention_bias/embedding"))
    assert bias.shape == (32, 4) and bias.sharding.spec == P()
    assert any(v.sharding.spec != P() for v in flat.values())


def test_encode_cli(tmp_path, capsys):
    from imagen_jax.text import encode

    folder = _copy_fixture("gated", tmp_path)
    _write_word_tokenizer(folder)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('prompt,category\na cute corgi,x\n"sushi, house made of sushi",y\n,z\n')
    out = tmp_path / "emb.npz"
    assert encode.main(["--t5", str(folder), "--prompts_file", str(prompts), "--out", str(out),
                        "--max_length", "16", "--batch_size", "2"]) == 0
    assert "3 prompts" in capsys.readouterr().out
    saved = np.load(out)
    assert saved["prompts"].tolist() == ["a cute corgi", "sushi, house made of sushi", ""]
    assert saved["embeddings"].shape == (3, 7, 32)  # trimmed to the longest prompt (5 words, ",", EOS)
    assert saved["mask"].sum(1).tolist() == [4, 7, 0]
    ref, _ = hf_loader.load_t5_encoder(folder, max_length=16).encode(["a cute corgi"])
    np.testing.assert_allclose(saved["embeddings"][0], np.asarray(ref)[0, :7], atol=1e-6)
