"""The launchers' one tensor checker, kernels/_common.check_tensor: every refusal names the argument
and says what is wrong; a valid tensor passes."""
import pytest
import torch

from longlive_triton.kernels._common import check_tensor, index_arg

CPU = torch.device("cpu")
CL = torch.channels_last_3d


def _video(*shape):
    return torch.zeros(*shape).contiguous(memory_format=CL)


@pytest.mark.parametrize("t, kwargs", [
    (torch.zeros(2, 3, 4), dict(dtype=torch.float32, shape=(2, "L", 4), device=CPU)),
    (torch.zeros(2, 3, 4), dict(dtype=(torch.bfloat16, torch.float32), shape=("B", "L", "C"))),
    (torch.zeros(2, 8)[:, :4], dict(dtype=torch.float32, shape=(2, 4))),  # rows of any stride
    (torch.zeros(4, 1).t(), dict(dtype=torch.float32)),  # a size-1 last dim: its stride is never used
    (torch.zeros(0, 4), dict(dtype=torch.float32, layout="contiguous")),
    (torch.zeros(4, 2).t(), dict(dtype=torch.float32, layout="any")),
    (_video(1, 8, 3, 2, 2), dict(dtype=torch.float32, layout="channels_last_3d")),
    (_video(1, 8, 3, 2, 2)[:, :, 1:], dict(dtype=torch.float32, layout="channels_last_3d")),  # later frames
])
def test_valid_tensors_pass(t, kwargs):
    assert check_tensor("x", t, **kwargs) is None


@pytest.mark.parametrize("t, kwargs, error, match", [
    ([1.0], dict(dtype=torch.float32), TypeError, "must be a torch.Tensor, got list"),
    (torch.zeros(2), dict(dtype=torch.bfloat16), TypeError, "must be torch.bfloat16, got torch.float32"),
    (torch.zeros(2, dtype=torch.int8), dict(dtype=(torch.bfloat16, torch.float32)), TypeError,
     "must be torch.bfloat16 or torch.float32, got torch.int8"),
    (torch.zeros(2, 3), dict(dtype=torch.float32, shape=("B", "L", "C")), ValueError,
     r"must be 3-D \[B, L, C\], got shape \[2, 3\]"),
    (torch.zeros(2, 3, 5), dict(dtype=torch.float32, shape=(2, "L", 4)), ValueError,
     r"must have shape \[2, L, 4\], got \[2, 3, 5\]"),
    (torch.zeros(2, device="meta"), dict(dtype=torch.float32, device=CPU), ValueError,
     "is on meta, but the kernel's other inputs are on cpu"),
    (torch.zeros(4, 2).t(), dict(dtype=torch.float32), ValueError,
     r"must be contiguous in its last dimension, got strides \(1, 2\)"),
    (torch.zeros(4, 2)[::2], dict(dtype=torch.float32, layout="contiguous"), ValueError,
     r"must be contiguous, got strides \(4, 1\)"),
    (torch.zeros(1, 8, 3, 2, 2), dict(dtype=torch.float32, layout="channels_last_3d"), ValueError,
     r"must be channels-last 3-D .* dims \['C', 'W', 'H', 'T'\]"),
    (torch.zeros(8, 3, 2, 2), dict(dtype=torch.float32, layout="channels_last_3d"), ValueError,
     r"must be 5-D \[B, C, T, H, W\]"),
])
def test_each_refusal_names_the_argument(t, kwargs, error, match):
    with pytest.raises(error, match=f"^my_arg {match}"):
        check_tensor("my_arg", t, **kwargs)


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown layout 'rows'"):
        check_tensor("x", torch.zeros(2), dtype=torch.float32, layout="rows")


def test_checks_run_in_order_type_dtype_shape_device_layout():
    # A tensor wrong in every way is refused for its dtype first, then its shape, then where it is.
    with pytest.raises(TypeError, match="must be torch.bfloat16"):
        check_tensor("x", torch.zeros(3, 2, device="meta").t(), dtype=torch.bfloat16, shape=(4, 4), device=CPU)
    with pytest.raises(ValueError, match="must have shape"):
        check_tensor("x", torch.zeros(3, 2, device="meta").t(), dtype=torch.float32, shape=(4, 4), device=CPU)
    with pytest.raises(ValueError, match="is on meta"):
        check_tensor("x", torch.zeros(3, 2, device="meta").t(), dtype=torch.float32, shape=(2, 3), device=CPU)


def test_index_tensors_go_through_the_checker():
    # The kernels step 0 or 1 element per sample through an index tensor: a strided one is refused.
    with pytest.raises(ValueError, match="^row_lo must be contiguous in its last dimension"):
        index_arg("row_lo", torch.zeros(4, dtype=torch.int32)[::2], batch=2, lo=0, hi=8, device=CPU)
    with pytest.raises(TypeError, match="^row_lo must be torch.int32 or torch.int64, got torch.float32"):
        index_arg("row_lo", torch.zeros(2), batch=2, lo=0, hi=8, device=CPU)
    assert index_arg("row_lo", torch.zeros(2, dtype=torch.int64), batch=2, lo=0, hi=8, device=CPU).shape == (2,)
