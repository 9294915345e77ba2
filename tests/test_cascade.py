"""Super-resolution stages and the cascade: an SR stage trains on crops and samples whole images, the
pipeline runs text -> base -> SR with the text encoded once, and refuses stages that do not fit; the shapes
evaluations of one stage (both caption sets) and of the cascade."""

import ast
import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shapes, shapes_sr
from imagen_jax.cascade.pipeline import Cascade
from imagen_jax.cascade.sampling_cli import sample_to_grid
from imagen_jax.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import sampling
from imagen_jax.text import pretrain
from imagen_jax.text.build import learned_tokenizer_file, pretrained_folder
from imagen_jax.text.encoder import init_params, t5_config_from_dict
from imagen_jax.text.t5 import T5Encoder
from imagen_jax.text.tokenizers import train_sentencepiece
from imagen_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _base_config(data_dir):
    config = shapes.get_config("tiny")
    config.text.train_jointly = False  # a frozen encoder, shared with the SR stage as in the paper
    config.model.num_res_blocks = 2  # two identical blocks a level: a layout `scan_blocks` changes
    config.train.update(num_steps=2, checkpoint_every=2)
    config.data.data_dir = data_dir
    return config


def _sr_config(data_dir):
    config = shapes_sr.get_config("tiny")
    config.train.update(num_steps=2, checkpoint_every=2, sample_every=2)
    config.data.data_dir = data_dir
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base stage (32x32) and a tiny crop-trained SR stage (32 -> 64 on 32x32 crops), 2 steps each."""
    root = tmp_path_factory.mktemp("cascade")
    data = str(root / "data")
    loop.train_and_evaluate(_base_config(data), str(root / "base"))
    loop.train_and_evaluate(_sr_config(data), str(root / "sr"))
    return root


def test_sr_stage_trains_on_crops_and_samples_whole_images_compiling_once_per_size(trained):
    # The training preview sampled the first batch's 16x16 low-res crops at the 32x32 crop size.
    preview = trained / "sr" / "samples" / "step_0000002.png"
    assert preview.is_file()
    stage = stage_lib.load_stage(str(trained / "sr"))
    assert stage.step == 2 and stage.resolution == 64 and stage.config.data.crop_resolution == 32
    rng = np.random.default_rng(0)
    lowres = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square"]
    images = sampling.generate(stage, prompts, rng=jax.random.PRNGKey(0), lowres=lowres, num_steps=2)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    program = sampling.sample_program(stage.config.xla_options)
    compiled = program._cache_size()
    other = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    again = sampling.generate(
        stage, prompts, rng=jax.random.PRNGKey(0), lowres=other, num_steps=2, aug_level=0.3, guidance=2.0
    )
    assert program._cache_size() == compiled  # new inputs, level and weight: the same program
    assert not np.array_equal(again, images)
    with pytest.raises(ConfigError, match="low-res images"):
        sampling.generate(stage, prompts, rng=jax.random.PRNGKey(0), num_steps=2)
    with pytest.raises(ConfigError, match="outside"):
        sampling.generate(stage, prompts, rng=jax.random.PRNGKey(0), lowres=lowres, aug_level=1.5)


def test_a_stage_trained_unrolled_samples_the_same_images_scanned(trained):
    unrolled = stage_lib.load_stage(str(trained / "base"))
    scanned = stage_lib.load_stage(str(trained / "base"), scan_blocks=True)
    assert not unrolled.unet.scan_blocks and scanned.unet.scan_blocks and scanned.config.model.scan_blocks
    runs = [r for r in scanned.unet.block_runs() if r.count > 1]
    assert runs and all(r.scan_name in scanned.params["unet"] for r in runs)
    prompts = ["a red circle", "a small blue square"]
    images = [
        sampling.generate(stage, prompts, rng=jax.random.PRNGKey(0), num_steps=3, guidance=2.0)
        for stage in (unrolled, scanned)
    ]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1  # uint8 rounding at most
    # Training resumes only in the layout it was trained in (the optimizer state has that layout too).
    config = _base_config(str(trained / "data"))
    config.model.scan_blocks = True
    with pytest.raises(CheckpointError, match=r"model.scan_blocks: checkpoint False vs config True"):
        stage_lib.load_stage(str(trained / "base"), config=config)


def test_the_cascade_samples_text_to_base_to_sr_with_the_text_encoded_once(trained, tmp_path, monkeypatch):
    encoded = []
    real = sampling.encode_prompts

    def counting(stage, prompts):
        encoded.append(len(prompts))
        return real(stage, prompts)

    monkeypatch.setattr("imagen_jax.cascade.pipeline.encode_prompts", counting)
    monkeypatch.setattr(sampling, "encode_prompts", counting)
    out = tmp_path / "grid.png"
    png, txt = sample_to_grid(
        str(trained / "base"),
        prompts=["a red circle", "a small blue square"],
        prompts_file=None,
        num=2,
        out=str(out),
        num_steps=2,
        sr_workdirs=[str(trained / "sr")],
        sr_options=[{"num_steps": 2, "aug_level": 0.1}],
    )
    assert encoded == [4]  # once, for both stages
    for name in ("grid.png", "grid.txt", "grid.stage1_32px.png", "grid.stage2_64px.png", "grid.stages.png"):
        assert (tmp_path / name).is_file(), name
    assert png == str(out) and txt.endswith("grid.txt")
    # One image per prompt (a DrawBench-style sheet): eight a row, not a one-column strip.
    sheet, sheet_txt = sample_to_grid(
        str(trained / "base"), prompts=[f"prompt {i}" for i in range(10)], prompts_file=None, num=1,
        out=str(tmp_path / "sheet.png"), num_steps=2,
    )
    from PIL import Image

    with Image.open(sheet) as img:  # 32x32 images, 2-pixel gaps, shown at 2x: 8 columns, 2 rows
        assert img.size == ((8 * 34 + 2) * 2, (2 * 34 + 2) * 2)
    assert open(sheet_txt).read().splitlines()[9] == "9\tprompt 9"

    cascade = Cascade.load([str(trained / "base"), str(trained / "sr")])
    outputs = cascade.sample(["a red circle"] * 2, rng=jax.random.PRNGKey(3), options=[{"num_steps": 2}] * 2)
    assert [o.shape for o in outputs] == [(2, 32, 32, 3), (2, 64, 64, 3)]
    prefix = Cascade.load([str(trained / "base")]).sample(["a red circle"], rng=jax.random.PRNGKey(3))
    assert len(prefix) == 1 and prefix[0].shape == (1, 32, 32, 3)


def _built(config):
    return stage_lib.build_stage(config)


def test_the_cascade_refuses_stages_that_do_not_fit(trained, tmp_path):
    data = str(tmp_path / "data")
    base, sr = _built(_base_config(data)), _built(_sr_config(data))
    with pytest.raises(ConfigError, match=r"stage 1 \(sr\) is a super-resolution stage"):
        Cascade((sr, base), ("sr", "base")).check()
    with pytest.raises(ConfigError, match=r"stage 2 \(base2\) is a base stage"):
        Cascade((base, base), ("base", "base2")).check()
    wrong = _sr_config(data)
    wrong.data.update(resolution=32, lowres_resolution=16, crop_resolution=0)
    with pytest.raises(ConfigError, match=r"upsamples 16x16 images, but stage 1 \(base\) makes 32x32"):
        Cascade((base, _built(wrong)), ("base", "sr16")).check()
    other_text = _sr_config(data)
    other_text.text.seed = 7
    with pytest.raises(ConfigError, match=r"another text encoder than stage 1 \(text.seed: 1 vs 7\)"):
        Cascade((base, _built(other_text)), ("base", "sr")).check()
    Cascade((base, _built(other_text)), ("base", "sr"), share_text=False).check()  # encoded per stage: fine

    def pretrained_in_run(config, workdir, seed):  # as train.py leaves it, with seeded weights
        config.text.encoder = "pretrain"
        t5 = t5_config_from_dict(config.text.t5)
        params = init_params(T5Encoder(t5), jax.random.PRNGKey(seed))
        pretrain.save_encoder(pretrained_folder(workdir), t5, params)
        return stage_lib.build_stage(config, workdir=str(workdir))

    base_pt = pretrained_in_run(_base_config(data), tmp_path / "a", 0)
    Cascade((base_pt, pretrained_in_run(_sr_config(data), tmp_path / "b", 0)), ("base", "sr")).check()
    with pytest.raises(ConfigError, match=r"\(each stage pretrained its own T5 .* different weights\)"):
        Cascade((base_pt, pretrained_in_run(_sr_config(data), tmp_path / "c", 1)), ("base", "sr")).check()
    with pytest.raises(ConfigError, match=r"text_encoder/config.json does not exist: train.py pretrains it"):
        stage_lib.build_stage(base_pt.config, workdir=str(tmp_path / "d"))

    def learned_vocabulary(config, workdir, texts):  # as train.py leaves it
        config.text.tokenizer = "captions"
        vocab_size = config.text.learned_tokenizer.vocab_size
        train_sentencepiece(texts, learned_tokenizer_file(workdir), vocab_size=vocab_size)
        return stage_lib.build_stage(config, workdir=str(workdir))

    texts = ["a red circle", "a large blue square above a green triangle"] * 50
    base_v = learned_vocabulary(_base_config(data), tmp_path / "e", texts)
    sr_same = learned_vocabulary(_sr_config(data), tmp_path / "f", texts)
    sr_other = learned_vocabulary(_sr_config(data), tmp_path / "g", texts + ["a yellow square"] * 50)
    Cascade((base_v, sr_same), ("base", "sr")).check()
    with pytest.raises(ConfigError, match=r"each stage learned its own vocabulary .* and they differ"):
        Cascade((base_v, sr_other), ("base", "sr")).check()
    with pytest.raises(ConfigError, match=r"tokenizer/spiece.model does not exist: train.py learns it"):
        stage_lib.build_stage(base_v.config, workdir=str(tmp_path / "h"))
    with pytest.raises(CheckpointNotFoundError, match="cascade stage 2 has no trained weights"):
        Cascade.load([str(trained / "base"), str(tmp_path / "untrained")])


def _imported_packages(package: pathlib.Path) -> set[str]:
    names = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
    return {n.split(".")[1] for n in names if n.startswith("imagen_jax.") and n.count(".") >= 1}


def test_the_stage_package_imports_neither_training_nor_the_cascade():
    assert not _imported_packages(ROOT / "imagen_jax" / "stage") & {"training", "cascade", "evaluation"}
    code = (
        "import sys, imagen_jax.stage.build, imagen_jax.stage.sampling, imagen_jax.stage.checkpoint; "
        "print(sorted(m for m in sys.modules if m.startswith(('imagen_jax.training', 'imagen_jax.cascade'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sr_evaluation_measures_psnr_colour_shift_and_cascade_scores(trained, tmp_path):
    from imagen_jax.evaluation import shapes_sr

    truth = np.full((2, 8, 8, 3), 100, np.uint8)
    noisy = truth.copy()
    noisy[:, 0, 0, 0] = 116  # squared error 256 in 1 of 192 values: PSNR = 10 log10(255^2 * 192 / 256)
    np.testing.assert_allclose(shapes_sr.psnr(noisy, truth), 10 * np.log10(255**2 * 192 / 256))
    brighter = np.clip(truth.astype(int) + [3, 0, -2], 0, 255).astype(np.uint8)
    np.testing.assert_allclose(shapes_sr.colour_shift(brighter, truth[:, :4, :4]), [[3, 0, -2]] * 2)
    square = np.zeros((1, 16, 16, 3), np.uint8)
    square[:, 4:12, 4:12] = 200
    assert shapes_sr.edge_sharpness(square, square)[0] == pytest.approx(1.0)
    blurred = (square.astype(int) + np.roll(square, 1, axis=1) + np.roll(square, 1, axis=2)) // 3
    assert shapes_sr.edge_sharpness(blurred, square)[0] < 0.8
    grainy = square.copy()
    grainy[:, 0, ::2] = 30  # grain in the flat background, off the edges: not counted
    assert shapes_sr.edge_sharpness(grainy, square)[0] == pytest.approx(1.0)

    sr = stage_lib.load_stage(str(trained / "sr"))
    base = stage_lib.load_stage(str(trained / "base"))
    result = shapes_sr.evaluate_super_resolution(
        sr, num_scenes=8, batch_size=8, seed=0, out_dir=str(tmp_path), compile_first=True
    )
    assert result["num_scenes"] == 8 and np.isfinite(result["psnr_gain_db"]["mean"])
    assert len(result["psnr_gain_db_per_scene"]) == 8 and result["images_per_second"] > 0
    assert result["edge_sharpness_bicubic"]["mean"] < 1
    assert (tmp_path / "sr_from_truth.png").is_file()
    base_samples = shapes_sr.sample_base(base, num_captions=8, batch_size=8, seed=0)
    cascade = shapes_sr.evaluate_cascade(base_samples, sr, batch_size=8, seed=0, out_dir=str(tmp_path))
    assert cascade["base"]["overall"]["count"] == cascade["cascade"]["overall"]["count"] == 8
    assert (tmp_path / "cascade.png").is_file()


def test_sr_evaluation_sweeps_samplers_and_steps_against_the_first(trained, tmp_path, capsys):
    from imagen_jax.evaluation import shapes_sr

    out = tmp_path / "sr_eval.json"
    workdir = trained / "sr"
    args = ["--workdir", str(workdir), "--base_workdir", str(trained / "base"), "--num", "4"]
    shapes_sr.main([*args, "--sampler", "ddpm,dpmpp2m", "--steps", "3,2", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["ddpm_3_uniform", "ddpm_2_uniform", "dpmpp2m_3_uniform", "dpmpp2m_2_uniform"]
    for run in runs.values():
        assert len(run["from_truth"]["psnr_gain_db_per_scene"]) == 4
        assert run["cascade"]["cascade"]["overall"]["count"] == 4
    # The same scenes in every row: the reference's paired difference with itself is exactly zero, and
    # another sampler's is the mean of the per-scene differences.
    first, other = runs["ddpm_3_uniform"]["from_truth"], runs["dpmpp2m_2_uniform"]["from_truth"]
    assert shapes_sr.paired_difference(first, first) == {"mean": 0.0, "stderr": 0.0}
    expected = np.mean(np.subtract(other["psnr_gain_db_per_scene"], first["psnr_gain_db_per_scene"]))
    assert shapes_sr.paired_difference(other, first)["mean"] == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "| ddpm_3_uniform | " in printed and "| +0.00 ± 0.00 |" in printed
    assert "| dpmpp2m_2_uniform | " in printed and "edge sharpness" in printed
    assert (workdir / "eval" / "sr_from_truth_dpmpp2m_2_uniform.png").is_file()
    assert (workdir / "eval" / "cascade_ddpm_3_uniform.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        shapes_sr.main([*args, "--steps", "10,0"])
    assert exit_info.value.code == 2
    assert "argument --steps" in capsys.readouterr().err


def test_shapes_evaluation_scores_the_same_scenes_in_both_caption_sets(
    trained, tmp_path, capsys, monkeypatch
):
    from imagen_jax.evaluation import shapes as shapes_eval

    # The sampling program compiles once, before the first timed call, at the batch the timed calls pad
    # to (more than the 4 scenes here): images/s is sampling alone.
    calls = []

    def recorded(name):
        original = getattr(shapes_eval, name)

        def call(stage, *args, **kwargs):
            program = sampling.sample_program(stage.config.get("xla_options"))
            programs = program._cache_size()
            out = original(stage, *args, **kwargs)
            calls.append((name, program._cache_size() - programs))
            return out

        return call

    for name in ("compile_sampler", "generate"):
        monkeypatch.setattr(shapes_eval, name, recorded(name))
    out = tmp_path / "eval.json"
    args = ["--workdir", str(trained / "base"), "--num", "4", "--guidance", "1", "--steps", "2"]
    shapes_eval.main([*args, "--wordings", "standard,heldout", "--out", str(out)])
    assert [name for name, _ in calls] == ["compile_sampler", "generate", "generate"]
    assert [new_programs for _, new_programs in calls[1:]] == [0, 0]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"ddpm_2_standard", "ddpm_2_heldout"}
    for by_weight in runs.values():
        assert by_weight["guidance_1"]["overall"]["count"] == 4
    printed = capsys.readouterr().out
    assert "== heldout captions, guidance 1 (4 scenes" in printed
    assert "| ddpm_2_heldout | 1 |" in printed
    assert (trained / "base" / "eval" / "samples_ddpm_2_heldout_guidance_1.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        shapes_eval.main([*args, "--wordings", "casual"])
    assert exit_info.value.code == 2
    assert "error: argument --wordings: 'casual' is not one of standard, heldout" in capsys.readouterr().err

    # Rates with their binomial standard errors; the relation's is over the scenes where both were found.
    table = {
        "one_object": {"count": 100, "colour": 0.9, "size": 1.0, "shape": 0.5},
        "two_objects": {
            "count": 50, "all_correct": 0.1, "relation": 0.5, "relation_count": 4, "found": 0.0,
            "order_swapped": 0.25,
        },
        "images_per_second": 2.0,
    }
    row = shapes_eval.summary_table({"run": {"guidance_1.5": table}}).splitlines()[2]
    assert row == (
        "| run | 1.5 | 90.0 ± 3.0% | 100.0 ± 0.0% | 50.0 ± 5.0% | 10.0 ± 4.2% | 50.0 ± 25.0% | 0.0 ± 0.0% "
        "| 25.0 ± 21.7% | 2.00 |"
    )


def test_the_evaluations_refuse_a_workdir_of_the_other_kind_of_stage(trained, monkeypatch):
    from imagen_jax.evaluation import shapes as shapes_eval
    from imagen_jax.evaluation import shapes_sr

    base, sr = str(trained / "base"), str(trained / "sr")
    base_re, sr_re = re.escape(base), re.escape(sr)
    with pytest.raises(ConfigError, match=rf"--workdir {sr_re} holds a super-resolution stage \(32 -> 64\); "
                       rf"this command needs a base stage there\. .*evaluation.shapes_sr --workdir {sr_re}"):
        shapes_eval.main(["--workdir", sr, "--num", "2"])
    with pytest.raises(ConfigError, match=rf"--workdir {base_re} holds a base stage \(32x32\); this command "
                       rf"needs a super-resolution stage there\. .*evaluation.shapes --workdir {base_re}"):
        shapes_sr.main(["--workdir", base, "--num", "2"])
    with pytest.raises(ConfigError, match=rf"--base_workdir {sr_re} holds a super-resolution stage"):
        shapes_sr.main(["--workdir", sr, "--base_workdir", sr, "--num", "2"])

    def base_at_16(workdir, step=None):  # a base stage that samples another size than the SR stage takes
        stage = stage_lib.load_stage(workdir, step=step)
        if workdir != base:
            return stage
        config = stage.config.copy_and_resolve_references()
        config.data.resolution = 16
        return dataclasses.replace(stage, config=config)

    monkeypatch.setattr(shapes_sr, "load_stage", base_at_16)
    with pytest.raises(ConfigError, match=r"holds a base stage \(16x16\), but the SR stage upsamples 32x32 "
                       r"images: pass a base stage trained at config.data.resolution=32"):
        shapes_sr.main(["--workdir", sr, "--base_workdir", base, "--num", "2"])
