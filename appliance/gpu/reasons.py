"""NVML's clock-event (formerly "throttle") reasons: the bitmask as names.

The bits are nvml.h's nvmlClocksEventReason* values; pynvml 13.x still defines the
older nvmlClocksThrottleReason* names with the same values (plus BoardLimit and
Reliability, which only the older names have). A bit not listed here is kept as
`0x...`, so a newer driver's reason is shown, not lost.
"""
from __future__ import annotations

REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
REASON_BITS = {name: bit for bit, name in REASONS.items()}

THERMAL = frozenset({"sw_thermal", "hw_thermal"})
POWER = frozenset({"sw_power_cap", "hw_power_brake"})
HARDWARE = frozenset({"hw_slowdown", "hw_thermal", "hw_power_brake"})


def decode(mask: int) -> list[str]:
    """The names of the bits set, lowest bit first."""
    names, bit = [], 1
    while bit <= mask:
        if mask & bit:
            names.append(REASONS.get(bit, f"0x{bit:x}"))
        bit <<= 1
    return names


def summary(names: list[str]) -> tuple[bool, bool, bool]:
    """(thermal, power, hardware): what a consumer needs to know without the details."""
    s = set(names)
    return bool(s & THERMAL), bool(s & POWER), bool(s & HARDWARE)
