"""The GPU catalogue: names as providers write them, classified."""

from __future__ import annotations

import msgspec
import pytest

from schemas.catalogue import GpuClass, Tier, Vendor, classify, groups

NV, AMD, INTEL, APPLE = Vendor.NVIDIA, Vendor.AMD, Vendor.INTEL, Vendor.APPLE
ENT, HIGH, MID, LOW = Tier.ENTERPRISE, Tier.HIGH_END, Tier.MID_RANGE, Tier.BUDGET

NAMES: list[tuple[str, str, Vendor, Tier, int]] = [
    # name as written                 model              vendor tier  vram
    ("RTX 4090", "RTX 4090", NV, MID, 24),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", NV, MID, 24),
    ("A100-SXM4-80GB", "A100", NV, HIGH, 80),
    ("A100 PCIE", "A100", NV, HIGH, 40),
    ("A100 PCIe 80GB", "A100", NV, HIGH, 80),
    ("nvidia_a100_80gb_pcie", "A100", NV, HIGH, 80),
    ("H100 NVL", "H100", NV, ENT, 94),
    ("H100 SXM", "H100", NV, ENT, 80),
    ("NVIDIA H100 80GB HBM3", "H100", NV, ENT, 80),
    ("H200", "H200", NV, ENT, 141),
    ("GH200", "GH200", NV, ENT, 96),
    ("B200", "B200", NV, ENT, 180),
    ("GB200", "GB200", NV, ENT, 186),
    ("Tesla V100", "V100", NV, HIGH, 16),
    ("Tesla V100-SXM2-32GB", "V100", NV, HIGH, 32),
    ("L40S", "L40S", NV, HIGH, 48),
    ("L40", "L40", NV, HIGH, 48),
    ("L4", "L4", NV, MID, 24),
    ("A40", "A40", NV, HIGH, 48),
    ("A10", "A10", NV, MID, 24),
    ("A10G", "A10G", NV, MID, 24),
    ("RTX A6000", "RTX A6000", NV, HIGH, 48),
    ("A6000", "RTX A6000", NV, HIGH, 48),
    ("RTX 6000Ada", "RTX 6000 Ada", NV, HIGH, 48),
    ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada", NV, HIGH, 48),
    ("Quadro RTX 6000", "Quadro RTX 6000", NV, MID, 24),
    ("Quadro RTX 8000", "Quadro RTX 8000", NV, HIGH, 48),
    ("RTX A5000", "RTX A5000", NV, MID, 24),
    ("RTX 4090 D", "RTX 4090 D", NV, MID, 24),
    ("RTX 4080", "RTX 4080", NV, MID, 16),
    ("RTX 3060", "RTX 3060", NV, LOW, 12),
    ("RTX 3060 Ti", "RTX 3060 Ti", NV, LOW, 8),
    ("GeForce RTX 3070", "RTX 3070", NV, LOW, 8),
    ("Tesla T4", "T4", NV, LOW, 16),
    ("MI300X", "MI300X", AMD, ENT, 192),
    ("AMD Instinct MI250X", "MI250X", AMD, HIGH, 128),
    ("Instinct MI210", "MI210", AMD, MID, 64),
    ("Radeon RX 7900 XTX", "RX 7900 XTX", AMD, MID, 24),
    ("Radeon RX 7900 XT", "RX 7900 XT", AMD, MID, 20),
    ("RX 6600", "RX 6600", AMD, LOW, 8),
    ("Intel Arc A770", "Arc A770", INTEL, LOW, 16),
    ("Gaudi2", "Gaudi 2", INTEL, HIGH, 96),
    ("Apple M2 Ultra", "M2 Ultra", APPLE, MID, 64),
    ("Apple M2 Ultra 192GB", "M2 Ultra", APPLE, MID, 192),
    ("M3 Max", "M3 Max", APPLE, MID, 36),
]


@pytest.mark.parametrize(("name", "model", "vendor", "tier", "vram_gb"), NAMES)
def test_a_provider_name_classifies_to_its_model(
    name: str, model: str, vendor: Vendor, tier: Tier, vram_gb: int
) -> None:
    assert classify(name) == GpuClass(
        name=name, model=model, vendor=vendor, tier=tier, vram_gb=vram_gb, known=True
    )


@pytest.mark.parametrize(
    "spelling",
    ["RTX 4090", "rtx 4090", "RTX4090", "rtx-4090", "  RTX_4090 ", "NVIDIA GeForce RTX 4090"],
)
def test_case_spaces_dashes_and_vendor_prefixes_do_not_matter(spelling: str) -> None:
    assert classify(spelling).model == "RTX 4090"


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("RTX 4090 D", "RTX 4090 D"),
        ("RTX 4090D", "RTX 4090 D"),
        ("A100", "A100"),
        ("A10", "A10"),
        ("RTX A6000", "RTX A6000"),
        ("RTX 6000 Ada", "RTX 6000 Ada"),
        ("RTX 6000", "Quadro RTX 6000"),
        ("H200", "H200"),
        ("GH200", "GH200"),
        ("H20", "H20"),
        ("MI300X", "MI300X"),
        ("MI300A", "MI300A"),
        ("RX 7900 XT", "RX 7900 XT"),
        ("RX 7900 XTX", "RX 7900 XTX"),
    ],
)
def test_the_most_specific_pattern_wins(name: str, model: str) -> None:
    assert classify(name).model == model


def test_a_memory_size_in_the_name_wins_over_the_typical_one() -> None:
    assert classify("RTX A4000").vram_gb == 16
    assert classify("RTX A4000 20GB").vram_gb == 20
    assert classify("A100 40G").vram_gb == 40


def test_a_letter_glued_to_digits_is_not_a_memory_size() -> None:
    # The "10G" of A10G is part of the model, not 10 GB.
    assert classify("A10G").vram_gb == 24


def test_an_unknown_name_keeps_its_words_and_guesses_the_vendor() -> None:
    assert classify("NVIDIA  Quantum X9 48GB") == GpuClass(
        name="NVIDIA  Quantum X9 48GB",
        model="NVIDIA Quantum X9 48GB",
        vendor=Vendor.NVIDIA,
        tier=Tier.UNKNOWN,
        vram_gb=48,
        known=False,
    )
    assert classify("Frobnicator 3000") == GpuClass(
        name="Frobnicator 3000",
        model="Frobnicator 3000",
        vendor=Vendor.UNKNOWN,
        tier=Tier.UNKNOWN,
        vram_gb=0,
        known=False,
    )


def test_an_empty_name_is_unknown() -> None:
    assert not classify("").known
    assert classify("").vram_gb == 0


def test_groups_list_vendors_in_order_and_tiers_from_the_top_down() -> None:
    order = [(g.vendor, g.tier) for g in groups()]

    assert order[0] == (Vendor.NVIDIA, Tier.ENTERPRISE)
    assert order == sorted(
        order, key=lambda vt: (list(Vendor).index(vt[0]), list(Tier).index(vt[1]))
    )
    assert {vendor for vendor, _ in order} == {NV, AMD, INTEL, APPLE}
    assert all(tier is not Tier.UNKNOWN for _, tier in order)


def test_groups_name_the_brief_examples_in_their_tiers() -> None:
    tiers = {model: g.tier for g in groups() for model in g.models}

    for model in ("H100", "H200", "B200", "GH200", "MI300X"):
        assert tiers[model] is Tier.ENTERPRISE
    for model in ("A100", "V100", "A40", "L40S", "RTX A6000", "MI250X"):
        assert tiers[model] is Tier.HIGH_END
    for model in ("RTX 4090", "RTX 3090", "RTX 4080", "A10", "L4", "RTX A5000", "MI210"):
        assert tiers[model] is Tier.MID_RANGE
    for model in ("RTX 3060", "RTX 3070", "T4", "RX 6600"):
        assert tiers[model] is Tier.BUDGET


def test_every_canonical_model_is_in_one_group_and_classifies_to_itself() -> None:
    seen: set[str] = set()
    for group in groups():
        for model in group.models:
            assert model not in seen
            seen.add(model)
            found = classify(model)
            assert (found.model, found.vendor, found.tier) == (model, group.vendor, group.tier)
            assert found.known
            assert found.vram_gb > 0


def test_a_class_travels_as_json_with_plain_strings() -> None:
    wire = msgspec.json.decode(msgspec.json.encode(classify("H100 NVL")))

    assert wire == {
        "name": "H100 NVL",
        "model": "H100",
        "vendor": "nvidia",
        "tier": "enterprise",
        "vram_gb": 94,
        "known": True,
    }
