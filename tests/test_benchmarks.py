"""The benchmarks run on CPU at tiny sizes and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.mfu import NO_PEAK, FlopShape, flop_shape, mfu_text, peak_tflops, resolve_peak, training_flops
from lit_modules.causal_lm import CausalLMConfig, build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]

KEYS = (
    "context", "train_warmup_seconds", "train_seconds", "train_tokens_per_s", "test_seconds", "test_tokens_per_s",
    "sample_warmup_seconds", "sample_seconds", "sample_tokens_per_s", "rare_words_seconds", "score_seconds",
    "score_stories_per_s", "score_tokens_per_s", "train_mean_tokens", "sample_mean_tokens",
    "projected_minutes_per_generation_published",
)  # fmt: skip


def test_tinystories_generation_benchmark_prints_each_phase_and_the_projection(tmp_path):
    env = {**os.environ, "MODEL_COLLAPSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tinystories_generation.py"), "--device", "cpu"]
    cmd += ["--preset", "gpt2-tiny", "--stories", "16", "--vocab_size", "320", "--batch_size", "8", "--chunk", "6"]
    cmd += ["--sample_stories", "10"]
    cmd += ["--train_warmup", "2"]  # a throwaway model's first steps, timed apart (compiling, on a GPU)
    cmd += ["--lr", "3e-3", "--warmup_steps", "1"]  # a short run's schedule
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and "  " not in line)
    for key in KEYS:
        assert key in values, proc.stdout
    assert values["context"] == "256"  # the laptop preset's context
    assert values["sampling_slots"] == "64" and values["sampling_chunk"] == "6"  # the CPU's 64; chunks of 6, 4
    assert (values["stories"], values["sample_stories"]) == ("16", "10")
    assert all(float(values[k]) > 0 for k in KEYS)
    assert proc.stdout.strip().splitlines()[-1].startswith("projected_minutes_per_generation_published: ")
    assert "backend: native" in proc.stdout and "pack: False  compile: False" in proc.stdout  # a CPU's defaults
    assert values["train_mfu"] == NO_PEAK  # a CPU: no peak to divide by
    assert (values["lr"], values["warmup_steps"]) == ("0.003", "1")  # the flags reach the model's schedule
    assert 0 <= float(values["sample_finished_fraction"]) <= 1
    # The projection from the printed phases (4 significant digits each): every phase at the published sizes, at
    # the training stories' mean length (sampling too: a trained model draws stories like its corpus), plus the
    # warm-ups once.
    v = {key: float(values[key]) for key in KEYS}
    stories, test_stories, t = 2_120_000, 21_990, v["train_mean_tokens"]
    by_hand = (
        stories * t / v["train_tokens_per_s"]
        + test_stories * t / v["test_tokens_per_s"]
        + stories * t / v["sample_tokens_per_s"]
        + stories * t / v["score_tokens_per_s"]
        + v["sample_warmup_seconds"]
        + v["train_warmup_seconds"]
    ) / 60
    assert v["projected_minutes_per_generation_published"] == pytest.approx(by_hand, rel=3e-3)
    assert values["mfu_counting"].startswith("6*N + 12*n_layer*d_attn*T FLOPs per real token")


def test_the_memory_bound_of_a_draw_by_hand():
    from benchmarks.lm_generation import memory_bound_lines
    from benchmarks.mfu import resolve_bandwidth
    from samplers.story_sampler import SamplingConfig, StorySampler

    torch.manual_seed(0)
    model = build_model(CausalLMConfig(preset="gpt2-tiny", vocab_size=64))
    sampler = StorySampler(model, SamplingConfig(batch_size=2), max_len=16)
    sampler.last_draw = {"steps": 10, "slots": 2, "attended": 100}
    lengths = np.array([4, 6])  # 3 * 4 / 2 + 5 * 6 / 2 = 21 position reads
    lines = memory_bound_lines(model, sampler, lengths, 2.0, torch.device("cpu"), 1.0)
    weights = flop_shape(model).matmul_params * 4  # float32 on a CPU
    per_position = 2 * 2 * 32 * 4  # keys and values, 2 layers, width 32, 4 bytes
    least = 10 * weights + 21 * per_position
    assert f"{least / 1e9:.2f} GB to read at least" in lines[0] and "10 steps at 2 slots" in lines[0]
    assert lines[1].startswith("kv_read_efficiency: 0.210 ")
    assert lines[2].startswith(f"memory_bound_fraction: {least / 1e12 / 2.0:.3f} (at least ")
    no_peak = memory_bound_lines(model, sampler, lengths, 2.0, torch.device("cpu"), None)
    assert no_peak[2] == "memory_bound_fraction: n/a (bandwidth: none known for a CPU; pass --bandwidth_tbs)"
    assert resolve_bandwidth("cpu", 3.0) == (3.0, "--bandwidth_tbs")
    from benchmarks.mfu import peak_memory_tbs

    assert peak_memory_tbs("NVIDIA H100 80GB HBM3") == 3.35 and peak_memory_tbs("NVIDIA H200") == 4.8
    assert peak_memory_tbs("NVIDIA H100 PCIe") is None and peak_memory_tbs("NVIDIA A100-SXM4-80GB") == 2.039


def test_flop_count_of_gpt2_2m_by_hand():
    with torch.device("meta"):  # the architecture only
        model = build_model(CausalLMConfig(preset="gpt2-2m"))
    shape = flop_shape(model)
    v, d, layers, positions = 8000, 128, 4, 512
    # Non-embedding parameters (the built model less its token and position embeddings), plus the tied output
    # head, a d x V multiply on every token: V d + L (12 d^2 + 13 d) + 2 d (lit_modules/causal_lm.py).
    non_embedding = count_parameters(model) - v * d - positions * d
    assert non_embedding == layers * (12 * d * d + 13 * d) + 2 * d
    assert shape == FlopShape(matmul_params=non_embedding + v * d, n_layer=layers, d_attn=d)
    assert shape.matmul_params == 1_817_344
    # Two stories of 3 and 5 real tokens: 6 N (3 + 5) + 12 L d (3^2 + 5^2).
    assert training_flops(shape, [3, 5]) == 6 * 1_817_344 * 8 + 12 * layers * d * (9 + 25)


def test_flop_count_of_an_untied_llama_leaves_out_only_the_input_embedding():
    with torch.device("meta"):
        model = build_model(CausalLMConfig(preset="tiny", vocab_size=64))
    shape = flop_shape(model)
    assert shape.matmul_params == count_parameters(model) - 64 * 32  # the lm_head (64 x 32) stays in
    assert (shape.n_layer, shape.d_attn) == (2, 32)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA L40S", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table_by_device_name(name, peak):
    assert peak_tflops(name) == peak


def test_mfu_needs_a_peak():
    assert resolve_peak("cpu", None) == (None, "none known for a CPU")
    assert resolve_peak("cpu", 2.0) == (2.0, "--peak_tflops")
    assert mfu_text(1e12, None) == NO_PEAK
    assert mfu_text(0.5e12, 2.0) == "0.250"


def test_the_training_benchmark_counts_packed_batches_as_the_stories_they_hold():
    from benchmarks.lm_training import Counter
    from lit_modules.causal_lm import CausalLMModule

    gen = torch.Generator().manual_seed(0)
    lengths = [17, 3, 9, 12, 5, 2, 20]
    ids = torch.full((len(lengths), max(lengths)), 1)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = torch.randint(2, 64, (n,), generator=gen), 1
    batch = {"input_ids": ids, "attention_mask": mask}
    shape = FlopShape(matmul_params=1000, n_layer=2, d_attn=16)
    counts = []
    for pack in (False, True):
        module = CausalLMModule(preset="tiny", vocab_size=64, pack=pack, pad_token_id=1)
        ready = module.host_batch(batch)
        assert ("story_ids" in ready) == pack
        counter = Counter(shape)
        counter.add(ready)
        counter.add(ready)
        counts.append(counter.totals())
    assert counts[0] == counts[1] == (2 * sum(lengths), 2 * training_flops(shape, lengths))


@pytest.mark.parametrize("extra", [[], ["--pack"], ["--precision", "bf16-true"]])
def test_training_benchmark_prints_the_mfu_of_each_path_and_keeps_its_last_line(tmp_path, extra):
    env = {**os.environ, "MODEL_COLLAPSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lm_training.py"), "--device", "cpu", "--preset", "gpt2-tiny"]
    cmd += ["--stories", "48", "--batch_size", "8", "--steps", "3", "--warmup", "1", "--repeats", "1"]
    cmd += ["--max_seq_len", "64", "--peak_tflops", "1", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    values = dict(line.split(": ", 1) for line in lines if ": " in line)
    assert "peak: 1 TFLOP/s dense bf16 (--peak_tflops)" in values["mfu_counting"]
    assert 0 < float(values["plain_loop_mfu"]) < 1 and 0 < float(values["lightning_mfu"]) < 1
    assert lines[-1].startswith("lightning_vs_plain_loop: ") and float(values["lightning_vs_plain_loop"]) > 0
    runs = [line for line in lines if " run 1: " in line]  # each path's run, printed as soon as it ends
    assert [line.split(" run ")[0] for line in runs] == ["plain loop", "lightning"]
    assert all(" tokens/s, mfu 0." in line for line in runs)
    # Each path's batches: their distinct shapes (3 timed steps: 1 to 3) and the real tokens' share of positions.
    for path in ("plain loop", "lightning"):
        text = values[f"{path} batches"]
        shapes, share = int(text.split(" shapes")[0]), float(text.split("real tokens ")[1].split("%")[0])
        assert 1 <= shapes <= 3 and 0 < share <= 100
    assert values["plain loop batches"] == values["lightning batches"]  # the same batches, the same way
    assert f"precision: {extra[1] if '--precision' in extra else '32-true'}," in values["torch threads"]


def test_both_training_paths_see_the_same_batches_over_several_epochs(tmp_path):
    # 20 stories in batches of 4: 5 per epoch, 12 steps: three epochs, each reshuffled the same way on both paths
    # (the batches' shapes and padding differ between orders, so the batch lines tell them apart).
    env = {**os.environ, "MODEL_COLLAPSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lm_training.py"), "--device", "cpu", "--preset", "gpt2-tiny"]
    cmd += ["--stories", "20", "--batch_size", "4", "--steps", "11", "--warmup", "1", "--repeats", "1"]
    cmd += ["--max_seq_len", "512", "--peak_tflops", "1"]  # whole stories: each batch pads to its longest
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert values["plain loop batches"] == values["lightning batches"]


def test_training_benchmark_takes_only_precisions_its_plain_loop_computes_as_lightning_does(capsys):
    from benchmarks.lm_training import parse_args

    assert parse_args(["--device", "cpu", "--precision", "bf16-true"]).precision == "bf16-true"
    with pytest.raises(SystemExit):  # 16-mixed needs a gradient scaler, which the plain loop does not have
        parse_args(["--device", "cpu", "--precision", "16-mixed"])
    assert "invalid choice: '16-mixed'" in capsys.readouterr().err


def test_compile_statistics_count_graphs_and_breaks_and_are_printed_with_compile(capsys):
    from types import SimpleNamespace

    from benchmarks.lm_training import compile_stats, parse_args, report_compiles

    graphs, breaks = compile_stats()

    def with_a_break(x):
        y = x * 2
        print("", end="")  # a graph break: two graphs
        return y + 1

    fn = torch.compile(with_a_break, backend="eager")
    assert torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0))
    now_graphs, now_breaks = compile_stats()
    assert now_graphs - graphs == 2 and now_breaks - breaks >= 1
    report_compiles("plain loop", now_graphs - 2, SimpleNamespace(compile=True))
    assert capsys.readouterr().out.startswith("plain loop compiles: 2 in the timed steps; ")
    report_compiles("plain loop", 0, SimpleNamespace(compile=False))
    assert capsys.readouterr().out == ""
    assert parse_args(["--compile", "--compile_mode", "reduce-overhead"]).compile_mode == "reduce-overhead"
    assert parse_args(["--compile_mode", "reduce-overhead"]).compile  # a mode implies compiling
    with pytest.raises(SystemExit):
        parse_args(["--no-compile", "--compile_mode", "reduce-overhead"])


def test_training_benchmarks_pack_and_compile_as_the_recipe_does_by_default(monkeypatch):
    import recipes.tinystories as recipe
    from benchmarks.lm_profile import parse_args as profile_args
    from benchmarks.lm_training import parse_args
    from benchmarks.tinystories_generation import parse_args as generation_args

    def settings(args) -> tuple[bool, bool]:
        return args.pack, args.compile

    monkeypatch.setattr(recipe, "has_triton", lambda: True)
    assert settings(parse_args(["--device", "cpu"])) == (False, False)
    assert settings(parse_args(["--device", "cuda", "--preset", "llama2-42m"])) == (True, True)  # the GPU defaults
    assert settings(parse_args(["--device", "cuda", "--no-pack", "--no-compile"])) == (False, False)
    assert settings(parse_args(["--device", "cpu", "--pack", "--compile"])) == (True, True)
    assert settings(profile_args(["--device", "cpu"])) == (False, False)
    cpu = generation_args(["--device", "cpu"])
    assert settings(cpu) == (False, False) and cpu.train_warmup == 0
    compiled = generation_args(["--device", "cpu", "--compile"])
    assert compiled.compile and compiled.train_warmup == 10  # the compilation is timed apart
    flex = parse_args(["--device", "cuda", "--preset", "llama2-42m", "--attn_implementation", "flex_attention"])
    assert settings(flex) == (True, True) and flex.attn_implementation == "flex_attention"  # packs, block-sparse
    assert parse_args(["--device", "cpu"]).attn_implementation == "sdpa"
    monkeypatch.setattr(recipe, "has_triton", lambda: False)
    assert settings(parse_args(["--device", "cuda"])) == (True, False)
    # The context: the recipe's for the preset unless given (whole stories of the published presets, not cut at 256).
    assert parse_args(["--device", "cpu", "--preset", "llama2-42m"]).max_seq_len == 2048
    assert profile_args(["--device", "cpu", "--preset", "gpt2-9m"]).max_seq_len == 2048
    assert parse_args(["--device", "cpu"]).max_seq_len == 256  # gpt2-2m, a laptop preset
    assert parse_args(["--device", "cpu", "--preset", "llama2-42m", "--max_seq_len", "512"]).max_seq_len == 512


def test_gpu_check_command_lines_parse(tmp_path):
    # The dry mode parses every benchmark and recipe command of the GPU script with its own parser (no GPU, no
    # training), so a renamed or removed flag fails here rather than on the GPU machine.
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checked = [line for line in summary.splitlines() if line.endswith(": flags ok")]
    names = {line.split(":")[0] for line in checked}
    assert {"train_llama2-42m", "train_llama2-42m_pack_compile", "train_llama2-126m"} <= names
    assert {"profile_llama2-42m_pack_compile", "sample_gpt2-9m", "sample_llama2-126m", "generation_gpt2-9m"} <= names
    assert "recipe_gpt2-9m" in names and len(checked) == 8
    assert "timeouts add up to 540s" in proc.stdout  # inside one device call of 600 s
    # GPU_CHECK_EXTRA=1 runs the exploratory steps instead of the main ones: a second call.
    extra = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env={**env, "GPU_CHECK_EXTRA": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert extra.returncode == 0, extra.stdout[-3000:]
    ran = [line.split(":")[0] for line in extra.stdout.splitlines() if line.endswith(": flags ok")]
    assert ran == ["train_llama2-42m_cudagraphs", "sample_gpt2-9m_flex", "train_llama2-42m_flex"], extra.stdout
    assert "timeouts add up to 185s" in extra.stdout


def test_gpu_check_packs_its_logs_into_one_file_after_every_step(tmp_path):
    # A device call returns only a few files from $OUT: the step logs travel as one archive, rewritten after each
    # step, and the running step's output is in $OUT/running.log until it ends. Stand-in python and nvidia-smi
    # that fail at once, so every step ends quickly and nothing needs a GPU; a stale log of an earlier run in the
    # log folder must not travel.
    for tool in ("python", "nvidia-smi"):
        (tmp_path / tool).write_text('#!/bin/sh\necho "no GPU here: $*"\nexit 3\n')
        (tmp_path / tool).chmod(0o755)
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    (logs / "old_step.log").write_text("an earlier run\n")
    env = {**os.environ, "OUT": str(out), "PYTHON": str(tmp_path / "python"), "GPU_CHECK_LOGS": str(logs)}
    env.update(WHEELS=str(tmp_path), GPU_CHECK_RECIPE_DIR=str(tmp_path / "recipe"), PATH=f"{tmp_path}:{env['PATH']}")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1  # every step failed
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "summary.txt"]  # no running.log once all ended
    with tarfile.open(out / "logs.tgz") as tar:
        names = sorted(Path(n).name for n in tar.getnames() if n.endswith(".log"))
        log = tar.extractfile("./sample_gpt2-9m.log").read().decode()
        smi = tar.extractfile("./nvidia_smi.log").read().decode()
    assert len(names) == 10 and "sample_gpt2-9m.log" in names and "old_step.log" not in names
    assert "no GPU here: benchmarks/lm_generation.py --device cuda --preset gpt2-9m" in log
    assert "no GPU here: --query-gpu" in smi
    summary = (out / "summary.txt").read_text()
    assert "sample_gpt2-9m: FAILED (exit 3)" in summary and "last: no GPU here" in summary
    # A log folder that cannot be written stops the run at once, with one line.
    (tmp_path / "file").write_text("")
    unwritable = {**env, "GPU_CHECK_LOGS": str(tmp_path / "file" / "x")}
    bad = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=unwritable, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "gpu_check: cannot write the log folder" in bad.stderr, bad.stderr


def test_flag_check_rejects_a_flag_its_parser_does_not_know(tmp_path):
    listing = tmp_path / "commands.tsv"
    listing.write_text(
        "good\tpython benchmarks/lm_training.py --device cuda --steps 3\n"
        "unknown\tpython benchmarks/lm_training.py --device cuda --no_such_flag 3\n"
        "preset\tpython benchmarks/tinystories_generation.py --device cuda --preset gpt2-99m\n"
        "recipe\tpython recipes/tinystories.py --model.no_such_field 1\n"
    )
    cmd = [sys.executable, str(ROOT / "benchmarks" / "check_flags.py"), str(listing)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == "good: flags ok"
    assert all("flags FAILED" in line for line in lines[1:]) and len(lines) == 4


def test_gpu_check_benchmarks_need_no_package_beyond_the_gpu_machines_own(tmp_path):
    # The GPU machine has torch, lightning, transformers, tokenizers, torchmetrics and torchvision, nothing
    # downloaded; the benchmarks that gpu_check runs must import and parse their flags without the rest.
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("jsonargparse", "mlxtend", "rdkit", "wandb", "datasets"):
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
for name in ("lm_training", "lm_profile", "lm_generation", "tinystories_generation"):
    module = __import__("benchmarks." + name, fromlist=["parse_args"])
    module.parse_args(["--device", "cpu"])
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_gpu_checks_recipe_step_runs_with_jsonargparse_as_its_only_extra_package(tmp_path):
    # gpu_check's recipe step carries jsonargparse (and its own needs) as wheels; W&B, datasets, mlxtend and
    # rdkit are not on the GPU machine, and the TinyStories recipe must run two generations without them (generation
    # 0's synthetic set is what the GPU run checks is drawn on the GPU).
    code = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("mlxtend", "rdkit", "wandb", "datasets"):
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, "recipes")  # as running the script puts its folder first
sys.argv = ["tinystories.py", *sys.argv[1:]]
runpy.run_path("recipes/tinystories.py", run_name="__main__")
"""
    flags = ["--model.preset", "gpt2-tiny", "--data.num_real", "32", "--data.num_test", "8", "--generations", "2"]
    flags += ["--batch_size", "8", "--trainer.compile", "false", "--sampling.compile", "off", "--wandb.mode"]
    flags += ["disabled", "--data.max_seq_len", "64", "--progress_every", "0.005", "--out_dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODEL_COLLAPSE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", code, *flags]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"sampling gen 0: done", out) and re.search(r"\[lm\] .*test_loss=", out), out[-3000:]
    assert (tmp_path / "run" / "metrics.csv").is_file()


def test_generation_benchmark_prints_the_samplers_figures_before_the_generate_loop(tmp_path):
    # The sampler's lines come first and are flushed, so a generate() loop cut short by a time limit (as in
    # gpu_check) leaves them in the log; the comparison is the last line.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lm_generation.py"), "--preset", "gpt2-tiny", "--stories", "6"]
    cmd += ["--batch_size", "3", "--train_steps", "2", "--train_batch", "2", "--corpus", "40", "--vocab", "300"]
    cmd += ["--max_len", "24"]
    for extra in ([], ["--skip_generate"]):
        proc = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.strip().splitlines()
        ours = next(i for i, line in enumerate(lines) if line.startswith("StorySampler:"))
        assert lines[ours + 1].startswith("decode: ") and lines[ours + 2].startswith("kv_read_efficiency: ")
        theirs = [i for i, line in enumerate(lines) if line.startswith("HF generate:")]
        if extra:
            assert not theirs and not any(line.startswith("speedup_vs_hf_generate") for line in lines)
        else:
            assert theirs[0] > ours + 2 and lines[-1].startswith("speedup_vs_hf_generate: ")
