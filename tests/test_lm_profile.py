"""benchmarks/lm_profile.py: kernel kinds, GPU busy time from a profile, and a whole run on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from benchmarks.lm_profile import _union_us, breakdown, kind_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
        ("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_TNT", "matmul"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "matmul"),
        ("triton_tem_fused_mm_0", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, true>", "attention"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
        ("Memcpy HtoD (Pinned -> Device)", "copy"),
        ("Memset (Device)", "copy"),
        ("triton_red_fused__log_softmax_nll_loss_0", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
        ("aten::mm", "matmul"),
        ("aten::matmul", "other"),  # a composite: its own time is not the product (aten::mm is)
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
        ("aten::copy_", "copy"),
    ],
)
def test_kernels_and_operators_are_sorted_into_kinds_by_name(name, kind):
    assert kind_of(name) == kind


def test_anything_inside_the_optimizer_step_is_optimizer_time():
    assert kind_of("aten::mm", in_optimizer=True) == "optimizer"


def test_busy_time_counts_overlapping_kernels_once():
    assert _union_us([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25
    assert _union_us([]) == 0


def _event(name: str, start: float, end: float, device: DeviceType, annotation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end), is_user_annotation=annotation
    )


def test_a_gpu_profile_splits_kernel_time_and_counts_idle_time_and_host_waits():
    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [
        _event("aten::mm", 0, 50, cpu),  # host side: not kernel time
        _event("cudaLaunchKernel", 1, 2, cpu),
        _event("sm90_xmma_gemm_bf16bf16", 10, 40, cuda),
        _event("flash_fwd_kernel", 40, 60, cuda),
        _event("vectorized_elementwise_kernel", 50, 60, cuda),  # overlaps the attention kernel
        _event("Memcpy DtoH (Device -> Pageable)", 90, 100, cuda),
        _event("cudaStreamSynchronize", 60, 100, cpu),
        _event("cudaDeviceSynchronize", 100, 101, cpu),
        # Annotated ranges that the profiler also draws on the GPU's timeline: spans, not kernels.
        _event("forward_backward", 0, 200, cuda, annotation=True),
        _event("Optimizer.step#AdamW.step", 150, 190, cuda),  # recognised by its name too
        _event("ProfilerStep#3", 0, 200, cuda),
    ]
    b = breakdown(SimpleNamespace(events=lambda: events), wall_s=200e-6, on_gpu=True)
    assert b.launches == 4 and b.syncs == 2
    assert b.busy_us == pytest.approx(60)  # 10..60 and 90..100
    assert b.by_kind["matmul"] == 30 and b.by_kind["attention"] == 20 and b.by_kind["copy"] == 10
    assert b.by_kind["other"] == 10
    assert b.library_share() == pytest.approx(50 / 200)  # of the wall time: the GPU idles for most of it
    assert b.kind_text().startswith("attention 28.6% | matmul 42.9% | optimizer 0.0% | copy 14.3% | other 14.3%")
    top = b.top(2, per=2.0)
    assert "sm90_xmma_gemm_bf16bf16" in top[0] and "0.015 ms" in top[0] and "x    0.5" in top[0]


def test_the_profile_of_a_cpu_run_has_every_line_and_its_shares_add_up(tmp_path):
    env = {**os.environ, "MODEL_COLLAPSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lm_profile.py"), "--device", "cpu", "--preset", "gpt2-tiny"]
    cmd += ["--stories", "40", "--batch_size", "4", "--warmup", "1", "--steps", "2", "--max_seq_len", "32"]
    cmd += ["--samples", "4", "--sampling_batch_size", "2", "--top", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    values = dict(line.split(": ", 1) for line in lines if re.match(r"^(train|sample)_\w+: ", line))
    for phase in ("train", "sample"):
        assert float(values[f"{phase}_wall_ms"].split()[0]) > 0
        assert values[f"{phase}_device_busy"] == "n/a (cpu)"
        shares = dict(part.rsplit(" ", 1) for part in values[f"{phase}_time_by_kind"].split(" | "))
        assert set(shares) == {"attention", "matmul", "optimizer", "copy", "other"}
        # Five shares, each rounded to 0.1%: their sum is 100 to within 5 x 0.05.
        assert sum(float(v.rstrip("%")) for v in shares.values()) == pytest.approx(100, abs=0.25 + 1e-9)
        assert float(shares["matmul"].rstrip("%")) > 0
        assert 0 < float(values[f"{phase}_library_share"].split()[0]) < 1
        assert float(values[f"{phase}_kernels"].split()[0]) > 0
        top = lines.index(next(line for line in lines if line.startswith(f"{phase} top 3 by time")))
        assert all(re.match(r"^ +[\d.]+% +[\d.]+ ms +x +[\d.]+ +aten::", line) for line in lines[top + 1 : top + 4])
    train_shares = dict(part.rsplit(" ", 1) for part in values["train_time_by_kind"].split(" | "))
    assert float(train_shares["optimizer"].rstrip("%")) > 0  # the update itself, apart from forward and backward
    assert re.search(r"^sample: 4 stories, \d+ tokens in ", proc.stdout, re.M)
    assert re.search(r"^sample_kernels_per_position: [\d.]+ ", proc.stdout, re.M)
