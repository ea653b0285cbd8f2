"""`setok bench-kernels`, `setok env`, and the fallback without the extension."""
import json
import subprocess
import sys

from click.testing import CliRunner

from setok_cli.bench import kernels
from setok_cli.cli.main import cli


def test_bench_shape_fields_and_ratios():
    r = kernels.bench_shape(2, 40, 16, rounds=2, memory=False)
    assert r.gemm_ms > 0 and r.reference_ms > 0
    assert len(r.reference_ms_all) == 2
    assert r.cuda_ms is None


def test_bench_kernels_json_quick():
    res = CliRunner().invoke(cli, ["bench-kernels", "--json", "--quick", "--rounds", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    shapes = out["shapes"]
    assert [(s["B"], s["N"], s["D"]) for s in shapes] == kernels.QUICK_SHAPES
    for s in shapes:
        assert {"B", "N", "D", "k", "gemm_ms", "reference_ms", "cpu_ms", "cuda_ms"} <= set(s)
        assert s["k"] == 5 and s["gemm_ms"] > 0 and s["reference_ms"] > 0
        assert s["reference_peak_mb"] is not None


def test_env_json():
    res = CliRunner().invoke(cli, ["env", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert "reference" in info["backends"]["cpu"]
    assert info["torch"] and isinstance(info["threads"], int)


def test_fallback_without_extension_warns_once_and_works():
    code = (
        "import sys, warnings\n"
        "sys.modules['setok_cli._C'] = None  # as if the extension were not built\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from setok_cli import ops\n"
        "    import setok_cli.ops._ext\n"
        "import torch\n"
        "r = ops.dpc_cluster(torch.randn(2, 30, 4), 3, 0.8, 5)\n"
        "msgs = [str(x.message) for x in w if 'compiled ops unavailable' in str(x.message)]\n"
        "print(len(msgs), ops.available_backends(), int(r.num_clusters.min()) >= 1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "['reference']", "True"]
