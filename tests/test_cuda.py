"""CUDA correctness where a GPU exists (the CI machines have none; this runs on GPU hosts)."""

import pytest
import torch

from sfdbench.harness.sampling import generate
from sfdbench.methods import FitContext, get_method
from sfdbench.suites.digits import DigitsSuite

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name,nfe", [("ddim", 10), ("dpmpp3m", 5), ("heun", 10)])
def test_cuda_samples_match_cpu(name, nfe, tmp_path):
    suite = DigitsSuite()
    images = {}
    for device in ("cpu", "cuda"):
        fitted = get_method(name).fit(FitContext(suite=suite, teacher=suite.load_teacher(device=device), nfe=nfe,
                                                 workdir=tmp_path, device=torch.device(device)))
        images[device], _, stats = generate(fitted, suite, 0, 64, device=device)
        assert stats["nfe_counted"] == nfe
    assert (images["cuda"].int() - images["cpu"].int()).abs().max() <= 1
