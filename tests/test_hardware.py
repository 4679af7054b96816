"""The allocator setting the recipes apply at start-up (collapse.hardware)."""

import os
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util
    from collapse.hardware import retain_freed_memory
    print(retain_freed_memory(), retain_freed_memory())
    """
)


def _probe(**env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is a glibc (Linux) function")
def test_applied_once_on_linux_and_opt_out():
    assert _probe(COLLAPSE_KEEP_MALLOC="") == "True True"  # applied; a second call reports the same
    assert _probe(COLLAPSE_KEEP_MALLOC="1") == "False False"


_FAULTS = textwrap.dedent(
    """
    import resource
    import torch
    from collapse.hardware import retain_freed_memory
    retain_freed_memory()
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 8000)  # a language-model head: 2048 tokens x 8000 logits = 64 MB per buffer
    h, y = torch.randn(2048, 64), torch.randint(0, 8000, (2048,))
    faults = 0
    for step in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.nn.functional.cross_entropy(head(h), y).backward()
        if step >= 10:  # after the heap has grown to the step's peak
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(faults)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is a glibc (Linux) function")
def test_training_steps_reuse_freed_memory():
    """Repeated training steps: with the setting, later steps take (almost) no fresh zero-filled pages."""

    def faults(**env: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FAULTS], env={**os.environ, **env}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.strip())

    kept = faults(COLLAPSE_KEEP_MALLOC="1")
    assert kept > 10 * (64 << 20) // 4096  # default malloc: each step maps and zero-fills its logits afresh
    assert faults(COLLAPSE_KEEP_MALLOC="") < kept // 10


_TF32 = textwrap.dedent(
    """
    import sys
    import torch
    from collapse.hardware import tf32_matmuls
    torch.cuda.is_available = lambda: sys.argv[1] == "cuda"  # as on a machine with (or without) a GPU
    if len(sys.argv) > 2:
        torch.set_float32_matmul_precision(sys.argv[2])
    print(tf32_matmuls(), torch.get_float32_matmul_precision())
    """
)


@pytest.mark.parametrize(
    ("device", "chosen", "env", "expected"),
    [
        ("cuda", None, "", "True high"),  # a GPU: float32 products on TF32 tensor cores
        ("cpu", None, "", "False highest"),  # a CPU computes as before
        ("cuda", None, "1", "False highest"),  # COLLAPSE_FULL_FP32=1 keeps full float32
        ("cuda", "medium", "", "False medium"),  # a choice made already is kept
    ],
)
def test_tf32_only_on_a_gpu_and_only_when_nobody_chose(device, chosen, env, expected):
    args = [sys.executable, "-c", _TF32, device, *([chosen] if chosen else [])]
    out = subprocess.run(args, env={**os.environ, "COLLAPSE_FULL_FP32": env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected


def test_tf32_leaves_a_process_without_torch_alone():
    # The analytic recipes never import torch; the start-up setting must not load it for them.
    probe = "import sys\nfrom collapse.hardware import tf32_matmuls\nprint(tf32_matmuls(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False False"


def test_auto_devices_are_resolved_to_the_process_count_config_yaml_records(monkeypatch):
    """``--trainer.devices auto`` (or -1) becomes the number of visible GPUs (1 on a CPU): config.yaml then says how
    many processes trained, and a resume on another number of GPUs is refused as a different config."""
    import torch

    from engine.trainer import TrainerConfig, resolve_trainer

    def resolved(**settings):
        return resolve_trainer(TrainerConfig(**settings), gpu_epochs=3, cpu_epochs=2)

    assert resolved(devices="auto").devices == 1 and resolved(devices=-1).devices == 1  # no GPU: one CPU process
    assert resolved(devices=2, accelerator="cpu").devices == 2  # explicit counts are kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve only asks; nothing runs on a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    gpu = resolved(devices="auto")
    assert (gpu.accelerator, gpu.devices, gpu.max_epochs) == ("gpu", 4, 3)
    assert resolved(devices=-1).devices == 4 and resolved(devices="0,1").devices == "0,1"
