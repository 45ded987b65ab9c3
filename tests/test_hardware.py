"""Hardware profiles: loading and merge rules, selection over fabricated hosts, thread counts,
and the two command-line entry points (`hardware show`, `config check`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import check_file
from agent.errors import ConfigError
from agent.ops.hardware import (
    HostFacts,
    Match,
    Profile,
    Settings,
    backend_for,
    default_profiles_dir,
    load_profiles,
    matching_profiles,
    select_profile,
    threads_for,
)

BASE = """
description = "base"
[match]
[settings]
backend = "auto"
threads = 0
reserve_cores = 1
max_batch_size = 1024
memory_cap_mib = 0
ingest_workers = 2
"""


def write_profiles(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.toml").write_text(text)
    return directory


def load_error(tmp_path: Path, files: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_profiles(write_profiles(tmp_path / "p", files))
    return info.value


# ---------------------------------------------------------------------------- loading


def test_two_level_inheritance_overrides_key_by_key_and_table_by_table(tmp_path):
    profiles = load_profiles(write_profiles(tmp_path, {
        "base": BASE,
        "mid": 'include = "base"\ndescription = "mid"\n[match]\nmin_cores = 8\n'
               '[settings]\nbackend = "cpu"\nmax_batch_size = 512\n',
        "leaf": 'include = "mid"\n[match]\nmax_cores = 32\n[settings]\nmax_batch_size = 64\n',
    }))
    leaf = profiles["leaf"]
    assert leaf.includes == ("mid", "base")
    assert leaf.description == "mid"  # not set in leaf: inherited from the nearest parent
    assert leaf.match == Match(min_cores=8, max_cores=32)  # match tables merged
    assert leaf.settings == Settings(backend="cpu", threads=0, reserve_cores=1,
                                     max_batch_size=64, memory_cap_mib=0, ingest_workers=2)
    # parents are unchanged by their children
    assert profiles["mid"].settings.max_batch_size == 512
    assert profiles["base"].settings.backend == "auto" and profiles["base"].includes == ()
    assert leaf.source == str(tmp_path / "leaf.toml")


def test_include_cycle_names_file_and_key(tmp_path):
    err = load_error(tmp_path, {
        "base": BASE,
        "a": 'include = "b"\n',
        "b": 'include = "a"\n',
    })
    assert err.key == "include"
    assert err.file == str(tmp_path / "p" / "b.toml")
    assert "include cycle: a -> b -> a" in err.problem


def test_self_include_is_a_cycle(tmp_path):
    err = load_error(tmp_path, {"base": BASE, "loop": 'include = "loop"\n'})
    assert (err.file, err.key) == (str(tmp_path / "p" / "loop.toml"), "include")
    assert "loop -> loop" in err.problem


def test_unknown_include_names_file_and_key(tmp_path):
    err = load_error(tmp_path, {"base": BASE, "x": 'include = "nowhere"\n'})
    assert (err.file, err.key) == (str(tmp_path / "p" / "x.toml"), "include")
    assert "unknown profile 'nowhere'" in err.problem and "base" in err.problem


@pytest.mark.parametrize("stem", ["GPU", "-lead", "under_score", "a" * 33, "dots.in.name"])
def test_bad_profile_file_names_are_refused(tmp_path, stem):
    err = load_error(tmp_path, {"base": BASE, stem: 'include = "base"\n'})
    assert err.file == str(tmp_path / "p" / f"{stem}.toml")
    assert "not a valid profile name" in err.problem


def test_bad_include_name_is_refused(tmp_path):
    err = load_error(tmp_path, {"base": BASE, "x": 'include = "../base"\n'})
    assert err.key == "include" and "not a valid profile name" in err.problem


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('include = "base"\nnice = 5\n', "nice", "unknown key"),
        ('include = "base"\n[match]\ncores = 4\n', "match.cores", "unknown key"),
        ('include = "base"\n[settings]\nbatch = 4\n', "settings.batch", "unknown key"),
        ('include = "base"\n[settings]\nbackend = "tpu"\n', "settings.backend", "one of"),
        ('include = "base"\n[settings]\nthreads = "4"\n', "settings.threads", "integer"),
        ('include = "base"\n[settings]\nthreads = -1\n', "settings.threads", ">= 0"),
        ('include = "base"\n[settings]\nmax_batch_size = 0\n', "settings.max_batch_size", ">= 1"),
        ('include = "base"\n[match]\ngpu = "yes"\n', "match.gpu", "true or false"),
        ('include = "base"\n[match]\nmin_cores = true\n', "match.min_cores", "boolean"),
        ('include = "base"\n[match]\nmin_cores = 8\nmax_cores = 4\n', "match.max_cores",
         "never matches"),
        ('include = 3\n', "include", "must be a string"),
        ('[settings]\nbackend = "cpu"\n', "settings.ingest_workers", "required but missing"),
        ('include = "base"\nmatch = 1\n', "match", "must be a table"),
    ],
)
def test_bad_keys_and_types_name_file_key_and_problem(tmp_path, text, key, problem):
    err = load_error(tmp_path, {"base": BASE, "bad": text})
    assert err.file == str(tmp_path / "p" / "bad.toml")
    assert err.key == key
    assert problem in err.problem


def test_missing_or_empty_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="directory not found"):
        load_profiles(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no hardware profiles"):
        load_profiles(tmp_path / "empty")


def test_shipped_profiles_all_load_and_inherit_from_base():
    profiles = load_profiles(default_profiles_dir())
    assert {"base", "cpu-small", "cpu-large", "gpu"} <= profiles.keys()
    for name, p in profiles.items():
        assert p.description, name
        if name != "base":
            assert p.includes[-1] == "base", name
    assert profiles["base"].match.constraints() == 0  # the catch-all
    assert profiles["gpu"].settings.backend == "gpu"
    assert profiles["cpu-small"].settings.max_batch_size < profiles["base"].settings.max_batch_size
    assert profiles["cpu-large"].settings.ingest_workers > profiles["base"].settings.ingest_workers


def test_profiles_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSILO_PROFILES_DIR", str(tmp_path))
    assert default_profiles_dir() == tmp_path
    monkeypatch.delenv("FEDSILO_PROFILES_DIR")
    assert default_profiles_dir().name == "hardware_profiles"
    assert (default_profiles_dir() / "base.toml").is_file()


# ---------------------------------------------------------------------------- selection


SHIPPED = load_profiles(default_profiles_dir())
GPU_HOST = HostFacts(cores=32, memory_gib=256.0, gpu_name="NVIDIA H100 80GB HBM3",
                     gpu_memory_gib=79.1)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (HostFacts(cores=2, memory_gib=8.0), "cpu-small"),
        (HostFacts(cores=4, memory_gib=15.6), "cpu-small"),
        (HostFacts(cores=64, memory_gib=512.0), "cpu-large"),
        (GPU_HOST, "gpu"),
        (HostFacts(cores=2, memory_gib=8.0, gpu_name="Tesla T4", gpu_memory_gib=15.0), "gpu"),
        (HostFacts(cores=8, memory_gib=32.0), "base"),  # matches nothing more specific
        (HostFacts(cores=64, memory_gib=16.0), "base"),  # many cores, too little memory
    ],
)
def test_auto_selects_the_most_specific_matching_profile(facts, expected):
    assert select_profile(SHIPPED, facts, "auto").name == expected


def test_specificity_ties_are_broken_by_name(tmp_path):
    profiles = load_profiles(write_profiles(tmp_path, {
        "base": BASE,
        "zeta": 'include = "base"\n[match]\nmin_cores = 2\n',
        "alpha": 'include = "base"\n[match]\nmax_cores = 64\n',
        "model": 'include = "base"\n[match]\ngpu_model = "h100"\ngpu_min_memory_gib = 40\n',
    }))
    host = HostFacts(cores=8, memory_gib=32.0)
    assert [p.name for p in matching_profiles(profiles, host)] == ["alpha", "zeta", "base"]
    assert select_profile(profiles, GPU_HOST, "auto").name == "model"  # 2 rules beat 1


def test_named_selection_ignores_match_rules():
    host = HostFacts(cores=2, memory_gib=8.0)
    assert select_profile(SHIPPED, host, "cpu-large").name == "cpu-large"


def test_unknown_named_profile_names_site_hardware_profile():
    with pytest.raises(ConfigError) as info:
        select_profile(SHIPPED, HostFacts(2, 8.0), "turbo", source="/etc/fedsilo/site.toml")
    assert info.value.file == "/etc/fedsilo/site.toml"
    assert info.value.key == "site.hardware_profile"
    assert "unknown hardware profile 'turbo'" in info.value.problem


def test_auto_without_any_match_is_a_config_error(tmp_path):
    profiles = load_profiles(write_profiles(tmp_path, {
        "base": BASE.replace("[match]", "[match]\ngpu = true")}))
    with pytest.raises(ConfigError) as info:
        select_profile(profiles, HostFacts(2, 8.0), "auto")
    assert info.value.key == "site.hardware_profile" and "no hardware profile" in str(info.value)


def _profile(threads: int, reserve: int, backend: str = "auto") -> Profile:
    return Profile(name="t", description="", match=Match(), source="t.toml",
                   settings=Settings(backend=backend, threads=threads, reserve_cores=reserve,
                                     max_batch_size=1, memory_cap_mib=0, ingest_workers=1))


@pytest.mark.parametrize(
    ("cores", "threads", "reserve", "expected"),
    [
        (1, 0, 1, 1),     # never below one
        (2, 0, 1, 2),     # a 2-core VM keeps both: the reserve never leaves fewer than 2
        (3, 0, 1, 2),
        (4, 0, 1, 3),     # one core left to clinical work
        (64, 0, 2, 62),
        (8, 0, 0, 8),
        (8, 0, 100, 2),   # an oversized reserve still leaves 2
        (8, 4, 1, 4),     # explicit count wins over the reserve
        (4, 16, 0, 4),    # ... but is capped at the cores
    ],
)
def test_threads_for_reserve_rules(cores, threads, reserve, expected):
    assert threads_for(_profile(threads, reserve), HostFacts(cores, 8.0)) == expected


def test_backend_for_falls_back_to_auto_when_the_profile_backend_is_unusable():
    p = _profile(0, 1, backend="gpu")
    assert backend_for(p, {"reference": None, "cpu": None, "gpu": None}) == "gpu"
    assert backend_for(p, {"reference": None, "cpu": None, "gpu": "gpu: no CUDA"}) == "auto"
    assert backend_for(_profile(0, 1, backend="auto"), {}) == "auto"


# ---------------------------------------------------------------------------- command line


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_hardware_show_json():
    out = run_cli("hardware", "show", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {"host", "backends", "profile", "matching", "profiles_dir"} <= doc.keys()
    assert doc["host"]["cores"] >= 1 and doc["host"]["memory_gib"] > 0
    assert doc["backends"]["reference"] is None
    assert set(doc["backends"]) == {"reference", "cpu", "gpu"}
    assert doc["profile"]["name"] == doc["matching"][0]
    assert set(doc["profile"]["settings"]) == {"backend", "threads", "reserve_cores",
                                               "max_batch_size", "memory_cap_mib",
                                               "ingest_workers"}
    assert doc["profile"]["threads_here"] >= 1


def test_hardware_show_named_profile_and_unknown_one():
    out = run_cli("hardware", "show", "--json", "--profile", "cpu-large")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["profile"]["name"] == "cpu-large"
    bad = run_cli("hardware", "show", "--profile", "turbo")
    assert bad.returncode == 2 and "site.hardware_profile" in bad.stderr


SITE = """
[site]
id = "north"
federation = "stroke-test"
state_dir = "state"
hardware_profile = "{profile}"
"""


def test_config_check_refuses_unknown_profile_with_one_line(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(profile="turbo"))
    out = run_cli("config", "check", str(path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"{path}: site.hardware_profile: unknown hardware profile 'turbo'" in lines[0]


def test_check_file_accepts_known_profile_and_refuses_bad_name(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(profile="cpu-small"))
    assert check_file(path) == "site"
    path.write_text(SITE.format(profile="Fast Please"))
    with pytest.raises(ConfigError) as info:
        check_file(path)
    assert info.value.key == "site.hardware_profile" and "neither" in info.value.problem


def test_check_file_uses_the_profiles_dir_override(tmp_path, monkeypatch):
    write_profiles(tmp_path / "own", {"base": BASE, "ward-vm": 'include = "base"\n'})
    monkeypatch.setenv("FEDSILO_PROFILES_DIR", str(tmp_path / "own"))
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(profile="ward-vm"))
    assert check_file(path) == "site"
    path.write_text(SITE.format(profile="cpu-small"))  # shipped, but not in IT's directory
    with pytest.raises(ConfigError, match="site.hardware_profile"):
        check_file(path)
