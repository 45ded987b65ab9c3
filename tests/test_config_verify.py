"""`fedsilo config check` and daemon start open what a config points at: the table, the
certificates and keys. Every broken case is the real CLI in a subprocess: exit 2, one line on
stderr naming the config key, the file at fault and the problem, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.federation.broker import free_port

SITE = """
[site]
id = "{site}"
federation = "fed"
state_dir = "state"

[broker]
host = "127.0.0.1"
port = {port}

[data]
table = "{table}"
{extra}
"""


def fedsilo(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pkis(tmp_path_factory) -> Path:
    """`fedsilo pki`: the federation CA with north, south and the coordinator, and a second CA
    (another federation) that also issued a `north`."""
    d = tmp_path_factory.mktemp("pkis")
    for args in (("init", "--dir", d / "pki", "--federation", "fed"),
                 ("issue", "site", "north", "--dir", d / "pki"),
                 ("issue", "site", "south", "--dir", d / "pki"),
                 ("issue", "coordinator", "--dir", d / "pki"),
                 ("issue", "site", "east", "--dir", d / "pki"),
                 ("revoke", "east", "--dir", d / "pki"),
                 ("init", "--dir", d / "other"),
                 ("issue", "site", "north", "--dir", d / "other")):
        done = fedsilo("pki", *args)
        assert done.returncode == 0, done.stderr
    return d


def site_config(tmp_path: Path, pkis: Path, *, site: str = "north", table: str = "t.csv",
                extra: str | None = None, port: int = 1883) -> Path:
    (tmp_path / "t.csv").write_text("age,outcome\n61,1\n70,0\n")
    if extra is None:
        extra = identity(pkis, "pki/ca.crt", f"pki/{site}.crt", f"pki/{site}.key")
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(site=site, table=table, extra=extra, port=port))
    return path


def identity(pkis: Path, ca: str, cert: str, key: str, table: str = "identity",
             crl: str | None = None) -> str:
    lines = [f"[{table}]", *(f'{k} = "{pkis / v}"' for k, v in
                            (("ca", ca), ("cert", cert), ("key", key)))]
    if crl is not None:
        lines.append(f'crl = "{pkis / crl}"')
    return "\n".join(lines) + "\n"


def refused(run: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr  # one line, no traceback
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def test_a_correct_site_config_with_identity_and_tls_passes(tmp_path, pkis):
    tls = identity(pkis, "pki/ca.crt", "pki/north.crt", "pki/north.key", table="broker.tls")
    for extra in (None, tls, tls + identity(pkis, "pki/ca.crt", "pki/north.crt",
                                            "pki/north.key", crl="pki/crl.pem")):
        path = site_config(tmp_path, pkis, extra=extra)
        run = fedsilo("config", "check", path)
        assert run.returncode == 0, run.stderr
        assert f"{path}: valid site file" in run.stdout


def test_a_missing_table_is_refused_naming_key_and_path(tmp_path, pkis):
    path = site_config(tmp_path, pkis, table="exports/absent.csv")
    refused(fedsilo("config", "check", path), f"{path}: data.table: ",
            f"{tmp_path / 'exports' / 'absent.csv'} does not exist")


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("binary.csv", bytes(range(256)) * 8, "binary content, not a CSV or Parquet table"),
    ("empty.csv", b"\n\n", "empty file, expected a header line"),
    ("utf16.csv", "age,outcome\n".encode("utf-16"), "UTF-16 text"),
    ("fake.parquet", b"age,outcome\n1,0\n", "not a Parquet file"),
    ("broken.parquet", b"PAR1" + b"\x00" * 64, "unreadable Parquet file"),
])
def test_a_table_that_is_not_csv_or_parquet_is_refused(tmp_path, pkis, name, content, problem):
    (tmp_path / name).write_bytes(content)
    path = site_config(tmp_path, pkis, table=name)
    refused(fedsilo("config", "check", path), f"{path}: data.table: {tmp_path / name}: {problem}")


def test_a_directory_as_table_is_refused(tmp_path, pkis):
    (tmp_path / "dir.csv").mkdir()
    path = site_config(tmp_path, pkis, table="dir.csv")
    refused(fedsilo("config", "check", path), "data.table", "is a directory")


@pytest.mark.parametrize(("ca", "cert", "key", "key_named", "problem"), [
    ("pki/ca.crt", "pki/north.crt", "garbage.key", "identity.key",
     "{d}/garbage.key: not a PEM private key"),
    ("pki/ca.crt", "garbage.key", "pki/north.key", "identity.cert",
     "{d}/garbage.key: not a PEM X.509 certificate"),
    ("garbage.key", "pki/north.crt", "pki/north.key", "identity.ca",
     "{d}/garbage.key: not a PEM X.509 certificate"),
    ("pki/ca.crt", "pki/south.crt", "pki/south.key", "identity.cert",
     "{d}/pki/south.crt: certificate is for 'south', this process is 'north'"),
    ("pki/ca.crt", "pki/north.crt", "pki/south.key", "identity.key",
     "{d}/pki/south.key: does not match the certificate {d}/pki/north.crt"),
    ("pki/ca.crt", "other/north.crt", "other/north.key", "identity.cert",
     "{d}/other/north.crt: not issued by the CA in {d}/pki/ca.crt"),
    ("other/ca.crt", "pki/north.crt", "pki/north.key", "identity.cert",
     "{d}/pki/north.crt: not issued by the CA in {d}/other/ca.crt"),
    ("pki/ca.crt", "pki/coordinator.crt", "pki/coordinator.key", "identity.cert",
     "certificate is for 'coordinator', this process is 'north'"),
])
def test_a_broken_identity_is_refused_naming_the_file_at_fault(tmp_path, pkis, ca, cert, key,
                                                                key_named, problem):
    (pkis / "garbage.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n")
    path = site_config(tmp_path, pkis, extra=identity(pkis, ca, cert, key))
    refused(fedsilo("config", "check", path), f"{path}: {key_named}: ",
            problem.format(d=pkis))


def test_the_tls_files_are_the_identity_without_an_identity_table(tmp_path, pkis):
    south = identity(pkis, "pki/ca.crt", "pki/south.crt", "pki/south.key", table="broker.tls")
    refused(fedsilo("config", "check", site_config(tmp_path, pkis, extra=south)),
            "broker.tls.cert: ", "certificate is for 'south', this process is 'north'")
    mixed = identity(pkis, "pki/ca.crt", "pki/north.crt", "pki/south.key", table="broker.tls")
    signing = identity(pkis, "pki/ca.crt", "pki/north.crt", "pki/north.key")
    refused(fedsilo("config", "check", site_config(tmp_path, pkis, extra=mixed + signing)),
            "broker.tls.key: ", f"{pkis}/pki/south.key: does not match")


def test_a_revoked_certificate_is_refused_when_the_crl_lists_it(tmp_path, pkis):
    extra = identity(pkis, "pki/ca.crt", "pki/east.crt", "pki/east.key", crl="pki/crl.pem")
    refused(fedsilo("config", "check", site_config(tmp_path, pkis, site="east", extra=extra)),
            "identity.cert: ", f"certificate is revoked in {pkis}/pki/crl.pem")
    foreign = identity(pkis, "pki/ca.crt", "pki/north.crt", "pki/north.key",
                       crl="other/crl.pem")
    refused(fedsilo("config", "check", site_config(tmp_path, pkis, extra=foreign)),
            "identity.crl: ", "not signed by the CA")


def test_the_coordinator_identity_must_be_the_coordinator(tmp_path, pkis):
    path = tmp_path / "coordinator.toml"
    good = identity(pkis, "pki/ca.crt", "pki/coordinator.crt", "pki/coordinator.key")
    for head in ('[coordinator]\nstate_dir = "s"\n', '[coordinator]\nstate_dir = "s"\nid = "c2"\n'):
        path.write_text(head + good)  # coordinator.id names the client, not the certificate
        run = fedsilo("config", "check", path)
        assert run.returncode == 0, run.stderr
    path.write_text('[coordinator]\nstate_dir = "s"\n' +
                    identity(pkis, "pki/ca.crt", "pki/north.crt", "pki/north.key"))
    refused(fedsilo("config", "check", path), f"{path}: identity.cert: ",
            "certificate is for 'north', this process is 'coordinator'")


def test_site_run_refuses_at_start_not_at_the_first_task(tmp_path, pkis):
    """No broker is listening on the port: the checks come before any connection attempt, so
    the daemon exits 2 at once with the same one line."""
    port = free_port()
    path = site_config(tmp_path, pkis, table="absent.csv", port=port)
    refused(fedsilo("site", "run", "--config", path, timeout=30), "data.table",
            "absent.csv does not exist")
    (pkis / "garbage.key").write_bytes(b"garbage")
    path = site_config(tmp_path, pkis, port=port,
                       extra=identity(pkis, "pki/ca.crt", "pki/north.crt", "garbage.key"))
    refused(fedsilo("site", "run", "--config", path, timeout=30), "identity.key",
            f"{pkis}/garbage.key: not a PEM private key")


def test_coordinator_run_refuses_another_ca_at_start(tmp_path, pkis):
    plan = Path(__file__).resolve().parents[1] / "packaging" / "examples" / "plan.toml"
    path = tmp_path / "coordinator.toml"
    path.write_text(f'[coordinator]\nstate_dir = "s"\n[broker]\nport = {free_port()}\n' +
                    identity(pkis, "other/ca.crt", "pki/coordinator.crt", "pki/coordinator.key"))
    refused(fedsilo("coordinator", "run", "--config", path, "--plan", plan, timeout=30),
            "identity.cert", "not issued by the CA")


def test_the_signer_names_the_key_file_when_the_key_is_garbage(pkis):
    from agent.errors import ConfigError
    from agent.security.signing import Signer

    (pkis / "garbage.key").write_bytes(b"garbage")
    with pytest.raises(ConfigError) as info:
        Signer(pkis / "pki" / "north.crt", pkis / "garbage.key")
    assert info.value.file == str(pkis / "garbage.key")
    assert "not a PEM private key" in str(info.value)


def test_expired_not_yet_valid_and_encrypted_identities_are_refused(tmp_path, pkis):
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from agent.security.pki import PKI

    pki = PKI(pkis / "pki")
    now = dt.datetime.now(dt.timezone.utc)
    for name, start, problem in (("old", now - dt.timedelta(days=400), "expired on"),
                                 ("early", now + dt.timedelta(days=2), "not valid before")):
        pki.issue("site", name, not_before=start, days=365)
        extra = identity(pkis, "pki/ca.crt", f"pki/{name}.crt", f"pki/{name}.key")
        refused(fedsilo("config", "check", site_config(tmp_path, pkis, site=name, extra=extra)),
                "identity.cert: ", f"{pkis}/pki/{name}.crt: {problem}")
    key = serialization.load_pem_private_key((pkis / "pki" / "north.key").read_bytes(), None)
    (pkis / "locked.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    extra = identity(pkis, "pki/ca.crt", "pki/north.crt", "locked.key")
    refused(fedsilo("config", "check", site_config(tmp_path, pkis, extra=extra)),
            "identity.key: ", f"{pkis}/locked.key: private key is encrypted")
