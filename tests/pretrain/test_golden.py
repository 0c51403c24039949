"""Golden loss traces (see tests/pretrain/golden.py for what they are and how to regenerate them).

On a machine with the kernels that wrote them (same torch version and CPU capability) the losses must
match bit for bit. Elsewhere CPU kernels may round differently, and 20 steps of training amplify that,
so the traces must then agree to TOLERANCE (relative): still far below any change of the method.
"""

import json

import pytest

from tests.pretrain.golden import STEPS, TRACES, all_traces, machine

TOLERANCE = 1e-3


@pytest.mark.slow
def test_tiny_presets_reproduce_their_golden_loss_traces(tiny_data_dir, tmp_path):
    golden = json.loads(TRACES.read_text())
    traces = all_traces(tiny_data_dir, tmp_path)
    exact = golden["machine"] == machine()
    for stage, expected in golden["losses"].items():
        got = traces[stage]
        assert len(got) == STEPS, (stage, len(got))
        if exact:
            assert got == expected, f"{stage}: losses changed; first steps {got[:3]} vs golden {expected[:3]}"
        else:
            assert got == pytest.approx(expected, rel=TOLERANCE), stage
