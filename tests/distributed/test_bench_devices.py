"""`longlive-bench e2e|vae --devices N`: the option, and a clear error when not launched by torchrun."""
import pytest
import torch.distributed as dist

from longlive_triton.bench.cli import build_parser, main
from longlive_triton.distributed import DistributedError


def test_devices_option():
    parser = build_parser()
    assert parser.parse_args(["e2e"]).devices == 1
    assert parser.parse_args(["e2e", "--devices", "4"]).devices == 4
    assert parser.parse_args(["vae", "--devices", "2"]).devices == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["vae", "--devices", "3"])   # the VAE split is one generator rank and one VAE rank


@pytest.mark.parametrize("command", [["e2e", "--devices", "2"], ["vae", "--devices", "2"]])
def test_devices_without_torchrun_is_a_clear_error(monkeypatch, command):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="torchrun --nproc-per-node 2"):
        main(command)
    assert not dist.is_initialized()
