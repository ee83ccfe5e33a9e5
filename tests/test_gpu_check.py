"""scripts/gpu_check.sh: on a machine without a CUDA GPU it refuses at once, in one line, writing nothing."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_a_machine_without_cuda_is_refused_in_one_line(tmp_path):
    script = str(ROOT / "scripts" / "gpu_check.sh")
    done = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"error: scripts/gpu_check.sh checks a CUDA machine, and {sys.executable} sees no CUDA GPU "
                           f"(or no torch): run it where torch.cuda.is_available() is true\n")
    assert not (tmp_path / "out").exists()
    usage = ("usage: bash scripts/gpu_check.sh OUTDIR [PART ...] (PARTs: bench fp8_n_embd_256 fp8_n_embd_512 train "
             "pytest; none: all)")
    for arguments, message in (([], usage), (["out", "bench", "fp8"], f"error: no part fp8; {usage}")):
        done = subprocess.run(["bash", script, *arguments], capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stderr) == (2, message + "\n")
