"""`train.mixed_precision: auto`: bf16 only where the hardware runs it natively and a timed
step says it pays."""
import pytest

from setok_cli.train.precision import cpu_bf16_flag, cpu_flags, measured, resolve_precision, time_steps

AVX2_LAPTOP = {"fpu", "sse4_2", "avx", "avx2", "fma"}
SAPPHIRE_RAPIDS = AVX2_LAPTOP | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
COOPER_LAKE = AVX2_LAPTOP | {"avx512f", "avx512_bf16"}
SKYLAKE_SERVER = AVX2_LAPTOP | {"avx512f", "avx512bw"}        # AVX512 but no bf16 extension


@pytest.mark.parametrize("flags, expect, why", [
    (SAPPHIRE_RAPIDS, "bf16", "auto: CPU has amx_bf16"),
    (COOPER_LAKE, "bf16", "auto: CPU has avx512_bf16"),
    (SKYLAKE_SERVER, "no", "auto: CPU has no AVX512-BF16/AMX; bf16 would be slow here"),
    (AVX2_LAPTOP, "no", "auto: CPU has no AVX512-BF16/AMX; bf16 would be slow here"),
])
def test_auto_on_cpus(flags, expect, why):
    p = resolve_precision("auto", cuda=False, flags=flags, capability="AVX2")
    assert (p.mixed_precision, p.why, p.warning) == (expect, why, None)
    assert p.measure == (expect == "bf16")          # bf16 units: the trainer times a step both ways


def test_measured_keeps_the_faster_and_says_both_times():
    p = resolve_precision("auto", cuda=False, flags=SAPPHIRE_RAPIDS, capability="AVX512")
    slow = measured(p, fp32_s=0.40, bf16_s=0.72)
    assert slow.mixed_precision == "no" and not slow.measure
    assert slow.line() == "precision: fp32 (auto: CPU has amx_bf16, but a step takes 0.72 s in bf16, 0.4 s in fp32)"
    fast = measured(p, fp32_s=0.90, bf16_s=0.30)
    assert fast.line() == "precision: bf16 (auto: CPU has amx_bf16; a step takes 0.3 s in bf16, 0.9 s in fp32)"
    assert measured(p, fp32_s=1.0, bf16_s=0.95).mixed_precision == "no"      # within the margin: fp32
    assert slow.warning is None and measured(p, 0.4, 0.72, "busy").warning == "busy"


def test_busy_warns_only_when_other_work_loads_the_cpu():
    from setok_cli.train.precision import busy
    assert busy(load=2.0, cores=2) is None and busy(load=3.0, cores=2) is None      # this run's own threads
    said = busy(load=3.97, cores=2)                     # two 2-thread jobs on 2 cores (README: measured)
    assert said.startswith("the CPU is busy (1-minute load 4.0 on 2 cores)") and "train.mixed_precision" in said
    assert busy(load=3.97, cores=16) is None


def test_time_steps_warm_up_once_and_run_under_autocast_only_when_asked():
    import torch
    seen = []
    w = torch.randn(8, 8, requires_grad=True)

    def step(rows):
        y = torch.randn(rows, 8) @ w
        seen.append((rows, y.dtype))
        y.float().sum().backward()
    steps = [lambda r=r: step(r) for r in (2, 3, 4)]
    assert time_steps(steps, bf16=True) > 0
    assert seen == [(2, torch.bfloat16), (3, torch.bfloat16), (4, torch.bfloat16)]
    seen.clear()
    time_steps(steps, bf16=False)
    assert [d for _, d in seen] == [torch.float32] * 3
    with pytest.raises(ValueError):
        time_steps(steps[:1], bf16=False)


def test_auto_without_cpu_flags_is_fp32():
    p = resolve_precision("auto", cuda=False, flags=None, capability="DEFAULT")
    assert p.mixed_precision == "no" and "torch kernels DEFAULT" in p.why


def test_auto_on_gpus():
    assert resolve_precision("auto", cuda=True, cuda_bf16=True).line() == "precision: bf16 (auto: GPU supports bf16)"
    assert resolve_precision("auto", cuda=True, cuda_bf16=False).line() == \
        "precision: fp32 (auto: GPU has no bf16 support)"


def test_explicit_choices_are_kept_and_slow_bf16_warned():
    slow = resolve_precision("bf16", cuda=False, flags=AVX2_LAPTOP, capability="AVX2")
    assert slow.mixed_precision == "bf16" and "~10x slower" in slow.warning and "\n" not in slow.warning
    assert resolve_precision("bf16", cuda=False, flags=SAPPHIRE_RAPIDS, capability="AVX512").warning is None
    p = resolve_precision("no", cuda=False, flags=SAPPHIRE_RAPIDS)
    assert p.line() == "precision: fp32 (train.mixed_precision: no)" and p.warning is None
    with pytest.raises(ValueError):
        resolve_precision("fp8")


def test_cpu_flags_reads_proc_cpuinfo_format(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n"
                 "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    assert cpu_flags(str(f)) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert cpu_bf16_flag(cpu_flags(str(f))) == "amx_bf16"
    assert cpu_flags(str(tmp_path / "missing")) is None
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(str(arm)) == {"fp", "asimd", "bf16"} and cpu_bf16_flag(cpu_flags(str(arm))) is None
