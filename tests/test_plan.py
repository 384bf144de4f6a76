import json

import pytest

from lieq_export.models import describe
from lieq_export.plan import BitPlan, PlanError, check_budget, default_group_size
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def layout():
    return describe(tiny_model("llama", layers=4))


def test_json_round_trip(layout):
    plan = BitPlan((2, 4, 3, 8), 32, symmetric=True, method="gptq", embed_bits=4, lm_head_bits=None,
                   allocator="lieq", budget=3.5)
    text = plan.to_json(layout)
    assert json.loads(text)["schema_version"] == 1
    assert "accounting" in json.loads(text)
    assert BitPlan.from_json(text) == plan


def test_accounting_weights_layers_by_parameters(layout):
    plan = BitPlan((2, 2, 4, 8), 32)
    acc = plan.accounting(layout)
    per_layer = layout.layers[0].params
    assert acc["params_per_width"] == {"2": 2 * per_layer, "4": per_layer, "8": per_layer}
    assert acc["avg_grid_bits"] == pytest.approx((2 + 2 + 4 + 8) / 4)
    assert acc["storage_bits"]["pte"] == pytest.approx((4 + 4 + 4 + 8) / 4)
    assert acc["storage_bits"]["onnx"] == pytest.approx((2 + 2 + 4 + 8) / 4)
    assert acc["predicted_bytes"]["onnx"] < acc["predicted_bytes"]["pte"]


def test_predicted_bytes_count_scales_and_zero_points(layout):
    sym = BitPlan.uniform(layout, 4, 32, symmetric=True).accounting(layout)["predicted_bytes"]["onnx"]
    asym = BitPlan.uniform(layout, 4, 32).accounting(layout)["predicted_bytes"]["onnx"]
    groups = sum(s.params // 32 for s in layout.linears())
    # one 4-bit zero point per group, and one 8-bit zero point per row of the 8-bit tables
    assert asym - sym == pytest.approx(groups * 0.5 + 2 * layout.vocab_size, abs=1)


def test_default_group_size():
    assert default_group_size(describe(tiny_model("llama", hidden=64))) == 64
    assert default_group_size(describe(tiny_model("llama", hidden=96))) == 32


def test_bad_plans_rejected(layout):
    with pytest.raises(PlanError, match="plan has 3 layer widths but the model has 4 decoder layers"):
        BitPlan((4, 4, 4), 32).validate(layout)
    with pytest.raises(PlanError, match=r"layer widths \[5\] are not supported"):
        BitPlan((4, 5, 4, 4), 32)
    with pytest.raises(PlanError, match="group_size 48 does not divide the input width 64"):
        BitPlan((4, 4, 4, 4), 48).validate(layout)
    with pytest.raises(PlanError, match="embed_bits=2 is not supported"):
        BitPlan((4, 4, 4, 4), 32, embed_bits=2)
    with pytest.raises(PlanError, match="method 'awq' is unknown"):
        BitPlan((4, 4, 4, 4), 32, method="awq")
    with pytest.raises(PlanError, match="budget 1.5 is outside"):
        check_budget((2, 4), 1.5)
    with pytest.raises(PlanError, match="budget 4.5 is outside"):
        check_budget((2, 3, 4), 4.5)


def test_bad_plan_json_rejected():
    good = BitPlan((4, 4), 32).to_dict()
    with pytest.raises(PlanError, match="not valid JSON"):
        BitPlan.from_json("{")
    with pytest.raises(PlanError, match="schema_version 99"):
        BitPlan.from_dict({**good, "schema_version": 99})
    with pytest.raises(PlanError, match=r"unknown plan fields \['bitz'\]"):
        BitPlan.from_dict({**good, "bitz": 1})
    with pytest.raises(PlanError, match=r"missing \['group_size'\]"):
        BitPlan.from_dict({k: v for k, v in good.items() if k != "group_size"})
    with pytest.raises(PlanError, match="layer_bits must be a list of integers"):
        BitPlan.from_dict({**good, "layer_bits": "4,4"})
