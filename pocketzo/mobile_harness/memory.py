"""Process memory as the OS sees it, sampled over time, and limits that prove a run fits a phone."""

from __future__ import annotations

import os
import re
import resource
import sys
import threading
import time
from dataclasses import dataclass

from pocketzo.errors import PocketzoError

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status_mb(key: str) -> float | None:
    """A line of /proc/self/status (``VmHWM``, ``RssAnon``...) in MB; None without /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (10**6 bytes).

    Linux's VmHWM where available: ``getrusage`` carries the parent's peak across fork+exec,
    so a freshly spawned child would report its parent's RSS.
    """
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def rss_mb() -> float:
    """Current resident set size in MB; the peak where /proc is missing (macOS)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 1e6
    except OSError:
        return peak_rss_mb()


def rss_kinds_mb() -> dict[str, float | None]:
    """Current RSS by kind, in MB: ``anonymous`` (the process's own memory) and ``file_backed`` (mapped files,
    such as a bundle's memory-mapped weights: page cache the OS can drop and read again); None without /proc."""
    return {"anonymous": _status_mb("RssAnon"), "file_backed": _status_mb("RssFile")}


def address_space_peak_mb() -> float | None:
    """Peak virtual size (VmPeak) in MB, which RLIMIT_AS bounds; None without /proc."""
    return _status_mb("VmPeak")


class RssSampler:
    """Samples RSS every ``interval`` seconds on a daemon thread; ``mark(label)`` tags phases."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, rss_mb()))
            self._stop.wait(self.interval)

    def mark(self, label: str) -> None:
        self.marks.append((time.perf_counter() - self.t0, label))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"samples": self.samples, "marks": self.marks}


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_bytes(text: str) -> int:
    """``"4G"`` -> 4e9 bytes; also ``"1500M"``, ``"3.5GB"``, ``"2GiB"``, plain bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?I?)B?\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise PocketzoError(f"cannot read memory size {text!r}; write e.g. 4G, 1500M or 3.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def limit_address_space(limit_bytes: int) -> None:
    """Cap this process's address space (RLIMIT_AS): allocations beyond it fail instead of swapping.

    A run that completes under the cap provably fits in that much memory. The cap counts
    reserved-but-untouched address space too (thread stacks, allocator arenas), so it is
    stricter than a phone's RAM accounting: a failure alone does not prove a run cannot fit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and limit_bytes > hard:
        raise PocketzoError(f"cannot set a memory budget of {limit_bytes / 1e9:.2f} GB above the hard limit "
                            f"{hard / 1e9:.2f} GB")
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))


@dataclass(frozen=True)
class PhoneProfile:
    """A typical phone: RAM, what Android leaves to one foreground app, and its big cores."""

    name: str
    ram_gb: float
    app_budget: str  # a --memory-budget
    threads: int  # big (performance) cores
    example: str


# Budgets are working assumptions, not measurements: Android keeps the system, the launcher and
# cached apps resident, and its low-memory killer stops a foreground app well before all RAM
# is used. We assume roughly 35-45 % of RAM is safe for one app; measure on the real phone.
PROFILES = {p.name: p for p in (
    PhoneProfile("budget-4gb", 4, "1.5G", 2, "entry-level phones (e.g. 2 x Cortex-A76-class + 6 little)"),
    PhoneProfile("mid-6gb", 6, "2.5G", 2, "mid-range (e.g. Snapdragon 7-series, 2 big cores)"),
    PhoneProfile("mid-8gb", 8, "3.5G", 4, "upper mid-range (e.g. Dimensity 8000-class, 4 big cores)"),
    PhoneProfile("flagship-12gb", 12, "5G", 4, "flagships (e.g. Snapdragon 8 Gen 2/3, 1 prime + 3-5 big cores)"),
    PhoneProfile("flagship-16gb", 16, "7G", 4, "16 GB flagships and gaming phones"),
)}


def profile(name: str) -> PhoneProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise PocketzoError(f"unknown phone profile {name!r}; choose one of {', '.join(PROFILES)}") from None
