"""The TinyStories recipe end to end on a tiny model: workflows, frozen tokenizer, resume, init_from, bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kill_at_step import recipe_runner

from collapse.cli import parse_config
from collapse.errors import ConfigError
from collapse.rundir import config_dict
from collapse.store import GenerationStore
from datamodules.story_corpus import EOT_SEPARATOR, read_corpus
from datamodules.tokenizer import EOT_ID, PAD_ID, TOKENIZER_FILE
from evaluation.stories import corpus_diversity
from recipes.tinystories import TinyStoriesConfig, main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tinystories.py"
REAL = 48  # real training stories of the tiny runs
VOCAB = 320

TINY = [
    "--data.num_real", str(REAL),
    "--data.num_test", "16",
    "--data.vocab_size", str(VOCAB),
    "--data.max_seq_len", "96",
    "--model.vocab_size", str(VOCAB),
    "--model.preset", "gpt2-tiny",
    "--model.warmup_steps", "2",
    "--trainer.accelerator", "cpu",
    "--trainer.max_epochs", "1",
    "--batch_size", "8",
    "--sample_batch_size", "20",
    "--sampling.batch_size", "8",
    "--wandb.mode", "disabled",
]  # fmt: skip


def tiny(out_dir: Path, workflow: str, *extra: str, generations: int = 2) -> TinyStoriesConfig:
    args = ["--out_dir", str(out_dir), "--workflow", workflow, "--generations", str(generations), *TINY, *extra]
    return parse_config(TinyStoriesConfig, args)


def read_csv(path: Path) -> dict[tuple[int, str], float]:
    with open(path) as fh:
        return {(int(r["generation"]), r["metric"]): float(r["value"]) for r in csv.DictReader(fh)}


# workflow, expected (train_real, train_synthetic) at generation 1 for n = REAL real stories
SIZES = {
    "replace": (0, REAL),
    "accumulate": (REAL, REAL),
    "accumulate_subsample": (None, None),  # REAL in all, drawn from the pool of 2 REAL
    "mix(real=24, synthetic=32)": (24, 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("workflow", list(SIZES))
def test_two_generations_train_on_what_the_workflow_promises(tmp_path, workflow, capsys):
    out = tmp_path / "run"
    result = main(tiny(out, workflow))
    assert result.committed == [0, 1]
    store = GenerationStore(out)
    m0, m1 = result.metrics[0], result.metrics[1]
    assert (m0["train_real"], m0["train_synthetic"]) == (24 if "mix" in workflow else REAL, 0)
    real, synthetic = SIZES[workflow]
    if real is None:
        assert m1["train_size"] == REAL and 0 < m1["train_real"] < REAL
    else:
        assert (m1["train_real"], m1["train_synthetic"]) == (real, synthetic)
    for g in (0, 1):
        gen = store.load(g)
        tokens, lengths = gen.arrays["tokens"], gen.arrays["lengths"]
        n = gen.manifest["num_samples"]
        # The stories back to back, without the padding of the rows they were drawn in (96 tokens).
        assert gen.manifest["ragged_arrays"] == {"tokens": "lengths"}
        assert tokens.dtype == np.uint16 and tokens.shape == (int(lengths.sum()),) and lengths.shape == (n,)
        starts = np.cumsum(lengths) - lengths
        assert n > 0 and (tokens[starts] == EOT_ID).all() and (lengths <= 96).all() and (lengths >= 1).all()
        stories = read_corpus(out / f"gen_{g:03d}" / "stories.txt")
        assert 0 < len(stories) <= n
        shown = (out / f"gen_{g:03d}" / "samples.txt").read_text()
        assert shown.count(EOT_SEPARATOR) == min(8, len(stories))
        metrics = result.metrics[g]
        assert metrics["test_perplexity"] == pytest.approx(np.exp(metrics["test_loss"]), rel=1e-6)
        assert 0 < metrics["sample_distinct_1"] <= metrics["sample_distinct_2"] <= 1
        assert 0 <= metrics["sample_rare_word_coverage"] <= 1 and 0 <= metrics["sample_finished_fraction"] <= 1
    rows = read_csv(out / "metrics.csv")
    assert rows[(1, "test_loss")] == pytest.approx(m1["test_loss"])
    assert "[lm]" in capsys.readouterr().out


@pytest.mark.slow
def test_tokenizer_is_trained_once_and_frozen_across_generations_and_resumes(tmp_path, monkeypatch):
    import shutil

    import datamodules.tinystories as ts
    import datamodules.tokenizer as tk

    out = tmp_path / "run"
    main(tiny(out, "accumulate"))
    frozen = (out / TOKENIZER_FILE).read_bytes()
    shutil.rmtree(out / "gen_001")  # as if the run had been killed before generation 1 was committed

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained")

    monkeypatch.setattr(tk, "train_bpe", no_training)
    monkeypatch.setattr(ts, "train_bpe", no_training, raising=False)
    # A cold token cache: the resumed run must encode with the run's tokenizer, never train one.
    monkeypatch.setenv("MODEL_COLLAPSE_CACHE", str(tmp_path / "cold_cache"))
    result = main(tiny(out, "accumulate"))
    assert result.committed == [1]
    assert (out / TOKENIZER_FILE).read_bytes() == frozen

    (out / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(Exception, match=TOKENIZER_FILE):
        main(tiny(out, "accumulate"))


def test_dry_run_prints_the_parameter_count_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(parse_config(TinyStoriesConfig, ["--out_dir", str(out), "--dry_run", "true"])) is None
    printed = capsys.readouterr().out
    assert "parameters: 1882880" in printed  # the CPU default, gpt2-2m
    assert "data read: stories_read 1500" in printed and "train_stories 1000" in printed  # the data was built too
    assert "lightning module: CausalLMModule" in printed
    assert "sampling: 64 stories at once, chunks of 512 stories" in printed  # a CPU's defaults
    assert "training: pack false, compile false" in printed  # neither on a CPU (runs from before resume as they were)
    main(parse_config(TinyStoriesConfig, ["--out_dir", str(out), "--dry_run", "true", "--model.preset", "gpt2-9m"]))
    assert "parameters: 8890880" in capsys.readouterr().out
    assert not out.exists()


def test_sampling_concurrency_and_chunks_follow_the_device_type_and_are_recorded(tmp_path, monkeypatch):
    from recipes.tinystories import resolve

    def config(*extra: str) -> TinyStoriesConfig:
        return resolve(parse_config(TinyStoriesConfig, ["--out_dir", str(tmp_path / "run"), *extra]))

    cpu = config()
    assert (cpu.sampling.batch_size, cpu.sample_batch_size) == (64, 512)  # the numbers before "auto": old runs resume
    assert config_dict(cpu)["sampling"]["batch_size"] == 64 and config_dict(cpu)["sample_batch_size"] == 512
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve() only asks; nothing runs on a GPU
    for preset, slots in (("gpt2-9m", 512), ("llama2-42m", 256), ("llama2-126m", 128)):
        gpu = config("--model.preset", preset)
        assert gpu.trainer.accelerator == "gpu" and gpu.data.max_seq_len == 2048
        assert (gpu.sampling.batch_size, gpu.sample_batch_size) == (slots, 8 * slots)
    gpu = config("--model.preset", "gpt2-9m", "--sampling.batch_size", "100", "--sample_batch_size", "300")
    assert (gpu.sampling.batch_size, gpu.sample_batch_size) == (100, 300)  # explicit settings are kept
    short = config("--model.preset", "llama2-126m", "--data.max_seq_len", "512")
    assert short.sampling.batch_size == 512  # a shorter context reserves less per slot
    cpu = config("--model.preset", "gpt2-9m", "--trainer.accelerator", "cpu")
    assert (cpu.sampling.batch_size, cpu.sample_batch_size) == (64, 512)


def test_sampling_slots_whose_kv_caches_do_not_fit_the_gpu_are_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    from collapse.cli import run
    from lit_modules.causal_lm import model_config
    from recipes.tinystories import resolve
    from samplers.story_sampler import KV_MEMORY_SHARE, kv_bytes_per_slot

    out = tmp_path / "run"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve() only asks; nothing runs on a GPU
    gib = 2**30
    gpu = {"memory": 80 * gib}
    monkeypatch.setattr("recipes.tinystories.smallest_gpu_memory", lambda: gpu["memory"])

    def config(*extra: str) -> TinyStoriesConfig:
        return resolve(parse_config(TinyStoriesConfig, ["--out_dir", str(out), *extra]))

    assert config("--model.preset", "llama2-126m").sampling.batch_size == 128  # auto: 9.0 GiB, fits 80
    gpu["memory"] = 10 * gib  # auto's 9.0 GiB of KV cache would run out of memory once generation 0 is trained
    with pytest.raises(ConfigError, match=r"reserves 9\.0 GiB of KV cache .* this GPU's 10\.0 GiB") as caught:
        config("--model.preset", "llama2-126m")
    fits = int(re.search(r"pass --sampling.batch_size (\d+) ", str(caught.value)).group(1))
    smaller = config("--model.preset", "llama2-126m", "--sampling.batch_size", str(fits))
    per_slot = kv_bytes_per_slot(model_config(smaller.model), 2048)
    assert fits * per_slot <= KV_MEMORY_SHARE * 10 * gib < 2 * fits * per_slot  # the most slots that fit
    with pytest.raises(ConfigError, match="--sampling.batch_size"):  # an explicit setting is checked too
        config("--model.preset", "gpt2-9m", "--sampling.batch_size", "1024", "--sampling.dtype", "float32")
    monkeypatch.setenv("RANK", "1")  # the run's other processes leave it to the first (and CUDA alone until then)
    assert config("--model.preset", "gpt2-9m", "--sampling.batch_size", "1024").sampling.batch_size == 1024
    monkeypatch.delenv("RANK")
    gpu["memory"] = None  # unknown: nothing to go by, nothing refused
    assert config("--model.preset", "llama2-126m").sampling.batch_size == 128
    gpu["memory"] = gib // 1024
    with pytest.raises(ConfigError, match="not even one slot fits"):
        config("--model.preset", "llama2-126m")
    gpu["memory"] = 8 * gib
    with pytest.raises(SystemExit) as exited:  # the dry run and the real run alike: one line, nothing written
        run(main, TinyStoriesConfig, ["--out_dir", str(out), "--model.preset", "gpt2-9m", "--dry_run", "true"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "pass --sampling.batch_size" in err
    assert not out.exists()


def test_loader_workers_follow_the_device_type_and_the_cores(tmp_path, monkeypatch):
    from recipes.tinystories import GPU_LOADER_WORKERS, available_cores, gpu_loader_workers, resolve

    def config(*extra: str) -> TinyStoriesConfig:
        return resolve(parse_config(TinyStoriesConfig, ["--out_dir", str(tmp_path / "run"), *extra]))

    assert config().num_workers == 0 and config_dict(config())["num_workers"] == 0  # CPU: the steps use the cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve() only asks; nothing runs on a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr("recipes.tinystories.available_cores", lambda: (16, False))
    assert config("--model.preset", "gpt2-9m").num_workers == GPU_LOADER_WORKERS == 4
    assert config("--model.preset", "gpt2-9m", "--num_workers", "1").num_workers == 1  # an explicit setting is kept
    # Processes of this machine x (1 + workers) stay within its cores.
    assert [gpu_loader_workers(d, 16) for d in (1, 2, 4, "4", "0,1,2", "auto", -1, 16)] == [4, 4, 3, 3, 4, 1, 1, 0]
    assert gpu_loader_workers(1, 2) == 1 and gpu_loader_workers(1, 1) == 0
    # An srun task bound to its own share of the cores (--cpus-per-task) does not divide it again.
    assert gpu_loader_workers(4, 8, own_cores=True) == 4 and gpu_loader_workers(4, 3, own_cores=True) == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert available_cores()[1]  # the real probe (imported before the stand-in above): an srun task's own cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not available_cores()[1]  # torchrun started 4 processes inside the task: they share its cores
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("SLURM_PROCID")
    assert not available_cores()[1]  # the job's batch script itself, not a task


@pytest.mark.slow
def test_loader_workers_prepare_the_same_batches_as_the_main_process(tmp_path):
    """Packed batches made in two loader worker processes train, test and sample exactly as those made in the
    main process: every metric and every stored story the same."""
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"workers{workers}"
        result = main(tiny(out, "accumulate", "--model.pack", "true", "--num_workers", workers))
        runs[workers] = (result.metrics, [GenerationStore(out).load(g).arrays["tokens"] for g in (0, 1)])
    (metrics0, tokens0), (metrics2, tokens2) = runs["0"], runs["2"]
    assert metrics0 == metrics2 and all(np.array_equal(a, b) for a, b in zip(tokens0, tokens2))


def test_trainer_compile_takes_a_mode_and_cuda_graphs_copy_the_loss_out(tmp_path):
    from recipes.tinystories import LMModality, resolve

    built = {}
    settings = ("false", "true", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    for setting in settings:
        cfg = resolve(tiny(tmp_path / setting, "replace", "--trainer.compile", setting))
        module = LMModality(cfg).build_model(0)  # compiling is lazy: nothing compiles before a forward
        built[setting] = (module.model._compiled_call_impl is not None, module.cuda_graph_steps)
    # max-autotune also replays CUDA graphs: its steps are marked and its batches kept to a few shapes too.
    graphs = {"reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}
    assert built == {"false": (False, False), "true": (True, False), **{m: (True, g) for m, g in graphs.items()}}
    with pytest.raises(ConfigError, match="--trainer.compile must be true, false or one of default, reduce-overhead"):
        tiny(tmp_path / "x", "replace", "--trainer.compile", "fast")


def test_the_compile_modes_said_to_use_cuda_graphs_are_those_that_torch_runs_with_cuda_graphs():
    from torch._inductor import list_mode_options

    from recipes.tinystories import COMPILE_MODES, CUDA_GRAPH_MODES

    assert [m for m in COMPILE_MODES if list_mode_options(m).get("triton.cudagraphs")] == list(CUDA_GRAPH_MODES)


def test_cuda_graph_modes_refuse_gradient_accumulation_before_the_run(tmp_path):
    # Each micro-batch's replay would overwrite the gradients accumulated so far (they live in the graphs' memory).
    for mode in ("reduce-overhead", "max-autotune"):
        flags = ("--trainer.compile", mode, "--trainer.accumulate_grad_batches", "2")
        with pytest.raises(ConfigError, match=f"--trainer.compile {mode} \\(CUDA graphs\\) cannot accumulate"):
            tiny(tmp_path / mode, "replace", *flags)
    assert tiny(tmp_path / "ok", "replace", "--trainer.compile", "true", "--trainer.accumulate_grad_batches", "2")
    assert tiny(tmp_path / "one", "replace", "--trainer.compile", "reduce-overhead")


def test_cuda_graph_modes_on_the_cpu_are_warned_about(tmp_path, caplog):
    from recipes.tinystories import resolve

    with caplog.at_level("WARNING", logger="recipes.tinystories"):
        resolve(tiny(tmp_path / "a", "replace", "--trainer.compile", "true"))
        assert not caplog.records
        resolve(tiny(tmp_path / "b", "replace", "--trainer.compile", "reduce-overhead"))
    assert "--trainer.compile reduce-overhead replays CUDA graphs, which need a CUDA GPU: on the cpu" in caplog.text


def test_a_fused_optimizer_that_cannot_clip_under_16_mixed_is_refused_before_the_data_is_read(tmp_path):
    from recipes.tinystories import resolve

    flags = ("--model.fused_optimizer", "true", "--trainer.precision", "16-mixed")
    with pytest.raises(ConfigError, match="cannot clip gradients under 16-mixed"):
        resolve(tiny(tmp_path / "a", "replace", *flags))
    no_clip = resolve(tiny(tmp_path / "b", "replace", *flags, "--trainer.gradient_clip_val", "null"))
    assert no_clip.model.fused_optimizer and no_clip.trainer.gradient_clip_val is None
    assert resolve(tiny(tmp_path / "c", "replace", "--model.fused_optimizer", "true")).model.fused_optimizer


@pytest.mark.slow
def test_the_gpu_defaults_packed_and_compiled_train_and_sample_every_generation(tmp_path):
    # A GPU run packs and compiles by default; here on a CPU, asked for, through whole generations: the compiled
    # graphs are made at generation 0 and reused by generation 1's new model; the losses are the eager ones up
    # to float rounding (packing and compiling change the order of the sums, so the sampled stories differ).
    from torch._dynamo.utils import counters

    eager = main(tiny(tmp_path / "eager", "accumulate"))
    graphs = counters["stats"]["unique_graphs"]
    fast = main(tiny(tmp_path / "fast", "accumulate", "--model.pack", "true", "--trainer.compile", "true"))
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert fast.committed == eager.committed == [0, 1]
    losses = read_csv(tmp_path / "eager" / "metrics.csv"), read_csv(tmp_path / "fast" / "metrics.csv")
    for generation in (0, 1):
        assert losses[1][(generation, "test_loss")] == pytest.approx(losses[0][(generation, "test_loss")], rel=0.01)
    assert losses[1][(1, "train_synthetic")] == REAL  # generation 1 trained on the sampled stories
    config = (tmp_path / "fast" / "config.yaml").read_text()
    assert "pack: true" in config and "compile: true" in config


def test_published_presets_use_their_own_context_and_the_laptop_default_a_short_one(tmp_path, capsys):
    from recipes.tinystories import resolve

    def context(*flags: str) -> tuple[int, int]:
        cfg = resolve(parse_config(TinyStoriesConfig, ["--out_dir", str(tmp_path / "run"), *flags]))
        return cfg.data.max_seq_len, cfg.model.max_seq_len

    assert context() == (256, 256)  # gpt2-2m, the CPU default
    for preset in ("gpt2-9m", "llama2-12m", "llama2-42m", "llama2-126m"):
        assert context("--model.preset", preset) == (2048, 2048)
    assert context("--model.preset", "gpt2-9m", "--data.max_seq_len", "512") == (512, 512)
    assert context("--model.preset", "llama2-42m", "--model.max_seq_len", "1024") == (1024, 1024)
    with pytest.raises(ConfigError, match=r"--data.max_seq_len must be at most 512 \(the position limit of the pre"):
        context("--data.max_seq_len", "1024")  # beyond gpt2-2m's position limit
    out = tmp_path / "run"
    main(parse_config(TinyStoriesConfig, ["--out_dir", str(out), "--dry_run", "true", "--model.preset", "llama2-42m"]))
    printed = capsys.readouterr().out
    assert "context: 2048" in printed and "max_seq_len: 2048" in printed and "truncated 0," in printed
    assert "sampling backend: native" in printed
    assert not out.exists()


def test_stories_cut_at_the_context_are_counted_in_data_json(tmp_path):
    from recipes.tinystories import LMModality, resolve

    counts = {}
    for seq in ("24", "2048"):
        cfg = resolve(tiny(tmp_path / seq, "replace", "--data.max_seq_len", seq, "--model.preset", "gpt2-9m"))
        modality = LMModality(cfg)
        modality.real.prepare_data()
        modality.real.setup("fit")
        (tmp_path / seq).mkdir()
        modality.start_run(tmp_path / seq)
        counts[seq] = json.loads((tmp_path / seq / "data.json").read_text())
    short, whole = counts["24"], counts["2048"]
    assert short["max_seq_len"] == 24 and whole["max_seq_len"] == 2048
    assert 0 < short["train_truncated"] <= REAL and short["truncated"] >= short["train_truncated"]
    assert whole["truncated"] == 0 and whole["train_tokens"] > short["train_tokens"]


def test_corpus_diversity_sees_repetition_and_lost_rare_words():
    rich = ["the cat sat on a mat", "a dog ran to the park", "an owl flew over the barn"]
    poor = ["the cat sat on a mat"] * 3
    rare = {"owl", "barn", "park"}
    r, p = corpus_diversity(rich, rare), corpus_diversity(poor, rare)
    assert r["distinct_2"] > p["distinct_2"] and p["distinct_2"] == pytest.approx(5 / 15)
    assert r["rare_word_coverage"] == 1.0 and p["rare_word_coverage"] == 0.0
    assert r["word_types"] > p["word_types"]
    # One pass gives distinct_n's values (n-grams within each story, pooled), short and empty stories included.
    from datamodules.story_corpus import distinct_n, generate_stories

    for corpus in (generate_stories(200, seed=3), ["", "a", "a b", "The cat's hat. A dog!", "b a b a"], []):
        got = corpus_diversity(corpus, rare)
        assert [got[f"distinct_{n}"] for n in (1, 2, 3)] == [distinct_n(corpus, n) for n in (1, 2, 3)]


@pytest.mark.slow
def test_init_from_restarts_every_generation_from_the_checkpoint(tmp_path):
    from lit_modules.causal_lm import CausalLMConfig, build_model
    from recipes.tinystories import LMModality, resolve

    ckpt = tmp_path / "ckpt"
    torch.manual_seed(1)
    base = build_model(CausalLMConfig(preset="gpt2-tiny", vocab_size=VOCAB), EOT_ID, EOT_ID, PAD_ID)
    base.save_pretrained(ckpt)
    cfg = resolve(tiny(tmp_path / "run", "replace", "--model.init_from", str(ckpt)))
    modality = LMModality(cfg)
    for g in (0, 1):
        model = modality.build_model(g).model
        for name, tensor in base.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], tensor)
    result = main(tiny(tmp_path / "run", "replace", "--model.init_from", str(ckpt)))
    assert result.committed == [0, 1]
    fitted = torch.load(tmp_path / "run" / "gen_001" / "model.pt", weights_only=True)
    assert any(not torch.equal(fitted[f"model.{k}"], v) for k, v in base.state_dict().items())


def run_recipe(out: Path, workflow: str, *extra: str, generations: int = 3) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(RECIPE), "--out_dir", str(out), "--workflow", workflow]
    cmd += ["--generations", str(generations), *TINY, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


@pytest.mark.slow
def test_sigkill_mid_run_resumes_to_the_unbroken_numbers(tmp_path):
    extra = ("--trainer.max_epochs", "2")
    unbroken = tmp_path / "unbroken"
    finish(run_recipe(unbroken, "accumulate", *extra))

    out = tmp_path / "run"
    proc = run_recipe(out, "accumulate", *extra)
    target = out / ".gen_001.partial/checkpoints/last.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    done_before = GenerationStore(out).completed()
    assert done_before != [0, 1, 2], "the run finished before it could be killed"

    stdout = finish(run_recipe(out, "accumulate", *extra))
    assert stdout.count("finished earlier") == len(done_before)
    assert (out / "metrics.csv").read_text() == (unbroken / "metrics.csv").read_text()
    for g in range(3):
        np.testing.assert_array_equal(
            GenerationStore(out).samples(g, "tokens"), GenerationStore(unbroken).samples(g, "tokens")
        )
    assert (out / TOKENIZER_FILE).read_bytes() == (unbroken / TOKENIZER_FILE).read_bytes()


@pytest.mark.slow
def test_a_fit_killed_mid_epoch_resumes_from_its_mid_epoch_checkpoint_to_the_unbroken_numbers(tmp_path):
    # A published generation is one long epoch. Generation 1 here: 96 stories, 12 batches of 8 an epoch, 2 epochs;
    # the mid-epoch checkpoint of step 16 (--checkpoint_minutes 1e-9: due at every look at the clock, one every 16
    # optimizer steps) is the 5th batch of epoch 1, and the kill comes as step 17 starts.
    flags = ["--workflow", "accumulate", "--generations", "3", *TINY, "--trainer.max_epochs", "2"]
    flags += ["--checkpoint_minutes", "1e-9"]
    recipe = recipe_runner(tmp_path, "tinystories", "LMModality", "TinyStoriesConfig", flags)
    unbroken = tmp_path / "unbroken"
    assert recipe(unbroken).returncode == 0
    out = tmp_path / "run"
    assert recipe(out, KILL="17").returncode == -9
    checkpoint = torch.load(out / ".gen_001.partial" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 16
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 4}]
    resumed = recipe(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "metrics.csv").read_text() == (unbroken / "metrics.csv").read_text()
    for g in range(3):
        np.testing.assert_array_equal(
            GenerationStore(out).samples(g, "tokens"), GenerationStore(unbroken).samples(g, "tokens")
        )


@pytest.mark.slow
def test_two_process_ddp_matches_the_one_process_samples(tmp_path):
    out = tmp_path / "ddp"
    extra = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    stdout = finish(run_recipe(out, "accumulate", *extra, generations=2), timeout=400)
    assert stdout.count("[lm]") == 2
    store = GenerationStore(out)
    assert store.completed() == [0, 1]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == len({(r["generation"], r["metric"]) for r in rows})
    assert json.loads((out / "gen_001" / "metrics.json").read_text())["train_size"] == 2 * REAL


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--data.num_real", "4", "--batch_size", "8"], "batch"),
        (["--data.source", "txt", "--data.path", "{tmp}/missing.txt"], "missing.txt"),
        (["--data.source", "txt", "--data.path", "{empty}"], "stor"),
        (["--model.vocab_size", "500"], "vocab_size"),
        (["--model.max_seq_len", "64"], "max_seq_len"),
        (["--sampling.temperature", "0"], "temperature"),
        (["--sampling.strategy", "middle_out"], "strategy"),
        (["--model.init_from", "{tmp}/nowhere"], "init_from"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, flags, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text(f"\n{EOT_SEPARATOR}\n  \n{EOT_SEPARATOR}\n")
    flags = [f.format(tmp=tmp_path, empty=empty) for f in flags]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "MODEL_COLLAPSE_CACHE": str(tmp_path / "c")}
    # The later of two equal flags wins, so flags override TINY.
    proc = subprocess.run(
        [sys.executable, str(RECIPE), "--out_dir", str(out), *TINY, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    # Counted warnings (e.g. "dropped 2 empty stories") may come first; then exactly one error line.
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and needle in errors[0], proc.stderr
    assert not out.exists()


def test_the_training_curves_on_wandb_carry_tokens_per_second(tmp_path, fake_wandb):
    # The language model counts its predicted tokens on the host; each W&B training row after the first gets the
    # rate since the previous row (no per-step read from the device).
    cfg = tiny(tmp_path / "run", "replace", "--trainer.log_every_n_steps", "1", "--wandb.mode", "offline",
               generations=1)  # fmt: skip
    main(cfg)
    (run,) = fake_wandb
    rates = [row["trainer/tokens_per_s"] for row in run.rows if "trainer/tokens_per_s" in row]
    steps = [row for row in run.rows if "train_loss" in row]
    assert len(steps) == REAL // 8 and len(rates) == len(steps) - 1  # 6 steps of 8 stories, one epoch
    assert all(rate > 0 for rate in rates)


def test_a_checkpoint_whose_weights_cannot_be_its_model_s_is_refused_from_headers_before_anything_is_written(
    tmp_path,
):
    # Before: a dry run passed such a checkpoint (it builds the model on the meta device, reading no weights), and
    # the run refused it only once config.yaml, data.json and the tokenizer were written.
    from collapse.errors import UserError
    from lit_modules.causal_lm import CausalLMConfig, build_model, check_checkpoint_weights

    def saved(name: str) -> Path:
        folder = tmp_path / name
        config = CausalLMConfig(preset="gpt2-tiny", vocab_size=VOCAB)
        build_model(config, EOT_ID, EOT_ID, PAD_ID).save_pretrained(folder)
        return folder

    good = saved("good")
    check_checkpoint_weights(CausalLMConfig(init_from=str(good), vocab_size=VOCAB))  # accepted
    garbage = saved("garbage")
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(UserError, match="model.safetensors: cannot be read as safetensors weights"):
        check_checkpoint_weights(CausalLMConfig(init_from=str(garbage), vocab_size=VOCAB))
    other = saved("other_shapes")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "n_inner": 64}))  # the file's MLPs are 128 wide
    with pytest.raises(UserError, match=r"do not have the shapes its config.json describes \(h\.0\.mlp\.c_fc"):
        check_checkpoint_weights(CausalLMConfig(init_from=str(other), vocab_size=VOCAB))
    foreign = saved("foreign")
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(foreign / "model.safetensors"))
    with pytest.raises(UserError, match="none of its 1 weight tensors is named as a gpt2 model's parameters"):
        check_checkpoint_weights(CausalLMConfig(init_from=str(foreign), vocab_size=VOCAB))
    for source in (garbage, other, foreign):
        (source / TOKENIZER_FILE).unlink(missing_ok=True)
        out = tmp_path / f"run_{source.name}"
        with pytest.raises(UserError, match=f"{source.name}"):
            main(tiny(out, "replace", "--model.init_from", str(source), "--dry_run", "true"))
        with pytest.raises(UserError, match=f"{source.name}"):
            main(tiny(out, "replace", "--model.init_from", str(source)))
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
