"""Helpers the QAT API tests share (``test_api*.py``): fixed token ids, GPTQ options, and packed-weight comparison."""

from __future__ import annotations

import torch

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(0)).repeat(200)
GPTQ = dict(seq_len=32, n_sequences=8, progress=False)


def _calibration() -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))  # [n, t]


def _packed(model) -> dict[str, dict[str, torch.Tensor]]:
    return {
        n: {k: v for k, v in m.state_dict().items()} for n, m in model.linear_layers() if hasattr(m, "qweight")
    }


def _assert_same_packed(a, b):
    pa, pb = _packed(a), _packed(b)
    assert pa.keys() == pb.keys() and pa
    for name in pa:
        assert pa[name].keys() == pb[name].keys()
        for key in pa[name]:
            assert torch.equal(pa[name][key], pb[name][key]), (name, key)
