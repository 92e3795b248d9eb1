"""What a GPU is, from the name a provider writes for it.

Providers spell one card many ways ("NVIDIA GeForce RTX 3090", "RTX_3090", "rtx3090"). A name
is read as a sequence of tokens, each a run of letters or a run of digits, so that case,
spaces, dashes and a glued "6000Ada" do not matter and "A100" never reads as "A10" (`100` is
one token). A catalogue pattern matches when its tokens appear side by side in the name; of
all matches the one with the most tokens wins, so "RTX 4090 D" beats "RTX 4090" and "RTX
6000 Ada" beats the older "RTX 6000". Vendor prefixes need no stripping: they are just tokens
no pattern asks for. A memory size written in the name ("80GB") wins over the typical one.
"""

from __future__ import annotations

import enum
import functools
import re

import msgspec


class Vendor(enum.StrEnum):
    NVIDIA = "nvidia"
    AMD = "amd"
    INTEL = "intel"
    APPLE = "apple"
    UNKNOWN = "unknown"


class Tier(enum.StrEnum):
    """How much work a GPU takes on, from the largest models to the smallest."""

    ENTERPRISE = "enterprise"
    """Current data-centre flagships: H100, H200, B200, GH200, MI300X."""
    HIGH_END = "high_end"
    """Earlier flagships and 48 GB workstation cards: A100, V100, L40S, RTX A6000, MI250X."""
    MID_RANGE = "mid_range"
    """24-32 GB cards: RTX 4090, RTX 3090, A10, L4, RTX A5000, MI210, RX 7900 XTX."""
    BUDGET = "budget"
    """Up to 16 GB or older generations: RTX 3060, RTX 3070, T4, RX 6600, Arc A770."""
    UNKNOWN = "unknown"


class GpuClass(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU name, classified."""

    name: str
    """The name as given."""
    model: str
    """Canonical model, e.g. "A100" or "RTX 4090"; the name tidied up when not `known`."""
    vendor: Vendor
    tier: Tier
    vram_gb: int
    """Memory of one GPU: the size written in the name, else the model's typical one; 0 when
    neither is known."""
    known: bool
    """Whether the name matched a catalogue model."""


class GpuGroup(msgspec.Struct, frozen=True, kw_only=True):
    vendor: Vendor
    tier: Tier
    models: tuple[str, ...]


class _Entry(msgspec.Struct, frozen=True):
    model: str
    vendor: Vendor
    tier: Tier
    vram_gb: int
    patterns: tuple[str, ...]


_Row = tuple[str, int, tuple[str, ...]]


def _gpu(model: str, vram_gb: int, *also: str) -> _Row:
    """A model, its typical memory, and other ways of writing it."""
    return (model, vram_gb, (model, *also))


def _variant(pattern: str, model: str, vram_gb: int) -> _Row:
    """A spelling of `model` whose memory differs from the model's typical one."""
    return (model, vram_gb, (pattern,))


def _family(vendor: Vendor, tier: Tier, *rows: _Row) -> tuple[_Entry, ...]:
    return tuple(_Entry(model, vendor, tier, vram, patterns) for model, vram, patterns in rows)


_NV, _AMD, _INTEL, _APPLE = Vendor.NVIDIA, Vendor.AMD, Vendor.INTEL, Vendor.APPLE
_ENT, _HIGH, _MID, _LOW = Tier.ENTERPRISE, Tier.HIGH_END, Tier.MID_RANGE, Tier.BUDGET

_CATALOGUE: tuple[_Entry, ...] = (
    *_family(
        _NV,
        _ENT,
        _gpu("B300", 288),
        _gpu("GB200", 186),
        _gpu("B200", 180),
        _gpu("B100", 192),
        _gpu("GH200", 96),
        _gpu("H200", 141, "H200 SXM", "H200 NVL"),
        _gpu("H100", 80, "H100 SXM", "H100 SXM5", "H100 PCIe"),
        _variant("H100 NVL", "H100", 94),
        _gpu("H800", 80),
        _gpu("H20", 96),
    ),
    *_family(
        _NV,
        _HIGH,
        _gpu("A100", 80, "A100 SXM4", "A100 SXM", "A100X"),
        _variant("A100 PCIe", "A100", 40),
        _gpu("A800", 80),
        _gpu("V100", 16, "V100 SXM2"),
        _variant("V100S", "V100", 32),
        _gpu("L40S", 48),
        _gpu("L40", 48),
        _gpu("A40", 48),
        _gpu("RTX PRO 6000", 96),
        _gpu("RTX 6000 Ada", 48, "RTX 6000 Ada Generation"),
        _gpu("RTX A6000", 48, "A6000"),
        _gpu("Quadro RTX 8000", 48, "RTX 8000"),
    ),
    *_family(
        _NV,
        _MID,
        _gpu("RTX 5090", 32),
        _gpu("RTX 4090 D", 24),
        _gpu("RTX 4090", 24),
        _gpu("RTX 4080 SUPER", 16),
        _gpu("RTX 4080", 16),
        _gpu("RTX 5080", 16),
        _gpu("RTX 3090 Ti", 24),
        _gpu("RTX 3090", 24),
        _gpu("Titan RTX", 24),
        _gpu("A10G", 24),
        _gpu("A10", 24),
        _gpu("A30", 24),
        _gpu("L4", 24),
        _gpu("RTX 5000 Ada", 32),
        _gpu("RTX A5500", 24, "A5500"),
        _gpu("RTX A5000", 24, "A5000"),
        _gpu("RTX A4500", 20, "A4500"),
        _gpu("Quadro RTX 6000", 24, "RTX 6000"),
    ),
    *_family(
        _NV,
        _LOW,
        _gpu("RTX 5070 Ti", 16),
        _gpu("RTX 5070", 12),
        _gpu("RTX 5060 Ti", 16),
        _gpu("RTX 4070 Ti SUPER", 16),
        _gpu("RTX 4070 Ti", 12),
        _gpu("RTX 4070 SUPER", 12),
        _gpu("RTX 4070", 12),
        _gpu("RTX 4060 Ti", 8),
        _gpu("RTX 4060", 8),
        _gpu("RTX 3080 Ti", 12),
        _gpu("RTX 3080", 10),
        _gpu("RTX 3070 Ti", 8),
        _gpu("RTX 3070", 8),
        _gpu("RTX 3060 Ti", 8),
        _gpu("RTX 3060", 12),
        _gpu("RTX 2080 Ti", 11),
        _gpu("RTX 2080", 8),
        _gpu("RTX 2070", 8),
        _gpu("RTX 2060", 6),
        _gpu("GTX 1080 Ti", 11),
        _gpu("GTX 1080", 8),
        _gpu("GTX 1070", 8),
        _gpu("GTX 1660", 6),
        _gpu("Titan V", 12),
        _gpu("RTX 4000 Ada", 20, "RTX 4000 SFF Ada"),
        _gpu("RTX A4000", 16, "A4000"),
        _gpu("RTX A2000", 12, "A2000"),
        _gpu("Quadro RTX 5000", 16, "RTX 5000"),
        _gpu("Quadro RTX 4000", 8, "RTX 4000"),
        _gpu("T4", 16),
        _gpu("A16", 16),
        _gpu("A2", 16),
        _gpu("P100", 16),
        _gpu("P40", 24),
        _gpu("P4", 8),
        _gpu("M40", 24),
        _gpu("K80", 12),
    ),
    *_family(
        _AMD,
        _ENT,
        _gpu("MI355X", 288),
        _gpu("MI325X", 256),
        _gpu("MI300X", 192),
        _gpu("MI300A", 128),
    ),
    *_family(
        _AMD,
        _HIGH,
        _gpu("MI250X", 128),
        _gpu("MI250", 128),
        _gpu("Radeon Pro W7900", 48, "Pro W7900", "W7900"),
    ),
    *_family(
        _AMD,
        _MID,
        _gpu("MI210", 64),
        _gpu("MI100", 32),
        _gpu("RX 7900 XTX", 24),
        _gpu("RX 7900 XT", 20),
        _gpu("Radeon Pro W7800", 32, "Pro W7800", "W7800"),
    ),
    *_family(
        _AMD,
        _LOW,
        _gpu("RX 7900 GRE", 16),
        _gpu("RX 7800 XT", 16),
        _gpu("RX 7600", 8),
        _gpu("RX 6900 XT", 16),
        _gpu("RX 6800 XT", 16),
        _gpu("RX 6800", 16),
        _gpu("RX 6700 XT", 12),
        _gpu("RX 6600 XT", 8),
        _gpu("RX 6600", 8),
    ),
    *_family(_INTEL, _ENT, _gpu("Gaudi 3", 128)),
    *_family(
        _INTEL,
        _HIGH,
        _gpu("Gaudi 2", 96),
        _gpu("Data Center GPU Max 1550", 128, "Max 1550"),
    ),
    *_family(_INTEL, _MID, _gpu("Data Center GPU Max 1100", 48, "Max 1100")),
    *_family(
        _INTEL,
        _LOW,
        _gpu("Arc B580", 12, "B580"),
        _gpu("Arc A770", 16, "A770"),
        _gpu("Arc A750", 8, "A750"),
        _gpu("Arc A380", 6, "A380"),
    ),
    *_family(
        _APPLE,
        _MID,
        _gpu("M3 Ultra", 96),
        _gpu("M2 Ultra", 64),
        _gpu("M1 Ultra", 64),
        _gpu("M4 Max", 36),
        _gpu("M3 Max", 36),
        _gpu("M2 Max", 32),
        _gpu("M1 Max", 32),
    ),
    *_family(
        _APPLE,
        _LOW,
        _gpu("M4 Pro", 24),
        _gpu("M3 Pro", 18),
        _gpu("M2 Pro", 16),
        _gpu("M1 Pro", 16),
        _gpu("M4", 16),
        _gpu("M3", 8),
        _gpu("M2", 8),
        _gpu("M1", 8),
    ),
)

_WORD = re.compile(r"[A-Z]+|[0-9]+")
# "80GB", "80 GB", "-40G-", "24GiB"; not the "10G" of "A10G" (a letter runs into the digits).
_VRAM = re.compile(r"(?<![A-Z0-9.])([0-9]{1,4}) ?(?:GB|GIB|G)(?![A-Z0-9])")
_MAX_VRAM_GB = 4096

_VENDOR_WORDS: dict[str, Vendor] = {
    "NVIDIA": _NV,
    "GEFORCE": _NV,
    "RTX": _NV,
    "GTX": _NV,
    "TESLA": _NV,
    "QUADRO": _NV,
    "TITAN": _NV,
    "AMD": _AMD,
    "RADEON": _AMD,
    "INSTINCT": _AMD,
    "INTEL": _INTEL,
    "ARC": _INTEL,
    "GAUDI": _INTEL,
    "APPLE": _APPLE,
}
"""Words that give away the vendor of a name the catalogue does not know."""


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.upper()))


_PATTERNS: tuple[tuple[tuple[str, ...], _Entry], ...] = tuple(
    sorted(
        ((_tokens(p), entry) for entry in _CATALOGUE for p in entry.patterns),
        # Most tokens first, then most characters: the first match is the most specific.
        key=lambda item: (-len(item[0]), -sum(map(len, item[0]))),
    )
)


def _contains(name: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    width = len(pattern)
    return any(name[i : i + width] == pattern for i in range(len(name) - width + 1))


def _vram_written(upper: str) -> tuple[int, str]:
    """The memory size written in a name (0 if none) and the name without it."""
    found = 0
    for match in _VRAM.finditer(upper):
        size = int(match.group(1))
        if 0 < size <= _MAX_VRAM_GB:
            found = size
    return found, _VRAM.sub(" ", upper)


@functools.lru_cache(maxsize=4096)
def classify(name: str) -> GpuClass:
    """The class of a GPU name as a provider writes it."""
    written, rest = _vram_written(name.upper())
    tokens = _tokens(rest)
    for pattern, entry in _PATTERNS:
        if _contains(tokens, pattern):
            return GpuClass(
                name=name,
                model=entry.model,
                vendor=entry.vendor,
                tier=entry.tier,
                vram_gb=written or entry.vram_gb,
                known=True,
            )
    vendor = next((_VENDOR_WORDS[t] for t in tokens if t in _VENDOR_WORDS), Vendor.UNKNOWN)
    return GpuClass(
        name=name,
        model=" ".join(name.split()),
        vendor=vendor,
        tier=Tier.UNKNOWN,
        vram_gb=written,
        known=False,
    )


def groups() -> list[GpuGroup]:
    """The catalogue by vendor, then tier from the top down, each with its canonical models."""
    found: dict[tuple[Vendor, Tier], list[str]] = {}
    for entry in _CATALOGUE:
        models = found.setdefault((entry.vendor, entry.tier), [])
        if entry.model not in models:
            models.append(entry.model)
    order = {tier: i for i, tier in enumerate(Tier)}
    vendors = {vendor: i for i, vendor in enumerate(Vendor)}
    return [
        GpuGroup(vendor=vendor, tier=tier, models=tuple(models))
        for (vendor, tier), models in sorted(
            found.items(), key=lambda item: (vendors[item[0][0]], order[item[0][1]])
        )
    ]
