"""Adapter arithmetic: hand-computed TIES/DARE, SVD re-factorisation, experts, and PEFT parity."""

from __future__ import annotations

import pytest
import torch

from moetune.errors import AdapterError
from moetune.peft.lora.experts_layout import from_peft, to_peft
from moetune.peft.arithmetic.combine import combine, random_masks
from moetune.peft.arithmetic.combine import combine_adapters as merge_adapters

LIN = "base_model.model.model.layers.0.self_attn.q_proj."
EXP = "base_model.model.model.layers.0.mlp.experts."


# --- hand-computed ----------------------------------------------------------------------------
def test_ties_hand_computed():
    t1 = torch.tensor([3.0, -2.5, 0.5, -2.0])
    t2 = torch.tensor([-4.0, -2.0, 1.0, 0.1])
    # density 0.5 keeps 2 of 4: t1 -> [3, -2.5, 0, 0], t2 -> [-4, -2, 0, 0]
    # elected signs from the summed mass [-1, -4.5, 0, 0]: [-, -, +, +]
    # agreeing entries: t1 only at 1; t2 at 0 and 1; weighted by (0.5, 2): t1 -> -1.25, t2 -> -8, -4
    # disjoint mean: [-8 / 1, (-1.25 - 4) / 2, 0, 0]
    out = combine([t1, t2], [0.5, 2.0], "ties", density=0.5)
    assert torch.equal(out, torch.tensor([-8.0, -2.625, 0.0, 0.0]))
    # frequency election: sign counts [0, -2, 0, 0] -> [+, -, +, +]; entry 0 keeps only t1's 3 * 0.5
    out = combine([t1, t2], [0.5, 2.0], "ties", density=0.5, sign_method="frequency")
    assert torch.equal(out, torch.tensor([1.5, -2.625, 0.0, 0.0]))


def test_dare_hand_computed():
    t1, t2 = torch.tensor([2.0, -4.0, 6.0]), torch.tensor([1.0, 1.0, -3.0])
    masks = [torch.tensor([True, False, True]), torch.tensor([True, True, False])]
    # density 0.5: kept entries are doubled: t1 -> [4, 0, 12], t2 -> [2, 2, 0]
    lin = combine([t1, t2], [1.0, 0.5], "dare_linear", density=0.5, masks=masks)
    assert torch.equal(lin, torch.tensor([5.0, 1.0, 12.0]))  # [4 + 1, 0 + 1, 12 + 0]
    # dare_ties: signs of [6, 2, 12] are all +; agreeing counts [2, 1, 1] -> [(4 + 1) / 2, 1, 12]
    ties = combine([t1, t2], [1.0, 0.5], "dare_ties", density=0.5, masks=masks)
    assert torch.equal(ties, torch.tensor([2.5, 1.0, 12.0]))


def test_dare_masks_are_seeded_and_rescaled():
    a = torch.randn(4, 16)
    state = {f"{LIN}lora_A.weight": a, f"{LIN}lora_B.weight": torch.ones(8, 4)}
    one = merge_adapters([state], [1.0], "dare_linear", density=0.25, seed=3)
    assert torch.equal(
        one[f"{LIN}lora_A.weight"],
        merge_adapters([state], [1.0], "dare_linear", density=0.25, seed=3)[f"{LIN}lora_A.weight"],
    )
    assert not torch.equal(
        one[f"{LIN}lora_A.weight"],
        merge_adapters([state], [1.0], "dare_linear", density=0.25, seed=4)[f"{LIN}lora_A.weight"],
    )
    kept = one[f"{LIN}lora_A.weight"] != 0
    assert torch.allclose(one[f"{LIN}lora_A.weight"][kept], a[kept] / 0.25)  # 1/(1-p) with p = 0.75
    assert 0.05 < kept.float().mean() < 0.5


def test_module_level_factors_follow_peft_weighting():
    g = torch.Generator().manual_seed(0)
    s1 = {f"{LIN}lora_A.weight": torch.randn(2, 6, generator=g), f"{LIN}lora_B.weight": torch.randn(5, 2, generator=g)}
    s2 = {k: torch.randn(v.shape, generator=g) for k, v in s1.items()}
    out = merge_adapters([s1, s2], [0.5, -2.0], "ties", density=0.5, scalings=[2.0, 1.0])
    # A weighted by sign(w s) sqrt|w s| = (1, -sqrt 2); B by sqrt|w s| = (1, sqrt 2)
    r2 = 2**0.5
    a = combine([s1[f"{LIN}lora_A.weight"], s2[f"{LIN}lora_A.weight"]], [1.0, -r2], "ties", density=0.5)
    b = combine([s1[f"{LIN}lora_B.weight"], s2[f"{LIN}lora_B.weight"]], [1.0, r2], "ties", density=0.5)
    assert torch.allclose(out[f"{LIN}lora_A.weight"], a) and torch.allclose(out[f"{LIN}lora_B.weight"], b)


# --- SVD and exact methods ---------------------------------------------------------------------
def _pair(r: int, out: int, inp: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{LIN}lora_A.weight": torch.randn(r, inp, generator=g),
        f"{LIN}lora_B.weight": torch.randn(out, r, generator=g),
    }


def _delta(state: dict, prefix: str = LIN) -> torch.Tensor:
    return state[f"{prefix}lora_B.weight"] @ state[f"{prefix}lora_A.weight"]


def test_svd_of_one_adapter_at_full_rank_reproduces_its_delta():
    state = _pair(4, 12, 10, 1)
    out = merge_adapters([state], [1.0], "svd", scalings=[2.5])
    assert out[f"{LIN}lora_A.weight"].shape == (4, 10)
    assert torch.allclose(_delta(out), 2.5 * _delta(state), atol=1e-5)


def test_svd_and_cat_give_the_weighted_sum_of_deltas():
    s1, s2 = _pair(3, 12, 10, 1), _pair(2, 12, 10, 2)
    want = 0.7 * 2.0 * _delta(s1) - 0.4 * 4.0 * _delta(s2)
    cat = merge_adapters([s1, s2], [0.7, -0.4], "cat", scalings=[2.0, 4.0])
    assert cat[f"{LIN}lora_A.weight"].shape == (5, 10) and torch.allclose(_delta(cat), want, atol=1e-5)
    svd = merge_adapters([s1, s2], [0.7, -0.4], "svd", rank=5, scalings=[2.0, 4.0])
    assert torch.allclose(_delta(svd), want, atol=1e-4)
    low = merge_adapters([s1, s2], [0.7, -0.4], "svd", rank=2, scalings=[2.0, 4.0])
    s = torch.linalg.svdvals(want)
    assert torch.allclose(torch.linalg.matrix_norm(_delta(low) - want), s[2:].norm(), rtol=1e-4)  # Eckart-Young
    padded = merge_adapters([s1], [1.0], "svd", rank=16)  # above min(out, in): zero directions
    assert padded[f"{LIN}lora_A.weight"].shape == (16, 10) and torch.allclose(_delta(padded), _delta(s1), atol=1e-4)


def test_experts_merge_per_expert():
    E, r, D, Fh = 3, 2, 8, 5
    g = torch.Generator().manual_seed(7)

    def experts_state() -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
        a, b = torch.randn(E, r, D, generator=g), torch.randn(E, Fh, r, generator=g)
        pa, pb = to_peft(a, b)
        return {f"{EXP}lora_A.weight": pa, f"{EXP}lora_B.weight": pb}, (a, b)

    (s1, (a1, b1)), (s2, (a2, b2)) = experts_state(), experts_state()
    out = merge_adapters([s1, s2], [1.0, 0.5], "ties", density=0.5, num_experts=E)
    a, b = from_peft(out[f"{EXP}lora_A.weight"], out[f"{EXP}lora_B.weight"], E)
    for e in range(E):  # each expert merged exactly as a linear would be
        lin = merge_adapters(
            [
                {f"{LIN}lora_A.weight": a1[e], f"{LIN}lora_B.weight": b1[e]},
                {f"{LIN}lora_A.weight": a2[e], f"{LIN}lora_B.weight": b2[e]},
            ],
            [1.0, 0.5],
            "ties",
            density=0.5,
        )
        assert torch.equal(a[e], lin[f"{LIN}lora_A.weight"]) and torch.equal(b[e], lin[f"{LIN}lora_B.weight"])
    svd = merge_adapters([s1], [1.0], "svd", num_experts=E)
    a, b = from_peft(svd[f"{EXP}lora_A.weight"], svd[f"{EXP}lora_B.weight"], E)
    assert torch.allclose(torch.bmm(b, a), torch.bmm(b1, a1), atol=1e-5)
    with pytest.raises(AdapterError, match="num_experts"):
        merge_adapters([s1], [1.0], "svd")


def test_bad_arguments():
    s = _pair(2, 4, 4, 0)
    with pytest.raises(AdapterError, match="not a merge method"):
        merge_adapters([s], [1.0], "average")
    with pytest.raises(AdapterError, match="density"):
        merge_adapters([s], [1.0], "ties")
    with pytest.raises(AdapterError, match="one rank"):
        merge_adapters([s, _pair(3, 4, 4, 1)], [1.0, 1.0], "linear")
    with pytest.raises(AdapterError, match="rank"):
        merge_adapters([s], [1.0], "linear", rank=2)
    with pytest.raises(AdapterError, match="DoRA"):
        merge_adapters([{**s, f"{LIN}lora_magnitude_vector": torch.ones(4)}], [1.0], "linear")
    with pytest.raises(AdapterError, match="half a LoRA pair"):
        merge_adapters([{f"{LIN}lora_A.weight": torch.ones(2, 4)}], [1.0], "linear")


def test_random_masks_draw_in_order():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ts = [torch.zeros(3, 4), torch.zeros(2)]
    masks = random_masks(ts, 0.3, g1)
    assert torch.equal(masks[0], torch.rand(3, 4, generator=g2) < 0.3) and torch.equal(
        masks[1], torch.rand(2, generator=g2) < 0.3
    )


# --- parity with PEFT's add_weighted_adapter ----------------------------------------------------
@pytest.mark.parametrize(
    "method", ["linear", "ties", "magnitude_prune", "cat", "svd", "ties_svd", "magnitude_prune_svd"]
)
def test_matches_peft_add_weighted_adapter(method):
    peft = pytest.importorskip("peft")
    from tiny_hf import make_hf_model

    model = peft.get_peft_model(
        make_hf_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    states = [peft.get_peft_model_state_dict(model, adapter_name=n) for n in ("default", "b")]
    weights, density = [0.7, -0.4], 0.5
    model.add_weighted_adapter(["default", "b"], weights, "m", combination_type=method, density=density)
    want = peft.get_peft_model_state_dict(model, adapter_name="m")
    got = merge_adapters(
        states,
        weights,
        method,
        density=density if "ties" in method or "prune" in method else None,
        scalings=[8 / 4, 16 / 4],
    )
    assert got.keys() == want.keys()
    for key in got:
        if "svd" in method:  # singular vectors are defined up to sign: compare the products
            if key.endswith("lora_A.weight"):
                prefix = key.removesuffix("lora_A.weight")
                assert torch.allclose(_delta(got, prefix), _delta(want, prefix), atol=1e-5), key
        else:
            assert torch.allclose(got[key], want[key], atol=1e-6), key
