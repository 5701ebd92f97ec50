"""Where a worker's GPU numbers come from: NVML, a labelled simulation, or nowhere.

Placement weighs workers by what their GPU is doing, so a number that is not measured
must never look measured: a field NVML cannot give is None, a worker without a GPU
reports no GPU at all, and simulated numbers say "simulated" in every sample.

Every source has the same two methods, ``sample() -> dict | None`` and ``close()``, plus
``info`` (static: source, index, name, uuid). ``sample()`` may block for microseconds
to milliseconds in the driver, so callers run it on a background thread, never on the
worker's event loop (see ``worker_setup.metrics``).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

try:  # nvidia-ml-py; a missing module means the same as a missing driver
    import pynvml
except ImportError:  # pragma: no cover - it is a declared dependency
    pynvml = None  # type: ignore[assignment]

logger = logging.getLogger("worker_setup.gpu")

MODES = ("auto", "nvml", "simulated", "off")

# Clock-event bits that are not throttling: an idle GPU drops its clocks on purpose, and
# application clocks are a setting. Everything else is the GPU running slower than asked.
_NOT_THROTTLING = {0x1, 0x2}
_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}


class GpuSource(Protocol):
    info: dict[str, Any]

    def sample(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class NvmlUnavailable(RuntimeError):
    """NVML could not be used: no library, no driver, no device, or no such device."""


def throttle_reasons(mask: int) -> list[str]:
    """Readable names of the bits in a clocks-event mask that really slow the GPU down."""
    out = []
    for bit in range(64):
        b = 1 << bit
        if mask & b and b not in _NOT_THROTTLING:
            out.append(_REASONS.get(b, f"unknown_{b:#x}"))
    return out


def device_selector(configured: int | str | None = None, env: dict[str, str] | None = None) -> int | str | None:
    """Which NVML device this worker uses: ``gpu-index``, else the first entry of
    CUDA_VISIBLE_DEVICES (an index or a GPU-/MIG- UUID), else 0. None means
    CUDA_VISIBLE_DEVICES hides every GPU from this process."""
    if configured is not None and configured != "":
        return int(configured) if str(configured).lstrip("-").isdigit() else str(configured)
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return 0
    first = visible.split(",")[0].strip()
    if not first or first.startswith("-"):
        return None
    return int(first) if first.isdigit() else first


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSource:
    """One NVML device, read field by field; what NVML cannot give is None."""

    def __init__(self, device: int | str | None = 0) -> None:
        nv = self._nv = pynvml
        self._closed = True  # nothing to shut down until nvmlInit succeeds
        if nv is None:
            raise NvmlUnavailable("NVML is unavailable: the nvidia-ml-py package (module pynvml) is not installed")
        if device is None:
            raise NvmlUnavailable("NVML: CUDA_VISIBLE_DEVICES hides every GPU from this worker")
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            raise NvmlUnavailable(f"NVML is unavailable on this machine ({e}): no NVIDIA driver or GPU") from e
        try:
            count = nv.nvmlDeviceGetCount()
            if count == 0:
                raise NvmlUnavailable("NVML initialised but sees no GPU")
            if isinstance(device, int):
                if not 0 <= device < count:
                    raise NvmlUnavailable(f"NVML device {device} does not exist ({count} GPU(s) visible)")
                handle = nv.nvmlDeviceGetHandleByIndex(device)
            else:
                handle = nv.nvmlDeviceGetHandleByUUID(device)
            self._h = handle
            self._read_static(device)
        except nv.NVMLError as e:
            nv.nvmlShutdown()
            raise NvmlUnavailable(f"NVML device {device!r} cannot be opened: {e}") from e
        except NvmlUnavailable:
            nv.nvmlShutdown()
            raise
        self._closed = False

    def _read_static(self, device: int | str) -> None:
        """What does not change while the process runs: read once, not every sample."""
        nv, h = self._nv, self._h
        index = self._field(nv.nvmlDeviceGetIndex, h)
        self.info = {
            "source": "nvml",
            "index": index if index is not None else (device if isinstance(device, int) else None),
            "name": _text(nv.nvmlDeviceGetName(h)),
            "uuid": _text(nv.nvmlDeviceGetUUID(h)),
        }
        self._slowdown_temp = self._field(nv.nvmlDeviceGetTemperatureThreshold, h, nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
        self._sm_max = self._field(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_SM)
        # New bindings name it "clocks event reasons"; an older driver may lack that symbol.
        self._reasons_fn = nv.nvmlDeviceGetCurrentClocksThrottleReasons
        events = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if events is not None:
            try:
                events(h)
                self._reasons_fn = events
            except nv.NVMLError_FunctionNotFound:
                pass
            except nv.NVMLError:
                self._reasons_fn = events

    def _field(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML read; None where this GPU or driver does not give it. Any other NVML
        error (a lost GPU, say) propagates, so the sampler reports it."""
        nv = self._nv
        try:
            return fn(*args)
        except (nv.NVMLError_NotSupported, nv.NVMLError_FunctionNotFound, nv.NVMLError_NoPermission):
            return None

    def _ecc(self) -> dict[str, int | None] | None:
        nv, h = self._nv, self._h
        fn = nv.nvmlDeviceGetTotalEccErrors
        out = {
            "volatile_uncorrected": self._field(fn, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC),
            "volatile_corrected": self._field(fn, h, nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_VOLATILE_ECC),
        }
        return None if all(v is None for v in out.values()) else out

    def sample(self) -> dict[str, Any]:
        nv, h, f = self._nv, self._h, self._field
        util = f(nv.nvmlDeviceGetUtilizationRates, h)
        mem = f(nv.nvmlDeviceGetMemoryInfo, h)
        power = f(nv.nvmlDeviceGetPowerUsage, h)  # mW
        limit = f(nv.nvmlDeviceGetEnforcedPowerLimit, h)  # mW
        reasons = f(self._reasons_fn, h)
        return {
            **self.info,
            "utilization_gpu": util.gpu if util is not None else None,
            "utilization_memory": util.memory if util is not None else None,
            "memory_used": int(mem.used) if mem is not None else None,
            "memory_total": int(mem.total) if mem is not None else None,
            "temperature": f(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
            "temperature_slowdown": self._slowdown_temp,
            "power": power / 1000 if power is not None else None,
            "power_limit": limit / 1000 if limit is not None else None,
            "sm_clock": f(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
            "sm_clock_max": self._sm_max,
            "throttle_reasons": throttle_reasons(reasons) if reasons is not None else None,
            "ecc_errors": self._ecc(),
            "sampled_at": time.time(),
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._nv.nvmlShutdown()


class SimulatedSource:
    """A pretend GPU driven by the worker's real busy time, for benchmarks on CPU hosts.

    Utilisation is the fraction of wall time the worker spent running batches since the
    last sample (lightly smoothed), so a worker started with ``--slowdown 4`` really looks
    four times as busy. Temperature, power and clock follow utilisation; memory is a base
    plus a cost per row in flight. Every sample says ``"source": "simulated"``.
    """

    MEMORY_TOTAL = 16 * 2**30
    MEMORY_BASE = 1536 * 2**20  # context + weights + arena after warm-up
    MEMORY_PER_ROW = 64 * 2**20
    SM_CLOCK_MAX = 1410
    POWER_LIMIT = 300.0
    SMOOTHING = 0.7  # weight of the newest reading

    def __init__(
        self,
        busy_seconds: Callable[[], float],
        rows_in_flight: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._busy, self._rows, self._clock = busy_seconds, rows_in_flight, clock
        self._last: tuple[float, float] | None = None
        self._util = 0.0
        self.info = {
            "source": "simulated",
            "index": None,
            "name": "Simulated GPU (not a real device)",
            "uuid": f"SIM-{uuid.uuid4()}",  # unique per worker; real UUIDs start GPU- or MIG-
        }

    def sample(self) -> dict[str, Any]:
        now, busy = self._clock(), self._busy()
        if self._last is not None and now > self._last[0]:
            raw = min(1.0, max(0.0, (busy - self._last[1]) / (now - self._last[0]))) * 100
            self._util += self.SMOOTHING * (raw - self._util)
        self._last = (now, busy)
        u = self._util / 100
        used = min(self.MEMORY_TOTAL, self.MEMORY_BASE + self.MEMORY_PER_ROW * max(0, self._rows()))
        return {
            **self.info,
            "utilization_gpu": round(self._util, 1),
            "utilization_memory": round(self._util * 0.6, 1),
            "memory_used": used,
            "memory_total": self.MEMORY_TOTAL,
            "temperature": round(35 + 45 * u),
            "temperature_slowdown": 87,
            "power": round(40 + (self.POWER_LIMIT - 40) * u, 1),
            "power_limit": self.POWER_LIMIT,
            "sm_clock": round(210 + (self.SM_CLOCK_MAX - 210) * min(1.0, 4 * u)),
            "sm_clock_max": self.SM_CLOCK_MAX,
            "throttle_reasons": [],
            "ecc_errors": {"volatile_uncorrected": 0, "volatile_corrected": 0},
            "sampled_at": time.time(),
        }

    def close(self) -> None:
        pass


def open_source(
    mode: str | bool | None,
    device: int | str | None = None,
    busy_seconds: Callable[[], float] | None = None,
    rows_in_flight: Callable[[], int] | None = None,
) -> GpuSource | None:
    """The source ``worker.gpu-metrics`` asks for. ``device`` is ``worker.gpu-index``.

    "auto" gives NVML when it initialises and the device exists, else None: a worker
    without a GPU honestly reports ``gpu: null``. "nvml" raises NvmlUnavailable instead.
    """
    # YAML 1.1 reads a bare `off` as False (and `on` as True).
    mode = {False: "off", True: "auto", None: "auto"}.get(mode, mode) if not isinstance(mode, str) else mode.lower()
    if mode == "off":
        return None
    if mode == "simulated":
        if busy_seconds is None or rows_in_flight is None:
            raise ValueError("a simulated GPU needs the worker's busy_seconds and rows_in_flight")
        return SimulatedSource(busy_seconds, rows_in_flight)
    if mode == "nvml":
        return NvmlSource(device_selector(device))
    if mode == "auto":
        try:
            return NvmlSource(device_selector(device))
        except NvmlUnavailable as e:
            logger.info("no GPU metrics: %s; this worker reports gpu: null", e)
            return None
    raise ValueError(f"unknown worker.gpu-metrics {mode!r}: use one of {', '.join(MODES)}")
