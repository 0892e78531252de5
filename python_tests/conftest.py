"""Fixtures shared by the test modules."""
import pytest
import torch

import pcl_ext

HAS_CUDA = torch.cuda.is_available() and pcl_ext._build_info.WITH_CUDA
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of pcl_ext")
two_gpus_only = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                                   reason="needs two GPUs and a CUDA build of pcl_ext")


@pytest.fixture
def one_thread():
    """The test on one torch thread. faiss's OpenMP threads spin-wait, and on tiny tensors the
    OpenMP fan-out costs more than it saves: on a busy 2-core CI machine one thread is faster
    and does not stall. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
