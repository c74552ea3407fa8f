"""Energy and money for a run: power x predicted time.

Power: the GPU's NVML power limit when readable; on a CPU, RAPL's package energy counters are used
where readable (`power_from_rapl`), else a documented figure per busy core (TDP_PER_CORE_W: desktop
and server x86 parts sit at 5-15 W per core under an all-core load). UTILISATION scales the GPU's
limit to what training typically draws.

`EnergyMeter` measures a run's energy for summary.json: RAPL's package counter where readable (the whole
package: other processes' work on it is included), else the same TDP figure x this process's measured
utilisation (TDP_PER_CORE_W x its CPU seconds); on a GPU NVML's energy counter, else the power limit x
UTILISATION x time.
"""

from __future__ import annotations

import time
from pathlib import Path

TDP_PER_CORE_W = 10.0
GPU_TDP_W = {"H200": 700.0, "H100": 700.0, "A100": 400.0, "L40": 300.0, "A10": 150.0, "T4": 70.0, "4090": 450.0}
UTILISATION = {"cuda": 0.8, "cpu": 1.0}
RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def power_from_rapl(seconds: float = 0.5) -> float | None:
    try:
        a = int(RAPL.read_text())
        time.sleep(seconds)
        b = int(RAPL.read_text())
    except (OSError, ValueError):
        return None
    return (b - a) / 1e6 / seconds if b >= a else None


def device_power(device) -> tuple[float, str]:
    """(watts during training, where the figure comes from)."""
    import torch

    if device.type == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            limit = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000
            return limit * UTILISATION["cuda"], "nvml power limit x utilisation"
        except Exception:  # noqa: BLE001 - no NVML: the table below
            name = torch.cuda.get_device_name()
            for key, watts in GPU_TDP_W.items():
                if key in name:
                    return watts * UTILISATION["cuda"], f"TDP table ({key}) x utilisation"
            return 300.0 * UTILISATION["cuda"], "TDP default 300 W x utilisation"
    measured = power_from_rapl()
    if measured is not None:
        return measured, "RAPL (package, sampled now)"
    threads = torch.get_num_threads()
    return TDP_PER_CORE_W * threads * UTILISATION["cpu"], f"TDP table: {TDP_PER_CORE_W:g} W x {threads} threads"


def energy_cost(seconds: float, watts: float, price_per_hour: float | None, price_per_kwh: float | None) -> dict:
    kwh = watts * seconds / 3.6e6
    out = {"energy_kwh": kwh, "power_w": watts}
    cost = 0.0
    if price_per_hour is not None:
        cost += price_per_hour * seconds / 3600
    if price_per_kwh is not None:
        cost += price_per_kwh * kwh
    if price_per_hour is not None or price_per_kwh is not None:
        out["cost"] = cost
    return out


class EnergyMeter:
    """Energy used between construction and `joules()` calls (see the module docstring for the sources)."""

    def __init__(self, device):
        self.device = device
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()  # every thread of this process
        self.rapl0 = self._rapl()
        self.nvml0 = self._nvml() if device.type == "cuda" else None
        self.source = (
            "nvml energy counter"
            if self.nvml0 is not None
            else "RAPL package counter"
            if self.rapl0 is not None
            else "GPU power limit x utilisation x time"
            if device.type == "cuda"
            else f"TDP estimate: {TDP_PER_CORE_W:g} W x CPU seconds of the process"
        )

    @staticmethod
    def _rapl():
        try:
            return int(RAPL.read_text()), int((RAPL.parent / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            return None

    def _nvml(self):
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000  # mJ -> J
        except Exception:  # noqa: BLE001 - no NVML or a GPU without the counter: the power-limit estimate
            return None

    def joules(self) -> float:
        if self.nvml0 is not None:
            now = self._nvml()
            if now is not None:
                return now - self.nvml0
        if self.rapl0 is not None:
            now = self._rapl()
            if now is not None:
                start, wrap = self.rapl0
                return ((now[0] - start) % wrap) / 1e6  # the counter wraps at max_energy_range_uj
        if self.device.type == "cuda":
            return device_power(self.device)[0] * (time.perf_counter() - self.wall0)
        return TDP_PER_CORE_W * (time.process_time() - self.cpu0)
