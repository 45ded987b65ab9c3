"""Retained status documents: flat JSON that Telegraf, Zabbix or Node-RED can read as is.

Status is deliberately *not* a fedsilo envelope: monitoring tools must read it without our code.
"""

from __future__ import annotations

import enum
import json
import shutil
import time
from pathlib import Path
from typing import Any

from agent import __version__

STATUS_SCHEMA_VERSION = 2  # docs/status.schema.json; 2: host vitals, last round, throttled


class State(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"  # connected, waiting for work
    STATS = "stats"  # computing / collecting federated statistics
    TRAINING = "training"
    UPLOADING = "uploading"
    COLLECTING = "collecting"  # coordinator: waiting for updates
    AGGREGATING = "aggregating"
    FINISHED = "finished"
    OFFLINE = "offline"
    ERROR = "error"


def status_document(*, role: str, identity: str, federation: str, state: State,
                    round: int | None, last_error: str | None = None,
                    extra: dict[str, Any] | None = None,
                    now: float | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": STATUS_SCHEMA_VERSION,
        "role": role,
        "id": identity,
        "federation": federation,
        "state": state.value,
        "round": round,
        "version": __version__,
        "last_error": last_error,
        "ts": round_ts(time.time() if now is None else now),
    }
    for k, v in (extra or {}).items():
        doc.setdefault(k, v)
    return doc


def host_vitals(state_dir: Path) -> dict[str, Any]:
    """What IT watches on any host: CPU, memory, this process, disk free where the agent keeps
    its state, and the GPU when NVML is there (null otherwise). Never raises."""
    import psutil

    doc: dict[str, Any] = {"cpu_percent": None, "memory_percent": None, "rss_mib": None,
                           "disk_free_gib": None, "gpu_util_percent": None,
                           "gpu_memory_used_mib": None}
    try:
        doc["cpu_percent"] = psutil.cpu_percent(interval=None)
        doc["memory_percent"] = psutil.virtual_memory().percent
        doc["rss_mib"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        doc["disk_free_gib"] = round(shutil.disk_usage(state_dir).free / 2**30, 2)
    except (OSError, psutil.Error):
        pass
    doc.update(_gpu_vitals())
    return doc


def _gpu_vitals() -> dict[str, Any]:
    try:
        import pynvml  # nvidia-ml-py, present where a GPU driver stack is installed

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"gpu_util_percent": float(util.gpu),
                "gpu_memory_used_mib": round(mem.used / 2**20, 1)}
    except Exception:  # noqa: BLE001 - no NVML, no GPU, or a driver problem: not our failure
        return {}


def round_ts(t: float) -> float:
    return float(f"{t:.3f}")


def encode_status(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def offline_status(*, role: str, identity: str, federation: str, reason: str) -> bytes:
    """The last will (reason 'connection_lost') and the clean-stop message (reason 'stopped')."""
    return encode_status(status_document(role=role, identity=identity, federation=federation,
                                         state=State.OFFLINE, round=None,
                                         extra={"offline_reason": reason}))


# Home Assistant MQTT discovery (opt-in, [monitoring] home_assistant_discovery = true): retained
# config messages that make the site's status appear as sensors, reading the status topic.
HA_SENSORS = (("state", "state", None), ("round", "round", None),
              ("disk_free_gib", "disk free", "GiB"), ("cert_days_left", "certificate days left",
                                                      "d"),
              ("ingest_quarantined", "DICOM quarantined", None))


def home_assistant_discovery(federation: str, site: str, status_topic: str
                             ) -> list[tuple[str, bytes]]:
    """(topic, retained payload) per sensor, under homeassistant/sensor/."""
    device = {"identifiers": [f"fedsilo_{federation}_{site}"],
              "name": f"fedsilo {site} ({federation})", "manufacturer": "fedsilo",
              "sw_version": __version__}
    out = []
    for key, label, unit in HA_SENSORS:
        uid = f"fedsilo_{federation}_{site}_{key}".replace("-", "_")
        config: dict[str, Any] = {"name": label, "unique_id": uid, "state_topic": status_topic,
                                  "value_template": f"{{{{ value_json.{key} }}}}",
                                  "device": device}
        if unit:
            config["unit_of_measurement"] = unit
        out.append((f"homeassistant/sensor/{uid}/config", json.dumps(config).encode()))
    return out
