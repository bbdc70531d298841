"""The block breakdown: kernels classified by name and launching module, idle from the kernel union."""
import pytest

from longlive_triton.bench.breakdown import KINDS, breakdown_from_trace, classify


def _kernel(name, ts, dur, corr):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts, corr, tid=1):
    return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid,
            "args": {"correlation": corr}}


def _scope(name, ts, dur, tid=1):
    return {"cat": "user_annotation", "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_classify_by_name_and_scope():
    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "ll/self-attention") == "self-attention"
    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "ll/cross-attention") == "cross-attention"
    assert classify("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "ll/self-attention") == "GEMMs"
    assert classify("_rope_kv_append_kernel", "ll/self-attention") == "cache update"
    assert classify("_kv_cache_plan_kernel", None) == "cache update"
    assert classify("_adaln_kernel", None) == "glue"
    assert classify("vectorized_elementwise_kernel", "ll/ffn") == "glue"


def test_breakdown_sums_and_idle():
    trace = {"traceEvents": [
        _scope("ll/self-attention", 0, 50), _scope("ll/cross-attention", 60, 20),
        _launch(1, 1), _kernel("sm90_xmma_gemm_bf16", 100, 300, 1),          # GEMM, 0.3 ms
        _launch(2, 2), _kernel("_rope_kv_append_kernel", 400, 100, 2),      # cache update
        _launch(3, 3), _kernel("cudnn_sdpa_flash_fprop", 500, 1000, 3),     # self-attention
        _launch(61, 4), _kernel("cudnn_sdpa_flash_fprop", 2000, 200, 4),    # cross-attention, after a 0.5 ms gap
        _launch(90, 5), _kernel("_adaln_kernel", 2150, 150, 5),             # glue, overlapping the previous
        _launch(95, 6, tid=2), _kernel("fmha_kernel", 2400, 100, 6),        # another thread: no scope
    ]}
    parts = breakdown_from_trace(trace)
    assert parts["GEMMs"] == pytest.approx(0.3)
    assert parts["cache update"] == pytest.approx(0.1)
    assert parts["self-attention"] == pytest.approx(1.0 + 0.1)
    assert parts["cross-attention"] == pytest.approx(0.2)
    assert parts["glue"] == pytest.approx(0.15)
    assert parts["span"] == pytest.approx(2.4)
    assert parts["busy"] == pytest.approx(0.3 + 0.1 + 1.0 + 0.3 + 0.1)  # [2000, 2300) once
    assert parts["idle"] == pytest.approx(2.4 - parts["busy"])
    assert set(KINDS) <= set(parts)


def test_empty_trace_is_refused():
    with pytest.raises(ValueError, match="no GPU kernels"):
        breakdown_from_trace({"traceEvents": [_scope("ll/ffn", 0, 1)]})
