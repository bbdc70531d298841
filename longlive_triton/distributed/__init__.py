"""Several GPUs through torch.distributed (launched with torchrun): the VAE on its own rank,
pipelined with generation (`vae_rank`), and sequence-parallel generation (`sequence_parallel`)."""
from .group import DEFAULT_TIMEOUT_S, DistContext, DistributedError, agree, close_distributed, init_distributed
from .sequence_parallel import SequenceParallelGenerator, sequence_parallel
from .vae_rank import VaeServeResult, iter_video_split, serve_vae, stream_to_vae

__all__ = ["DEFAULT_TIMEOUT_S", "DistContext", "DistributedError", "SequenceParallelGenerator", "VaeServeResult",
           "agree", "close_distributed", "init_distributed", "iter_video_split", "sequence_parallel", "serve_vae",
           "stream_to_vae"]
