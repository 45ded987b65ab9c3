"""Config and plan validation: every kind of mistake names file, key and problem (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import (
    check_file,
    load_coordinator_config,
    load_plan,
    load_site_config,
    plan_from_dict,
    plan_to_toml_dict,
)
from agent.errors import ConfigError

PLAN = """
[federation]
id = "stroke-test"
sites = ["north", "south", "east"]
rounds = 5
min_sites = 2
round_deadline_s = 30

[target]
column = "good_outcome"

[[features]]
name = "age"
type = "numeric"

[[features]]
name = "sex"
type = "categorical"
levels = ["female", "male"]

[data]
missing = "mean"

[model]
kind = "mlp"
hidden = [8, 4]

[training]
local_epochs = 2
batch_size = 16
learning_rate = 0.1
optimizer = "adam"
"""

SITE = """
[site]
id = "north"
federation = "stroke-test"
state_dir = "state"

[broker]
host = "127.0.0.1"
port = 1883

[data]
table = "clinical.csv"
"""


def write(tmp_path: Path, text: str, name: str = "f.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_valid_plan_loads_into_frozen_objects(tmp_path):
    plan = load_plan(write(tmp_path, PLAN))
    assert plan.sites == ("north", "south", "east")
    assert plan.features[1].levels == ("female", "male")
    assert plan.model.hidden == (8, 4)
    assert plan.training.optimizer == "adam" and plan.training.local_epochs == 2
    with pytest.raises(AttributeError):
        plan.rounds = 9  # type: ignore[misc]


def test_plan_round_trips_through_its_wire_form(tmp_path):
    plan = load_plan(write(tmp_path, PLAN))
    again = plan_from_dict(plan_to_toml_dict(plan))
    assert again.to_dict() == plan.to_dict()


def test_site_config_resolves_paths_relative_to_the_file(tmp_path):
    cfg = load_site_config(write(tmp_path, SITE))
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.data.table == tmp_path / "clinical.csv"
    assert cfg.broker.port == 1883 and cfg.broker.tls is None


def test_identity_table_names_the_signing_files(tmp_path):
    for name in ("ca.crt", "me.crt", "me.key", "crl.pem"):
        (tmp_path / name).write_text("x")
    cfg = load_site_config(write(tmp_path, SITE + '\n[identity]\nca = "ca.crt"\ncert = '
                                 '"me.crt"\nkey = "me.key"\ncrl = "crl.pem"\n'))
    assert cfg.identity is not None and cfg.identity.crl == tmp_path / "crl.pem"
    assert cfg.identity.cert == tmp_path / "me.crt"
    assert load_site_config(write(tmp_path, SITE)).identity is None


def test_coordinator_config(tmp_path):
    cfg = load_coordinator_config(write(tmp_path, '[coordinator]\nstate_dir = "/var/x"\n'))
    assert str(cfg.state_dir) == "/var/x"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (PLAN.replace('rounds = 5', 'rounds = "five"'), "federation.rounds", "must be an integer"),
        (PLAN.replace('rounds = 5\n', ''), "federation.rounds", "required"),
        (PLAN.replace('"east"]', '"East/1"]'), "federation.sites", "not a valid site id"),
        (PLAN.replace('min_sites = 2', 'min_sites = 7'), "federation.min_sites", "only 3"),
        (PLAN.replace('type = "numeric"', 'type = "number"'), "features[0].type", "one of"),
        (PLAN.replace('levels = ["female", "male"]', 'levels = ["x"]'), "features[1].levels",
         "at least two"),
        (PLAN.replace('name = "sex"', 'name = "age"'), "features[1].name", "duplicate"),
        (PLAN.replace('column = "good_outcome"', 'column = "age"'), "target.column",
         "also listed"),
        (PLAN.replace('kind = "mlp"', 'kind = "forest"'), "model.kind", "one of"),
        (PLAN.replace('hidden = [8, 4]', 'hidden = [8, 0]'), "model.hidden", "between"),
        (PLAN.replace('learning_rate = 0.1', 'learning_rate = -1.0'), "training.learning_rate",
         ">="),
        (PLAN.replace('optimizer = "adam"', 'optimizer = "lbfgs"'), "training.optimizer",
         "one of"),
        (PLAN.replace('missing = "mean"', 'missing = "zero"'), "data.missing", "one of"),
        (PLAN + "\n[extra]\nx = 1\n", "extra", "unknown key"),
        (PLAN.replace('batch_size = 16', 'batch_size = true'), "training.batch_size",
         "boolean"),
    ],
)
def test_plan_errors_name_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert problem in info.value.problem


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (SITE.replace('id = "north"', 'id = "North Site"'), "site.id", "not a valid site id"),
        (SITE.replace('state_dir = "state"\n', ''), "site.state_dir", "required"),
        (SITE.replace('port = 1883', 'port = 70000'), "broker.port", "<= 65535"),
        (SITE.replace('table = "clinical.csv"', 'table = "clinical.xlsx"'), "data.table",
         ".csv or .parquet"),
        (SITE + '\n[broker.tls]\nca = "missing-ca.crt"\ncert = "c"\nkey = "k"\n', "broker.tls.ca",
         "does not exist"),
        (SITE + '\n[identity]\nca = "missing-ca.crt"\ncert = "c"\nkey = "k"\n', "identity.ca",
         "does not exist"),
        (SITE + '\n[identity]\nkey = "k"\n', "identity.ca", "required"),
        (SITE + '\n[identity]\nsecret = "s"\n', "identity.secret", "unknown"),
    ],
)
def test_site_config_errors(tmp_path, text, key, problem):
    with pytest.raises(ConfigError) as info:
        load_site_config(write(tmp_path, text))
    assert info.value.key == key and problem in info.value.problem


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        check_file(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        check_file(write(tmp_path, "[site\nid = 1"))
    with pytest.raises(ConfigError, match="not a fedsilo file"):
        check_file(write(tmp_path, "[other]\nx = 1\n"))


def test_check_file_detects_each_kind(tmp_path):
    (tmp_path / "clinical.csv").write_text("age,sex,good_outcome\n61,male,1\n")
    assert check_file(write(tmp_path, PLAN, "plan.toml")) == "plan"
    assert check_file(write(tmp_path, SITE, "site.toml")) == "site"
    assert check_file(write(tmp_path, '[coordinator]\nstate_dir = "s"\n', "c.toml")) == \
        "coordinator"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_config_check_exit_codes(tmp_path):
    good = run_cli("config", "check", str(write(tmp_path, PLAN, "plan.toml")))
    assert good.returncode == 0, good.stderr
    assert "valid plan" in good.stdout
    bad = run_cli("config", "check", str(write(tmp_path, PLAN.replace("rounds = 5", "rounds = 0"),
                                                "bad.toml")))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr  # one line, no traceback
    assert "bad.toml: federation.rounds: must be >= 1" in lines[0]


def test_cli_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("fedsilo ")


IMAGING = """
[imaging]
modality = "CT"
depth = 8
size = 32
window_center = 40
window_width = 80
"""


def test_cnn_fused_plan_with_imaging_round_trips(tmp_path):
    text = PLAN.replace('kind = "mlp"\nhidden = [8, 4]',
                        'kind = "cnn_fused"\nhidden = [8]\nconv_channels = [4, 8]') + IMAGING
    plan = load_plan(write(tmp_path, text))
    assert plan.model.conv_channels == (4, 8) and plan.model.kernel_size == 3
    assert plan.imaging is not None and plan.imaging.depth == 8 and plan.imaging.size == 32
    assert plan_from_dict(plan_to_toml_dict(plan)).to_dict() == plan.to_dict()


@pytest.mark.parametrize(
    ("model", "extra", "key", "problem"),
    [
        ('kind = "cnn_fused"\nconv_channels = [4]', "", "imaging", "needs an [imaging]"),
        ('kind = "cnn_fused"\nconv_channels = [4, 8, 8, 8]', IMAGING.replace("32", "20"),
         "imaging.size", "divisible by 16"),
        ('kind = "mlp"\nhidden = [4]\nconv_channels = [4]', "", "model.conv_channels",
         "other kinds"),
        ('kind = "cnn_fused"\nconv_channels = [4]\nkernel_size = 4', IMAGING, "model.kernel_size",
         "odd"),
        ('kind = "cnn_fused"\nconv_channels = [4]', IMAGING.replace("depth = 8", "depth = 0"),
         "imaging.depth", ">= 1"),
    ],
)
def test_imaging_plan_errors(tmp_path, model, extra, key, problem):
    text = PLAN.replace('kind = "mlp"\nhidden = [8, 4]', model) + extra
    with pytest.raises(ConfigError) as info:
        load_plan(write(tmp_path, text))
    assert info.value.key == key and problem in info.value.problem


def test_site_dicom_section(tmp_path):
    cfg = load_site_config(write(tmp_path, SITE + """
[dicom]
listen = true
ae_title = "FEDSILO_A"
port = 11113
allowed_callers = ["PACS1", "CT_SCANNER"]
watch_dir = "incoming"
series_quiet_s = 5
"""))
    assert cfg.dicom.listen and cfg.dicom.ae_title == "FEDSILO_A" and cfg.dicom.port == 11113
    assert cfg.dicom.allowed_callers == ("PACS1", "CT_SCANNER")
    assert cfg.dicom.watch_dir == tmp_path / "incoming"
    with pytest.raises(ConfigError) as info:
        load_site_config(write(tmp_path, SITE + '\n[dicom]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n'))
    assert info.value.key == "dicom.ae_title"


def test_site_dicom_bounds(tmp_path):
    cfg = load_site_config(write(tmp_path, SITE + """
[dicom]
queue_files = 50
incoming_max_bytes = 2147483648
quarantine_max_bytes = 0
"""))
    assert (cfg.dicom.queue_files, cfg.dicom.incoming_max_bytes,
            cfg.dicom.quarantine_max_bytes) == (50, 2 << 30, 0)
    assert load_site_config(write(tmp_path, SITE)).dicom.queue_files == 1000
    with pytest.raises(ConfigError) as info:
        load_site_config(write(tmp_path, SITE + "\n[dicom]\nqueue_files = 0\n"))
    assert info.value.key == "dicom.queue_files"


SCORING_SITE = SITE + 'id_column = "mrn"\n\n[dicom]\nlisten = true\nallowed_callers = ["PACS1"]\n'


def test_site_results_section(tmp_path):
    cfg = load_site_config(write(tmp_path, SCORING_SITE + """
[results]
score = true
retry_s = 60
[results.pacs]
ae_title = "PACS1"
host = "pacs.example.org"
"""))
    r = cfg.results
    assert r.score and r.retry_s == 60 and r.model_dir is None
    assert (r.pacs.ae_title, r.pacs.host, r.pacs.port, r.pacs.calling_ae_title) == (
        "PACS1", "pacs.example.org", 104, "FEDSILO")
    assert not load_site_config(write(tmp_path, SITE)).results.score


@pytest.mark.parametrize("text,key,problem", [
    (SITE + "\n[results]\nscore = true\n", "results.score", "needs [dicom] listen"),
    (SITE + '\n[dicom]\nwatch_dir = "in"\n[results]\nscore = true\n', "results.score",
     "id_column"),
    (SCORING_SITE + '[results]\n[results.pacs]\nae_title = "P"\nhost = "h"\n', "results.pacs",
     "set score = true"),
    (SCORING_SITE + '[results]\nscore = true\n[results.pacs]\nhost = "h"\n',
     "results.pacs.ae_title", "required"),
    (SCORING_SITE + '[results]\nscore = true\n[results.pacs]\nae_title = "P"\nhost = "h"\n'
     'port = 0\n', "results.pacs.port", ">= 1"),
    (SCORING_SITE + '[results]\nscore = true\nsend = true\n', "results.send", "unknown"),
])
def test_site_results_errors(tmp_path, text, key, problem):
    with pytest.raises(ConfigError) as info:
        load_site_config(write(tmp_path, text))
    assert info.value.key == key and problem in str(info.value)


def test_feature_units(tmp_path):
    text = PLAN.replace('name = "age"\ntype = "numeric"', 'name = "age"\ntype = "numeric"\n'
                                                         'unit = "years"')
    plan = load_plan(write(tmp_path, text))
    assert plan.features[0].unit == "years" and plan.features[1].unit == ""
    assert plan_from_dict(plan_to_toml_dict(plan)).features == plan.features
    assert "unit" not in plan.to_dict()["features"][1]  # plans without units keep their digest
    with pytest.raises(ConfigError) as info:
        load_plan(write(tmp_path, text.replace('unit = "years"', f'unit = "{"y" * 40}"')))
    assert info.value.key == "features[0].unit"


def test_broker_websockets_and_proxy(tmp_path):
    (tmp_path / "proxy.auth").write_text("it-dept:pa:ss\n")
    base = SITE.replace('port = 1883\n', '')
    cfg = load_site_config(write(tmp_path, base.replace('[broker]\n', '[broker]\ntransport = '
                                                        '"websockets"\n') + """
[broker.proxy]
host = "proxy.hospital.example"
port = 8080
auth_file = "proxy.auth"
"""))
    b = cfg.broker
    assert (b.transport, b.port, b.ws_path, b.scheme) == ("websockets", 443, "/mqtt", "ws")
    assert (b.proxy.host, b.proxy.port, b.proxy.username, b.proxy.password) == (
        "proxy.hospital.example", 8080, "it-dept", "pa:ss")
    assert "pa:ss" not in repr(b)  # the password never reaches a log line or traceback
    assert load_site_config(write(tmp_path, SITE)).broker.proxy is None


@pytest.mark.parametrize("extra,key,problem", [
    ('transport = "quic"\n', "broker.transport", "one of"),
    ('ws_path = "mqtt"\n', "broker.ws_path", "starting with /"),
    ('[broker.proxy]\nport = 3128\n', "broker.proxy.host", "required"),
    ('[broker.proxy]\nhost = "p"\nauth_file = "missing.auth"\n', "broker.proxy.auth_file",
     "cannot be read"),
    ('[broker.proxy]\nfrom_env = true\nhost = "p"\n', "broker.proxy.from_env", "not both"),
])
def test_broker_transport_errors(tmp_path, extra, key, problem):
    text = SITE.replace("[data]", extra + "[data]") if not extra.startswith("[") else \
        SITE.replace("[data]", extra + "\n[data]")
    with pytest.raises(ConfigError) as info:
        load_site_config(write(tmp_path, text))
    assert info.value.key == key and problem in str(info.value)


def test_broker_proxy_from_env(tmp_path, monkeypatch):
    text = SITE + ""
    text = text.replace("[data]", "[broker.proxy]\nfrom_env = true\n\n[data]")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert str(load_site_config(write(tmp_path, text)).broker.proxy) == \
        "proxy.hospital.example:3128"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the broker host: direct
    assert load_site_config(write(tmp_path, text)).broker.proxy is None
