"""Hardware profiles: which backend, how many threads and how big a batch on this host.

The agent shares its server with clinical work, so it must not take every core by default, and
hospital IT must be able to read and override what it chose. Layered like TuneD's profile
loader: a pure core (parse, merge `include` chains, match, select, count threads) over plain
data, and a thin edge that reads the host (`detect_host`) and applies the choice
(`apply_profile`, the only side effect: Numba's thread count). Format and rules:
docs/hardware.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from agent.config import PROFILE_NAME_PATTERN, _read_toml, _Reader
from agent.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "reference", "gpu")
PROFILES_DIR_ENV = "FEDSILO_PROFILES_DIR"
SELECT_KEY = "site.hardware_profile"
_TOP_KEYS = {"include", "description", "match", "settings"}
_MATCH_INT = ("min_cores", "max_cores")
_MATCH_GIB = ("min_memory_gib", "max_memory_gib", "gpu_min_memory_gib")
_MATCH_KEYS = {*_MATCH_INT, *_MATCH_GIB, "gpu", "gpu_model"}
# settings key -> (lowest, highest) for the integer ones; backend is a choice.
_SETTINGS_INT = {
    "threads": (0, 4096),
    "reserve_cores": (0, 4096),
    "max_batch_size": (1, 1 << 20),
    "memory_cap_mib": (0, 1 << 30),
    "ingest_workers": (1, 256),
}
_SETTINGS_KEYS = {"backend", *_SETTINGS_INT}


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class HostFacts:
    """What selection looks at; fabricated freely in tests."""

    cores: int
    memory_gib: float
    gpu_name: str | None = None  # set only when the gpu kernel backend is usable
    gpu_memory_gib: float | None = None

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        gpu = f"GPU {self.gpu_name}" if self.gpu_name else "no usable GPU"
        if self.gpu_name and self.gpu_memory_gib is not None:
            gpu += f" ({self.gpu_memory_gib:.1f} GiB)"
        return f"{self.cores} cores, {self.memory_gib:.1f} GiB memory, {gpu}"


@dataclass(frozen=True)
class Match:
    """Rules a host must meet for "auto" to consider a profile; None = no rule."""

    min_cores: int | None = None
    max_cores: int | None = None
    min_memory_gib: float | None = None
    max_memory_gib: float | None = None
    gpu: bool | None = None
    gpu_model: str | None = None  # case-insensitive substring of the GPU name
    gpu_min_memory_gib: float | None = None

    def constraints(self) -> int:
        """How specific the profile is: the number of rules set."""
        return sum(getattr(self, f.name) is not None for f in fields(self))

    def holds(self, facts: HostFacts) -> bool:
        if self.min_cores is not None and facts.cores < self.min_cores:
            return False
        if self.max_cores is not None and facts.cores > self.max_cores:
            return False
        if self.min_memory_gib is not None and facts.memory_gib < self.min_memory_gib:
            return False
        if self.max_memory_gib is not None and facts.memory_gib > self.max_memory_gib:
            return False
        if self.gpu is not None and facts.has_gpu != self.gpu:
            return False
        if self.gpu_model is not None and (
                facts.gpu_name is None or self.gpu_model.lower() not in facts.gpu_name.lower()):
            return False
        if self.gpu_min_memory_gib is not None and (
                facts.gpu_memory_gib is None or facts.gpu_memory_gib < self.gpu_min_memory_gib):
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Settings:
    """What a profile sets. Only `threads` is applied here; the rest is read by the parts that
    honour it (trainer batch cap, resource governance, ingest pool)."""

    backend: str  # auto | cpu | reference | gpu
    threads: int  # 0 = all cores minus reserve_cores
    reserve_cores: int
    max_batch_size: int
    memory_cap_mib: int  # 0 = no cap
    ingest_workers: int


@dataclass(frozen=True)
class Profile:
    """One resolved profile: its own keys merged over everything it includes."""

    name: str
    description: str
    match: Match
    settings: Settings
    source: str  # the profile's own file
    includes: tuple[str, ...] = ()  # resolved chain, nearest parent first

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "includes": list(self.includes), "match": self.match.to_dict(),
                "settings": asdict(self.settings)}


# ---------------------------------------------------------------------------- loading (pure)


@dataclass(frozen=True)
class _Raw:
    """One file's own keys, type-checked but not yet merged."""

    file: str
    include: str | None
    description: str | None
    match: dict[str, Any]
    settings: dict[str, Any]


def _parse(path: Path) -> _Raw:
    file = str(path)
    top = _Reader(file, _read_toml(path), "")
    top.reject_unknown(_TOP_KEYS)
    include = (top.pattern("include", PROFILE_NAME_PATTERN, "profile name")
               if "include" in top.table else None)
    description = top.get("description", str, None)
    match: dict[str, Any] = {}
    m = top.sub("match")
    if m is not None:
        m.reject_unknown(_MATCH_KEYS)
        for k in m.table:
            if k in _MATCH_INT:
                match[k] = m.number(k, lo=0, hi=1 << 20, integer=True)
            elif k in _MATCH_GIB:
                match[k] = m.number(k, lo=0.0, hi=float(1 << 30))
            elif k == "gpu":
                match[k] = m.get(k, bool)
            else:  # gpu_model
                value = m.get(k, str)
                if not value.strip():
                    raise m.fail(k, "must not be empty")
                match[k] = value
    settings: dict[str, Any] = {}
    s = top.sub("settings")
    if s is not None:
        s.reject_unknown(_SETTINGS_KEYS)
        for k in s.table:
            if k == "backend":
                settings[k] = s.choice(k, BACKENDS)
            else:
                lo, hi = _SETTINGS_INT[k]
                settings[k] = s.number(k, lo=lo, hi=hi, integer=True)
    return _Raw(file, include, description, match, settings)


def _merge(name: str, raws: dict[str, _Raw], done: dict[str, Profile],
           stack: list[str]) -> Profile:
    """Resolve `name`: its keys override its parent's, table by table (match, settings)."""
    if name in done:
        return done[name]
    raw = raws[name]
    stack.append(name)
    if raw.include is None:
        description, match, settings, includes = raw.description or "", {}, {}, ()
    else:
        if raw.include not in raws:
            raise ConfigError(raw.file, "include", f"unknown profile {raw.include!r} (known: "
                                                   f"{', '.join(sorted(raws))})")
        if raw.include in stack:
            chain = stack[stack.index(raw.include):] + [raw.include]
            raise ConfigError(raw.file, "include", f"include cycle: {' -> '.join(chain)}")
        parent = _merge(raw.include, raws, done, stack)
        description = raw.description if raw.description is not None else parent.description
        match = parent.match.to_dict()
        settings = asdict(parent.settings)
        includes = (raw.include, *parent.includes)
    stack.pop()
    match.update(raw.match)
    settings.update(raw.settings)
    missing = sorted(_SETTINGS_KEYS - settings.keys())
    if missing:
        raise ConfigError(raw.file, f"settings.{missing[0]}",
                          "is required but missing (set it here or in an included profile)")
    for lo, hi in (("min_cores", "max_cores"), ("min_memory_gib", "max_memory_gib")):
        if lo in match and hi in match and match[hi] < match[lo]:
            raise ConfigError(raw.file, f"match.{hi}",
                              f"is {match[hi]}, below match.{lo} = {match[lo]}: never matches")
    profile = Profile(name=name, description=description, match=Match(**match),
                      settings=Settings(**settings), source=raw.file, includes=includes)
    done[name] = profile
    return profile


def load_profiles(directory: Path) -> dict[str, Profile]:
    """Every `*.toml` in `directory`, resolved; the file name (without .toml) is the profile name.

    Raises ConfigError naming the file and key on any bad name, key, type, include or cycle, so
    one broken profile stops `fedsilo config check` rather than a running site.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(str(directory), "", "hardware profile directory not found (ship "
                          f"hardware_profiles/ with the agent or set {PROFILES_DIR_ENV})")
    raws: dict[str, _Raw] = {}
    for path in sorted(directory.glob("*.toml")):
        if path.name.startswith("."):
            continue  # editor lock files and the like
        if not PROFILE_NAME_PATTERN.fullmatch(path.stem):
            raise ConfigError(str(path), "", f"{path.stem!r} is not a valid profile name "
                                             f"(pattern {PROFILE_NAME_PATTERN.pattern})")
        raws[path.stem] = _parse(path)
    if not raws:
        raise ConfigError(str(directory), "", "no hardware profiles (*.toml) in this directory")
    done: dict[str, Profile] = {}
    for name in sorted(raws):
        _merge(name, raws, done, [])
    return done


# ---------------------------------------------------------------------------- choosing (pure)


def matching_profiles(profiles: dict[str, Profile], facts: HostFacts) -> list[Profile]:
    """Profiles whose match rules all hold, best first (most rules, then name)."""
    hits = [p for p in profiles.values() if p.match.holds(facts)]
    return sorted(hits, key=lambda p: (-p.match.constraints(), p.name))


def profile_named(profiles: dict[str, Profile], name: str, *,
                  source: str = "<site config>") -> Profile:
    """The profile IT named, or a ConfigError on `site.hardware_profile` listing the known ones."""
    if name not in profiles:
        raise ConfigError(source, SELECT_KEY, f"unknown hardware profile {name!r} "
                                              f"(known: auto, {', '.join(sorted(profiles))})")
    return profiles[name]


def select_profile(profiles: dict[str, Profile], facts: HostFacts, requested: str, *,
                   source: str = "<site config>") -> Profile:
    """The profile to run with: `requested` by name, or for "auto" the most specific match.

    `source` names the file that asked (the site config) in the ConfigError.
    """
    if requested != "auto":
        return profile_named(profiles, requested, source=source)
    hits = matching_profiles(profiles, facts)
    if not hits:
        raise ConfigError(source, SELECT_KEY, f'"auto": no hardware profile matches this host '
                                              f"({facts.summary()}); add one without [match] "
                                              "rules or name a profile")
    return hits[0]


def threads_for(profile: Profile, facts: HostFacts) -> int:
    """Compute threads for this host: an explicit `threads` (capped at the cores), or all
    cores minus `reserve_cores` -- but the reserve never leaves fewer than 2 threads where 2
    cores exist, since one thread on a 2-core VM halves training for little relief."""
    cores = max(1, facts.cores)
    s = profile.settings
    if s.threads > 0:
        return min(s.threads, cores)
    return max(1, cores - s.reserve_cores, min(cores, 2))


def backend_for(profile: Profile, available: dict[str, str | None]) -> str:
    """The profile's backend if usable here, else "auto" (with a warning): a named profile
    whose GPU went away (driver update) should keep the site training on the CPU."""
    wanted = profile.settings.backend
    if wanted == "auto" or available.get(wanted, "unknown backend") is None:
        return wanted
    log.warning("hardware profile %s asks for backend %s, unusable here (%s); using auto",
                profile.name, wanted, available.get(wanted, "unknown backend"))
    return "auto"


# ---------------------------------------------------------------------------- edges (I/O)


def default_profiles_dir() -> Path:
    """`hardware_profiles/` next to the `agent` package, unless $FEDSILO_PROFILES_DIR is set
    (IT's own directory, e.g. /etc/fedsilo/hardware_profiles)."""
    override = os.environ.get(PROFILES_DIR_ENV)
    if override:
        return Path(override)
    import agent

    return Path(agent.__file__).resolve().parent.parent / "hardware_profiles"


def _usable_cores() -> int:
    """Cores this process may run on (taskset/systemd CPUAffinity=), else all of them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cuda_device() -> tuple[str, float | None]:
    """Name and memory of the current CUDA device; cupy is imported only here."""
    try:
        import cupy

        runtime = cupy.cuda.runtime
        props = runtime.getDeviceProperties(runtime.getDevice())
        name = props.get("name", b"CUDA device")
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        memory = props.get("totalGlobalMem")
        return name, (round(memory / 2**30, 1) if memory else None)
    except Exception as exc:  # noqa: BLE001 - only a description; the backend itself is usable
        log.debug("CUDA device properties unavailable: %s", exc)
        return "CUDA device", None


def detect_host() -> HostFacts:
    """Read cores, memory and a usable GPU (the gpu kernel backend loads) from this host."""
    import psutil

    import kernels

    gpu_name, gpu_memory = None, None
    if kernels.available_backends().get("gpu") is None:
        gpu_name, gpu_memory = _cuda_device()
    return HostFacts(cores=_usable_cores(),
                     memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
                     gpu_name=gpu_name, gpu_memory_gib=gpu_memory)


def apply_profile(profile: Profile, facts: HostFacts) -> int:
    """Set Numba's thread count for the calling thread (and the parallel regions it starts);
    returns the count in effect. Numba's pool never grows past NUMBA_NUM_THREADS, so clamp."""
    threads = threads_for(profile, facts)
    try:
        import numba
    except ImportError:
        return threads  # reference backend only: nothing to set
    threads = max(1, min(threads, int(numba.config.NUMBA_NUM_THREADS)))
    numba.set_num_threads(threads)
    log.info("hardware profile %s: %d Numba threads, backend %s", profile.name, threads,
             profile.settings.backend)
    return threads
